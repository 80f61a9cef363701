"""The OpenAI Responses API through the gateway, driven by the official `openai` SDK:
`@config` fallback among OpenAI-family providers (an Anthropic target skipped, a failing
OpenAI one fallen over), plain and streamed, then retrieve, input items, cancel and delete
reaching the provider that created the response; and a caller's own key (BYOK) reaching
the mock while the trace store keeps only its fingerprint."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import openai
import pytest

from conftest import ADMIN_KEY, CLAUDE_MODEL, Gateway, start_mock, wait_for

CALLER_KEY = "sk-proj-SdkCallerSecret0123456789abcdefghTA0A"
RESP_CONFIG = (
    f'  resp: {{ project: default, strategy: fallback, retry_on: ["5xx"], '
    f'attempts: ["anthropic/{CLAUDE_MODEL}", "openai/gpt-4o-mini", "local/m1"] }}\n'
)


@pytest.fixture(scope="module")
def resp_gateway(workdir):
    """openai -> a mock failing every call with 500; local -> a healthy mock that records
    what it receives (GET /mock/requests)."""
    p500, url500 = start_mock(workdir, "mock-resp-500", "--error-rate", "1", "--error-status", "500")
    pok, url_ok = start_mock(workdir, "mock-resp-ok", "--record", "--tokens", "5")
    try:
        gw = Gateway(workdir, "gateway-responses", url500, url_ok, extra_configs=RESP_CONFIG,
                     extra_yaml="traces: { flush_interval_ms: 50 }\n")
    except BaseException:
        p500.stop()
        pok.stop()
        raise
    gw.ok_root = url_ok.removesuffix("/v1")
    yield gw
    gw.stop()
    p500.stop()
    pok.stop()


def _recorded(gw) -> list[dict]:
    with urllib.request.urlopen(f"{gw.ok_root}/mock/requests", timeout=5) as r:
        return json.loads(r.read())


def _log(gw, request_id: str) -> dict:
    def ready():
        req = urllib.request.Request(f"{gw.manage_url}/manage/v1/logs/{request_id}",
                                     headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return True, json.loads(r.read())["data"]
        except urllib.error.HTTPError as e:
            return False, e.code
    return wait_for(ready, 10, f"the trace of {request_id}")


def test_create_falls_back_and_follow_ups_reach_the_creator(resp_gateway):
    client = resp_gateway.client()
    raw = client.responses.with_raw_response.create(model="@resp", input="Say hello", max_output_tokens=16)
    assert raw.headers["x-modelux-provider-used"] == "local"
    assert raw.headers["x-modelux-routing-config"] == "@resp"
    resp = raw.parse()
    assert resp.status == "completed"
    assert resp.output_text == " tok0 tok1 tok2 tok3 tok4"
    assert resp.usage.output_tokens == 5
    assert float(raw.headers["x-modelux-cost-usd"]) >= 0
    log = _log(resp_gateway, raw.headers["x-modelux-request-id"])
    statuses = [a["status"] for a in log["attempt_details"]]
    assert statuses == ["rejected", "upstream_error", "success"], log
    assert log["output_tokens"] == 5
    assert log["owned_ids"] == [resp.id]

    follow = client.responses.create(model="@resp", previous_response_id=resp.id, input="And again")
    assert follow.previous_response_id == resp.id

    got = client.responses.retrieve(resp.id)
    assert got.id == resp.id and got.output_text == resp.output_text
    items = client.responses.input_items.list(resp.id)
    assert [i.content[0].text for i in items.data] == ["Say hello"]
    client.responses.delete(resp.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)


def test_streamed_create_and_background_cancel(resp_gateway):
    client = resp_gateway.client()
    types, text, completed = [], "", None
    with client.responses.create(model="@resp", input="Stream it", stream=True) as stream:
        for event in stream:
            types.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
            if event.type == "response.completed":
                completed = event.response
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert text == " tok0 tok1 tok2 tok3 tok4"
    assert completed.usage.output_tokens == 5
    # The stream's response is reachable afterwards (remembered from its first event).
    assert client.responses.retrieve(completed.id).status == "completed"

    queued = client.responses.create(model="@resp", input="later", background=True)
    assert queued.status == "queued"
    cancelled = client.responses.cancel(queued.id)
    assert cancelled.status == "cancelled"


def test_refusals_come_in_openai_format(resp_gateway):
    client = resp_gateway.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=f"anthropic/{CLAUDE_MODEL}", input="x")
    assert e.value.body["code"] == "unsupported_provider"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_never_created_here")


def test_byok_reaches_the_mock_and_only_its_fingerprint_is_kept(resp_gateway):
    client = resp_gateway.client()
    raw = client.responses.with_raw_response.create(
        model="local/m1", input="mine", extra_headers={"X-Modelux-Provider-Key": CALLER_KEY})
    assert raw.http_response.status_code == 200
    sent = [r for r in _recorded(resp_gateway) if r["path"] == "/v1/responses"]
    assert sent[-1]["headers"]["authorization"] == f"Bearer {CALLER_KEY}"
    log = _log(resp_gateway, raw.headers["x-modelux-request-id"])
    assert log["provider_key"] == "sk-proj-...TA0A"
    assert CALLER_KEY not in json.dumps(log)
    data_dir = Path(resp_gateway.workdir) / f"data-{resp_gateway.proxy_port}"
    secret = CALLER_KEY.encode()
    for path in data_dir.rglob("*"):
        if path.is_file():
            assert secret not in path.read_bytes(), f"the caller's key was written to {path}"
