"""The service's requests and responses as pydantic models: OpenAI's chat completions (with vLLM's
`repetition_penalty` and `structured_outputs`), the extraction endpoint, models, health (with the served schema's
fields) and errors.

FastAPI validates a request body against its model, so what a model declares is what the service takes: types are
strict (a string is no number, a boolean no integer), numbers finite and in range, text free of lone surrogates.
What depends on the server's settings (the model's name, the largest max_tokens) is checked by the service.
`validation_error` turns pydantic's errors into OpenAI's error object, naming the field at fault as `param`.
Fields a model does not declare are ignored, as OpenAI's clients send many, except where the model forbids them.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Sequence

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt,
                      ValidationInfo, field_validator)
from pydantic_core import PydanticCustomError

from utils import SYSTEM_PROMPT

MAX_SEED = 2 ** 63 - 1


def check_text(value: str) -> str:
    """A string that is text: a JSON "\\ud800" escape without its pair is none (and could not be encoded)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PydanticCustomError("lone_surrogate", "Input should be text, not a lone surrogate (character {at})",
                                  {"at": e.start + 1}) from None
    return value


def not_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("empty", "Input should not be empty")
    return value


def absent(value: Any) -> Any:
    """A parameter this server does not implement: taken only when it asks for nothing."""
    if value not in (None, False, [], ""):
        raise PydanticCustomError("unsupported", "Input should be absent: this server does not support it")
    return value


Text = Annotated[str, AfterValidator(check_text)]
Unsupported = Annotated[Any, AfterValidator(absent)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]  # an integer is a number too; a boolean is not


# --------------------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]  # this model reads text only
    text: Text


def content_parts(value: Any) -> Any:
    """A message's content, a string or OpenAI's list of text parts, as parts."""
    if isinstance(value, str):
        return [{"type": "text", "text": check_text(value)}]
    if not isinstance(value, list):
        raise PydanticCustomError("content_type", "Input should be a string or an array of text parts")
    return value


class ChatMessage(BaseModel):
    role: str  # which roles, in which order: ChatCompletionRequest.messages
    content: Annotated[list[TextPart], BeforeValidator(content_parts)]

    @property
    def text(self) -> str:
        return "".join(part.text for part in self.content)


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object"]  # json_object: the trained answer format; other structures: a grammar


class StructuredOutputs(BaseModel):
    """vLLM's structured outputs, of which this server takes a grammar only."""
    model_config = ConfigDict(extra="forbid")
    grammar: Text  # xgrammar EBNF, root rule `root`


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None  # 0: greedy
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0, le=100)] | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] | None = None
    n: Literal[1] | None = None  # one answer per request
    stop: Unsupported = None
    tools: Unsupported = None
    functions: Unsupported = None
    logprobs: Unsupported = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None

    @field_validator("messages")
    @classmethod
    def one_exchange(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        roles = [message.role for message in messages]
        if roles not in (["user"], ["system", "user"]):
            raise PydanticCustomError(
                "exchange", "Input should be one exchange, as the model was trained on: an optional system message, "
                            "then one user message; got the roles {roles}", {"roles": str(roles)})
        return messages

    @field_validator("structured_outputs")
    @classmethod
    def one_structure(cls, structured: StructuredOutputs | None, info: ValidationInfo) -> StructuredOutputs | None:
        response_format = info.data.get("response_format")
        if structured is not None and response_format is not None and response_format.type == "json_object":
            raise PydanticCustomError("two_structures", "Input should be absent with response_format json_object: "
                                                        "give one of them")
        return structured

    @property
    def system(self) -> str:
        """The system message; training's system prompt when there is none."""
        return self.messages[0].text if len(self.messages) == 2 else SYSTEM_PROMPT

    @property
    def user_text(self) -> str:
        return self.messages[-1].text

    @property
    def grammar(self) -> str | None:
        return self.structured_outputs.grammar if self.structured_outputs else None

    @property
    def json_object(self) -> bool:
        return self.response_format is not None and self.response_format.type == "json_object"

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ExtractRequest(BaseModel):
    dialogue: Annotated[Text, AfterValidator(not_blank)]


# --------------------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------------------


def is_none(value: Any) -> bool:
    return value is None


FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class Delta(BaseModel):
    """What a chunk adds to the answer; a field it does not set is left out."""
    role: Literal["assistant"] | None = Field(None, exclude_if=is_none)
    content: str | None = Field(None, exclude_if=is_none)


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = Field(None, exclude_if=is_none)  # OpenAI's last chunk with include_usage: no choices


class GroundedItem(BaseModel):
    """A list item and its first occurrence in the dialogue (dialogue[start:end] == text), or null offsets."""
    text: str
    start: int | None
    end: int | None


class ExtractResponse(BaseModel):
    fields: dict[str, list[GroundedItem] | str]  # the served schema's fields in its order, span items grounded
    valid: bool
    truncated: bool
    dialogue_cut: bool
    output: str
    finish_reason: FinishReason
    usage: Usage
    random_weights: bool = False  # the model was made by qwen1_8.make_tiny: its answers are noise


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "serve.py"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class SchemaField(BaseModel):
    name: str
    kind: Literal["spans", "text"]  # spans: a list of pieces of the dialogue; text: a summary


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    random_weights: bool = False  # the model was made by qwen1_8.make_tiny: its answers are noise
    fields: list[SchemaField]  # the served schema's, in its order: what /v1/extract answers (the page reads them)
    batches: int  # engine batches started
    requests: int  # requests admitted to the engine
    cancelled: int
    errors: int
    running: int
    waiting: int
    preparing: int  # requests being tokenized and given their grammar
    grammars_vetting: int  # clients' grammars being compiled in a worker process now
    grammar_workers_idle: int
    grammar_workers_killed: int  # for a grammar past --grammar_timeout, or whose client left
    grammars_cached: int


class ErrorInfo(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# --------------------------------------------------------------------------------------------------------------
# Validation errors, as OpenAI's
# --------------------------------------------------------------------------------------------------------------


def json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def param_of(loc: Sequence[str | int]) -> str | None:
    """OpenAI's name of a field: ("body", "messages", 0, "content") is "messages[0].content"; the body itself None."""
    name = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        name += f"[{part}]" if isinstance(part, int) else f".{part}" if name else str(part)
    return name or None


def validation_error(errors: Sequence[dict], most: int = 5) -> ErrorInfo:
    """OpenAI's error for what pydantic found wrong with a request: each field and why (the first `most`), the first
    field as `param`. A wrong type is named; a number, boolean or null out of bounds quoted back; a string never (it
    may be long, or no text)."""
    reasons = []
    for error in errors[:most]:
        param = param_of(error["loc"])
        reason = f"'{param}': {error['msg']}" if param else f"the request body: {error['msg']}"
        value = error.get("input")
        if error["type"].endswith("_type"):
            reason += f", got {json_type(value)}"
        elif error["type"] != "missing" and (value is None or isinstance(value, (bool, int, float))):
            reason += f", got {json.dumps(value)}"
        reasons.append(reason)
    if len(errors) > most:
        reasons.append(f"and {len(errors) - most} more")
    return ErrorInfo(message="; ".join(reasons), param=param_of(errors[0]["loc"]) if errors else None)
