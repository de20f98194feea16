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
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
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
use tokio::sync::{Notify, OnceCell};
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
    /// Channel tasks still running ([`Conn::task`]).
    tasks: AtomicUsize,
    tasks_idle: Notify,
}

/// Counts a running channel task of a [`Conn`] until dropped.
pub struct TaskGuard(Arc<Conn>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.0.tasks.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.tasks_idle.notify_waiters();
        }
    }
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
            tasks: AtomicUsize::new(0),
            tasks_idle: Notify::new(),
        }
    }

    /// Marks a channel task as running until the guard is dropped.
    pub fn task(self: &Arc<Self>) -> TaskGuard {
        self.tasks.fetch_add(1, Ordering::AcqRel);
        TaskGuard(self.clone())
    }

    /// Waits (at most `limit`) for the channel tasks to end, so their exit
    /// statuses reach the audit and the recording before the session's end
    /// does: the agent may disconnect the moment it has the exit status,
    /// while the task still records it.
    pub async fn tasks_done(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let idle = self.tasks_idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.tasks.load(Ordering::Acquire) == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return;
            }
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

/// The stderr line of a denied command; an exec string read as a shell
/// says why it was.
fn denial(cmd: &gate::Command, reason: &str) -> String {
    match cmd.detail.get("shell_syntax").and_then(|v| v.as_str()) {
        Some(why) => format!(
            "{} denied: {reason} (the exec string was decided as ssh:shell because {why}; \
             a plain command is words of letters, digits, `_-./:,+@%=` and simple quotes)",
            cmd.action
        ),
        None => format!("{} denied: {reason}", cmd.action),
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
            end_channel(&a_write, &denial(&cmd, &d.reason), DENIED_EXIT_STATUS).await;
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
                    end_channel(&a_write, &denial(&cmd, &d.reason), DENIED_EXIT_STATUS).await;
                    return;
                }
                Waited::Abandoned => {
                    let _ = a_write.close().await;
                    return;
                }
            }
        }
    };
    // What masking does to this channel's output (see `mask.rs`), decided
    // before the command runs: a file transfer on a resource where
    // masking is mandatory does not run at all.
    let masker = shared
        .policy
        .load()
        .masker(&flow.info.resource)
        .filter(|m| m.has_detectors());
    let transfer = match &req {
        Request::Subsystem(s) => Some(format!("the {s} subsystem")),
        _ => super::mask::transfer_program(&req).map(|p| format!("`{p}`")),
    };
    if let (Some(what), Some(m)) = (&transfer, &masker) {
        if m.binary_refuse() {
            let e = format!(
                "{} refused: {what} transfers data in a binary protocol that masking would                  corrupt, and this resource's [[mask]] rules say binary = \"refuse\"",
                cmd.action
            );
            end_channel(&a_write, &e, DENIED_EXIT_STATUS).await;
            let mut detail = Map::new();
            detail.insert("error".into(), e.into());
            gate::finished(shared, flow, &cmd, &allowed, detail).await;
            return;
        }
    }
    let mode = if transfer.is_some() {
        super::mask::Mode::Off
    } else if pty.is_some() {
        super::mask::Mode::Pty
    } else {
        super::mask::Mode::Text
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
    let to_up = ToUpstream {
        conn: &conn,
        write: u_write,
        cast: cast.clone(),
        total: 0,
        sftp: matches!(req, Request::Subsystem(_)).then(super::sftp::SftpLog::default),
    };
    let to_agent = ToAgent {
        conn: &conn,
        write: a_write,
        handle: Some((handle, id)),
        cast: cast.clone(),
        mask: super::mask::OutputMask::new(&conn, mode),
        idle: if pty.is_some() {
            super::mask::IDLE_FLUSH_PTY
        } else {
            super::mask::IDLE_FLUSH
        },
        buf: Vec::new(),
        out: Outcome::default(),
        eof_held: false,
    };
    let (from_client, mut outcome) = relay(a_read, kept, to_up, u_read, early, to_agent).await;
    if masker.is_some() {
        // Audited: this output was relayed unmasked on a masked resource.
        outcome.unmasked_transfer = transfer;
    }
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
    if !outcome.unmasked.is_empty() {
        detail.insert("unmasked_binary".into(), outcome.unmasked.clone().into());
    }
    if let Some(t) = &outcome.unmasked_transfer {
        detail.insert("unmasked_transfer".into(), t.clone().into());
    }
    if let Some(b) = outcome.binary_refused {
        detail.insert("binary_refused".into(), b.into());
    }
    if let Some(f) = &outcome.sftp {
        detail.insert("sftp".into(), f.clone());
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

/// Most bytes of channel data queued per direction of a channel between
/// reading one side and writing the other. Reading never waits on the other
/// side's window until this is full: a relay that did would stall the
/// russh session loop it reads from, and with data flowing both ways (e.g.
/// `ssh host cat < big`) the two session loops would wait on each other's
/// window adjustments for ever.
pub const RELAY_QUEUE_MAX: usize = 4 * 1024 * 1024;

/// One direction of a channel relay: what to do with each message.
trait Direction {
    /// Handles one message (`None`: the source channel is gone); `false`
    /// ends the direction.
    async fn handle(&mut self, msg: Option<ChannelMsg>) -> bool;

    /// How long the source may be quiet before [`Direction::flush_idle`]
    /// (`None`: nothing is held back).
    fn idle_flush(&self) -> Option<Duration> {
        None
    }

    /// The source went quiet; `false` ends the direction.
    async fn flush_idle(&mut self) -> bool {
        true
    }
}

fn msg_len(m: &Option<ChannelMsg>) -> usize {
    match m {
        Some(ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. }) => data.len(),
        _ => 0,
    }
}

/// Drives one direction: handles messages in order while reading ahead
/// into a queue of at most [`RELAY_QUEUE_MAX`] bytes, so the source's
/// session loop keeps going while the destination waits for its window.
async fn pump<D: Direction>(read: &mut ChannelReadHalf, first: Vec<ChannelMsg>, d: &mut D) {
    let mut queue: VecDeque<Option<ChannelMsg>> = first.into_iter().map(Some).collect();
    let mut queued: usize = queue.iter().map(msg_len).sum();
    let mut source_done = false;
    loop {
        let next = match queue.pop_front() {
            Some(m) => m,
            None if source_done => return,
            None => {
                let m = match d.idle_flush() {
                    Some(t) => match tokio::time::timeout(t, read.wait()).await {
                        Ok(m) => m,
                        Err(_) => {
                            if !d.flush_idle().await {
                                return;
                            }
                            continue;
                        }
                    },
                    None => read.wait().await,
                };
                source_done = m.is_none();
                queued += msg_len(&m);
                m
            }
        };
        let n = msg_len(&next);
        {
            let fut = d.handle(next);
            tokio::pin!(fut);
            loop {
                tokio::select! {
                    biased;
                    go = &mut fut => {
                        if !go {
                            return;
                        }
                        break;
                    }
                    m = read.wait(), if !source_done && queued < RELAY_QUEUE_MAX => {
                        source_done = m.is_none();
                        queued += msg_len(&m);
                        queue.push_back(m);
                    }
                }
            }
        }
        queued -= n;
    }
}

/// Agent → upstream: input, EOF, window changes, signals, close.
struct ToUpstream<'a> {
    conn: &'a Conn,
    write: ChannelWriteHalf<russh::client::Msg>,
    cast: AsciicastChannel,
    /// Bytes of input relayed.
    total: u64,
    /// File operations, on an sftp channel.
    sftp: Option<super::sftp::SftpLog>,
}

