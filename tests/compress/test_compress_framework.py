"""The compression framework: recipes, the config record, save/load, non-uniform layouts, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import moeinfer
from compress_cases import hf_logits, logits, num_experts, tiny
from moeinfer.cli import main
from moeinfer.compress import CompressionError, Recipe, available_methods, compress_, load_recipe
from moeinfer.compress.surgery import keep_experts_

MINE = {"prune_frequency", "prune_reap", "prune_naee", "prune_unstructured", "merge", "dense", "gating"}


def test_methods_are_registered_with_docs():
    from moeinfer.compress import get_method

    assert MINE <= set(available_methods())
    for name in MINE:
        m = get_method(name)
        assert m.doc and m.needs in ("none", "routing", "activations")


@pytest.mark.parametrize("recipe, match", [
    ([{"method": "prune_magic"}], "unknown compression method 'prune_magic'.*prune_reap"),
    ([{"method": "prune_reap", "kep": 4}], r"step 1: method 'prune_reap' has no parameter\(s\) kep; its parameters: keep"),
    ([{"method": "merge", "num_experts": 4, "router": "sum"}], "router must be 'map' or 'average'"),
    ({"steps": []}, "has no steps"),
    ({"steps": "prune_reap"}, "'steps' must be a list"),
    ({"steps": [{"method": "dense"}], "calibrate": "python"}, "unknown key"),
    ([{"keep": 4}], "step 1 must be a mapping with a 'method'"),
    ({"steps": ["dense"], "calibration": {"max_tokens": 0}}, "max_tokens >= 1"),
])
def test_recipe_validation_errors(recipe, match, root):
    _, model, _ = tiny("mixtral", root)
    before = logits(model)
    with pytest.raises(CompressionError, match=match):
        compress_(model, recipe)
    assert torch.equal(logits(model), before)


def test_yaml_recipes(tmp_path):
    good = tmp_path / "r.yaml"
    good.write_text("name: small\ncalibration: python\nsteps:\n  - method: prune_reap\n    keep: 6\n"
                    "  - {method: gating, mode: 'top-p:0.8'}\n")
    r = load_recipe(good)
    assert r.name == "small" and r.calibration.source == "python"
    assert [s.to_dict() for s in r.steps] == [{"method": "prune_reap", "keep": 6}, {"method": "gating", "mode": "top-p:0.8"}]
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [method: x\n")
    with pytest.raises(CompressionError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(CompressionError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(CompressionError, match="unknown compression method"):
        Recipe.of("prune_magic")


def test_record_round_trip_and_transformers(root, tmp_path):
    _, model, calib = tiny("mixtral", root)
    report = compress_(model, [{"method": "prune_frequency", "keep": 6}, {"method": "gating", "mode": "threshold:0.2"}],
                       calibration=calib, progress=False)
    record = model.config.hf_config["moeinfer_compression"]
    assert [s["method"] for s in record["steps"]] == ["prune_frequency", "gating"]
    assert record["calibration"] == {"source": "english", "tokens": calib.tokens}
    assert {v["num_experts"] for v in record["layout"].values()} == {6} and report.hf_loadable
    assert model.config.hf_config["num_local_experts"] == 6
    out = moeinfer.save(model, tmp_path / "c")
    saved = json.loads((out / "config.json").read_text())
    assert saved["moeinfer_compression"]["steps"][1]["summary"] == {"mode": "threshold:0.2"}
    again = moeinfer.load(out, progress=False)
    assert torch.equal(logits(again), logits(model))
    from moeinfer.model.gating import set_routing_

    set_routing_(model, None)  # transformers knows no routing modes: compare the plain top-k model
    assert (hf_logits(out) - logits(model)).abs().max() <= 1e-5


def test_non_uniform_counts_reload(root, tmp_path):
    _, model, calib = tiny("qwen2_moe", root)
    compress_(model, [{"method": "prune_reap", "keep": 6}], calibration=calib, progress=False)
    keep_experts_(model.moe_blocks()[1], [0, 2, 3, 5])
    report = compress_(model, [{"method": "gating", "mode": "top-p:0.9"}], progress=False)
    assert not report.hf_loadable and num_experts(model) == [6, 4]
    record = model.config.hf_config["moeinfer_compression"]
    assert [s["method"] for s in record["steps"]] == ["prune_reap", "gating"]
    again = moeinfer.load(moeinfer.save(model, tmp_path / "n"), progress=False)
    assert num_experts(again) == [6, 4]
    assert torch.equal(logits(again), logits(model))


def test_cli_compress_list_run_and_bad_input(root, tmp_path, capsys):
    path, _, _ = tiny("mixtral", root)
    assert main(["compress", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in MINE)
    out = tmp_path / "out"
    args = ["compress", "--model", str(path), "--calibration", "python", "--calibration-tokens", "128",
            "--no-progress", "--out", str(out)]
    assert main(args + ["--recipe", "prune_naee", "--set", "keep=4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["hf_loadable"] and num_experts(moeinfer.load(out, progress=False)) == [4, 4]
    for bad, match in [(["--recipe", "prune_naee", "--set", "keep=9"], "cannot keep 9"),
                       (["--recipe", "dense", "--set", "weighting=mean"], "weighting must be"),
                       (["--recipe", "merge", "--set", "num_experts=4", "--calibration", "nowhere.txt"],
                        "calibration source 'nowhere.txt'"),
                       (["--recipe", "prune_reap", "--set", "keep"], "expected KEY=VALUE")]:
        target = tmp_path / "bad"
        assert main([*args[:-1], str(target), *bad]) == 1
        assert match in capsys.readouterr().err and not target.exists()
        assert not any(p.name.startswith(".bad") or p.name.startswith("bad") for p in tmp_path.iterdir())
