"""DeepSeek-LLM's pre-tokenizer (DeepSeek-LLM 7B/67B, DeepSeek-V2 and V2-Lite; llama.cpp's "deepseek-llm")
through GGUF: a tokenizer.json with it is named "deepseek-llm" on export, and the tokenizer rebuilt from the
name gives the original's ids and writes back DeepSeek's own pre_tokenizer JSON, regex strings included.

The pre-tokenizer is five isolated Split regexes (newlines; letter runs with an optional leading space,
whose letter class is an explicit list of code-point ranges; ASCII/fullwidth punctuation runs; trailing
whitespace; CJK/Hangul runs) then Digits(individual_digits) and ByteLevel without regex. The splits below
are chosen where a near miss would fail: code points just inside and just outside the letter class (also
past the BMP), fullwidth punctuation, the CJK class's edges, digits one by one. Against llama.cpp itself
and DeepSeek's real vocabulary: benchmarks/bench_gguf_llamacpp.py --deepseek-llm."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import moeinfer
from gguf_helpers import tokenizer_through_gguf
from moeinfer.loading.gguf import GGUFError, export_gguf
from moeinfer.loading.gguf.pretokenizers import build_pre_tokenizer

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

ODD = ("In 2024, 1234567 items cost $89.99!\r\n\n漢字とカタカナ、ひらがな 한국어  mixed\tTabs ǅ Ǆungla ƻ ƻ "
       "𐐀𐐨 𐑐 Ａｂｃ！？ 3½ ３ trailing   ")

# DeepSeek's tokenizer.json pre_tokenizer (deepseek-ai/deepseek-llm-7b-base, as llama.cpp's converter printed it
# when it named "deepseek-llm"; the same regexes are in llama.cpp's src/llama-vocab.cpp), written here as
# literals to check the regex strings built from code-point ranges (\u escapes: characters that Unicode
# normalization would change, and unprintable ones)
DEEPSEEK_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    *({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False} for regex in (
        "[\r\n]",
        "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷ"
        "ᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-"
        "ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻"
        "𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
        "\\s?[!-/:-~！-／：-～‘-‟\u3000-。]+",
        "\\s+$",
        "[一-龥ࠀ-一가-\ud7ff]+")),
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def _heldout(chars: int | None) -> dict[str, str]:
    data = Path(moeinfer.__file__).parent / "eval" / "data"
    return {name: (data / name).read_text()[:chars] for name in ("english.txt", "python.txt")}


@pytest.fixture(scope="module")
def tiny():
    return moeinfer.load("tiny", progress=False)


@pytest.fixture(scope="module")
def deepseek_tokenizer(tiny):
    """The shipped model's vocabulary with DeepSeek's pre-tokenizer read from its tokenizer.json form."""
    from tokenizers import Tokenizer as Backend

    spec = json.loads(tiny.tokenizer.backend.to_str())
    spec["pre_tokenizer"] = DEEPSEEK_PRE_TOKENIZER
    tok = copy.copy(tiny.tokenizer)
    tok.backend = Backend.from_str(json.dumps(spec))
    return tok


def _pieces(pre_tokenizer, text: str) -> list[str]:
    """The pre-tokenizer's pieces of `text`, as text (undoing ByteLevel's byte-to-character map)."""
    from tokenizers import decoders

    byte_level = decoders.ByteLevel()
    return [byte_level.decode([piece]) for piece, _ in pre_tokenizer.pre_tokenize_str(text)]


def test_deepseeks_pre_tokenizer_is_named_and_written_back(deepseek_tokenizer, tmp_path):
    back, reader = tokenizer_through_gguf(deepseek_tokenizer, tmp_path / "tok.gguf", arch="deepseek2",
                                          vocab_size=deepseek_tokenizer.backend.get_vocab_size())
    assert reader.fields["tokenizer.ggml.pre"].contents() == "deepseek-llm"
    # what a tokenizer.json saved from the rebuilt tokenizer holds: DeepSeek's pre_tokenizer, string for string
    assert json.loads(back.backend.to_str())["pre_tokenizer"] == DEEPSEEK_PRE_TOKENIZER


@pytest.mark.parametrize("chars", [100_000, pytest.param(None, marks=pytest.mark.slow)], ids=["head", "full"])
def test_same_ids_on_heldout_texts(tiny, deepseek_tokenizer, tmp_path, chars):
    back, _ = tokenizer_through_gguf(deepseek_tokenizer, tmp_path / "tok.gguf", arch="deepseek2",
                                     vocab_size=deepseek_tokenizer.backend.get_vocab_size())
    for name, text in {**_heldout(chars), "odd": ODD}.items():
        ids = deepseek_tokenizer.encode(text)
        assert back.encode(text) == ids, name
        assert back.decode(ids) == deepseek_tokenizer.decode(ids), name
    # the swap changed the ids (the shipped tokenizer splits with GPT-2's regex), so the pre-tokenizer was used
    text = _heldout(2_000)["english.txt"] + ODD
    assert back.encode(text) != tiny.tokenizer.encode(text)


@pytest.mark.parametrize("text, pieces", [
    # letter class: ǅ (U+01C5, titlecase) is in it, ƻ (U+01BB, a caseless letter between two ranges) is not
    ("ǅ ǅ", ["ǅ", " ǅ"]), ("ƻ ƻ", ["ƻ ƻ"]), ("Ƽ Ƽ", ["Ƽ", " Ƽ"]),
    # past the BMP: Deseret U+10400 and Adlam U+1E943 in, Shavian U+10450 and Adlam U+1E944 out
    ("\U00010400 \U00010400", ["\U00010400", " \U00010400"]), ("\U0001e943 \U0001e943", ["\U0001e943", " \U0001e943"]),
    ("\U00010450 \U00010450", ["\U00010450 \U00010450"]), ("\U0001e944 \U0001e944", ["\U0001e944 \U0001e944"]),
    # Ꞌ (U+A78B) is in, ꞏ (U+A78F) is out; Ω (U+2126 OHM SIGN) is a letter, but everything in U+0800..U+4E00
    # is also in the CJK class, whose split then takes the space off
    ("Ꞌ Ꞌ", ["Ꞌ", " Ꞌ"]), ("ꞏ ꞏ", ["ꞏ ꞏ"]), ("\u2126 \u2126", ["\u2126", " ", "\u2126"]),
    # ASCII letters are also in the punctuation class (":-~"), so that split cuts letter runs at non-ASCII
    ("abǅc", ["ab", "ǅ", "c"]), ("ab,cd", ["ab", ",", "cd"]),
    # fullwidth letters and punctuation, a leading space kept with the run
    ("Ａ！？ｂ x ！", ["Ａ", "！？", "ｂ", " x", " ！"]),
    # CJK ideographs, kana and Hangul in one class; Yi (U+A000) and U+9FA6 (past 龥) are not in it
    ("漢字かな한국", ["漢字かな한국"]), ("漢ꀀ字", ["漢", "ꀀ", "字"]), ("漢\u9fa6", ["漢", "\u9fa6"]),
    # each digit alone, fullwidth digits and other numbers too
    ("x12３½", ["x", "1", "2", "３", "½"]), ("a 12", ["a", " ", "1", "2"]),
    # newlines alone, whitespace before a letter split off but for one space, trailing whitespace
    ("a\r\nb", ["a", "\r", "\n", "b"]), ("a  b", ["a", " ", " b"]), ("ab  ", ["ab", "  "]),
])
def test_rebuilt_pre_tokenizer_splits_like_deepseeks(deepseek_tokenizer, tmp_path, text, pieces):
    assert _pieces(deepseek_tokenizer.backend.pre_tokenizer, text) == pieces  # the definition
    assert _pieces(build_pre_tokenizer("deepseek-llm"), text) == pieces  # what GGUF import builds


@pytest.mark.parametrize("near_miss", ["one range merged", "llama.cpp's digit runs", "no digits step"])
def test_near_misses_are_refused(deepseek_tokenizer, tmp_path, near_miss):
    from tokenizers import Tokenizer as Backend

    pre = copy.deepcopy(DEEPSEEK_PRE_TOKENIZER)
    steps = pre["pretokenizers"]
    if near_miss == "one range merged":  # ø-ƺƼ-ƿ as ø-ƿ: ƻ would count as a letter
        steps[1]["pattern"]["Regex"] = steps[1]["pattern"]["Regex"].replace("ø-ƺƼ-ƿ", "ø-ƿ")
    elif near_miss == "llama.cpp's digit runs":  # runs of digits would reach the vocabulary's digit merges
        steps[5] = {"type": "Split", "pattern": {"Regex": "\\p{N}+"}, "behavior": "Isolated", "invert": False}
    else:
        del steps[5]
    spec = json.loads(deepseek_tokenizer.backend.to_str())
    spec["pre_tokenizer"] = pre
    tok = copy.copy(deepseek_tokenizer)
    tok.backend = Backend.from_str(json.dumps(spec))
    with pytest.raises(GGUFError, match="not one llama.cpp names.*deepseek-llm"):
        tokenizer_through_gguf(tok, tmp_path / "tok.gguf", arch="deepseek2",
                               vocab_size=tok.backend.get_vocab_size())


def test_unknown_name_on_import_lists_deepseek_llm():
    with pytest.raises(GGUFError, match=r"x\.gguf: tokenizer.ggml.pre 'deepseek-coder' .*deepseek-llm"):
        build_pre_tokenizer("deepseek-coder", path="x.gguf")


def test_model_with_deepseek_tokenizer_round_trips(tiny, deepseek_tokenizer, tmp_path):
    model = copy.deepcopy(tiny)
    model.tokenizer = deepseek_tokenizer
    path = tmp_path / "ds.gguf"
    export_gguf(model, path, progress=False)
    back = moeinfer.load(path, progress=False)
    text = _heldout(20_000)["python.txt"] + ODD
    assert back.tokenizer.encode(text) == deepseek_tokenizer.encode(text)
