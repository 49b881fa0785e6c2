//! The HTTP filter: serves connections the kernel diverted, one caller per connection.
//!
//! A request passes through phases, each in its own file and in this order:
//! - `accept`: the listeners, the per-connection task, draining on shutdown;
//! - `admit`: per connection, the kernel's record of the caller (no record: refused), its
//!   identity (`identity::attribution`), the policy's admission (`policy::Admission`) and
//!   the kernel verdict it allows (`loader::verdicts`);
//! - `gate` and `request`: per request, the raw head and then the parsed request validated;
//! - `pipeline`: the order of the phases for one request;
//! - `decide`: the policy's plan for the request (`policy::Plan`, asked once);
//! - `tokens`: session-token requirements and binding;
//! - `shield`: answers from memory or shared with an identical request in flight, and the
//!   service's request limits kept;
//! - `forward`: the request rebuilt from what was parsed, sent upstream over a connection that
//!   only ever serves this caller (`pool`: idle ones are kept per caller);
//! - `shape`: listings filtered to what the caller may read;
//! - `view`: other answers cut to the caller's view (keys of user data, documents without
//!   removed fields);
//! - `refusal`: every answer the agent gives itself, in one place;
//! - `audit`: the audit line, metrics, events and inventory of every request.

mod accept;
mod admit;
pub mod audit;
mod decide;
mod forward;
pub mod gate;
pub mod limits;
pub mod mds_tls;
mod pipeline;
pub mod pool;
mod refusal;
pub mod request;
mod shape;
pub mod shield;
pub mod tokens;
mod view;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;

pub use accept::{ServeError, serve, set_nodelay};
pub use forward::UpstreamTimeouts;

use crate::{identity::Resolver, loader::Enforcer, policy::store::PolicyStore};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// An answer's body held whole in memory (the agent's own answers, and answers it cut,
/// filtered or keeps).
pub fn full_body(bytes: impl Into<Bytes>) -> Body {
    use http_body_util::BodyExt as _;
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Everything the filter needs, shared by all connections.
pub struct Filter {
    pub enforcer: Arc<Enforcer>,
    pub resolver: Resolver,
    pub policy: Arc<PolicyStore>,
    /// The cloud: its request rules apply before any policy, and where its metadata service
    /// has session tokens, the token rules (per-policy requirements, binding).
    pub provider: crate::provider::Provider,
    pub settings: Settings,
    pub callers: CallerState,
    /// The metadata service's shield: cache, coalescing, request limits.
    pub shield: shield::Shield,
    /// Where each request is reported.
    pub sinks: audit::Sinks,
}

/// How the filter behaves, from the command line.
pub struct Settings {
    pub timeouts: gate::Timeouts,
    pub upstream: UpstreamTimeouts,
    /// The diverted endpoints, for the interface of link-local ones.
    pub endpoints: Vec<SocketAddr>,
    /// How long a connection from a pod not yet known waits for the pod watch (zero without
    /// one).
    pub unknown_pod_wait: Duration,
    /// Whether deny responses carry the `imds-agent-explain` header.
    pub explain_denials: bool,
    /// Whether tokens are bound to the caller they were handed out to.
    pub token_binding: bool,
    /// GCP's metadata server over mutual TLS, where the node has the credentials (on GCP).
    pub mds_tls: Option<mds_tls::MdsTls>,
}

impl Settings {
    /// The shortest timeout a request arms: its head's or its upstream answer's.
    pub fn shortest_timeout(&self) -> Duration {
        self.timeouts.head.min(self.upstream.request)
    }
}

/// What the filter keeps per caller.
pub struct CallerState {
    pub limits: Arc<limits::Limits>,
    /// Idle upstream connections.
    pub pool: Arc<pool::UpstreamPool>,
    /// Which session tokens were handed out to whom.
    pub tokens: Arc<tokens::TokenBindings>,
}
