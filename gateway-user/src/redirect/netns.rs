//! Proxy listeners inside network namespaces.
//!
//! A redirected connect goes to 127.0.0.1 (or ::1) *in the caller's own
//! network namespace*, whatever container network it has. So the daemon opens
//! its listener inside each namespace it serves, from a short-lived thread
//! that enters the namespace with setns(2) (the socket keeps its namespace
//! after the thread exits). This works for every container network because
//! it needs none: only the namespace's loopback.
//!
//! A namespace is served only when the daemon's own sockets hold the proxy
//! port on both `127.0.0.1` and `[::1]`: were either held by someone else (a
//! process that bound it first), redirected connects of that family would
//! reach that process. The one exception is a namespace without IPv6
//! loopback at all (no IPv6 in the kernel, or no `::1` on `lo`): it is served
//! for IPv4 only and the kernel refuses its native IPv6 connects.

use std::{
    fs, io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::Path,
};

use socket2::{Domain, Socket, Type};

/// Identity of a network namespace as the filesystem shows it (dev, inode).
pub type NetnsId = (u64, u64);

/// Listeners opened inside one network namespace.
#[derive(Debug)]
pub struct NetnsListeners {
    /// The namespace's cookie, as `bpf_get_netns_cookie` reports it.
    pub cookie: u64,
    /// The listener on 127.0.0.1.
    pub v4: TcpListener,
    /// The listener on ::1; `None` only when the namespace has no IPv6
    /// loopback (then native IPv6 connects from it must be refused).
    pub v6: Option<TcpListener>,
}

/// Whether a failed `[::1]` bind means "this namespace has no IPv6
/// loopback" (nobody can hold `[::1]` there either) rather than "someone
/// else holds it" or another failure.
pub fn no_ipv6_loopback(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
    )
}

/// The namespace of a process, by its `/proc/PID/ns/net` link.
pub fn netns_of_pid(pid: u32) -> io::Result<NetnsId> {
    netns_of_path(Path::new(&format!("/proc/{pid}/ns/net")))
}

/// The namespace a namespace file refers to.
pub fn netns_of_path(path: &Path) -> io::Result<NetnsId> {
    let m = fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Opens the proxy listeners on `port` inside the namespace `ns_file`
/// (e.g. `/proc/PID/ns/net`).
pub fn listen_in(ns_file: &Path, port: u16) -> io::Result<NetnsListeners> {
    let ns = fs::File::open(ns_file)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // Only this thread changes namespace; it ends right after.
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from)?;
            let v4 = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot hold 127.0.0.1:{port}: {e}"))
            })?;
            let v6 = match bind(SocketAddr::from((Ipv6Addr::LOCALHOST, port))) {
                Ok(l) => Some(l),
                Err(e) if no_ipv6_loopback(&e) => None,
                // Held by someone else (or unusable): serving IPv4 alone would
                // hand every redirected IPv6 flow to whoever holds it.
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("cannot hold [::1]:{port}: {e}"),
                    ))
                }
            };
            let cookie = netns_cookie(&v4)?;
            Ok(NetnsListeners { cookie, v4, v6 })
        })
        .join()
        .map_err(|_| io::Error::other("namespace listener thread panicked"))?
    })
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// `SO_NETNS_COOKIE` from asm-generic/socket.h (Linux 5.14+).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the namespace a socket lives in.
pub fn netns_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer to a u64 with its exact length.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}
