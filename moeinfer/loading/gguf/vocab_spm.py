"""SentencePiece-style BPE tokenizers (Llama, Mistral, Mixtral) <-> GGUF's "llama" tokenizer model.

Shapes: V tokens.

Hugging Face ships these tokenizers (SentencePiece BPE, Kudo & Richardson, 2018) as tokenizer.json: a BPE
model with `byte_fallback` (characters outside the vocabulary become <0xNN> byte tokens), spaces
written as U+2581 "▁" and one "▁" put in front of the text (a Prepend + Replace normalizer, or a
Metaspace pre-tokenizer). llama.cpp keeps them as `tokenizer.ggml.model = "llama"`: tokens, a score per
token and token types (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte), plus
`tokenizer.ggml.add_space_prefix`. It has no merge list: like SentencePiece it repeatedly merges the
adjacent pair whose concatenation is the vocabulary piece of highest score.

Export (`spm_lists`): a merged piece scores minus the rank of the first merge that makes it, so "earlier
merge" = "higher score"; other pieces score 0 (single characters, bytes, specials: never a merge result).
Import (`spm_backend`): a Prepend + Replace normalizer (llama.cpp's prefix goes before the text and after
each special token, as in Llama 2's own tokenizer.json), and the merges rebuilt from the scores as
SentencePiece's own conversion does (transformers' SentencePieceExtractor): every split of a piece into
two pieces, pieces by decreasing score; so the rebuilt tokenizer merges as llama.cpp does.
"""

from __future__ import annotations

from typing import Any

from moeinfer.loading.gguf.errors import GGUFError

SPACE = "\u2581"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_NAMES = {f"<0x{b:02X}>" for b in range(256)}


def space_prefix(spec: dict[str, Any]) -> bool | None:
    """tokenizer.json (as a dict) -> whether it puts "▁" before the text (True/False), or None when it is not
    SentencePiece-style (a byte-fallback BPE whose spaces are "▁" by normalizer or Metaspace pre-tokenizer)."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return None
    norm, pre = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
    steps = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    kinds = [s.get("type") for s in steps if s]
    replaces_space = any(s.get("type") == "Replace" and (s.get("pattern") or {}).get("String") == " "
                         and s.get("content") == SPACE for s in steps if s)
    if replaces_space and not pre:
        return "Prepend" in kinds and all(s.get("prepend") == SPACE for s in steps if s and s.get("type") == "Prepend")
    if pre.get("type") == "Metaspace" and pre.get("replacement") == SPACE and not norm and not pre.get("split"):
        return pre.get("prepend_scheme", "always") in ("always", "first")
    return None


def spm_lists(spec: dict[str, Any], vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Step for export: (tokens, scores, token types) for ids 0..vocab_size-1 (ids past the tokenizer's are
    unused padding pieces)."""
    model = spec["model"]
    tokens = {i: t for t, i in model["vocab"].items()}
    kinds = {i: BYTE if t in _BYTE_NAMES else NORMAL for i, t in tokens.items()}
    unk = model.get("unk_token")
    if unk is not None and unk in model["vocab"]:
        kinds[model["vocab"][unk]] = UNKNOWN
    for added in spec.get("added_tokens") or []:
        tokens[added["id"]] = added["content"]
        if kinds.get(added["id"]) != UNKNOWN:
            kinds[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    if max(tokens) >= vocab_size:
        raise GGUFError(f"the tokenizer has token id {max(tokens)} but the model's vocabulary has {vocab_size} rows")
    scores: dict[str, float] = {}
    for rank, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    names = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    return (names, [scores.get(n, 0.0) if kinds.get(i) == NORMAL else 0.0 for i, n in enumerate(names)],
            [kinds.get(i, UNUSED) for i in range(vocab_size)])


def spm_backend(tokens: list[str], scores: list[float], kinds: list[int], *, add_space_prefix: bool,
                unk_id: int | None, path: str) -> Any:
    """Step for import: a `tokenizers` Tokenizer that tokenizes as llama.cpp's SentencePiece model (special
    and user-defined tokens still to be added by the caller)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers

    if len(scores) != len(tokens):
        raise GGUFError(f"{path}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    vocab = {t: i for i, t in enumerate(tokens)}
    mergeable = {t: float(s) for t, s, k in zip(tokens, scores, kinds) if k == NORMAL and len(t) > 1}
    merges: list[tuple[str, str, float, int, int]] = []
    for piece, score in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right, score, vocab[left], vocab[right]))
    merges.sort(key=lambda m: (-m[2], m[3], m[4]))
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    backend = Backend(models.BPE(vocab=vocab, merges=[(m[0], m[1]) for m in merges], unk_token=unk, fuse_unk=True,
                                 byte_fallback=True))
    # llama.cpp puts the "▁" prefix before the text and after every special or user-defined token, as a
    # normalizer does (it runs on each piece of text between added tokens)
    spaces = [normalizers.Prepend(SPACE)] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*spaces, normalizers.Replace(" ", SPACE)])
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend
