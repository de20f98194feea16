//! Portcullis kernel programs.
//!
//! Owns the kernel half of interception: deciding which TCP connects are
//! redirected (those from tagged cgroups and their descendants), rewriting
//! their destination to the daemon's listener in the caller's own network
//! namespace, and remembering where each one was going so the daemon can look
//! the flow up by the client's address when it accepts it.
//!
//! It also closes the other ways out of a tagged cgroup that the proxy cannot
//! govern: UDP is refused except to the destinations the daemon put in
//! `UDP_ALLOW` (the resolvers by default), sockets other than plain TCP and
//! UDP (raw, ICMP, SCTP, MPTCP, ...) cannot be created at all, and, where BPF
//! LSM is active, neither can sockets of any family that reaches the wire
//! without passing an inet hook (AF_PACKET, AF_XDP, AF_VSOCK, AF_TIPC, ...).
//!
//! No process is exempt by its PID: the daemon's own sockets are never
//! governed because the daemon never runs in a tagged cgroup (it refuses to
//! start in one and refuses to tag its own cgroup or an ancestor). A PID
//! exemption would outlive the daemon in the pinned config and hand its PID,
//! once reused, a way around every hook.
//!
//! It must not make policy decisions: a tagged connect is always redirected
//! (or refused when there is nowhere safe to send it); what is allowed is the
//! daemon's business.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
            bpf_get_socket_cookie, bpf_sk_fullsock, bpf_skb_ancestor_cgroup_id,
        },
    },
    macros::{cgroup_sock, cgroup_sock_addr, cgroup_sockopt, classifier, lsm, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, RingBuf},
    programs::{
        LsmContext, SockAddrContext, SockContext, SockOpsContext, SockoptContext, TcContext,
    },
    EbpfContext,
};
use aya_log_ebpf::debug;
use gateway_common::{
    ipv4_mapped, FlowKey, KernelEvent, NetnsMark, OrigDst, RedirectConfig, TagMark, UdpAllowKey,
    UdpAllowMark, EVENT_UNSERVED_NETNS, FAMILY_INET, FAMILY_INET6, MAX_CGROUP_DEPTH, NETNS_NO_IPV6,
};

/// Allow the syscall to proceed (with whatever we rewrote).
const ALLOW: i32 = 1;
/// Fail the connect with EPERM.
const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
/// Socket families a tagged cgroup may still create (the LSM hook denies
/// every other one): local sockets, netlink (glibc needs it; without
/// CAP_NET_ADMIN it changes nothing) and plain TCP/UDP, which the cgroup
/// hooks govern.
const AF_UNIX: i32 = 1;
const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;
const AF_NETLINK: i32 = 16;
/// What an LSM hook returns to deny: -EPERM.
const LSM_DENY: i32 = -1;
/// tc verdicts.
const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
/// Socket option levels whose options send frames past the qdisc layer
/// (and so past the tc egress hook): `PACKET_QDISC_BYPASS` and AF_XDP.
const SOL_PACKET: i32 = 263;
const SOL_XDP: i32 = 283;

#[map]
static TAGGED_CGROUPS: HashMap<u64, TagMark> = HashMap::pinned(16384, 0);

#[map]
static PENDING_CONNECTS: LruHashMap<u64, OrigDst> = LruHashMap::pinned(65536, 0);

#[map]
static FLOWS: LruHashMap<FlowKey, OrigDst> = LruHashMap::pinned(65536, 0);

#[map]
static SERVED_NETNS: HashMap<u64, NetnsMark> = HashMap::pinned(4096, 0);

#[map]
static CONFIG: Array<RedirectConfig> = Array::pinned(1, 0);

#[map]
static UDP_ALLOW: HashMap<UdpAllowKey, UdpAllowMark> = HashMap::pinned(1024, 0);

#[map]
static EVENTS: RingBuf = RingBuf::pinned(64 * 1024, 0);

/// What a governed connect should do, decided before any rewrite.
enum Verdict {
    /// Not ours: leave the connect alone.
    Untouched,
    /// Tagged, but no proxy can take it: fail with EPERM.
    Refuse,
    /// Tagged: record the original destination and rewrite to this port.
    Redirect { listen_port: u16 },
}

#[inline(always)]
fn is_tagged() -> bool {
    let mut level = 0;
    while level < MAX_CGROUP_DEPTH {
        // SAFETY: helper without pointer arguments.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            break;
        }
        if TAGGED_CGROUPS.get_ptr(id).is_some() {
            return true;
        }
        level += 1;
    }
    false
}

