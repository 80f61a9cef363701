"""The MCP server through the official MCP Python SDK (`mcp`), against the release binary:
streamable HTTP at /mcp on the management listener (management-key auth) and
`modelux mcp --stdio`. Lists the tools, creates a project and a routing config, changes
and rolls it back, reads logs and a trace, and checks that MCP changes are audited with
the key as actor."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from conftest import ADMIN_KEY, DEV_KEY, MESSAGES, MODELUX, Gateway


@pytest.fixture(scope="module")
def gateway(workdir, mock_url):
    gw = Gateway(workdir, "mcp", mock_url, mock_url,
                 extra_yaml="rate_limits: { requests_per_minute: 0, management_requests_per_minute: 0 }\n")
    yield gw
    gw.stop()


def manage(gateway, path: str) -> dict:
    req = urllib.request.Request(f"{gateway.manage_url}{path}",
                                 headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


async def over_http(gateway, key: str, body):
    async with create_mcp_http_client(headers={"Authorization": f"Bearer {key}"}) as http:
        async with streamable_http_client(f"{gateway.manage_url}/mcp", http_client=http) as streams:
            async with ClientSession(streams[0], streams[1]) as session:
                await session.initialize()
                return await body(session)


def structured(result) -> dict:
    assert result.structured_content is not None, result
    # The text content carries the same JSON (for clients that read only text).
    assert json.loads(result.content[0].text) == result.structured_content
    return result.structured_content


def test_tools_manage_projects_configs_rollback_and_logs(gateway):
    # A request through the proxy, for the logs tools to find.
    raw = gateway.client().chat.completions.with_raw_response.create(model="@fast", messages=MESSAGES)
    request_id = raw.headers["x-modelux-request-id"]

    async def session_body(s: ClientSession):
        tools = (await s.list_tools()).tools
        names = {t.name for t in tools}
        for expected in ("list_projects", "create_project", "create_routing_config", "rollback_routing_config",
                         "get_budget", "list_logs", "get_trace", "create_experiment", "promote_experiment",
                         "add_provider", "list_webhook_endpoints", "get_setup_status"):
            assert expected in names, sorted(names)
        create = next(t for t in tools if t.name == "create_project")
        assert "name" in create.input_schema["properties"], create.input_schema
        rollback = next(t for t in tools if t.name == "rollback_routing_config")
        assert rollback.input_schema["required"][:1] == ["id"], rollback.input_schema

        project = structured(await s.call_tool("create_project", {"name": "MCP team", "slug": "mcp-team"}))
        assert project["data"]["slug"] == "mcp-team"
        rc = structured(await s.call_tool("create_routing_config", {
            "slug": "mcp-fast", "project": "mcp-team", "strategy": "single", "model": "gpt-4o-mini"}))
        assert rc["data"]["version"] == 1, rc
        changed = structured(await s.call_tool("update_routing_config", {"id": "mcp-fast", "model": "local/m1"}))
        assert "data" in changed, changed
        assert changed["data"]["version"] == 2 and changed["data"]["model"] == "local/m1", changed
        back = structured(await s.call_tool("rollback_routing_config", {"id": "mcp-fast", "version": 1}))
        assert back["data"]["model"] == "gpt-4o-mini" and back["data"]["version"] == 3, back
        versions = structured(await s.call_tool("list_routing_config_versions", {"id": "mcp-fast"}))
        assert len(versions["data"]) == 3, versions

        # A REST error is a tool error carrying the same envelope.
        missing = await s.call_tool("get_project", {"id": "no-such-project"})
        assert missing.is_error
        assert missing.structured_content["error"]["code"] == "project_not_found"
        invalid = await s.call_tool("create_routing_config", {"slug": "bad", "strategy": "single"})
        assert invalid.is_error and invalid.structured_content["error"]["code"] == "validation_failed"

        ids: list = []
        for _ in range(150):
            page = await s.call_tool("list_logs", {"limit": 50})
            ids = [row.get("request_id") for row in page.structured_content.get("data", [])]
            if request_id in ids:
                break
            await asyncio.sleep(0.1)
        assert request_id in ids, ids
        log = structured(await s.call_tool("get_log", {"request_id": request_id}))
        assert log["data"]["request_id"] == request_id
        trace = structured(await s.call_tool("get_trace", {"request_id": request_id}))
        assert trace["data"], trace

        status = structured(await s.call_tool("get_setup_status", {}))
        assert status["projects"]["count"] >= 2 and "mcp-team" in status["projects"]["names"], status
        assert any(c["slug"] == "mcp-fast" for c in status["routing_configs"]["items"]), status
        assert status["node"]["state"]["backend"] == "sqlite", status

    asyncio.run(over_http(gateway, ADMIN_KEY, session_body))

    # Audited with the key as actor.
    audit = manage(gateway, "/manage/v1/audit-logs?resource_type=routing_config")["data"]
    rolled = next(e for e in audit if e["action"] == "routing_config.rolled_back")
    assert rolled["actor"]["type"] == "management_key" and rolled["actor"]["id"] == "admin", rolled
    assert rolled["user_agent"].startswith("mcp"), rolled
    assert rolled["ip"] == "127.0.0.1", rolled


def test_mcp_refuses_requests_without_a_management_key(gateway):
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}).encode()
    for key in (None, DEV_KEY, "mlx_mk_wrong_000000000000"):
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(f"{gateway.manage_url}/mcp", data=body, method="POST", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 401


def test_stdio_server_calls_the_management_api_with_its_key(gateway):
    params = StdioServerParameters(
        command=str(MODELUX),
        args=["mcp", "--stdio", "--manage-url", gateway.manage_url],
        env={"MODELUX_ADMIN_KEY": ADMIN_KEY, "PATH": "/usr/bin:/bin"},
    )

    async def run():
        async with stdio_client(params) as streams:
            async with ClientSession(streams[0], streams[1]) as s:
                await s.initialize()
                names = {t.name for t in (await s.list_tools()).tools}
                assert "rollback_routing_config" in names and "get_setup_status" in names
                made = structured(await s.call_tool("create_project", {"name": "Over stdio", "slug": "stdio-team"}))
                assert made["data"]["slug"] == "stdio-team"
                listed = structured(await s.call_tool("list_projects", {}))
                assert "stdio-team" in [p["slug"] for p in listed["data"]]

    asyncio.run(run())
    audit = manage(gateway, "/manage/v1/audit-logs?resource_type=project")["data"]
    created = next(e for e in audit if e["action"] == "project.created" and e["after"]["slug"] == "stdio-team")
    assert created["actor"]["id"] == "admin", created
