//! The kernel half of interception, seen from user space: loading the eBPF
//! programs, attaching them to the governed cgroup root, pinning links and
//! maps so interception fails closed when the daemon dies, and the map
//! operations the daemon needs (tags, served namespaces, flow lookup).
//!
//! Owns everything under the pin dir. It must not decide who is tagged or
//! what is allowed: callers tell it which cgroup ids and namespaces to mark.

pub mod netns;

use std::{
    fs, io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, MapData, RingBuf},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSock, CgroupSockAddr, CgroupSockopt, Lsm, SchedClassifier, SockOps,
        TcAttachType,
    },
    Btf, Ebpf, EbpfLoader,
};
use gateway_common::{
    ipv4_mapped, FlowKey, NetnsMark, OrigDst, RedirectConfig, TagMark, UdpAllowKey, UdpAllowMark,
    MAP_CONFIG, MAP_EVENTS, MAP_FLOWS, MAP_LAYOUT_VERSION, MAP_SERVED_NETNS, MAP_TAGGED_CGROUPS,
    MAP_UDP_ALLOW, NETNS_NO_IPV6,
};

use crate::config::UdpDest;
use tracing::{info, warn};

/// The kernel object built from `gateway-ebpf` by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway"));

/// Program names in the object, and the pin names of their links. The
/// socket-creation, bind and UDP programs come first so that a tagged cgroup
/// is never redirected for TCP while it can still open raw sockets, squat
/// the proxy port or send UDP.
const PROGRAMS: [&str; 9] = [
    "restrict_socket_types",
    "restrict_raw_sockopts",
    "restrict_bind4",
    "restrict_bind6",
    "restrict_udp_sendmsg4",
    "restrict_udp_sendmsg6",
    "redirect_connect4",
    "redirect_connect6",
    "track_flows",
];

/// The BPF LSM program (attached before the cgroup programs when BPF LSM is
/// active) and the kernel hook it runs at.
const LSM_PROGRAM: &str = "restrict_socket_families";
const LSM_HOOK: &str = "socket_create";

/// The tc egress program attached to every interface of every served
/// namespace (AF_PACKET frames from tagged cgroups are dropped).
const EGRESS_PROGRAM: &str = "restrict_raw_egress";

