#!/usr/bin/python3
"""A raw PostgreSQL protocol client for the memory-cap e2e tests: it logs in
(no password: the daemon holds the credential) and then sends messages far
larger than a normal client would, streaming their bodies in 1 MiB pieces.

argv[1] is a JSON spec:
  {"host", "port", "mode": "oversized_query", "claim": N, "send": M}
      a Query header claiming N bytes, then M bytes of body;
  {"host", "port", "mode": "copy_big", "table": T, "rows": R, "width": W}
      COPY T FROM STDIN, then ONE CopyData message of R rows of W bytes;
  {"host", "port", "mode": "login"}
      logs in and reports (no pause).
Halfway through the body it prints {"half": true} and waits for a line on
stdin, so the test can look at the daemon meanwhile. Prints one JSON line
with what happened at the end.
"""
import json, socket, struct, sys

spec = json.loads(sys.argv[1])
s = socket.create_connection((spec["host"], spec["port"]), timeout=60)
result = {"sent": 0, "errors": [], "tags": [], "closed": False}


def recv_exact(n):
    b = b""
    while len(b) < n:
        chunk = s.recv(n - len(b))
        if not chunk:
            raise EOFError
        b += chunk
    return b


def read_msg():
    head = recv_exact(5)
    tag, n = head[:1], struct.unpack("!i", head[1:])[0]
    return tag, recv_exact(n - 4)


def fields(body):
    out = {}
    for part in body.split(b"\0"):
        if part:
            out[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return out


def read_until(stop):
    """Reads messages until one tagged in `stop` (or the end)."""
    while True:
        try:
            tag, body = read_msg()
        except (EOFError, OSError):
            result["closed"] = True
            return None
        if tag == b"E":
            result["errors"].append(fields(body))
        elif tag == b"C":
            result["tags"].append(body.rstrip(b"\0").decode())
        if tag in stop:
            return tag


params = b"user\0agent\0database\0postgres\0\0"
s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
if read_until((b"Z",)) is None or spec["mode"] == "login":
    result["logged_in"] = not result["closed"] and not result["errors"]
    print(json.dumps(result))
    sys.exit(0)
result["logged_in"] = True


def stream(total):
    """Sends `total` body bytes in 1 MiB pieces, pausing once halfway."""
    piece = b"x" * (1 << 20)
    paused = False
    while result["sent"] < total:
        n = min(len(piece), total - result["sent"])
        try:
            s.sendall(piece[:n])
        except OSError as e:
            result["send_error"] = str(e)
            return
        result["sent"] += n
        if not paused and result["sent"] >= total // 2:
            paused = True
            print(json.dumps({"half": True}), flush=True)
            sys.stdin.readline()


if spec["mode"] == "oversized_query":
    s.sendall(b"Q" + struct.pack("!i", spec["claim"]))
    stream(spec["send"])
    read_until(())
elif spec["mode"] == "copy_big":
    q = ("copy %s from stdin" % spec["table"]).encode() + b"\0"
    s.sendall(b"Q" + struct.pack("!i", 4 + len(q)) + q)
    if read_until((b"G", b"Z")) == b"G":
        row = b"y" * (spec["width"] - 1) + b"\n"
        body_len = spec["rows"] * len(row)
        s.sendall(b"d" + struct.pack("!i", 4 + body_len))
        per = max(1, (1 << 20) // len(row))
        chunk = row * per
        sent_rows = 0
        paused = False
        while sent_rows < spec["rows"]:
            k = min(per, spec["rows"] - sent_rows)
            s.sendall(chunk if k == per else row * k)
            sent_rows += k
            result["sent"] += k * len(row)
            if not paused and sent_rows >= spec["rows"] // 2:
                paused = True
                print(json.dumps({"half": True}), flush=True)
                sys.stdin.readline()
        s.sendall(b"c" + struct.pack("!i", 4))
        read_until((b"Z",))
    s.sendall(b"X" + struct.pack("!i", 4))
print(json.dumps(result), flush=True)
