"""Streaming text never shows any part of a stop string and adds up to the final text."""

from __future__ import annotations

from moeinfer.engine.detokenize import TextStream


class CharTokenizer:
    """Token i is chr(i); 0xFFFD stands for the first byte of a two-token character."""

    def decode(self, ids):
        out, i = [], 0
        while i < len(ids):
            if ids[i] == 1 and i + 1 < len(ids):
                out.append(chr(ids[i + 1]))
                i += 2
            elif ids[i] == 1:
                out.append("\ufffd")
                i += 1
            else:
                out.append(chr(ids[i]))
                i += 1
        return "".join(out)


def _run(text_ids, stop, final_at=None):
    s = TextStream(CharTokenizer(), stop)
    deltas = []
    for n in range(1, len(text_ids) + 1):
        deltas.append(s.push(text_ids[:n], final=(n == final_at)))
        if s.stopped:
            break
    return deltas, s


def test_stop_string_never_streamed():
    ids = [ord(c) for c in "ab\ncd\n\nef"]
    deltas, s = _run(ids, ["\n\n"])
    assert s.stopped and s.text == "ab\ncd"
    assert "".join(deltas) == "ab\ncd"
    assert all("\n\n" not in d for d in deltas)
    assert deltas[2] == ""  # the first newline is held back until the next token decides


def test_held_back_text_is_released_when_not_a_stop():
    ids = [ord(c) for c in "x\ny"]
    deltas, s = _run(ids, ["\n\n"], final_at=3)
    assert deltas == ["x", "", "\ny"] and not s.stopped


def test_incomplete_character_is_held():
    ids = [ord("a"), 1, ord("é"), ord("b")]
    deltas, s = _run(ids, [], final_at=4)
    assert deltas == ["a", "", "é", "b"]


def test_final_flushes_everything():
    ids = [ord("a"), ord("\n")]
    deltas, s = _run(ids, ["\nZ"], final_at=2)
    assert "".join(deltas) == "a\n"
