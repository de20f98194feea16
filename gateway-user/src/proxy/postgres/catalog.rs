//! The daemon's catalog side connections per PostgreSQL upstream, and what
//! they answer: a small bounded pool of logged-in connections shared by
//! every session of one (resource, upstream, user, database) for the
//! masking checks ([`super::maskcheck`]), the routine verdicts
//! ([`super::functions`]) and the result-column names; the catalog's
//! answers cached per *generation*; and the catalog-change signal that
//! ends a generation when anyone changes the catalog.
//!
//! The signal: an event trigger (`ddl_command_end` and `sql_drop`, enabled
//! ALWAYS) whose function runs `pg_notify('portcullis_catalog', '')`, and a
//! connection of the pool's own that LISTENs on that channel. The daemon
//! installs the trigger when its upstream role is a superuser (creating an
//! event trigger needs it); for any other role an administrator can run
//! [`INSTALL_SQL`] once (docs/postgres.md). Without it nothing is cached.
//!
//! Soundness: a cached answer is used only while (1) the signal is live
//! (the LISTEN connection is up and the triggers were verified present,
//! enabled ALWAYS and calling the daemon's function), (2) no session of
//! this daemon has a statement that may change the catalog or name
//! resolution in flight (from its decision until its transaction ends:
//! [`Pool::begin_change`], [`Pool::end_change`]), and (3) no notification,
//! proxied change, re-verification or lost listener ended the generation
//! the answer was read in. What remains is the delivery time of a
//! notification for a change another client commits directly on the
//! server (documented in docs/postgres.md and SECURITY.md).
//!
//! A session that changed the catalog in its open transaction is asked on
//! its own connection instead ([`own_lookup_messages`], [`OwnLookup`]):
//! a savepoint the lookup rolls back and releases, so nothing of it stays
//! in the agent's transaction; what it names is kept only until the
//! session's next change or the end of the transaction
//! ([`SessionChanges::keep_own_tables`]).
//!
//! Owns the side connections and the caches; it must not decide anything.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, LazyLock, Mutex, MutexGuard, Weak},
    time::{Duration, Instant},
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::{Notify, Semaphore},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    codec::{self, MAX_FRAME},
    upstream::{self, Upstream, UpstreamError},
};
use crate::proxy::Flow;

/// Side connections per pool that may run lookups at once (the listener
/// is one more).
pub const MAX_CONNECTIONS: usize = 4;
/// Longest a lookup (waiting for a connection, logging in, the query) may
/// hold a statement: a dead upstream gives an error, never a hang.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Cached answers per pool (the whole cache is dropped when full).
const MAX_ENTRIES: usize = 4096;
/// Pools kept once no session uses them. An agent can name a new user or
/// database at every connect where the resource does not fix them; past
/// this many, pools no session holds are dropped (their listeners end).
const MAX_IDLE_POOLS: usize = 64;
/// How often the listener checks that the triggers are still in place.
const VERIFY_EVERY: Duration = Duration::from_secs(5);
/// A listener whose pool saw no lookup for this long ends (and is started
/// again by the next lookup).
const LISTENER_IDLE: Duration = Duration::from_secs(600);
/// The NOTIFY channel.
pub const CHANNEL: &str = "portcullis_catalog";

/// The body of the trigger function (compared when verifying).
const FUNCTION_BODY: &str = " BEGIN PERFORM pg_catalog.pg_notify('portcullis_catalog', ''); END ";

/// Installs the catalog-change signal (idempotent; needs a superuser). An
/// administrator may run it once for a resource whose held role is not
/// one.
pub const INSTALL_SQL: &str = "SELECT pg_catalog.pg_advisory_xact_lock(7061726); \
CREATE SCHEMA IF NOT EXISTS portcullis; \
CREATE OR REPLACE FUNCTION portcullis.catalog_changed() RETURNS event_trigger LANGUAGE plpgsql AS $pcx$ BEGIN PERFORM pg_catalog.pg_notify('portcullis_catalog', ''); END $pcx$; \
DO $pcx$ BEGIN \
 IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'portcullis_ddl') THEN \
  CREATE EVENT TRIGGER portcullis_ddl ON ddl_command_end EXECUTE FUNCTION portcullis.catalog_changed(); \
 END IF; \
 IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'portcullis_drop') THEN \
  CREATE EVENT TRIGGER portcullis_drop ON sql_drop EXECUTE FUNCTION portcullis.catalog_changed(); \
 END IF; \
END $pcx$; \
ALTER EVENT TRIGGER portcullis_ddl ENABLE ALWAYS; \
ALTER EVENT TRIGGER portcullis_drop ENABLE ALWAYS";

