//! Channel relays: one task per agent channel. A session channel's command
//! goes through the gate (telling the agent on stderr when it is held or
//! denied), then gets its own upstream channel and is relayed both ways
//! (data, stderr, EOF, window changes, signals, exit status and signal,
//! close) with output masked and recorded; a `direct-tcpip` channel is
//! decided before it is opened.
//!
//! Owns the per-connection state shared by channels ([`Conn`]: the lazily
//! made upstream connection, byte counts) and the relays. It must not
//! speak to the agent outside its channels, nor parse command lines.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use russh::{
    server::{self, ChannelOpenHandle},
    Channel, ChannelMsg, ChannelOpenFailure, ChannelReadHalf, ChannelWriteHalf, Pty, Sig,
};
use serde_json::{Map, Value};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{
    actions::{self, Request},
    upstream::{self, UpstreamHandle},
    DENIED_EXIT_STATUS, UPSTREAM_EXIT_STATUS,
};
use crate::{
    daemon::Shared,
    proxy::{
        gate::{self, Allowed, Command, Gate, Waited},
        Flow,
    },
    record::{AsciicastChannel, SshChannel},
};

/// Input from the agent kept while its command is held (bytes); past it
/// the agent's connection waits (backpressure).
pub const HELD_INPUT_MAX: usize = 1024 * 1024;

/// How long the upstream has to answer a channel open or request.
const UPSTREAM_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// What the agent asked for with `pty-req`.
#[derive(Debug, Clone)]
pub struct PtyRequest {
    /// `TERM`.
    pub term: String,
    /// Columns.
    pub cols: u32,
    /// Rows.
    pub rows: u32,
    /// Width in pixels.
    pub pix_width: u32,
    /// Height in pixels.
    pub pix_height: u32,
    /// Terminal modes.
    pub modes: Vec<(Pty, u32)>,
}

/// One agent connection as its channels share it.
pub struct Conn {
    /// The daemon.
    pub shared: Arc<Shared>,
    /// The flow.
    pub flow: Flow,
    /// The user the agent asked for (the upstream user when the resource
    /// names none).
    pub agent_user: Mutex<Option<String>>,
    /// Cancelled when the agent's connection is gone.
    pub gone: CancellationToken,
    /// Bytes of channel data from the agent.
    pub bytes_from_client: AtomicU64,
    /// Bytes of channel data to the agent.
    pub bytes_to_client: AtomicU64,
    upstream: OnceCell<Result<Arc<UpstreamHandle>, String>>,
}

impl Conn {
    /// A connection's shared state.
    pub fn new(shared: Arc<Shared>, flow: Flow) -> Self {
        Self {
            shared,
            flow,
            agent_user: Mutex::new(None),
            gone: CancellationToken::new(),
            bytes_from_client: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            upstream: OnceCell::new(),
        }
    }

    /// The upstream user: the resource's, else the agent's.
    pub fn upstream_user(&self) -> String {
        if let Some(u) = &self.flow.resource.credentials.user {
            return u.clone();
        }
        self.agent_user
            .lock()
            .ok()
            .and_then(|u| u.clone())
            .unwrap_or_else(|| "root".into())
    }

    /// The upstream connection, made by the first channel that needs it.
    /// A failure is remembered: the agent's later channels get the same
    /// error rather than a new login attempt each.
    pub async fn upstream(&self) -> Result<Arc<UpstreamHandle>, String> {
        self.upstream
            .get_or_init(|| async {
                let user = self.upstream_user();
                match upstream::connect(&self.flow, &user).await {
                    Ok(h) => {
                        debug!(session = %self.flow.info.session, user = %user, "upstream ssh login done");
                        Ok(Arc::new(h))
                    }
                    Err(e) => {
                        warn!(session = %self.flow.info.session, "ssh upstream unavailable: {e}");
                        Err(e.to_string())
                    }
                }
            })
            .await
            .clone()
    }

    /// Disconnects the upstream, if one was made.
    pub async fn close_upstream(&self) {
        if let Some(Ok(h)) = self.upstream.get() {
            let _ = h
                .disconnect(russh::Disconnect::ByApplication, "", "en")
                .await;
        }
    }
}

/// Writes `text` on the channel's stderr.
async fn stderr_line(w: &ChannelWriteHalf<server::Msg>, text: &str) {
    let _ = w
        .extended_data_bytes(1, Bytes::from(format!("portcullis: {text}\r\n")))
        .await;
}

