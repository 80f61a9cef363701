"""End-to-end tests: the official `openai` Python SDK against the release gateway binary.

Every process is started by a fixture on free 127.0.0.1 ports and stopped by PID at
teardown. Binaries come from $MODELUX_BIN_DIR (default: <repo>/target/release); run via
tests/sdk/run.sh, which never builds Rust.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("MODELUX_BIN_DIR", str(REPO / "target" / "release")))
MODELUX = BIN_DIR / "modelux"
MOCK = BIN_DIR / "mock-upstream"

DEV_KEY = "mlx_sk_sdk_0123456789abcdef"
ADMIN_KEY = "mlx_mk_sdk_0123456789abcdef"
UNSET_VAR = "MODELUX_TEST_UNSET_VAR"

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
RELOAD_TIMEOUT_S = 5.0
MESSAGES = [{"role": "user", "content": "Say hello"}]
MOCK_TOKENS = 16
EXPECTED_CONTENT = "".join(f" tok{i}" for i in range(MOCK_TOKENS))


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_STARTED: list["Proc"] = []


@atexit.register
def _stop_leftovers() -> None:
    """Safety net should a fixture teardown not run (e.g. an interrupted session)."""
    for proc in _STARTED:
        proc.stop()


class Proc:
    """A child process whose stdout+stderr go to a log file (no pipe to fill up)."""

    def __init__(self, name: str, argv: list[str], workdir: Path, env: dict | None = None):
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        self.pid = self.popen.pid
        _STARTED.append(self)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(
                f"{self.name} (pid {self.pid}) exited with {self.popen.returncode}:\n{self.log()}"
            )

    def stop(self) -> None:
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.popen.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=STOP_TIMEOUT_S)
            except ProcessLookupError:
                pass
        if not self._log.closed:
            self._log.close()


def start_mock(workdir: Path, name: str, *extra: str) -> tuple[Proc, str]:
    """Start mock-upstream on an OS-chosen port; return (proc, 'http://addr/v1')."""
    if not MOCK.exists():
        pytest.fail(f"{MOCK} not found: build the release binaries or set MODELUX_BIN_DIR")
    proc = Proc(name, [str(MOCK), "--listen", "127.0.0.1:0", *extra], workdir)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        m = re.search(r"listening on (\S+)", proc.log())
        if m:
            return proc, f"http://{m.group(1)}/v1"
        proc.check_alive()
        time.sleep(0.05)
    proc.stop()
    raise RuntimeError(f"{name} did not report its address within {START_TIMEOUT_S}s:\n{proc.log()}")


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def gateway_config(proxy_port: int, manage_port: int, openai_url: str, local_url: str,
                   fast_model: str = "gpt-4o-mini", upstream_timeout_ms: int = 5000) -> str:
    return f"""\
server:
  proxy_listen: "127.0.0.1:{proxy_port}"
  manage_listen: "127.0.0.1:{manage_port}"
  threads: 2
  watch_config: false
  upstream_timeout_ms: {upstream_timeout_ms}
providers:
  - {{ id: openai, kind: openai, base_url: "{openai_url}", api_key: "sk-upstream" }}
  - {{ id: local, kind: openai_compatible, base_url: "{local_url}", models: ["m1"] }}
projects:
  - id: default
    keys:
      - {{ name: dev, key: "{DEV_KEY}" }}
management_keys:
  - {{ name: admin, key: "{ADMIN_KEY}" }}
routing_configs:
  fast: {{ project: default, strategy: single, model: "{fast_model}" }}