impl Direction for ToUpstream<'_> {
    async fn handle(&mut self, msg: Option<ChannelMsg>) -> bool {
        let w = &self.write;
        match msg {
            Some(ChannelMsg::Data { data }) => {
                self.total += data.len() as u64;
                self.conn
                    .bytes_from_client
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                self.cast.input(&data);
                if let Some(log) = &mut self.sftp {
                    log.push(&data);
                }
                w.data_bytes(data).await.is_ok()
            }
            Some(ChannelMsg::ExtendedData { data, ext }) => {
                self.total += data.len() as u64;
                w.extended_data_bytes(ext, data).await.is_ok()
            }
            Some(ChannelMsg::Eof) => w.eof().await.is_ok(),
            Some(ChannelMsg::WindowChange {
                col_width,
                row_height,
                pix_width,
                pix_height,
            }) => {
                self.cast.resize(clamp16(col_width), clamp16(row_height));
                w.window_change(col_width, row_height, pix_width, pix_height)
                    .await
                    .is_ok()
            }
            Some(ChannelMsg::Signal { signal }) => w.signal(signal).await.is_ok(),
            None | Some(ChannelMsg::Close) => {
                let _ = w.close().await;
                false
            }
            // Other requests on a running channel are answered by the
            // server handler and not relayed.
            Some(_) => true,
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
    sftp: Option<Value>,
    /// Output streams relayed unmasked because they were not text.
    unmasked: Vec<&'static str>,
    /// The stream that was not text where `binary = "refuse"`.
    binary_refused: Option<&'static str>,
    /// A file transfer relayed unmasked on a resource with detectors.
    unmasked_transfer: Option<String>,
}

/// Upstream → agent: output (masked) and stderr, EOF, exit status or
/// signal, close.
struct ToAgent<'a> {
    conn: &'a Conn,
    write: ChannelWriteHalf<server::Msg>,
    handle: Option<(server::Handle, russh::ChannelId)>,
    cast: AsciicastChannel,
    mask: super::mask::OutputMask,
    idle: Duration,
    buf: Vec<u8>,
    out: Outcome,
    /// The upstream sent EOF; the agent gets it with the exit status.
    eof_held: bool,
}