/// Ends an agent channel that will not run: reason on stderr, `status`,
/// EOF, close.
async fn end_channel(w: &ChannelWriteHalf<server::Msg>, text: &str, status: u32) {
    stderr_line(w, text).await;
    let _ = w.exit_status(status).await;
    let _ = w.eof().await;
    let _ = w.close().await;
}

/// Reads the agent's channel while its command is held: keeps messages
/// (up to [`HELD_INPUT_MAX`] bytes of data) and resolves when the agent
/// closes the channel or the connection.
async fn watch_held(
    read: &mut ChannelReadHalf,
    kept: &mut Vec<ChannelMsg>,
    gone: &CancellationToken,
) {
    let mut bytes = 0usize;
    loop {
        if bytes >= HELD_INPUT_MAX {
            gone.cancelled().await;
            return;
        }
        let msg = tokio::select! {
            m = read.wait() => m,
            _ = gone.cancelled() => return,
        };
        match msg {
            None | Some(ChannelMsg::Close) => return,
            Some(m) => {
                if let ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. } = &m {
                    bytes += data.len();
                }
                kept.push(m);
            }
        }
    }
}

/// Runs a session channel's command: gate, upstream channel, relay.
pub async fn run_session(
    conn: Arc<Conn>,
    chan: Channel<server::Msg>,
    handle: server::Handle,
    req: Request,
    pty: Option<PtyRequest>,
    env: Vec<(String, String)>,
) {
    let id = chan.id();
    let flow = &conn.flow;
    let shared = &conn.shared;
    let cmd = actions::session_command(flow, &req, pty.as_ref().map(|p| p.term.as_str()));
    let (mut a_read, a_write) = chan.split();
    let mut kept = Vec::new();
    let allowed = match gate::check(shared, flow, &cmd).await {
        Gate::Allowed(a) => a,
        Gate::Denied(d) => {
            end_channel(
                &a_write,
                &format!("{} denied: {}", cmd.action, d.reason),
                DENIED_EXIT_STATUS,
            )
            .await;
            return;
        }
        Gate::Held(h) => {
            let rid = h.request().id.clone();
            stderr_line(
                &a_write,
                &format!(
                    "{} held for approval: access request {rid} (approve with `portcullis approve {rid}`); waiting...",
                    cmd.action
                ),
            )
            .await;
            let watch = watch_held(&mut a_read, &mut kept, &conn.gone);
            match h.wait(shared, flow, &cmd, watch).await {
                Waited::Allowed(a) => {
                    stderr_line(&a_write, &format!("access request {rid} approved")).await;
                    a
                }
                Waited::Denied(d) => {
                    end_channel(
                        &a_write,
                        &format!("{} denied: {}", cmd.action, d.reason),
                        DENIED_EXIT_STATUS,
                    )
                    .await;
                    return;
                }
                Waited::Abandoned => {
                    let _ = a_write.close().await;
                    return;
                }
            }
        }
    };
    let up = match open_upstream(&conn, &req, pty.as_ref(), &env).await {
        Ok(u) => u,
        Err(e) => {
            end_channel(&a_write, &e, UPSTREAM_EXIT_STATUS).await;
            let mut detail = Map::new();
            detail.insert("error".into(), e.into());
            gate::finished(shared, flow, &cmd, &allowed, detail).await;
            return;
        }
    };
    let (u_read, u_write, early) = up;
    let cast = match &req {
        // sftp is a binary protocol: nothing a terminal could play.
        Request::Subsystem(_) => no_cast(),
        Request::Exec(c) => flow.recording.ssh_channel_with(SshChannel {
            channel: u32::from(id),
            kind: req.kind(),
            command: Some(c),
            width: pty.as_ref().map_or(0, |p| clamp16(p.cols)),
            height: pty.as_ref().map_or(0, |p| clamp16(p.rows)),
            term: pty.as_ref().map(|p| p.term.as_str()),
        }),
        Request::Shell => flow.recording.ssh_channel_with(SshChannel {
            channel: u32::from(id),
            kind: req.kind(),
            command: None,
            width: pty.as_ref().map_or(0, |p| clamp16(p.cols)),
            height: pty.as_ref().map_or(0, |p| clamp16(p.rows)),
            term: pty.as_ref().map(|p| p.term.as_str()),
        }),
    };
    let masked = !matches!(req, Request::Subsystem(_));
    let to_up = agent_to_upstream(&conn, a_read, kept, u_write, cast.clone());
    let to_agent = upstream_to_agent(
        &conn,
        u_read,
        early,
        a_write,
        handle,
        id,
        cast.clone(),
        masked,
        pty.is_some(),
    );
    let (from_client, outcome) = tokio::join!(to_up, to_agent);
    match (&outcome.exit_status, &outcome.exit_signal) {
        (Some(s), _) => cast.exit(*s as i32),
        (None, Some(sig)) => cast.exit_signal(sig),
        (None, None) => cast.close(),
    }
    finish(shared, flow, &cmd, &allowed, from_client, &outcome).await;
}

