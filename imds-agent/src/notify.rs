//! systemd's notify protocol (sd_notify(3)), without libsystemd: datagrams to the socket in
//! `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace). Outside systemd the
//! variable is unset and every call is a no-op.

use std::{io, os::unix::net::UnixDatagram, time::Duration};

fn socket_address() -> Option<String> {
    std::env::var("NOTIFY_SOCKET")
        .ok()
        .filter(|s| !s.is_empty())
}

/// Sends one notification (`READY=1`, `WATCHDOG=1`, `STATUS=...`, `STOPPING=1`).
pub fn notify(state: &str) -> io::Result<()> {
    let Some(address) = socket_address() else {
        return Ok(());
    };
    let socket = UnixDatagram::unbound()?;
    if let Some(name) = address.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt as _;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        socket.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        socket.send_to(state.as_bytes(), &address)?;
    }
    Ok(())
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
