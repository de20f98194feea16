#!/usr/bin/python3
"""Test upstream for the http e2e tests: an HTTPS (or plain) HTTP/1.1 server
that speaks a small generic JSON API and enough of the Kubernetes API's URL
scheme and JSON for kubectl (discovery, pods list/get/delete, secrets get,
watch streams). Every request is logged as one JSON line to --log, with the
Authorization header it carried, so tests can check credential injection.
"""
import argparse, base64, gzip, json, ssl, sys, threading, time, zlib

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit, parse_qs

_BOMBS = {}


def gzip_bomb(mb):
    """gzip of `[` + `mb` MiB of spaces + `0]` (valid JSON), built in 1 MiB
    steps; about 1000:1."""
    if mb not in _BOMBS:
        c = zlib.compressobj(9, zlib.DEFLATED, 31)
        out = [c.compress(b"[")]
        step = b" " * (1024 * 1024)
        for _ in range(mb):
            out.append(c.compress(step))
        out.append(c.compress(b"0]"))
        out.append(c.flush())
        _BOMBS[mb] = b"".join(out)
    return _BOMBS[mb]


LOCK = threading.Lock()

POD = lambda name: {
    "kind": "Pod", "apiVersion": "v1",
    "metadata": {"name": name, "namespace": "default", "uid": "uid-" + name,
                 "resourceVersion": "1", "creationTimestamp": "2026-01-01T00:00:00Z"},
    "spec": {"containers": [{"name": "app", "image": "nginx",
                             "env": [{"name": "CONTACT", "value": "ops@example.com"}]}]},
    "status": {"phase": "Running"},
}
SECRET = lambda name: {
    "kind": "Secret", "apiVersion": "v1", "type": "Opaque",
    "metadata": {"name": name, "namespace": "default", "resourceVersion": "7",
                 "creationTimestamp": "2026-01-01T00:00:00Z"},
    "data": {"password": base64.b64encode(b"hunter2-db-password").decode(),
             "username": base64.b64encode(b"admin").decode()},
    "stringData": {"note": "plaintext-note-value"},
}
API_RESOURCES = {
    "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1",
    "resources": [
        {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod",
         "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"], "shortNames": ["po"]},
        {"name": "secrets", "singularName": "secret", "namespaced": True, "kind": "Secret",
         "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]},
        {"name": "namespaces", "singularName": "namespace", "namespaced": False, "kind": "Namespace",
         "verbs": ["get", "list"]},
    ],
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def record(self, body=b""):
        entry = {"method": self.command, "path": self.path,
                 "authorization": self.headers.get("Authorization"),
                 "accept_encoding": self.headers.get("Accept-Encoding"),
                 "accept": self.headers.get("Accept"),
                 "host": self.headers.get("Host"),
                 "client_cert": self.client_cn(),
                 "body": body.decode("utf-8", "replace")}
        with LOCK:
            with open(self.server.log, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def client_cn(self):
        getpeercert = getattr(self.connection, "getpeercert", None)
        cert = getpeercert() if getpeercert else None
        for rdn in (cert or {}).get("subject", ()):
            for k, v in rdn:
                if k == "commonName":
                    return v
        return None

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            return self.rfile.read(n)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return b""

    def send_json(self, code, obj, extra=None):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def chunked(self, ctype, pieces, delay=0.0, pause_after=None):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for p in pieces:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(p), p))
            self.wfile.flush()
            if delay:
                time.sleep(delay)
            if pause_after is not None and p is pieces[pause_after]:
                time.sleep(1.0)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def handle_any(self):
        body = self.body()
        self.record(body)
        u = urlsplit(self.path)
        path, q = u.path, parse_qs(u.query)
        m = self.command
        parts = [p for p in path.split("/") if p]
        # Generic API.
        if path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            # Not real WebSocket framing: after the 101 the connection is
            # an opaque byte stream, echoed, which is all a relay sees.
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            self.close_connection = True
            while True:
                data = self.connection.recv(4096)
                if not data:
                    return
                self.connection.sendall(data.upper())
        if path == "/hello":
            return self.send_json(200, {"hello": "world", "owner": "alice@example.com"})
        if path.startswith("/items"):
            if m == "POST":
                return self.send_json(201, {"created": json.loads(body or b"null")})
            return self.send_json(200, {"method": m, "item": parts[-1]})
        if path == "/chunked":
            doc = json.dumps({"users": [{"name": "bob", "email": "bob@example.com"},
                                        {"name": "eve", "email": "eve@example.org"}],
                              "total": 2}).encode()
            return self.chunked("application/json", [doc[i:i + 7] for i in range(0, len(doc), 7)])
        if path == "/gzip":
            doc = json.dumps({"email": "carol@example.com", "ok": True}).encode()
            data = gzip.compress(doc)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if path == "/gzip-bomb":
            # A JSON array of "0," decoding to `mb` MiB, gzip'd at ~1000:1
            # and sent as one Content-Length body (large upstream frames).
            mb = int(q.get("mb", ["512"])[0])
            data = gzip_bomb(mb)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if path == "/text":
            data = b"contact dave@example.com for access\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if path == "/malformed":
            return self.chunked("application/json", [b'{"a": "x", ', b'"b": ]garbage "leak@example.com"}'])
        if path == "/big":
            n = int(q.get("n", ["1000"])[0])
            doc = json.dumps({"rows": [{"i": i, "email": "u%d@example.com" % i} for i in range(n)]}).encode()
            return self.chunked("application/json", [doc[i:i + 4096] for i in range(0, len(doc), 4096)])
        # Kubernetes.
        if path == "/api":
            return self.send_json(200, {"kind": "APIVersions", "versions": ["v1"],
                                        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:443"}]})
        if path == "/apis":
            return self.send_json(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
        if path == "/api/v1":
            return self.send_json(200, API_RESOURCES)
        if path == "/version":
            return self.send_json(200, {"major": "1", "minor": "32", "gitVersion": "v1.32.0-test"})
        if len(parts) >= 5 and parts[:4] == ["api", "v1", "namespaces", "default"]:
            kind = parts[4]
            name = parts[5] if len(parts) > 5 else None
            make = POD if kind == "pods" else SECRET if kind == "secrets" else None
            if make is None:
                return self.send_json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
            if name is None and q.get("watch", [""])[0] in ("true", "1"):
                events = []
                for i, n in enumerate(["w1", "w2", "w3"]):
                    ev = json.dumps({"type": "ADDED", "object": make(n)}).encode() + b"\n"
                    # Split each event mid-way: masking must not care.
                    events += [ev[:len(ev) // 2], ev[len(ev) // 2:]]
                # A pause after the first event: a proxy that buffers the
                # stream shows it as a late first event.
                return self.chunked("application/json", events, delay=0.05, pause_after=1)
            if name is None and m == "GET":
                lst = "PodList" if kind == "pods" else "SecretList"
                return self.send_json(200, {"kind": lst, "apiVersion": "v1", "metadata": {"resourceVersion": "10"},
                                            "items": [make("web-1"), make("web-2")]})
            if name is not None and m == "GET":
                return self.send_json(200, make(name))
            if name is not None and m == "DELETE":
                return self.send_json(200, make(name))
        return self.send_json(404, {"error": "not found", "path": path})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = handle_any


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--log", required=True)
    ap.add_argument("--client-ca", help="require client certificates from this CA")
    a = ap.parse_args()
    srv = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    srv.daemon_threads = True
    srv.log = a.log
    if a.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(a.cert, a.key)
        ctx.set_alpn_protocols(["http/1.1"])
        if a.client_ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(a.client_ca)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print("ready", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
