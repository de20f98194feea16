//! The byte relay of a plain TCP flow once it is let in: both directions
//! copied until each side has half-closed, a half-close passed on as a
//! half-close (`shutdown(SHUT_WR)`), a reset or failure on one side passed
//! on to the other as a reset.
//!
//! Nothing here reads the bytes, so they move kernel to kernel with
//! `splice(2)` through a pipe per direction (made on the direction's first
//! data): no copy through userspace, no buffer in the daemon's memory, one
//! `splice` in and one out per chunk of up to [`PIPE_SIZE`]. Where a pipe
//! cannot be made (fd limit) or the kernel refuses to splice, the direction
//! falls back to a userspace copy whose buffer starts small and grows with
//! the traffic (an idle or chatty flow holds little).
//!
//! Owns the copy loop and its byte counts. It must not decide, audit or
//! close sockets beyond what a relay does (half-close, reset): the caller
//! owns the sockets and ends the session.

use std::{
    future::Future,
    io,
    os::fd::{AsFd, OwnedFd},
    sync::atomic::{AtomicU64, Ordering},
    task::Poll,
    time::Duration,
};

use nix::{
    fcntl::{self, FcntlArg, OFlag, SpliceFFlags},
    unistd,
};
use tokio::{io::Interest, net::TcpStream};

/// Capacity asked for each direction's pipe: what one `splice` pair moves
/// at most. Larger than the 64 KiB default so a bulk transfer costs fewer
/// system calls; the pages are the kernel's and only held while data is in
/// flight (a drained pipe holds none).
pub const PIPE_SIZE: usize = 256 * 1024;

/// First size of a fallback copy buffer.
const COPY_BUFFER_MIN: usize = 8 * 1024;
/// Largest fallback copy buffer: it doubles each time a read fills it.
const COPY_BUFFER_MAX: usize = 64 * 1024;

/// Which end of the flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The agent's connection to the daemon.
    Agent,
    /// The daemon's connection to the upstream.
    Upstream,
}

impl Side {
    fn other(self) -> Self {
        match self {
            Self::Agent => Self::Upstream,
            Self::Upstream => Self::Agent,
        }
    }
}

/// How a relay ended.
#[derive(Debug)]
pub enum End {
    /// Both directions reached end of stream and were passed on.
    Closed,
    /// `side` reset the connection (or failed with `error`): the other side
    /// must be reset too ([`reset`]), which is the caller's job since it
    /// owns the sockets.
    Reset {
        /// The side that went away.
        side: Side,
        /// What the socket said.
        error: io::Error,
    },
}

/// What a relay did.
#[derive(Debug)]
pub struct Relayed {
    /// Bytes read from the agent and written upstream.
    pub from_client: u64,
    /// Bytes read from the upstream and written to the agent.
    pub to_client: u64,
    /// How it ended.
    pub end: End,
}

/// Relays between `agent` and `upstream` until both directions are closed
/// or one side resets or fails. Cancel-safe in the sense that dropping the
/// future stops the relay with nothing buffered in userspace lost that
/// was counted (counts are of bytes handed to the destination socket).
pub async fn relay(agent: &TcpStream, upstream: &TcpStream) -> Relayed {
    let from_client = AtomicU64::new(0);
    let to_client = AtomicU64::new(0);
    let up = pump(agent, upstream, Side::Agent, &from_client);
    let down = pump(upstream, agent, Side::Upstream, &to_client);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    // Like `join!`, except that a reset ends both directions at once.
    let end = std::future::poll_fn(|cx| {
        if !up_done {
            if let Poll::Ready(r) = up.as_mut().poll(cx) {
                if let Err(fault) = r {
                    return Poll::Ready(fault.into_end());
                }
                up_done = true;
            }
        }
        if !down_done {
            if let Poll::Ready(r) = down.as_mut().poll(cx) {
                if let Err(fault) = r {
                    return Poll::Ready(fault.into_end());
                }
                down_done = true;
            }
        }
        if up_done && down_done {
            Poll::Ready(End::Closed)
        } else {
            Poll::Pending
        }
    })
    .await;
    Relayed {
        from_client: from_client.load(Ordering::Relaxed),
        to_client: to_client.load(Ordering::Relaxed),
        end,
    }
}

