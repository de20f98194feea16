//! The `ssh` protocol handler: an intercepting SSH proxy that holds the
//! keys. The agent's SSH client talks to a russh server here (with the
//! daemon's host key); the daemon logs in to the real server with the
//! resource's held key and relays channel by channel, deciding each
//! channel request through [`super::gate`].
//!
//! Owns both SSH legs of a flow: the agent-side server ([`server`]), the
//! upstream client ([`upstream`]), the channel relays ([`channel`]), the
//! mapping of channel requests to actions ([`actions`]) and host keys
//! ([`hostkey`]). It must not decide anything itself (the gate does), nor
//! write recordings other than through `flow.recording`.
//!
//! # Actions
//!
//! | channel request | action | context |
//! |---|---|---|
//! | `exec` of a plain command (including `scp -t/-f`, `rsync --server`) | `ssh:exec` | `command` = the command line; `argv` (set of its words), `program` (first word), `args` (set of the rest) |
//! | `exec` of a string with shell syntax (`;` `&` `|` `$` `` ` `` `>` newline ..., see [`words`]) | `ssh:shell` | `command` = the string |
//! | `shell` (with or without a pty) | `ssh:shell` | |
//! | `subsystem sftp` | `ssh:sftp` | `subsystem` = `sftp` |
//! | `direct-tcpip` (`ssh -L`, `-W`, `-J`) | `ssh:forward` | `host`, `port` |
//!
//! Every context carries all seven attributes (`command`, `argv`,
//! `program`, `args`, `subsystem`, `host`, `port`; empty or 0 when not
//! applicable). Refused without a
//! decision: agent forwarding (the daemon holds the keys; an agent must not
//! reach them), X11, remote forwarding (`ssh -R`), Unix socket forwarding,
//! subsystems other than sftp. `env` requests pass only for `LANG`,
//! `LANGUAGE`, `TZ` and `LC_*`.
//!
//! A denied command gets the reason on the channel's stderr, exit status
//! [`DENIED_EXIT_STATUS`] and a closed channel; the connection stays
//! usable. A held command gets a line on stderr naming the access request
//! and waits; its input is buffered up to [`channel::HELD_INPUT_MAX`]
//! meanwhile. A denied forward is an `administratively prohibited`
//! channel-open failure. Window changes, signals, EOF, exit-status,
//! exit-signal and close are relayed as they come. Output of exec and shell
//! channels (stdout and stderr) is masked when the resource has `[[mask]]`
//! detectors, and recorded as asciicast v2 per channel. An sftp channel's
//! file operations (open with mode, remove, rename, mkdir, rmdir, setstat,
//! opendir, symlink) go into its `command_end` audit record.
//!
//! # Logging in upstream
//!
//! The daemon logs in as `credentials.user`; when the resource names no
//! user, as the user the agent asked for (`ssh deploy@host`). It signs with
//! `credentials.private_key_file`, presenting `credentials.certificate_file`
//! when set. The upstream host key must match the resource's `known_hosts`
//! (names `host` or `[host]:port`, hashed entries, `@revoked`,
//! `@cert-authority`) or be a host certificate signed by a key in
//! `host_ca` whose principals name the host; with neither file the resource
//! does not load (strict).
//!
//! # What an agent container needs to trust the daemon
//!
//! The agent keeps dialing the real host (say `10.0.0.7:22`); interception
//! sends it to the daemon, which answers with its own host key, so the
//! agent's `known_hosts` must hold that key for the real host's name. One of:
//!
//! 1. The daemon's key: `<state>/ssh/host_ed25519.pub` (generated at the
//!    first start, mode 0600 for the private half; the daemon logs its
//!    fingerprint). Put `10.0.0.7 ssh-ed25519 AAAA…` (or `[host]:port` for a
//!    port other than 22) in the agent's `~/.ssh/known_hosts`, or pass
//!    `-o UserKnownHostsFile=<file>`; keep `StrictHostKeyChecking=yes`. A
//!    resource may use a key of its own with `host_key_file`.
//! 2. A host CA: sign the daemon's (or the resource's) host key, e.g.
//!    `ssh-keygen -s host_ca -h -I portcullis -n 10.0.0.7,build.internal
//!    host_ed25519.pub`, set `host_certificate_file` on the resource, and give
//!    agents `@cert-authority 10.0.0.7,*.internal ssh-ed25519 AAAA…(CA key)`.
//!
//! The agent needs no key of its own: whatever client authentication it
//! offers (`none`, `password`, `publickey`, `keyboard-interactive`) is
//! accepted and is not a credential; its identity is the flow's.

