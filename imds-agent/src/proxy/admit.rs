//! The admit phase, once per connection: the kernel's record of the caller (none: the
//! connection was not diverted, and is refused), its identity, the policy's admission and the
//! kernel verdict that admission allows.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http1::SendRequest;
use imds_common::{AF_INET, AF_INET6, Caller};
use tokio::{net::TcpStream, sync::Mutex};

use super::{Filter, pool};
use crate::{
    identity::{Identity, attribution},
    policy::Admission,
};

/// One accepted, attributed client connection.
pub struct Connection {
    pub identity: Arc<Identity>,
    pub admission: Admission,
    /// Where the caller was going before the kernel diverted it.
    pub original: SocketAddr,
    /// Taken from the caller's idle connections or created on the first allowed request;
    /// used by this client connection alone, then returned to the caller's idle connections.
    pub upstream: Mutex<Option<SendRequest<Empty<Bytes>>>>,
    pub pool: Arc<pool::UpstreamPool>,
    pub pool_key: pool::PoolKey,
    /// The agent is draining: responses close the connection.
    pub draining: std::sync::atomic::AtomicBool,
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(sender) = self.upstream.get_mut().take() {
            self.pool.put(self.pool_key, sender);
        }
    }
}

/// The connection's caller, admitted; `None` if the kernel did not divert it.
pub async fn admit(filter: &Filter, stream: &TcpStream, peer: SocketAddr) -> Option<Connection> {
    // The listener is IPv4; connect6 diverts to its v4-mapped address, so a peer that arrives
    // over IPv6 was not diverted by the kernel.
    if peer.is_ipv6() {
        return None;
    }
    let caller: Caller = filter.enforcer.caller(stream, peer)?;
    let identity = attribution::attribute(
        &filter.resolver,
        &caller,
        filter.settings.unknown_pod_wait,
        filter.policy.current().pins_digests(),
    )
    .await;
    // The policy in force after any wait for the pod (its arrival is a new version).
    let admission = filter.policy.current().admit(&identity);
    if let Some((verdict, version)) = admission.kernel_verdict {
        filter
            .enforcer
            .verdicts
            .install(caller.key(), verdict, version);
    }
    let original = crate::provider::upstream_address(
        original_destination(&caller)?,
        &filter.settings.endpoints,
    );
    Some(Connection {
        identity,
        admission,
        original,
        upstream: Mutex::new(None),
        pool: filter.callers.pool.clone(),
        pool_key: pool::PoolKey {
            caller: caller.key(),
            upstream: original,
        },
        draining: std::sync::atomic::AtomicBool::new(false),
    })
}

fn original_destination(caller: &Caller) -> Option<SocketAddr> {
    let original = &caller.original;
    match original.family {
        AF_INET => {
            let ip = std::net::Ipv4Addr::from(original.addr[0].to_ne_bytes());
            Some(SocketAddr::from((ip, original.port)))
        }
        AF_INET6 => {
            let mut octets = [0u8; 16];
            for (chunk, word) in octets.chunks_exact_mut(4).zip(original.addr) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            Some(SocketAddr::from((
                std::net::Ipv6Addr::from(octets),
                original.port,
            )))
        }
        _ => None,
    }
}
