"""The service's pydantic models on their own (no model, no server): what a request takes, which field an error
names, and the server-sent chunks byte for byte as the hand-written dicts that came before the models wrote them."""
import json

import pytest
from pydantic import ValidationError

from medextract.protocol import (ChatCompletionChunk, ChatCompletionRequest, ChunkChoice, Delta, ExtractRequest,
                                 Usage, param_of, validation_error)
from medextract.service import event
from utils import SYSTEM_PROMPT


def user(**extra) -> dict:
    return {"messages": [{"role": "user", "content": "你好"}], **extra}


def test_a_message_is_a_string_or_text_parts_and_the_system_prompt_defaults_to_training_s():
    parts = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "你"}, {"type": "text", "text": "好"}]}]})
    plain = ChatCompletionRequest.model_validate(user())
    assert parts.user_text == plain.user_text == "你好" and plain.system == SYSTEM_PROMPT
    own = ChatCompletionRequest.model_validate({"messages": [{"role": "system", "content": ""},
                                                             {"role": "user", "content": "x"}]})
    assert own.system == "" and own.user_text == "x"  # an empty system message is the client's, not training's
    # fields OpenAI's clients send that this server does not model are ignored; falsy unsupported ones are taken
    call = ChatCompletionRequest.model_validate(user(user="x", presence_penalty=0, stop=None, tools=[], n=1,
                                                     stream_options={"include_usage": True}))
    assert call.include_usage and not call.json_object and call.grammar is None


BAD = {  # request -> the param its error names
    "content a number": ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    "a lone surrogate": ({"messages": [{"role": "user", "content": "a\ud800"}]}, "messages[0].content"),
    "a part's lone surrogate": ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
                                "messages[0].content[0].text"),
    "an image part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]},
                      "messages[0].content[0].type"),
    "two user turns": ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
                       "messages"),
    "no messages": ({"messages": []}, "messages"),
    "max_tokens a string": (user(max_tokens="8"), "max_tokens"),
    "max_tokens a float": (user(max_tokens=8.0), "max_tokens"),
    "max_tokens a boolean": (user(max_tokens=True), "max_tokens"),
    "temperature a boolean": (user(temperature=True), "temperature"),
    "temperature NaN": (user(temperature=float("nan")), "temperature"),
    "top_p zero": (user(top_p=0), "top_p"),
    "seed past 2**63 - 1": (user(seed=2 ** 63), "seed"),
    "n of 2": (user(n=2), "n"),
    "stop": (user(stop=["\n"]), "stop"),
    "tools": (user(tools=[{"type": "function"}]), "tools"),
    "stream a string": (user(stream="yes"), "stream"),
    "json_schema": (user(response_format={"type": "json_schema"}), "response_format.type"),
    "a grammar and json_object": (user(structured_outputs={"grammar": 'root ::= "a"'},
                                       response_format={"type": "json_object"}), "structured_outputs"),
    "structured_outputs beyond a grammar": (user(structured_outputs={"grammar": 'root ::= "a"', "json": {}}),
                                            "structured_outputs.json"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_request_names_its_field(name):
    body, param = BAD[name]
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(body)
    error = validation_error(caught.value.errors())
    assert error.param == param and error.message.startswith(f"'{param}': ") and error.type == "invalid_request_error"
    json.dumps(error.model_dump(), ensure_ascii=False).encode()  # what is sent back is text, whatever came in


def test_an_extraction_needs_a_dialogue_with_text():
    assert ExtractRequest.model_validate({"dialogue": "患者：头疼。", "extra": 1}).dialogue == "患者：头疼。"
    for body in ({"text": "x"}, {"dialogue": ["a"]}, {"dialogue": "  "}, {"dialogue": "\ud800"}):
        with pytest.raises(ValidationError) as caught:
            ExtractRequest.model_validate(body)
        assert validation_error(caught.value.errors()).param == "dialogue"


def test_param_names_read_as_openai_s():
    assert param_of(("body", "messages", 0, "content", 1, "text")) == "messages[0].content[1].text"
    assert param_of(("body",)) is None and param_of(("seed",)) == "seed"
    many = [{"loc": ("body", f"f{i}"), "msg": "Field required", "type": "missing"} for i in range(8)]
    assert validation_error(many).message.endswith("; and 3 more")


def test_stream_chunks_are_byte_for_byte_the_hand_written_ones():
    head = ChatCompletionChunk(id="chatcmpl-0", created=7, model="m", choices=[])

    def old(delta: dict, reason=None, **extra) -> str:
        body = {"id": "chatcmpl-0", "object": "chat.completion.chunk", "created": 7, "model": "m",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def new(delta: Delta, reason=None) -> str:
        return event(head.model_copy(update={"choices": [ChunkChoice(delta=delta, finish_reason=reason)]}))

    assert new(Delta(role="assistant", content="")) == old({"role": "assistant", "content": ""})
    assert new(Delta(content="药品")) == old({"content": "药品"})
    assert new(Delta(), "length") == old({}, "length")
    last = {**json.loads(old({})[len("data: "):]), "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    usage = Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    assert event(head.model_copy(update={"usage": usage})) == f"data: {json.dumps(last)}\n\n"