/// A channel recording that records nothing.
fn no_cast() -> AsciicastChannel {
    crate::record::SessionRecording::off().ssh_channel(0, "", None, 0, 0)
}

fn clamp16(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}

async fn finish(
    shared: &Arc<Shared>,
    flow: &Flow,
    cmd: &Command,
    allowed: &Allowed,
    from_client: u64,
    outcome: &Outcome,
) {
    let mut detail = Map::new();
    if let Some(s) = outcome.exit_status {
        detail.insert("exit_status".into(), s.into());
    }
    if let Some(s) = &outcome.exit_signal {
        detail.insert("exit_signal".into(), s.clone().into());
    }
    detail.insert("bytes_from_client".into(), from_client.into());
    detail.insert("bytes_to_client".into(), outcome.to_client.into());
    if let Some(m) = &outcome.masked {
        detail.insert("masked".into(), m.clone());
    }
    gate::finished(shared, flow, cmd, allowed, detail).await;
}

type UpHalves = (
    ChannelReadHalf,
    ChannelWriteHalf<russh::client::Msg>,
    Vec<ChannelMsg>,
);

/// Opens the upstream session channel and starts the command there (pty and
/// allowed environment first). Returns the halves and any messages that
/// arrived before the command's reply.
async fn open_upstream(
    conn: &Conn,
    req: &Request,
    pty: Option<&PtyRequest>,
    env: &[(String, String)],
) -> Result<UpHalves, String> {
    let handle = conn
        .upstream()
        .await
        .map_err(|e| format!("upstream unavailable: {e}"))?;
    let chan = tokio::time::timeout(UPSTREAM_REPLY_TIMEOUT, handle.channel_open_session())
        .await
        .map_err(|_| "upstream did not open a channel in time".to_string())?
        .map_err(|e| format!("upstream refused a session channel: {e}"))?;
    let (mut read, write) = chan.split();
    let send_err = |e: russh::Error| format!("upstream: {e}");
    let mut replies = 0;
    if let Some(p) = pty {
        write
            .request_pty(
                true,
                &p.term,
                p.cols,
                p.rows,
                p.pix_width,
                p.pix_height,
                &p.modes,
            )
            .await
            .map_err(send_err)?;
        replies += 1;
    }
    for (k, v) in env {
        write
            .set_env(false, k.as_str(), v.as_str())
            .await
            .map_err(send_err)?;
    }
    match req {
        Request::Exec(c) => write.exec(true, c.as_bytes()).await,
        Request::Shell => write.request_shell(true).await,
        Request::Subsystem(s) => write.request_subsystem(true, s.as_str()).await,
    }
    .map_err(send_err)?;
    replies += 1;
    // Replies come in request order: the pty's (if any), then the
    // command's.
    let mut early = Vec::new();
    let mut answers = Vec::new();
    let deadline = tokio::time::Instant::now() + UPSTREAM_REPLY_TIMEOUT;
    while answers.len() < replies {
        let msg = tokio::time::timeout_at(deadline, read.wait())
            .await
            .map_err(|_| "upstream did not answer the request in time".to_string())?;
        match msg {
            Some(ChannelMsg::Success) => answers.push(true),
            Some(ChannelMsg::Failure) => answers.push(false),
            None | Some(ChannelMsg::Close) => {
                return Err("upstream closed the channel".into());
            }
            Some(m) => early.push(m),
        }
    }
    if answers.last() == Some(&false) {
        return Err(format!("upstream refused the {} request", req.kind()));
    }
    Ok((read, write, early))
}