/// A failure to set up or drive interception.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    /// Loading the object or a program into the kernel failed.
    #[error("loading eBPF programs: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program failed to load, attach or pin.
    #[error("eBPF program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// The underlying error.
        source: aya::programs::ProgramError,
    },
    /// A map is missing or has the wrong type.
    #[error("eBPF map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// The underlying error.
        source: aya::maps::MapError,
    },
    /// A map named by the object was not found.
    #[error("eBPF map {0} missing from the object")]
    MissingMap(&'static str),
    /// Pinning or file work under the pin dir failed.
    #[error("{what} {path}: {source}")]
    Pin {
        /// What was being done.
        what: &'static str,
        /// Path concerned.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// Where and how to attach.
#[derive(Debug, Clone)]
pub struct AttachSettings {
    /// Directory on bpffs that holds this daemon's pins.
    pub pin_dir: PathBuf,
    /// Directory of the governed cgroup root.
    pub cgroup_dir: PathBuf,
    /// Port of the proxy listeners.
    pub listen_port: u16,
    /// UDP destinations tagged cgroups may still reach.
    pub udp_allow: Vec<UdpDest>,
    /// Attach the BPF LSM `socket_create` program (only when BPF LSM is
    /// active: see [`crate::sys::bpf_lsm_status`]).
    pub lsm: bool,
}

/// Loaded, attached and pinned programs, and handles on their maps.
pub struct Redirector {
    pin_dir: PathBuf,
    tagged: HashMap<MapData, u64, TagMark>,
    flows: HashMap<MapData, FlowKey, OrigDst>,
    served: HashMap<MapData, u64, NetnsMark>,
    udp_allow: HashMap<MapData, UdpAllowKey, UdpAllowMark>,
    config: Array<MapData, RedirectConfig>,
    events: Option<RingBuf<MapData>>,
    links: Vec<PinnedLink>,
    /// Keeps the programs and the aya-log map alive.
    ebpf: Ebpf,
    detached: bool,
    /// Whether the socket-family LSM program is in force, or why not.
    lsm: Result<(), String>,
}

impl Redirector {
    /// Loads the programs (reusing maps pinned by an earlier run with the same
    /// layout), attaches them to the governed cgroup and pins the links,
    /// atomically replacing links pinned by an earlier run.
    pub fn attach(settings: &AttachSettings) -> Result<Self, RedirectError> {
        let maps_dir = settings.pin_dir.join(format!("maps-v{MAP_LAYOUT_VERSION}"));
        let links_dir = settings.pin_dir.join("links");
        for d in [&maps_dir, &links_dir] {
            fs::create_dir_all(d).map_err(|source| RedirectError::Pin {
                what: "creating pin directory",
                path: d.clone(),
                source,
            })?;
        }
        remove_stale_layouts(&settings.pin_dir, &maps_dir);

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(EBPF_OBJECT)?;

        let tagged = take_hash(&mut ebpf, MAP_TAGGED_CGROUPS)?;
        let flows = take_hash(&mut ebpf, MAP_FLOWS)?;
        let served = take_hash(&mut ebpf, MAP_SERVED_NETNS)?;
        let udp_allow = take_hash(&mut ebpf, MAP_UDP_ALLOW)?;
        let config: Array<MapData, RedirectConfig> = ebpf
            .take_map(MAP_CONFIG)
            .ok_or(RedirectError::MissingMap(MAP_CONFIG))?
            .try_into()
            .map_err(|source| RedirectError::Map {
                name: MAP_CONFIG,
                source,
            })?;
        let events: RingBuf<MapData> = ebpf
            .take_map(MAP_EVENTS)
            .ok_or(RedirectError::MissingMap(MAP_EVENTS))?
            .try_into()
            .map_err(|source| RedirectError::Map {
                name: MAP_EVENTS,
                source,
            })?;

        let mut me = Self {
            pin_dir: settings.pin_dir.clone(),
            tagged,
            flows,
            served,
            udp_allow,
            config,
            events: Some(events),
            links: Vec::new(),
            ebpf,
            detached: false,
            lsm: Err("BPF LSM is not active".into()),
        };
        // Configure before attaching so new programs never see a stale port.
        me.configure(settings.listen_port)?;
        me.sync_udp_allow(&settings.udp_allow)?;
        // Namespaces served by an earlier process have no listener any more.
        me.clear_served()?;

        let cgroup = fs::File::open(&settings.cgroup_dir).map_err(|source| RedirectError::Pin {
            what: "opening cgroup",
            path: settings.cgroup_dir.clone(),
            source,
        })?;
        // Loaded once; attached per namespace and interface by
        // [`Redirector::guard_egress`].
        match me.ebpf.program_mut(EGRESS_PROGRAM) {
            Some(aya::programs::Program::SchedClassifier(p)) => {
                p.load().map_err(|source| RedirectError::Program {
                    name: EGRESS_PROGRAM,
                    source,
                })?
            }
            _ => {
                return Err(RedirectError::Program {
                    name: EGRESS_PROGRAM,
                    source: aya::programs::ProgramError::UnexpectedProgramType,
                })
            }
        }
        let lsm = settings.lsm.then_some(LSM_PROGRAM);
        for name in lsm.into_iter().chain(PROGRAMS) {
            let link = if name == LSM_PROGRAM {
                // BPF LSM can be listed as active and still refuse programs
                // (kernel lockdown, a hardened or sandboxed kernel): report
                // it and keep governing TCP and UDP rather than not at all.
                match me.attach_one(name, &cgroup) {
                    Ok(link) => link,
                    Err(e) => {
                        me.lsm = Err(format!("the kernel refused the BPF LSM program: {e}"));
                        continue;
                    }
                }
            } else {
                me.attach_one(name, &cgroup)?
            };
            let final_path = links_dir.join(name);
            // bpffs refuses names with a dot (it reserves them), hence "-new".
            let tmp_path = links_dir.join(format!("{name}-new"));
            let _ = fs::remove_file(&tmp_path);
            let pinned = match link {
                Attached::Link(link) => {
                    Some(link.pin(&tmp_path).map_err(|e| RedirectError::Pin {
                        what: "pinning link",
                        path: tmp_path.clone(),
                        source: io::Error::other(e),
                    })?)
                }
                Attached::Raw(fd) => {
                    bpf_obj_pin(&fd, &tmp_path).map_err(|source| RedirectError::Pin {
                        what: "pinning link",
                        path: tmp_path.clone(),
                        source,
                    })?;
                    None
                }
            };
            // Renaming over the old pin drops the last reference to the old
            // link, detaching the old program only once the new one runs.
            fs::rename(&tmp_path, &final_path).map_err(|source| RedirectError::Pin {
                what: "replacing pinned link",
                path: final_path.clone(),
                source,
            })?;
            drop(pinned);
            let relinked = PinnedLink::from_pin(&final_path).map_err(|e| RedirectError::Pin {
                what: "reopening pinned link",
                path: final_path.clone(),
                source: io::Error::other(e),
            })?;
            me.links.push(relinked);
            if name == LSM_PROGRAM {
                me.lsm = Ok(());
            }
        }
        info!(
            pin_dir = %settings.pin_dir.display(),
            cgroup = %settings.cgroup_dir.display(),
            port = settings.listen_port,
            "eBPF programs attached and pinned"
        );
        Ok(me)
    }

    fn attach_one(
        &mut self,
        name: &'static str,
        cgroup: &fs::File,
    ) -> Result<Attached, RedirectError> {
        let perr = |source| RedirectError::Program { name, source };
        let link_err = |e: aya::programs::links::LinkError| RedirectError::Pin {
            what: "converting link",
            path: PathBuf::from(name),
            source: io::Error::other(e),
        };
        let program = self.ebpf.program_mut(name).ok_or(RedirectError::Program {
            name,
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?;
        let link: FdLink = match program {
            aya::programs::Program::CgroupSockAddr(p) => {
                let p: &mut CgroupSockAddr = p;
                p.load().map_err(perr)?;
                let id = p
                    .attach(cgroup.as_fd(), CgroupAttachMode::Single)
                    .map_err(perr)?;
                p.take_link(id)
                    .map_err(perr)?
                    .try_into()
                    .map_err(link_err)?
            }
            aya::programs::Program::CgroupSock(p) => {
                let p: &mut CgroupSock = p;
                p.load().map_err(perr)?;
                let id = p
                    .attach(cgroup.as_fd(), CgroupAttachMode::Single)
                    .map_err(perr)?;
                p.take_link(id)
                    .map_err(perr)?
                    .try_into()
                    .map_err(link_err)?
            }
            aya::programs::Program::Lsm(p) => {
                let p: &mut Lsm = p;
                let btf = Btf::from_sys_fs().map_err(|e| RedirectError::Program {
                    name,
                    source: aya::programs::ProgramError::Btf(e),
                })?;
                p.load(LSM_HOOK, &btf).map_err(perr)?;
                let id = p.attach().map_err(perr)?;
                p.take_link(id).map_err(perr)?.into()
            }
            aya::programs::Program::CgroupSockopt(p) => {
                // aya 0.14 cannot turn a sockopt link into an FdLink to pin:
                // make the link with the bpf() syscall directly.
                let p: &mut CgroupSockopt = p;
                p.load().map_err(perr)?;
                let prog = p.fd().map_err(perr)?;
                let fd = bpf_link_create(prog.as_fd(), cgroup.as_fd(), BPF_CGROUP_SETSOCKOPT)
                    .map_err(|source| RedirectError::Pin {
                        what: "creating link",
                        path: PathBuf::from(name),
                        source,
                    })?;
                return Ok(Attached::Raw(fd));
            }
            aya::programs::Program::SockOps(p) => {
                let p: &mut SockOps = p;
                p.load().map_err(perr)?;
                let id = p
                    .attach(cgroup.as_fd(), CgroupAttachMode::Single)
                    .map_err(perr)?;
                p.take_link(id)
                    .map_err(perr)?
                    .try_into()
                    .map_err(link_err)?
            }
            _ => {
                return Err(RedirectError::Program {
                    name,
                    source: aya::programs::ProgramError::UnexpectedProgramType,
                })
            }
        };
        Ok(Attached::Link(link))
    }

    /// Starts reading aya-log records from the programs into the `log` facade.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        match aya_log::EbpfLogger::init(&mut self.ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!("eBPF logs unavailable: {e}");
                None
            }
        }
    }

    /// The ring buffer of kernel events (once).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    fn configure(&mut self, listen_port: u16) -> Result<(), RedirectError> {
        let cfg = RedirectConfig {
            listen_port,
            enabled: 1,
            _reserved: 0,
        };
        self.config
            .set(0, cfg, 0)
            .map_err(|source| RedirectError::Map {
                name: MAP_CONFIG,
                source,
            })
    }

    /// Orderly shutdown: clears the config and the served namespaces, so
    /// tagged connects are refused at once (EPERM) instead of being sent to
    /// a port nobody holds any more, which anyone could then bind. The
    /// programs and tags stay pinned: still fail-closed.
    pub fn shut_down(&mut self) {
        let _ = self.config.set(0, RedirectConfig::default(), 0);
        let _ = self.clear_served();
    }

    /// Makes the kernel's UDP allow list exactly `allow`.
    pub fn sync_udp_allow(&mut self, allow: &[UdpDest]) -> Result<(), RedirectError> {
        let wanted: Vec<UdpAllowKey> = allow.iter().map(udp_key).collect();
        let present: Vec<UdpAllowKey> = self.udp_allow.keys().filter_map(Result::ok).collect();
        for k in present {
            if !wanted.contains(&k) {
                let _ = self.udp_allow.remove(&k);
            }
        }
        for k in wanted {
            self.udp_allow
                .insert(k, UdpAllowMark::default(), 0)
                .map_err(|source| RedirectError::Map {
                    name: MAP_UDP_ALLOW,
                    source,
                })?;
        }
        Ok(())
    }

    fn clear_served(&mut self) -> Result<(), RedirectError> {
        let keys: Vec<u64> = self.served.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = self.served.remove(&k);
        }
        Ok(())
    }

    /// Makes the kernel table of tagged cgroup ids exactly `ids`.
    pub fn sync_tagged(&mut self, ids: &[(u64, u32)]) -> Result<(), RedirectError> {
        let wanted: std::collections::HashMap<u64, u32> = ids.iter().copied().collect();
        let present: Vec<u64> = self.tagged.keys().filter_map(Result::ok).collect();
        for id in present {
            if !wanted.contains_key(&id) {
                let _ = self.tagged.remove(&id);
            }
        }
        for (id, generation) in wanted {
            self.tagged
                .insert(id, TagMark { generation }, 0)
                .map_err(|source| RedirectError::Map {
                    name: MAP_TAGGED_CGROUPS,
                    source,
                })?;
        }
        Ok(())
    }

    /// Marks a network namespace as served by the daemon's listeners:
    /// `ipv6` says whether one of them holds `[::1]` (otherwise native IPv6
    /// connects from it are refused in the kernel).
    pub fn serve_netns(&mut self, cookie: u64, ipv6: bool) -> Result<(), RedirectError> {
        let mark = NetnsMark {
            flags: if ipv6 { 0 } else { NETNS_NO_IPV6 },
        };
        self.served
            .insert(cookie, mark, 0)
            .map_err(|source| RedirectError::Map {
                name: MAP_SERVED_NETNS,
                source,
            })
    }

    /// Stops marking a network namespace as served (and drops its egress
    /// filters: the namespace is gone).
    pub fn unserve_netns(&mut self, cookie: u64) {
        let _ = self.served.remove(&cookie);
        let dir = self.pin_dir.join("links").join("egress");
        if let Ok(entries) = fs::read_dir(&dir) {
            let prefix = format!("{cookie}-");
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }

    /// Attaches the egress filter to every interface of the namespace
    /// `ns_file` (cookie `cookie`) and pins each link, so frames that
    /// tagged cgroups send from AF_PACKET sockets never leave, even while
    /// the daemon is down. Returns how many interfaces are guarded.
    /// `replace`: attach afresh (and replace) where a link is already
    /// pinned, as when a namespace is first served (the pin may hold an
    /// older program); otherwise only new interfaces are attached.
    pub fn guard_egress(
        &mut self,
        ns_file: &Path,
        cookie: u64,
        replace: bool,
    ) -> Result<usize, RedirectError> {
        let dir = self.pin_dir.join("links").join("egress");
        fs::create_dir_all(&dir).map_err(|source| RedirectError::Pin {
            what: "creating pin directory",
            path: dir.clone(),
            source,
        })?;
        let ns = fs::File::open(ns_file).map_err(|source| RedirectError::Pin {
            what: "opening network namespace",
            path: ns_file.to_path_buf(),
            source,
        })?;
        let program: &mut SchedClassifier = match self.ebpf.program_mut(EGRESS_PROGRAM) {
            Some(aya::programs::Program::SchedClassifier(p)) => p,
            _ => {
                return Err(RedirectError::Program {
                    name: EGRESS_PROGRAM,
                    source: aya::programs::ProgramError::UnexpectedProgramType,
                })
            }
        };
        let perr = |source| RedirectError::Program {
            name: EGRESS_PROGRAM,
            source,
        };
        let pin_err = |what: &'static str, path: &Path, e: String| RedirectError::Pin {
            what,
            path: path.to_path_buf(),
            source: io::Error::other(e),
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                // Only this thread changes namespace; it ends right after.
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                    RedirectError::Pin {
                        what: "entering network namespace",
                        path: ns_file.to_path_buf(),
                        source: io::Error::from(e),
                    }
                })?;
                let interfaces = nix::net::if_::if_nameindex().map_err(|e| RedirectError::Pin {
                    what: "listing interfaces of",
                    path: ns_file.to_path_buf(),
                    source: io::Error::from(e),
                })?;
                let mut guarded = 0;
                for iface in interfaces.iter() {
                    let final_path = dir.join(format!("{cookie}-{}", iface.index()));
                    if !replace && final_path.exists() {
                        guarded += 1;
                        continue;
                    }
                    let name = iface.name().to_string_lossy().into_owned();
                    let id = program.attach(&name, TcAttachType::Egress).map_err(perr)?;
                    let link: FdLink = program.take_link(id).map_err(perr)?.try_into().map_err(
                        |e: aya::programs::links::LinkError| {
                            pin_err("converting link", &dir, e.to_string())
                        },
                    )?;
                    let tmp_path = dir.join(format!("{cookie}-{}-new", iface.index()));
                    let _ = fs::remove_file(&tmp_path);
                    let pinned = link
                        .pin(&tmp_path)
                        .map_err(|e| pin_err("pinning link", &tmp_path, e.to_string()))?;
                    fs::rename(&tmp_path, &final_path).map_err(|source| RedirectError::Pin {
                        what: "replacing pinned link",
                        path: final_path.clone(),
                        source,
                    })?;
                    drop(pinned);
                    guarded += 1;
                }
                Ok(guarded)
            })
            .join()
            .map_err(|_| pin_err("egress thread panicked", ns_file, String::new()))?
        })
    }

    /// Takes the flow entry for a client, if the kernel recorded one.
    pub fn take_flow(&mut self, key: &FlowKey) -> Option<OrigDst> {
        let orig = self.flows.get(key, 0).ok()?;
        let _ = self.flows.remove(key);
        Some(orig)
    }

    /// Whether the socket-family LSM program (AF_PACKET and other non-inet
    /// families denied to tagged cgroups) is attached, or why not.
    pub fn lsm_enforced(&self) -> Result<(), &str> {
        self.lsm.as_ref().map(|_| ()).map_err(String::as_str)
    }

    /// Whether [`Redirector::detach`] ran.
    pub fn is_detached(&self) -> bool {
        self.detached
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Break-glass: detaches every program and removes every pin. Sessions in
    /// progress go on; nothing new is intercepted.
    pub fn detach(&mut self) -> Result<(), RedirectError> {
        for link in self.links.drain(..) {
            // Unpinning and dropping the fd releases the link: detached.
            let _ = link.unpin();
        }
        let _ = self.config.set(0, RedirectConfig::default(), 0);
        self.detached = true;
        remove_pins(&self.pin_dir).map_err(|source| RedirectError::Pin {
            what: "removing pins",
            path: self.pin_dir.clone(),
            source,
        })
    }
}

