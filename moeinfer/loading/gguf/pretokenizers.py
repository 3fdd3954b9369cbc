"""Byte-level BPE pre-tokenizers <-> the names llama.cpp gives them (`tokenizer.ggml.pre`).

A byte-level BPE tokenizer.json splits text before BPE: either ByteLevel with GPT-2's regex (llama.cpp's
"gpt-2"), or a Sequence of steps followed by ByteLevel(use_regex=false). llama.cpp does not store the
steps in the GGUF file, it stores a name and has each name's regexes built in (src/llama-vocab.cpp), so
both directions go through one table, PRE_STEPS: name -> the steps in order, each either a regex (an
isolated, non-inverted Split) or DIGITS (tokenizers' Digits(individual_digits=true)).

1. export (`pre_name`): the tokenizer.json pre_tokenizer is named when its steps equal a row exactly
   (the regex strings compared as written, so a near miss is refused with a named error, not guessed);
2. import (`build_pre_tokenizer`): the name is turned back into `tokenizers` pre-tokenizer objects.

Rows: "qwen2" and "llama-bpe" (one GPT-4-like split each), "deepseek-v3" (DeepSeek-V3/R1: digits in
runs of up to three, CJK runs, a GPT-4-like split) and "deepseek-llm" (DeepSeek-LLM, DeepSeek-V2 and
V2-Lite: newlines, letter runs, punctuation runs, trailing whitespace, CJK/Hangul runs, then each digit
alone). The deepseek-llm letter class is not a Unicode category but an explicit list of code-point
ranges (titlecase ǅ in, the caseless letter ƻ out, ...), kept below as data.

llama.cpp's built-in "deepseek-llm" differs from DeepSeek's tokenizer.json in one step: it keeps runs of
digits together (regex "\\p{N}+") where the file splits each digit alone. On DeepSeek's own vocabulary the
ids are the same (no token holds two numeric characters); on a vocabulary with digit merges llama.cpp
would use them. moeinfer follows tokenizer.json (benchmarks/bench_gguf_llamacpp.py measures both).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from moeinfer.loading.gguf.errors import GGUFError


@dataclass(frozen=True)
class Digits:
    """The `tokenizers` Digits pre-tokenizer with individual_digits=true: every numeric character (Unicode
    N*, as Rust's char::is_numeric) becomes its own piece."""


DIGITS = Digits()
Step = str | Digits  # a str is the pattern of an isolated Split

BYTE_LEVEL_PRE = ("gpt-2", "olmo", "default")  # GPT-2's regex inside ByteLevel (use_regex=true)


def char_class(ranges: tuple[tuple[int, int], ...]) -> str:
    """A regex character class body from (first, last) code points, written as tokenizer.json files write
    them: the characters themselves, "a-z" for a range and a lone character when first == last."""
    return "".join(chr(a) if a == b else f"{chr(a)}-{chr(b)}" for a, b in ranges)


# Split regexes as their tokenizer.json files write them (the strings are compared on export).
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek-V3's tokenizer (also R1's): digits in runs of up to three, CJK runs, then a GPT-4-like split
_DEEPSEEK3 = (r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
              r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
              r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# DeepSeek-LLM's letter class (deepseek-ai/deepseek-llm-7b-base tokenizer.json, the same in DeepSeek-V2 and
# V2-Lite; llama.cpp carries it for LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_LLM). (first, last) code points in the
# file's order; (a, a) is one character (Ͷ, ͷ and three other adjacent pairs are written as two characters).
_DEEPSEEK_LLM_LETTERS = (
    (0x0041, 0x005A), (0x0061, 0x007A), (0x00B5, 0x00B5), (0x00C0, 0x00D6), (0x00D8, 0x00F6), (0x00F8, 0x01BA),
    (0x01BC, 0x01BF), (0x01C4, 0x0293), (0x0295, 0x02AF), (0x0370, 0x0373), (0x0376, 0x0376), (0x0377, 0x0377),
    (0x037B, 0x037D), (0x037F, 0x037F), (0x0386, 0x0386), (0x0388, 0x038A), (0x038C, 0x038C), (0x038E, 0x03A1),
    (0x03A3, 0x03F5), (0x03F7, 0x0481), (0x048A, 0x052F), (0x0531, 0x0556), (0x10A0, 0x10C5), (0x13A0, 0x13F5),
    (0x13F8, 0x13FD), (0x1C90, 0x1CBA), (0x1CBD, 0x1CBF), (0x1D00, 0x1D2B), (0x1D6B, 0x1D77), (0x1D79, 0x1D9A),
    (0x1E00, 0x1F15), (0x1F18, 0x1F1D), (0x1F20, 0x1F45), (0x1F48, 0x1F4D), (0x1F50, 0x1F57), (0x1F59, 0x1F59),
    (0x1F5B, 0x1F5B), (0x1F5D, 0x1F5D), (0x1F5F, 0x1F7D), (0x1F80, 0x1FB4), (0x1FB6, 0x1FBC), (0x1FBE, 0x1FBE),
    (0x1FC2, 0x1FC4), (0x1FC6, 0x1FCC), (0x1FD0, 0x1FD3), (0x1FD6, 0x1FDB), (0x1FE0, 0x1FEC), (0x1FF2, 0x1FF4),
    (0x1FF6, 0x1FFC), (0x2102, 0x2102), (0x2107, 0x2107), (0x210A, 0x2113), (0x2115, 0x2115), (0x2119, 0x211D),
    (0x2124, 0x2124), (0x2126, 0x2126), (0x2128, 0x2128), (0x212A, 0x212D), (0x212F, 0x2134), (0x2139, 0x2139),
    (0x213C, 0x213F), (0x2145, 0x2149), (0x214E, 0x214E), (0x2183, 0x2183), (0x2184, 0x2184), (0x2C00, 0x2C7B),
    (0x2C7E, 0x2CE4), (0x2CEB, 0x2CEE), (0x2CF2, 0x2CF2), (0x2CF3, 0x2CF3), (0xA640, 0xA66D), (0xA680, 0xA69B),
    (0xA722, 0xA76F), (0xA771, 0xA787), (0xA78B, 0xA78E), (0xAB70, 0xABBF), (0xFB00, 0xFB06), (0xFB13, 0xFB17),
    (0xFF21, 0xFF3A), (0xFF41, 0xFF5A), (0x10400, 0x1044F), (0x104B0, 0x104D3), (0x104D8, 0x104FB),
    (0x10C80, 0x10CB2), (0x10CC0, 0x10CF2), (0x118A0, 0x118DF), (0x1E900, 0x1E943),
)
# ASCII punctuation and symbols, their fullwidth forms, curly quotes, the ideographic space, comma and stop
_DEEPSEEK_LLM_PUNCT = ((0x21, 0x2F), (0x3A, 0x7E), (0xFF01, 0xFF0F), (0xFF1A, 0xFF5E), (0x2018, 0x201F),
                       (0x3000, 0x3002))
# CJK ideographs, everything from U+0800 up to them (the second range is as the file writes it), Hangul
_DEEPSEEK_LLM_CJK = ((0x4E00, 0x9FA5), (0x0800, 0x4E00), (0xAC00, 0xD7FF))
_DEEPSEEK_LLM = ("[\r\n]", rf"\s?[{char_class(_DEEPSEEK_LLM_LETTERS)}]+", rf"\s?[{char_class(_DEEPSEEK_LLM_PUNCT)}]+",
                 r"\s+$", f"[{char_class(_DEEPSEEK_LLM_CJK)}]+", DIGITS)

# llama.cpp's pre-tokenizer name -> the steps applied in order before ByteLevel(use_regex=false)
PRE_STEPS: dict[str, tuple[Step, ...]] = {"qwen2": (_QWEN2,), "llama-bpe": (_LLAMA3,), "deepseek-v3": _DEEPSEEK3,
                                          "deepseek-llm": _DEEPSEEK_LLM}


def _step(part: dict[str, Any]) -> Step | None:
    """One tokenizer.json pre-tokenizer of a Sequence -> a step, or None when it is no step of any row."""
    if part.get("type") == "Split" and part.get("behavior", "Isolated") == "Isolated" and not part.get("invert"):
        return (part.get("pattern") or {}).get("Regex")
    if part.get("type") == "Digits" and part.get("individual_digits"):
        return DIGITS
    return None


def pre_name(pre: dict[str, Any] | None) -> str:
    """tokenizer.json's pre_tokenizer -> llama.cpp's pre-tokenizer name (GGUFError when it has none)."""
    if pre is None:
        raise GGUFError("the tokenizer has no pre-tokenizer; GGUF export needs a byte-level BPE tokenizer")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        if (len(parts) >= 2 and parts[-1].get("type") == "ByteLevel" and not parts[-1].get("use_regex", True)
                and not parts[-1].get("add_prefix_space")):
            steps = tuple(_step(p) for p in parts[:-1])
            for name, known in PRE_STEPS.items():
                if steps == known:
                    return name
    raise GGUFError(f"the tokenizer's pre-tokenizer {json.dumps(pre, ensure_ascii=False)[:200]} is not one "
                    f"llama.cpp names; supported: ByteLevel (gpt-2), {', '.join(PRE_STEPS)}")


def build_pre_tokenizer(name: str, *, path: str = "tokenizer") -> Any:
    """The `tokenizers` pre-tokenizer llama.cpp's `name` stands for; `path` names the file in errors."""
    from tokenizers import Regex, pre_tokenizers

    if name in BYTE_LEVEL_PRE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name not in PRE_STEPS:
        raise GGUFError(f"{path}: tokenizer.ggml.pre {name!r} is not supported; supported: "
                        f"{', '.join(BYTE_LEVEL_PRE + tuple(PRE_STEPS))}")
    steps = [pre_tokenizers.Split(Regex(s), behavior="isolated", invert=False) if isinstance(s, str)
             else pre_tokenizers.Digits(individual_digits=True) for s in PRE_STEPS[name]]
    return pre_tokenizers.Sequence([*steps, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