pub mod actions;
pub mod channel;
pub mod hostkey;
pub mod mask;
pub mod server;
pub mod sftp;
pub mod upstream;
pub mod words;

use std::{
    future::Future,
    io,
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc, Mutex, PoisonError},
    time::Duration,
};

use russh::keys::PrivateKey;
use tokio::net::TcpStream;
use tracing::{info, warn};

use super::{Flow, SessionSummary};
use crate::daemon::Shared;

/// Exit status of a denied (or refused-after-hold) command.
pub const DENIED_EXIT_STATUS: u32 = 126;

/// Exit status when the upstream cannot run the command (unreachable,
/// login failed, request refused): what OpenSSH's `ssh` itself uses.
pub const UPSTREAM_EXIT_STATUS: u32 = 255;

/// Per-channel flow-control window offered to the agent (russh's default).
pub const SSH_WINDOW: u32 = 2 * 1024 * 1024;
/// Largest channel data packet the agent may send (russh's default).
pub const SSH_MAX_PACKET: u32 = 32 * 1024;
/// Messages russh queues per channel before it stops reading.
pub const SSH_CHANNEL_BUFFER: usize = 100;
/// Messages (each at most one packet of upstream output, 32 KiB) the relay
/// may queue for an agent connection's session loop before it waits.
/// russh's default (10) makes a download stall on every few packets while
/// the loop encrypts and writes; 64 keeps at most 2 MiB (one agent window)
/// in flight per connection, so the relay can hand over a whole window
/// while the loop is off CPU. tokio allocates the queue's slots in blocks
/// of 32 as they are used (the first block with the queue), so the bound
/// costs an idle session nothing beyond russh's default.
pub const SSH_EVENT_BUFFER: usize = 64;
/// Channel window the daemon offers the upstream server (download
/// direction). russh tops a window up once half of it is used, so with
/// 2 MiB the server stalls whenever the relay is off CPU for the time 1 MiB
/// takes to arrive; 8 MiB leaves it room. Memory stays bounded by the
/// relay's queues ([`channel::RELAY_QUEUE_MAX`], russh's channel buffer):
/// when they are full the upstream is no longer read (TCP backpressure).
pub const SSH_UPSTREAM_WINDOW: u32 = 8 * 1024 * 1024;

/// How long the agent has to send its SSH identification line.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// An SSH handler problem.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// A key, certificate or trust file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// A key or certificate did not parse.
    #[error("{}: {msg}", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// The resource's SSH settings cannot work.
    #[error("{0}")]
    Config(String),
    /// The upstream could not be reached, verified or logged in to.
    #[error("upstream: {0}")]
    Upstream(String),
}

impl SshError {
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn key(path: &Path, e: impl std::fmt::Display) -> Self {
        Self::Key {
            path: path.to_path_buf(),
            msg: e.to_string(),
        }
    }
}

/// The agent-side server settings for a flow, as [`server_config`], shared
/// by every flow served with the daemon's own host key: built once, not
/// kept once per idle session. A resource with its own key or certificate
/// gets its files read for each flow, so a rotated file takes effect at
/// the next connection.
fn shared_server_config(
    flow: &Flow,
    daemon_key: &Arc<PrivateKey>,
) -> Result<Arc<russh::server::Config>, SshError> {
    /// The settings built with the daemon key they were built with. The
    /// key is held, so a pointer match is the same key.
    static WITH_DAEMON_KEY: Mutex<Option<(Arc<PrivateKey>, Arc<russh::server::Config>)>> =
        Mutex::new(None);
    let own_files =
        flow.resource.host_key_file.is_some() || flow.resource.host_certificate_file.is_some();
    if own_files {
        return server_config(flow, daemon_key).map(Arc::new);
    }
    let mut cached = WITH_DAEMON_KEY
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some((key, config)) = cached.as_ref() {
        if Arc::ptr_eq(key, daemon_key) {
            return Ok(config.clone());
        }
    }
    let config = Arc::new(server_config(flow, daemon_key)?);
    *cached = Some((daemon_key.clone(), config.clone()));
    Ok(config)
}