/// A link made by [`Redirector::attach_one`], to be pinned.
enum Attached {
    /// Through aya.
    Link(FdLink),
    /// Made with the bpf() syscall (link types aya cannot pin).
    Raw(std::os::fd::OwnedFd),
}

/// `BPF_CGROUP_SETSOCKOPT` from linux/bpf.h.
const BPF_CGROUP_SETSOCKOPT: u32 = 22;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;

/// `BPF_LINK_CREATE` of `prog` on `target` (a cgroup) for `attach_type`.
fn bpf_link_create(
    prog: std::os::fd::BorrowedFd<'_>,
    target: std::os::fd::BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // union bpf_attr, link_create: prog_fd, target_fd, attach_type, flags.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(target.as_raw_fd() as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&attach_type.to_ne_bytes());
    // SAFETY: bpf(2) reads `attr.len()` bytes of the attribute buffer we own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            attr.as_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new link fd that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(rc as i32) })
}

/// `BPF_OBJ_PIN` of `fd` at `path` on bpffs.
fn bpf_obj_pin(fd: &std::os::fd::OwnedFd, path: &Path) -> io::Result<()> {
    use std::os::{fd::AsRawFd, unix::ffi::OsStrExt};
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
    // union bpf_attr, obj_pin: pathname (u64), bpf_fd, file_flags.
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(c_path.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    // SAFETY: bpf(2) reads the attribute buffer and the NUL-terminated path,
    // both alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            attr.as_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The kernel key of an allowed UDP destination (IPv4 mapped, any = zero).
fn udp_key(d: &UdpDest) -> UdpAllowKey {
    let addr = match d.addr {
        None => [0; 16],
        Some(std::net::IpAddr::V4(v4)) => ipv4_mapped(v4.octets()),
        Some(std::net::IpAddr::V6(v6)) => v6.octets(),
    };
    UdpAllowKey {
        addr,
        port: d.port,
        _pad: [0; 6],
    }
}

/// How full one pinned map is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapFill {
    /// The map's name (`FLOWS`, `PENDING_CONNECTS`, `TAGGED_CGROUPS`).
    pub name: &'static str,
    /// Entries counted by walking its keys.
    pub entries: u64,
    /// Its capacity.
    pub max_entries: u64,
}

/// Counts the entries of the maps worth watching, through their pins (so
/// no lock the data path takes is held while walking up to 64 Ki keys).
/// Costs one syscall per entry: call it every few seconds, not per scrape.
/// A map whose pin is gone (detached) is left out.
pub fn map_fill(pin_dir: &Path) -> Vec<MapFill> {
    use gateway_common::MAP_PENDING_CONNECTS;
    let dir = pin_dir.join(format!("maps-v{MAP_LAYOUT_VERSION}"));
    let mut out = Vec::new();
    out.extend(fill_of::<FlowKey, OrigDst>(&dir, MAP_FLOWS));
    out.extend(fill_of::<u64, OrigDst>(&dir, MAP_PENDING_CONNECTS));
    out.extend(fill_of::<u64, TagMark>(&dir, MAP_TAGGED_CGROUPS));
    out
}

fn fill_of<K: aya::Pod, V: aya::Pod>(dir: &Path, name: &'static str) -> Option<MapFill> {
    let data = MapData::from_pin(dir.join(name)).ok()?;
    let max = u64::from(data.info().ok()?.max_entries());
    let map: HashMap<MapData, K, V> = aya::maps::Map::from_map_data(data).ok()?.try_into().ok()?;
    // Keys deleted mid-walk make the kernel restart from the first key:
    // bound the walk so a busy LRU map cannot keep it going.
    let limit = usize::try_from(max.saturating_mul(2)).unwrap_or(usize::MAX);
    let entries = map.keys().take(limit).filter(Result::is_ok).count() as u64;
    Some(MapFill {
        name,
        entries: entries.min(max),
        max_entries: max,
    })
}

fn take_hash<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, RedirectError> {
    ebpf.take_map(name)
        .ok_or(RedirectError::MissingMap(name))?
        .try_into()
        .map_err(|source| RedirectError::Map { name, source })
}

/// Pinned maps of older layouts cannot be reused; remove them.
fn remove_stale_layouts(pin_dir: &Path, current: &Path) {
    let Ok(entries) = fs::read_dir(pin_dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let is_maps = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("maps-v"));
        if is_maps && p != current {
            warn!(path = %p.display(), "removing pinned maps of an older layout");
            let _ = fs::remove_dir_all(&p);
        }
    }
}

/// Removes a daemon's pins (links first, so programs detach before their maps
/// go). Used by `portcullis detach` with or without a running daemon.
pub fn remove_pins(pin_dir: &Path) -> io::Result<()> {
    let links = pin_dir.join("links");
    if links.exists() {
        fs::remove_dir_all(&links)?;
    }
    if pin_dir.exists() {
        fs::remove_dir_all(pin_dir)?;
    }
    Ok(())
}
