//! Upgrades no client notices: the serving agent hands its listening sockets to its successor
//! over a unix socket in the state directory, then drains and passes on what it learnt.
//!
//! The listening sockets are never closed: the successor receives the same sockets (SCM_RIGHTS),
//! so a diverted connect always finds a listener, and connections queued in the accept queue
//! are accepted by whichever agent accepts next, never reset. Chosen over SO_REUSEPORT with
//! `net.ipv4.tcp_migrate_req` (a node-wide sysctl the agent would have to change, and a second
//! bind that a running agent's port would refuse without it) and over systemd's file
//! descriptor store (no systemd in a DaemonSet's container): a socket in the state directory
//! works for a package's service and for a pod alike, and also carries the state a successor
//! needs.
//!
//! The exchange, in order (each message a length-prefixed JSON document):
//! 1. the successor connects and says `Hello`;
//! 2. the predecessor answers `Listeners` with the sockets attached, and the key its token
//!    bindings are hashed with;
//! 3. the successor attaches its programs (adopting the pins) and, once it accepts on the
//!    sockets, says `Serving`;
//! 4. the predecessor stops accepting, drains its connections, sends `State` (the token
//!    bindings and the inventory as they are after the drain) and is done.
//!
//! If the successor fails before step 3 the predecessor keeps serving. Between steps 3 and 4
//! both agents serve; a token the successor does not know yet waits for step 4 (see
//! `proxy::tokens`).

