"""End-to-end tests: the official `openai` Python SDK against the release gateway binary.

Processes, ports and fixtures live in conftest.py. Binaries come from $MODELUX_BIN_DIR
(default: <repo>/target/release); run via tests/sdk/run.sh, which never builds Rust.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
import uuid

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from conftest import (
    CLAUDE_MODEL,
    EXPECTED_CONTENT,
    MESSAGES,
    MODELUX,
    UNSET_VAR,
    RELOAD_TIMEOUT_S,
    WRONG_KEY,
    free_port,
    gateway_config,
    wait_for,
)


# --------------------------------------------------------------------------- helpers


def assert_openai_error(err: openai.APIStatusError, status: int, code: str | None = None):
    assert err.status_code == status
    body = err.response.json()
    assert set(body) == {"error"}, body
    inner = body["error"]
    for field in ("type", "message", "code"):
        assert field in inner, inner
    assert isinstance(inner["message"], str) and inner["message"]
    if code is not None:
        assert inner["code"] == code, inner
        assert err.code == code
    uuid.UUID(err.response.headers["x-modelux-request-id"])
    return inner


def assert_completion(completion) -> None:
    assert isinstance(completion, openai.types.chat.ChatCompletion)
    assert completion.object == "chat.completion"
    assert completion.id
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens > 0


# --------------------------------------------------------------------------- chat completions


@pytest.mark.parametrize("model", ["@fast", "gpt-4o-mini", "openai/gpt-4o-mini"])
def test_chat_completion_models(client, model):
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)
    completion = raw.parse()
    assert_completion(completion)
    uuid.UUID(raw.headers["x-modelux-request-id"])
    assert raw.headers["x-modelux-provider-used"] == "openai"
    assert raw.headers["x-modelux-model-used"] == "gpt-4o-mini"
    if model == "@fast":
        assert raw.headers["x-modelux-routing-config"] == "@fast"
        assert raw.headers["x-modelux-config-version"] == "v1"
    else:
        assert "x-modelux-routing-config" not in raw.headers


def test_request_ids_are_unique(client):
    ids = {
        client.chat.completions.with_raw_response.create(model="@fast", messages=MESSAGES)
        .headers["x-modelux-request-id"]
        for _ in range(3)
    }
    assert len(ids) == 3


def test_local_provider_model(client):
    raw = client.chat.completions.with_raw_response.create(model="local/m1", messages=MESSAGES)
    assert_completion(raw.parse())
    assert raw.headers["x-modelux-provider-used"] == "local"
    assert raw.headers["x-modelux-model-used"] == "m1"


def test_mlx_extensions_accepted(client):
    completion = client.chat.completions.create(
        model="@fast",
        messages=MESSAGES,
        extra_body={"mlx:tags": {"team": "ml"}, "mlx:end_user": "u1"},
    )
    assert_completion(completion)


def test_v1_base_url_behaves_like_openai_v1(gateway):
    c = gateway.client(base_url=gateway.v1_base_url)
    raw = c.chat.completions.with_raw_response.create(model="@fast", messages=MESSAGES)
    assert_completion(raw.parse())
    assert raw.headers["x-modelux-routing-config"] == "@fast"
    assert raw.headers["x-modelux-model-used"] == "gpt-4o-mini"
    ids = {m.id for m in c.models.list()}
    assert "@fast" in ids
    with pytest.raises(openai.AuthenticationError):
        gateway.client(base_url=gateway.v1_base_url, api_key=WRONG_KEY).models.list()


# --------------------------------------------------------------------------- streaming


def test_streaming(client):
    stream = client.chat.completions.create(model="@fast", messages=MESSAGES, stream=True)
    chunks = list(stream)
    assert chunks
    for chunk in chunks:
        assert isinstance(chunk, openai.types.chat.ChatCompletionChunk)
        assert chunk.object == "chat.completion.chunk"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == EXPECTED_CONTENT
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert all(c.usage is None for c in chunks)


def test_streaming_include_usage(client):
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == EXPECTED_CONTENT
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens


def test_streaming_raw_headers(client):
    with client.chat.completions.with_streaming_response.create(
        model="@fast", messages=MESSAGES, stream=True
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        uuid.UUID(resp.headers["x-modelux-request-id"])
        assert resp.headers["x-modelux-routing-config"] == "@fast"
        content = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
    assert content == EXPECTED_CONTENT


# --------------------------------------------------------------------------- models


def test_models_list(client):
    page = client.models.list()
    ids = [m.id for m in page]
    assert "@fast" in ids
    for m in page:
        assert m.object == "model"


# --------------------------------------------------------------------------- errors


def test_wrong_key_is_authentication_error(gateway):
    c = gateway.client(api_key=WRONG_KEY)
    with pytest.raises(openai.AuthenticationError) as ei:
        c.chat.completions.create(model="@fast", messages=MESSAGES)
    assert_openai_error(ei.value, 401, "invalid_api_key")


def test_unknown_bare_model_is_bad_request(client):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="llama-3", messages=MESSAGES)
    inner = assert_openai_error(ei.value, 400)
    assert "Recognized prefixes" in inner["message"]


def test_unknown_routing_config_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="@nope", messages=MESSAGES)
    assert_openai_error(ei.value, 404, "routing_config_not_found")


def test_upstream_429_is_rate_limit_error(error_gateway):
    c = error_gateway.client()
    with pytest.raises(openai.RateLimitError) as ei:
        c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert_openai_error(ei.value, 429)


def test_upstream_429_passes_retry_after_and_upstream_error(error_gateway):
    c = error_gateway.client()
    with pytest.raises(openai.RateLimitError) as ei:
        c.chat.completions.create(model="@fast", messages=MESSAGES)
    assert ei.value.response.headers.get("retry-after") == "1"
    assert ei.value.code == "rate_limit_exceeded"
    assert ei.value.response.headers["x-modelux-provider-used"] == "openai"


def test_upstream_429_streaming_is_rate_limit_error(error_gateway):
    c = error_gateway.client()
    with pytest.raises(openai.RateLimitError) as ei:
        list(c.chat.completions.create(model="@fast", messages=MESSAGES, stream=True))
    assert_openai_error(ei.value, 429)


def test_upstream_500_is_502_internal_server_error(error_gateway):
    # The SDK maps every status >= 500 (including 502) to InternalServerError.
    c = error_gateway.client()
    with pytest.raises(openai.APIStatusError) as ei:
        c.chat.completions.create(model="local/m1", messages=MESSAGES)
    assert type(ei.value) is openai.InternalServerError
    assert_openai_error(ei.value, 502, "upstream_error")


# --------------------------------------------------------------------------- hot reload


def fast_headers(c: OpenAI) -> tuple[str, str]:
    raw = c.chat.completions.with_raw_response.create(model="@fast", messages=MESSAGES)
    raw.parse()
    return raw.headers["x-modelux-model-used"], raw.headers["x-modelux-config-version"]


def test_sighup_reload(reload_gateway):
    gw = reload_gateway
    c = gw.client()
    assert fast_headers(c) == ("gpt-4o-mini", "v1")

    # watch_config is false: editing the file alone changes nothing.
    gw.write_config(fast_model="local/m1")
    time.sleep(1.5)  # three file-poll intervals of the watcher, were it on
    assert fast_headers(c) == ("gpt-4o-mini", "v1")

    os.kill(gw.pid, signal.SIGHUP)
    wait_for(lambda: ((h := fast_headers(c)) == ("m1", "v2"), h), RELOAD_TIMEOUT_S,
             "@fast to switch to m1 / v2")
    gw.proc.check_alive()

    # An invalid file is rejected on SIGHUP; the previous config keeps serving.
    errors_before = gw.metric("modelux_config_reloads_total", '{result="error"}')
    gw.config_path.write_text("server: [this is not\n  valid: {yaml\n")
    os.kill(gw.pid, signal.SIGHUP)
    wait_for(
        lambda: ((n := gw.metric("modelux_config_reloads_total", '{result="error"}')) > errors_before, n),
        RELOAD_TIMEOUT_S,
        "the rejected reload to be counted",
    )
    gw.proc.check_alive()
    for _ in range(3):
        assert fast_headers(c) == ("m1", "v2")
    assert_completion(c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES))


# --------------------------------------------------------------------------- modelux check


def test_check_reports_every_error_with_path(workdir, mock_url):
    text = gateway_config(free_port(), free_port(), mock_url, mock_url)
    text = text.replace('api_key: "sk-upstream"', f'api_key: "${{{UNSET_VAR}}}"')
    text = text.replace("  threads: 2\n", "  threads: 2\n  bogus_option: true\n")
    assert "bogus_option" in text and UNSET_VAR in text
    path = workdir / "check-bad.yaml"
    path.write_text(text)
    env = {k: v for k, v in os.environ.items() if k != UNSET_VAR}
    r = subprocess.run([str(MODELUX), "check", "--config", str(path)], capture_output=True,
                       text=True, env=env, timeout=30)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    unknown = [ln for ln in lines if "bogus_option" in ln]
    missing = [ln for ln in lines if UNSET_VAR in ln]
    assert unknown, r.stderr
    assert missing, r.stderr
    assert re.match(r"^server\.bogus_option: ", unknown[0]), unknown
    assert re.match(r"^providers\[0\]\.api_key: ", missing[0]), missing


def test_check_accepts_valid_config(workdir, mock_url):
    path = workdir / "check-good.yaml"
    path.write_text(gateway_config(free_port(), free_port(), mock_url, mock_url))
    r = subprocess.run([str(MODELUX), "check", "--config", str(path)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, (r.stdout, r.stderr)


def test_missing_key_is_authentication_error(gateway):
    c = gateway.client()
    with pytest.raises(openai.AuthenticationError) as ei:
        c.chat.completions.create(model="@fast", messages=MESSAGES,
                                  extra_headers={"Authorization": ""})
    assert_openai_error(ei.value, 401, "invalid_api_key")


def test_upstream_timeout_is_504(slow_gateway):
    c = slow_gateway.client()
    for stream in (False, True):
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as ei:
            r = c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=stream)
            list(r) if stream else None
        elapsed = time.monotonic() - started
        assert type(ei.value) is openai.InternalServerError
        assert_openai_error(ei.value, 504, "upstream_timeout")
        assert elapsed < 3.0, f"timeout of 500 ms took {elapsed:.2f}s to surface (stream={stream})"


def test_streaming_is_not_buffered(slow_gateway):
    """Chunks paced 100 ms apart upstream must reach the client paced, not all at the end."""
    c = slow_gateway.client()
    started = time.monotonic()
    arrivals = []
    for chunk in c.chat.completions.create(model="local/m1", messages=MESSAGES, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append((time.monotonic() - started, chunk.choices[0].delta.content))
    assert "".join(t for _, t in arrivals) == "".join(f" tok{i}" for i in range(6))
    spread = arrivals[-1][0] - arrivals[0][0]
    assert spread >= 0.3, f"content chunks arrived within {spread:.3f}s: {arrivals}"


def test_early_closed_stream_then_reuse(client):
    stream = client.chat.completions.create(model="@fast", messages=MESSAGES, stream=True)
    next(iter(stream))
    stream.close()
    for _ in range(3):
        assert_completion(client.chat.completions.create(model="@fast", messages=MESSAGES))
    content = "".join(c.choices[0].delta.content or ""
                      for c in client.chat.completions.create(model="@fast", messages=MESSAGES,
                                                              stream=True) if c.choices)
    assert content == EXPECTED_CONTENT


def test_concurrent_async_requests(gateway):
    """Many concurrent requests through one AsyncOpenAI client, mixed providers and modes:
    every response must carry its own provider/model headers and full content."""

    async def one(c: AsyncOpenAI, i: int):
        model = ("@fast", "local/m1", "openai/gpt-4o-mini")[i % 3]
        expected_model = "m1" if model == "local/m1" else "gpt-4o-mini"
        if i % 2:
            async with c.chat.completions.with_streaming_response.create(
                model=model, messages=MESSAGES, stream=True
            ) as resp:
                parts = [ch.choices[0].delta.content or "" async for ch in await resp.parse()
                         if ch.choices]
                headers = resp.headers
            content = "".join(parts)
        else:
            raw = await c.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)
            content = raw.parse().choices[0].message.content
            headers = raw.headers
        return headers["x-modelux-model-used"], expected_model, content, headers["x-modelux-request-id"]

    async def main():
        async with gateway.async_client() as c:
            return await asyncio.wait_for(asyncio.gather(*(one(c, i) for i in range(48))), 30)

    results = asyncio.run(main())
    for used, expected, content, _ in results:
        assert used == expected
        assert content == EXPECTED_CONTENT
    assert len({r[3] for r in results}) == len(results)


# --------------------------------------------------------------------------- Anthropic provider
# The OpenAI SDK against `kind: anthropic` (the gateway translates Chat Completions <->
# Messages). The mock answers Messages with the same " tok0 … tok15" text.

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look something up",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}},
            "required": ["query"],
        },
    },
}


@pytest.mark.parametrize("model", [CLAUDE_MODEL, "@claude", f"anthropic/{CLAUDE_MODEL}"])
def test_anthropic_provider_completion(client, model):
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)
    completion = raw.parse()
    assert_completion(completion)
    assert completion.choices[0].message.content == EXPECTED_CONTENT
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.completion_tokens > 0
    assert raw.headers["x-modelux-provider-used"] == "anthropic"
    assert raw.headers["x-modelux-model-used"] == CLAUDE_MODEL
    uuid.UUID(raw.headers["x-modelux-request-id"])


def test_anthropic_provider_system_and_params(client):
    completion = client.chat.completions.create(
        model=CLAUDE_MODEL,
        messages=[{"role": "system", "content": "Be terse."}, *MESSAGES],
        max_tokens=64,
        temperature=0.2,
        stop=["never"],
    )
    assert_completion(completion)
    assert completion.choices[0].message.content == EXPECTED_CONTENT


def test_anthropic_provider_streaming(client):
    with client.chat.completions.with_streaming_response.create(
        model=CLAUDE_MODEL, messages=MESSAGES, stream=True
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-modelux-provider-used"] == "anthropic"
        chunks = list(resp.parse())
    assert chunks
    for chunk in chunks:
        assert isinstance(chunk, openai.types.chat.ChatCompletionChunk)
        assert chunk.object == "chat.completion.chunk"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == EXPECTED_CONTENT
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert all(c.usage is None for c in chunks)


def test_anthropic_provider_streaming_include_usage(client):
    stream = client.chat.completions.create(
        model=CLAUDE_MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == EXPECTED_CONTENT
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens > 0
    assert last.usage.completion_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_anthropic_provider_tools(client):
    completion = client.chat.completions.create(
        model=CLAUDE_MODEL, messages=MESSAGES, tools=[WEATHER_TOOL]
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls and len(calls) == 1
    call = calls[0]
    assert call.type == "function"
    assert call.id
    assert call.function.name == "lookup"
    assert json.loads(call.function.arguments) == {"query": "mock"}
    assert choice.message.content == "Let me check."


def test_anthropic_provider_tools_streaming(client):
    chunks = list(client.chat.completions.create(
        model=CLAUDE_MODEL, messages=MESSAGES, tools=[WEATHER_TOOL], stream=True
    ))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "Let me check."
    calls: dict[int, dict] = {}
    for c in chunks:
        if not c.choices:
            continue
        for tc in c.choices[0].delta.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id:
                slot["id"] = tc.id
            if tc.function and tc.function.name:
                slot["name"] += tc.function.name
            if tc.function and tc.function.arguments:
                slot["arguments"] += tc.function.arguments
    assert list(calls) == [0], calls
    assert calls[0]["id"]
    assert calls[0]["name"] == "lookup"
    assert json.loads(calls[0]["arguments"]) == {"query": "mock"}
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["tool_calls"]


def test_anthropic_provider_tool_result_round_trip(client):
    """The assistant's tool call and the tool's answer, sent back, must translate to
    tool_use / tool_result blocks the (mock) Anthropic upstream accepts."""
    first = client.chat.completions.create(
        model=CLAUDE_MODEL, messages=MESSAGES, tools=[WEATHER_TOOL]
    )
    msg = first.choices[0].message
    call = msg.tool_calls[0]
    history = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": msg.content,
            "tool_calls": [{"id": call.id, "type": "function",
                            "function": {"name": call.function.name,
                                         "arguments": call.function.arguments}}],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    second = client.chat.completions.create(model=CLAUDE_MODEL, messages=history)
    assert_completion(second)
    assert second.choices[0].message.content == EXPECTED_CONTENT


def test_anthropic_provider_upstream_429_is_rate_limit_error(error_gateway):
    c = error_gateway.client()
    for stream in (False, True):
        with pytest.raises(openai.RateLimitError) as ei:
            r = c.chat.completions.create(model=CLAUDE_MODEL, messages=MESSAGES, stream=stream)
            list(r) if stream else None
        assert_openai_error(ei.value, 429)
        assert ei.value.response.headers["x-modelux-provider-used"] == "anthropic"


# --------------------------------------------------------------------------- decision traces


def test_decision_trace_in_body_and_stream(client):
    completion = client.chat.completions.create(
        model="@fast", messages=MESSAGES, extra_body={"mlx:trace": True})
    assert_completion(completion)
    trace = completion.model_extra["mlx:trace"]
    assert trace["routing_config"] == "@fast" and trace["strategy"] == "single"
    assert trace["attempts"][0]["status"] == "success"
    assert trace["decision"]["winner_attempt"] == 1

    # Streams carry it in a choice-less chunk before [DONE]; the SDK parses every chunk.
    chunks = list(client.chat.completions.create(
        model="@fast", messages=MESSAGES, stream=True, extra_body={"mlx:trace": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    last = chunks[-1]
    assert last.choices == [] and last.model_extra["mlx:trace"]["strategy"] == "single"


def test_dry_run_header_calls_no_upstream(client):
    raw = client.chat.completions.with_raw_response.create(
        model="@fast", messages=MESSAGES, extra_headers={"X-Modelux-Dry-Run": "true"})
    body = raw.http_response.json()
    assert body["object"] == "modelux.dry_run"
    assert body["selected"] == {"provider": "openai", "model": "gpt-4o-mini"}
