# Real PostgreSQL drivers, scenario by scenario, for the compatibility
# tests (tests/e2e/compat_pg.rs): run once directly against the server and
# once through Portcullis, and the two JSON outputs must be equal.
#
# argv[1]: {"dsn": libpq conninfo, "scenarios": [names] (empty: all)}.
# Prints {scenario: result}; a result is what the driver returned, made
# deterministic (repr of values), or {"error": "<exception class>: <message>"}.
import asyncio
import io
import json
import sys
import threading
import time

import asyncpg
import psycopg
from psycopg import sql  # noqa: F401  (psycopg.sql is part of the API surface tried)

ARGS = json.loads(sys.argv[1])
DSN = ARGS["dsn"]

TYPES = (
    "select 1::int2 as i2, 2::int4 as i4, 3::int8 as i8, 1.5::float4 as f4, 2.5::float8 as f8,"
    " 12.345::numeric as num, true as b, 'txt'::text as t, 'vc'::varchar as vc, 'c'::char(3) as ch,"
    " decode('0102ff', 'hex') as by, '2024-02-29'::date as d, '12:34:56'::time as tm,"
    " '2024-02-29 12:34:56'::timestamp as ts, '2024-02-29 12:34:56+00'::timestamptz as tstz,"
    " '1 day 2 hours'::interval as iv, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid as u,"
    " '{\"a\": [1, 2]}'::json as j, '{\"a\": [1, 2]}'::jsonb as jb, array[1, 2, 3] as ai,"
    " array['a', null, 'c'] as at, '192.168.0.1'::inet as ip, '10.0.0.0/8'::cidr as net,"
    " null::text as n, 'caf\u00e9 \u2603'::text as uni"
)


def pg_kwargs():
    """asyncpg arguments from the libpq conninfo."""
    kv = dict(p.split("=", 1) for p in DSN.split())
    out = {
        "host": kv.get("host"),
        "port": int(kv.get("port", 5432)),
        "user": kv.get("user"),
        "database": kv.get("dbname"),
        "ssl": False if kv.get("sslmode", "disable") == "disable" else "require",
    }
    if kv.get("password"):
        out["password"] = kv["password"]
    return out


def rows(cur):
    return [[repr(v) for v in r] for r in cur.fetchall()]


def err(e):
    return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}


def psycopg_simple():
    with psycopg.connect(DSN, autocommit=True) as c:
        cur = psycopg.ClientCursor(c)
        cur.execute("select 1 as a, 'x' as b, null::int as c; select 2")
        first = rows(cur)
        cur.nextset()
        second = rows(cur)
        cur.execute("select %s::int + 1, %s::text", (41, "it's"))
        return {"batch": [first, second], "bound": rows(cur)}


def psycopg_extended():
    with psycopg.connect(DSN, autocommit=True) as c:
        cur = c.cursor()
        cur.execute("select %s::int + 1, %s::text, %s::numeric", (41, "x", 1.25))
        out = rows(cur)
        cur.execute("select generate_series(1, %s)", (5,))
        return {"one": out, "series": rows(cur), "desc": [d.name for d in cur.description]}


def psycopg_types(binary):
    with psycopg.connect(DSN, autocommit=True) as c:
        cur = c.cursor(binary=binary)
        cur.execute(TYPES)
        return {"cols": [d.name for d in cur.description], "rows": rows(cur)}


def psycopg_prepared():
    with psycopg.connect(DSN, autocommit=True, prepare_threshold=0) as c:
        out = []
        for i in range(5):
            out.append(c.execute("select %s::int * 2", (i,), prepare=True).fetchone()[0])
        return out


def psycopg_pipeline():
    with psycopg.connect(DSN, autocommit=True) as c:
        c.execute("drop table if exists compat_pipe")
        c.execute("create table compat_pipe(id int primary key, v text)")
        with c.pipeline():
            for i in range(10):
                c.execute("insert into compat_pipe values (%s, %s)", (i, f"v{i}"))
            cur = c.execute("select count(*), max(v) from compat_pipe")
        out = rows(cur)
        failed = None
        try:
            with c.pipeline():
                c.execute("insert into compat_pipe values (%s, %s)", (1, "dup"))
                c.execute("select 1")
        except psycopg.Error as e:
            failed = type(e).__name__
        return {"rows": out, "failed": failed, "after": c.execute("select count(*) from compat_pipe").fetchone()[0]}


