"""End-to-end tests: the official `anthropic` Python SDK against the release gateway binary.

Targets: `claude-*` models go to the `anthropic` provider (Messages passthrough to the
mock's Anthropic surface); `gpt-4o-mini` / `@fast` go to the `openai` provider, the gateway
translating Messages <-> Chat Completions. Processes, ports and fixtures live in conftest.py.
"""

from __future__ import annotations

import asyncio
import uuid

import anthropic
import pytest
from anthropic import AsyncAnthropic
from anthropic.types import Message

from conftest import (
    CLAUDE_MODEL,
    DEV_KEY,
    EXPECTED_CONTENT,
    MESSAGES,
    WRONG_KEY,
    assert_anthropic_error,
)

# The SDK warns on every response naming a model it knows to be deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")

MAX_TOKENS = 256
TOOL = {
    "name": "lookup",
    "description": "Look something up",
    "input_schema": {
        "type": "object",
        "properties": {"query": {"type": "string"}},
        "required": ["query"],
    },
}

# model -> (x-modelux-provider-used, x-modelux-model-used)
TARGETS = {
    CLAUDE_MODEL: ("anthropic", CLAUDE_MODEL),
    "@claude": ("anthropic", CLAUDE_MODEL),
    f"anthropic/{CLAUDE_MODEL}": ("anthropic", CLAUDE_MODEL),
    "gpt-4o-mini": ("openai", "gpt-4o-mini"),
    "@fast": ("openai", "gpt-4o-mini"),
}
BOTH = [CLAUDE_MODEL, "gpt-4o-mini"]


