//! The shield phase, between the decision and the metadata service: the agent sees every
//! request of the node, so it keeps the node within the service's limits.
//! - `cache`: answers fixed for the instance's life, and credentials (role credentials,
//!   access tokens) until well before they expire, are served from memory after the first
//!   read (`--no-cache` turns it off);
//! - `flights`: identical reads in flight at the same moment share one upstream request;
//! - `budget`: requests beyond the service's documented limits (`paths`) wait their turn, a
//!   bounded time, rather than draw its 429s.
//!
//! Only what any caller allowed to read it would get is shared: on services with session
//! tokens, only requests whose token the agent handed out to that very caller and that has
//! not expired (token binding); with token binding off, nothing there is shared or kept.
//! Every caller is decided by its own policy before this phase, and its answer is shaped for
//! it after (listings, views).

mod budget;
mod cache;
mod flights;
pub mod paths;

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use http_body_util::BodyExt as _;

use super::{
    Body, Filter, admit::Connection, forward, forward::UpstreamError, full_body,
    request::ValidRequest,
};
use flights::Seat;
use paths::{Lifetime, Limit};

/// What identifies one read for sharing: the service it goes to, the request target as
/// forwarded (the path and the rebuilt query), and the representation asked for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub address: SocketAddr,
    pub target: String,
    /// The `Accept` and `Accept-Encoding` headers, which may select another answer.
    pub variant: String,
}

/// Headers that ask for part of an answer, or for one only under a condition: a request
/// carrying one is never shared.
const PARTIAL: [http::HeaderName; 6] = [
    http::header::RANGE,
    http::header::IF_RANGE,
    http::header::IF_MATCH,
    http::header::IF_NONE_MATCH,
    http::header::IF_MODIFIED_SINCE,
    http::header::IF_UNMODIFIED_SINCE,
];

