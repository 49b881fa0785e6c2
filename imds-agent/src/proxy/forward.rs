//! The forward phase: a request rebuilt from what was parsed, sent to the endpoint the caller
//! asked for over an upstream connection that this client connection uses alone and that only
//! ever serves this caller (idle ones wait in `pool`, per caller).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};

use super::{Body, Filter, admit::Connection, mds_tls, request};

/// How long connecting to the metadata service may take.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why the metadata service gave no usable answer. Fixed text: the client reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("invalid target")]
    InvalidTarget,
    #[error("socket failed")]
    Socket,
    #[error("connect timed out")]
    ConnectTimedOut,
    #[error("connect failed")]
    Connect,
    #[error("handshake failed")]
    Handshake,
    #[error("the node's credentials for the metadata server's mutual TLS cannot be used")]
    Credentials,
    #[error("mutual TLS with the metadata server failed")]
    Tls,
    #[error("no answer in time")]
    TimedOut,
    #[error("upstream request failed")]
    Request,
    #[error("listing too large or truncated")]
    ListingTooLarge,
    #[error("listing is not UTF-8")]
    ListingNotUtf8,
    #[error("token response unreadable")]
    TokenResponse,
    #[error("answer to be cut to a view too large or truncated")]
    ViewedTooLarge,
    #[error("the metadata service's request limit: no turn within --upstream-wait-ms")]
    OverBudget,
}

impl UpstreamError {
    pub fn status(self) -> StatusCode {
        match self {
            Self::TimedOut => StatusCode::GATEWAY_TIMEOUT,
            // As the service itself would answer beyond its limit, without asking it.
            Self::OverBudget => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// How long to wait for the metadata service's response headers.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamTimeouts {
    /// Ordinary requests.
    pub request: Duration,
    /// Upper bound for GCP `wait_for_change` long-polls, which may legitimately hang for
    /// their `timeout_sec` (or, without one, until the value changes).
    pub long_poll: Duration,
}

impl UpstreamTimeouts {
    /// The bound for one request: a long-poll gets its `timeout_sec` plus slack, within the
    /// long-poll cap; everything else the ordinary bound.
    pub fn for_query(&self, query: Option<&str>) -> Duration {
        let params = || query.into_iter().flat_map(|q| q.split('&'));
        if !params().any(|p| p == "wait_for_change=true") {
            return self.request;
        }
        params()
            .find_map(|p| p.strip_prefix("timeout_sec=")?.parse::<u64>().ok())
            .map_or(self.long_poll, |secs| {
                (Duration::from_secs(secs) + self.request).min(self.long_poll)
            })
    }
}

pub async fn forward(
    filter: &Filter,
    connection: &Connection,
    valid: &request::ValidRequest,
    headers: http::HeaderMap,
) -> Result<Response<Body>, UpstreamError> {
    // From the String itself: parsing a &str would copy it.
    let uri = Uri::try_from(valid.target()).map_err(|_| UpstreamError::InvalidTarget)?;
    let mut upstream_request = Request::new(Empty::<Bytes>::new());
    *upstream_request.method_mut() = valid.method.clone();
    *upstream_request.uri_mut() = uri;
    *upstream_request.headers_mut() = headers;
    let tls = mutual_tls(filter, connection.original)?;
    let host = match tls {
        Some(_) => HeaderValue::from_static(mds_tls::SERVER_NAME),
        None => host_header(connection.original)?,
    };
    upstream_request.headers_mut().insert(header::HOST, host);

    let mut upstream = connection.upstream.lock().await;
    let ours = match upstream.as_mut() {
        Some(sender) => sender.ready().await.is_ok(),
        None => false,
    };
    let mut pooled = false;
    if !ours {
        *upstream = match connection.pool.take(&connection.pool_key) {
            Some(sender) => {
                pooled = true;
                Some(sender)
            }
            None => Some(connect_upstream(filter, connection.original, tls.clone()).await?),
        };
    }
    // A connection that sat idle in the pool may have been closed by the server meanwhile:
    // then the request is sent once more on a new connection (metadata requests are safe to
    // repeat). Requests on the client connection's own upstream, just checked ready, are
    // not copied for that.
    let retry = pooled.then(|| clone_request(&upstream_request));
    let sent = Instant::now();
    // One deadline for the whole exchange (a resend on a new connection, the head, a body read
    // whole): one timer per request.
    let bound = filter.settings.upstream.for_query(valid.query.as_deref());
    let exchange = async {
        let sender = upstream.as_mut().expect("set above");
        let mut response = match (sender.try_send_request(upstream_request).await, retry) {
            (Ok(response), _) => response,
            (Err(error), Some(request)) if is_stale_connection(error.error()) => {
                tracing::debug!(error = %error.error(), "reused upstream connection was closed; retrying on a new one");
                let sender =
                    upstream.insert(connect_upstream(filter, connection.original, tls).await?);
                sender
                    .send_request(request)
                    .await
                    .map_err(|_| UpstreamError::Request)?
            }
            (Err(_), _) => return Err(UpstreamError::Request),
        };
        filter
            .sinks
            .metrics
            .upstream_latency(sent.elapsed().as_secs_f64());
        request::strip_hop_by_hop(response.headers_mut());
        // An answer of a known, small size (nearly every metadata answer) is read whole
        // within the bound before it is answered: a service that stalls after the head costs
        // the caller a 504 in the bound rather than a body that never comes, and the answer
        // goes out in one write. Larger or unsized answers stream through.
        let small = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|length| length.to_str().ok()?.parse::<usize>().ok())
            .is_some_and(|length| length <= WHOLE_BODY_BYTES);
        if !small {
            return Ok(response.map(BodyExt::boxed));
        }
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|_| UpstreamError::Request)?
            .to_bytes();
        Ok(Response::from_parts(parts, super::full_body(body)))
    };
    tokio::time::timeout(bound, exchange)
        .await
        .map_err(|_| UpstreamError::TimedOut)?
}

