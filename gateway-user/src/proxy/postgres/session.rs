//! The PostgreSQL session after login, and the state its two halves share
//! (`frontend`: agent→server, `backend`: server→agent). The agent→server half decides every
//! statement (simple query, Parse, FunctionCall) and keeps track of
//! prepared statements and portals; the server→agent half relays responses,
//! masks rows, turns a denial marker's error into the denial, and writes
//! each statement's completion record.
//!
//! Denials keep the connection exactly as consistent as a server error
//! would: the denied message is replaced upstream by a statement that is
//! sure to fail (`SELECT <marker column>`), so the server itself puts the
//! transaction into the failed state, skips the rest of an extended
//! pipeline up to Sync and sends the right ReadyForQuery status; the
//! marker's ErrorResponse is rewritten into SQLSTATE 42501 naming the rule.
//!
//! Owns the per-session protocol state; it must not touch other sessions.

use std::{
    collections::VecDeque,
    io,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncWriteExt, ReadHalf, WriteHalf},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
    sync::Mutex as AsyncMutex,
};
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;

use super::{backend::Back, codec::put_error, frontend::Front, upstream::Upstream};
use crate::{
    daemon::Shared,
    mask::Masker,
    proxy::{
        gate::{Allowed, Command},
        Flow, SessionSummary,
    },
};

/// Flush to the agent once this much is buffered (bounded memory, and rows
/// reach a slow agent while a large result is still streaming).
pub(super) const FLUSH_AT: usize = 64 * 1024;
/// Longest bound parameter kept for audit and recording.
pub(super) const PARAM_MAX: usize = 4096;
/// Result rows kept per statement for a `record = "full"` recording (the
/// recorder caps rows and bytes further).
pub(super) const RECORD_ROWS: usize = 100;
/// How long the server's last answers may take once the agent is done.
pub(super) const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Who the session is upstream (Cedar context `user`, `database`).
pub(super) struct SessionCtx {
    /// The held user.
    pub user: String,
    /// The database logged into.
    pub database: String,
    /// The upstream's catalog pool (masking checks, routine verdicts,
    /// result-column names) and this session's catalog changes in flight.
    pub changes: super::catalog::SessionChanges,
}

/// A decided statement: its command and the gate's allow.
#[derive(Debug)]
pub(super) struct Approved {
    pub(super) cmd: Command,
    pub(super) allowed: Allowed,
}

/// A statement prepared through Parse.
#[derive(Debug)]
pub(super) struct Prepared {
    pub(super) class: &'static str,
    pub(super) text: String,
    pub(super) approved: Option<Arc<Approved>>,
    /// Parameter type OIDs from Parse (0: unspecified).
    pub(super) param_types: Vec<u32>,
    /// Running it may change the catalog (see `catalog`).
    pub(super) changes_catalog: bool,
}

/// A bound portal.
#[derive(Debug)]
pub(super) struct Portal {
    pub(super) stmt: Arc<Prepared>,
    pub(super) params: Vec<Option<String>>,
}

/// One statement execution whose results are on their way.
#[derive(Debug)]
pub(super) struct Run {
    pub(super) approved: Option<Arc<Approved>>,
    pub(super) class: &'static str,
    pub(super) text: String,
    pub(super) params: Vec<Option<String>>,
    pub(super) masker: Option<Arc<Masker>>,
    pub(super) started: Instant,
}

/// What the server will answer, in order (pushed before the message goes
/// upstream, popped as the answers come back).
#[derive(Debug)]
pub(super) enum Expect {
    /// A Describe: its RowDescription/NoData; `swallow` when the proxy
    /// injected it to learn the columns before an Execute.
    Describe { swallow: bool },
    /// A statement's results up to CommandComplete (or an error).
    Run(Box<Run>),
    /// A denied message replaced by the marker: its error is the denial.
    Denial(String),
    /// Sync / simple Query end: ReadyForQuery.
    Sync,
    /// A catalog lookup the proxy injected on this connection (see
    /// `catalog::own_lookup_messages`): its answers up to its second
    /// ReadyForQuery are the proxy's, not the agent's.
    Own(Box<super::catalog::OwnLookup>),
}

