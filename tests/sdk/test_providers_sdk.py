"""End-to-end tests: the official `openai` and `anthropic` Python SDKs against the release
gateway binary, through the gateway's translation to the `google` (Gemini), `cohere`,
`bedrock` (Converse, SigV4-signed, binary event stream) and `azure` (deployments) provider
kinds, plus embeddings.

One mock-upstream process speaks every provider API (routed by path); it answers
" tok0 … tok15" and, when tools are declared and the last user turn mentions "weather",
calls the first declared tool with {"location": "Paris"}. Processes, ports and fixtures
live in conftest.py.
"""

from __future__ import annotations

import json
import math
import re
import uuid

import anthropic
import openai
import pytest
from anthropic.types import Message, TextBlock, ToolUseBlock
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from conftest import EXPECTED_CONTENT, MESSAGES, assert_anthropic_error

# The Anthropic SDK warns on responses naming a model it knows to be deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")

TARGETS = [
    "google/gemini-2.5-flash",
    "cohere/command-a-03-2025",
    "bedrock/anthropic.claude-3-5-sonnet-20240620-v1:0",
    "azure/prod-4o",
]
MAX_TOKENS = 256
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_ARGS = {"location": "Paris"}
OPENAI_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}
ANTHROPIC_TOOL = {
    "name": "get_weather",
    "description": "Current weather of a city",
    "input_schema": {
        "type": "object",
        "properties": {"location": {"type": "string"}},
        "required": ["location"],
    },
}

# embeddings model -> native vector length of the mock (None: not pinned down here)
EMBEDDING_MODELS = {
    "google/text-embedding-004": 768,
    "cohere/embed-v4.0": None,
    "azure/emb-deploy": 1536,
    "text-embedding-3-small": 1536,
}
EMBED_INPUT = ["alpha", "beta", "gamma"]


def split(target: str) -> tuple[str, str]:
    """'provider/model' -> (provider, model); a bare name is served by `openai`."""
    provider, _, model = target.partition("/")
    return (provider, model) if model else ("openai", target)


def ids(targets):
    return [t.split("/")[0] for t in targets]


def strict(obj):
    """The SDKs build response objects without validation (pydantic `construct`): validate
    what was received against the SDK's model, so a wrongly typed field fails here."""
    return type(obj).model_validate(obj.to_dict())


# --------------------------------------------------------------------------- OpenAI SDK helpers


def assert_openai_error(err: openai.APIStatusError, status: int):
    assert err.status_code == status
    body = err.response.json()
    assert set(body) == {"error"}, body
    inner = body["error"]
    assert isinstance(inner.get("message"), str) and inner["message"], inner
    uuid.UUID(err.response.headers["x-modelux-request-id"])
    return inner


def assert_usage(usage) -> None:
    assert usage is not None
    for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert type(getattr(usage, field)) is int, (field, usage)
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage


def assert_completion(completion, finish_reason: str = "stop") -> None:
    assert isinstance(completion, ChatCompletion)
    strict(completion)
    assert completion.object == "chat.completion"
    assert isinstance(completion.id, str) and completion.id
    assert isinstance(completion.created, int)
    assert isinstance(completion.model, str) and completion.model
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.finish_reason == finish_reason
    assert_usage(completion.usage)


