//! The fleet store: one PostgreSQL database every node of a fleet shares.
//!
//! Owns the connection (reconnecting lazily, every operation bounded in
//! time), the versioned schema and every statement run against it. It must
//! not hold JIT state of its own (the [`crate::jit::Jit`] of each node is the
//! cache the data path reads) nor read the audit files.

use std::time::Duration;

use serde_json::Value;
use tokio::sync::Mutex;
use tokio_postgres::Client;

use super::tls::{MakeRustls, RustlsStream};
use tracing::debug;

use super::FleetError;
use crate::jit::{AccessRequest, Grant, Status};

/// The channel every change is announced on (by triggers, so that any
/// writer, including an operator's own SQL, wakes the nodes).
pub const CHANNEL: &str = "portcullis_fleet";
/// Longest any one store operation may take before it counts as the store
/// being unreachable.
pub const OP_TIMEOUT: Duration = Duration::from_secs(3);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long decided requests stay listed.
const KEEP_DECIDED: &str = "24 hours";
/// Most requests a listing returns.
const LIST_MAX: i64 = 1000;

/// Versioned migrations, applied in order under an advisory lock, each in
/// the same transaction as its row in `portcullis_schema` (several daemons
/// starting at once apply each exactly once).
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        r#"
CREATE TABLE portcullis_requests (
    id text PRIMARY KEY,
    node text NOT NULL,
    status text NOT NULL,
    body jsonb NOT NULL,
    created_ms bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX portcullis_requests_status ON portcullis_requests (status, updated_at);
CREATE TABLE portcullis_grants (
    id text PRIMARY KEY,
    body jsonb NOT NULL,
    expires_ms bigint NOT NULL,
    revoked_by text,
    revoked_ms bigint
);
CREATE TABLE portcullis_audit (
    node text NOT NULL,
    seq bigint NOT NULL,
    hash text NOT NULL,
    line text NOT NULL,
    PRIMARY KEY (node, seq)
);
CREATE TABLE portcullis_nodes (
    node text PRIMARY KEY,
    pubkey text,
    local_seq bigint NOT NULL DEFAULT 0,
    shipped_seq bigint NOT NULL DEFAULT 0,
    seen_at timestamptz NOT NULL DEFAULT now()
);
CREATE FUNCTION portcullis_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('portcullis_fleet', TG_ARGV[0] || NEW.id);
    RETURN NEW;
END $$;
CREATE TRIGGER portcullis_requests_notify AFTER INSERT OR UPDATE ON portcullis_requests
    FOR EACH ROW EXECUTE FUNCTION portcullis_notify('r:');
CREATE TRIGGER portcullis_grants_notify AFTER INSERT OR UPDATE ON portcullis_grants
    FOR EACH ROW EXECUTE FUNCTION portcullis_notify('g:');
"#,
    ),
    // Audit in one row per shipped run of lines instead of one per line:
    // with lz4 TOAST compression the store spends less than half the CPU
    // per line (docs/fleet.md, "Cost to the node"). `portcullis_audit`
    // stays, as a view, for anyone who reads it with SQL.
    (
        2,
        r#"
CREATE TABLE portcullis_audit_batches (
    node text NOT NULL,
    first_seq bigint NOT NULL,
    last_seq bigint NOT NULL,
    lines text NOT NULL,
    PRIMARY KEY (node, first_seq),
    CHECK (last_seq >= first_seq)
);
CREATE INDEX portcullis_audit_batches_last ON portcullis_audit_batches (node, last_seq);
DO $$
BEGIN
    -- PostgreSQL 14+ built with lz4; any other store keeps its default.
    EXECUTE 'ALTER TABLE portcullis_audit_batches ALTER COLUMN lines SET COMPRESSION lz4';
EXCEPTION WHEN others THEN
    RAISE NOTICE 'portcullis: shipped audit stored with the default compression: %', SQLERRM;
END $$;
INSERT INTO portcullis_audit_batches (node, first_seq, last_seq, lines)
    SELECT node, seq, seq, line FROM portcullis_audit;
DROP TABLE portcullis_audit;
CREATE VIEW portcullis_audit AS
    SELECT b.node, b.first_seq + l.n - 1 AS seq,
           substring(l.line FROM ',"hash":"([0-9a-f]{64})"}$') AS hash, l.line
    FROM portcullis_audit_batches b,
         unnest(string_to_array(b.lines, E'\n')) WITH ORDINALITY AS l(line, n);
-- A daemon of the first schema, still running during a rolling upgrade,
-- keeps shipping through the view (its COPY and INSERT land here): one
-- row per line, a seq the node already has keeps its first copy.
CREATE FUNCTION portcullis_audit_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(734002, hashtext(NEW.node));
    IF NEW.seq > (SELECT coalesce(max(last_seq), 0) FROM portcullis_audit_batches
                  WHERE node = NEW.node) THEN
        INSERT INTO portcullis_audit_batches (node, first_seq, last_seq, lines)
            VALUES (NEW.node, NEW.seq, NEW.seq, NEW.line);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER portcullis_audit_insert INSTEAD OF INSERT ON portcullis_audit
    FOR EACH ROW EXECUTE FUNCTION portcullis_audit_insert();
"#,
    ),
];