impl Direction for ToAgent<'_> {
    async fn handle(&mut self, msg: Option<ChannelMsg>) -> bool {
        match msg {
            Some(ChannelMsg::Data { data }) => match self.mask.stdout(data, &mut self.buf) {
                Ok(data) => self.send(None, data).await,
                Err(b) => self.refuse_binary(b).await,
            },
            Some(ChannelMsg::ExtendedData { data, ext }) => {
                let data = if ext == 1 {
                    match self.mask.stderr(data, &mut self.buf) {
                        Ok(d) => d,
                        Err(b) => return self.refuse_binary(b).await,
                    }
                } else {
                    data
                };
                self.send(Some(ext), data).await
            }
            Some(ChannelMsg::Eof) => {
                self.finish_mask().await;
                // The agent's EOF waits for the exit status (or the
                // close): an agent that has sent its own EOF closes the
                // channel as soon as it has ours (OpenSSH does, under
                // ControlMaster), and the server side of russh answers a
                // close at once, so an exit status relayed after it would
                // be lost (the client reports 255). sshd itself keeps the
                // channel until the command exits.
                // A forward has no exit status: its EOF (a half-close)
                // goes at once, as does an EOF after the exit status.
                if self.handle.is_some()
                    && self.out.exit_status.is_none()
                    && self.out.exit_signal.is_none()
                {
                    self.eof_held = true;
                } else {
                    let _ = self.write.eof().await;
                }
                true
            }
            Some(ChannelMsg::ExitStatus { exit_status }) => {
                self.out.exit_status = Some(exit_status);
                let _ = self.write.exit_status(exit_status).await;
                self.release_eof().await;
                true
            }
            Some(ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                error_message,
                lang_tag,
            }) => {
                self.out.exit_signal = Some(sig_name(&signal_name));
                if let Some((h, id)) = &self.handle {
                    let _ = h
                        .exit_signal_request(*id, signal_name, core_dumped, error_message, lang_tag)
                        .await;
                }
                self.release_eof().await;
                true
            }
            Some(ChannelMsg::XonXoff { client_can_do }) => {
                if let Some((h, id)) = &self.handle {
                    let _ = h.xon_xoff_request(*id, client_can_do).await;
                }
                true
            }
            None | Some(ChannelMsg::Close) => {
                self.finish_mask().await;
                self.release_eof().await;
                let _ = self.write.close().await;
                false
            }
            Some(_) => true,
        }
    }

    fn idle_flush(&self) -> Option<Duration> {
        (self.mask.held() > 0).then_some(self.idle)
    }

    async fn flush_idle(&mut self) -> bool {
        // Quiet: let go of what the maskers held back.
        let (o, e) = self.mask.flush(&mut self.buf);
        self.send(None, o).await && self.send(Some(1), e).await
    }
}

