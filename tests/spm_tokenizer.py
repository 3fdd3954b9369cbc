"""A small SentencePiece-style tokenizer (Llama/Mistral layout) trained in the test itself (nothing downloaded).

Layout of Llama-2/Mistral's tokenizer.json: <unk> <s> </s>, the 256 byte tokens <0x00>..<0xFF>, then the
BPE pieces; a byte-fallback BPE model; spaces as "▁" with one "▁" in front of the text, either by a
Prepend + Replace normalizer (`style="normalizer"`, Llama 2 / Mistral v0.1) or a Metaspace pre-tokenizer
(`style="metaspace"`, newer files). Trained with SentencePiece's word split (pieces never hold an
inner "▁"), applied to whole texts as SentencePiece does.
"""

from __future__ import annotations

from pathlib import Path

import moeinfer

SPACE = "\u2581"
SPECIALS = ["<unk>", "<s>", "</s>"]


def training_text() -> str:
    data = Path(moeinfer.__file__).parent / "eval" / "data"
    return (data / "english.txt").read_text()[:60_000] + (data / "python.txt").read_text()[:30_000]


def build(style: str = "normalizer", *, vocab_size: int = 1200, limit_alphabet: int = 80):
    """A `tokenizers` Tokenizer; `limit_alphabet` keeps rare characters out, so byte fallback is used."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=True)
    text = training_text()
    # the `limit_alphabet` most frequent characters, ties by character: the trainer's own choice breaks ties
    # in hash order, which changes from process to process
    counts: dict[str, int] = {}
    for ch in text.replace(" ", SPACE):
        counts[ch] = counts.get(ch, 0) + 1
    alphabet = sorted(counts, key=lambda ch: (-counts[ch], ch))[:limit_alphabet]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, limit_alphabet=limit_alphabet, initial_alphabet=alphabet,
                                  show_progress=False)
    trainer_tok.train_from_iterator([text], trainer)
    trained = trainer_tok.get_vocab()
    vocab = {t: i for i, t in enumerate(SPECIALS + [f"<0x{b:02X}>" for b in range(256)])}
    for piece, _ in sorted(trained.items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    import json

    merges = json.loads(trainer_tok.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    if style == "normalizer":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
        tok.pre_tokenizer = None
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def moeinfer_tokenizer(style: str = "normalizer"):
    """The same as moeinfer's Tokenizer, with Llama's tokenizer_config (bos <s>, eos </s>, add_bos_token)."""
    from tokenizers import processors

    from moeinfer.loading.tokenizer import Tokenizer

    backend = build(style)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    return Tokenizer(backend, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
