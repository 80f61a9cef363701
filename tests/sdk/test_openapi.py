"""The management API's OpenAPI document, served by the release binary, checked by a real
OpenAPI 3.1 validator (openapi-spec-validator), and every documented operation answered
(no 404 for the path, no 405 for the method)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from openapi_spec_validator import validate
from openapi_spec_validator.validation import OpenAPIV31SpecValidator

import pytest

from conftest import ADMIN_KEY, Gateway


@pytest.fixture(scope="module")
def gateway(workdir, mock_url):
    # Its own gateway: the sweep below sends more management calls than the default
    # 60 a minute.
    gw = Gateway(workdir, "openapi", mock_url, mock_url,
                 extra_yaml="rate_limits: { requests_per_minute: 0, management_requests_per_minute: 0 }\n")
    yield gw
    gw.stop()


def manage(gateway, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{gateway.manage_port}{path}",
        data=body,
        method=method,
        headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_openapi_document_is_valid_3_1_and_covers_what_is_served(gateway):
    status, doc = manage(gateway, "GET", "/manage/v1/openapi.json")
    assert status == 200
    assert doc["openapi"].startswith("3.1")
    validate(doc, cls=OpenAPIV31SpecValidator)
    operations = 0
    for path, item in doc["paths"].items():
        concrete = path.replace("{version}", "1")
        for part in ("{id}", "{request_id}"):
            concrete = concrete.replace(part, "does-not-exist")
        for method in item:
            operations += 1
            body = b"{}" if method in ("post", "patch") else None
            status, answer = manage(gateway, method.upper(), concrete, body)
            assert status != 405, (method, path, answer)
            assert answer.get("error", {}).get("code") != "endpoint_not_found", (method, path, answer)
    assert operations >= 40
    # And the other way round: a path the document does not list is not answered.
    status, answer = manage(gateway, "GET", "/manage/v1/not-a-resource")
    assert status == 404 and answer["error"]["code"] == "endpoint_not_found"
    status, _ = manage(gateway, "PUT", "/manage/v1/projects")
    assert status == 405