/// Answers up to this size are read whole before they are answered: the metadata services'
/// documents and credentials are a few KiB, EC2's user data at most 16 KB.
const WHOLE_BODY_BYTES: usize = 64 * 1024;

/// The Host header for requests to `original`, formatted once per thread for the address
/// its last request went to (a node's callers all ask the same one or two addresses).
fn host_header(original: SocketAddr) -> Result<HeaderValue, UpstreamError> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(SocketAddr, HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| {
        if let Some((addr, value)) = last.as_ref()
            && *addr == original
        {
            return Ok(value.clone());
        }
        let host = match (original, original.port()) {
            (SocketAddr::V4(addr), 80) => addr.ip().to_string(),
            (SocketAddr::V6(addr), 80) => format!("[{}]", addr.ip()),
            (addr, _) => addr.to_string(),
        };
        let value = HeaderValue::from_str(&host).map_err(|_| UpstreamError::InvalidTarget)?;
        *last = Some((original, value.clone()));
        Ok(value)
    })
}

fn clone_request(request: &Request<Empty<Bytes>>) -> Request<Empty<Bytes>> {
    let mut copy = Request::new(Empty::new());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// Errors of a connection the server closed while it sat idle, before answering.
fn is_stale_connection(error: &hyper::Error) -> bool {
    error.is_canceled() || error.is_closed() || error.is_incomplete_message()
}

/// The TLS client configuration for `original` where its requests go over mutual TLS (GCP's
/// metadata server, on a node with the credentials).
fn mutual_tls(
    filter: &Filter,
    original: SocketAddr,
) -> Result<Option<Arc<rustls::ClientConfig>>, UpstreamError> {
    let Some(mds) = &filter.settings.mds_tls else {
        return Ok(None);
    };
    if original != SocketAddr::from(([169, 254, 169, 254], 80)) {
        return Ok(None);
    }
    mds.config().map_err(|error| {
        tracing::error!(%error, "the metadata server's mutual TLS credentials cannot be used; requests fail rather than go in the clear");
        UpstreamError::Credentials
    })
}

async fn connect_upstream(
    filter: &Filter,
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<SendRequest<Empty<Bytes>>, UpstreamError> {
    // Over mutual TLS: the server's TLS port on the same address.
    let addr = match tls {
        Some(_) => SocketAddr::new(addr.ip(), mds_tls::PORT),
        None => addr,
    };
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|_| UpstreamError::Socket)?;
    // Closed with RST when its client connection ends (never mid-response: the response was
    // read whole by then). A FIN close would leave a TIME_WAIT per client connection, and at
    // SDK-style one-connection-per-request rates the agent would run out of source ports.
    let _ = socket.set_zero_linger();
    let stream = tokio::time::timeout(
        UPSTREAM_CONNECT_TIMEOUT,
        filter.enforcer.connect_exempt(socket, addr),
    )
    .await
    .map_err(|_| UpstreamError::ConnectTimedOut)?
    .map_err(|error| {
        tracing::warn!(%error, "upstream connect failed");
        UpstreamError::Connect
    })?;
    let _ = stream.set_nodelay(true);
    match tls {
        // Boxed: the TLS handshake's state (about 3.5 KB, print-type-size) would otherwise be
        // part of every request's future, plain HTTP too, and be copied with it as each
        // phase's future moves (into its box, under a timeout).
        Some(config) => Box::pin(connect_tls(stream, config)).await,
        None => http1(stream).await,
    }
}

/// HTTP/1.1 over mutual TLS with the metadata server, on a connected `stream`.
async fn connect_tls(
    stream: TcpStream,
    config: Arc<rustls::ClientConfig>,
) -> Result<SendRequest<Empty<Bytes>>, UpstreamError> {
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(mds_tls::MdsTls::server_name(), stream)
        .await
        .map_err(|error| {
            tracing::warn!(%error, "mutual TLS with the metadata server failed");
            UpstreamError::Tls
        })?;
    http1(stream).await
}

/// An HTTP/1.1 client connection over `io`, driven by a task of its own.
async fn http1<IO>(io: IO) -> Result<SendRequest<Empty<Bytes>>, UpstreamError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|_| UpstreamError::Handshake)?;
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            tracing::debug!(%error, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_polls_get_their_own_bound() {
        let t = UpstreamTimeouts {
            request: Duration::from_secs(10),
            long_poll: Duration::from_secs(3600),
        };
        assert_eq!(t.for_query(None), Duration::from_secs(10));
        assert_eq!(t.for_query(Some("recursive=true")), Duration::from_secs(10));
        assert_eq!(
            t.for_query(Some("wait_for_change=true&timeout_sec=60")),
            Duration::from_secs(70)
        );
        assert_eq!(
            t.for_query(Some("wait_for_change=true")),
            Duration::from_secs(3600)
        );
        assert_eq!(
            t.for_query(Some("wait_for_change=true&timeout_sec=99999")),
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn only_a_missed_deadline_is_a_gateway_timeout() {
        assert_eq!(
            UpstreamError::TimedOut.status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(UpstreamError::Connect.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            UpstreamError::ConnectTimedOut.status(),
            StatusCode::BAD_GATEWAY
        );
    }
}
