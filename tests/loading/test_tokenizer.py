"""Tokenizer and chat template agree with transformers' AutoTokenizer; text generation features."""

from __future__ import annotations

import pytest
import torch

import moeinfer
from hf_peers import save_hf_checkpoint
from moeinfer.loading.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer
from tiny_tokenizer import write_tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "to be or not?"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_hf_checkpoint("mixtral", path, vocab_size=300, eos_token_id=1)
    write_tokenizer(path)
    return moeinfer.load(path, progress=False)


def test_encode_decode_matches_transformers(model):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(model.source_dir)
    text = "whether 'tis nobler in the mind\n    return x * x"
    assert model.tokenizer.encode(text) == hf(text)["input_ids"]
    assert model.tokenizer.decode(model.tokenizer.encode(text)) == text


def test_chat_template_matches_transformers(model):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(model.source_dir)
    ours = model.tokenizer.apply_chat_template(MESSAGES)
    assert ours == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.startswith("<s>[system] Be brief.</s>") and ours.endswith("[assistant] ")


def test_default_chat_template(tmp_path):
    write_tokenizer(tmp_path, chat_template=None)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.chat_template is None
    assert tok.apply_chat_template(MESSAGES) == "<|system|>\nBe brief.\n<|user|>\nto be or not?\n<|assistant|>\n"
    assert "<|assistant|>" in DEFAULT_CHAT_TEMPLATE


def test_bad_messages_are_named(model):
    with pytest.raises(ValueError, match="at least one message"):
        model.tokenizer.apply_chat_template([])
    with pytest.raises(ValueError, match="message 0"):
        model.tokenizer.apply_chat_template([{"content": "hi"}])


def test_text_and_chat_prompts(model):
    plain, chat = moeinfer.generate(model, ["to be or", MESSAGES], max_new_tokens=5, ignore_eos=True)
    assert plain.prompt_token_ids == model.tokenizer.encode("to be or")
    assert chat.prompt_token_ids == model.tokenizer.encode(model.tokenizer.apply_chat_template(MESSAGES),
                                                           add_special_tokens=False)
    assert plain.text == model.tokenizer.decode(plain.token_ids)


def test_streaming_deltas_add_up_to_text(model):
    seen: dict[int, str] = {0: "", 1: ""}
    tokens: dict[int, list[int]] = {0: [], 1: []}

    def on_token(row, tok, delta):
        seen[row] += delta
        tokens[row].append(tok)

    results = moeinfer.generate(model, ["the slings", "def main"], max_new_tokens=12, ignore_eos=True,
                                temperature=1.0, seed=5, on_token=on_token)
    for row, res in enumerate(results):
        assert tokens[row] == res.token_ids
        assert seen[row] == res.text


def test_stop_string_truncates_text(model):
    [free] = moeinfer.generate(model, ["to be"], max_new_tokens=20, ignore_eos=True)
    text = free.text
    assert len(text) > 4
    stop = text[2:4]
    [res] = moeinfer.generate(model, ["to be"], max_new_tokens=20, ignore_eos=True, stop=[stop])
    assert res.finish_reason == "stop"
    assert res.text == text[: text.index(stop)]
    assert len(res.token_ids) <= len(free.token_ids)


def test_eos_stops_and_is_reported(model):
    [free] = moeinfer.generate(model, [[3, 4, 5]], max_new_tokens=10, ignore_eos=True)
    eos = free.token_ids[3]
    [res] = moeinfer.generate(model, [[3, 4, 5]], max_new_tokens=10, eos_token_ids=[eos])
    cut = free.token_ids.index(eos)
    assert res.token_ids == free.token_ids[: cut + 1]
    assert res.finish_reason == "eos"


def test_text_prompt_without_tokenizer_is_an_error(tmp_path):
    save_hf_checkpoint("mixtral", tmp_path)
    model = moeinfer.load(tmp_path, progress=False)
    with pytest.raises(ValueError, match="no tokenizer"):
        moeinfer.generate(model, ["hello"], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside 0..96"):
        moeinfer.generate(model, [[1, 500]], max_new_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        moeinfer.generate(model, [[]], max_new_tokens=2)
    assert torch.is_tensor(model(torch.tensor([[1, 2]])))
