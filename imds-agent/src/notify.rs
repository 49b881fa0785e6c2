//! systemd's notify protocol (sd_notify(3)), without libsystemd: datagrams to the socket in
//! `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace). Outside systemd the
//! variable is unset and every call is a no-op.

use std::{
    io,
    os::{
        fd::{OwnedFd, RawFd},
        unix::net::UnixDatagram,
    },
    time::Duration,
};

fn socket_address() -> Option<String> {
    std::env::var("NOTIFY_SOCKET")
        .ok()
        .filter(|s| !s.is_empty())
}

/// Sends one notification (`READY=1`, `WATCHDOG=1`, `STATUS=...`, `STOPPING=1`).
pub fn notify(state: &str) -> io::Result<()> {
    notify_with_fds(state, &[])
}

/// A notification carrying file descriptors (`FDSTORE=1`: systemd keeps them for the next
/// start of the service).
pub fn notify_with_fds(state: &str, fds: &[RawFd]) -> io::Result<()> {
    let Some(address) = socket_address() else {
        return Ok(());
    };
    let socket = UnixDatagram::unbound()?;
    if let Some(name) = address.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt as _;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        socket.connect_addr(&addr)?;
    } else {
        socket.connect(&address)?;
    }
    if fds.is_empty() {
        socket.send(state.as_bytes())?;
        Ok(())
    } else {
        crate::handover::send_with_fds(&socket, state.as_bytes(), fds)
    }
}

fn is_listening(socket: &std::net::TcpListener) -> bool {
    socket2::SockRef::from(socket)
        .is_listener()
        .unwrap_or(false)
}

/// Listening sockets systemd passed to this process (`LISTEN_FDS`, from the file descriptor
/// store after a restart): descriptors 3 onwards. The variables are removed, so that no child
/// takes them for its own.
pub fn passed_listeners() -> Vec<std::net::TcpListener> {
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    // SAFETY: at start-up, before the agent's tasks run; nothing else in the process reads
    // or writes the environment meanwhile.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    if !for_us {
        return Vec::new();
    }
    (3..3 + count.clamp(0, 16))
        .filter_map(|fd| {
            // SAFETY: systemd passed descriptors 3..3+LISTEN_FDS to this process, ours to own.
            let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            let listener = std::net::TcpListener::from(owned);
            // Only listening TCP sockets: anything else is closed.
            is_listening(&listener).then_some(listener)
        })
        .collect()
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`, for this pid), if any.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    let for_us = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_none_or(|pid| pid == std::process::id());
    (for_us && usec > 0).then(|| Duration::from_micros(usec))
}

/// Pings the watchdog at half its interval while the runtime is alive. The pings come from
/// the async runtime, so a wedged runtime stops them and systemd restarts the agent.
pub async fn watchdog(interval: Duration) {
    let mut ticker = tokio::time::interval(interval / 2);
    loop {
        ticker.tick().await;
        if let Err(error) = notify("WATCHDOG=1") {
            tracing::warn!(%error, "watchdog ping failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only sockets listening for connections are taken from systemd's store.
    #[test]
    fn only_listening_sockets_count_as_listening() {
        let listening = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        assert!(is_listening(&listening));
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket
            .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        let bound_only = std::net::TcpListener::from(socket);
        assert!(!is_listening(&bound_only));
    }
}