/// Closes `stream` with a reset (SO_LINGER 0): how a relay tells one side
/// that the other reset.
pub fn reset(stream: TcpStream) {
    if let Ok(std) = stream.into_std() {
        let _ = socket2::Socket::from(std).set_linger(Some(Duration::ZERO));
    }
}

/// A direction's failure: which socket it came from.
struct Fault {
    side: Side,
    error: io::Error,
}

impl Fault {
    fn into_end(self) -> End {
        End::Reset {
            side: self.side,
            error: self.error,
        }
    }
}

/// One direction, `src` to `dst`: splice while it can, else copy.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    from: Side,
    moved: &AtomicU64,
) -> Result<(), Fault> {
    let src_fault = |error| Fault { side: from, error };
    let dst_fault = |error| Fault {
        side: from.other(),
        error,
    };
    // Nothing is made before the first byte: an idle flow holds no pipe.
    if let Err(e) = src.readable().await {
        return Err(src_fault(e));
    }
    match Pipe::new() {
        Ok(pipe) => match splice_loop(src, dst, &pipe, moved).await {
            Err(Step::Unsupported) => {}
            other => return finish(other, dst, src_fault, dst_fault),
        },
        Err(e) => tracing::debug!("no pipe for a tcp relay, copying instead: {e}"),
    }
    let r = copy_loop(src, dst, moved).await;
    finish(r, dst, src_fault, dst_fault)
}

/// Ends a direction: at end of stream, the half-close is passed on.
fn finish(
    r: Result<(), Step>,
    dst: &TcpStream,
    src_fault: impl FnOnce(io::Error) -> Fault,
    dst_fault: impl FnOnce(io::Error) -> Fault,
) -> Result<(), Fault> {
    match r {
        Ok(()) => match socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write) {
            // The destination already went away: its own direction reports it.
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            Err(e) => Err(dst_fault(e)),
        },
        Err(Step::Src(e)) => Err(src_fault(e)),
        Err(Step::Dst(e)) => Err(dst_fault(e)),
        Err(Step::Unsupported) => Err(src_fault(io::Error::other("relay: no copy method left"))),
    }
}

/// Why a loop stopped before end of stream.
enum Step {
    /// Reading the source failed.
    Src(io::Error),
    /// Writing the destination failed.
    Dst(io::Error),
    /// `splice` is not possible on these descriptors (nothing was moved).
    Unsupported,
}

/// A pipe both ends of which this direction owns.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        // A smaller pipe still works (the default is 64 KiB): the size is
        // only a hint for fewer system calls.
        let capacity = fcntl::fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32))
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(64 * 1024);
        Ok(Self {
            read,
            write,
            capacity,
        })
    }
}

fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    fcntl::splice(
        from,
        None,
        to,
        None,
        len,
        SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
    )
    .map_err(io::Error::from)
}