/// What the store says about a request another node tried to end.
#[derive(Debug)]
pub enum Ended {
    /// This answer was recorded.
    Recorded,
    /// Someone answered first: their answer.
    Already(Box<AccessRequest>),
    /// The store does not know the request.
    Unknown,
}

/// What [`Store::snapshot`] returns.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Pending requests and those decided recently, every node's.
    pub requests: Vec<AccessRequest>,
    /// Grants in force (not revoked, not expired).
    pub grants: Vec<Grant>,
    /// Of the grant ids asked about, those revoked, with who revoked them.
    pub revoked: Vec<(String, String)>,
}

/// A lazily (re)connected client of the store.
pub struct Store {
    config: tokio_postgres::Config,
    tls: MakeRustls,
    client: Mutex<Option<Client>>,
}

/// A store connection: the task that drives it, and where LISTEN's
/// notifications arrive.
pub type Connection =
    tokio_postgres::Connection<tokio_postgres::Socket, RustlsStream<tokio_postgres::Socket>>;

fn unreachable(e: impl std::fmt::Display) -> FleetError {
    FleetError::Unreachable(e.to_string())
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn parse_request(v: Value) -> Result<AccessRequest, FleetError> {
    serde_json::from_value(v).map_err(|e| FleetError::Store(format!("a request row: {e}")))
}

fn parse_grant(v: Value) -> Result<Grant, FleetError> {
    serde_json::from_value(v).map_err(|e| FleetError::Store(format!("a grant row: {e}")))
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<Value, FleetError> {
    serde_json::to_value(v).map_err(|e| FleetError::Store(e.to_string()))
}

impl Store {
    /// A store client for `config` with `tls` (not connected yet).
    pub fn new(mut config: tokio_postgres::Config, tls: MakeRustls, application: &str) -> Self {
        config
            .connect_timeout(CONNECT_TIMEOUT)
            .application_name(application);
        Self {
            config,
            tls,
            client: Mutex::new(None),
        }
    }

    /// Opens a separate connection whose notifications the caller polls
    /// (LISTEN).
    pub async fn connect_raw(&self) -> Result<(Client, Connection), FleetError> {
        tokio::time::timeout(OP_TIMEOUT, self.config.connect(self.tls.clone()))
            .await
            .map_err(|_| unreachable("connecting timed out"))?
            .map_err(unreachable)
    }

    /// Runs `op` on the shared connection (connecting first if needed),
    /// bounded by [`OP_TIMEOUT`]. A broken connection is dropped so that
    /// the next call reconnects.
    async fn with<T>(&self, op: impl for<'c> AsyncOp<'c, T>) -> Result<T, FleetError> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            let (client, conn) = self.connect_raw().await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!("fleet store connection ended: {e}");
                }
            });
            *guard = Some(client);
        }
        let Some(client) = guard.as_mut() else {
            return Err(unreachable("no connection"));
        };
        let result = tokio::time::timeout(OP_TIMEOUT, op.run(client)).await;
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                let closed = client.is_closed() || e.is_closed();
                if closed {
                    *guard = None;
                    Err(unreachable(e))
                } else {
                    Err(FleetError::Store(db_message(&e)))
                }
            }
            Err(_) => {
                *guard = None;
                Err(unreachable("the store did not answer in time"))
            }
        }
    }

    /// Creates or upgrades the schema.
    pub async fn migrate(&self) -> Result<(), FleetError> {
        self.with(Migrate { upto: i32::MAX }).await
    }

    /// Applies the migrations up to `version` only: what a daemon of that
    /// schema would have left (tests of upgrades).
    #[doc(hidden)]
    pub async fn migrate_to(&self, version: i32) -> Result<(), FleetError> {
        self.with(Migrate { upto: version }).await
    }

    /// Records a new request (this node holds it).
    pub async fn insert_request(&self, r: &AccessRequest) -> Result<(), FleetError> {
        let body = to_value(r)?;
        let r = r.clone();
        self.with(op(move |c: &mut Client| {
            let body = body.clone();
            let r = r.clone();
            Box::pin(async move {
                c.execute(
                    "INSERT INTO portcullis_requests (id, node, status, body, created_ms) \
                     VALUES ($1, $2, $3, $4, $5)",
                    &[
                        &r.id,
                        &r.node.clone().unwrap_or_default(),
                        &r.status.label(),
                        &body,
                        &as_i64(r.created_ms),
                    ],
                )
                .await
                .map(|_| ())
            }) as BoxOp<'_, ()>
        }))
        .await
    }

    /// Ends request `id` with `status` unless it was answered already
    /// (the store decides races: the first answer wins). With `grant`, the
    /// grant is recorded in the same transaction.
    pub async fn end_request(
        &self,
        id: &str,
        status: Status,
        grant: Option<Grant>,
    ) -> Result<(Ended, Option<AccessRequest>), FleetError> {
        let id = id.to_string();
        let grant_body = grant.as_ref().map(to_value).transpose()?;
        let out = self
            .with(op(move |c: &mut Client| {
                let id = id.clone();
                let status = status.clone();
                let grant = grant.clone();
                let grant_body = grant_body.clone();
                Box::pin(async move {
                    let tx = c.transaction().await?;
                    let row = tx
                        .query_opt(
                            "SELECT body FROM portcullis_requests WHERE id = $1 FOR UPDATE",
                            &[&id],
                        )
                        .await?;
                    let Some(row) = row else {
                        return Ok(Err(Ended::Unknown));
                    };
                    let body: Value = row.get(0);
                    let Ok(mut request) = serde_json::from_value::<AccessRequest>(body) else {
                        return Ok(Err(Ended::Unknown));
                    };
                    if request.status != Status::Pending {
                        return Ok(Err(Ended::Already(Box::new(request))));
                    }
                    if let (Some(g), Some(gb)) = (&grant, &grant_body) {
                        tx.execute(
                            "INSERT INTO portcullis_grants (id, body, expires_ms) VALUES ($1, $2, $3)",
                            &[&g.id, gb, &as_i64(g.expires_ms)],
                        )
                        .await?;
                    }
                    request.status = status;
                    let body = serde_json::to_value(&request).unwrap_or(Value::Null);
                    tx.execute(
                        "UPDATE portcullis_requests SET status = $2, body = $3, updated_at = now() \
                         WHERE id = $1",
                        &[&id, &request.status.label(), &body],
                    )
                    .await?;
                    tx.commit().await?;
                    Ok(Ok(request))
                }) as BoxOp<'_, Result<AccessRequest, Ended>>
            }))
            .await?;
        Ok(match out {
            Ok(r) => (Ended::Recorded, Some(r)),
            Err(e) => (e, None),
        })
    }

    /// Records a grant.
    pub async fn insert_grant(&self, g: &Grant) -> Result<(), FleetError> {
        let body = to_value(g)?;
        let g = g.clone();
        self.with(op(move |c: &mut Client| {
            let body = body.clone();
            let g = g.clone();
            Box::pin(async move {
                c.execute(
                    "INSERT INTO portcullis_grants (id, body, expires_ms) VALUES ($1, $2, $3)",
                    &[&g.id, &body, &as_i64(g.expires_ms)],
                )
                .await
                .map(|_| ())
            }) as BoxOp<'_, ()>
        }))
        .await
    }

    /// Revokes a grant; returns it, or why not.
    pub async fn revoke(&self, id: &str, by: &str, now_ms: u64) -> Result<Grant, FleetError> {
        let (id, by) = (id.to_string(), by.to_string());
        let row = self
            .with(op(move |c: &mut Client| {
                let (id, by) = (id.clone(), by.clone());
                Box::pin(async move {
                    let updated = c
                        .query_opt(
                            "UPDATE portcullis_grants SET revoked_by = $2, revoked_ms = $3 \
                             WHERE id = $1 AND revoked_by IS NULL AND expires_ms > $3 RETURNING body",
                            &[&id, &by, &as_i64(now_ms)],
                        )
                        .await?;
                    if let Some(r) = updated {
                        return Ok(Ok(r.get::<_, Value>(0)));
                    }
                    let why = c
                        .query_opt(
                            "SELECT revoked_by FROM portcullis_grants WHERE id = $1",
                            &[&id],
                        )
                        .await?;
                    Ok(Err(match why {
                        None => format!("no grant {id}"),
                        Some(r) => match r.get::<_, Option<String>>(0) {
                            Some(by) => format!("grant {id} was already revoked by {by}"),
                            None => format!("grant {id} has expired"),
                        },
                    }))
                }) as BoxOp<'_, Result<Value, String>>
            }))
            .await?;
        match row {
            Ok(v) => parse_grant(v),
            Err(why) => Err(FleetError::Refused(why)),
        }
    }

    /// Every node's pending and recently decided requests, and the grants
    /// in force; of `local_grants`, those revoked.
    pub async fn snapshot(
        &self,
        local_grants: Vec<String>,
        now_ms: u64,
    ) -> Result<Snapshot, FleetError> {
        let (requests, grants, revoked) = self
            .with(op(move |c: &mut Client| {
                let local_grants = local_grants.clone();
                Box::pin(async move {
                    let requests = c
                        .query(
                            &format!(
                                "SELECT body FROM portcullis_requests \
                                 WHERE status = 'pending' OR updated_at > now() - interval '{KEEP_DECIDED}' \
                                 ORDER BY created_ms DESC LIMIT {LIST_MAX}"
                            ),
                            &[],
                        )
                        .await?;
                    let grants = c
                        .query(
                            "SELECT body FROM portcullis_grants \
                             WHERE revoked_by IS NULL AND expires_ms > $1",
                            &[&as_i64(now_ms)],
                        )
                        .await?;
                    let revoked = c
                        .query(
                            "SELECT id, revoked_by FROM portcullis_grants \
                             WHERE id = ANY($1) AND revoked_by IS NOT NULL",
                            &[&local_grants],
                        )
                        .await?;
                    Ok((
                        requests.into_iter().map(|r| r.get::<_, Value>(0)).collect::<Vec<_>>(),
                        grants.into_iter().map(|r| r.get::<_, Value>(0)).collect::<Vec<_>>(),
                        revoked
                            .into_iter()
                            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                            .collect::<Vec<_>>(),
                    ))
                }) as BoxOp<'_, (Vec<Value>, Vec<Value>, Vec<(String, String)>)>
            }))
            .await?;
        let mut out = Snapshot {
            revoked,
            ..Snapshot::default()
        };
        for v in requests {
            out.requests.push(parse_request(v)?);
        }
        for v in grants {
            out.grants.push(parse_grant(v)?);
        }
        out.requests.sort_by_key(|r| r.created_ms);
        Ok(out)
    }

    /// The highest seq of `node`'s chain in the store (0: none).
    pub async fn shipped_seq(&self, node: &str) -> Result<u64, FleetError> {
        let node = node.to_string();
        self.with(op(move |c: &mut Client| {
            let node = node.clone();
            Box::pin(async move {
                let row = c
                    .query_one(
                        "SELECT coalesce(max(last_seq), 0) FROM portcullis_audit_batches WHERE node = $1",
                        &[&node],
                    )
                    .await?;
                Ok(row.get::<_, i64>(0).max(0) as u64)
            }) as BoxOp<'_, u64>
        }))
        .await
    }

    /// Copies audit lines (seq, line) of `node`, in seq order; a seq the
    /// store already has keeps its first copy (at least once, deduplicated
    /// by node and seq). Also records the node's public key and how far its
    /// local chain and its shipping are.
    ///
    /// Each run of consecutive seqs goes in as one row, its lines joined by
    /// newlines (a line never holds one), so a line's seq is its row's
    /// `first_seq` plus its position. One row per run rather than per line
    /// is what lets the store compress (lz4 TOAST): it then spends about
    /// 1.1 us of CPU per line against 2.6 for a row each (docs/fleet.md).
    /// Rows of one node never overlap: under a lock per node, the lines at
    /// or below the highest seq stored are dropped first (an answer lost in
    /// an outage, two daemons shipping under one node name).
    pub async fn ship(
        &self,
        node: &str,
        pubkey: Option<String>,
        lines: Vec<(u64, String)>,
        local_seq: u64,
    ) -> Result<(), FleetError> {
        let shipped = lines.iter().map(|l| as_i64(l.0)).max();
        // Moved once into a shared batch; the operation only borrows it.
        let batch = std::sync::Arc::new(ShipBatch {
            node: node.to_string(),
            pubkey,
            lines,
            local_seq: as_i64(local_seq),
            shipped,
        });
        self.with(op(move |c: &mut Client| {
            let batch = batch.clone();
            Box::pin(async move { batch.write(c).await }) as BoxOp<'_, ()>
        }))
        .await
    }

    /// Nodes with shipped audit, their public keys (hex) and positions.
    pub async fn audit_nodes(&self) -> Result<Vec<NodeRow>, FleetError> {
        self.with(op(|c: &mut Client| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT n AS node, k.pubkey, coalesce(k.local_seq, 0), coalesce(k.shipped_seq, 0) \
                         FROM (SELECT DISTINCT node AS n FROM portcullis_audit_batches \
                               UNION SELECT node FROM portcullis_nodes) AS names \
                         LEFT JOIN portcullis_nodes k ON k.node = names.n ORDER BY 1",
                        &[],
                    )
                    .await?;
                Ok(rows
                    .into_iter()
                    .map(|r| NodeRow {
                        node: r.get(0),
                        pubkey: r.get(1),
                        local_seq: r.get::<_, i64>(2).max(0) as u64,
                        shipped_seq: r.get::<_, i64>(3).max(0) as u64,
                    })
                    .collect())
            }) as BoxOp<'_, Vec<NodeRow>>
        }))
        .await
    }

    /// `node`'s shipped lines with seq `from` or above, in order, from at
    /// most `max_rows` stored rows (runs of up to [`super::ship::BATCH`]
    /// lines); empty when there are none. A line's seq is as stored: its
    /// row's `first_seq` plus its position in the row.
    pub async fn audit_lines(
        &self,
        node: &str,
        from: u64,
        max_rows: u64,
    ) -> Result<Vec<(u64, String)>, FleetError> {
        let node = node.to_string();
        self.with(op(move |c: &mut Client| {
            let node = node.clone();
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT first_seq, lines FROM portcullis_audit_batches \
                         WHERE node = $1 AND last_seq >= $2 ORDER BY first_seq LIMIT $3",
                        &[&node, &as_i64(from), &as_i64(max_rows)],
                    )
                    .await?;
                let mut out = Vec::new();
                for r in rows {
                    let first = r.get::<_, i64>(0).max(0) as u64;
                    let lines: &str = r.get(1);
                    out.extend(
                        (first..)
                            .zip(lines.split('\n'))
                            .filter(|(seq, _)| *seq >= from)
                            .map(|(seq, line)| (seq, line.to_string())),
                    );
                }
                Ok(out)
            }) as BoxOp<'_, Vec<(u64, String)>>
        }))
        .await
    }
}