/// Agent → upstream: input, EOF, window changes, signals, close. Returns
/// the bytes of input relayed.
async fn agent_to_upstream(
    conn: &Conn,
    mut read: ChannelReadHalf,
    kept: Vec<ChannelMsg>,
    write: ChannelWriteHalf<russh::client::Msg>,
    cast: AsciicastChannel,
) -> u64 {
    let mut total = 0u64;
    let mut kept = kept.into_iter();
    loop {
        let msg = match kept.next() {
            Some(m) => Some(m),
            None => read.wait().await,
        };
        let ok = match msg {
            Some(ChannelMsg::Data { data }) => {
                total += data.len() as u64;
                conn.bytes_from_client
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                cast.input(&data);
                write.data_bytes(data).await.is_ok()
            }
            Some(ChannelMsg::ExtendedData { data, ext }) => {
                total += data.len() as u64;
                write.extended_data_bytes(ext, data).await.is_ok()
            }
            Some(ChannelMsg::Eof) => write.eof().await.is_ok(),
            Some(ChannelMsg::WindowChange {
                col_width,
                row_height,
                pix_width,
                pix_height,
            }) => {
                cast.resize(clamp16(col_width), clamp16(row_height));
                write
                    .window_change(col_width, row_height, pix_width, pix_height)
                    .await
                    .is_ok()
            }
            Some(ChannelMsg::Signal { signal }) => write.signal(signal).await.is_ok(),
            None | Some(ChannelMsg::Close) => {
                let _ = write.close().await;
                return total;
            }
            // Other requests on a running channel are answered by the
            // server handler and not relayed.
            Some(_) => true,
        };
        if !ok {
            return total;
        }
    }
}

/// How a command ended, as the upstream reported it.
#[derive(Debug, Default)]
struct Outcome {
    exit_status: Option<u32>,
    exit_signal: Option<String>,
    to_client: u64,
    masked: Option<Value>,
}

/// Upstream → agent: output (masked) and stderr, EOF, exit status or
/// signal, close.
#[allow(clippy::too_many_arguments)]
async fn upstream_to_agent(
    conn: &Conn,
    mut read: ChannelReadHalf,
    early: Vec<ChannelMsg>,
    write: ChannelWriteHalf<server::Msg>,
    handle: server::Handle,
    id: russh::ChannelId,
    cast: AsciicastChannel,
    masked: bool,
    interactive: bool,
) -> Outcome {
    let mut out = Outcome::default();
    let mut mask = super::mask::OutputMask::new(conn, masked);
    let idle = if interactive {
        super::mask::IDLE_FLUSH_PTY
    } else {
        super::mask::IDLE_FLUSH
    };
    let mut buf = Vec::new();
    let mut early = early.into_iter();
    loop {
        let msg = match early.next() {
            Some(m) => Some(m),
            None if mask.held() > 0 => match tokio::time::timeout(idle, read.wait()).await {
                Ok(m) => m,
                Err(_) => {
                    // Quiet: let go of what the maskers held back.
                    let (o, e) = mask.flush(&mut buf);
                    let sent = send(conn, &write, None, o, &cast, &mut out).await
                        && send(conn, &write, Some(1), e, &cast, &mut out).await;
                    if !sent {
                        break;
                    }
                    continue;
                }
            },
            None => read.wait().await,
        };
        match msg {
            Some(ChannelMsg::Data { data }) => {
                let data = mask.stdout(data, &mut buf);
                if !send(conn, &write, None, data, &cast, &mut out).await {
                    break;
                }
            }
            Some(ChannelMsg::ExtendedData { data, ext }) => {
                let data = if ext == 1 {
                    mask.stderr(data, &mut buf)
                } else {
                    data
                };
                if !send(conn, &write, Some(ext), data, &cast, &mut out).await {
                    break;
                }
            }
            Some(ChannelMsg::Eof) => {
                flush(conn, &mut mask, &write, &cast, &mut out, &mut buf).await;
                let _ = write.eof().await;
            }
            Some(ChannelMsg::ExitStatus { exit_status }) => {
                out.exit_status = Some(exit_status);
                let _ = write.exit_status(exit_status).await;
            }
            Some(ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                error_message,
                lang_tag,
            }) => {
                out.exit_signal = Some(sig_name(&signal_name));
                let _ = handle
                    .exit_signal_request(id, signal_name, core_dumped, error_message, lang_tag)
                    .await;
            }
            Some(ChannelMsg::XonXoff { client_can_do }) => {
                let _ = handle.xon_xoff_request(id, client_can_do).await;
            }
            None | Some(ChannelMsg::Close) => {
                flush(conn, &mut mask, &write, &cast, &mut out, &mut buf).await;
                let _ = write.close().await;
                break;
            }
            Some(_) => {}
        }
    }
    out.masked = mask.counts();
    out
}