/// Socket to pipe, pipe to socket, until end of stream. The pipe is
/// drained before the next read, so a read that would block can only mean
/// the socket has nothing (never a full pipe): the readiness tokio clears
/// then is the socket's own.
async fn splice_loop(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &Pipe,
    moved: &AtomicU64,
) -> Result<(), Step> {
    let mut spliced_any = false;
    loop {
        let n = loop {
            match src.try_io(Interest::READABLE, || {
                splice(src, &pipe.write, pipe.capacity)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    src.readable().await.map_err(Step::Src)?;
                }
                Err(e) if !spliced_any && e.raw_os_error() == Some(libc::EINVAL) => {
                    return Err(Step::Unsupported);
                }
                Err(e) => return Err(Step::Src(e)),
            }
        };
        spliced_any = true;
        if n == 0 {
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            match dst.try_io(Interest::WRITABLE, || splice(&pipe.read, dst, left)) {
                Ok(0) => return Err(Step::Dst(io::ErrorKind::WriteZero.into())),
                Ok(k) => {
                    left -= k;
                    moved.fetch_add(k as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    dst.writable().await.map_err(Step::Dst)?;
                }
                Err(e) => return Err(Step::Dst(e)),
            }
        }
    }
}

/// The userspace fallback: read into a buffer that starts at
/// [`COPY_BUFFER_MIN`] and doubles (up to [`COPY_BUFFER_MAX`]) whenever a
/// read fills it, write it all, repeat.
async fn copy_loop(src: &TcpStream, dst: &TcpStream, moved: &AtomicU64) -> Result<(), Step> {
    let mut buf = vec![0u8; COPY_BUFFER_MIN];
    loop {
        let n = loop {
            match src.try_read(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    src.readable().await.map_err(Step::Src)?;
                }
                Err(e) => return Err(Step::Src(e)),
            }
        };
        if n == 0 {
            return Ok(());
        }
        let mut done = 0;
        while done < n {
            match dst.try_write(&buf[done..n]) {
                Ok(0) => return Err(Step::Dst(io::ErrorKind::WriteZero.into())),
                Ok(k) => {
                    done += k;
                    moved.fetch_add(k as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    dst.writable().await.map_err(Step::Dst)?;
                }
                Err(e) => return Err(Step::Dst(e)),
            }
        }
        if n == buf.len() && buf.len() < COPY_BUFFER_MAX {
            buf.resize(buf.len() * 2, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    /// (agent's own end, the daemon's agent-side socket, the daemon's
    /// upstream socket, the upstream's own end), all on loopback.
    async fn pairs() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
        let l1 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let l2 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let agent = TcpStream::connect(l1.local_addr().unwrap()).await.unwrap();
        let (daemon_agent, _) = l1.accept().await.unwrap();
        let daemon_up = TcpStream::connect(l2.local_addr().unwrap()).await.unwrap();
        let (upstream, _) = l2.accept().await.unwrap();
        (agent, daemon_agent, daemon_up, upstream)
    }

    fn data(seed: u8, n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
            .collect()
    }

    #[tokio::test]
    async fn bytes_arrive_intact_both_ways_and_half_closes_pass() {
        let (mut agent, d_agent, d_up, mut upstream) = pairs().await;
        let relay = tokio::spawn(async move { relay(&d_agent, &d_up).await });
        let (up, down) = (data(1, 3 << 20), data(7, 5 << 20));
        let (up2, down2) = (up.clone(), down.clone());
        let agent_side = tokio::spawn(async move {
            let (mut r, mut w) = agent.split();
            let send = async {
                w.write_all(&up2).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let recv = r.read_to_end(&mut got);
            let (_, n) = tokio::join!(send, recv);
            n.unwrap();
            got
        });
        let (mut r, mut w) = upstream.split();
        let mut got = Vec::new();
        let send = async {
            w.write_all(&down2).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let (_, n) = tokio::join!(send, r.read_to_end(&mut got));
        n.unwrap();
        assert!(got == up, "agent to upstream differs");
        assert!(
            agent_side.await.unwrap() == down,
            "upstream to agent differs"
        );
        let relayed = relay.await.unwrap();
        assert!(matches!(relayed.end, End::Closed), "{relayed:?}");
        assert_eq!(relayed.from_client, up.len() as u64);
        assert_eq!(relayed.to_client, down.len() as u64);
    }

    #[tokio::test]
    async fn a_reset_upstream_ends_the_relay_naming_the_upstream() {
        let (mut agent, d_agent, d_up, upstream) = pairs().await;
        agent.write_all(b"hello").await.unwrap();
        reset(upstream);
        let relayed = relay(&d_agent, &d_up).await;
        match relayed.end {
            End::Reset { side, .. } => assert_eq!(side, Side::Upstream),
            other => panic!("{other:?}"),
        }
    }
}
