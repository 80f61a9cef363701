"""Shared harness for the SDK end-to-end suites (official `openai` and `anthropic` SDKs)
against the release gateway binary.

Every process is started by a fixture on free 127.0.0.1 ports and stopped by PID at
teardown. Binaries come from $MODELUX_BIN_DIR (default: <repo>/target/release); run via
tests/sdk/run.sh, which never builds Rust.

Test modules import the helpers below with `from conftest import ...` (pytest's default
"prepend" import mode puts this directory on sys.path, and the module object is the one
pytest loaded, so the process registry is shared).
"""

from __future__ import annotations

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

import anthropic
import pytest
from anthropic import Anthropic, AsyncAnthropic
from openai import AsyncOpenAI, OpenAI

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("MODELUX_BIN_DIR", str(REPO / "target" / "release")))
MODELUX = BIN_DIR / "modelux"
MOCK = BIN_DIR / "mock-upstream"

DEV_KEY = "mlx_sk_sdk_0123456789abcdef"
# Two requests a minute: the rate-limit tests' key.
LIMITED_KEY = "mlx_sk_sdk_limited_0123456789"
WRONG_KEY = "mlx_sk_wrong_000000000000"
ADMIN_KEY = "mlx_mk_sdk_0123456789abcdef"
ANTHROPIC_UPSTREAM_KEY = "sk-ant-test"
GOOGLE_UPSTREAM_KEY = "g-upstream"
COHERE_UPSTREAM_KEY = "co-upstream"
AZURE_UPSTREAM_KEY = "az-upstream"
AZURE_API_VERSION = "2024-06-01"
# ACCESS_KEY_ID::SECRET_ACCESS_KEY::REGION: the gateway signs Bedrock calls with SigV4 (the
# mock answers an unsigned one with 403).
BEDROCK_UPSTREAM_KEY = "AKIDEXAMPLE::wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY::us-east-1"
UNSET_VAR = "MODELUX_TEST_UNSET_VAR"

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
RELOAD_TIMEOUT_S = 5.0
MESSAGES = [{"role": "user", "content": "Say hello"}]
MOCK_TOKENS = 16
EXPECTED_CONTENT = "".join(f" tok{i}" for i in range(MOCK_TOKENS))
CLAUDE_MODEL = "claude-sonnet-4-5"


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
    """Start mock-upstream on an OS-chosen port; return (proc, 'http://addr/v1').

    The same process speaks Anthropic Messages; its Anthropic base URL is
    `anthropic_base(url)` ('http://addr', no /v1)."""
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


def anthropic_base(mock_openai_url: str) -> str:
    """'http://addr/v1' (a mock's OpenAI base URL) -> 'http://addr' (its Anthropic base URL)."""
    return mock_openai_url.removesuffix("/v1")


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def gateway_config(proxy_port: int, manage_port: int, openai_url: str, local_url: str,
                   fast_model: str = "gpt-4o-mini", upstream_timeout_ms: int = 5000,
                   anthropic_url: str | None = None, extra_yaml: str = "",
                   extra_configs: str = "") -> str:
    """`extra_yaml`: more top-level sections (budgets, prices, rate_limits); `extra_configs`:
    more routing configs, each a `  slug: {...}` line. Without a
    `rate_limits:` section the dev key is unlimited (the suites send bursts); the `limited`
    key always allows two requests a minute."""
    if "rate_limits:" not in extra_yaml:
        extra_yaml = "rate_limits: { requests_per_minute: 0 }\n" + extra_yaml
    anthropic_url = anthropic_url or anthropic_base(openai_url)
    # google, cohere, bedrock and azure: the same mock process as openai (it routes by path).
    root = anthropic_base(openai_url)
    return f"""\
server:
  proxy_listen: "127.0.0.1:{proxy_port}"
  manage_listen: "127.0.0.1:{manage_port}"
  threads: 2
  watch_config: false
  upstream_timeout_ms: {upstream_timeout_ms}
  data_dir: "data-{proxy_port}"
providers:
  - {{ id: openai, kind: openai, base_url: "{openai_url}", api_key: "sk-upstream" }}
  - {{ id: local, kind: openai_compatible, base_url: "{local_url}", models: ["m1"] }}
  - {{ id: anthropic, kind: anthropic, base_url: "{anthropic_url}", api_key: "{ANTHROPIC_UPSTREAM_KEY}" }}
  - {{ id: google, kind: google, base_url: "{root}/v1beta", api_key: "{GOOGLE_UPSTREAM_KEY}" }}
  - {{ id: cohere, kind: cohere, base_url: "{root}", api_key: "{COHERE_UPSTREAM_KEY}" }}
  - {{ id: bedrock, kind: bedrock, base_url: "{root}", api_key: "{BEDROCK_UPSTREAM_KEY}" }}
  - {{ id: azure, kind: azure, base_url: "{root}", api_key: "{AZURE_UPSTREAM_KEY}", api_version: "{AZURE_API_VERSION}" }}
projects:
  - id: default
    keys:
      - {{ name: dev, key: "{DEV_KEY}" }}
      - {{ name: limited, key: "{LIMITED_KEY}", requests_per_minute: 2 }}
management_keys:
  - {{ name: admin, key: "{ADMIN_KEY}" }}
routing_configs:
  fast: {{ project: default, strategy: single, model: "{fast_model}" }}
  claude: {{ project: default, strategy: single, model: "{CLAUDE_MODEL}" }}
  cheap: {{ project: default, strategy: single, model: "local/m1" }}
  cached: {{ project: default, strategy: single, model: "{fast_model}", cache: {{ mode: exact, ttl_seconds: 600 }} }}
  cached_embed: {{ project: default, strategy: single, model: "openai/text-embedding-3-small", cache: {{ mode: exact, ttl_seconds: 600 }} }}
  semantic: {{ project: default, strategy: single, model: "{fast_model}", cache: {{ mode: semantic, threshold: 0.95, ttl_seconds: 600, embedding_model: "openai/text-embedding-3-small" }} }}
{extra_configs}{extra_yaml}"""


