"""Spend control through the official SDKs: the `modelux` SDK (PyPI 0.1.0) raising
BudgetExceededError from the 402 and reading the budget headers, downgrades visible in
X-Modelux-Model-Used, soft-limit warnings, cost headers, and per-key rate limits as the
openai and anthropic SDKs see them.

Every test has budgets of its own (tag-scoped), so they share one gateway in any order.
"""

from __future__ import annotations

import asyncio
import calendar
import time

import anthropic
import openai
import pytest
from modelux import AsyncModelux, BudgetExceededError, Modelux

from conftest import DEV_KEY, LIMITED_KEY, MESSAGES, Gateway

# local/m1 costs a cent per token: a request to @cheap costs about $0.30.
SPEND_YAML = """\
prices:
  m1: { input_per_mtok: 10000, output_per_mtok: 10000 }
budgets:
  - { name: block-sync, scope: tag, tag: "suite=block-sync", period: daily, cap_usd: 0.2, action: block }
  - { name: block-async, scope: tag, tag: "suite=block-async", period: weekly, cap_usd: 0.2, action: block }
  - { name: block-stream, scope: tag, tag: "suite=block-stream", period: monthly, cap_usd: 0.2, action: block }
  - { name: block-anthropic, scope: tag, tag: "suite=block-anthropic", period: daily, cap_usd: 0.2, action: block }
  - { name: downgrade, scope: tag, tag: "suite=downgrade", period: daily, cap_usd: 0.2, action: downgrade, downgrade_to: "gpt-4o-mini" }
  - { name: soft, scope: tag, tag: "suite=soft", period: daily, cap_usd: 5, soft_limit_pct: 10, action: warn_only }
"""


@pytest.fixture(scope="module")
def spend_gateway(workdir, mock_url):
    gw = Gateway(workdir, "gateway-spend", mock_url, mock_url, extra_yaml=SPEND_YAML)
    yield gw
    gw.stop()


def seconds_until(iso: str) -> float:
    return calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ")) - time.time()


def test_modelux_sdk_raises_budget_exceeded_with_the_budget_and_retry_after(spend_gateway):
    mlx = Modelux(api_key=DEV_KEY, base_url=spend_gateway.base_url, max_retries=0)
    first = mlx.chat.completions.create(model="@cheap", messages=MESSAGES, max_tokens=16,
                                        tags={"suite": "block-sync"})
    assert first.modelux.budget_name == "block-sync"
    assert first.modelux.budget_remaining == 0.0  # the first answer already went past the cap
    assert first.modelux.model_used == "m1"
    with pytest.raises(BudgetExceededError) as ei:
        mlx.chat.completions.create(model="@cheap", messages=MESSAGES, max_tokens=16,
                                    tags={"suite": "block-sync"})
    e = ei.value
    assert e.status == 402
    assert e.code == "budget_exceeded"
    assert e.budget.name == "block-sync"
    assert e.budget.cap_usd == 0.2
    assert e.budget.spend_usd > 0.2
    assert e.budget.period == "daily"
    assert e.budget.period_resets_at.endswith("T00:00:00Z")
    assert str(e) == f'budget "block-sync" exceeded (${e.budget.spend_usd:.2f} / $0.20)'
    assert isinstance(e.retry_after, int)
    assert abs(e.retry_after - seconds_until(e.budget.period_resets_at)) <= 2
    assert 0 < e.retry_after <= 86400
    # Another tag's traffic is not affected.
    other = mlx.chat.completions.create(model="@cheap", messages=MESSAGES, max_tokens=16,
                                        tags={"suite": "unbudgeted"})
    assert other.modelux.budget_name is None


def test_async_and_streaming_requests_are_blocked_the_same_way(spend_gateway):
    async def run():
        mlx = AsyncModelux(api_key=DEV_KEY, base_url=spend_gateway.base_url, max_retries=0)
        await mlx.chat.completions.create(model="@cheap", messages=MESSAGES, max_tokens=16,
                                          tags={"suite": "block-async"})
        with pytest.raises(BudgetExceededError) as ei:
            await mlx.chat.completions.create(model="@cheap", messages=MESSAGES, max_tokens=16,
                                              tags={"suite": "block-async"})
        await mlx.close()
        return ei.value

    e = asyncio.run(run())
    assert e.budget.name == "block-async" and e.budget.period == "weekly"
    assert abs(e.retry_after - seconds_until(e.budget.period_resets_at)) <= 2

    mlx = Modelux(api_key=DEV_KEY, base_url=spend_gateway.base_url, max_retries=0)
    stream = mlx.chat.completions.create(model="@cheap", messages=MESSAGES, max_tokens=16, stream=True,
                                         tags={"suite": "block-stream"})
    assert stream.modelux.budget_name == "block-stream"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    with pytest.raises(BudgetExceededError) as ei:
        mlx.chat.completions.create(model="@cheap", messages=MESSAGES, max_tokens=16, stream=True,
                                    tags={"suite": "block-stream"})
    assert ei.value.budget.period == "monthly"
    assert ei.value.budget.period_resets_at.endswith("-01T00:00:00Z")


