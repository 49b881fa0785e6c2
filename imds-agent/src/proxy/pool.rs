//! Idle upstream connections, kept per caller. SDKs open a new connection per request; without
//! a pool each would cost the agent an upstream connect as well. A connection is only ever
//! reused for the same kernel-attested caller (cgroup, uid, gid) and the same endpoint, so no
//! upstream connection carries two callers' requests, as before, across client connections.
//!
//! Each serving thread keeps the idle connections it opened (a shard), and takes only those:
//! a connection's task runs on the thread that opened it, so reusing one never has a request
//! wait for another thread to wake. A caller then has at most one idle connection per thread
//! where its requests come one at a time.

use std::{
    cell::Cell,
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

pub struct UpstreamPool {
    /// One per serving thread, and the first for any other thread.
    shards: Vec<Mutex<Idle>>,
}

thread_local! {
    /// The shard of the serving thread this is, set as it starts.
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Makes this thread use shard `shard` of every pool (the serving thread of that number).
pub fn use_shard(shard: usize) {
    SHARD.set(shard);
}

#[derive(Default)]
struct Idle {
    by_caller: HashMap<PoolKey, Vec<(Instant, Sender)>>,
    count: usize,
}

impl UpstreamPool {
    /// A pool for `threads` serving threads (numbered from 1; 0 is any other thread).
    pub fn new(threads: usize) -> Self {
        Self {
            shards: (0..=threads).map(|_| Mutex::default()).collect(),
        }
    }

    /// This thread's idle connections.
    fn shard(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.shards[SHARD.get().min(self.shards.len() - 1)]
            .lock()
            .expect("pool lock")
    }

    /// Idle connections one shard keeps in all: MAX_IDLE over all shards.
    fn max_idle(&self) -> usize {
        (MAX_IDLE / self.shards.len()).max(MAX_IDLE_PER_CALLER)
    }

    /// An idle connection of this caller's, opened by this thread, that can take a request
    /// now, newest first.
    pub fn take(&self, key: &PoolKey) -> Option<Sender> {
        let mut idle = self.shard();
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

    /// Keeps a connection whose last exchange completed, on the thread that used it (which
    /// opened it); one that is busy or closed (a response cut short, the server gone) is
    /// dropped.
    pub fn put(&self, key: PoolKey, sender: Sender) {
        if !sender.is_ready() {
            return;
        }
        let max_idle = self.max_idle();
        let mut idle = self.shard();
        if idle.count >= max_idle {
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
        for shard in &self.shards {
            let mut idle = shard.lock().expect("pool lock");
            let mut count = 0;
            idle.by_caller.retain(|_, list| {
                list.retain(|(since, sender)| {
                    since.elapsed() < IDLE_TIMEOUT && !sender.is_closed()
                });
                count += list.len();
                !list.is_empty()
            });
            idle.count = count;
        }
    }
}

#[cfg(test)]
mod tests {
    use hyper_util::rt::TokioIo;

    use super::*;

    /// A client connection to a server that never answers, ready for a request.
    async fn idle_connection() -> Sender {
        let (client, server) = tokio::io::duplex(1024);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client))
            .await
            .expect("handshake");
        tokio::spawn(async move {
            let _server = server;
            let _ = conn.await;
        });
        sender.ready().await.expect("ready");
        sender
    }

    fn key(cgroup_id: u64) -> PoolKey {
        PoolKey {
            caller: crate::identity::CallerKey {
                cgroup_id,
                uid: 0,
                gid: 0,
            },
            upstream: "169.254.169.254:80".parse().expect("address"),
        }
    }

    #[tokio::test]
    async fn a_thread_takes_only_the_idle_connections_it_opened_and_only_its_callers() {
        let pool = UpstreamPool::new(2);
        use_shard(1);
        pool.put(key(7), idle_connection().await);
        use_shard(2);
        assert!(pool.take(&key(7)).is_none(), "another thread's connection");
        use_shard(1);
        assert!(pool.take(&key(8)).is_none(), "another caller's connection");
        assert!(pool.take(&key(7)).is_some());
        assert!(pool.take(&key(7)).is_none(), "taken once");
        // Any other thread than a serving one uses the first shard.
        use_shard(0);
        pool.put(key(7), idle_connection().await);
        assert!(pool.take(&key(7)).is_some());
    }
}