class Gateway:
    def __init__(self, workdir: Path, name: str, openai_url: str, local_url: str,
                 upstream_timeout_ms: int = 5000, anthropic_url: str | None = None,
                 extra_yaml: str = "", extra_configs: str = ""):
        self.extra_yaml = extra_yaml
        self.extra_configs = extra_configs
        if not MODELUX.exists():
            pytest.fail(f"{MODELUX} not found: build the release binaries or set MODELUX_BIN_DIR")
        self.workdir = workdir
        self.openai_url = openai_url
        self.local_url = local_url
        self.anthropic_url = anthropic_url or anthropic_base(openai_url)
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
                              fast_model, self.upstream_timeout_ms, self.anthropic_url,
                              self.extra_yaml, self.extra_configs)
        self.config_path.write_text(text)

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/openai/v1"

    @property
    def v1_base_url(self) -> str:
        return f"{self.root_url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        """The Anthropic SDK appends /v1/messages etc. to this."""
        return f"{self.root_url}/anthropic"

    @property
    def manage_url(self) -> str:
        return f"http://127.0.0.1:{self.manage_port}"

    def client(self, base_url: str | None = None, api_key: str = DEV_KEY) -> OpenAI:
        return OpenAI(base_url=base_url or self.base_url, api_key=api_key, max_retries=0,
                      timeout=10.0)

    def async_client(self) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=self.base_url, api_key=DEV_KEY, max_retries=0, timeout=10.0)

    def anthropic_client(self, base_url: str | None = None, api_key: str = DEV_KEY) -> Anthropic:
        return Anthropic(base_url=base_url or self.anthropic_base_url, api_key=api_key,
                         max_retries=0, timeout=10.0)

    def async_anthropic_client(self) -> AsyncAnthropic:
        return AsyncAnthropic(base_url=self.anthropic_base_url, api_key=DEV_KEY, max_retries=0,
                              timeout=10.0)

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


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        ok, last = predicate()
        if ok:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last}")


def assert_anthropic_error(err: anthropic.APIStatusError, status: int, error_type: str | None = None):
    """An Anthropic-shaped error body: {"type": "error", "error": {"type", "message"}}."""
    assert err.status_code == status
    body = err.response.json()
    assert body.get("type") == "error", body
    inner = body["error"]
    assert isinstance(inner.get("type"), str) and inner["type"], inner
    assert isinstance(inner.get("message"), str) and inner["message"], inner
    if error_type is not None:
        assert inner["type"] == error_type, inner
    uuid.UUID(err.response.headers["x-modelux-request-id"])
    return inner


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def workdir():
    with tempfile.TemporaryDirectory(prefix="modelux-sdk-") as d:
        yield Path(d)


@pytest.fixture(scope="session")
def mock_url(workdir):
    """OpenAI base URL of a healthy mock; the same process serves Anthropic Messages,
    Gemini, Cohere, Bedrock and Azure OpenAI (routed by path)."""
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
    """openai, anthropic, google, cohere, bedrock and azure -> a mock answering every request
    with 429 (in each provider's own error format), local -> one answering 500."""
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


@pytest.fixture
def aclient(gateway) -> Anthropic:
    """Anthropic SDK client on the gateway's /anthropic base URL."""
    return gateway.anthropic_client()