#[inline(always)]
fn sock_type(ctx: &SockAddrContext) -> u32 {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { (*ctx.sock_addr).type_ }
}

/// Whether a tagged cgroup may send UDP to `addr` (IPv4-mapped for IPv4):
/// the exact destination or the port on any address is in `UDP_ALLOW`.
#[inline(always)]
fn udp_allowed(addr: [u8; 16], port: u16) -> bool {
    let mut key = UdpAllowKey {
        addr,
        port,
        _pad: [0; 6],
    };
    if UDP_ALLOW.get_ptr(key).is_some() {
        return true;
    }
    key.addr = [0; 16];
    UDP_ALLOW.get_ptr(key).is_some()
}

/// Verdict on a UDP connect or an addressed UDP send: untagged cgroups are
/// left alone, tagged ones reach only allowed destinations (no proxy can
/// govern datagrams, so everything else fails with EPERM).
#[inline(always)]
fn udp_verdict(ctx: &SockAddrContext, addr: [u8; 16], port: u16) -> i32 {
    if !is_tagged() {
        return ALLOW;
    }
    if udp_allowed(addr, port) {
        return ALLOW;
    }
    debug!(
        ctx,
        "portcullis: refused UDP to port {} from pid {}",
        port,
        (bpf_get_current_pid_tgid() >> 32) as u32
    );
    REFUSE
}

/// `native_v6`: the connect goes to an IPv6 address that is not
/// IPv4-mapped, so it would be sent to the namespace's `[::1]` listener.
#[inline(always)]
fn verdict(ctx: &SockAddrContext, native_v6: bool) -> Verdict {
    if !is_tagged() {
        return Verdict::Untouched;
    }
    if sock_type(ctx) != SOCK_STREAM {
        // Neither TCP nor UDP (those are handled before): nothing the proxy
        // can govern, and sock_create should not have let it exist.
        return Verdict::Refuse;
    }
    let Some(config) = CONFIG.get(0) else {
        return Verdict::Refuse;
    };
    if config.enabled == 0 || config.listen_port == 0 {
        // No daemon (or an orderly shutdown cleared the config): fail closed.
        return Verdict::Refuse;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: sock_addr programs may ask for their socket's netns cookie.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if let Some(mark) = SERVED_NETNS.get_ptr(netns_cookie) {
        // SAFETY: the pointer came from a lookup in this program run.
        let flags = unsafe { (*mark).flags };
        if native_v6 && flags & NETNS_NO_IPV6 != 0 {
            // The daemon holds no [::1] listener here (the namespace had no
            // IPv6 loopback): whatever answers there is not ours.
            return Verdict::Refuse;
        }
    } else {
        // No listener in this namespace yet: sending the connect anywhere
        // would either escape or reach something we do not own. Refuse it and
        // ask the daemon to start serving this namespace.
        if let Some(mut entry) = EVENTS.reserve::<KernelEvent>(0) {
            entry.write(KernelEvent {
                kind: EVENT_UNSERVED_NETNS,
                pid: tgid,
                netns_cookie,
                // SAFETY: helper without pointer arguments.
                cgroup_id: unsafe { bpf_get_current_cgroup_id() },
            });
            entry.submit(0);
        }
        debug!(
            ctx,
            "portcullis: refused connect from unserved netns, pid {}", tgid
        );
        return Verdict::Refuse;
    }
    Verdict::Redirect {
        listen_port: config.listen_port,
    }
}

#[inline(always)]
fn remember(ctx: &SockAddrContext, addr: [u8; 16], port: u16, family: u16) {
    // SAFETY: sock_addr programs may ask for their socket's cookie.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        // SAFETY: helper without pointer arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        addr,
        port,
        family,
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
    };
    let _ = PENDING_CONNECTS.insert(cookie, orig, 0);
}

