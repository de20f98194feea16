#!/usr/bin/python3
"""Real grpcio peers for tests/e2e/compat_http.rs, without generated code
(generic handlers, bytes in and out).

  compat_grpc.py server PORT [CERT KEY]   prints "ready", serves test.Svc
  compat_grpc.py client TARGET [CA]       prints one JSON object of results
"""
import json
import sys
import time
from concurrent import futures

import grpc


def echo(req, ctx):
    if req == b"slow":
        time.sleep(3)
    ctx.set_trailing_metadata((("x-detail", "unary-ok"),))
    return b"echo:" + req


def items(req, ctx):
    for i in range(5):
        yield b"item%d" % i
        time.sleep(0.2)
    ctx.set_trailing_metadata((("x-detail", "stream-done"),))


def fail(req, ctx):
    ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + req.decode())


def total(it, ctx):
    return b"%d" % sum(len(x) for x in it)


def bidi(it, ctx):
    for x in it:
        yield b"re:" + x


def server(port, cert=None, key=None):
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Items": grpc.unary_stream_rpc_method_handler(items),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Sum": grpc.stream_unary_rpc_method_handler(total),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
    }
    s = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    s.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Svc", handlers),))
    addr = "127.0.0.1:%d" % port
    if cert:
        creds = grpc.ssl_server_credentials([(open(key, "rb").read(), open(cert, "rb").read())])
        s.add_secure_port(addr, creds)
    else:
        s.add_insecure_port(addr)
    s.start()
    print("ready", flush=True)
    s.wait_for_termination()


def client(target, ca=None):
    opts = [("grpc.enable_http_proxy", 0)]
    if ca:
        creds = grpc.ssl_channel_credentials(root_certificates=open(ca, "rb").read())
        ch = grpc.secure_channel(target, creds, options=opts)
    else:
        ch = grpc.insecure_channel(target, options=opts)
    out = {}
    try:
        resp, call = ch.unary_unary("/test.Svc/Echo").with_call(b"hi", timeout=10)
        out["unary"] = resp.decode()
        out["unary_trailer"] = dict(call.trailing_metadata()).get("x-detail")
        out["unary_code"] = str(call.code())
        t0 = time.time()
        stream = ch.unary_stream("/test.Svc/Items")(b"", timeout=10)
        got = []
        for m in stream:
            got.append((m.decode(), round(time.time() - t0, 3)))
        out["stream"] = [g[0] for g in got]
        out["stream_times"] = [g[1] for g in got]
        out["stream_trailer"] = dict(stream.trailing_metadata()).get("x-detail")
        try:
            ch.unary_unary("/test.Svc/Fail")(b"widget", timeout=10)
            out["fail"] = "no error"
        except grpc.RpcError as e:
            out["fail"] = [str(e.code()), e.details()]
        t0 = time.time()
        try:
            ch.unary_unary("/test.Svc/Echo")(b"slow", timeout=0.5)
            out["deadline"] = "no error"
        except grpc.RpcError as e:
            out["deadline"] = str(e.code())
        out["deadline_after"] = round(time.time() - t0, 3)
        out["sum"] = ch.stream_unary("/test.Svc/Sum")(iter([b"a", b"bb", b"ccc"]), timeout=10).decode()
        out["bidi"] = [m.decode() for m in ch.stream_stream("/test.Svc/Bidi")(iter([b"x", b"y"]), timeout=10)]
    except grpc.RpcError as e:
        out["error"] = [str(e.code()), e.details()]
    except Exception as e:  # noqa: BLE001
        out["error"] = repr(e)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(int(sys.argv[2]), *sys.argv[3:5])
    else:
        client(sys.argv[2], *sys.argv[3:4])
