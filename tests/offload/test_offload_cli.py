"""`moeinfer simulate` and the `--offload ...` options of model-loading subcommands."""

from __future__ import annotations

import json

from offload_helpers import hand_trace

from moeinfer.cli import main


def test_simulate_compares_policies(tmp_path, capsys):
    trace = hand_trace([[[e], [(e + 1) % 4]] for e in [0, 1, 2, 0, 1, 3] * 4])
    trace.meta["model"] = "tiny"
    path = tmp_path / "t.npz"
    trace.save(path)
    assert main(["simulate", "--trace", str(path), "--cache", "2"]) == 1  # the shape comes from meta.model
    assert "2 MoE layers x 4 experts; the model shape 'moeinfer-tiny' 4 x 8" in capsys.readouterr().err
    shape_trace = hand_trace([[[e, (e + 3) % 8]] * 4 for e in [0, 1, 2, 0, 1, 3] * 4], num_experts=8)
    shape_trace.save(path)
    assert main(["simulate", "--trace", str(path), "--shape", "tiny", "--cache", "2", "--policy", "lru,belady",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["settings"]["policy"] for r in out] == ["lru", "belady"]
    assert out[1]["hit_rate"] >= out[0]["hit_rate"]
    assert main(["simulate", "--trace", str(path), "--shape", "tiny", "--policy", "nope"]) == 1
    assert "choose one of" in capsys.readouterr().err
    assert main(["simulate", "--trace", str(path), "--shape", "tiny", "--hardware", "nowhere"]) == 1
    assert "h100-pcie5" in capsys.readouterr().err
    assert main(["simulate", "--trace", str(path), "--shape", "tiny", "--calibrate", "--calibrate-mib", "1", "--out",
                 str(tmp_path / "hw.json")]) == 0
    assert json.loads((tmp_path / "hw.json").read_text())["measured"] is True


def test_generate_with_offload_options(tmp_path, capsys):
    base = ["generate", "-m", "tiny", "--no-stream", "-n", "6", "The"]
    assert main(base) == 0
    ref = capsys.readouterr().out
    assert main(base + ["--offload", "--expert-cache", "3", "--cache-policy", "lfu", "--prefetch", "next-layer",
                        "--offload-dir", str(tmp_path / "store")]) == 0
    assert capsys.readouterr().out == ref
    assert (tmp_path / "store" / "experts-000.safetensors").is_file()
    assert main(base + ["--offload", "cpu", "--expert-cache", "1KB"]) == 1
    assert "holds no expert" in capsys.readouterr().err