/// The agent-side server settings for a flow: the resource's own host key
/// (or the daemon's) and its host certificate, if any.
fn server_config(
    flow: &Flow,
    daemon_key: &Arc<PrivateKey>,
) -> Result<russh::server::Config, SshError> {
    use russh::{MethodKind, MethodSet};
    let key = match &flow.resource.host_key_file {
        Some(p) => hostkey::load_private(p)?,
        None => PrivateKey::clone(daemon_key),
    };
    let mut certificates = Vec::new();
    if let Some(p) = &flow.resource.host_certificate_file {
        let cert = hostkey::load_certificate(p)?;
        if cert.public_key() != key.public_key().key_data() {
            return Err(SshError::Config(format!(
                "{} certifies another key than the host key",
                p.display()
            )));
        }
        certificates.push(cert);
    }
    Ok(russh::server::Config {
        server_id: russh::SshId::Standard("SSH-2.0-Portcullis".into()),
        methods: MethodSet::from(
            &[
                MethodKind::None,
                MethodKind::PublicKey,
                MethodKind::Password,
                MethodKind::KeyboardInteractive,
            ][..],
        ),
        // Nothing is ever rejected on purpose (the agent's credentials are
        // not checked), so there is no timing to hide.
        auth_rejection_time: Duration::from_millis(10),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![key],
        certificates,
        // Idle shells are legitimate; dead peers are found by keepalives.
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        nodelay: true,
        // Memory per channel is bounded by flow control, set here rather
        // than inherited so an upgrade cannot silently raise it: the agent
        // may have at most `window_size` unacknowledged bytes in flight per
        // channel, in packets of at most `maximum_packet_size`, and russh
        // queues at most `channel_buffer_size` messages per channel
        // (russh itself refuses transport packets over 256 KiB).
        window_size: SSH_WINDOW,
        maximum_packet_size: SSH_MAX_PACKET,
        channel_buffer_size: SSH_CHANNEL_BUFFER,
        event_buffer_size: SSH_EVENT_BUFFER,
        preferred: agent_preferred(),
        ..Default::default()
    })
}

/// Algorithms offered to the agent: russh's defaults without compression.
/// The agent's leg never leaves the host, so compression buys nothing and
/// costs a zlib state per connection; and russh's delayed
/// `zlib@openssh.com` is broken against clients that prefer it: russh
/// starts compressing only when the client's next packet after login
/// arrives, so a client idle after login gets the daemon's next packet (a
/// keepalive, or the disconnect of an ended session) uncompressed, fails
/// to decompress it and drops the connection (asyncssh; OpenSSH with
/// `-C`). Every client supports
/// `none`; the upstream leg offers `none` first, so it never compresses
/// either.
fn agent_preferred() -> russh::Preferred {
    russh::Preferred {
        compression: std::borrow::Cow::Borrowed(&[russh::compression::NONE]),
        ..russh::Preferred::default()
    }
}

/// How long a closed connection's channel tasks get to finish (record
/// their exit statuses) before the upstream connection is cut.
const CHANNELS_DONE_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs an SSH flow: the agent-side server until the agent disconnects,
/// the session is ended, or the connection fails.
///
/// Not an `async fn`: the flow moves into the connection's state before
/// the returned future starts, so the future (held for the session's
/// life) keeps no dead copy of it.
pub fn serve(
    shared: &Arc<Shared>,
    flow: Flow,
    client: TcpStream,
) -> impl Future<Output = io::Result<SessionSummary>> + Send + '_ {
    let setup = match shared_server_config(&flow, &shared.ssh_host_key) {
        Ok(config) => Ok((config, Arc::new(channel::Conn::new(shared.clone(), flow)))),
        Err(e) => {
            warn!(session = %flow.info.session, "ssh flow refused: {e}");
            Err(e)
        }
    };
    async move {
        let (config, conn) = match setup {
            Ok(setup) => setup,
            Err(e) => {
                super::refuse(client);
                return Err(io::Error::other(e.to_string()));
            }
        };
        run(conn, config, client).await
    }
}

