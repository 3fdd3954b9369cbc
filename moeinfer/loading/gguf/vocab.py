"""Tokenizers <-> GGUF's `tokenizer.ggml.*` keys: byte-level BPE (llama.cpp's "gpt2" tokenizer model) here,
SentencePiece-style BPE (its "llama" model: Llama, Mistral, Mixtral) through vocab_spm.

GGUF keeps a BPE tokenizer as lists: tokens (by id), token types (1 normal, 3 control, 4 user-defined,
5 unused), merges ("a b"), special-token ids, add_bos/add_eos flags, the chat template, and the
name of the pre-tokenizer (`tokenizer.ggml.pre`), whose split regexes llama.cpp has built in.

Export reads the checkpoint's tokenizer.json (through the `tokenizers` library) and names its
pre-tokenizer; import rebuilds a `tokenizers` BPE from the lists with the named pre-tokenizer. The names
and the steps each stands for are in pretokenizers.py: "gpt-2" (GPT-2's regex inside ByteLevel; "olmo" and
"default" read as it), "qwen2", "llama-bpe", "deepseek-v3" (DeepSeek-V3/R1's three splits) and
"deepseek-llm" (DeepSeek-LLM, DeepSeek-V2 and V2-Lite: five splits, then each digit alone).
"""

from __future__ import annotations

import json
from typing import Any

from moeinfer.loading.gguf.errors import GGUFError
from moeinfer.loading.gguf.pretokenizers import build_pre_tokenizer, pre_name
from moeinfer.loading.gguf.vocab_spm import UNKNOWN, space_prefix, spm_backend, spm_lists
from moeinfer.loading.tokenizer import Tokenizer

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def write_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, *, bos: int | None = None, eos: int | None = None,
                    pad: int | None = None) -> None:
    """Write a moeinfer Tokenizer (moeinfer.loading.tokenizer) as GGUF keys; `vocab_size` is the model's
    embedding rows (ids past the tokenizer's are written as unused padding tokens). bos/eos/pad: the model
    config's special ids, which take precedence over the tokenizer's."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    prefix = space_prefix(spec)
    if prefix is not None:  # SentencePiece-style
        names, scores, kinds = spm_lists(spec, vocab_size)
        writer.add_string("tokenizer.ggml.model", "llama")
        writer.add_array("tokenizer.ggml.tokens", names)
        writer.add_array("tokenizer.ggml.scores", scores)
        writer.add_array("tokenizer.ggml.token_type", kinds)
        writer.add_bool("tokenizer.ggml.add_space_prefix", prefix)
        if UNKNOWN in kinds:
            writer.add_uint32("tokenizer.ggml.unknown_token_id", kinds.index(UNKNOWN))
    elif model.get("type") != "BPE" or model.get("byte_fallback"):
        raise GGUFError(f"tokenizer model {model.get('type')!r} (byte_fallback={model.get('byte_fallback')}) cannot "
                        "be written to GGUF: supported are byte-level BPE and SentencePiece-style BPE (byte "
                        "fallback, spaces as '\u2581' by a Prepend/Replace normalizer or a Metaspace pre-tokenizer)")
    else:
        pre = pre_name(spec.get("pre_tokenizer"))
        tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
        types = {i: NORMAL for i in tokens}
        for added in spec.get("added_tokens") or []:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
        if max(tokens) >= vocab_size:
            raise GGUFError(f"the tokenizer has token id {max(tokens)} but the model's vocabulary has {vocab_size} "
                            "rows")
        names = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)]
        kinds = [types.get(i, UNUSED) for i in range(vocab_size)]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        writer.add_string("tokenizer.ggml.model", "gpt2")
        writer.add_string("tokenizer.ggml.pre", pre)
        writer.add_array("tokenizer.ggml.tokens", names)
        writer.add_array("tokenizer.ggml.token_type", kinds)
        writer.add_array("tokenizer.ggml.merges", merges)
    probe = tokenizer.encode("a", add_special_tokens=True)
    for key, token_id in (("bos", bos if bos is not None else tokenizer.bos_token_id),
                          ("eos", eos if eos is not None else tokenizer.eos_token_id),
                          ("padding", pad if pad is not None else tokenizer.pad_token_id)):
        if token_id is not None:
            writer.add_uint32(f"tokenizer.ggml.{key}_token_id", token_id)
    first = tokenizer.bos_token_id
    writer.add_bool("tokenizer.ggml.add_bos_token", first is not None and bool(probe) and probe[0] == first)
    writer.add_bool("tokenizer.ggml.add_eos_token",
                    tokenizer.eos_token_id is not None and bool(probe) and probe[-1] == tokenizer.eos_token_id)
    if tokenizer.chat_template:
        writer.add_string("tokenizer.chat_template", tokenizer.chat_template)


def read_tokenizer(meta: Any) -> Any:
    """A moeinfer Tokenizer rebuilt from a GGUF file's tokenizer keys (`meta`: archmap.Metadata), or None
    when the file has no tokenizer."""
    from tokenizers import AddedToken, decoders, models, processors
    from tokenizers import Tokenizer as Backend

    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        return None
    if kind not in ("gpt2", "llama"):
        raise GGUFError(f"{meta.path}: tokenizer.ggml.model {kind!r} is not supported ('gpt2': byte-level BPE, "
                        "'llama': SentencePiece-style BPE)")
    names = list(meta.require("tokenizer.ggml.tokens"))
    kinds = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(names))
    if len(kinds) != len(names):
        raise GGUFError(f"{meta.path}: tokenizer.ggml.token_type has {len(kinds)} entries for {len(names)} tokens")
    vocab = {t: i for i, t in enumerate(names)}
    if kind == "llama":
        unk = meta.get("tokenizer.ggml.unknown_token_id")
        backend = spm_backend(names, list(meta.require("tokenizer.ggml.scores")), kinds,
                              add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
                              unk_id=None if unk is None else int(unk), path=meta.path)
    else:
        pre = build_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"), path=meta.path)
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = pre
        backend.decoder = decoders.ByteLevel()
    special = [AddedToken(names[i], special=True, normalized=False) for i, k in enumerate(kinds)
               if k == CONTROL or (k == UNKNOWN and kind == "llama")]
    user = [AddedToken(names[i], special=False, normalized=False) for i, k in enumerate(kinds) if k == USER_DEFINED]
    backend.add_special_tokens(special)
    backend.add_tokens(user)
    config: dict[str, Any] = {}
    for key, field in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            if not 0 <= int(token_id) < len(names):
                raise GGUFError(f"{meta.path}: tokenizer.ggml.{key}_token_id {token_id} is outside the "
                                f"{len(names)} tokens")
            config[field] = names[int(token_id)]
    if meta.get("tokenizer.ggml.add_bos_token", False) and "bos_token" in config:
        bos = config["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    return Tokenizer(backend, config, meta.get("tokenizer.chat_template"))