/// The representation `headers` ask for (see [`Key::variant`]).
fn variant(headers: &HeaderMap) -> String {
    [http::header::ACCEPT, http::header::ACCEPT_ENCODING]
        .iter()
        .flat_map(|name| headers.get_all(name))
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

/// An answer held in memory, to share or keep.
#[derive(Debug, Clone)]
pub struct Shared {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Shared {
    fn response(&self) -> Response<Body> {
        let mut response = Response::new(full_body(self.body.clone()));
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers.clone();
        response
    }
}

/// A shared answer larger than this fails (metadata values are at most 512 KiB on GCP).
const MAX_SHARED_BYTES: usize = 4 << 20;

/// How the shield behaves, from the command line.
pub struct Settings {
    pub cache: bool,
    pub limits: Vec<Limit>,
    /// The longest a request waits for its turn under a limit.
    pub wait: Duration,
}

pub struct Shield {
    cache: Option<cache::Cache>,
    flights: flights::Flights,
    budgets: budget::Budgets,
}

/// Where an answer came from, for the audit line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// From the service, after waiting this long for its turn under a limit.
    Upstream {
        waited: Duration,
    },
    Cache,
    Coalesced,
}

impl Served {
    /// The audit line's note, if any.
    pub fn note(self) -> String {
        match self {
            Self::Upstream { waited } if waited >= Duration::from_millis(1) => {
                format!("waited {} ms for the service's limit", waited.as_millis())
            }
            Self::Upstream { .. } => String::new(),
            Self::Cache => "cache: hit".into(),
            Self::Coalesced => "coalesced".into(),
        }
    }
}

impl Shield {
    pub fn new(settings: Settings) -> Self {
        Self {
            cache: settings.cache.then(cache::Cache::default),
            flights: flights::Flights::default(),
            budgets: budget::Budgets::new(settings.limits, settings.wait),
        }
    }

    /// The answer to `valid`, from memory, from an identical request in flight, or from the
    /// service in its turn. `shareable`: the caller may be given what any caller allowed to
    /// read the path gets (see the module's notes).
    pub async fn fetch(
        &self,
        filter: &Filter,
        connection: &Connection,
        valid: &ValidRequest,
        headers: HeaderMap,
        shareable: bool,
    ) -> (Result<Response<Body>, UpstreamError>, Served) {
        // Long polls (GCP's wait_for_change) wait for a change each on its own terms.
        let long_poll = valid
            .params
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("wait_for_change"));
        if long_poll {
            // Not under the limits either: a long poll holds its request for minutes.
            let response = forward::forward(filter, connection, valid, headers).await;
            return (
                response,
                Served::Upstream {
                    waited: Duration::ZERO,
                },
            );
        }
        let partial = PARTIAL.iter().any(|name| headers.contains_key(name));
        if !shareable || partial || valid.method != http::Method::GET {
            let (response, waited) = self.upstream(filter, connection, valid, headers).await;
            return (response, Served::Upstream { waited });
        }
        let key = Key {
            address: connection.original,
            target: valid.target(),
            variant: variant(&headers),
        };
        let lifetime = paths::lifetime(&valid.path);
        if lifetime != Lifetime::Never
            && let Some(hit) = self.cache.as_ref().and_then(|cache| cache.get(&key))
        {
            filter.sinks.metrics.shield("cache");
            return (Ok(hit.response()), Served::Cache);
        }
        match self.flights.join(&key) {
            Seat::Follower(leader) => {
                filter.sinks.metrics.shield("coalesced");
                let outcome = flights::landed(leader).await;
                (outcome.map(|shared| shared.response()), Served::Coalesced)
            }
            Seat::Leader(lead) => {
                let asked = std::time::Instant::now();
                let (response, waited) = self.upstream(filter, connection, valid, headers).await;
                let outcome = match response {
                    Ok(response) => collect(response).await,
                    Err(error) => Err(error),
                };
                if let (Ok(shared), Some(cache)) = (&outcome, &self.cache) {
                    cache.offer(&key, lifetime, shared, asked);
                }
                lead.land(&outcome);
                (
                    outcome.map(|shared| shared.response()),
                    Served::Upstream { waited },
                )
            }
        }
    }

    /// The service's answer, in the request's turn under its limits, and how long the
    /// request waited for that turn.
    async fn upstream(
        &self,
        filter: &Filter,
        connection: &Connection,
        valid: &ValidRequest,
        headers: HeaderMap,
    ) -> (Result<Response<Body>, UpstreamError>, Duration) {
        let Some(turn) = self
            .budgets
            .turn(connection.original.ip(), &valid.path)
            .await
        else {
            filter.sinks.metrics.shield("over-budget");
            return (Err(UpstreamError::OverBudget), Duration::ZERO);
        };
        let response = forward::forward(filter, connection, valid, headers).await;
        if response
            .as_ref()
            .is_ok_and(|r| r.status() == StatusCode::TOO_MANY_REQUESTS)
        {
            filter.sinks.metrics.shield("upstream-429");
        }
        (response, turn.waited)
    }
}

async fn collect(response: Response<Body>) -> Result<Shared, UpstreamError> {
    let (parts, body) = response.into_parts();
    let body = http_body_util::Limited::new(body, MAX_SHARED_BYTES)
        .collect()
        .await
        .map_err(|_| UpstreamError::Request)?
        .to_bytes();
    Ok(Shared {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_representation_is_another_read() {
        let mut gzip = HeaderMap::new();
        gzip.insert(http::header::ACCEPT_ENCODING, "gzip".parse().unwrap());
        let mut json = HeaderMap::new();
        json.insert(http::header::ACCEPT, "application/json".parse().unwrap());
        let plain = HeaderMap::new();
        let variants = [variant(&gzip), variant(&json), variant(&plain)];
        assert_ne!(variants[0], variants[1]);
        assert_ne!(variants[0], variants[2]);
        assert_ne!(variants[1], variants[2]);
        // Other headers (the SDK's user agent, the required flavour) do not matter.
        let mut agent = HeaderMap::new();
        agent.insert(http::header::USER_AGENT, "botocore".parse().unwrap());
        assert_eq!(variant(&agent), variant(&plain));
    }
}
