//! Loads the kernel programs, attaches them to the enforced cgroup with pinned links, and
//! gives the rest of the agent typed access to the maps.
//!
//! Pin directory layout (one per agent installation; each test uses its own):
//! - `connect4`, `connect6`, `sendmsg4`, `sendmsg6`, `sock_create`: the cgroup links. While
//!   pinned they stay attached, also when the agent is stopped or crashes, so enforcement does
//!   not lapse: diverted connects then find no listener and fail (fail closed).
//! - `IMDS_*`: the maps, pinned by name, so a restarted agent adopts the live state. The
//!   callers map's pin names its record layout (`IMDS_CALLERS_V2`).
//!
//! Attribution: a diverted connection carries its caller on the client's socket (socket
//! storage). A getpeername program on the agent's own cgroup (not pinned: it lives as long as
//! the agent) finds that socket from the connection the agent accepted, by its address pair,
//! and copies the caller to the accepted socket, where the agent reads it. For a pod the
//! lookup goes to the pod's network namespace, whose id the agent resolves from the pod's
//! address beforehand (`podns`). No program runs at the TCP events of other connections.
//!
//! Adoption: a new agent loads fresh programs on the pinned maps, attaches new links (for a
//! moment both generations run; they share maps and rewrite identically), then renames the
//! new pins over the old ones, which detaches the previous generation. There is no window in
//! which the cgroup is unenforced. An upgrade that changes the caller record's layout also
//! changes the callers map: a connect made by the old generation in that moment is not found
//! by the new agent and is refused ("not diverted"), as the client would see a restart.

use std::{
    fs::File,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsRawFd as _, RawFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{HashMap, Map, MapData, MapError, PerCpuArray, SkStorage},
    pin::PinError,
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError,
        links::{FdLink, LinkError},
    },
};
use imds_common::{
    Caller, Endpoint, GLOBAL_DIVERT_IP4, GLOBAL_DIVERT_PORT, GLOBAL_HOST_NETNS,
    GLOBAL_POD_DIVERT_IP4, GLOBAL_REFUSE_RAW, GLOBAL_SOCK_OFFSETS, GLOBAL_TASK_OFFSETS,
    MAP_CALLERS, MAP_COUNTERS, MAP_ENDPOINTS4, MAP_ENDPOINTS6, MAP_EXEMPT, MAP_POD_NETNS,
    MAP_VERDICTS, PIN_CALLERS, PROG_CONNECT4, PROG_CONNECT6, PROG_GETPEERNAME4, PROG_SENDMSG4,
    PROG_SENDMSG6, PROG_SOCK_CREATE, SocketOffsets, TaskOffsets,
};

use crate::fs;

pub mod btf;
pub mod kernel_log;
pub mod neighbours;
mod netlink;
mod pins;
pub mod podns;
pub mod sockdiag;
pub mod verdicts;

pub use pins::{Counters, detach, is_attached, pinned_counters};
use pins::{
    LINK_CONNECT4, LINK_CONNECT6, LINK_GETPEERNAME4, LINK_SENDMSG4, LINK_SENDMSG6,
    LINK_SOCK_CREATE, RETIRED_PINS, prepare_pin_dir, read_counters, remove_pin, replace_pin,
};

/// The object built by build.rs from `imds-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/imds-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot mount bpffs at {root}: {source}", root = fs::BPFFS_ROOT)]
    Bpffs { source: io::Error },
    #[error("pin directory {0} is not on a bpf file system (bpffs)")]
    PinDirNotBpffs(PathBuf),
    #[error("more than two metadata endpoint ports on one address (--endpoint)")]
    TooManyPorts,
    #[error("cannot create pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("loading the eBPF object failed: {0}{hint}", hint = permission_hint(.0))]
    Load(#[from] EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    /// Pinnable cgroup links (bpf_link) need kernel 5.7; without them enforcement could not
    /// outlive the agent, so the agent refuses to run.
    #[error("program {name}: cannot make a pinnable link (kernel >= 5.7 required): {source}")]
    Link {
        name: &'static str,
        source: LinkError,
    },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("pinning {path}: {source}")]
    Pin { path: PathBuf, source: PinError },
    #[error("replacing pin {path}: {source}")]
    Rename { path: PathBuf, source: io::Error },
    #[error("removing pin directory {path}: {source}")]
    Detach { path: PathBuf, source: io::Error },
    #[error("socket cookie: {0}")]
    Cookie(io::Error),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: std::net::SocketAddr,
        source: io::Error,
    },
}

/// What to load and where to attach it.
pub struct AttachConfig<'a> {
    /// The root of the enforced cgroup tree (a directory on the cgroup2 mount).
    pub cgroup: &'a Path,
    pub pin_dir: &'a Path,
    /// The agent's listener; diverted connects are rewritten to it.
    pub divert_to: SocketAddrV4,
    /// Metadata endpoints to divert (IPv4 and IPv6).
    pub endpoints: &'a [SocketAddr],
    /// An address of the node where pods (callers in other network namespaces) reach the
    /// agent's listener port; `None`: their connects to a metadata endpoint are refused.
    pub pod_divert_to: Option<std::net::Ipv4Addr>,
    /// Whether enforced cgroups may not create raw IP sockets.
    pub refuse_raw_sockets: bool,
    /// Every listening socket was made by an earlier agent and handed to this one.
    pub listeners_adopted: bool,
}

/// The loaded, attached programs and the maps the agent uses at run time.
pub struct Enforcer {
    // Keeps the programs loaded (the links hold them too, through their pins).
    _ebpf: Ebpf,
    callers: SkStorage<MapData, Caller>,
    /// Where pods are served (`pod_divert_to`).
    pods: Option<podns::PodNamespaces>,
    exempt: Mutex<HashMap<MapData, u64, u8>>,
    /// What the kernel decides for callers without the agent.
    pub verdicts: verdicts::KernelVerdicts,
    /// The programs' diagnostics, until the agent starts reading them.
    pub kernel_log: Option<kernel_log::KernelLog>,
    counters: PerCpuArray<MapData, u64>,
    /// The agent's connect4 and connect6 programs' ids.
    connect_ids: Vec<(&'static str, u32)>,
}

impl Enforcer {
    /// Loads the programs on the (possibly already pinned) maps, attaches them to the cgroup
    /// and pins the links, replacing a previous agent's links atomically.
    pub fn attach(config: &AttachConfig<'_>) -> Result<Self, LoaderError> {
        prepare_pin_dir(config.pin_dir)?;
        let cgroup = File::open(config.cgroup).map_err(|source| LoaderError::Cgroup {
            path: config.cgroup.to_owned(),
            source,
        })?;
        let own_cgroup_path = fs::own_cgroup().map_err(|source| LoaderError::Cgroup {
            path: PathBuf::from("/proc/self/cgroup"),
            source,
        })?;
        let own_cgroup = File::open(&own_cgroup_path).map_err(|source| LoaderError::Cgroup {
            path: own_cgroup_path.clone(),
            source,
        })?;

        let (offsets, task_offsets) = kernel_offsets();
        let divert_ip = u32::from_ne_bytes(config.divert_to.ip().octets());
        let divert_port = config.divert_to.port();
        let pod_divert_ip = config
            .pod_divert_to
            .map_or(0, |ip| u32::from_ne_bytes(ip.octets()));
        let host_netns = own_netns_cookie().map_err(LoaderError::Cookie)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(config.pin_dir)
            // BTF maps carry no pinning flag of their own.
            .map_pin_path(MAP_CALLERS, config.pin_dir.join(PIN_CALLERS))
            .override_global(GLOBAL_DIVERT_IP4, &divert_ip, true)
            .override_global(GLOBAL_DIVERT_PORT, &divert_port, true)
            .override_global(GLOBAL_SOCK_OFFSETS, &offsets, true)
            .override_global(GLOBAL_TASK_OFFSETS, &task_offsets, true)
            .override_global(GLOBAL_HOST_NETNS, &host_netns, true)
            .override_global(GLOBAL_POD_DIVERT_IP4, &pod_divert_ip, true)
            .override_global(
                GLOBAL_REFUSE_RAW,
                &u32::from(config.refuse_raw_sockets),
                true,
            )
            .load(EBPF_OBJECT)?;

        // Without its reader the programs still run; their refusals are then only counted.
        let kernel_log = kernel_log::KernelLog::new(&mut ebpf)
            .inspect_err(|error| tracing::warn!(%error, "the kernel programs' log is not read"))
            .ok();

        // Endpoints first: once the links are in place, the programs consult these maps.
        let mut v4: HashMap<_, u32, Endpoint> = take_map(&mut ebpf, MAP_ENDPOINTS4)?;
        let mut v6: HashMap<_, [u32; 4], Endpoint> = take_map(&mut ebpf, MAP_ENDPOINTS6)?;
        let v4_wanted = by_address(config.endpoints.iter().filter_map(|e| match e {
            SocketAddr::V4(e) => Some((u32::from_ne_bytes(e.ip().octets()), e.port())),
            SocketAddr::V6(_) => None,
        }))?;
        let v6_wanted = by_address(config.endpoints.iter().filter_map(|e| match e {
            SocketAddr::V6(e) => Some((ipv6_words(e.ip()), e.port())),
            SocketAddr::V4(_) => None,
        }))?;
        sync_endpoints(&mut v4, &v4_wanted, MAP_ENDPOINTS4)?;
        sync_endpoints(&mut v6, &v6_wanted, MAP_ENDPOINTS6)?;

        // Cgroup links always run alongside other programs (the kernel attaches them with
        // multi-attach semantics); link_create takes no flags, so the mode is "Single" here.
        macro_rules! attach {
            ($kind:ty, $name:expr) => {{
                let program: &mut $kind = program(&mut ebpf, $name)?;
                program.load().map_err(program_error($name))?;
                let id = program
                    .attach(&cgroup, CgroupAttachMode::Single)
                    .map_err(program_error($name))?;
                let link: FdLink = program
                    .take_link(id)
                    .map_err(program_error($name))?
                    .try_into()
                    .map_err(link_error($name))?;
                link
            }};
        }
        // The agent's side first. Its program runs for the cgroup of the accepted sockets,
        // which they inherit from the listening sockets: the cgroup of the agent that made
        // those, this one's unless it was handed them (an upgrade, or systemd keeping them
        // across a restart). So the link is pinned, and kept by an agent handed the sockets:
        // the cgroup it is on may be gone by then (a replaced pod's), and the kernel keeps
        // running its programs for the sockets made there. An agent that makes its own
        // listening sockets attaches to its own cgroup, replacing the link.
        let getpeername_pinned = config.pin_dir.join(LINK_GETPEERNAME4).exists();
        if config.listeners_adopted && getpeername_pinned {
            tracing::debug!(
                "attribution program kept on the cgroup the listening sockets were made in"
            );
        } else {
            let program: &mut CgroupSockAddr = program(&mut ebpf, PROG_GETPEERNAME4)?;
            program.load().map_err(program_error(PROG_GETPEERNAME4))?;
            let id = program
                .attach(&own_cgroup, CgroupAttachMode::Single)
                .map_err(program_error(PROG_GETPEERNAME4))?;
            let link: FdLink = program
                .take_link(id)
                .map_err(program_error(PROG_GETPEERNAME4))?
                .try_into()
                .map_err(link_error(PROG_GETPEERNAME4))?;
            replace_pin(config.pin_dir, LINK_GETPEERNAME4, link)?;
            tracing::debug!(cgroup = %own_cgroup_path.display(), "attribution program attached to the agent's own cgroup");
        }
        let links = [
            (LINK_CONNECT4, attach!(CgroupSockAddr, PROG_CONNECT4)),
            (LINK_CONNECT6, attach!(CgroupSockAddr, PROG_CONNECT6)),
            (LINK_SENDMSG4, attach!(CgroupSockAddr, PROG_SENDMSG4)),
            (LINK_SENDMSG6, attach!(CgroupSockAddr, PROG_SENDMSG6)),
            (LINK_SOCK_CREATE, attach!(CgroupSock, PROG_SOCK_CREATE)),
        ];
        for (name, link) in links {
            replace_pin(config.pin_dir, name, link)?;
        }
        for name in RETIRED_PINS {
            remove_pin(config.pin_dir, name)?;
        }
        // The kernel's ids of the programs just attached at connect(), to tell them from
        // other programs at the same hooks (`neighbours`).
        let mut connect_ids = Vec::new();
        for (hook, name) in [("connect4", PROG_CONNECT4), ("connect6", PROG_CONNECT6)] {
            let program: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            connect_ids.push((hook, program.info().map_err(program_error(name))?.id()));
        }

        let pods = match config.pod_divert_to {
            Some(listener) => Some(podns::PodNamespaces::new(
                listener,
                take_map(&mut ebpf, MAP_POD_NETNS)?,
            )),
            None => None,
        };
        Ok(Self {
            callers: take_map(&mut ebpf, MAP_CALLERS)?,
            pods,
            exempt: Mutex::new(take_map(&mut ebpf, MAP_EXEMPT)?),
            verdicts: verdicts::KernelVerdicts::new(take_map(&mut ebpf, MAP_VERDICTS)?),
            counters: take_map(&mut ebpf, MAP_COUNTERS)?,
            kernel_log,
            connect_ids,
            _ebpf: ebpf,
        })
    }

    /// Other programs that run at connect() for the enforced cgroup `enforced` (on the
    /// cgroup2 mount `mount`), and whether they run before the agent's (see `neighbours`).
    pub fn neighbours(
        &self,
        mount: &Path,
        enforced: &Path,
    ) -> std::io::Result<Vec<neighbours::Neighbour>> {
        neighbours::find(mount, enforced, &self.connect_ids)
    }

    /// The kernel's record of a diverted connection the agent accepted from `peer`, which
    /// asking for the peer's address moves onto the accepted socket (the getpeername
    /// program). For a pod, its namespace is resolved first, and once more if the record is
    /// not found (a pod address reused by a new pod). `None`: the connection was not diverted.
    pub fn caller(&self, accepted: &tokio::net::TcpStream, peer: SocketAddr) -> Option<Caller> {
        let pod = self.pod_address(accepted, peer);
        if pod.is_none() {
            // accept() asked for the peer's address already, which ran the getpeername
            // program: a connection to the host listener has its record by now, and asking
            // again would only run the program a second time.
            if let Ok(caller) = self.callers.get(accepted, 0) {
                return Some(caller);
            }
        }
        let prepare = |address, again| {
            let pods = self.pods.as_ref()?;
            pods.prepare(address, again)
                .inspect_err(|error| {
                    tracing::warn!(%peer, %error, "cannot find the network namespace of a connection to the pod listener: it is refused");
                })
                .ok()
        };
        let asked = match pod {
            Some(address) => prepare(address, false)?,
            None => false,
        };
        let read = || {
            accepted.peer_addr().ok()?;
            self.callers.get(accepted, 0).ok()
        };
        if let Some(caller) = read() {
            return Some(caller);
        }
        match pod {
            Some(address) if !asked && prepare(address, true)? => read(),
            _ => None,
        }
    }

