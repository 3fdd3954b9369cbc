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


def _reference(ckpt, prompt):
    import moeinfer

    model = moeinfer.load(ckpt, progress=False)
    [ref] = moeinfer.generate(model, [prompt], max_new_tokens=6)
    return ref


def test_generate_streams_text(ckpt, capsys):
    """The streamed text and the summary line are exactly what the Python API generates (greedy)."""
    assert main(["generate", "-m", str(ckpt), "to be", "-n", "6"]) == 0
    captured = capsys.readouterr()
    ref = _reference(ckpt, "to be")
    assert captured.out == "to be" + ref.text + "\n"
    assert f"[{len(ref.token_ids)} tokens, finish: {ref.finish_reason}]" in captured.err


def test_generate_chat(ckpt, capsys):
    assert main(["generate", "-m", str(ckpt), "--chat", "hello", "-n", "6", "--no-stream"]) == 0
    captured = capsys.readouterr()
    ref = _reference(ckpt, [{"role": "user", "content": "hello"}])
    assert captured.out == ref.text + "\n"
    assert f"[{len(ref.token_ids)} tokens, finish: {ref.finish_reason}]" in captured.err


def test_bad_model_path_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", "-m", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "moeinfer inspect: error: checkpoint directory" in err and "missing" in err


def test_console_script_entry_point(ckpt):
    out = subprocess.run([sys.executable, "-m", "moeinfer", "inspect", "-m", str(ckpt), "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["num_layers"] == 2


def _one_line_error(capsys, command: str, *needles: str) -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"moeinfer {command}: error: "), err
    for needle in needles:
        assert needle in lines[0], err


@pytest.mark.parametrize("device,needle", [("banana", "not a device name"), ("mps", "mps has no kernels"),
                                           ("meta", "meta holds no data"), ("cuda:99", "cuda")])
def test_bad_device_is_a_one_line_error(ckpt, capsys, device, needle):
    """Defect 10 (issue 14): these used to end in a torch traceback."""
    assert main(["generate", "-m", str(ckpt), "--device", device, "-n", "1"]) == 1
    _one_line_error(capsys, "generate", needle)


def test_cuda_without_cuda_is_a_one_line_error(ckpt, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["inspect", "-m", str(ckpt), "--device", "cuda"]) == 1
    _one_line_error(capsys, "inspect", "CUDA is not available")


def test_compress_refuses_an_existing_file(ckpt, tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    assert main(["compress", "-m", str(ckpt), "--recipe", "int4", "--out", str(tmp_path / "f")]) == 1
    _one_line_error(capsys, "compress", "exists and is not a directory")
    assert (tmp_path / "f").read_text() == "mine"


def test_compress_bad_parameter_is_a_one_line_error(ckpt, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["compress", "-m", str(ckpt), "--recipe", "prune_frequency", "--set", "keep=abc",
                 "--out", str(out)]) == 1
    _one_line_error(capsys, "compress", "keep must be int", "'abc'")
    assert not out.exists()


def test_compress_never_replaces_the_current_directory(ckpt, tmp_path, capsys, monkeypatch):
    """Defect 1 (issue 14): `compress --out .` in a project folder wiped it (and its .git), exit code 0."""
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / "main.py").write_text("print('mine')")
    monkeypatch.chdir(project)
    for extra in ([], ["--overwrite"]):
        assert main(["compress", "-m", str(ckpt), "--recipe", "prune_frequency", "--set", "keep=4",
                     "--out", ".", "--no-progress", *extra]) == 1
        _one_line_error(capsys, "compress", str(project))
    assert sorted(p.name for p in project.iterdir()) == [".git", "main.py"]


def test_compress_replaces_a_checkpoint_only_with_overwrite(ckpt, tmp_path, capsys):
    out = tmp_path / "pruned"
    args = ["compress", "-m", str(ckpt), "--recipe", "prune_frequency", "--set", "keep=4", "--out", str(out),
            "--no-progress", "--calibration-tokens", "64"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 1
    _one_line_error(capsys, "compress", "already holds a checkpoint", "--overwrite")
    assert main(args + ["--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


def test_check_weights_is_on_for_serve(ckpt, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    from moeinfer.cli import build_parser, load_model
    from moeinfer.loading.errors import CheckpointError

    bad = shutil.copytree(ckpt, tmp_path / "nan")
    tensors = load_file(bad / "model.safetensors")
    name = next(n for n in tensors if n.endswith("q_proj.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        load_model(build_parser().parse_args(["serve", "-m", str(bad)]))
    load_model(build_parser().parse_args(["serve", "-m", str(bad), "--no-check-weights"]))
    assert main(["inspect", "-m", str(bad), "--check-weights"]) == 1
    _one_line_error(capsys, "inspect", "NaN or Inf", name.removeprefix("model."))
    assert main(["inspect", "-m", str(bad)]) == 0  # off by default elsewhere


def test_readme_command_lines_parse():
    """Every `moeinfer ...` line of README's command-line block parses (its `eval --data` did not)."""
    import re
    import shlex
    from pathlib import Path

    from moeinfer.cli import build_parser

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = readme.split("## Command line", 1)[1].split("```")[1]
    lines = [re.sub(r"\[[^\]]*\]", "", line.split("#")[0]).strip() for line in block.splitlines()]
    lines = [line for line in lines if line.startswith("moeinfer ")]
    assert len(lines) >= len(SUBCOMMANDS)
    parser = build_parser()
    for line in lines:
        argv = ["2" if word == "N" else word for word in shlex.split(line)[1:]]  # placeholders of ints
        parser.parse_args(argv)


def test_bench_refuses_a_folder_that_is_not_a_results_folder(tmp_path, capsys, monkeypatch):
    """bench writes report.md, report.html and plots into --out: never into someone's project folder."""
    (tmp_path / "report.md").write_text("my own report")
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--out", ".", "--no-progress"]) == 1
    _one_line_error(capsys, "bench", "not empty and does not hold a bench results folder")
    assert (tmp_path / "report.md").read_text() == "my own report"
