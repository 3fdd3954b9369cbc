"""Request bodies of the OpenAI API subset moeinfer serves, validated with pydantic.

Unknown fields are ignored (clients send many); fields whose values moeinfer cannot honour
(n > 1, logprobs, ...) are rejected with a 400 that names them. Numbers must be finite (NaN and
Infinity, which Python's JSON reader accepts, are refused) and text must be valid Unicode: a lone
surrogate escape such as "\\ud800" cannot be encoded, so it is refused with the field it is in.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def invalid_text_at(data: Any) -> str | None:
    """The path of the first string in `data` (nested lists/dicts, any depth) that is not valid
    Unicode (a lone surrogate), or None. Iterative, so deep nesting cannot exhaust the stack."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                return f"{path or 'body'} (a lone surrogate at character {e.start})"
        elif isinstance(value, dict):
            for k, v in value.items():
                key = str(k)
                stack.append((f"{path}.{key}" if path else key, v))
                stack.append((path or "body", key))  # keys must be valid text too
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))
    return None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: str = Field(min_length=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    logprobs: Union[bool, int, None] = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        where = invalid_text_at(data)
        if where is not None:
            raise ValueError(f"invalid text in {where}: strings must be valid Unicode")
        return data

    @field_validator("n")
    @classmethod
    def _only_one(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n = 1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Union[str, list[str], None]) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return [s for s in stops if s]

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: Union[bool, int, None]) -> None:
        if v not in (None, False, 0):
            raise ValueError("logprobs are not supported")
        return None

    def stop_list(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
