"""Files and batches through the gateway with the official SDKs: OpenAI `files.create` ->
`batches.create` -> `batches.retrieve` -> `files.content`; Anthropic
`messages.batches.create` -> `results` (its `results_url` pointed back at the gateway) and
the beta files API; and a 200 MiB upload and download streamed through with the gateway's
memory measured."""

from __future__ import annotations

import io
import json
import os
import time

import anthropic
import openai
import pytest

from conftest import CLAUDE_MODEL, DEV_KEY, Gateway, start_mock

LINES = [
    {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"question {i}"}]}}
    for i in range(3)
]


def test_openai_files_to_batches_to_output(client):
    data = "".join(json.dumps(line) + "\n" for line in LINES).encode()
    f = client.files.create(file=("batch.jsonl", data), purpose="batch")
    assert f.bytes == len(data) and f.purpose == "batch"
    listed = client.files.list(purpose="batch", limit=10)
    assert f.id in [x.id for x in listed.data]
    assert client.files.retrieve(f.id).filename == "batch.jsonl"
    assert client.files.content(f.id).content == data

    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    assert batch.status == "validating" and batch.input_file_id == f.id
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.request_counts.completed == 3
    out = client.files.content(done.output_file_id).text
    results = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["custom_id"] for r in results) == ["req-0", "req-1", "req-2"]
    assert results[0]["response"]["status_code"] == 200
    assert batch.id in [b.id for b in client.batches.list(limit=5).data]
    with pytest.raises(openai.BadRequestError):
        client.batches.cancel(batch.id)  # completed: the provider's refusal passes through
    assert client.files.delete(f.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-never-uploaded-here")


def test_anthropic_message_batches_and_files(aclient):
    batch = aclient.messages.batches.create(requests=[
        {"custom_id": f"r{i}", "params": {"model": CLAUDE_MODEL, "max_tokens": 16,
                                          "messages": [{"role": "user", "content": f"hi {i}"}]}}
        for i in range(2)
    ])
    assert batch.processing_status == "in_progress"
    ended = aclient.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended"
    # The SDK fetches results from results_url: it must point at the gateway.
    assert ended.results_url.startswith(str(aclient.base_url).rstrip("/"))
    results = list(aclient.messages.batches.results(batch.id))
    assert sorted(r.custom_id for r in results) == ["r0", "r1"]
    assert all(r.result.type == "succeeded" for r in results)
    assert batch.id in [b.id for b in aclient.messages.batches.list(limit=5).data]
    assert aclient.messages.batches.delete(batch.id).type == "message_batch_deleted"

    uploaded = aclient.beta.files.upload(file=("notes.txt", b"hello files", "text/plain"))
    assert uploaded.size_bytes == 11
    assert aclient.beta.files.retrieve_metadata(uploaded.id).filename == "notes.txt"
    assert uploaded.id in [f.id for f in aclient.beta.files.list().data]
    aclient.beta.files.delete(uploaded.id)
    with pytest.raises(anthropic.NotFoundError):
        aclient.beta.files.retrieve_metadata(uploaded.id)


def _rss_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


class _Zeros(io.RawIOBase):
    """`size` bytes of a repeating pattern, produced as read: the test holds no copy."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.left)
        b[:n] = (b"0123456789abcdef" * (n // 16 + 1))[:n]
        self.left -= n
        return n


def test_200_mib_upload_and_download_stream_through(workdir):
    """The gateway's resident memory grows by under 32 MiB while 200 MiB pass each way."""
    mock, url = start_mock(workdir, "mock-files-big")
    gw = Gateway(workdir, "gateway-files-big", url, url)
    try:
        size = 200 * 1024 * 1024
        client = openai.OpenAI(base_url=gw.base_url, api_key=DEV_KEY, max_retries=0, timeout=120.0)
        client.models.list()  # warm: connections, allocator arenas
        base = _rss_kib(gw.pid, "VmRSS")
        started = time.monotonic()
        f = client.files.create(file=("big.bin", io.BufferedReader(_Zeros(size), 1 << 20)), purpose="batch")
        upload_s = time.monotonic() - started
        assert f.bytes == size
        after_upload = _rss_kib(gw.pid, "VmHWM")
        started = time.monotonic()
        got = 0
        with client.files.with_streaming_response.content(f.id) as r:
            for chunk in r.iter_bytes(1 << 20):
                got += len(chunk)
        download_s = time.monotonic() - started
        assert got == size
        peak = _rss_kib(gw.pid, "VmHWM")
        growth_mib = (peak - base) / 1024
        print(f"\n200 MiB through the gateway: upload {upload_s:.2f} s, download {download_s:.2f} s; "
              f"RSS {base / 1024:.1f} MiB before, peak {after_upload / 1024:.1f} MiB after the upload, "
              f"{peak / 1024:.1f} MiB after the download: growth {growth_mib:.1f} MiB")
        if os.environ.get("MODELUX_REPORT"):
            with open(os.environ["MODELUX_REPORT"], "a") as out:
                out.write(f"files_200mib upload_s={upload_s:.2f} download_s={download_s:.2f} "
                          f"rss_base_mib={base / 1024:.1f} peak_mib={peak / 1024:.1f} growth_mib={growth_mib:.1f}\n")
        assert growth_mib < 32, f"gateway memory grew {growth_mib:.1f} MiB"
    finally:
        gw.stop()
        mock.stop()