/// Counts the triggers that are in place as installed (2 when the signal
/// can be trusted).
fn verify_sql() -> String {
    format!(
        "SELECT pg_catalog.count(*)::text FROM pg_catalog.pg_event_trigger e \
           JOIN pg_catalog.pg_proc p ON p.oid = e.evtfoid \
           JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
          WHERE ((e.evtname = 'portcullis_ddl' AND e.evtevent = 'ddl_command_end') \
              OR (e.evtname = 'portcullis_drop' AND e.evtevent = 'sql_drop')) \
            AND e.evtenabled = 'A' AND e.evttags IS NULL \
            AND n.nspname = 'portcullis' AND p.proname = 'catalog_changed' \
            AND p.prosrc = {}",
        hex_text(FUNCTION_BODY)
    )
}

/// A text literal that no session setting reads differently.
fn hex_text(s: &str) -> String {
    format!(
        "pg_catalog.convert_from(pg_catalog.decode('{}', 'hex'), 'UTF8')",
        hex::encode(s.as_bytes())
    )
}

/// Rows of a side query, as text.
pub type Rows = Vec<Vec<Option<String>>>;

/// What one pool serves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    resource: String,
    upstream: SocketAddr,
    user: String,
    database: String,
}

/// The cache and its validity.
#[derive(Default)]
struct State {
    /// Ends with every change (notification, proxied change, lost signal).
    generation: u64,
    /// Statements of this daemon that may change the catalog and whose
    /// transaction has not ended.
    in_flight: u32,
    /// The signal is live (LISTEN up, triggers verified).
    signal: bool,
    /// Counts proxied changes that ended: a verification sent before the
    /// latest one cannot make the signal live.
    changes_ended: u64,
    /// Answers by query text, read in `generation`. Looked up for every
    /// statement a masking rule may apply to, by a text of some hundred
    /// bytes: foldhash rather than SipHash (1.4% of the daemon's samples
    /// under `pgbench -S`).
    rows: foldhash::HashMap<String, Arc<Rows>>,
    /// Routine verdicts ([`super::functions`]), read in `generation`.
    verdicts: HashMap<super::functions::Key, (super::functions::Verdict, Instant)>,
}

impl State {
    fn bump(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        self.rows.clear();
        self.verdicts.clear();
    }
}

/// The side connections and catalog cache of one upstream database.
pub struct Pool {
    key: Key,
    state: Mutex<State>,
    idle: Mutex<Vec<Upstream>>,
    permits: Semaphore,
    /// The flow whose resource new connections log in with (the latest).
    login: Mutex<Arc<Flow>>,
    listener: Mutex<Option<CancellationToken>>,
    last_used: Mutex<Instant>,
    verify: Notify,
}

static POOLS: LazyLock<Mutex<HashMap<Key, Arc<Pool>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A copy of `flow` for the daemon's own connections (no recording, its
/// own cancellation).
fn side_flow(flow: &Flow) -> Arc<Flow> {
    Arc::new(Flow {
        info: flow.info.clone(),
        resource: flow.resource.clone(),
        cancel: CancellationToken::new(),
        recording: crate::record::SessionRecording::off(),
        audit_fields: flow.audit_fields.clone(),
        context: flow.context.clone(),
    })
}

/// The startup parameters of a side connection: the session's user and
/// database only (no agent options), UTF8, and `search_path` pinned to
/// `pg_catalog` so the catalog queries' operators and functions are the
/// server's own (a startup option, not a statement the server's
/// statement statistics would show as the role's); `extra` are more `-c`
/// options.
fn side_params(user: &str, database: &str, extra: &str) -> Vec<(String, String)> {
    vec![
        ("user".into(), user.into()),
        ("database".into(), database.into()),
        (
            "options".into(),
            format!("-c search_path=pg_catalog{extra}"),
        ),
        (
            "client_encoding".into(),
            super::encoding::PINNED.to_string(),
        ),
        ("application_name".into(), "portcullis-catalog".into()),
    ]
}