    /// The client's address when the connection came to the pod listener.
    fn pod_address(&self, accepted: &tokio::net::TcpStream, peer: SocketAddr) -> Option<Ipv4Addr> {
        let listener = self.pods.as_ref()?.listener;
        match (peer, accepted.local_addr().ok()?) {
            (SocketAddr::V4(peer), SocketAddr::V4(local)) if *local.ip() == listener => {
                Some(*peer.ip())
            }
            _ => None,
        }
    }

    /// Connects `socket` to `addr` without being diverted: registers the socket's cookie as
    /// exempt for the duration of the connect.
    pub async fn connect_exempt(
        &self,
        socket: tokio::net::TcpSocket,
        addr: std::net::SocketAddr,
    ) -> Result<tokio::net::TcpStream, LoaderError> {
        connect_with_exemption(&self.exempt, socket, addr).await
    }

    pub fn counters(&self) -> Result<Counters, LoaderError> {
        read_counters(&self.counters)
    }
}

/// Connects without being diverted by an installation pinned in `pin_dir` (the previous
/// agent's programs, before this agent has loaded its own): the socket's cookie goes into the
/// pinned exemption map for the connect. Without pins nothing diverts, and it connects plainly.
pub async fn connect_exempt_pinned(
    pin_dir: &Path,
    addr: std::net::SocketAddr,
) -> Result<tokio::net::TcpStream, LoaderError> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(|source| LoaderError::Connect { addr, source })?;
    let exempt = MapData::from_pin(pin_dir.join(MAP_EXEMPT))
        .ok()
        .and_then(|data| HashMap::<MapData, u64, u8>::try_from(Map::LruHashMap(data)).ok());
    match exempt {
        Some(exempt) => connect_with_exemption(&Mutex::new(exempt), socket, addr).await,
        None => socket
            .connect(addr)
            .await
            .map_err(|source| LoaderError::Connect { addr, source }),
    }
}

