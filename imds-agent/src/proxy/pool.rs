//! Idle upstream connections, kept per caller. SDKs open a new connection per request; without
//! a pool each would cost the agent an upstream connect as well. A connection is only ever
//! reused for the same kernel-attested caller (cgroup, uid, gid) and the same endpoint, so no
//! upstream connection carries two callers' requests, as before, across client connections.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http1::SendRequest;

pub type Sender = SendRequest<Empty<Bytes>>;

/// Who may reuse a connection: the caller as the kernel attested it, and where it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub caller: crate::identity::CallerKey,
    pub upstream: SocketAddr,
}

/// Idle connections kept per caller: as many as a busy caller (a pod with a thread pool) has
/// requests in flight at once, within the per-caller in-flight limit's default.
const MAX_IDLE_PER_CALLER: usize = 16;
/// Idle connections kept in all: each holds a socket.
const MAX_IDLE: usize = 256;
/// Older idle connections are closed: metadata services close idle connections too, and a
/// stale one would cost a failed request before the retry.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct UpstreamPool {
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    by_caller: HashMap<PoolKey, Vec<(Instant, Sender)>>,
    count: usize,
}

impl UpstreamPool {
    /// An idle connection of this caller's that can take a request now, newest first.
    pub fn take(&self, key: &PoolKey) -> Option<Sender> {
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.by_caller.get_mut(key)?;
        let mut found = None;
        let mut taken = 0;
        while let Some((since, sender)) = list.pop() {
            taken += 1;
            if since.elapsed() < IDLE_TIMEOUT && sender.is_ready() {
                found = Some(sender);
                break;
            }
        }
        if list.is_empty() {
            idle.by_caller.remove(key);
        }
        idle.count -= taken;
        found
    }

    /// Keeps a connection whose last exchange completed; one that is busy or closed (a
    /// response cut short, the server gone) is dropped.
    pub fn put(&self, key: PoolKey, sender: Sender) {
        if !sender.is_ready() {
            return;
        }
        let mut idle = self.idle.lock().expect("pool lock");
        if idle.count >= MAX_IDLE {
            return;
        }
        let list = idle.by_caller.entry(key).or_default();
        if list.len() >= MAX_IDLE_PER_CALLER {
            return;
        }
        list.push((Instant::now(), sender));
        idle.count += 1;
    }

    /// Closes connections idle for longer than [`IDLE_TIMEOUT`] or closed by the server.
    pub fn sweep(&self) {
        let mut idle = self.idle.lock().expect("pool lock");
        let mut count = 0;
        idle.by_caller.retain(|_, list| {
            list.retain(|(since, sender)| since.elapsed() < IDLE_TIMEOUT && !sender.is_closed());
            count += list.len();
            !list.is_empty()
        });
        idle.count = count;
    }
}