pub(super) type Pipe = Arc<Mutex<VecDeque<Expect>>>;
pub(super) type ClientW = Arc<AsyncMutex<AgentW>>;

/// The agent's connection: plain TCP, or TLS over it once an SSLRequest
/// was answered `S` (`ssl = "on"`). An enum rather than a boxed trait
/// object so the plain path keeps TcpStream's lock-free `into_split` and
/// static dispatch.
pub(super) type Agent = Either<TcpStream, Box<TlsStream<TcpStream>>>;
/// The agent's read half.
pub(super) type AgentR = Either<OwnedReadHalf, ReadHalf<Box<TlsStream<TcpStream>>>>;
/// The agent's write half (TLS writes must be flushed: see [`send`]).
pub(super) type AgentW = Either<OwnedWriteHalf, WriteHalf<Box<TlsStream<TcpStream>>>>;

/// Splits the agent's connection into halves for the two session tasks.
fn split(agent: Agent) -> (AgentR, AgentW) {
    match agent {
        Either::Left(tcp) => {
            let (r, w) = tcp.into_split();
            (Either::Left(r), Either::Left(w))
        }
        Either::Right(tls) => {
            let (r, w) = tokio::io::split(tls);
            (Either::Right(r), Either::Right(w))
        }
    }
}

/// Writes `bytes` to the agent and flushes them (a no-op on TCP; on TLS it
/// makes sure the records leave rather than wait in the session buffer).
pub(super) async fn send(cw: &ClientW, bytes: &[u8]) -> io::Result<()> {
    let mut w = cw.lock().await;
    w.write_all(bytes).await?;
    w.flush().await
}

pub(super) fn lock(p: &Pipe) -> std::sync::MutexGuard<'_, VecDeque<Expect>> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the session until either side closes, a protocol error, or the
/// daemon ends it.
pub(super) async fn run(
    shared: &Arc<Shared>,
    flow: &Flow,
    client: Agent,
    up: Upstream,
    ctx: SessionCtx,
) -> io::Result<SessionSummary> {
    let mut raw = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut raw);
    let marker = format!("pcx_denied_{}", hex::encode(raw));
    let (crd, cwr) = split(client);
    let cw: ClientW = Arc::new(AsyncMutex::new(cwr));
    let (urd, uwr) = tokio::io::split(up.io);
    let pipe: Pipe = Arc::new(Mutex::new(VecDeque::new()));
    let from_client = AtomicU64::new(0);
    let to_client = AtomicU64::new(0);
    let mut front = Front::new(shared, flow, &ctx, uwr, pipe.clone(), cw.clone(), &marker);
    let mut back = Back::new(shared, flow, &ctx, pipe, cw.clone(), &marker);
    for (k, v) in &up.params {
        back.parameter(k, v);
    }
    let mut front_run = Box::pin(front.run(crd, &from_client));
    let mut back_run = Box::pin(back.run(urd, up.buf, &to_client));
    let mut ended_by_daemon = false;
    let reason = tokio::select! {
        r = &mut front_run => {
            // The agent is done (its Terminate or end of stream went
            // upstream): let the server's last answers and the completion
            // records land, bounded.
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, &mut back_run).await;
            r
        }
        r = &mut back_run => r,
        _ = flow.cancel.cancelled() => {
            ended_by_daemon = true;
            Ok("ended by the daemon")
        }
    };
    // Dropping both halves releases the agent's writer, whichever was
    // suspended holding it.
    drop(front_run);
    drop(back_run);
    let mut w = cw.lock().await;
    if ended_by_daemon {
        let mut b = BytesMut::new();
        put_error(
            &mut b,
            b'E',
            "FATAL",
            "57P01",
            "terminating connection: the session was ended by Portcullis",
        );
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
            w.write_all(&b).await?;
            w.flush().await
        })
        .await;
    }
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, w.shutdown()).await;
    drop(w);
    let summary = |end_reason| SessionSummary {
        bytes_from_client: from_client.load(Ordering::Relaxed),
        bytes_to_client: to_client.load(Ordering::Relaxed),
        end_reason,
    };
    match reason {
        Ok(r) => Ok(summary(r)),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            ) =>
        {
            Ok(summary("connection lost"))
        }
        Err(e) => Err(e),
    }
}
