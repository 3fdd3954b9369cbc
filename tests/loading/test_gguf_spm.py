"""SentencePiece-style tokenizers (Llama/Mistral/Mixtral tokenizer.json) in GGUF: written as llama.cpp's
"llama" tokenizer model (tokens, scores, token types with <0xNN> byte tokens, add_space_prefix) and rebuilt
into a `tokenizers` tokenizer giving the same ids on the shipped held-out texts. The tokenizer is trained
in the test (tests/spm_tokenizer.py); llama.cpp's own tokenization: benchmarks/bench_gguf_llamacpp.py."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

import moeinfer
from moeinfer.loading.gguf import GGUFError, export_gguf, load_gguf
from gguf_helpers import tokenizer_through_gguf
from spm_tokenizer import moeinfer_tokenizer

gguf = pytest.importorskip("gguf")

VOCAB = 1500  # the model's embedding rows: a few unused ids past the tokenizer's
ODD = "naïve café — 漢字 🙂 \t tabs\n\nnew  lines   and  end "
SPECIAL = "x <s> y </s>z"  # llama.cpp puts "▁" after a special token, as the normalizer layout does


@pytest.fixture(scope="module", params=["normalizer", "metaspace"])
def spm(request):
    return moeinfer_tokenizer(request.param)


def _through_gguf(tokenizer, path: Path):
    return tokenizer_through_gguf(tokenizer, path, arch="llama", vocab_size=VOCAB)


def _heldout(chars: int | None) -> dict[str, str]:
    data = Path(moeinfer.__file__).parent / "eval" / "data"
    return {name: (data / name).read_text()[:chars] for name in ("english.txt", "python.txt")}


@pytest.mark.parametrize("chars", [100_000, pytest.param(None, marks=pytest.mark.slow)], ids=["head", "full"])
def test_same_ids_on_heldout_texts(spm, tmp_path, chars):
    back, _ = _through_gguf(spm, tmp_path / "tok.gguf")
    metaspace = spm.backend.normalizer is None
    for name, text in {**_heldout(chars), "odd": ODD}.items():
        if metaspace:  # GGUF (llama.cpp) puts "▁" after a special token, Metaspace(prepend_scheme="first") not:
            text = text.replace("<s>", "<S>").replace("</s>", "</S>")  # python.txt holds a literal "<s>"
        ids = spm.encode(text)
        assert back.encode(text) == ids, name
        assert back.decode(ids) == spm.decode(ids), name
    if spm.backend.normalizer is not None:
        assert back.encode(SPECIAL) == spm.encode(SPECIAL)
    byte_ids = spm.encode("漢字")
    assert any(3 <= i < 259 for i in byte_ids)  # the byte fallback was exercised
    assert (back.bos_token_id, back.eos_token_id) == (spm.bos_token_id, spm.eos_token_id) == (1, 2)
    assert back.encode("x", add_special_tokens=False) == spm.encode("x", add_special_tokens=False)


def test_file_holds_llama_cpps_spm_keys(spm, tmp_path):
    _, reader = _through_gguf(spm, tmp_path / "tok.gguf")
    f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    assert f["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in f
    tokens, scores, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.scores"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(scores) == len(types) == VOCAB
    T = gguf.TokenType
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"] and tokens[258] == "<0xFF>"
    assert types[:3] == [T.UNKNOWN, T.CONTROL, T.CONTROL] and set(types[3:259]) == {T.BYTE}
    assert set(types[259:spm.backend.get_vocab_size()]) == {T.NORMAL} and set(types[-5:]) == {T.UNUSED}
    assert (f["tokenizer.ggml.unknown_token_id"], f["tokenizer.ggml.bos_token_id"]) == (0, 1)
    assert f["tokenizer.ggml.add_space_prefix"] is True and f["tokenizer.ggml.add_bos_token"] is True
    # earlier merges score higher: "▁t" + "h" comes before any piece made later
    vocab = spm.backend.get_vocab()
    merged = [t for t in tokens[259:spm.backend.get_vocab_size()] if len(t) > 1]
    assert all(scores[vocab[t]] < 0 for t in merged[1:])
    assert all(scores[i] == 0.0 for i in range(259))


def test_model_with_spm_tokenizer_round_trips(tmp_path):
    tiny = moeinfer.load("tiny", progress=False)
    model = copy.deepcopy(tiny)
    model.tokenizer = moeinfer_tokenizer("normalizer")
    model.config = dataclasses.replace(model.config, bos_token_id=1, eos_token_ids=(2,))  # the config's ids win
    path = tmp_path / "spm.gguf"
    export_gguf(model, path, progress=False)
    back = load_gguf(path, progress=False)
    text = _heldout(20_000)["english.txt"]
    assert back.tokenizer.encode(text) == model.tokenizer.encode(text)
    ids = torch.tensor([model.tokenizer.encode(text[:300])])
    with torch.no_grad():
        assert torch.equal(model(ids), back(ids))


def test_other_tokenizers_are_named(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    from moeinfer.loading.tokenizer import Tokenizer

    unigram = Tokenizer(Backend(models.Unigram([("a", -1.0), ("b", -2.0)], 0, byte_fallback=False)), {})
    with pytest.raises(GGUFError, match="Unigram"):
        _through_gguf(unigram, tmp_path / "u.gguf")