impl Pool {
    /// The pool for a session of `flow` logged in as `user` to `database`.
    pub async fn get(flow: &Flow, user: &str, database: &str) -> std::io::Result<Arc<Pool>> {
        let upstream = flow.upstream_addr().await?;
        let key = Key {
            resource: flow.info.resource.clone(),
            upstream,
            user: user.to_string(),
            database: database.to_string(),
        };
        let mut pools = guard(&POOLS);
        if !pools.contains_key(&key) && pools.len() >= MAX_IDLE_POOLS {
            pools.retain(|_, p| {
                let held = Arc::strong_count(p) > 1;
                if !held {
                    if let Some(t) = guard(&p.listener).take() {
                        t.cancel();
                    }
                }
                held
            });
        }
        let pool = pools
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Pool {
                    key,
                    state: Mutex::new(State::default()),
                    idle: Mutex::new(Vec::new()),
                    permits: Semaphore::new(MAX_CONNECTIONS),
                    login: Mutex::new(side_flow(flow)),
                    listener: Mutex::new(None),
                    last_used: Mutex::new(Instant::now()),
                    verify: Notify::new(),
                })
            })
            .clone();
        drop(pools);
        {
            let mut login = guard(&pool.login);
            if !Arc::ptr_eq(&login.resource, &flow.resource) {
                // A reload changed the resource: new logins use it.
                *login = side_flow(flow);
                drop(login);
                guard(&pool.idle).clear();
            }
        }
        pool.touch();
        Ok(pool)
    }

    fn touch(self: &Arc<Self>) {
        *guard(&self.last_used) = Instant::now();
        let mut l = guard(&self.listener);
        if l.as_ref().is_none_or(|t| t.is_cancelled()) {
            let token = CancellationToken::new();
            *l = Some(token.clone());
            tokio::spawn(listen(Arc::downgrade(self), token));
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        guard(&self.state)
    }

    /// The generation answers may be cached in now, if caching is sound now.
    fn cacheable(&self) -> Option<u64> {
        let s = self.state();
        (s.signal && s.in_flight == 0).then_some(s.generation)
    }

    /// The current generation while the catalog-change signal is live
    /// (whether or not this daemon is changing the catalog): an answer read
    /// on a session's own connection stays good while this is unchanged
    /// and the session made no change since ([`SessionChanges::own_answer`]).
    pub fn signalled_generation(&self) -> Option<u64> {
        let s = self.state();
        s.signal.then_some(s.generation)
    }

    /// Whether caching is on now (the signal is live and nothing of this
    /// daemon is changing the catalog).
    pub fn caching(&self) -> bool {
        self.cacheable().is_some()
    }

    /// A statement that may change the catalog or name resolution is about
    /// to be forwarded: the cache is off until its transaction ends.
    pub fn begin_change(&self) {
        let mut s = self.state();
        s.in_flight = s.in_flight.saturating_add(1);
        s.bump();
    }

    /// The transaction of `n` such statements ended (or its session did):
    /// their changes are visible to every connection now. The cache stays
    /// off until the listener checked that the triggers survived them.
    pub fn end_change(&self, n: u32) {
        if n == 0 {
            return;
        }
        {
            let mut s = self.state();
            s.in_flight = s.in_flight.saturating_sub(n);
            s.changes_ended = s.changes_ended.wrapping_add(1);
            s.signal = false;
            s.bump();
        }
        self.verify.notify_one();
    }

    /// Runs `sql` on a side connection; the answer comes from the cache
    /// when caching is sound and it was asked in this generation.
    pub async fn query(&self, sql: &str) -> Result<Arc<Rows>, UpstreamError> {
        let generation = self.cacheable();
        if generation.is_some() {
            if let Some(rows) = self.state().rows.get(sql) {
                return Ok(rows.clone());
            }
        }
        let rows = Arc::new(self.query_uncached(sql).await?);
        if let Some(g) = generation {
            let mut s = self.state();
            if s.generation == g && s.signal && s.in_flight == 0 {
                if s.rows.len() >= MAX_ENTRIES {
                    s.rows.clear();
                }
                s.rows.insert(sql.to_string(), rows.clone());
            }
        }
        Ok(rows)
    }

    /// Cached routine verdicts for `keys` (only while caching is sound):
    /// the generation they belong to and what is known.
    pub(super) fn verdicts(
        &self,
        keys: &[super::functions::Key],
        ttl: Duration,
    ) -> (
        Option<u64>,
        HashMap<super::functions::Key, super::functions::Verdict>,
    ) {
        let generation = self.cacheable();
        let mut out = HashMap::new();
        if generation.is_some() {
            let now = Instant::now();
            let s = self.state();
            for k in keys {
                if let Some((ok, at)) = s.verdicts.get(k) {
                    if now.duration_since(*at) < ttl {
                        out.insert(k.clone(), *ok);
                    }
                }
            }
        }
        (generation, out)
    }

    /// Stores verdicts read in `generation` (if it is still current).
    pub(super) fn store_verdicts(
        &self,
        generation: Option<u64>,
        found: impl IntoIterator<Item = (super::functions::Key, super::functions::Verdict)>,
    ) {
        let Some(g) = generation else { return };
        let mut s = self.state();
        if s.generation != g || !s.signal || s.in_flight != 0 {
            return;
        }
        if s.verdicts.len() >= MAX_ENTRIES {
            s.verdicts.clear();
        }
        let now = Instant::now();
        for (k, v) in found {
            s.verdicts.insert(k, (v, now));
        }
    }

    /// Runs `sql` on a pooled side connection (bounded in time; a stale
    /// pooled connection is replaced once).
    pub async fn query_uncached(&self, sql: &str) -> Result<Rows, UpstreamError> {
        match tokio::time::timeout(LOOKUP_TIMEOUT, self.run(sql)).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::Protocol(format!(
                "catalog lookup on {} timed out after {}s",
                self.key.upstream,
                LOOKUP_TIMEOUT.as_secs()
            ))),
        }
    }

    async fn run(&self, sql: &str) -> Result<Rows, UpstreamError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| UpstreamError::Protocol("catalog pool closed".into()))?;
        let pooled = guard(&self.idle).pop();
        if let Some(mut conn) = pooled {
            if let Ok(rows) = upstream::simple_query(&mut conn, sql).await {
                guard(&self.idle).push(conn);
                return Ok(rows);
            }
            // The server may have closed an idle connection: one fresh try.
        }
        let mut conn = self.connect().await?;
        let rows = upstream::simple_query(&mut conn, sql).await?;
        guard(&self.idle).push(conn);
        Ok(rows)
    }

    async fn connect(&self) -> Result<Upstream, UpstreamError> {
        self.connect_with("").await
    }

    async fn connect_with(&self, extra: &str) -> Result<Upstream, UpstreamError> {
        let flow = guard(&self.login).clone();
        upstream::login(
            &flow,
            &side_params(&self.key.user, &self.key.database, extra),
        )
        .await
    }

    fn set_signal(&self, live: bool) {
        let mut s = self.state();
        if s.signal != live {
            s.signal = live;
            s.bump();
        }
    }
}

