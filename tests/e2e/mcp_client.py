"""A real MCP client for the mcp e2e tests: the official Python SDK's
`Client`, run inside the agent's cgroup.

Usage: mcp_client.py URL MODE OP...
MODE: `auto` (the SDK's default: server/discover, the stateless 2026-07-28
revision, falling back to initialize), `legacy` (initialize and a session on
Streamable HTTP), `sse` (the older HTTP+SSE transport; URL ends in /sse).
OP: `list`, `call:TOOL:JSON_ARGS`, `callp:TOOL:JSON_ARGS` (with a progress
token; progress messages print as {"op": "progress"}), `read:URI`, `prompt:NAME:JSON_ARGS`,
`resources`, `prompts`. Prints one JSON line per OP: {"op", "ok", ...}.
"""

import asyncio
import json
import sys

from mcp import Client, types


async def elicitation(context, params):
    return types.ElicitResult(action="accept", content={"answer": "yes"})


def dump(obj):
    return obj.model_dump(mode="json", by_alias=True, exclude_none=True)


async def main():
    url, mode, ops = sys.argv[1], sys.argv[2], sys.argv[3:]
    if mode == "sse":
        from mcp.client.sse import sse_client

        client = Client(sse_client(url), mode="legacy", elicitation_callback=elicitation)
    else:
        client = Client(url, mode=mode, elicitation_callback=elicitation)
    async with client:
        print(json.dumps({"op": "connected", "ok": True, "protocol_version": client.protocol_version}), flush=True)
        for op in ops:
            kind, _, rest = op.partition(":")
            try:
                if kind == "list":
                    r = await client.list_tools()
                    out = {"tools": [t.name for t in r.tools]}
                elif kind == "resources":
                    r = await client.list_resources()
                    out = {"resources": [x.uri for x in r.resources]}
                elif kind == "prompts":
                    r = await client.list_prompts()
                    out = {"prompts": [x.name for x in r.prompts]}
                elif kind == "call":
                    name, _, args = rest.partition(":")
                    r = await client.call_tool(name, json.loads(args or "{}"))
                    out = dump(r)
                elif kind == "callp":
                    # With a progress token: a held call says so at once.
                    async def progress(p, total, message):
                        print(json.dumps({"op": "progress", "message": message}), flush=True)

                    name, _, args = rest.partition(":")
                    r = await client.call_tool(name, json.loads(args or "{}"), progress_callback=progress)
                    out = dump(r)
                elif kind == "read":
                    r = await client.read_resource(rest)
                    out = dump(r)
                elif kind == "prompt":
                    name, _, args = rest.partition(":")
                    r = await client.get_prompt(name, json.loads(args or "{}"))
                    out = dump(r)
                else:
                    raise SystemExit(f"unknown op {op}")
                print(json.dumps({"op": op, "ok": True, **out}), flush=True)
            except Exception as e:  # the test reads the error text
                print(json.dumps({"op": op, "ok": False, "error": f"{type(e).__name__}: {e}"}), flush=True)


asyncio.run(main())
