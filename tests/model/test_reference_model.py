"""The shipped reference model `moeinfer-tiny` and the quality yardstick `moeinfer.eval`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import moeinfer
from moeinfer.arch import parse_config
from moeinfer.eval import EvalText, evaluate, load_dataset, window_spans
from moeinfer.eval.datasets import DATA_DIR, DATASETS
from moeinfer.models import shipped_model_dir

TINY = shipped_model_dir("tiny")
needs_tiny = pytest.mark.skipif(TINY is None, reason="moeinfer/models/moeinfer-tiny has no checkpoint yet")
ENGLISH = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
PYTHON = "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n    return a + b\n\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def tiny() -> moeinfer.MoEModel:
    if TINY is None:
        pytest.skip("moeinfer/models/moeinfer-tiny has no checkpoint yet")
    return moeinfer.load("tiny", dtype=torch.float32, progress=False)


# checkpoint ------------------------------------------------------------------------------------

@needs_tiny
def test_checkpoint_is_a_small_mixtral() -> None:
    cfg = json.loads((TINY / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["architectures"] == ["MixtralForCausalLM"]
    assert cfg["num_local_experts"] >= 8 and cfg["num_experts_per_tok"] == 2
    assert cfg["dtype"] in ("bfloat16", "float16")
    weights = sum(p.stat().st_size for p in TINY.glob("*.safetensors"))
    assert weights <= 25 * 1024**2


def test_moeinfer_and_transformers_give_the_same_logits(tiny) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.MixtralForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
    ids = torch.tensor([tiny.tokenizer.encode(ENGLISH + PYTHON)])
    with torch.no_grad():
        ours, theirs = tiny(ids), hf(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("text", [ENGLISH, PYTHON, "naïve café — ünïcödé ✓\n\ttabs  and  spaces"])
def test_tokenizer_round_trips(tiny, text: str) -> None:
    ids = tiny.tokenizer.encode(text)
    assert ids[0] == tiny.tokenizer.bos_token_id
    assert tiny.tokenizer.decode(ids) == text


def test_autotokenizer_matches(tiny) -> None:
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(TINY)
    for text in (ENGLISH, PYTHON):
        assert auto(text)["input_ids"] == tiny.tokenizer.encode(text)
        assert auto.decode(auto(text)["input_ids"], skip_special_tokens=True) == text
    assert auto.bos_token == "<s>" and auto.eos_token == "</s>"


# windows ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,context,stride", [(2, 2, 1), (10, 4, 2), (10, 4, 3), (100, 16, 15), (7, 32, 16),
                                              (33, 8, 1)])
def test_windows_score_every_token_once(n: int, context: int, stride: int) -> None:
    scored = []
    for begin, end, first in window_spans(n, context, stride):
        assert end - begin <= context and begin < first <= end
        scored.extend(range(first, end))
    assert scored == list(range(1, n))


def test_bad_windows_are_refused() -> None:
    with pytest.raises(ValueError, match="stride"):
        window_spans(10, 4, 4)
    with pytest.raises(ValueError, match="context"):
        window_spans(10, 1, 1)


# evaluate --------------------------------------------------------------------------------------

def _random_model(vocab_size: int) -> moeinfer.MoEModel:
    hf = {"model_type": "mixtral", "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 16,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
          "num_experts_per_tok": 2, "max_position_embeddings": 64, "sliding_window": None}
    model = moeinfer.MoEModel(parse_config(hf))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def test_uniform_logits_give_log2_vocab_bits_per_token(tiny) -> None:
    model = _random_model(tiny.tokenizer.vocab_size)
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0: p = 1/V for every token
    r = evaluate(model, ENGLISH, tokenizer=tiny.tokenizer, context=8, stride=3, progress=False)
    V = tiny.tokenizer.vocab_size
    n_tokens = len(tiny.tokenizer.encode(ENGLISH)) - 1  # every token after <s>
    assert r.tokens == n_tokens
    assert r.bits_per_token == pytest.approx(math.log2(V), rel=1e-6)
    assert r.perplexity == pytest.approx(V, rel=1e-5)
    assert r.bits_per_byte == pytest.approx(math.log2(V) * n_tokens / len(ENGLISH.encode()), rel=1e-6)


def test_batching_and_stride_one_less_than_context_agree(tiny) -> None:
    model = _random_model(tiny.tokenizer.vocab_size)
    text = ENGLISH * 3
    a = evaluate(model, text, tokenizer=tiny.tokenizer, context=16, stride=8, batch_size=1, progress=False)
    b = evaluate(model, text, tokenizer=tiny.tokenizer, context=16, stride=8, batch_size=5, progress=False)
    assert a.nats == pytest.approx(b.nats, rel=1e-5) and a.tokens == b.tokens


def test_shipped_model_on_shipped_data(tiny) -> None:
    for name in DATASETS:
        r = evaluate(tiny, name, context=64, stride=32, max_bytes=1500, progress=False)
        assert math.isfinite(r.bits_per_byte) and 0 < r.bits_per_byte < 8
        assert r.bits_per_token < math.log2(tiny.config.vocab_size)  # better than uniform


def test_eval_needs_a_tokenizer() -> None:
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate(_random_model(50), "abc", progress=False)


# datasets --------------------------------------------------------------------------------------

def test_shipped_datasets_and_notice() -> None:
    total = sum(p.stat().st_size for p in DATA_DIR.iterdir())
    assert total <= 2 * 1024**2
    assert (DATA_DIR / "NOTICE").is_file()
    for name in DATASETS:
        assert load_dataset(name).num_bytes > 100_000


def test_user_file_and_folder(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("x = 1\n")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    assert load_dataset(tmp_path / "a.txt") == EvalText("a.txt", "alpha\n", str(tmp_path / "a.txt"))
    assert load_dataset(tmp_path).text == "alpha\n\n\nx = 1\n"
    with pytest.raises(ValueError, match="neither a dataset name"):
        load_dataset(tmp_path / "missing")


# CLI -------------------------------------------------------------------------------------------

def test_eval_cli_prints_bits_per_byte(tiny, capsys) -> None:
    from moeinfer.cli import main

    assert main(["eval", "english", "--max-bytes", "800", "--context", "64", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("english: ") and "bits/byte" in out
    assert main(["eval", "python", "--max-bytes", "800", "--context", "64", "--no-progress", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["name"] == "python" and math.isfinite(row["bits_per_byte"])