"""


class Gateway:
    def __init__(self, workdir: Path, name: str, openai_url: str, local_url: str,
                 upstream_timeout_ms: int = 5000):
        if not MODELUX.exists():
            pytest.fail(f"{MODELUX} not found: build the release binaries or set MODELUX_BIN_DIR")
        self.workdir = workdir
        self.openai_url = openai_url
        self.local_url = local_url
        self.upstream_timeout_ms = upstream_timeout_ms
        self.proxy_port = free_port()
        self.manage_port = free_port()
        self.config_path = workdir / f"{name}.yaml"
        self.write_config()
        self.proc = Proc(name, [str(MODELUX), "serve", "--config", str(self.config_path)], workdir)
        self.pid = self.proc.pid
        try:
            self._wait_ready()
        except BaseException:
            self.proc.stop()
            raise

    def write_config(self, fast_model: str = "gpt-4o-mini") -> None:
        text = gateway_config(self.proxy_port, self.manage_port, self.openai_url, self.local_url,
                              fast_model, self.upstream_timeout_ms)
        self.config_path.write_text(text)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}/openai/v1"

    @property
    def v1_base_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}/v1"

    @property
    def manage_url(self) -> str:
        return f"http://127.0.0.1:{self.manage_port}"

    def client(self, base_url: str | None = None, api_key: str = DEV_KEY) -> OpenAI:
        return OpenAI(base_url=base_url or self.base_url, api_key=api_key, max_retries=0,
                      timeout=10.0)

    def async_client(self) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=self.base_url, api_key=DEV_KEY, max_retries=0, timeout=10.0)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        last = None
        while time.monotonic() < deadline:
            self.proc.check_alive()
            try:
                status, _ = http_get(f"{self.manage_url}/healthz", timeout=1.0)
                if status == 200:
                    with socket.create_connection(("127.0.0.1", self.proxy_port), timeout=1.0):
                        return
                last = f"healthz status {status}"
            except OSError as e:
                last = repr(e)
            time.sleep(0.05)
        raise RuntimeError(f"gateway not ready within {START_TIMEOUT_S}s ({last}):\n{self.proc.log()}")

    def metric(self, name: str, labels: str = "") -> float:
        status, text = http_get(f"{self.manage_url}/metrics")
        assert status == 200, text
        pattern = re.compile(rf"^{re.escape(name)}{re.escape(labels)}\s+(\S+)$", re.M)
        m = pattern.search(text)
        return float(m.group(1)) if m else 0.0

    def stop(self) -> None:
        self.proc.stop()


@pytest.fixture(scope="session")
def workdir():
    with tempfile.TemporaryDirectory(prefix="modelux-sdk-") as d:
        yield Path(d)


@pytest.fixture(scope="session")
def mock_url(workdir):
    proc, url = start_mock(workdir, "mock-ok")
    yield url
    proc.stop()


@pytest.fixture(scope="session")
def gateway(workdir, mock_url):
    gw = Gateway(workdir, "gateway-main", mock_url, mock_url)
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def error_gateway(workdir):
    """openai -> a mock answering every request with 429, local -> one answering 500."""
    p429, url429 = start_mock(workdir, "mock-429", "--error-rate", "1", "--error-status", "429")
    p500, url500 = start_mock(workdir, "mock-500", "--error-rate", "1", "--error-status", "500")
    try:
        gw = Gateway(workdir, "gateway-errors", url429, url500)
    except BaseException:
        p429.stop()
        p500.stop()
        raise
    yield gw
    gw.stop()
    p429.stop()
    p500.stop()


@pytest.fixture(scope="session")
def slow_gateway(workdir):
    """upstream_timeout_ms 500; openai -> a mock that answers after 5 s, local -> one that
    streams 6 tokens 100 ms apart."""
    p_slow, url_slow = start_mock(workdir, "mock-slow", "--latency-ms", "5000")
    p_paced, url_paced = start_mock(workdir, "mock-paced", "--inter-token-ms", "100", "--tokens", "6")
    try:
        gw = Gateway(workdir, "gateway-slow", url_slow, url_paced, upstream_timeout_ms=500)
    except BaseException:
        p_slow.stop()
        p_paced.stop()
        raise
    yield gw
    gw.stop()
    p_slow.stop()
    p_paced.stop()


@pytest.fixture
def reload_gateway(workdir, mock_url):
    """A gateway of its own (its config file gets rewritten)."""
    gw = Gateway(workdir, f"gateway-reload-{uuid.uuid4().hex[:8]}", mock_url, mock_url)
    yield gw
    gw.stop()


@pytest.fixture
def client(gateway) -> OpenAI:
    return gateway.client()


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
        gateway.client(base_url=gateway.v1_base_url, api_key="mlx_sk_wrong_000000000000").models.list()


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
    c = gateway.client(api_key="mlx_sk_wrong_000000000000")
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


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        ok, last = predicate()
        if ok:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last}")


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
