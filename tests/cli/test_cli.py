"""The `moeinfer` command line, run in-process on tiny checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hf_peers import save_hf_checkpoint
from moeinfer.cli import SUBCOMMANDS, main
from tiny_tokenizer import write_tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli")
    save_hf_checkpoint("qwen2_moe", path, vocab_size=300, mlp_only_layers=[0])
    write_tokenizer(path)
    return path


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: moeinfer " + command in capsys.readouterr().out


def test_inspect_json(ckpt, capsys):
    assert main(["inspect", "--model", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "qwen2_moe"
    assert [row["ffn"] for row in info["layers"]] == ["dense", "moe"]
    assert info["layers"][1]["experts"] == 8 and info["layers"][1]["top_k"] == 2
    # active = total - routed experts + top-2 of 8 routed experts
    experts = info["bytes"]["experts"] // 4
    assert info["params_total"] - info["params_active"] == experts - experts * 2 // 8
    assert sum(info["bytes"].values()) == info["params_total"] * 4


def test_inspect_table(ckpt, capsys):
    assert main(["inspect", "-m", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "qwen2_moe" in out and "active per token" in out and "MoE 8 experts, top-2" in out


def test_generate_streams_text(ckpt, capsys):
    assert main(["generate", "-m", str(ckpt), "to be", "-n", "6"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("to be")
    assert "[6 tokens, finish: length]" in captured.err or "finish: eos" in captured.err


def test_generate_chat(ckpt, capsys):
    assert main(["generate", "-m", str(ckpt), "--chat", "hello", "-n", "3", "--no-stream"]) == 0
    assert "tokens, finish" in capsys.readouterr().err


def test_bad_model_path_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", "-m", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "moeinfer inspect: error: checkpoint directory" in err and "missing" in err


def test_console_script_entry_point(ckpt):
    out = subprocess.run([sys.executable, "-m", "moeinfer", "inspect", "-m", str(ckpt), "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["num_layers"] == 2
