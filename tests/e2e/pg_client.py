"""Test client for the postgres end-to-end tests: runs steps with psycopg 3
(or raw sockets) and prints one JSON document with every step's outcome."""
import json, socket, struct, sys, threading, time

spec = json.loads(sys.argv[1])


def val(v):
    if v is None:
        return None
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).decode("utf-8", "replace")
    return str(v)


def raw(step):
    host, port = spec["host"], spec["port"]
    s = socket.create_connection((host, port), timeout=10)
    out = {"messages": []}
    if step.get("startup", True):
        params = b"user\x00agent\x00database\x00postgres\x00\x00"
        s.sendall(struct.pack("!ii", 8 + len(params), step.get("version", 196608)) + params)
        buf = b""
        while b"Z\x00\x00\x00\x05" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        out["ready"] = b"Z\x00\x00\x00\x05" in buf
        tags, i = [], 0
        while i + 5 <= len(buf):
            tags.append(chr(buf[i]))
            i += 1 + struct.unpack("!i", buf[i + 1:i + 5])[0]
        out["startup_tags"] = tags
    s.sendall(bytes.fromhex(step["hex"]))
    buf = b""
    if step.get("then_query"):
        # The session must still work: read the answer up to ReadyForQuery,
        # run a query, read its answer.
        for q in (None, step["then_query"]):
            if q is not None:
                body = q.encode() + b"\x00"
                s.sendall(b"Q" + struct.pack("!i", 4 + len(body)) + body)
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if buf.count(b"Z\x00\x00\x00\x05") >= (1 if q is None else 2):
                    break
        out["closed"] = False
        s.close()
        step = dict(step, done=True)
    try:
        if step.get("done"):
            raise socket.timeout()
        while True:
            chunk = s.recv(65536)
            if not chunk:
                out["closed"] = True
                break
            buf += chunk
    except socket.timeout:
        out["closed"] = False
    except ConnectionResetError:
        out["closed"] = True
    i = 0
    while i + 5 <= len(buf):
        tag = chr(buf[i])
        ln = struct.unpack("!i", buf[i + 1:i + 5])[0]
        body = buf[i + 5:i + 1 + ln]
        out["messages"].append({"tag": tag, "text": body.decode("utf-8", "replace")})
        i += 1 + ln
    return out


def main():
    if spec.get("raw"):
        print(json.dumps([raw(st) for st in spec["steps"]]))
        return
    import psycopg
    results = []
    conn = psycopg.connect(spec["conninfo"], autocommit=spec.get("autocommit", True))
    notices = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    for st in spec["steps"]:
        r = {}
        del notices[:]
        t0 = time.time()
        try:
            op = st.get("op", "exec")
            if op == "rollback":
                conn.rollback()
            elif op == "commit":
                conn.commit()
            elif op == "copy_out":
                cur = conn.cursor()
                data = b""
                with cur.copy(st["sql"]) as copy:
                    for chunk in copy:
                        data += bytes(chunk)
                r["text"] = data.decode("utf-8", "replace")
            else:
                if op == "cancel":
                    threading.Timer(st.get("after", 1.0), conn.cancel).start()
                cur = conn.cursor(binary=st.get("binary", False))
                cur.execute(st["sql"], st.get("params"), prepare=st.get("prepare"))
                if cur.description is not None:
                    r["rows"] = [[val(v) for v in row] for row in cur.fetchall()]
                r["rowcount"] = cur.rowcount
        except psycopg.Error as e:
            r["error"] = e.sqlstate
            r["message"] = str(e)
        r["tx"] = int(conn.info.transaction_status)
        r["notices"] = list(notices)
        r["elapsed"] = time.time() - t0
        results.append(r)
    conn.close()
    print(json.dumps(results))


main()
