"""Byte-level BPE tokenizers whose pre-tokenizer is a sequence of regex splits (llama.cpp names each such
sequence: "qwen2", "llama-bpe", "deepseek-v3", "deepseek-llm") through GGUF: the name is recognised on export, and the
tokenizer rebuilt from it gives the original's ids. DeepSeek-V3's three splits (digit runs of at most
three, CJK runs, a GPT-4-like split) are the ones real DeepSeek-V3/R1 GGUF files name; DeepSeek-V2's
"deepseek-llm" has its own tests (test_gguf_deepseek_llm.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

import moeinfer
from moeinfer.loading.gguf import GGUFError
from gguf_helpers import tokenizer_through_gguf
from moeinfer.loading.gguf.pretokenizers import PRE_STEPS, build_pre_tokenizer
from moeinfer.loading.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

TEXT = (Path(moeinfer.__file__).parent / "eval" / "data" / "english.txt").read_text()[:30_000]
ODD = "In 2024, 1234567 items cost $89.99!\n\n漢字とカタカナ、ひらがな  mixed\tTabs  and 'quotes' x+=1;"


def _trained(name: str) -> Tokenizer:
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = build_pre_tokenizer(name)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([TEXT, ODD], trainer=trainer)
    return Tokenizer(backend, {"bos_token": "<bos>", "eos_token": "<eos>"})


def _through_gguf(tokenizer: Tokenizer, path: Path):
    return tokenizer_through_gguf(tokenizer, path, arch="deepseek2", vocab_size=tokenizer.backend.get_vocab_size())


@pytest.mark.parametrize("name", sorted(PRE_STEPS))
def test_split_sequences_are_named_and_rebuilt(name, tmp_path):
    tok = _trained(name)
    back, reader = _through_gguf(tok, tmp_path / "tok.gguf")
    assert reader.fields["tokenizer.ggml.pre"].contents() == name
    for text in (TEXT, ODD):
        ids = tok.encode(text)
        assert back.encode(text) == ids
        assert back.decode(ids) == tok.decode(ids)


def test_deepseek_v3_splits_digits_in_threes_and_cjk_apart(tmp_path):
    """The rebuilt pre-tokenizer really is DeepSeek-V3's: 1234567 -> 123|456|7, a CJK run alone."""
    back, _ = _through_gguf(_trained("deepseek-v3"), tmp_path / "tok.gguf")
    pieces = [p for p, _ in back.backend.pre_tokenizer.pre_tokenize_str("x 1234567漢字a")]
    assert pieces == ["x", "Ġ", "123", "456", "7", "æ¼¢åŃĹ", "a"]  # byte-level forms: "Ġ" a space, then 漢字


def test_an_unknown_split_sequence_is_a_named_error(tmp_path):
    from tokenizers import Regex, pre_tokenizers

    tok = _trained("qwen2")
    tok.backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d"), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    with pytest.raises(GGUFError, match="not one llama.cpp names"):
        _through_gguf(tok, tmp_path / "tok.gguf")