/// A node as the store knows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeRow {
    /// Name.
    pub node: String,
    /// Hex Ed25519 checkpoint key, once shipped.
    pub pubkey: Option<String>,
    /// The last seq the node had written locally when it last shipped.
    pub local_seq: u64,
    /// The last seq shipped.
    pub shipped_seq: u64,
}

/// PostgreSQL's own message for a failed statement.
fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// One round of shipped audit lines and the node's positions.
struct ShipBatch {
    node: String,
    pubkey: Option<String>,
    lines: Vec<(u64, String)>,
    local_seq: i64,
    shipped: Option<i64>,
}

/// Key class of the per-node shipping lock (`pg_advisory_xact_lock(class,
/// hashtext(node))`), apart from the migration's single-key lock; the
/// second migration's trigger takes the same lock.
const SHIP_LOCK_CLASS: i32 = 734_002;

impl ShipBatch {
    /// The rows and the node's row, in one transaction.
    async fn write(&self, c: &mut Client) -> Result<(), tokio_postgres::Error> {
        let tx = c.transaction().await?;
        if !self.lines.is_empty() {
            tx.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                &[&SHIP_LOCK_CLASS, &self.node],
            )
            .await?;
            let stored: i64 = tx
                .query_one(
                    "SELECT coalesce(max(last_seq), 0) FROM portcullis_audit_batches WHERE node = $1",
                    &[&self.node],
                )
                .await?
                .get(0);
            let runs = runs_after(&self.lines, stored.max(0) as u64);
            let kept: usize = runs.iter().map(|r| r.lines.len()).sum();
            if kept < self.lines.len() {
                debug!(node = %self.node, stored, "shipped lines already in the store: keeping the first copy");
            }
            for run in runs {
                tx.execute(
                    "INSERT INTO portcullis_audit_batches (node, first_seq, last_seq, lines) \
                     VALUES ($1, $2, $3, $4)",
                    &[
                        &self.node,
                        &as_i64(run.first),
                        &as_i64(run.last),
                        &run.joined(),
                    ],
                )
                .await?;
            }
        }
        tx.execute(
            "INSERT INTO portcullis_nodes (node, pubkey, local_seq, shipped_seq, seen_at) \
             VALUES ($1, $2, $3, coalesce($4::bigint, 0), now()) \
             ON CONFLICT (node) DO UPDATE SET \
               pubkey = coalesce(EXCLUDED.pubkey, portcullis_nodes.pubkey), \
               local_seq = EXCLUDED.local_seq, \
               shipped_seq = greatest(portcullis_nodes.shipped_seq, coalesce($4::bigint, portcullis_nodes.shipped_seq)), \
               seen_at = now()",
            &[&self.node, &self.pubkey, &self.local_seq, &self.shipped],
        )
        .await?;
        tx.commit().await
    }
}