impl ToAgent<'_> {
    async fn send(&mut self, ext: Option<u32>, data: Bytes) -> bool {
        if data.is_empty() {
            return true;
        }
        self.cast.output(&data);
        let n = data.len() as u64;
        self.out.to_client += n;
        self.conn.bytes_to_client.fetch_add(n, Ordering::Relaxed);
        match ext {
            None => self.write.data_bytes(data).await.is_ok(),
            Some(e) => self.write.extended_data_bytes(e, data).await.is_ok(),
        }
    }

    /// A stream turned binary where masking is mandatory: what was masked
    /// so far goes out, then the reason on stderr, exit status 126, EOF and
    /// close (the agent's close then closes the upstream channel).
    async fn refuse_binary(&mut self, b: super::mask::BinaryRefused) -> bool {
        let (o, _) = self.mask.finish(&mut self.buf);
        let _ = self.send(None, o).await;
        self.out.binary_refused = Some(b.stream);
        self.out.exit_status = None;
        end_channel(
            &self.write,
            &format!(
                "output stopped: {} is not text (NUL or invalid UTF-8), and this resource's \
                 [[mask]] rules say binary = \"refuse\"",
                b.stream
            ),
            DENIED_EXIT_STATUS,
        )
        .await;
        false
    }

    /// Sends the upstream's EOF if it was held back (see the `Eof` arm).
    async fn release_eof(&mut self) {
        if std::mem::take(&mut self.eof_held) {
            let _ = self.write.eof().await;
        }
    }

    /// Writes what the maskers held back (end of output).
    async fn finish_mask(&mut self) {
        let (o, e) = self.mask.finish(&mut self.buf);
        let _ = self.send(None, o).await;
        let _ = self.send(Some(1), e).await;
    }
}

/// Relays a channel both ways until both directions are done; returns
/// the input bytes and the outcome.
async fn relay(
    mut a_read: ChannelReadHalf,
    kept: Vec<ChannelMsg>,
    mut to_up: ToUpstream<'_>,
    mut u_read: ChannelReadHalf,
    early: Vec<ChannelMsg>,
    mut to_agent: ToAgent<'_>,
) -> (u64, Outcome) {
    // The agent's direction ends on its EOF or close; the upstream's ends
    // once the upstream closed (the agent then has the exit status, our EOF
    // and our close). When the upstream's ends first, the channel is over:
    // nothing the agent sends can go anywhere, and not every client answers
    // a close by itself (paramiko waits for ours before it sends its own,
    // and the server side of russh does not always hand that answer to the
    // read half), so the agent's direction is not waited for. Waiting held
    // the channel's task, its slot of `MAX_CHANNELS` and its `command_end`
    // record until the whole connection ended.
    let agent_ended = {
        let up = pump(&mut a_read, kept, &mut to_up);
        let down = pump(&mut u_read, early, &mut to_agent);
        tokio::pin!(up, down);
        tokio::select! {
            () = &mut up => {
                down.await;
                true
            }
            () = &mut down => false,
        }
    };
    if !agent_ended {
        let _ = to_up.write.close().await;
    }
    let mut out = to_agent.out;
    out.masked = to_agent.mask.counts();
    out.unmasked = to_agent.mask.binary_streams().to_vec();
    out.sftp = to_up.sftp.as_ref().map(super::sftp::SftpLog::to_json);
    (to_up.total, out)
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
    let to_up = ToUpstream {
        conn: &conn,
        write: u_write,
        cast: cast.clone(),
        total: 0,
        sftp: None,
    };
    // Forwarded bytes are a protocol of their own: relayed as they are.
    let to_agent = ToAgent {
        conn: &conn,
        write: a_write,
        handle: None,
        cast,
        mask: super::mask::OutputMask::new(&conn, super::mask::Mode::Off),
        idle: super::mask::IDLE_FLUSH,
        buf: Vec::new(),
        out: Outcome::default(),
        eof_held: false,
    };
    let (from_client, outcome) =
        relay(a_read, Vec::new(), to_up, u_read, Vec::new(), to_agent).await;
    finish(shared, flow, &cmd, &allowed, from_client, &outcome).await;
}