/// Connects with the socket's cookie in the exemption map for the duration of the connect
/// (the connect programs let exempt sockets through undiverted).
async fn connect_with_exemption(
    exempt: &Mutex<HashMap<MapData, u64, u8>>,
    socket: tokio::net::TcpSocket,
    addr: std::net::SocketAddr,
) -> Result<tokio::net::TcpStream, LoaderError> {
    let cookie = socket_cookie(socket.as_raw_fd()).map_err(LoaderError::Cookie)?;
    exempt
        .lock()
        .expect("exempt map lock")
        .insert(cookie, 1, 0)
        .map_err(|source| LoaderError::Map {
            name: MAP_EXEMPT,
            source,
        })?;
    let result = socket.connect(addr).await;
    let _ = exempt.lock().expect("exempt map lock").remove(&cookie);
    result.map_err(|source| LoaderError::Connect { addr, source })
}

/// What to check when the kernel refused bpf() (EPERM somewhere in the error's causes).
fn permission_hint(error: &EbpfError) -> &'static str {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        if current
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::PermissionDenied)
        {
            return " (bpf() was refused: the agent needs CAP_BPF, CAP_PERFMON and \
                    CAP_NET_ADMIN, and in a container a seccomp profile that lets bpf() \
                    through: the runtimes' default profiles do only with CAP_SYS_ADMIN)";
        }
        cause = current.source();
    }
    ""
}