def text_of(message: Message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def assert_message(message: Message, stop_reason: str = "end_turn") -> None:
    assert isinstance(message, Message)
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.id
    assert isinstance(message.model, str) and message.model
    assert message.stop_reason == stop_reason
    assert message.usage.input_tokens > 0
    assert message.usage.output_tokens > 0


# --------------------------------------------------------------------------- messages


@pytest.mark.parametrize("model", list(TARGETS))
def test_messages_create(aclient, model):
    raw = aclient.messages.with_raw_response.create(model=model, max_tokens=MAX_TOKENS,
                                                    messages=MESSAGES)
    message = raw.parse()
    assert_message(message)
    assert [b.type for b in message.content] == ["text"]
    assert text_of(message) == EXPECTED_CONTENT
    provider, model_used = TARGETS[model]
    assert raw.headers["x-modelux-provider-used"] == provider
    assert raw.headers["x-modelux-model-used"] == model_used
    uuid.UUID(raw.headers["x-modelux-request-id"])
    if model.startswith("@"):
        assert raw.headers["x-modelux-routing-config"] == model


@pytest.mark.parametrize("model", BOTH)
def test_messages_system_and_params(aclient, model):
    message = aclient.messages.create(
        model=model,
        max_tokens=64,
        system="Be terse.",
        stop_sequences=["never"],
        # anthropic 2.x dropped `temperature` from the typed signature; the API still takes it.
        extra_body={"temperature": 0.2},
        metadata={"user_id": "u1"},
        messages=[*MESSAGES, {"role": "assistant", "content": "Hi."},
                  {"role": "user", "content": [{"type": "text", "text": "Again"}]}],
    )
    assert_message(message)
    assert text_of(message) == EXPECTED_CONTENT


@pytest.mark.parametrize("model", BOTH)
def test_messages_v1_base_url(gateway, model):
    """base_url without /anthropic: the SDK calls /v1/messages, which the gateway serves
    as the Anthropic surface."""
    c = gateway.anthropic_client(base_url=gateway.root_url)
    raw = c.messages.with_raw_response.create(model=model, max_tokens=MAX_TOKENS, messages=MESSAGES)
    message = raw.parse()
    assert_message(message)
    assert text_of(message) == EXPECTED_CONTENT
    assert raw.headers["x-modelux-provider-used"] == TARGETS[model][0]
    with c.messages.stream(model=model, max_tokens=MAX_TOKENS, messages=MESSAGES) as s:
        assert "".join(s.text_stream) == EXPECTED_CONTENT
    assert c.messages.count_tokens(model=model, messages=MESSAGES).input_tokens > 0
    with pytest.raises(anthropic.AuthenticationError) as ei:
        gateway.anthropic_client(base_url=gateway.root_url, api_key=WRONG_KEY).messages.create(
            model=model, max_tokens=MAX_TOKENS, messages=MESSAGES)
    assert_anthropic_error(ei.value, 401, "authentication_error")


# --------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("model", BOTH + ["@fast", "@claude"])
def test_messages_stream_helper(aclient, model):
    with aclient.messages.stream(model=model, max_tokens=MAX_TOKENS, messages=MESSAGES) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == EXPECTED_CONTENT
    assert_message(final)
    assert text_of(final) == EXPECTED_CONTENT


@pytest.mark.parametrize("model", BOTH)
def test_messages_raw_event_stream(aclient, model):
    with aclient.messages.with_streaming_response.create(
        model=model, max_tokens=MAX_TOKENS, messages=MESSAGES, stream=True
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-modelux-provider-used"] == TARGETS[model][0]
        uuid.UUID(resp.headers["x-modelux-request-id"])
        events = list(resp.parse())
    types = [e.type for e in events]
    assert types[0] == "message_start"
    assert types[-1] == "message_stop"
    assert types.count("message_delta") == 1
    assert "content_block_start" in types and "content_block_stop" in types
    deltas = [e.delta.text for e in events
              if e.type == "content_block_delta" and e.delta.type == "text_delta"]
    assert "".join(deltas) == EXPECTED_CONTENT
    message_delta = next(e for e in events if e.type == "message_delta")
    assert message_delta.delta.stop_reason == "end_turn"
    assert message_delta.usage.output_tokens > 0


def test_stream_early_close_then_reuse(aclient):
    for model in BOTH:
        with aclient.messages.stream(model=model, max_tokens=MAX_TOKENS, messages=MESSAGES) as s:
            next(iter(s.text_stream))
    for model in BOTH:
        assert text_of(aclient.messages.create(model=model, max_tokens=MAX_TOKENS,
                                               messages=MESSAGES)) == EXPECTED_CONTENT


# --------------------------------------------------------------------------- tools


def test_tools_passthrough(aclient):
    message = aclient.messages.create(model=CLAUDE_MODEL, max_tokens=MAX_TOKENS,
                                      messages=MESSAGES, tools=[TOOL])
    assert_message(message, stop_reason="tool_use")
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[0].text == "Let me check."
    use = message.content[1]
    assert use.id
    assert use.name == "lookup"
    assert use.input == {"query": "mock"}


def test_tools_passthrough_stream(aclient):
    with aclient.messages.stream(model=CLAUDE_MODEL, max_tokens=MAX_TOKENS,
                                 messages=MESSAGES, tools=[TOOL]) as s:
        final = s.get_final_message()
    assert_message(final, stop_reason="tool_use")
    use = next(b for b in final.content if b.type == "tool_use")
    assert use.name == "lookup"
    assert use.input == {"query": "mock"}


def test_tools_translated_parses(aclient):
    """The OpenAI mock ignores tools and answers text: the translated reply must still be a
    well-formed Message."""
    message = aclient.messages.create(model="gpt-4o-mini", max_tokens=MAX_TOKENS,
                                      messages=MESSAGES, tools=[TOOL],
                                      tool_choice={"type": "auto"})
    assert_message(message)
    assert text_of(message) == EXPECTED_CONTENT
    with aclient.messages.stream(model="gpt-4o-mini", max_tokens=MAX_TOKENS,
                                 messages=MESSAGES, tools=[TOOL]) as s:
        assert text_of(s.get_final_message()) == EXPECTED_CONTENT


@pytest.mark.parametrize("model", BOTH)
def test_tool_result_round_trip(aclient, model):
    """tool_use / tool_result history is accepted by both targets (translated to
    assistant tool_calls + role tool for the OpenAI provider)."""
    history = [
        *MESSAGES,
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_01", "name": "lookup", "input": {"query": "mock"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": "sunny"},
        ]},
    ]
    message = aclient.messages.create(model=model, max_tokens=MAX_TOKENS, messages=history,
                                      tools=[TOOL])
    assert message.type == "message"
    assert message.stop_reason in ("end_turn", "tool_use")


# --------------------------------------------------------------------------- thinking


def test_thinking_passthrough(aclient):
    thinking = {"type": "enabled", "budget_tokens": 1024}
    message = aclient.messages.create(model=CLAUDE_MODEL, max_tokens=2048, messages=MESSAGES,
                                      thinking=thinking)
    assert_message(message)
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking
    assert message.content[0].signature
    assert text_of(message) == EXPECTED_CONTENT
    with aclient.messages.stream(model=CLAUDE_MODEL, max_tokens=2048, messages=MESSAGES,
                                 thinking=thinking) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == message.content[0].thinking
    assert final.content[0].signature  # the mock numbers signatures per request
    assert text_of(final) == EXPECTED_CONTENT


# --------------------------------------------------------------------------- count_tokens / models


@pytest.mark.parametrize("model", BOTH + ["@claude", "@fast"])
def test_count_tokens(aclient, model):
    raw = aclient.messages.with_raw_response.count_tokens(model=model, messages=MESSAGES,
                                                          system="Be terse.", tools=[TOOL])
    result = raw.parse()
    assert result.input_tokens > 0
    assert raw.headers["x-modelux-provider-used"] == TARGETS[model][0]


def test_models_list(aclient):
    page = aclient.models.list()
    models = list(page)
    ids = [m.id for m in models]
    assert "@fast" in ids and "@claude" in ids
    assert "local/m1" in ids
    for m in models:
        assert m.type == "model"
        assert m.display_name


