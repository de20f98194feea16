#!/usr/bin/env python3
"""Test upstream for tests/e2e/compat_http.rs: a Server-Sent Events stream,
a `br` body sent though not offered, and an early answer to an upload.
Prints "ready" once listening; logs one JSON line per request."""
import argparse
import json
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# {"email": "dave@example.com", "ok": true} by Node's zlib.brotliCompressSync.
BR_JSON = bytes.fromhex(
    "0b14807b22656d61696c223a202264617665406578616d706c652e636f6d222c20226f6b223a20747275657d03"
)


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def log(self):
        with open(ARGS.log, "a") as f:
            f.write(json.dumps({
                "method": self.command,
                "path": self.path,
                "accept_encoding": self.headers.get("accept-encoding"),
                "t": time.time(),
            }) + "\n")

    def do_GET(self):
        self.log()
        if self.path.startswith("/sse"):
            # /sse-gzip: gzip-encoded though not offered, flushed per event.
            gz = zlib.compressobj(wbits=31) if self.path.startswith("/sse-gzip") else None
            n = 25
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            if gz:
                self.send_header("Content-Encoding", "gzip")
            self.end_headers()
            for i in range(n):
                who = f"user{i}@example.com" if i % 2 == 0 else "nobody"
                ev = f"id: {i}\nevent: tick\ndata: {{\"n\": {i}, \"who\": \"{who}\", \"t\": {time.time()}}}\n\n".encode()
                if gz:
                    ev = gz.compress(ev) + gz.flush(zlib.Z_SYNC_FLUSH)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(ev), ev))
                self.wfile.flush()
                time.sleep(0.2)
            if gz:
                tail = gz.flush()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(tail), tail))
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        elif self.path.startswith("/br"):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Encoding", "br")
            self.send_header("Content-Length", str(len(BR_JSON)))
            self.end_headers()
            self.wfile.write(BR_JSON)
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--log", required=True)
    ARGS = p.parse_args()
    srv = ThreadingHTTPServer(("127.0.0.1", ARGS.port), H)
    print("ready", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