/// A run of lines with consecutive seqs: one stored row.
#[derive(Debug, PartialEq, Eq)]
struct Run<'a> {
    first: u64,
    last: u64,
    lines: Vec<&'a str>,
}

impl Run<'_> {
    fn joined(&self) -> String {
        self.lines.join("\n")
    }
}

/// `lines` above seq `stored`, each above every one before it (a seq seen
/// once keeps its first copy), cut into runs of consecutive seqs.
fn runs_after(lines: &[(u64, String)], stored: u64) -> Vec<Run<'_>> {
    let mut runs: Vec<Run<'_>> = Vec::new();
    let mut top = stored;
    for (seq, line) in lines {
        if *seq <= top {
            continue;
        }
        top = *seq;
        match runs.last_mut() {
            Some(run) if run.last + 1 == *seq => {
                run.last = *seq;
                run.lines.push(line);
            }
            _ => runs.push(Run {
                first: *seq,
                last: *seq,
                lines: vec![line],
            }),
        }
    }
    runs
}

/// A boxed store operation borrowing the client.
pub type BoxOp<'c, T> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send + 'c>,
>;

/// An operation on the client; closures returning a [`BoxOp`] are ones.
pub trait AsyncOp<'c, T> {
    /// Runs it.
    fn run(&self, client: &'c mut Client) -> BoxOp<'c, T>;
}