/// Reads one backend message into (tag, body).
async fn read_frame(conn: &mut Upstream) -> Result<(u8, BytesMut), UpstreamError> {
    loop {
        if let Some(h) = codec::peek_frame(&conn.buf, MAX_FRAME)? {
            let mut frame = conn.buf.split_to(h.total);
            let body = frame.split_off(5);
            return Ok((h.tag, body));
        }
        if conn.io.read_buf(&mut conn.buf).await? == 0 {
            return Err(UpstreamError::Protocol(
                "catalog listener connection closed".into(),
            ));
        }
    }
}

/// The listener of one pool: logs in, installs the triggers when the role
/// may, LISTENs, and ends a generation on every notification; checks the
/// triggers every [`VERIFY_EVERY`] and whenever a proxied change ended.
/// Reconnects with backoff; ends when the pool has been idle long.
async fn listen(pool: Weak<Pool>, token: CancellationToken) {
    let mut backoff = Duration::from_millis(500);
    let mut warned = false;
    loop {
        let Some(p) = pool.upgrade() else { return };
        if guard(&p.last_used).elapsed() > LISTENER_IDLE {
            p.set_signal(false);
            token.cancel();
            return;
        }
        let result = listen_once(&p, &mut warned).await;
        p.set_signal(false);
        if let Err(e) = result {
            if !warned {
                warn!(resource = %p.key.resource, upstream = %p.key.upstream,
                      "catalog-change listener lost ({e}); catalog answers are not cached until it is back");
                warned = true;
            }
        }
        drop(p);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

async fn listen_once(p: &Arc<Pool>, warned: &mut bool) -> Result<(), UpstreamError> {
    let mut conn = tokio::time::timeout(LOOKUP_TIMEOUT, p.connect())
        .await
        .map_err(|_| UpstreamError::Protocol("listener login timed out".into()))??;
    let sup = upstream::simple_query(
        &mut conn,
        "SELECT rolsuper::text FROM pg_catalog.pg_roles WHERE rolname = current_user",
    )
    .await?;
    if sup.first().and_then(|r| r.first()).cloned().flatten() == Some("true".into()) {
        // The daemon's own DDL fires no other event trigger (replica
        // mode; its own are ALWAYS) and is not counted in the statement
        // statistics as the role's: both are superuser settings.
        if let Ok(Ok(quiet)) = tokio::time::timeout(
            LOOKUP_TIMEOUT,
            p.connect_with(" -c session_replication_role=replica -c pg_stat_statements.track=none"),
        )
        .await
        {
            conn = quiet;
        }
        if let Err(e) = upstream::simple_query(&mut conn, INSTALL_SQL).await {
            warn!(resource = %p.key.resource, "cannot install the catalog-change trigger: {e}");
        }
    }
    upstream::simple_query(&mut conn, &format!("LISTEN {CHANNEL}")).await?;
    let verify = verify_sql();
    let mut q = BytesMut::new();
    codec::put_query(&mut q, &verify);
    // One verification at a time: its count, then its ReadyForQuery.
    let mut pending = true;
    let mut count: Option<u32> = None;
    let mut sent_at = p.state().changes_ended;
    conn.io.write_all(&q).await?;
    let mut tick = tokio::time::interval(VERIFY_EVERY);
    tick.tick().await;
    let mut said = false;
    loop {
        tokio::select! {
            frame = read_frame(&mut conn) => {
                let (tag, body) = frame?;
                match tag {
                    // NotificationResponse: someone changed the catalog.
                    b'A' => p.state().bump(),
                    b'D' if pending => {
                        let rows = codec_row(&body);
                        count = rows.first().cloned().flatten().and_then(|c| c.parse().ok());
                    }
                    b'Z' if pending => {
                        pending = false;
                        let verified = count == Some(2);
                        let live = verified && p.state().changes_ended == sent_at;
                        count = None;
                        p.set_signal(live);
                        if live && !said {
                            info!(resource = %p.key.resource, upstream = %p.key.upstream,
                                  "catalog-change signal live: catalog answers are cached");
                            said = true;
                            *warned = false;
                        } else if !verified && !*warned {
                            warn!(resource = %p.key.resource, upstream = %p.key.upstream,
                                  "no catalog-change trigger (the held role cannot create event triggers; see docs/postgres.md): catalog answers are not cached");
                            *warned = true;
                            said = false;
                        }
                    }
                    _ => {}
                }
            }
            _ = p.verify.notified(), if !pending => {
                pending = true;
                sent_at = p.state().changes_ended;
                conn.io.write_all(&q).await?;
            }
            _ = tick.tick(), if !pending => {
                if guard(&p.last_used).elapsed() > LISTENER_IDLE {
                    return Ok(());
                }
                pending = true;
                sent_at = p.state().changes_ended;
                conn.io.write_all(&q).await?;
            }
        }
    }
}

/// The text cells of a DataRow body.
fn codec_row(body: &[u8]) -> Vec<Option<String>> {
    let mut out = Vec::new();
    let Some(n) = body.get(..2).map(|b| i16::from_be_bytes([b[0], b[1]])) else {
        return out;
    };
    let mut at = 2usize;
    for _ in 0..n.max(0) {
        let Some(len) = body
            .get(at..at + 4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        else {
            break;
        };
        at += 4;
        if len < 0 {
            out.push(None);
            continue;
        }
        let end = at + len as usize;
        out.push(
            body.get(at..end)
                .map(|v| String::from_utf8_lossy(v).into_owned()),
        );
        at = end;
    }
    out
}

/// A session's share of the pool: counts the catalog-changing statements
/// it forwarded whose transaction has not ended, and gives them back when
/// the session ends however it ends.
pub struct SessionChanges {
    pool: Option<Arc<Pool>>,
    open: std::sync::atomic::AtomicU32,
    open_catalog: std::sync::atomic::AtomicU32,
    /// The status of the server's latest ReadyForQuery (`I`, `T`, `E`).
    status: std::sync::atomic::AtomicU8,
    /// Tables as this session's own connection saw them after its latest
    /// catalog change in the transaction that is open (an injected lookup):
    /// never kept past that transaction, nor past another change.
    own_tables: Mutex<HashMap<u32, super::rows::Table>>,
    /// Catalog answers read on the session's own connection since its
    /// latest change in the open transaction, by query text, with the
    /// pool generation they were read in: reused where the connection
    /// cannot be asked (later statements of one pipeline), never past
    /// another change of the session, the end of the transaction, or a
    /// change signalled by anyone else.
    own_answers: Mutex<HashMap<String, (u64, Arc<Rows>)>>,
}

impl SessionChanges {
    /// For a session of `pool` (`None`: the upstream address could not be
    /// resolved; nothing is cached then).
    pub fn new(pool: Option<Arc<Pool>>) -> Self {
        Self {
            pool,
            open: std::sync::atomic::AtomicU32::new(0),
            open_catalog: std::sync::atomic::AtomicU32::new(0),
            status: std::sync::atomic::AtomicU8::new(b'I'),
            own_tables: Mutex::new(HashMap::new()),
            own_answers: Mutex::new(HashMap::new()),
        }
    }

    /// The server said ReadyForQuery with `status` (called under the
    /// pipe's lock, so an empty pipe and this status agree).
    pub fn ready(&self, status: u8) {
        self.status
            .store(status, std::sync::atomic::Ordering::Relaxed);
    }

    /// The status of the server's latest ReadyForQuery.
    pub fn status(&self) -> u8 {
        self.status.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Keeps tables read on the session's own connection (replacing what
    /// was kept for the same OIDs).
    pub fn keep_own_tables(&self, tables: HashMap<u32, super::rows::Table>) {
        guard(&self.own_tables).extend(tables);
    }

    /// `tables` overlaid with the tables this session's own connection
    /// named in the open transaction (borrowed as is when there are none).
    pub fn with_own_tables<'t>(
        &self,
        tables: &'t HashMap<u32, Option<super::rows::Table>>,
    ) -> std::borrow::Cow<'t, HashMap<u32, Option<super::rows::Table>>> {
        let own = guard(&self.own_tables);
        if own.is_empty() {
            return std::borrow::Cow::Borrowed(tables);
        }
        let mut all = tables.clone();
        for (oid, t) in own.iter() {
            all.insert(*oid, Some(t.clone()));
        }
        std::borrow::Cow::Owned(all)
    }

    /// Keeps an answer to `sql` read on the session's own connection (only
    /// while the pool's change signal is live).
    pub fn keep_own_answer(&self, sql: &str, rows: Arc<Rows>) {
        let Some(g) = self.pool.as_ref().and_then(|p| p.signalled_generation()) else {
            return;
        };
        let mut a = guard(&self.own_answers);
        if a.len() >= MAX_ENTRIES {
            a.clear();
        }
        a.insert(sql.to_string(), (g, rows));
    }

    /// The answer to `sql` kept by [`Self::keep_own_answer`], if nothing
    /// changed the catalog since (this session, or anyone as the signal
    /// tells).
    pub fn own_answer(&self, sql: &str) -> Option<Arc<Rows>> {
        let g = self.pool.as_ref()?.signalled_generation()?;
        let a = guard(&self.own_answers);
        a.get(sql)
            .filter(|(kept, _)| *kept == g)
            .map(|(_, rows)| rows.clone())
    }

    /// Whether the session's own connection named table `oid` in the open
    /// transaction.
    pub fn own_table(&self, oid: u32) -> bool {
        guard(&self.own_tables).contains_key(&oid)
    }

    /// The pool, if any.
    pub fn pool(&self) -> Option<&Arc<Pool>> {
        self.pool.as_ref()
    }

    /// A statement that may change the catalog (`catalog`) or only how
    /// names resolve (a setting) is being forwarded.
    pub fn begin(&self, catalog: bool) {
        if catalog {
            // What the own connection answered before this change may
            // not hold after it.
            guard(&self.own_tables).clear();
            guard(&self.own_answers).clear();
            self.open_catalog
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(p) = &self.pool {
            p.begin_change();
            self.open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The server is idle again (ReadyForQuery `I`): the session's changes
    /// are committed or rolled back.
    pub fn transaction_ended(&self) {
        let n = self.open.swap(0, std::sync::atomic::Ordering::Relaxed);
        self.open_catalog
            .store(0, std::sync::atomic::Ordering::Relaxed);
        // Committed or rolled back: nothing the transaction's own view
        // named may be used any more (a rolled-back table or column).
        guard(&self.own_tables).clear();
        guard(&self.own_answers).clear();
        if let Some(p) = &self.pool {
            p.end_change(n);
        }
    }

    /// Whether this session has a change to the catalog itself (not just
    /// a setting) whose transaction has not ended: the side connections
    /// cannot see it until it commits.
    pub fn catalog_open(&self) -> bool {
        self.open_catalog.load(std::sync::atomic::Ordering::Relaxed) > 0
    }
}

impl Drop for SessionChanges {
    fn drop(&mut self) {
        self.transaction_ended();
    }
}

/// The name of the savepoint around an injected catalog query.
const OWN_SAVEPOINT: &str = "portcullis_catalog_lookup";

/// The two simple-query messages that run `sql` (one or more SELECTs) on
/// the session's own connection inside its open transaction and leave no
/// trace: a savepoint, `search_path` pinned to `pg_catalog` for the
/// lookup (the agent's own operators and functions cannot shadow the
/// catalog query's), the query, then a rollback to and release of the
/// savepoint (undoing the setting, and recovering the transaction should
/// the lookup itself fail). The second message runs even when the first
/// failed.
pub fn own_lookup_messages(sql: &str) -> BytesMut {
    let mut b = BytesMut::new();
    codec::put_query(
        &mut b,
        &format!(
            "SAVEPOINT {OWN_SAVEPOINT}; SET LOCAL search_path = pg_catalog; SET LOCAL statement_timeout = 0; {sql}"
        ),
    );
    codec::put_query(
        &mut b,
        &format!("ROLLBACK TO SAVEPOINT {OWN_SAVEPOINT}; RELEASE SAVEPOINT {OWN_SAVEPOINT}"),
    );
    b
}

/// The answer to an injected lookup: the rows of each SELECT in order, or
/// why there are none.
pub type OwnAnswer = Result<Vec<Rows>, String>;

/// A lookup injected on the session's own connection, as the server
/// answers it (the backend half feeds it every message until it is done;
/// none of them reaches the agent, except notifications).
#[derive(Debug)]
pub struct OwnLookup {
    results: Vec<Rows>,
    current: Option<Rows>,
    error: Option<String>,
    readies: u8,
    /// ReadyForQuery messages after the lookup's two: a re-Parse of the
    /// agent's unnamed statement (which a simple query destroys) and its
    /// Sync.
    extra: u8,
    reply: Option<tokio::sync::oneshot::Sender<OwnAnswer>>,
}

/// What the backend does with a server message during an injected lookup.
#[derive(Debug, PartialEq, Eq)]
pub enum OwnStep {
    /// Not for the agent.
    Swallow,
    /// For the agent (an asynchronous notification).
    Pass,
    /// The lookup is over and the transaction is as it was.
    Done,
    /// The lookup is over and the transaction could not be restored: the
    /// session must end (the agent's transaction is not what it thinks).
    Broken(String),
}

impl OwnLookup {
    /// A lookup whose answer goes to `reply`; `reparse`: the messages
    /// end with a Parse and a Sync that restore the agent's unnamed
    /// statement (their answers are swallowed too).
    pub fn new(reply: tokio::sync::oneshot::Sender<OwnAnswer>, reparse: bool) -> Self {
        Self {
            results: Vec::new(),
            current: None,
            error: None,
            readies: 0,
            extra: u8::from(reparse),
            reply: Some(reply),
        }
    }

    /// One server message (`tag`, `body`).
    pub fn feed(&mut self, tag: u8, body: &[u8]) -> OwnStep {
        if self.readies >= 2 {
            // The re-Parse: whatever it answers (an error only means the
            // agent's next Bind of it fails, as it would have).
            return match tag {
                b'A' => OwnStep::Pass,
                b'Z' => OwnStep::Done,
                _ => OwnStep::Swallow,
            };
        }
        match tag {
            b'T' => self.current = Some(Vec::new()),
            b'D' => {
                if let Some(rows) = self.current.as_mut() {
                    rows.push(codec_row(body));
                }
            }
            b'C' => {
                if let Some(rows) = self.current.take() {
                    self.results.push(rows);
                }
            }
            b'E' => {
                let fields = codec::error_fields(body);
                let message = fields
                    .iter()
                    .find(|(k, _)| *k == b'M')
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                self.current = None;
                if self.readies == 1 {
                    // The rollback to the savepoint failed.
                    return self.finish(
                        Err(format!("the catalog lookup could not be undone: {message}")),
                        true,
                    );
                }
                self.error.get_or_insert(message);
            }
            b'A' => return OwnStep::Pass,
            b'Z' => {
                self.readies += 1;
                if self.readies == 2 {
                    if body.first() != Some(&b'T') {
                        return self.finish(
                            Err("the transaction was not restored after the catalog lookup".into()),
                            true,
                        );
                    }
                    let answer = match self.error.take() {
                        Some(e) => Err(e),
                        None => Ok(std::mem::take(&mut self.results)),
                    };
                    let step = self.finish(answer, false);
                    return if self.extra > 0 {
                        OwnStep::Swallow
                    } else {
                        step
                    };
                }
            }
            _ => {}
        }
        OwnStep::Swallow
    }

    fn finish(&mut self, answer: OwnAnswer, broken: bool) -> OwnStep {
        let why = answer.as_ref().err().cloned().unwrap_or_default();
        if let Some(r) = self.reply.take() {
            let _ = r.send(answer);
        }
        if broken {
            OwnStep::Broken(why)
        } else {
            OwnStep::Done
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datarow_cells() {
        let mut b = BytesMut::new();
        b.extend_from_slice(&2i16.to_be_bytes());
        b.extend_from_slice(&1i32.to_be_bytes());
        b.extend_from_slice(b"2");
        b.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(codec_row(&b), vec![Some("2".into()), None]);
        assert!(codec_row(&[0]).is_empty());
    }

    #[test]
    fn the_verify_query_names_the_function_body_hex_encoded() {
        let v = verify_sql();
        assert!(v.contains(&hex::encode(FUNCTION_BODY)));
        assert!(INSTALL_SQL.contains(&format!("$pcx${FUNCTION_BODY}$pcx$")));
    }

    /// The frames of a ReadyForQuery, a CommandComplete, a RowDescription
    /// (contents unread), a DataRow of one text cell and an error.
    fn z(status: u8) -> (u8, Vec<u8>) {
        (b'Z', vec![status])
    }
    fn c() -> (u8, Vec<u8>) {
        (b'C', b"SELECT 1\0".to_vec())
    }
    fn row(v: &str) -> (u8, Vec<u8>) {
        let mut b = 1i16.to_be_bytes().to_vec();
        b.extend_from_slice(&(v.len() as i32).to_be_bytes());
        b.extend_from_slice(v.as_bytes());
        (b'D', b)
    }
    fn err() -> (u8, Vec<u8>) {
        (b'E', b"SERROR\0C42P01\0Mno such thing\0\0".to_vec())
    }

    fn run(reparse: bool, frames: &[(u8, Vec<u8>)]) -> (Vec<OwnStep>, Option<OwnAnswer>) {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let mut l = OwnLookup::new(tx, reparse);
        let steps = frames.iter().map(|(t, b)| l.feed(*t, b)).collect();
        (steps, rx.try_recv().ok())
    }

    #[test]
    fn an_injected_lookup_collects_its_rows_and_swallows_its_answers() {
        use OwnStep::*;
        // SAVEPOINT, SET, SET, SELECT (one row), Z; ROLLBACK TO, RELEASE, Z.
        let ok = [
            c(),
            c(),
            c(),
            (b'T', vec![]),
            row("v1"),
            c(),
            z(b'T'),
            (b'A', vec![]),
            c(),
            c(),
            z(b'T'),
        ];
        let (steps, answer) = run(false, &ok);
        assert_eq!(steps.last(), Some(&Done));
        assert_eq!(steps[7], Pass, "a notification is the agent's");
        assert!(steps[..7].iter().all(|s| *s == Swallow));
        assert_eq!(
            answer.expect("answered").expect("rows"),
            vec![vec![vec![Some("v1".to_string())]]]
        );
        // With the agent's unnamed statement parsed again: one more
        // ReadyForQuery, swallowed; the answer is there before it.
        let mut more = ok.to_vec();
        more.extend([(b'1', vec![]), z(b'T')]);
        let (steps, answer) = run(true, &more);
        assert_eq!(steps[10], Swallow);
        assert_eq!(steps.last(), Some(&Done));
        assert!(answer.expect("answered").is_ok());
        // The lookup failed; the savepoint restored the transaction.
        let (steps, answer) = run(false, &[c(), err(), z(b'E'), c(), c(), z(b'T')]);
        assert_eq!(steps.last(), Some(&Done));
        assert!(answer.expect("answered").is_err());
        // The rollback to the savepoint failed, or the transaction is not
        // as it was: the session must end.
        let (steps, _) = run(false, &[c(), err(), z(b'E'), err()]);
        assert!(matches!(steps.last(), Some(Broken(_))));
        let (steps, _) = run(false, &[c(), c(), c(), z(b'T'), c(), c(), z(b'I')]);
        assert!(matches!(steps.last(), Some(Broken(_))));
    }

    #[test]
    fn generations_end_with_changes() {
        let mut s = State {
            signal: true,
            ..Default::default()
        };
        s.rows.insert("q".into(), Arc::new(Vec::new()));
        let g = s.generation;
        s.bump();
        assert_ne!(g, s.generation);
        assert!(s.rows.is_empty());
    }
}