#[inline(always)]
fn words_to_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        // The context words hold network-order bytes; keep them as they are.
        let b = words[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

const LOOPBACK4: [u8; 4] = [127, 0, 0, 1];

#[inline(always)]
fn ip4_of(ctx: &SockAddrContext) -> ([u8; 4], u16) {
    // SAFETY: valid context pointer; user_ip4/user_port are readable with
    // 4-byte accesses in connect4 and sendmsg4.
    unsafe {
        let sa = ctx.sock_addr;
        (
            (*sa).user_ip4.to_ne_bytes(),
            u16::from_be((*sa).user_port as u16),
        )
    }
}

#[inline(always)]
fn ip6_of(ctx: &SockAddrContext) -> ([u8; 16], u16) {
    // SAFETY: valid context pointer; user_ip6 words and user_port are
    // readable with 4-byte accesses in connect6 and sendmsg6.
    unsafe {
        let sa = ctx.sock_addr;
        let words = [
            (*sa).user_ip6[0],
            (*sa).user_ip6[1],
            (*sa).user_ip6[2],
            (*sa).user_ip6[3],
        ];
        (words_to_bytes(words), u16::from_be((*sa).user_port as u16))
    }
}

#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    if sock_type(&ctx) == SOCK_DGRAM {
        let (ip, port) = ip4_of(&ctx);
        return udp_verdict(&ctx, ipv4_mapped(ip), port);
    }
    match verdict(&ctx, false) {
        Verdict::Untouched => ALLOW,
        Verdict::Refuse => REFUSE,
        Verdict::Redirect { listen_port } => {
            // SAFETY: valid context pointer; user_port/user_ip4 are readable
            // and writable with 4-byte accesses in connect4.
            unsafe {
                let sa = ctx.sock_addr;
                let ip = (*sa).user_ip4.to_ne_bytes();
                let port = u16::from_be((*sa).user_port as u16);
                if !(ip == LOOPBACK4 && port == listen_port) {
                    remember(&ctx, ipv4_mapped(ip), port, FAMILY_INET);
                }
                (*sa).user_ip4 = u32::from_ne_bytes(LOOPBACK4);
                (*sa).user_port = u32::from(listen_port.to_be());
            }
            ALLOW
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
    if sock_type(&ctx) == SOCK_DGRAM {
        let (addr, port) = ip6_of(&ctx);
        return udp_verdict(&ctx, addr, port);
    }
    // SAFETY: valid context pointer; user_ip6 words are readable with
    // 4-byte accesses in connect6.
    let native_v6 = unsafe {
        let sa = ctx.sock_addr;
        !((*sa).user_ip6[0] == 0
            && (*sa).user_ip6[1] == 0
            && (*sa).user_ip6[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]))
    };
    match verdict(&ctx, native_v6) {
        Verdict::Untouched => ALLOW,
        Verdict::Refuse => REFUSE,
        Verdict::Redirect { listen_port } => {
            // SAFETY: valid context pointer; user_ip6 words and user_port are
            // readable and writable with 4-byte accesses in connect6.
            unsafe {
                let sa = ctx.sock_addr;
                let words = [
                    (*sa).user_ip6[0],
                    (*sa).user_ip6[1],
                    (*sa).user_ip6[2],
                    (*sa).user_ip6[3],
                ];
                let addr = words_to_bytes(words);
                let port = u16::from_be((*sa).user_port as u16);
                let mapped = words[0] == 0
                    && words[1] == 0
                    && words[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]);
                let (target, target3) = if mapped {
                    // A dual-stack socket dialing IPv4: stay on IPv4.
                    (
                        u32::from_ne_bytes([0, 0, 0xff, 0xff]),
                        u32::from_ne_bytes(LOOPBACK4),
                    )
                } else {
                    (0, u32::from_ne_bytes([0, 0, 0, 1]))
                };
                let already_proxy = port == listen_port
                    && words[0] == 0
                    && words[1] == 0
                    && words[2] == target
                    && words[3] == target3;
                if !already_proxy {
                    remember(&ctx, addr, port, FAMILY_INET6);
                }
                (*sa).user_ip6[0] = 0;
                (*sa).user_ip6[1] = 0;
                (*sa).user_ip6[2] = target;
                (*sa).user_ip6[3] = target3;
                (*sa).user_port = u32::from(listen_port.to_be());
            }
            ALLOW
        }
    }
}

/// Addressed UDP sends (`sendto`, `sendmsg` with a name) from tagged
/// cgroups: allowed destinations only. Connected UDP sockets were checked by
/// connect4 when they connected.
#[cgroup_sock_addr(sendmsg4)]
pub fn restrict_udp_sendmsg4(ctx: SockAddrContext) -> i32 {
    let (ip, port) = ip4_of(&ctx);
    udp_verdict(&ctx, ipv4_mapped(ip), port)
}

