"""Checkpoint tokenizers through the `tokenizers` library, with special tokens and chat templates
read from tokenizer_config.json (and chat_template.jinja, as transformers v5 writes it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moeinfer.loading.config_json import read_json
from moeinfer.loading.errors import CheckpointError

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""Used when a checkpoint has no chat template: `<|role|>\\ncontent\\n` per message, then `<|assistant|>\\n`."""


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text (byte {e.start})") from None


def _chat_template(value: Any, where: Path) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of {name, template} (take "default")."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in value):
        return next((t["template"] for t in value if t.get("name") == "default"), None)
    raise CheckpointError(f"{where}: chat_template must be a string or a list of {{\"name\", \"template\"}} "
                          f"objects, got {value!r:.60}")


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken serialisation
        return value.get("content")
    return value


class Tokenizer:
    """Encode/decode text and render chat prompts for one checkpoint."""

    def __init__(self, backend: Any, config: dict[str, Any] | None = None, chat_template: str | None = None) -> None:
        self.backend = backend
        self.config = dict(config or {})
        self.chat_template = chat_template
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.pad_token = _token_text(self.config.get("pad_token"))
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.pad_token_id = self.token_to_id(self.pad_token)
        probe = backend.encode("a", add_special_tokens=True).ids
        self._prepend_bos = (bool(self.config.get("add_bos_token")) and self.bos_token_id is not None
                             and (not probe or probe[0] != self.bos_token_id))

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer | None:
        """The tokenizer of a checkpoint directory, or None when it has no tokenizer.json."""
        root = Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            return None
        from tokenizers import Tokenizer as Backend

        try:
            backend = Backend.from_file(str(tok_file))
        except Exception as e:  # the library raises a bare Exception on parse errors
            raise CheckpointError(f"{tok_file} could not be read by the tokenizers library: {e}") from e
        config: dict[str, Any] = {}
        cfg_file = root / "tokenizer_config.json"
        if cfg_file.is_file():
            config = read_json(cfg_file)
        template = _chat_template(config.pop("chat_template", None), cfg_file)
        for field in ("bos_token", "eos_token", "pad_token"):
            value = config.get(field)
            if not (value is None or isinstance(value, str)
                    or (isinstance(value, dict) and isinstance(value.get("content"), str))):
                raise CheckpointError(f"{cfg_file}: {field} must be a token string (or an AddedToken object "
                                      f"with a \"content\" string), got {value!r:.60}")
        jinja = root / "chat_template.jinja"
        if jinja.is_file():
            template = _read_text(jinja)
        return cls(backend, config, template)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._prepend_bos:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Render messages with the checkpoint's template (DEFAULT_CHAT_TEMPLATE when it has none)."""
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not messages:
            raise ValueError("chat needs at least one message")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")

        def raise_exception(message: str) -> None:
            raise ValueError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            template = env.from_string(self.chat_template or DEFAULT_CHAT_TEMPLATE)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as e:
            raise ValueError(f"chat template failed to render: {e}") from e

    def save(self, path: str | Path) -> None:
        root = Path(path)
        self.backend.save(str(root / "tokenizer.json"))
        config = dict(self.config)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (root / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