async fn send(
    conn: &Conn,
    write: &ChannelWriteHalf<server::Msg>,
    ext: Option<u32>,
    data: Bytes,
    cast: &AsciicastChannel,
    out: &mut Outcome,
) -> bool {
    if data.is_empty() {
        return true;
    }
    cast.output(&data);
    let n = data.len() as u64;
    out.to_client += n;
    conn.bytes_to_client.fetch_add(n, Ordering::Relaxed);
    match ext {
        None => write.data_bytes(data).await.is_ok(),
        Some(e) => write.extended_data_bytes(e, data).await.is_ok(),
    }
}

/// Writes what the maskers held back (end of output).
async fn flush(
    conn: &Conn,
    mask: &mut super::mask::OutputMask,
    write: &ChannelWriteHalf<server::Msg>,
    cast: &AsciicastChannel,
    out: &mut Outcome,
    buf: &mut Vec<u8>,
) {
    let (o, e) = mask.finish(buf);
    let _ = send(conn, write, None, o, cast, out).await;
    let _ = send(conn, write, Some(1), e, cast, out).await;
}

/// The signal's name without `SIG` (as in exit-signal).
pub fn sig_name(sig: &Sig) -> String {
    match sig {
        Sig::Custom(s) => s.clone(),
        other => format!("{other:?}"),
    }
}

/// Runs a `direct-tcpip` channel: decide, open upstream, then accept (or
/// reject) the agent's channel and relay bytes.
#[allow(clippy::too_many_arguments)]
pub async fn run_forward(
    conn: Arc<Conn>,
    chan: Channel<server::Msg>,
    reply: ChannelOpenHandle,
    host: String,
    port: u32,
    originator: String,
    originator_port: u32,
) {
    let flow = &conn.flow;
    let shared = &conn.shared;
    let cmd = actions::forward_command(
        flow,
        &host,
        port,
        &format!("{originator}:{originator_port}"),
    );
    // A channel that is not open yet has no stderr: a held forward waits
    // silently (the request id is in the log, `portcullis requests` and
    // webhooks).
    let gone = conn.gone.clone();
    let allowed =
        match gate::check_and_wait(shared, flow, &cmd, async move { gone.cancelled().await }).await
        {
            Waited::Allowed(a) => a,
            Waited::Denied(_) | Waited::Abandoned => {
                reply
                    .reject(ChannelOpenFailure::AdministrativelyProhibited)
                    .await;
                return;
            }
        };
    let opened = async {
        let h = conn.upstream().await?;
        tokio::time::timeout(
            UPSTREAM_REPLY_TIMEOUT,
            h.channel_open_direct_tcpip(host.as_str(), port, originator.as_str(), originator_port),
        )
        .await
        .map_err(|_| "upstream did not answer in time".to_string())?
        .map_err(|e| format!("upstream refused the forward: {e}"))
    }
    .await;
    let up = match opened {
        Ok(c) => c,
        Err(e) => {
            debug!(session = %flow.info.session, "forward to {host}:{port} failed: {e}");
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            let mut detail = Map::new();
            detail.insert("error".into(), e.into());
            gate::finished(shared, flow, &cmd, &allowed, detail).await;
            return;
        }
    };
    reply.accept().await;
    let (a_read, a_write) = chan.split();
    let (u_read, u_write) = up.split();
    let cast = no_cast();
    let to_up = agent_to_upstream(&conn, a_read, Vec::new(), u_write, cast.clone());
    let to_agent = async {
        let mut out = Outcome::default();
        let mut read = u_read;
        loop {
            match read.wait().await {
                Some(ChannelMsg::Data { data }) => {
                    if !send(&conn, &a_write, None, data, &cast, &mut out).await {
                        break;
                    }
                }
                Some(ChannelMsg::Eof) => {
                    let _ = a_write.eof().await;
                }
                None | Some(ChannelMsg::Close) => {
                    let _ = a_write.close().await;
                    break;
                }
                Some(_) => {}
            }
        }
        out
    };
    let (from_client, outcome) = tokio::join!(to_up, to_agent);
    finish(shared, flow, &cmd, &allowed, from_client, &outcome).await;
}