/// See [`restrict_udp_sendmsg4`]; IPv4 targets arrive IPv4-mapped.
#[cgroup_sock_addr(sendmsg6)]
pub fn restrict_udp_sendmsg6(ctx: SockAddrContext) -> i32 {
    let (addr, port) = ip6_of(&ctx);
    udp_verdict(&ctx, addr, port)
}

/// In tagged cgroups only plain TCP and UDP sockets may be created: raw,
/// ICMP (ping), SCTP, MPTCP and other protocols would leave the cgroup
/// without passing a hook the proxy governs. Fails with EPERM.
#[cgroup_sock(sock_create)]
pub fn restrict_socket_types(ctx: SockContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run and
    // type/protocol are readable in sock_create.
    let (ty, proto) = unsafe { ((*ctx.sock).type_, (*ctx.sock).protocol) };
    if !is_tagged() {
        return ALLOW;
    }
    let plain = match ty {
        SOCK_STREAM => proto == 0 || proto == IPPROTO_TCP,
        SOCK_DGRAM => proto == 0 || proto == IPPROTO_UDP,
        _ => false,
    };
    if plain {
        ALLOW
    } else {
        debug!(
            ctx,
            "portcullis: refused socket type {} protocol {}", ty, proto
        );
        REFUSE
    }
}

/// Whether a tagged cgroup binding `port` would squat the proxy port: a
/// tagged process that held `127.0.0.1:PORT` or `[::1]:PORT` in its
/// namespace (after the daemon died, or before it opened its listeners
/// there) would receive other tagged processes' redirected connects.
#[inline(always)]
fn binds_proxy_port(port: u16) -> bool {
    if port == 0 || !is_tagged() {
        return false;
    }
    match CONFIG.get(0) {
        Some(config) => config.listen_port == port,
        None => false,
    }
}

/// Tagged cgroups may not bind the proxy port (IPv4).
#[cgroup_sock_addr(bind4)]
pub fn restrict_bind4(ctx: SockAddrContext) -> i32 {
    let (_, port) = ip4_of(&ctx);
    if binds_proxy_port(port) {
        debug!(ctx, "portcullis: refused bind to the proxy port {}", port);
        return REFUSE;
    }
    ALLOW
}

/// Tagged cgroups may not bind the proxy port (IPv6, dual-stack included).
#[cgroup_sock_addr(bind6)]
pub fn restrict_bind6(ctx: SockAddrContext) -> i32 {
    let (_, port) = ip6_of(&ctx);
    if binds_proxy_port(port) {
        debug!(ctx, "portcullis: refused bind to the proxy port {}", port);
        return REFUSE;
    }
    ALLOW
}

/// BPF LSM `socket_create`: in tagged cgroups only local (AF_UNIX), netlink
/// and plain TCP/UDP (AF_INET/AF_INET6) sockets may be created. Every other
/// family (AF_PACKET, AF_XDP, AF_VSOCK, AF_TIPC, AF_CAN, ...) never passes
/// `cgroup/sock_create` or a connect hook, so it is refused here with
/// EPERM; raw, ICMP and other inet protocols are refused here as well as by
/// [`restrict_socket_types`]. Sockets the kernel creates for itself pass.
#[lsm(hook = "socket_create")]
pub fn restrict_socket_families(ctx: LsmContext) -> i32 {
    // security_socket_create(int family, int type, int protocol, int kern);
    // BPF LSM adds the return value of the previous program last.
    let family: i32 = ctx.arg(0);
    let ty: i32 = ctx.arg(1);
    let proto: i32 = ctx.arg(2);
    let kern: i32 = ctx.arg(3);
    let previous: i32 = ctx.arg(4);
    if previous != 0 {
        return previous;
    }
    if kern != 0 || !is_tagged() {
        return 0;
    }
    let allowed = match family {
        AF_UNIX | AF_NETLINK => true,
        AF_INET | AF_INET6 => match ty as u32 {
            SOCK_STREAM => proto == 0 || proto as u32 == IPPROTO_TCP,
            SOCK_DGRAM => proto == 0 || proto as u32 == IPPROTO_UDP,
            _ => false,
        },
        _ => false,
    };
    if allowed {
        0
    } else {
        LSM_DENY
    }
}