def psycopg_copy():
    with psycopg.connect(DSN, autocommit=True) as c:
        c.execute("drop table if exists compat_copy")
        c.execute("create table compat_copy(id int, t text, d date)")
        cur = c.cursor()
        with cur.copy("copy compat_copy from stdin") as cp:
            for i in range(100):
                cp.write_row((i, f"row\t{i}\\", "2024-01-01"))
        with cur.copy("copy compat_copy (id, t) from stdin (format binary)") as cp:
            cp.set_types(["int4", "text"])
            cp.write_row((1000, "binary"))
        out = []
        with cur.copy("copy compat_copy to stdout") as cp:
            for r in cp.rows():
                out.append(list(r))
        binary = []
        with cur.copy("copy (select id, t from compat_copy where id >= 99 order by id) to stdout (format binary)") as cp:
            cp.set_types(["int4", "text"])
            for r in cp.rows():
                binary.append(list(r))
        return {"text": len(out), "first": out[:3], "binary": binary}


def psycopg_listen():
    with psycopg.connect(DSN, autocommit=True) as a, psycopg.connect(DSN, autocommit=True) as b:
        a.execute("listen compat_ch")
        b.execute("notify compat_ch, 'hello'")
        b.execute("select pg_notify('compat_ch', 'second')")
        got = [n.payload for n in a.notifies(timeout=10, stop_after=2)]
        return got


def psycopg_cursor():
    with psycopg.connect(DSN) as c:
        cur = c.cursor(name="compat_named", scrollable=True)
        cur.execute("select i, i * i from generate_series(1, 100) i")
        first = cur.fetchmany(3)
        cur.scroll(50, mode="absolute")
        later = cur.fetchone()
        rest = len(cur.fetchall())
        cur.close()
        wh = c.cursor(name="compat_hold", withhold=True)
        wh.execute("select 1")
        held = wh.fetchall()
        wh.close()
        return {"first": first, "later": later, "rest": rest, "held": held}


def psycopg_cancel():
    with psycopg.connect(DSN, autocommit=True) as c:
        def cancel_later():
            time.sleep(0.5)
            try:
                c.cancel_safe(timeout=10)
                result["cancel"] = "ok"
            except Exception as e:  # noqa: BLE001
                result["cancel"] = err(e)

        result = {}
        t = threading.Thread(target=cancel_later)
        t.start()
        try:
            c.execute("select pg_sleep(20)")
            result["query"] = "finished"
        except psycopg.Error as e:
            result["query"] = type(e).__name__
        t.join()
        result["after"] = c.execute("select 1").fetchone()[0]
        return result


def psycopg_twophase():
    with psycopg.connect(DSN) as c:
        c.execute("drop table if exists compat_tpc")
        c.execute("create table compat_tpc(v int)")
        c.commit()
        xid = c.xid(1, "compat-gtrid", "compat-bqual")
        c.tpc_begin(xid)
        c.execute("insert into compat_tpc values (1)")
        c.tpc_prepare()
        c.tpc_commit()
        return c.execute("select count(*) from compat_tpc").fetchone()[0]


async def _asyncpg_codecs():
    c = await asyncpg.connect(**pg_kwargs())
    try:
        r = await c.fetchrow(TYPES)
        return {k: repr(v) for k, v in r.items()}
    finally:
        await c.close()


async def _asyncpg_introspection():
    c = await asyncpg.connect(**pg_kwargs())
    try:
        await c.execute("drop table if exists compat_intro; drop type if exists compat_mood; drop type if exists compat_pair")
        await c.execute("create type compat_mood as enum ('sad', 'happy'); create type compat_pair as (a int, b text)")
        await c.execute("create table compat_intro(m compat_mood, p compat_pair, ms compat_mood[])")
        await c.execute("insert into compat_intro values ('happy', (1, 'x'), '{sad,happy}')")
        r = await c.fetchrow("select m, p, ms from compat_intro")
        await c.execute("insert into compat_intro values ($1, $2, $3)", "sad", (2, "y"), ["happy"])
        n = await c.fetchval("select count(*) from compat_intro")
        return {"row": [repr(v) for v in r.values()], "count": n}
    finally:
        await c.close()


