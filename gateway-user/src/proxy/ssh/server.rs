//! The agent-side russh server handler. Accepts whatever client
//! authentication the agent offers (identity comes from the flow), answers
//! channel requests at once (so replies never race later requests), and
//! hands each channel's command to a relay task in [`super::channel`]: the
//! connection's read loop never waits on a decision or on the upstream.
//!
//! Owns per-channel setup state (pty, environment) until a command starts.
//! It must not decide or relay anything itself.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use russh::{
    server::{self, Auth, ChannelOpenHandle, Msg, Session},
    Channel, ChannelId, Pty,
};
use tracing::{debug, info};

use super::{
    actions::{self, Request},
    channel::{self, Conn, PtyRequest},
};

/// Per-channel state before its command starts.
#[derive(Default)]
struct Pending {
    chan: Option<Channel<Msg>>,
    pty: Option<PtyRequest>,
    env: Vec<(String, String)>,
    slot: Option<Slot>,
}

/// Most `env` requests kept per channel.
const MAX_ENV: usize = 64;

/// Most channels (sessions and forwards) open at once on one agent
/// connection: each holds buffers (flow-control window, relay queue), so
/// their number is capped too. A channel over it is refused with
/// `resource shortage`; the connection carries on.
pub const MAX_CHANNELS: usize = 64;

/// One open channel, counted until dropped (its relay task ends).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One agent connection's handler.
pub struct AgentHandler {
    conn: Arc<Conn>,
    chans: HashMap<ChannelId, Pending>,
    live: Arc<AtomicUsize>,
}

impl AgentHandler {
    /// A handler for the connection `conn`.
    pub fn new(conn: Arc<Conn>) -> Self {
        Self {
            conn,
            chans: HashMap::new(),
            live: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A channel slot, or `None` when [`MAX_CHANNELS`] are open.
    fn slot(&self) -> Option<Slot> {
        let n = self.live.fetch_add(1, Ordering::Relaxed);
        let slot = Slot(self.live.clone());
        if n >= MAX_CHANNELS {
            info!(session = %self.conn.flow.info.session, open = n, "channel refused: too many open channels");
            return None;
        }
        Some(slot)
    }

    fn accept_user(&self, user: &str, method: &str) -> Auth {
        if let Ok(mut u) = self.conn.agent_user.lock() {
            if u.is_none() {
                debug!(session = %self.conn.flow.info.session, user, method, "agent authentication accepted (not a credential)");
            }
            *u = Some(user.to_string());
        }
        Auth::Accept
    }

    /// Starts a session channel's command.
    fn start(
        &mut self,
        channel: ChannelId,
        req: Request,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let Some(chan) = self.chans.get_mut(&channel).and_then(|p| p.chan.take()) else {
            // A second command on one channel, or an unknown channel.
            return session.channel_failure(channel);
        };
        let pending = self.chans.remove(&channel).unwrap_or_default();
        session.channel_success(channel)?;
        let run = channel::run_session(
            self.conn.clone(),
            chan,
            session.handle(),
            req,
            pending.pty,
            pending.env,
        );
        let slot = pending.slot;
        let task = self.conn.task();
        tokio::spawn(async move {
            run.await;
            drop(slot);
            drop(task);
        });
        Ok(())
    }
}

impl server::Handler for AgentHandler {
    type Error = russh::Error;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        Ok(self.accept_user(user, "none"))
    }

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        Ok(self.accept_user(user, "password"))
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        _key: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.accept_user(user, "publickey"))
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        _certificate: &russh::keys::Certificate,
    ) -> Result<Auth, Self::Error> {
        Ok(self.accept_user(user, "certificate"))
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        _response: Option<server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.accept_user(user, "keyboard-interactive"))
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let id = channel.id();
        let Some(slot) = self.slot() else {
            reply
                .reject(russh::ChannelOpenFailure::ResourceShortage)
                .await;
            return Ok(());
        };
        reply.accept().await;
        self.chans.insert(
            id,
            Pending {
                chan: Some(channel),
                slot: Some(slot),
                ..Default::default()
            },
        );
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(slot) = self.slot() else {
            reply
                .reject(russh::ChannelOpenFailure::ResourceShortage)
                .await;
            return Ok(());
        };
        let run = channel::run_forward(
            self.conn.clone(),
            channel,
            reply,
            host_to_connect.to_string(),
            port_to_connect,
            originator_address.to_string(),
            originator_port,
        );
        let task = self.conn.task();
        tokio::spawn(async move {
            run.await;
            drop(slot);
            drop(task);
        });
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.chans.remove(&channel);
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Granted here and requested upstream when the command starts (a
        // pty the upstream refuses is reported on stderr then).
        match self.chans.get_mut(&channel) {
            Some(p) if p.chan.is_some() => {
                p.pty = Some(PtyRequest {
                    term: term.to_string(),
                    cols: col_width,
                    rows: row_height,
                    pix_width,
                    pix_height,
                    modes: modes.to_vec(),
                });
                session.channel_success(channel)
            }
            _ => session.channel_failure(channel),
        }
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match self.chans.get_mut(&channel) {
            Some(p) if p.chan.is_some() && actions::env_allowed(name) && p.env.len() < MAX_ENV => {
                p.env.push((name.to_string(), value.to_string()));
                session.channel_success(channel)
            }
            _ => {
                debug!(session = %self.conn.flow.info.session, name, "env request refused");
                session.channel_failure(channel)
            }
        }
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        info!(session = %self.conn.flow.info.session, "X11 forwarding refused");
        session.channel_failure(channel)
    }

    async fn agent_request(
        &mut self,
        _channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        // The daemon holds the keys; an agent socket upstream would hand
        // the remote host whatever keys the agent has.
        info!(session = %self.conn.flow.info.session, "agent forwarding refused");
        Ok(false)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start(channel, Request::Shell, session)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command = String::from_utf8_lossy(data).into_owned();
        self.start(channel, Request::Exec(command), session)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name != "sftp" {
            info!(session = %self.conn.flow.info.session, subsystem = name, "subsystem refused");
            return session.channel_failure(channel);
        }
        self.start(channel, Request::Subsystem(name.to_string()), session)
    }
}