/// Whether the socket that sent `skb` sits in a tagged cgroup (or below).
#[inline(always)]
fn skb_socket_tagged(ctx: &TcContext) -> bool {
    let mut level = 0;
    while level < MAX_CGROUP_DEPTH {
        // SAFETY: the helper takes the program's own skb context.
        let id = unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb, level) };
        if id == 0 {
            break;
        }
        if TAGGED_CGROUPS.get_ptr(id).is_some() {
            return true;
        }
        level += 1;
    }
    false
}

/// tc egress on every interface of every served namespace: drops frames
/// sent by a non-inet socket (AF_PACKET, `SOCK_PACKET`) of a tagged cgroup.
/// The fallback for AF_PACKET where the BPF LSM program cannot run: the
/// socket can be created, but nothing it sends leaves. Inet sockets are
/// governed by the cgroup hooks and pass; so do frames without a socket
/// (forwarded, or sent by the kernel).
#[classifier]
pub fn restrict_raw_egress(ctx: TcContext) -> i32 {
    // SAFETY: valid context pointer; `sk` is readable in tc programs and
    // may be null.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return TC_ACT_OK;
    }
    // SAFETY: the helper accepts the (non-null) socket pointer read above.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return TC_ACT_OK;
    }
    // SAFETY: a non-null full socket from the helper.
    let family = unsafe { (*full).family };
    if family == AF_INET as u32 || family == AF_INET6 as u32 {
        return TC_ACT_OK;
    }
    if skb_socket_tagged(&ctx) {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    }
}

/// Tagged cgroups may not set `SOL_PACKET` or `SOL_XDP` options: with them
/// an AF_PACKET socket could skip the qdisc layer (`PACKET_QDISC_BYPASS`,
/// TX rings) and an AF_XDP socket could register its memory, both sending
/// past the tc egress hook. Fails with EPERM.
#[cgroup_sockopt(setsockopt)]
pub fn restrict_raw_sockopts(ctx: SockoptContext) -> i32 {
    // SAFETY: valid context pointer; level is readable in setsockopt.
    let level = unsafe { (*ctx.sockopt).level };
    if (level == SOL_PACKET || level == SOL_XDP) && is_tagged() {
        return REFUSE;
    }
    ALLOW
}

#[inline(always)]
fn flow_key(ctx: &SockOpsContext) -> FlowKey {
    // Each context field is read with its own volatile load straight off the
    // context pointer: the verifier rejects loads through a context pointer
    // LLVM has offset and shared between branches.
    // SAFETY: valid context pointer; these fields are readable in sock_ops.
    let (family, ip4, ip6, port) = unsafe {
        let ops = ctx.ops;
        (
            core::ptr::read_volatile(&(*ops).family),
            core::ptr::read_volatile(&(*ops).local_ip4),
            [
                core::ptr::read_volatile(&(*ops).local_ip6[0]),
                core::ptr::read_volatile(&(*ops).local_ip6[1]),
                core::ptr::read_volatile(&(*ops).local_ip6[2]),
                core::ptr::read_volatile(&(*ops).local_ip6[3]),
            ],
            core::ptr::read_volatile(&(*ops).local_port),
        )
    };
    let addr = if family == u32::from(FAMILY_INET) {
        ipv4_mapped(ip4.to_ne_bytes())
    } else {
        words_to_bytes(ip6)
    };
    FlowKey {
        // SAFETY: sock_ops programs may ask for their socket's netns cookie.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        addr,
        // local_port is already host order in sock_ops.
        port: port as u16,
        _pad: [0; 6],
    }
}

#[sock_ops]
pub fn track_flows(ctx: SockOpsContext) -> u32 {
    // Runs for every TCP socket in the governed subtree, often in softirq
    // context: no current-task helpers here, only the socket's own state.
    // SAFETY: sock_ops programs may ask for their socket's cookie.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB if PENDING_CONNECTS.get_ptr(cookie).is_some() => {
            // Hear about this socket's close so its flow entry goes too.
            let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            if let Some(orig) = PENDING_CONNECTS.get_ptr(cookie) {
                // SAFETY: the pointer came from a lookup in this program run.
                let orig = unsafe { *orig };
                let _ = FLOWS.insert(flow_key(&ctx), orig, 0);
                let _ = PENDING_CONNECTS.remove(cookie);
            }
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            let _ = PENDING_CONNECTS.remove(cookie);
            let _ = FLOWS.remove(flow_key(&ctx));
        }
        _ => {}
    }
    0
}

#[cfg(all(not(test), target_arch = "bpf"))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