/// The kernel structure offsets the connect programs follow, from the kernel's BTF; without
/// them the programs fall back as the warnings say.
fn kernel_offsets() -> (SocketOffsets, TaskOffsets) {
    const NO_SOCKET_FIELDS: &str = "cannot find the socket fields in the kernel's BTF: \
        connections are attributed to the connecting task instead of the socket's creator";
    const NO_TASK_FIELDS: &str = "cannot find the process fields in the kernel's BTF: the \
        executable and name of a caller are read from /proc for each of its connections";
    fn fallback<T: Default>(error: &btf::BtfError, consequence: &str) -> T {
        tracing::warn!(%error, "{consequence}");
        T::default()
    }
    match btf::Btf::from_sys_fs() {
        Ok(btf) => (
            btf::socket_offsets_from(&btf).unwrap_or_else(|e| fallback(&e, NO_SOCKET_FIELDS)),
            btf::task_offsets_from(&btf).unwrap_or_else(|e| fallback(&e, NO_TASK_FIELDS)),
        ),
        Err(e) => (fallback(&e, NO_SOCKET_FIELDS), fallback(&e, NO_TASK_FIELDS)),
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoaderError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(LoaderError::Program {
            name,
            source: ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(program_error(name))
}

fn program_error(name: &'static str) -> impl Fn(ProgramError) -> LoaderError {
    move |source| LoaderError::Program { name, source }
}

fn link_error(name: &'static str) -> impl Fn(LinkError) -> LoaderError {
    move |source| LoaderError::Link { name, source }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoaderError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(LoaderError::MissingMap { name })?;
    T::try_from(map).map_err(|source| LoaderError::Map { name, source })
}

/// An IPv6 address as the kernel's four network-order words (`bpf_sock_addr.user_ip6`).
pub fn ipv6_words(ip: &std::net::Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// One map entry per address, with at most two service ports on it (the programs' layout).
fn by_address<K: PartialEq + Copy>(
    endpoints: impl Iterator<Item = (K, u16)>,
) -> Result<Vec<(K, Endpoint)>, LoaderError> {
    let mut entries: Vec<(K, Endpoint)> = Vec::new();
    for (address, port) in endpoints {
        match entries.iter_mut().find(|(a, _)| *a == address) {
            None => entries.push((
                address,
                Endpoint {
                    port,
                    other_port: 0,
                    flags: 0,
                },
            )),
            Some((_, entry)) if entry.port == port || entry.other_port == port => {}
            Some((_, entry)) if entry.other_port == 0 => entry.other_port = port,
            Some(_) => return Err(LoaderError::TooManyPorts),
        }
    }
    Ok(entries)
}

/// Makes an endpoint map hold exactly `wanted` (an adopted map may list endpoints that a
/// previous configuration had and this one drops).
fn sync_endpoints<K>(
    map: &mut HashMap<MapData, K, Endpoint>,
    wanted: &[(K, Endpoint)],
    name: &'static str,
) -> Result<(), LoaderError>
where
    K: aya::Pod + PartialEq,
{
    for (key, value) in wanted {
        map.insert(key, value, 0)
            .map_err(|source| LoaderError::Map { name, source })?;
    }
    let stale: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !wanted.iter().any(|(w, _)| w == k))
        .collect();
    for key in stale {
        let _ = map.remove(&key);
    }
    Ok(())
}

/// SO_COOKIE (linux/socket.h): a 64-bit id the kernel assigns to each socket.
const SO_COOKIE: libc::c_int = 57;

fn socket_cookie(fd: RawFd) -> io::Result<u64> {
    socket_option_u64(fd, SO_COOKIE)
}

/// The cookie of the network namespace this thread is in (SO_NETNS_COOKIE, kernel >= 5.14),
/// the same number `bpf_get_netns_cookie` gives the programs for sockets created here.
pub fn own_netns_cookie() -> io::Result<u64> {
    let socket = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
    socket_option_u64(socket.as_raw_fd(), libc::SO_NETNS_COOKIE)
}

fn socket_option_u64(fd: RawFd, option: libc::c_int) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use aya::maps::MapError;

    use super::*;

    #[test]
    fn an_address_holds_at_most_two_service_ports() {
        let wireserver = [(1u32, 80), (1, 32526), (2, 80), (1, 80)];
        let entries = by_address(wireserver.into_iter()).unwrap();
        assert_eq!(
            entries
                .iter()
                .map(|(a, e)| (*a, e.port, e.other_port))
                .collect::<Vec<_>>(),
            [(1, 80, 32526), (2, 80, 0)]
        );
        let three = [(1u32, 80), (1, 81), (1, 82)];
        assert!(matches!(
            by_address(three.into_iter()),
            Err(LoaderError::TooManyPorts)
        ));
    }

    fn map_refused(errno: i32) -> LoaderError {
        LoaderError::Load(EbpfError::MapError(MapError::CreateError {
            name: "IMDS_ENDPOINTS4".into(),
            io_error: io::Error::from_raw_os_error(errno),
        }))
    }

    #[test]
    fn a_refused_bpf_call_says_what_to_check() {
        let refused = map_refused(libc::EPERM).to_string();
        assert!(
            refused.contains("IMDS_ENDPOINTS4") && refused.contains("CAP_SYS_ADMIN"),
            "{refused}"
        );
        let other = map_refused(libc::ENOMEM).to_string();
        assert!(!other.contains("seccomp"), "{other}");
    }
}