# --------------------------------------------------------------------------- errors


def test_wrong_key_is_authentication_error(gateway):
    c = gateway.anthropic_client(api_key=WRONG_KEY)
    for model in BOTH:
        with pytest.raises(anthropic.AuthenticationError) as ei:
            c.messages.create(model=model, max_tokens=MAX_TOKENS, messages=MESSAGES)
        assert_anthropic_error(ei.value, 401, "authentication_error")
    with pytest.raises(anthropic.AuthenticationError):
        c.models.list()
    with pytest.raises(anthropic.AuthenticationError):
        c.messages.count_tokens(model=CLAUDE_MODEL, messages=MESSAGES)


def test_bearer_token_is_accepted(gateway):
    """Authorization: Bearer works on the Anthropic surface too (auth_token in the SDK)."""
    c = anthropic.Anthropic(base_url=gateway.anthropic_base_url, auth_token=DEV_KEY,
                            max_retries=0, timeout=10.0)
    message = c.messages.create(model=CLAUDE_MODEL, max_tokens=MAX_TOKENS, messages=MESSAGES)
    assert text_of(message) == EXPECTED_CONTENT


def test_unknown_bare_model_is_bad_request(aclient):
    with pytest.raises(anthropic.BadRequestError) as ei:
        aclient.messages.create(model="llama-3", max_tokens=MAX_TOKENS, messages=MESSAGES)
    inner = assert_anthropic_error(ei.value, 400, "invalid_request_error")
    assert "Recognized prefixes" in inner["message"]
    with pytest.raises(anthropic.BadRequestError):
        aclient.messages.count_tokens(model="llama-3", messages=MESSAGES)


def test_unknown_routing_config_is_not_found(aclient):
    with pytest.raises(anthropic.NotFoundError) as ei:
        aclient.messages.create(model="@nope", max_tokens=MAX_TOKENS, messages=MESSAGES)
    assert_anthropic_error(ei.value, 404, "not_found_error")


@pytest.mark.parametrize("model", BOTH)
def test_upstream_429_is_rate_limit_error(error_gateway, model):
    c = error_gateway.anthropic_client()
    with pytest.raises(anthropic.RateLimitError) as ei:
        c.messages.create(model=model, max_tokens=MAX_TOKENS, messages=MESSAGES)
    assert_anthropic_error(ei.value, 429, "rate_limit_error")
    assert ei.value.response.headers["x-modelux-provider-used"] == TARGETS[model][0]
    with pytest.raises(anthropic.RateLimitError) as ei:
        with c.messages.stream(model=model, max_tokens=MAX_TOKENS, messages=MESSAGES) as s:
            s.get_final_message()
    assert_anthropic_error(ei.value, 429, "rate_limit_error")


def test_upstream_429_count_tokens_passthrough(error_gateway):
    c = error_gateway.anthropic_client()
    with pytest.raises(anthropic.RateLimitError) as ei:
        c.messages.count_tokens(model=CLAUDE_MODEL, messages=MESSAGES)
    assert_anthropic_error(ei.value, 429, "rate_limit_error")


# --------------------------------------------------------------------------- concurrency


def test_concurrent_async_requests(gateway):
    """Concurrent requests through one AsyncAnthropic client, mixed targets and modes."""

    async def one(c: AsyncAnthropic, i: int):
        model = (CLAUDE_MODEL, "@fast", "@claude", "gpt-4o-mini")[i % 4]
        if i % 2:
            async with c.messages.stream(model=model, max_tokens=MAX_TOKENS,
                                         messages=MESSAGES) as s:
                text = "".join([t async for t in s.text_stream])
            return model, text, None
        raw = await c.messages.with_raw_response.create(model=model, max_tokens=MAX_TOKENS,
                                                        messages=MESSAGES)
        return model, text_of(await raw.parse()), raw.headers["x-modelux-provider-used"]

    async def main():
        async with gateway.async_anthropic_client() as c:
            return await asyncio.wait_for(asyncio.gather(*(one(c, i) for i in range(32))), 30)

    for model, text, provider in asyncio.run(main()):
        assert text == EXPECTED_CONTENT
        if provider is not None:
            assert provider == TARGETS[model][0]


def test_decision_trace_on_message_stop(aclient):
    # The raw event stream: the stream() helper rebuilds message_stop from its own state.
    events = list(aclient.messages.create(model="@claude", max_tokens=64, stream=True,
                                          messages=[{"role": "user", "content": "hi"}],
                                          extra_body={"mlx:trace": True}))
    assert [e.type for e in events][0] == "message_start"
    assert any(e.type == "content_block_delta" for e in events)
    stop = events[-1]
    assert stop.type == "message_stop"
    assert stop.model_extra["mlx:trace"]["routing_config"] == "@claude"
    assert stop.model_extra["mlx:trace"]["attempts"][0]["status"] == "success"
