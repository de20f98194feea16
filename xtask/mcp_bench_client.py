"""The load generator of `cargo xtask bench mcp`: raw Streamable HTTP
JSON-RPC over one keep-alive connection (Python's http.client, no SDK, so the
client's own cost stays small and equal on both paths).

Usage: mcp_bench_client.py URL CALLS STREAMS SECONDS
Opens a session (initialize, notifications/initialized), makes CALLS `echo`
tool calls one after another (after a warm-up), then STREAMS calls of
`trigger-long-running-operation` with a progress token, timing when the first
event of each answer stream arrives. Stops early at SECONDS. Prints one JSON
object: calls, seconds, p50/p99 per call (ms), first-event p50 (ms), and
whether the e-mail address in the answers came back masked.
"""

import http.client
import json
import sys
import time
import urllib.parse

url, calls, streams, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
u = urllib.parse.urlsplit(url)
conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
headers = {
    "content-type": "application/json",
    "accept": "application/json, text/event-stream",
}
next_id = 0


def post(method, params, notification=False):
    """POSTs one message; returns the response, its body not read yet."""
    global next_id
    msg = {"jsonrpc": "2.0", "method": method, "params": params}
    if not notification:
        next_id += 1
        msg["id"] = next_id
    # Bytes: headers and body leave in one write (no Nagle / delayed-ACK
    # stall between them).
    conn.request("POST", u.path, json.dumps(msg).encode(), headers)
    return conn.getresponse()


def answer(resp):
    """The JSON-RPC answer in a JSON or SSE body."""
    body = resp.read().decode()
    if resp.getheader("content-type", "").startswith("text/event-stream"):
        datas = [l[5:].strip() for l in body.splitlines() if l.startswith("data:")]
        msgs = [json.loads(d) for d in datas if d]
        found = [m for m in msgs if "result" in m or "error" in m]
        if not found:
            raise SystemExit(f"no answer in the stream: {body!r}")
        return found[-1]
    return json.loads(body)


r = post("initialize", {
    "protocolVersion": "2025-11-25",
    "capabilities": {},
    "clientInfo": {"name": "portcullis-bench", "version": "1"},
})
sid = r.getheader("mcp-session-id")
init = answer(r)
if "result" not in init:
    raise SystemExit(f"initialize failed: {init}")
if sid:
    headers["mcp-session-id"] = sid
headers["mcp-protocol-version"] = init["result"].get("protocolVersion", "2025-11-25")
post("notifications/initialized", {}, notification=True).read()


def call(i):
    a = answer(post("tools/call", {"name": "echo", "arguments": {"message": f"call {i} for bench@example.com"}}))
    if "result" not in a or a["result"].get("isError"):
        raise SystemExit(f"echo failed: {a}")
    return a


masked = "bench@example.com" not in json.dumps(call(0))
for i in range(min(50, calls)):
    call(i)
lat = []
start = time.perf_counter()
for i in range(calls):
    t = time.perf_counter()
    call(i)
    lat.append((time.perf_counter() - t) * 1000)
    if t - start > limit:
        break
elapsed = time.perf_counter() - start
first = []
for i in range(streams):
    t = time.perf_counter()
    r = post("tools/call", {
        "name": "trigger-long-running-operation",
        "arguments": {"duration": 0.2, "steps": 2},
        "_meta": {"progressToken": f"p{i}"},
    })
    got = None
    while True:
        line = r.readline()
        if not line:
            break
        # The first message (a progress notification, 100 ms after the
        # call), not a resumability priming event with empty data.
        if line.startswith(b"data:") and line[5:].strip() and got is None:
            got = (time.perf_counter() - t) * 1000
    r.read()
    if got is None:
        raise SystemExit("the stream had no event")
    first.append(got)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] if xs else 0.0


print(json.dumps({
    "calls": len(lat),
    "seconds": elapsed,
    "p50_ms": pct(lat, 0.5),
    "p99_ms": pct(lat, 0.99),
    "first_event_p50_ms": pct(first, 0.5),
    "streams": len(first),
    "masked": masked,
}))
