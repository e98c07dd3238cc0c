"""The request bodies the server accepts, one per servable task: pydantic and the standard
library only (no fastapi, no torch), so the task table and its contract test can import them.

Every model forbids unknown fields and caps every size. A builder takes the run's input column
and the server's limits; the models in REQUEST_SCHEMAS are those builders with the defaults.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictStr, create_model

MAX_INPUTS = 256  # inputs per request (texts of a predict request, messages of a chat request)
MAX_TEXT_CHARS = 100_000  # characters per text or message
MAX_NEW_TOKENS = 512  # the most a chat request may ask for


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
    """POST /v1/chat/completions, the OpenAI fields honed honours (non-streaming, one choice)."""
    message_model = create_model(
        "ChatMessage", __config__=ConfigDict(extra="forbid"),
        role=(Literal["system", "user", "assistant"], ...),
        content=(StrictStr, Field(..., max_length=max_text_chars)),
        name=(Optional[StrictStr], None),
    )
    return create_model(
        "ChatRequest", __config__=ConfigDict(extra="forbid"),
        model=(Optional[StrictStr], None),
        messages=(list[message_model], Field(..., min_length=1, max_length=max_inputs)),
        max_tokens=(Optional[int], Field(None, ge=1, le=MAX_NEW_TOKENS)),
        max_completion_tokens=(Optional[int], Field(None, ge=1, le=MAX_NEW_TOKENS)),
        temperature=(Optional[float], Field(None, ge=0, le=2)),
        n=(Optional[int], Field(None, ge=1, le=1)),
        stream=(Optional[bool], None),
        user=(Optional[StrictStr], None),
        seed=(Optional[int], None),
        top_p=(Optional[float], Field(None, gt=0, le=1)),
    )


ClassifierRequest = classifier_request()
ChatRequest = chat_request()

REQUEST_SCHEMAS: dict[str, type[BaseModel]] = {
    "text-classification": ClassifierRequest,
    "chat": ChatRequest,
    "preference": ChatRequest,  # served as the chat model it is
}