def test_downgrade_is_visible_in_model_used(spend_gateway):
    mlx = Modelux(api_key=DEV_KEY, base_url=spend_gateway.base_url, max_retries=0)
    tags = {"suite": "downgrade"}
    first = mlx.chat.completions.create(model="@cheap", messages=MESSAGES, max_tokens=16, tags=tags)
    assert first.modelux.model_used == "m1"
    assert first.modelux.budget_action is None
    second = mlx.chat.completions.create(model="@cheap", messages=MESSAGES, max_tokens=16, tags=tags)
    assert second.modelux.model_used == "gpt-4o-mini"
    assert second.modelux.provider_used == "openai"
    assert second.modelux.budget_action == "downgrade"
    assert second.modelux.budget_name == "downgrade"
    assert second.modelux.budget_reset and second.modelux.budget_reset.endswith("T00:00:00Z")
    assert second.choices[0].message.content


def test_soft_limit_warns_in_the_headers(spend_gateway):
    mlx = Modelux(api_key=DEV_KEY, base_url=spend_gateway.base_url, max_retries=0)
    tags = {"suite": "soft"}
    first = mlx.chat.completions.create(model="@cheap", messages=MESSAGES, max_tokens=16, tags=tags)
    assert first.modelux.budget_name == "soft"
    assert first.modelux.budget_action is None
    remaining_after_first = first.modelux.budget_remaining
    assert 4.0 < remaining_after_first < 5.0
    # 10 % of $5 is crossed after two answers.
    second = mlx.chat.completions.create(model="@cheap", messages=MESSAGES, max_tokens=16, tags=tags)
    third = mlx.chat.completions.create(model="@cheap", messages=MESSAGES, max_tokens=16, tags=tags)
    assert second.modelux.budget_action is None
    assert third.modelux.budget_action == "warn_only"
    assert third.modelux.budget_reset is None  # a warning enforces nothing
    assert third.modelux.budget_remaining < remaining_after_first


def test_cost_header_matches_usage_and_stream_usage_stays_as_asked(spend_gateway):
    c = spend_gateway.client()
    raw = c.chat.completions.with_raw_response.create(model="@cheap", messages=MESSAGES, max_tokens=16)
    completion = raw.parse()
    tokens = completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert float(raw.headers["x-modelux-cost-usd"]) == pytest.approx(tokens * 0.01, abs=1e-9)
    # The gateway asks for usage to price a stream; a client that did not ask sees none.
    chunks = list(c.chat.completions.create(model="@cheap", messages=MESSAGES, stream=True))
    assert all(ch.usage is None for ch in chunks)
    assert all(ch.choices for ch in chunks)
    chunks = list(c.chat.completions.create(model="@cheap", messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 16 and not chunks[-1].choices


def test_anthropic_sdk_sees_the_402_in_its_envelope(spend_gateway):
    a = spend_gateway.anthropic_client()
    headers = {"X-Modelux-User-Tags": "suite=block-anthropic"}
    a.messages.create(model="@cheap", max_tokens=16, messages=MESSAGES, extra_headers=headers)
    with pytest.raises(anthropic.APIStatusError) as ei:
        a.messages.create(model="@cheap", max_tokens=16, messages=MESSAGES, extra_headers=headers)
    e = ei.value
    assert e.status_code == 402
    assert e.body["type"] == "error"
    assert e.body["error"]["type"] == "budget_exceeded"
    assert e.body["error"]["budget"]["name"] == "block-anthropic"
    assert int(e.response.headers["retry-after"]) > 0
    assert e.response.headers["x-modelux-budget-action"] == "block"


def test_keys_over_their_rate_get_429_in_each_sdk(spend_gateway):
    c = spend_gateway.client(api_key=LIMITED_KEY)
    ok = c.chat.completions.with_raw_response.create(model="@fast", messages=MESSAGES)
    assert ok.headers["x-ratelimit-limit-requests"] == "2"
    assert ok.headers["x-ratelimit-remaining-requests"] == "1"
    c.chat.completions.create(model="@fast", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as ei:
        c.chat.completions.create(model="@fast", messages=MESSAGES)
    e = ei.value
    assert e.status_code == 429
    assert e.code == "rate_limited"
    assert e.body["message"] == "rate limit of 2 requests/minute exceeded for this API key"
    retry = int(e.response.headers["retry-after"])
    assert 1 <= retry <= 30
    assert e.response.headers["x-ratelimit-remaining-requests"] == "0"

    a = spend_gateway.anthropic_client(api_key=LIMITED_KEY)
    with pytest.raises(anthropic.RateLimitError) as ei:
        a.messages.create(model="@fast", max_tokens=16, messages=MESSAGES)
    assert ei.value.body["error"]["type"] == "rate_limit_error"
    assert int(ei.value.response.headers["retry-after"]) >= 1