def stream_chunks(client, target: str, **kwargs) -> list[ChatCompletionChunk]:
    with client.chat.completions.with_streaming_response.create(
        model=target, stream=True, **kwargs
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-modelux-provider-used"] == split(target)[0]
        uuid.UUID(resp.headers["x-modelux-request-id"])
        chunks = list(resp.parse())
    assert chunks
    for chunk in chunks:
        assert isinstance(chunk, ChatCompletionChunk)
        strict(chunk)
        assert chunk.object == "chat.completion.chunk"
        assert chunk.id
    assert len({c.id for c in chunks}) == 1, "one completion id across the stream"
    return chunks


def streamed_text(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def finish_reasons(chunks) -> list[str]:
    return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


# --------------------------------------------------------------------------- OpenAI SDK: chat


@pytest.mark.parametrize("target", TARGETS, ids=ids(TARGETS))
def test_openai_chat_completion(client, target):
    raw = client.chat.completions.with_raw_response.create(model=target, messages=MESSAGES,
                                                           max_tokens=MAX_TOKENS)
    completion = raw.parse()
    assert_completion(completion)
    assert completion.choices[0].message.content == EXPECTED_CONTENT
    assert not completion.choices[0].message.tool_calls
    provider, model = split(target)
    assert raw.headers["x-modelux-provider-used"] == provider
    assert raw.headers["x-modelux-model-used"] == model
    uuid.UUID(raw.headers["x-modelux-request-id"])


@pytest.mark.parametrize("target", TARGETS, ids=ids(TARGETS))
def test_openai_chat_system_and_multi_turn(client, target):
    completion = client.chat.completions.create(
        model=target,
        messages=[
            {"role": "system", "content": "Be terse."},
            *MESSAGES,
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": [{"type": "text", "text": "Again"}]},
        ],
        max_tokens=MAX_TOKENS,
        temperature=0.2,
    )
    assert_completion(completion)
    assert completion.choices[0].message.content == EXPECTED_CONTENT


@pytest.mark.parametrize("target", TARGETS, ids=ids(TARGETS))
def test_openai_streaming(client, target):
    chunks = stream_chunks(client, target, messages=MESSAGES)
    assert streamed_text(chunks) == EXPECTED_CONTENT
    assert finish_reasons(chunks) == ["stop"]
    assert all(c.usage is None for c in chunks), "no usage chunk unless asked for"
    assert all(c.choices for c in chunks)


@pytest.mark.parametrize("target", TARGETS, ids=ids(TARGETS))
def test_openai_streaming_include_usage(client, target):
    chunks = stream_chunks(client, target, messages=MESSAGES,
                           stream_options={"include_usage": True})
    assert streamed_text(chunks) == EXPECTED_CONTENT
    assert finish_reasons(chunks) == ["stop"]
    last = chunks[-1]
    assert last.choices == []
    assert_usage(last.usage)
    assert all(c.usage is None for c in chunks[:-1]), "exactly one usage chunk, the last"


@pytest.mark.parametrize("target", TARGETS, ids=ids(TARGETS))
def test_openai_completion_ids_are_unique(client, target):
    """Every completion (and every stream, its chunks sharing one) has its own `chatcmpl-…`
    id, generated by the gateway where the provider's answer has none."""
    seen = []
    for _ in range(2):
        seen.append(client.chat.completions.create(model=target, messages=MESSAGES).id)
        seen.append(stream_chunks(client, target, messages=MESSAGES)[0].id)
    for completion_id in seen:
        assert re.fullmatch(r"chatcmpl-[A-Za-z0-9_-]+", completion_id), seen
    assert len(set(seen)) == len(seen), seen


# --------------------------------------------------------------------------- OpenAI SDK: tools


def assert_weather_call(call) -> None:
    assert call.type == "function"
    assert isinstance(call.id, str) and call.id
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == WEATHER_ARGS


@pytest.mark.parametrize("target", TARGETS, ids=ids(TARGETS))
def test_openai_tool_call_and_result_round_trip(client, target):
    first = client.chat.completions.create(model=target, messages=WEATHER_ASK,
                                           tools=[OPENAI_TOOL], max_tokens=MAX_TOKENS)
    assert_completion(first, finish_reason="tool_calls")
    msg = first.choices[0].message
    assert msg.tool_calls and len(msg.tool_calls) == 1, msg
    call = msg.tool_calls[0]
    assert_weather_call(call)

    history = [
        *WEATHER_ASK,
        {
            "role": "assistant",
            "content": msg.content,
            "tool_calls": [{"id": call.id, "type": "function",
                            "function": {"name": call.function.name,
                                         "arguments": call.function.arguments}}],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "18C and sunny"},
    ]
    second = client.chat.completions.create(model=target, messages=history,
                                            tools=[OPENAI_TOOL], max_tokens=MAX_TOKENS)
    assert_completion(second)
    assert second.choices[0].message.content == EXPECTED_CONTENT
    assert not second.choices[0].message.tool_calls


@pytest.mark.parametrize("target", TARGETS, ids=ids(TARGETS))
def test_openai_tool_call_streaming(client, target):
    chunks = stream_chunks(client, target, messages=WEATHER_ASK, tools=[OPENAI_TOOL],
                           max_tokens=MAX_TOKENS)
    calls: dict[int, dict] = {}
    for c in chunks:
        if not c.choices:
            continue
        for tc in c.choices[0].delta.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id:
                assert slot["id"] in (None, tc.id), "a tool call keeps its id"
                slot["id"] = tc.id
            if tc.function and tc.function.name:
                slot["name"] += tc.function.name
            if tc.function and tc.function.arguments:
                slot["arguments"] += tc.function.arguments
    assert list(calls) == [0], calls
    assert calls[0]["id"]
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == WEATHER_ARGS
    assert finish_reasons(chunks) == ["tool_calls"]


# --------------------------------------------------------------------------- OpenAI SDK: errors


@pytest.mark.parametrize("target", TARGETS, ids=ids(TARGETS))
def test_openai_upstream_429_is_rate_limit_error(error_gateway, target):
    c = error_gateway.client()
    for stream in (False, True):
        with pytest.raises(openai.RateLimitError) as ei:
            r = c.chat.completions.create(model=target, messages=MESSAGES, stream=stream)
            list(r) if stream else None
        assert_openai_error(ei.value, 429)
        assert ei.value.response.headers["x-modelux-provider-used"] == split(target)[0]
        if split(target)[0] == "azure":  # the only one of these whose mock sends retry-after
            assert ei.value.response.headers.get("retry-after") == "1"


# --------------------------------------------------------------------------- Anthropic SDK


def text_of(message: Message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def assert_message(message: Message, stop_reason: str = "end_turn") -> None:
    assert isinstance(message, Message)
    Message.model_validate(message.to_dict())
    assert message.type == "message"
    assert message.role == "assistant"
    assert isinstance(message.id, str) and message.id
    assert isinstance(message.model, str) and message.model
    assert message.stop_reason == stop_reason
    assert type(message.usage.input_tokens) is int and message.usage.input_tokens > 0
    assert type(message.usage.output_tokens) is int and message.usage.output_tokens > 0


@pytest.mark.parametrize("target", TARGETS, ids=ids(TARGETS))
def test_anthropic_messages_create(aclient, target):
    raw = aclient.messages.with_raw_response.create(model=target, max_tokens=MAX_TOKENS,
                                                    messages=MESSAGES)
    message = raw.parse()
    assert_message(message)
    assert [type(b) for b in message.content] == [TextBlock]
    assert message.content[0].text == EXPECTED_CONTENT
    provider, model = split(target)
    assert raw.headers["x-modelux-provider-used"] == provider
    assert raw.headers["x-modelux-model-used"] == model
    uuid.UUID(raw.headers["x-modelux-request-id"])


@pytest.mark.parametrize("target", TARGETS, ids=ids(TARGETS))
def test_anthropic_system_and_multi_turn(aclient, target):
    message = aclient.messages.create(
        model=target,
        max_tokens=64,
        system="Be terse.",
        stop_sequences=["never"],
        messages=[*MESSAGES, {"role": "assistant", "content": "Hi."},
                  {"role": "user", "content": [{"type": "text", "text": "Again"}]}],
    )
    assert_message(message)
    assert text_of(message) == EXPECTED_CONTENT


@pytest.mark.parametrize("target", TARGETS, ids=ids(TARGETS))
def test_anthropic_stream_helper(aclient, target):
    with aclient.messages.stream(model=target, max_tokens=MAX_TOKENS, messages=MESSAGES) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == EXPECTED_CONTENT
    assert_message(final)
    assert len(final.content) == 1 and isinstance(final.content[0], TextBlock), final.content
    assert final.content[0].text == EXPECTED_CONTENT


@pytest.mark.parametrize("target", TARGETS, ids=ids(TARGETS))
def test_anthropic_raw_event_stream(aclient, target):
    with aclient.messages.with_streaming_response.create(
        model=target, max_tokens=MAX_TOKENS, messages=MESSAGES, stream=True
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-modelux-provider-used"] == split(target)[0]
        uuid.UUID(resp.headers["x-modelux-request-id"])
        events = list(resp.parse())
    for e in events:
        strict(e)
    types = [e.type for e in events]
    # message_start, one text block (start, deltas, stop), message_delta, message_stop
    n_deltas = types.count("content_block_delta")
    assert n_deltas >= 1, types
    assert types == (["message_start", "content_block_start"]
                     + ["content_block_delta"] * n_deltas
                     + ["content_block_stop", "message_delta", "message_stop"]), types
    start = events[0]
    assert start.message.role == "assistant" and start.message.id
    assert start.message.content == []
    block_start = events[1]
    assert block_start.index == 0 and block_start.content_block.type == "text"
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert all(d.type == "text_delta" for d in deltas)
    assert all(e.index == 0 for e in events if e.type in ("content_block_delta", "content_block_stop"))
    assert "".join(d.text for d in deltas) == EXPECTED_CONTENT
    message_delta = events[-2]
    assert message_delta.delta.stop_reason == "end_turn"
    assert message_delta.usage.output_tokens > 0


@pytest.mark.parametrize("target", TARGETS, ids=ids(TARGETS))
def test_anthropic_message_ids_are_unique(aclient, target):
    """Every message, streamed or not, has its own `msg_…` id, generated by the gateway
    where the provider's answer has none."""
    seen = []
    for _ in range(2):
        seen.append(aclient.messages.create(model=target, max_tokens=MAX_TOKENS,
                                            messages=MESSAGES).id)
        with aclient.messages.stream(model=target, max_tokens=MAX_TOKENS, messages=MESSAGES) as s:
            seen.append(s.get_final_message().id)
    for message_id in seen:
        assert re.fullmatch(r"msg_[A-Za-z0-9_-]+", message_id), seen
    assert len(set(seen)) == len(seen), seen


@pytest.mark.parametrize("target", TARGETS, ids=ids(TARGETS))
def test_anthropic_tool_use_and_result_round_trip(aclient, target):
    first = aclient.messages.create(model=target, max_tokens=MAX_TOKENS, messages=WEATHER_ASK,
                                    tools=[ANTHROPIC_TOOL])
    assert_message(first, stop_reason="tool_use")
    uses = [b for b in first.content if b.type == "tool_use"]
    assert len(uses) == 1, first.content
    use = uses[0]
    assert isinstance(use, ToolUseBlock)
    assert isinstance(use.id, str) and use.id
    assert use.name == "get_weather"
    assert use.input == WEATHER_ARGS
    assert all(isinstance(b, (TextBlock, ToolUseBlock)) for b in first.content)

    history = [
        *WEATHER_ASK,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": use.id, "content": "18C and sunny"},
        ]},
    ]
    second = aclient.messages.create(model=target, max_tokens=MAX_TOKENS, messages=history,
                                     tools=[ANTHROPIC_TOOL])
    assert_message(second)
    assert [type(b) for b in second.content] == [TextBlock]
    assert text_of(second) == EXPECTED_CONTENT


@pytest.mark.parametrize("target", TARGETS, ids=ids(TARGETS))
def test_anthropic_tool_use_stream(aclient, target):
    with aclient.messages.stream(model=target, max_tokens=MAX_TOKENS, messages=WEATHER_ASK,
                                 tools=[ANTHROPIC_TOOL]) as s:
        events = list(s)
        final = s.get_final_message()
    assert_message(final, stop_reason="tool_use")
    uses = [b for b in final.content if b.type == "tool_use"]
    assert len(uses) == 1, final.content
    assert isinstance(uses[0], ToolUseBlock)
    assert uses[0].id and uses[0].name == "get_weather"
    assert uses[0].input == WEATHER_ARGS
    json_deltas = [e.delta.partial_json for e in events
                   if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    assert json.loads("".join(json_deltas)) == WEATHER_ARGS


@pytest.mark.parametrize("target", TARGETS, ids=ids(TARGETS))
def test_anthropic_upstream_429_is_rate_limit_error(error_gateway, target):
    c = error_gateway.anthropic_client()
    with pytest.raises(anthropic.RateLimitError) as ei:
        c.messages.create(model=target, max_tokens=MAX_TOKENS, messages=MESSAGES)
    assert_anthropic_error(ei.value, 429, "rate_limit_error")
    assert ei.value.response.headers["x-modelux-provider-used"] == split(target)[0]
    if split(target)[0] == "azure":
        assert ei.value.response.headers.get("retry-after") == "1"
    with pytest.raises(anthropic.RateLimitError) as ei:
        with c.messages.stream(model=target, max_tokens=MAX_TOKENS, messages=MESSAGES) as s:
            s.get_final_message()
    assert_anthropic_error(ei.value, 429, "rate_limit_error")


# --------------------------------------------------------------------------- embeddings


def assert_embeddings(resp, target: str, n: int, dims: int | None) -> list[list[float]]:
    assert isinstance(resp, CreateEmbeddingResponse)
    strict(resp)
    assert resp.object == "list"
    assert resp.model == split(target)[1]
    assert len(resp.data) == n
    vectors = []
    for i, item in enumerate(resp.data):
        assert item.object == "embedding"
        assert item.index == i
        v = item.embedding
        assert isinstance(v, list), type(v)
        assert v and all(type(x) is float for x in v)
        vectors.append(v)
    lengths = {len(v) for v in vectors}
    assert len(lengths) == 1, lengths
    if dims is not None:
        assert lengths == {dims}
    assert type(resp.usage.prompt_tokens) is int and resp.usage.prompt_tokens >= 0
    assert type(resp.usage.total_tokens) is int
    return vectors


def unit(v: list[float]) -> bool:
    return abs(math.sqrt(sum(x * x for x in v)) - 1.0) < 1e-3


@pytest.mark.parametrize("target", list(EMBEDDING_MODELS), ids=ids(EMBEDDING_MODELS))
def test_embeddings_default_base64(client, target):
    """The SDK asks for base64 when no encoding_format is given and decodes it."""
    raw = client.embeddings.with_raw_response.create(model=target, input=EMBED_INPUT)
    resp = raw.parse()
    assert raw.headers["x-modelux-provider-used"] == split(target)[0]
    vectors = assert_embeddings(resp, target, len(EMBED_INPUT), EMBEDDING_MODELS[target])
    # the mock's vectors are unit length and differ per input: the decoding was right
    assert all(unit(v) for v in vectors), [sum(x * x for x in v) for v in vectors]
    assert len({tuple(v) for v in vectors}) == len(vectors)
    # the same input embeds the same, in any position
    again = client.embeddings.create(model=target, input=EMBED_INPUT[1])
    assert_embeddings(again, target, 1, len(vectors[0]))
    assert again.data[0].embedding == vectors[1]


@pytest.mark.parametrize("target", list(EMBEDDING_MODELS), ids=ids(EMBEDDING_MODELS))
def test_embeddings_dimensions(client, target):
    resp = client.embeddings.create(model=target, input=EMBED_INPUT, dimensions=16)
    vectors = assert_embeddings(resp, target, len(EMBED_INPUT), 16)
    assert all(unit(v) for v in vectors)


@pytest.mark.parametrize("target", list(EMBEDDING_MODELS), ids=ids(EMBEDDING_MODELS))
def test_embeddings_float(client, target):
    as_float = client.embeddings.create(model=target, input=EMBED_INPUT, encoding_format="float")
    floats = assert_embeddings(as_float, target, len(EMBED_INPUT), EMBEDDING_MODELS[target])
    as_b64 = client.embeddings.create(model=target, input=EMBED_INPUT)
    decoded = [d.embedding for d in as_b64.data]
    assert len(decoded[0]) == len(floats[0])
    for f, d in zip(floats, decoded):
        assert max(abs(a - b) for a, b in zip(f, d)) < 1e-6
    small = client.embeddings.create(model=target, input=EMBED_INPUT, encoding_format="float",
                                     dimensions=16)
    assert_embeddings(small, target, len(EMBED_INPUT), 16)