impl<'c, T, F> AsyncOp<'c, T> for F
where
    F: Fn(&'c mut Client) -> BoxOp<'c, T>,
{
    fn run(&self, client: &'c mut Client) -> BoxOp<'c, T> {
        self(client)
    }
}

/// Gives a closure the higher-ranked signature [`AsyncOp`] needs.
fn op<T, F>(f: F) -> F
where
    F: for<'c> Fn(&'c mut Client) -> BoxOp<'c, T>,
{
    f
}

struct Migrate {
    upto: i32,
}

impl<'c> AsyncOp<'c, ()> for Migrate {
    fn run(&self, c: &'c mut Client) -> BoxOp<'c, ()> {
        let upto = self.upto;
        Box::pin(async move {
            let tx = c.transaction().await?;
            // One migrator at a time across the fleet; the lock ends with
            // the transaction.
            tx.execute("SELECT pg_advisory_xact_lock(7340018217)", &[])
                .await?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS portcullis_schema (\
                   version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .await?;
            let done: Vec<i32> = tx
                .query("SELECT version FROM portcullis_schema", &[])
                .await?
                .into_iter()
                .map(|r| r.get(0))
                .collect();
            for (version, sql) in MIGRATIONS {
                if done.contains(version) || *version > upto {
                    continue;
                }
                tx.batch_execute(sql).await?;
                tx.execute(
                    "INSERT INTO portcullis_schema (version) VALUES ($1)",
                    &[version],
                )
                .await?;
            }
            tx.commit().await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(seqs: &[u64]) -> Vec<(u64, String)> {
        seqs.iter()
            .map(|s| (*s, format!("{{\"seq\":{s}}}")))
            .collect()
    }

    fn shape(runs: &[Run<'_>]) -> Vec<(u64, u64, usize)> {
        runs.iter()
            .map(|r| (r.first, r.last, r.lines.len()))
            .collect()
    }

    #[test]
    fn a_batch_is_cut_into_runs_of_consecutive_seqs_above_the_store() {
        let l = lines(&[1, 2, 3]);
        assert_eq!(shape(&runs_after(&l, 0)), vec![(1, 3, 3)]);
        assert_eq!(
            runs_after(&l, 0)[0].joined(),
            "{\"seq\":1}\n{\"seq\":2}\n{\"seq\":3}"
        );
        // What the store has keeps its first copy.
        assert_eq!(shape(&runs_after(&l, 2)), vec![(3, 3, 1)]);
        assert!(runs_after(&l, 3).is_empty());
        // A gap starts a new row, so position + first_seq stays the seq.
        let l = lines(&[4, 5, 7, 8]);
        assert_eq!(shape(&runs_after(&l, 0)), vec![(4, 5, 2), (7, 8, 2)]);
        // A seq seen once in the batch is not stored twice, nor one going back.
        let l = lines(&[4, 5, 5, 3, 6]);
        let runs = runs_after(&l, 0);
        assert_eq!(shape(&runs), vec![(4, 6, 3)]);
        assert_eq!(runs[0].lines[1], "{\"seq\":5}");
    }
}
