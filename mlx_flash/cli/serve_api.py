"""What `mlx-flash serve` accepts: its limits, the request bodies, and its OpenAI-style errors.

Every refusal is an `ApiError`, sent as `{"error": {"message", "type", "param", "code"}}` with
the message naming the field, the limit and the flag that sets it. Limits (all checked before
the request reaches the tokenizer or the model):

- the body: `max_body_bytes` (413, `request_too_large`);
- stop strings: at most `MAX_STOP` (`array_above_max_length`), each at most `max_stop_chars`
  characters (`string_above_max_length`), so the per-token stop check stays cheap;
- the prompt: at most `max_prompt_chars` characters of text, or fewer token ids than the context
  (`context_length_exceeded`); after tokenizing, prompt + max_tokens within the context;
- `seed` in [0, 2**64 - 1], what `mx.random.seed` takes (`integer_above_max_value`,
  `integer_below_min_value`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

MAX_STOP = 4  # as OpenAI's API
MAX_SEED = 2**64 - 1  # mx.random.seed takes an unsigned 64-bit integer
# Default characters of prompt text per token of context. The tokenizers served here average
# 3.5-4.5 characters per token on English and code (Qwen2.5's: 3.7 on this README, 4.2 on
# Python), so 8 is twice that: a prompt over it would not have fit the context once tokenized,
# and refusing it first bounds the tokenizer's work. Text that packs tighter (long runs of one
# character) can be let through with --max-prompt-chars.
PROMPT_CHARS_PER_TOKEN = 8
# Pydantic error types raised here that are also the OpenAI error code.
_CODES = {"string_above_max_length", "array_above_max_length"}
_BOUNDS = {"greater_than_equal": "below_min_value", "greater_than": "below_min_value",
           "less_than_equal": "above_max_value", "less_than": "above_max_value"}


@dataclass
class ServeSettings:
    """What the server enforces besides the request schema."""

    model_id: str  # the name /v1/models lists and responses carry
    max_queue: int = 8  # requests that may wait behind the running one; 503 beyond
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_context: int = 2048  # prompt + completion tokens (the KV cache the budget reserved)
    max_tokens: int = 256  # completion tokens when a request does not say
    temperature: float = 0.0  # when a request does not say (0: greedy)
    top_p: float = 1.0
    max_stop_chars: int = 256  # characters per stop string
    max_prompt_chars: int | None = None  # prompt text; None: PROMPT_CHARS_PER_TOKEN x context

    def __post_init__(self):
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_context < 2 or self.max_tokens < 1:
            raise ValueError(f"max_context ({self.max_context}) must be >= 2 and max_tokens "
                             f"({self.max_tokens}) >= 1")
        if self.max_prompt_chars is None:
            self.max_prompt_chars = PROMPT_CHARS_PER_TOKEN * self.max_context
        if self.max_stop_chars < 1 or self.max_prompt_chars < 1:
            raise ValueError(f"max_stop_chars ({self.max_stop_chars}) and max_prompt_chars "
                             f"({self.max_prompt_chars}) must be >= 1")


class _Strict(BaseModel):
    """Unknown fields are errors, and JSON types are not coerced ("1" is not a number)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else \
            "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class SamplingRequest(_Strict):
    model: str | None = None  # one model is served: any name is accepted
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value, info: ValidationInfo) -> list[str]:
        """Up to MAX_STOP non-empty strings, each within the context's `max_stop_chars`."""
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP:
            raise PydanticCustomError("array_above_max_length", "{count} stop strings; at most "
                                      "{limit} are allowed", {"count": len(stops),
                                                              "limit": MAX_STOP})
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        limit = (info.context or {}).get("max_stop_chars", ServeSettings.max_stop_chars)
        for i, s in enumerate(stops):
            if len(s) > limit:
                raise PydanticCustomError(
                    "string_above_max_length", "stop string {index} is {length} characters; "
                    "this server takes at most {limit} per stop string (--max-stop-chars)",
                    {"index": i, "length": len(s), "limit": limit})
        return stops


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(SamplingRequest):
    prompt: str | list[int]


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (status, message, param,
                                                                       code, kind)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def _error_code(error: dict) -> str | None:
    """The OpenAI-style code of one pydantic error (None where OpenAI has none)."""
    if error["type"] in _CODES:
        return error["type"]
    bound = _BOUNDS.get(error["type"])
    if bound is None:
        return None
    return ("integer_" if type(error.get("input")) is int else "decimal_") + bound


def validation_message(error: ValidationError,
                       model: type[BaseModel]) -> tuple[str, str | None, str | None]:
    """(message, offending field, code) for the 400 answering a pydantic error."""
    first = error.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "json_invalid":
        return (f"the request body is not valid JSON ({first['msg']}); send one JSON object",
                None, None)
    if first["type"] == "model_type" and not loc:
        return "the request body must be a JSON object", None, None
    if first["type"] == "extra_forbidden":
        known = ", ".join(model.model_fields)
        return f"unknown field '{loc}': this server accepts {known}", loc, None
    return f"'{loc}': {first['msg']}", loc or None, _error_code(first)


def parse(model: type[SamplingRequest], body: bytes, settings: ServeSettings) -> SamplingRequest:
    """The validated request (400 ApiError when it is not one)."""
    try:
        return model.model_validate_json(body,
                                         context={"max_stop_chars": settings.max_stop_chars})
    except ValidationError as e:
        message, param, code = validation_message(e, model)
        raise ApiError(400, message, param=param, code=code) from None


def check_prompt_size(settings: ServeSettings, req: SamplingRequest) -> None:
    """Refuse a prompt that cannot fit the context, before anything tokenizes it."""
    if isinstance(req, ChatRequest):
        chars, param = sum(len(m.as_dict()["content"]) for m in req.messages), "messages"
    elif isinstance(req.prompt, list):  # token ids: their count is known now
        if len(req.prompt) >= settings.max_context:
            raise ApiError(400, f"the prompt is {len(req.prompt)} tokens; this server's context "
                                f"is {settings.max_context} (--max-kv-tokens): shorten the "
                                "prompt", param="prompt", code="context_length_exceeded")
        return
    else:
        chars, param = len(req.prompt), "prompt"
    if chars > settings.max_prompt_chars:
        raise ApiError(400, f"the prompt is {chars} characters; this server takes at most "
                            f"{settings.max_prompt_chars} (--max-prompt-chars, for a context "
                            f"of {settings.max_context} tokens): shorten the prompt",
                       param=param, code="context_length_exceeded")


def generation_error(error: BaseException | None, cancelled: bool = False) -> ApiError | None:
    """The answer to a generation that raised `error` (None when it did not)."""
    if cancelled:
        return ApiError(503, "the server is shutting down: retry on another", kind="server_error",
                        code="server_shutdown")
    if error is None:
        return None
    if isinstance(error, OSError):
        return ApiError(503, f"the generation failed reading the model ({error}); the server "
                             "keeps serving: retry", kind="server_error", code="io_error")
    return ApiError(500, f"the generation failed: {type(error).__name__}: {error}",
                    kind="server_error", code="model_error")
