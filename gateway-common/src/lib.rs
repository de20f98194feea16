//! Types shared by the Portcullis kernel programs (`gateway-ebpf`) and the
//! daemon (`gateway-user`).
//!
//! Every type here is `#[repr(C)]`, `Copy` and free of padding holes that the
//! verifier or the kernel could leave uninitialised: the kernel side writes
//! them into BPF maps and the daemon reads them back byte for byte. This crate
//! owns the map names and layouts; it must not grow any logic that either side
//! could disagree on.
#![no_std]

/// Name of the map of tagged cgroups: cgroup id → [`TagMark`].
pub const MAP_TAGGED_CGROUPS: &str = "TAGGED_CGROUPS";
/// Name of the map of connects awaiting establishment: socket cookie → [`OrigDst`].
pub const MAP_PENDING_CONNECTS: &str = "PENDING_CONNECTS";
/// Name of the map of established redirected flows: [`FlowKey`] → [`OrigDst`].
pub const MAP_FLOWS: &str = "FLOWS";
/// Name of the map of network namespaces that have a proxy listener:
/// netns cookie → [`NetnsMark`].
pub const MAP_SERVED_NETNS: &str = "SERVED_NETNS";
/// Name of the single-entry array holding the [`RedirectConfig`].
pub const MAP_CONFIG: &str = "CONFIG";
/// Name of the ring buffer of [`KernelEvent`]s.
pub const MAP_EVENTS: &str = "EVENTS";

/// Name of the map of UDP destinations tagged cgroups may still reach:
/// [`UdpAllowKey`] → [`UdpAllowMark`]. Every other UDP datagram or UDP
/// connect from a tagged cgroup is refused in the kernel.
pub const MAP_UDP_ALLOW: &str = "UDP_ALLOW";

/// Layout version of the maps above. The daemon refuses to reuse pinned maps
/// made by a different layout version and replaces them instead.
pub const MAP_LAYOUT_VERSION: u32 = 1;

/// Address family markers stored in [`FlowKey::family`] and [`OrigDst::family`].
pub const FAMILY_INET: u16 = 2;
/// See [`FAMILY_INET`].
pub const FAMILY_INET6: u16 = 10;

/// Deepest cgroup nesting level the kernel programs search for a tagged
/// ancestor. Deeper cgroups are matched on their first 32 ancestors only.
pub const MAX_CGROUP_DEPTH: i32 = 32;

/// What the daemon tells the kernel programs. Index 0 of [`MAP_CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectConfig {
    /// Port of the proxy listener, host byte order. The same port is served
    /// on 127.0.0.1 and ::1 in every network namespace the daemon serves.
    pub listen_port: u16,
    /// Non-zero once the daemon has filled this in; until then (and after an
    /// orderly shutdown, which clears it) tagged connects are refused
    /// because there is nowhere to redirect to.
    pub enabled: u16,
    /// Reserved, zero. (It once held the daemon's PID as an exemption: a
    /// PID outlives the daemon in a pinned map and can be reused by anyone,
    /// so no process is exempt by PID.)
    pub _reserved: u32,
}

/// Value of [`MAP_TAGGED_CGROUPS`]. Only presence matters to the kernel; the
/// identity bound to a tag lives in the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TagMark {
    /// Daemon-side tag generation, for debugging with `bpftool map dump`.
    pub generation: u32,
}

/// [`NetnsMark::flags`]: the namespace has no IPv6 loopback, so the daemon
/// holds only its `127.0.0.1` listener there and native IPv6 connects from
/// it are refused instead of being sent to `[::1]`.
pub const NETNS_NO_IPV6: u32 = 1;

/// Value of [`MAP_SERVED_NETNS`]: the daemon's own listeners hold the proxy
/// port on `127.0.0.1` and (unless [`NETNS_NO_IPV6`]) `[::1]` there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetnsMark {
    /// `NETNS_*` bits.
    pub flags: u32,
}

/// The client side of an established redirected connection, as the proxy sees
/// it on accept: the client's own address and port inside its network
/// namespace. IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`) so that
/// an AF_INET6 socket dialing an IPv4 target and an AF_INET socket produce the
/// same key the proxy computes from its IPv4 listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// `bpf_get_netns_cookie` of the client's network namespace.
    pub netns_cookie: u64,
    /// Client address, network byte order, IPv4-mapped for IPv4.
    pub addr: [u8; 16],
    /// Client port, host byte order.
    pub port: u16,
    /// Explicit padding so the key has no uninitialised bytes.
    pub _pad: [u8; 6],
}

/// Where a redirected connection was going and who opened it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Cgroup v2 id (inode of the cgroup directory) of the connecting task.
    pub cgroup_id: u64,
    /// Original destination address, network byte order; IPv4 targets are
    /// stored IPv4-mapped whatever the socket's family.
    pub addr: [u8; 16],
    /// Original destination port, host byte order.
    pub port: u16,
    /// [`FAMILY_INET`] or [`FAMILY_INET6`]: the family of the socket.
    pub family: u16,
    /// Process id (tgid) of the connecting task.
    pub pid: u32,
}

/// Key of [`MAP_UDP_ALLOW`]: a UDP destination a tagged cgroup may send to.
/// An all-zero `addr` means "any address" on that port (looked up after the
/// exact address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UdpAllowKey {
    /// Destination address, network byte order, IPv4-mapped for IPv4; all
    /// zero for any address.
    pub addr: [u8; 16],
    /// Destination port, host byte order.
    pub port: u16,
    /// Explicit padding so the key has no uninitialised bytes.
    pub _pad: [u8; 6],
}

/// Value of [`MAP_UDP_ALLOW`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpAllowMark {
    /// Reserved; only presence matters.
    pub flags: u32,
}

/// Kinds of [`KernelEvent`].
pub const EVENT_UNSERVED_NETNS: u32 = 1;

/// Something the kernel side wants the daemon to act on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelEvent {
    /// One of the `EVENT_*` constants.
    pub kind: u32,
    /// Process id (tgid) that triggered the event.
    pub pid: u32,
    /// Netns cookie concerned.
    pub netns_cookie: u64,
    /// Cgroup id of the task.
    pub cgroup_id: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], Copy, contain only integers and
    // byte arrays, and have explicit padding, so any bit pattern is valid.
    unsafe impl aya::Pod for super::RedirectConfig {}
    unsafe impl aya::Pod for super::TagMark {}
    unsafe impl aya::Pod for super::NetnsMark {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::KernelEvent {}
    unsafe impl aya::Pod for super::UdpAllowKey {}
    unsafe impl aya::Pod for super::UdpAllowMark {}
}

/// Returns `addr` (4 bytes, network order) as an IPv4-mapped IPv6 address.
///
/// ```
/// let mapped = gateway_common::ipv4_mapped([10, 0, 0, 5]);
/// assert_eq!(std::net::Ipv6Addr::from(mapped).to_string(), "::ffff:10.0.0.5");
/// ```
pub const fn ipv4_mapped(addr: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<FlowKey>(), 8 + 16 + 2 + 6);
        assert_eq!(core::mem::size_of::<OrigDst>(), 8 + 16 + 2 + 2 + 4);
        assert_eq!(core::mem::size_of::<RedirectConfig>(), 8);
        assert_eq!(core::mem::size_of::<KernelEvent>(), 24);
        assert_eq!(core::mem::size_of::<UdpAllowKey>(), 16 + 2 + 6);
    }

    #[test]
    fn ipv4_is_mapped() {
        assert_eq!(
            ipv4_mapped([127, 0, 0, 1]),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]
        );
    }
}
