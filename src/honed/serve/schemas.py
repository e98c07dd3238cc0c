"""The request bodies the server accepts, one per servable task: pydantic and the standard
library only (no fastapi, no torch), so the task table and its contract test can import them.

Every model forbids unknown fields and caps every size. A builder takes the run's input column
and the server's limits; the models in REQUEST_SCHEMAS are those builders with the defaults.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictStr, create_model

MAX_INPUTS = 256  # inputs per request (texts of a predict request, messages of a chat request)
MAX_TEXT_CHARS = 100_000  # characters per text or message
MAX_NEW_TOKENS = 512  # the most a chat request may ask for
MAX_CHOICES = 8  # `n`: replies per chat request (each is a full generation)
MAX_STOPS = 4  # stop sequences per request, as OpenAI allows
MAX_STOP_CHARS = 200  # a stop sequence is held back while it may be forming: keep that short
MAX_LOGIT_BIAS = 300  # token ids in logit_bias, as OpenAI allows


def classifier_request(column: str = "text", max_text_chars: int = MAX_TEXT_CHARS,
                       max_inputs: int = MAX_INPUTS) -> type[BaseModel]:
    """POST /v1/predict: {"inputs": [{"<column>": "..."}, ...], "model": optional id}."""
    item_model = create_model(
        "PredictInput",
        __config__=ConfigDict(extra="forbid"),
        text=(StrictStr, Field(..., alias=column, max_length=max_text_chars)),
    )
    return create_model(
        "PredictRequest",
        __config__=ConfigDict(extra="forbid"),
        inputs=(list[item_model], Field(..., min_length=1, max_length=max_inputs)),
        model=(Optional[StrictStr], None),
    )


def chat_request(max_text_chars: int = MAX_TEXT_CHARS, max_inputs: int = MAX_INPUTS) -> type[BaseModel]:
    """POST /v1/chat/completions, the OpenAI fields honed honours: streaming, `n` choices, stop
    sequences, temperature/top_p/seed and logit_bias."""
    message_model = create_model(
        "ChatMessage", __config__=ConfigDict(extra="forbid"),
        role=(Literal["system", "user", "assistant"], ...),
        content=(StrictStr, Field(..., max_length=max_text_chars)),
        name=(Optional[StrictStr], None),
    )
    stream_options = create_model(
        "StreamOptions", __config__=ConfigDict(extra="forbid"),
        include_usage=(Optional[bool], None),
    )
    stop_text = Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_CHARS)]
    return create_model(
        "ChatRequest", __config__=ConfigDict(extra="forbid"),
        model=(Optional[StrictStr], None),
        messages=(list[message_model], Field(..., min_length=1, max_length=max_inputs)),
        max_tokens=(Optional[int], Field(None, ge=1, le=MAX_NEW_TOKENS)),
        max_completion_tokens=(Optional[int], Field(None, ge=1, le=MAX_NEW_TOKENS)),
        temperature=(Optional[float], Field(None, ge=0, le=2)),
        n=(Optional[int], Field(None, ge=1, le=MAX_CHOICES)),
        stream=(Optional[bool], None),
        stream_options=(Optional[stream_options], None),
        stop=(Optional[Union[stop_text, Annotated[list[stop_text], Field(max_length=MAX_STOPS)]]], None),
        user=(Optional[StrictStr], None),
        seed=(Optional[int], Field(None, ge=-(2**63), lt=2**63)),
        top_p=(Optional[float], Field(None, gt=0, le=1)),
        logit_bias=(Optional[dict[str, Annotated[float, Field(ge=-100, le=100)]]], Field(None, max_length=MAX_LOGIT_BIAS)),
    )


def stop_list(stop) -> list[str]:
    """The request's `stop` (one string, a list, or None) as a list."""
    return [stop] if isinstance(stop, str) else list(stop or [])


ClassifierRequest = classifier_request()
ChatRequest = chat_request()

REQUEST_SCHEMAS: dict[str, type[BaseModel]] = {
    "text-classification": ClassifierRequest,
    "chat": ChatRequest,
    "preference": ChatRequest,  # served as the chat model it is
}