use std::{
    io::{self, Read as _, Write as _},
    os::{
        fd::{AsRawFd, FromRawFd as _, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::inventory::WorkloadUse;

/// The socket's name in the state directory.
pub const SOCKET: &str = "handover.sock";

/// The most listening sockets an agent has (loopback and the pods' address).
const MAX_LISTENERS: usize = 4;
/// How long each step may take; a silent peer is given up on.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Serialize, Deserialize)]
enum Message {
    Hello {
        version: String,
    },
    Listeners {
        /// How many sockets are attached, in the predecessor's order.
        count: usize,
        /// The key token bindings are hashed with.
        token_key: [u8; 32],
    },
    Serving,
    State(Box<State>),
}

/// What a predecessor learnt that its successor keeps.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    /// (hash of the token, owner as cgroup id, uid, gid, milliseconds left).
    pub tokens: Vec<(u64, u64, u32, u32, u64)>,
    pub inventory: Vec<WorkloadUse>,
}

/// The successor's side, from step 2 on.
pub struct Takeover {
    stream: UnixStream,
    pub listeners: Vec<std::net::TcpListener>,
    pub token_key: [u8; 32],
}

/// Asks a running agent for its sockets. `None` when none answers at `state_dir` (a first
/// start, or a predecessor that is gone: its socket file is then removed).
pub fn take_over(state_dir: &Path) -> io::Result<Option<Takeover>> {
    let path = state_dir.join(SOCKET);
    let mut stream = match UnixStream::connect(&path) {
        Ok(stream) => stream,
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        Err(error) => return Err(error),
    };
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    stream.set_write_timeout(Some(STEP_TIMEOUT))?;
    send(
        &mut stream,
        &Message::Hello {
            version: env!("CARGO_PKG_VERSION").into(),
        },
        &[],
    )?;
    let (message, fds) = receive(&mut stream)?;
    let Message::Listeners { count, token_key } = message else {
        return Err(io::Error::other(
            "the running agent did not hand over its sockets",
        ));
    };
    if fds.len() != count || count == 0 {
        return Err(io::Error::other(format!(
            "the running agent announced {count} sockets and passed {}",
            fds.len()
        )));
    }
    let listeners = fds.into_iter().map(std::net::TcpListener::from).collect();
    Ok(Some(Takeover {
        stream,
        listeners,
        token_key,
    }))
}

impl Takeover {
    /// Step 3: this agent accepts on the sockets; the predecessor may stop. Returns the
    /// predecessor's state once it has drained (step 4).
    pub fn serving(mut self) -> io::Result<State> {
        send(&mut self.stream, &Message::Serving, &[])?;
        // The drain may take as long as the predecessor's --drain-seconds.
        self.stream.set_read_timeout(None)?;
        match receive(&mut self.stream)?.0 {
            Message::State(state) => Ok(*state),
            _ => Err(io::Error::other("the running agent sent no state")),
        }
    }
}

/// The predecessor's side: the socket successors connect to.
pub struct Offer {
    /// Accepted asynchronously: a thread blocked in accept() would keep the process from
    /// exiting.
    listener: tokio::net::UnixListener,
    path: PathBuf,
    /// The socket file's device and inode: a successor's socket at the same path is not ours
    /// to remove.
    file: (u64, u64),
}

/// A successor that said `Serving`: the stream to send the state on once drained.
pub struct Successor {
    stream: UnixStream,
}

impl Offer {
    /// Listens at `state_dir` for a successor (replacing a stale socket file).
    pub fn open(state_dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(state_dir)?;
        let path = state_dir.join(SOCKET);
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)?;
        // Root only: the sockets handed over are the enforcement's.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let file = identity_of(&path)?;
        Ok(Self {
            listener,
            path,
            file,
        })
    }

    /// Waits for a successor and hands it `listeners` and `token_key` (steps 1 to 3), in a
    /// blocking thread. A successor that fails before `Serving` is logged and the next one
    /// awaited.
    pub async fn hand_over(self, listeners: Vec<RawFd>, token_key: [u8; 32]) -> Successor {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => same_user(&stream).and_then(|()| {
                    let stream = stream.into_std()?;
                    stream.set_nonblocking(false)?;
                    Ok(stream)
                }),
                Err(error) => Err(error),
            };
            let stream = match stream {
                Ok(stream) => stream,
                Err(error) => {
                    tracing::warn!(%error, "cannot accept a successor");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let listeners = listeners.clone();
            let attempt =
                tokio::task::spawn_blocking(move || one_successor(stream, &listeners, token_key))
                    .await;
            match attempt {
                Ok(Ok(successor)) => return successor,
                Ok(Err(error)) => {
                    tracing::warn!(%error, "a successor did not take over; still serving");
                }
                Err(error) => {
                    tracing::warn!(%error, "the handover thread failed; still serving");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// Only an agent running as this one's user may take its sockets: the socket file is root's
/// alone, and this holds also in the moment between its creation and its chmod.
fn same_user(stream: &tokio::net::UnixStream) -> io::Result<()> {
    let peer = stream.peer_cred()?;
    // SAFETY: geteuid cannot fail.
    let this = unsafe { libc::geteuid() };
    if peer.uid() == this {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "a would-be successor runs as uid {}, not {this}",
                peer.uid()
            ),
        ))
    }
}

/// Steps 1 to 3 with one successor, on a blocking stream (every step bounded).
fn one_successor(
    mut stream: UnixStream,
    listeners: &[RawFd],
    token_key: [u8; 32],
) -> io::Result<Successor> {
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    stream.set_write_timeout(Some(STEP_TIMEOUT))?;
    let Message::Hello { version } = receive(&mut stream)?.0 else {
        return Err(io::Error::other("a successor that did not say hello"));
    };
    tracing::info!(successor_version = %version, "a successor asks for the listening sockets");
    send(
        &mut stream,
        &Message::Listeners {
            count: listeners.len(),
            token_key,
        },
        listeners,
    )?;
    // Attaching takes the successor a moment; give it the whole step.
    match receive(&mut stream)?.0 {
        Message::Serving => Ok(Successor { stream }),
        _ => Err(io::Error::other("the successor did not start serving")),
    }
}

impl Drop for Offer {
    fn drop(&mut self) {
        if identity_of(&self.path).is_ok_and(|file| file == self.file) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn identity_of(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::symlink_metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

impl Successor {
    /// Step 4: what this agent learnt, after its drain.
    pub fn send_state(mut self, state: State) -> io::Result<()> {
        send(&mut self.stream, &Message::State(Box::new(state)), &[])
    }
}

/// One message: its length (4 bytes, big-endian), then the JSON; `fds` ride with it.
fn send(stream: &mut UnixStream, message: &Message, fds: &[RawFd]) -> io::Result<()> {
    let json = serde_json::to_vec(message).map_err(io::Error::other)?;
    let length = u32::try_from(json.len())
        .map_err(io::Error::other)?
        .to_be_bytes();
    if fds.is_empty() {
        stream.write_all(&length)?;
    } else {
        send_with_fds(stream, &length, fds)?;
    }
    stream.write_all(&json)
}

fn receive(stream: &mut UnixStream) -> io::Result<(Message, Vec<OwnedFd>)> {
    let mut length = [0u8; 4];
    let fds = receive_with_fds(stream, &mut length)?;
    let length = u32::from_be_bytes(length) as usize;
    if length > 64 << 20 {
        return Err(io::Error::other("a handover message over 64 MiB"));
    }
    let mut json = vec![0u8; length];
    stream.read_exact(&mut json)?;
    let message = serde_json::from_slice(&json).map_err(io::Error::other)?;
    Ok((message, fds))
}

/// Sends `data` (a few bytes) on a connected unix socket with the file descriptors as
/// SCM_RIGHTS (also how systemd's file descriptor store is given them: see `notify`).
pub fn send_with_fds(socket: &impl AsRawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let fds_len = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(u32::try_from(fds_len).map_err(io::Error::other)?) };
    let mut control = vec![0u8; space as usize];
    let message = message_header(&mut iov, &mut control);
    // SAFETY: the control buffer has room for one header with `fds_len` bytes of data
    // (CMSG_SPACE above), so CMSG_FIRSTHDR is non-null and CMSG_DATA has that room.
    unsafe {
        let header = libc::CMSG_FIRSTHDR(&message);
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(fds_len as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(header), fds_len);
    }
    // SAFETY: a valid socket and a message whose buffers are alive.
    let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &message, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    if sent as usize != data.len() {
        return Err(io::Error::other("a short handover write"));
    }
    Ok(())
}

/// A message of one buffer and a control buffer; both must outlive its use.
fn message_header(iov: &mut libc::iovec, control: &mut [u8]) -> libc::msghdr {
    // SAFETY: a zeroed msghdr is valid (no name, no flags).
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = control.len() as _;
    message
}

/// Fills `data` (a few bytes), taking any file descriptors that come with it.
fn receive_with_fds(stream: &UnixStream, data: &mut [u8]) -> io::Result<Vec<OwnedFd>> {
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_LISTENERS * size_of::<RawFd>()) as u32) };
    let mut control = vec![0u8; space as usize];
    let mut message = message_header(&mut iov, &mut control);
    // SAFETY: a valid socket and buffers that are alive; CLOEXEC for the received fds.
    let received =
        unsafe { libc::recvmsg(stream.as_raw_fd(), &mut message, libc::MSG_CMSG_CLOEXEC) };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote into `control`.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&message);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*header).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(header).cast::<RawFd>();
                for i in 0..bytes / size_of::<RawFd>() {
                    // The kernel installed these descriptors in this process: ours to own.
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            header = libc::CMSG_NXTHDR(&message, header);
        }
    }
    if message.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("more sockets handed over than expected"));
    }
    if received == 0 {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
    }
    if (received as usize) < data.len() {
        // The rest of the length prefix, if the kernel split it.
        let mut stream = stream;
        stream.read_exact(&mut data[received as usize..])?;
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_and_state_pass_from_one_agent_to_the_next() {
        let dir = std::env::temp_dir().join(format!("imds-handover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            take_over(&dir).unwrap().is_none(),
            "nobody to take over from"
        );
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let offer = runtime.block_on(async { Offer::open(&dir) }).unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let key = [7u8; 32];
        let fd = tcp.as_raw_fd();
        let predecessor = std::thread::spawn(move || {
            let successor = runtime.block_on(offer.hand_over(vec![fd], key));
            successor
                .send_state(State {
                    tokens: vec![(1, 2, 3, 4, 5)],
                    inventory: Vec::new(),
                })
                .unwrap();
            drop(tcp);
        });
        let takeover = take_over(&dir).unwrap().expect("a predecessor");
        assert_eq!(takeover.token_key, key);
        assert_eq!(takeover.listeners.len(), 1);
        // The same socket: it listens on the same address.
        assert_eq!(takeover.listeners[0].local_addr().unwrap(), addr);
        let listener = takeover.listeners[0].try_clone().unwrap();
        let state = takeover.serving().unwrap();
        predecessor.join().unwrap();
        assert_eq!(state.tokens, vec![(1, 2, 3, 4, 5)]);
        // The predecessor closed its copy; the socket still accepts.
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), client.local_addr().unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