async def _asyncpg_executemany():
    c = await asyncpg.connect(**pg_kwargs())
    try:
        await c.execute("drop table if exists compat_many; create table compat_many(id int, v text)")
        await c.executemany("insert into compat_many values ($1, $2)", [(i, f"v{i}") for i in range(50)])
        return await c.fetchval("select sum(id) from compat_many")
    finally:
        await c.close()


async def _asyncpg_copy():
    c = await asyncpg.connect(**pg_kwargs())
    try:
        await c.execute("drop table if exists compat_acopy; create table compat_acopy(id int, v text, d date)")
        import datetime
        res = await c.copy_records_to_table(
            "compat_acopy", records=[(i, f"r{i}", datetime.date(2024, 1, 1)) for i in range(200)]
        )
        buf = io.BytesIO()
        out = await c.copy_from_table("compat_acopy", output=buf)
        qbuf = io.BytesIO()
        qout = await c.copy_from_query("select id from compat_acopy where id < 3 order by id", output=qbuf)
        return {"in": res, "out": out, "bytes": len(buf.getvalue()), "query": [out, qout, qbuf.getvalue().decode()]}
    finally:
        await c.close()


async def _asyncpg_listen():
    c = await asyncpg.connect(**pg_kwargs())
    d = await asyncpg.connect(**pg_kwargs())
    try:
        got = []
        done = asyncio.Event()

        def on(_conn, _pid, channel, payload):
            got.append([channel, payload])
            if len(got) == 2:
                done.set()

        await c.add_listener("compat_ach", on)
        await d.execute("notify compat_ach, 'one'")
        await d.execute("select pg_notify('compat_ach', 'two')")
        await asyncio.wait_for(done.wait(), 10)
        await c.remove_listener("compat_ach", on)
        return got
    finally:
        await c.close()
        await d.close()


async def _asyncpg_pool():
    pool = await asyncpg.create_pool(min_size=2, max_size=4, **pg_kwargs())
    try:
        vals = await asyncio.gather(*[pool.fetchval("select $1::int * 3", i) for i in range(20)])
        async with pool.acquire() as con:
            async with con.transaction():
                await con.execute("select 1")
        return sum(vals)
    finally:
        await pool.close()


async def _asyncpg_cancel():
    c = await asyncpg.connect(**pg_kwargs())
    try:
        try:
            await c.execute("select pg_sleep(20)", timeout=0.5)
            first = "finished"
        except asyncio.TimeoutError:
            first = "timeout"
        return {"first": first, "after": await c.fetchval("select 7")}
    finally:
        await c.close()


def run_async(f):
    return lambda: asyncio.run(f())


SCENARIOS = {
    "psycopg_simple": psycopg_simple,
    "psycopg_extended": psycopg_extended,
    "psycopg_text": lambda: psycopg_types(False),
    "psycopg_binary": lambda: psycopg_types(True),
    "psycopg_prepared": psycopg_prepared,
    "psycopg_pipeline": psycopg_pipeline,
    "psycopg_copy": psycopg_copy,
    "psycopg_listen": psycopg_listen,
    "psycopg_cursor": psycopg_cursor,
    "psycopg_cancel": psycopg_cancel,
    "psycopg_twophase": psycopg_twophase,
    "asyncpg_codecs": run_async(_asyncpg_codecs),
    "asyncpg_introspection": run_async(_asyncpg_introspection),
    "asyncpg_executemany": run_async(_asyncpg_executemany),
    "asyncpg_copy": run_async(_asyncpg_copy),
    "asyncpg_listen": run_async(_asyncpg_listen),
    "asyncpg_pool": run_async(_asyncpg_pool),
    "asyncpg_cancel": run_async(_asyncpg_cancel),
}

out = {}
for name in ARGS.get("scenarios") or list(SCENARIOS):
    try:
        out[name] = SCENARIOS[name]()
    except Exception as e:  # noqa: BLE001
        out[name] = err(e)
print(json.dumps(out, default=repr, sort_keys=True))