/// The agent-side server of a connection whose flow is in `conn`.
async fn run(
    conn: Arc<channel::Conn>,
    config: Arc<russh::server::Config>,
    client: TcpStream,
) -> io::Result<SessionSummary> {
    let _ = client.set_nodelay(true);
    let cancel = conn.flow.cancel.clone();
    let handler = server::AgentHandler::new(conn.clone());
    // Boxed: the handshake's state is freed once it is done instead of
    // staying in this future (and so in the session's task) for the
    // session's whole life.
    let started = tokio::time::timeout(
        HELLO_TIMEOUT,
        Box::pin(russh::server::run_stream(config, client, handler)),
    )
    .await;
    let running = match started {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            conn.gone.cancel();
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("ssh handshake: {e}"),
            ));
        }
        Err(_) => {
            conn.gone.cancel();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "ssh handshake: no identification from the agent",
            ));
        }
    };
    let handle = running.handle();
    tokio::pin!(running);
    let (result, reason) = tokio::select! {
        r = &mut running => (r, "closed"),
        _ = cancel.cancelled() => {
            // Boxed, as the steps after the session below: this future
            // lives as long as the session, and an idle one should not
            // hold the state of its ending.
            let _ = Box::pin(handle.disconnect(
                russh::Disconnect::ByApplication,
                "session ended by portcullis".into(),
                "en".into(),
            ))
            .await;
            // Give the disconnect a moment to reach the agent.
            let r = tokio::time::timeout(Duration::from_secs(2), &mut running)
                .await
                .unwrap_or(Ok(()));
            (r, "ended by the daemon")
        }
    };
    conn.gone.cancel();
    // The agent's channels are gone, so each task closes its upstream
    // channel and ends; their exit statuses and byte counts are recorded
    // before the session's end (bounded: a stuck upstream is cut below).
    Box::pin(conn.tasks_done(CHANNELS_DONE_TIMEOUT)).await;
    Box::pin(conn.close_upstream()).await;
    let summary = SessionSummary {
        bytes_from_client: conn.bytes_from_client.load(Ordering::Relaxed),
        bytes_to_client: conn.bytes_to_client.load(Ordering::Relaxed),
        end_reason: reason,
    };
    // The recording's `meta.json` counts the channel data too.
    conn.flow
        .recording
        .tcp_bytes(summary.bytes_from_client, summary.bytes_to_client);
    match result {
        Ok(()) => Ok(summary),
        Err(e) if is_disconnect(&e) => Ok(summary),
        Err(e) => {
            info!(session = %conn.flow.info.session, "ssh session ended: {e}");
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("ssh: {e}"),
            ))
        }
    }
}

/// Refuses a new connection while the daemon is over its memory budget:
/// the SSH handshake completes, the agent is shown `message` as the
/// authentication banner and every login is refused (OpenSSH prints the
/// banner, then "Permission denied"). The caller bounds the time.
pub async fn shed(shared: &Arc<Shared>, flow: &Flow, client: TcpStream, message: &str) {
    let Ok(mut config) = server_config(flow, &shared.ssh_host_key) else {
        super::refuse(client);
        return;
    };
    config.keepalive_interval = None;
    let handler = Shed(format!("portcullis: {message}\r\n"));
    if let Ok(running) = russh::server::run_stream(Arc::new(config), client, handler).await {
        let _ = running.await;
    }
}

/// The handler of a shed connection: a banner, and no login succeeds.
struct Shed(String);

impl russh::server::Handler for Shed {
    type Error = russh::Error;

    async fn authentication_banner(&mut self) -> Result<Option<String>, Self::Error> {
        Ok(Some(self.0.clone()))
    }

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        _offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<russh::server::Auth, Self::Error> {
        Ok(russh::server::Auth::reject())
    }
}

/// Errors that are just the peer going away.
fn is_disconnect(e: &russh::Error) -> bool {
    matches!(
        e,
        russh::Error::Disconnect | russh::Error::HUP | russh::Error::ConnectionTimeout
    ) || matches!(e, russh::Error::IO(io) if matches!(io.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent is offered no compression (russh's delayed zlib breaks
    /// idle clients that prefer it; tests/e2e/idle.rs shows it end to end),
    /// and the rest of russh's defaults are kept.
    #[test]
    fn the_agent_is_offered_no_compression() {
        let p = agent_preferred();
        assert_eq!(&p.compression[..], &[russh::compression::NONE]);
        let d = russh::Preferred::default();
        assert_eq!(p.kex, d.kex);
        assert_eq!(p.cipher, d.cipher);
        assert_eq!(p.mac, d.mac);
    }
}
