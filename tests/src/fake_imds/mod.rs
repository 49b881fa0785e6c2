//! A fake cloud metadata service, for tests and the demo: EC2's by default, or any other
//! provider's ([`Config::provider`], the others in [`clouds`]). EC2's follows
//! shared/reference/imds-protocols.md (A1) and the AWS metadata mock:
//! - `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds` 1..=21600 returns a
//!   token and echoes the TTL header; a missing, non-integer or out-of-range TTL is 400; a
//!   request carrying `X-Forwarded-For` is 403 (the reference says "rejected" without a code:
//!   403 is the safe reading); PUT on a versioned path is 403.
//! - GET/HEAD: a token that is unknown or expired is 401; with tokens required, no token is 401.
//! - Listings end in LF-separated names, directories with a trailing `/`; `x` and `x/` both
//!   serve, as the real service is lenient; unknown paths are 404; other methods 405.
//!
//! Its copies serve the same way: Alibaba with its own token headers (`X-aliyun-ecs-metadata-
//! token*`; whether it echoes the TTL is not documented, so it does not) and RAM credentials;
//! OpenStack's EC2-compatible tree without tokens, beside its own `/openstack` tree.
//!
//! Test hooks, not IMDS behaviour: an `X-Fake-Delay-Ms: N` header delays the answer by N
//! milliseconds (at most 10 s), so tests can hold a request in flight; `X-Fake-Body-Delay-Ms:
//! N` sends the answer's head at once and its body N milliseconds later, as a service that
//! stalls mid-answer.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use imds_agent::{calendar::iso8601, provider::Provider};
use tokio::net::TcpListener;

pub mod clouds;

pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
pub const ALIBABA_TOKEN_HEADER: &str = "x-aliyun-ecs-metadata-token";
pub const ALIBABA_TTL_HEADER: &str = "x-aliyun-ecs-metadata-token-ttl-seconds";
pub const VOLCENGINE_TOKEN_HEADER: &str = "x-volc-ecs-metadata-token";
pub const VOLCENGINE_TTL_HEADER: &str = "x-volc-ecs-metadata-token-ttl-seconds";
pub const INSTANCE_ID: &str = "i-0fa4e1d2c3b4a5968";
pub const USER_DATA: &str = "#!/bin/bash\nexport DB_PASSWORD=hunter2\n";
/// Prefix of every access key id the fake issues, so tests can recognise real answers.
pub const ACCESS_KEY_PREFIX: &str = "ASIAFAKE";

#[derive(Debug, Clone)]
pub struct Config {
    /// Session tokens required (EC2 HttpTokens=required, Alibaba's hardened mode).
    pub tokens_required: bool,
    pub role: String,
    /// Whose metadata service to serve.
    pub provider: Provider,
    /// A file to which each request is appended as `METHOD PATH` when it arrives, for tests
    /// of what reached the service.
    pub request_log: Option<std::path::PathBuf>,
    /// The instance's user data (EC2's and Azure's; the others serve [`USER_DATA`]).
    pub user_data: String,
    /// How long EC2's role credentials are valid from the moment they are served.
    pub credential_lifetime: Duration,
    /// Azure's throttling: at most this many requests in any second (managed identities:
    /// four times as many, counted apart), beyond it 429, as IMDS answers; `None`: none.
    pub rate_limit: Option<usize>,
    /// How long every answer takes (a real service's time, for the shield's benchmark).
    pub answer_delay: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            tokens_required: false,
            role: "demo-node-role".into(),
            provider: Provider::Aws,
            request_log: None,
            user_data: USER_DATA.into(),
            credential_lifetime: Duration::from_secs(6 * 3600),
            rate_limit: None,
            answer_delay: Duration::ZERO,
        }
    }
}

/// An EC2-style service's session-token headers: (token, requested TTL, whether the TTL is
/// echoed in the token response).
fn session_headers(provider: Provider) -> Option<(&'static str, &'static str, bool)> {
    match provider {
        Provider::Aws => Some((TOKEN_HEADER, TTL_HEADER, true)),
        Provider::Alibaba => Some((ALIBABA_TOKEN_HEADER, ALIBABA_TTL_HEADER, false)),
        Provider::Volcengine => Some((VOLCENGINE_TOKEN_HEADER, VOLCENGINE_TTL_HEADER, false)),
        _ => None,
    }
}

struct State {
    config: Config,
    tokens: Mutex<HashMap<String, Instant>>,
    /// Arrivals in the last second, per throttled class (see [`Config::rate_limit`]).
    arrivals: Mutex<HashMap<bool, std::collections::VecDeque<Instant>>>,
}

impl State {
    /// Whether a request for `path` arriving now is over the rate limit.
    fn throttled(&self, path: &str) -> bool {
        let Some(limit) = self.config.rate_limit else {
            return false;
        };
        let identity = path.starts_with("/metadata/identity/");
        let limit = if identity { limit * 4 } else { limit };
        let now = Instant::now();
        let mut arrivals = self.arrivals.lock().unwrap();
        let window = arrivals.entry(identity).or_default();
        while window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            window.pop_front();
        }
        window.push_back(now);
        window.len() > limit
    }
}

/// A path the fake answers with the client address of the connection that carried the request.
pub const CONNECTION_PATH: &str = "/fake/connection";

/// Serves on every listener until the process ends; those with a TLS acceptor over TLS (the
/// client's certificate required where the acceptor asks for one).
pub async fn serve(
    listeners: Vec<(TcpListener, Option<tokio_rustls::TlsAcceptor>)>,
    config: Config,
) {
    let state = Arc::new(State {
        config,
        tokens: Mutex::new(HashMap::new()),
        arrivals: Mutex::new(HashMap::new()),
    });
    let mut tasks = Vec::new();
    for (listener, tls) in listeners {
        let state = state.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serve_connection(stream, peer, state, false).await,
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                serve_connection(stream, peer, state, true).await;
                            }
                        }
                    }
                });
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

async fn serve_connection<IO>(io: IO, peer: SocketAddr, state: Arc<State>, tls: bool)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request| {
        let state = state.clone();
        async move {
            if let Some(log) = &state.config.request_log {
                log_request(log, &request, tls);
            }
            if state.throttled(request.uri().path()) {
                return Ok(reply(
                    StatusCode::TOO_MANY_REQUESTS,
                    "{\"error\":\"Too many requests\"}",
                )
                .map(HeldBody::now));
            }
            if let Some(delay) = requested_delay(&request, DELAY_HEADER) {
                tokio::time::sleep(delay).await;
            }
            if !state.config.answer_delay.is_zero() {
                tokio::time::sleep(state.config.answer_delay).await;
            }
            // Not a metadata path: tests ask which connection carried a request (the agent's
            // upstream connection reuse).
            if request.uri().path() == CONNECTION_PATH {
                return Ok(reply(StatusCode::OK, &peer.to_string()).map(HeldBody::now));
            }
            let body_delay = requested_delay(&request, BODY_DELAY_HEADER);
            Ok::<_, Infallible>(
                respond(&state, &request).map(|body| HeldBody::after(body, body_delay)),
            )
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .await;
}

/// `METHOD PATH`, and ` mtls` for a request that came over mutual TLS.
fn log_request<B>(log: &std::path::Path, request: &Request<B>, tls: bool) {
    use std::io::Write as _;
    let over = if tls { " mtls" } else { "" };
    let line = format!("{} {}{over}\n", request.method(), request.uri().path());
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .and_then(|mut file| file.write_all(line.as_bytes()));
    if let Err(error) = appended {
        eprintln!("fake-imds: request log {}: {error}", log.display());
    }
}

/// A test asks the fake to answer late with this header (an end-to-end header, which the
/// agent forwards; a query parameter of its own would be refused as undocumented).
pub const DELAY_HEADER: &str = "x-fake-delay-ms";

/// A test asks the fake to send an answer's body this long after its head.
pub const BODY_DELAY_HEADER: &str = "x-fake-body-delay-ms";

fn requested_delay<B>(request: &Request<B>, header: &str) -> Option<Duration> {
    let ms: u64 = request
        .headers()
        .get(header)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms.min(10_000)))
}

fn respond<B>(state: &State, request: &Request<B>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    let provider = state.config.provider;
    match provider {
        Provider::Gcp => return clouds::gcp(request),
        Provider::Azure => return clouds::azure(request, &state.config.user_data),
        Provider::Oci => return clouds::oci(request),
        Provider::Digitalocean => return clouds::digitalocean(request),
        Provider::Hetzner => return clouds::hetzner(request),
        Provider::Openstack if path == "/openstack" || path.starts_with("/openstack/") => {
            return clouds::openstack(request);
        }
        Provider::Aws | Provider::Openstack | Provider::Alibaba | Provider::Volcengine => {}
    }
    let method = request.method();
    let headers = request.headers();
    let session = session_headers(provider);
    if *method == Method::PUT {
        return match session {
            Some((_, ttl_header, echo)) => token(state, request, ttl_header, echo),
            None => reply(StatusCode::METHOD_NOT_ALLOWED, ""),
        };
    }
    if *method != Method::GET && *method != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "");
    }
    let presented = session.and_then(|(token_header, _, _)| headers.get(token_header));
    match presented.map(HeaderValue::to_str) {
        Some(Ok(token)) => {
            let valid = state
                .tokens
                .lock()
                .unwrap()
                .get(token)
                .is_some_and(|expiry| *expiry > Instant::now());
            if !valid {
                return reply(StatusCode::UNAUTHORIZED, "");
            }
        }
        Some(Err(_)) => return reply(StatusCode::UNAUTHORIZED, ""),
        None if state.config.tokens_required => return reply(StatusCode::UNAUTHORIZED, ""),
        None => {}
    }
    let key = path.trim_end_matches('/');
    let body = match provider {
        Provider::Alibaba => clouds::alibaba(&state.config.role, key),
        Provider::Volcengine => clouds::volcengine(&state.config.role, key),
        // Nova's EC2-compatible tree has no IAM.
        Provider::Openstack if key.starts_with("/latest/meta-data/iam") => None,
        _ => content(&state.config, key),
    };
    match body {
        Some(body) => reply(StatusCode::OK, &body),
        None => reply(StatusCode::NOT_FOUND, ""),
    }
}

fn token<B>(
    state: &State,
    request: &Request<B>,
    ttl_header: &'static str,
    echo_ttl: bool,
) -> Response<Full<Bytes>> {
    let headers = request.headers();
    if headers.contains_key("x-forwarded-for") {
        return reply(StatusCode::FORBIDDEN, "");
    }
    if request.uri().path().trim_end_matches('/') != "/latest/api/token" {
        // Versioned token paths are 403, other PUTs are not allowed at all.
        return if request.uri().path().ends_with("/api/token") {
            reply(StatusCode::FORBIDDEN, "")
        } else {
            reply(StatusCode::METHOD_NOT_ALLOWED, "")
        };
    }
    let ttl = headers
        .get(ttl_header)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok());
    let Some(ttl) = ttl.filter(|t| (1..=21_600).contains(t)) else {
        return reply(StatusCode::BAD_REQUEST, "");
    };
    let token = random_hex(28);
    state.tokens.lock().unwrap().insert(
        token.clone(),
        Instant::now() + Duration::from_secs(ttl.unsigned_abs()),
    );
    let mut response = reply(StatusCode::OK, &token);
    if echo_ttl {
        response
            .headers_mut()
            .insert(ttl_header, HeaderValue::from(ttl));
    }
    response
}

fn content(config: &Config, key: &str) -> Option<String> {
    let role = &config.role;
    let listing = |items: &[&str]| items.join("\n");
    Some(match key {
        "" => "latest".into(),
        "/latest" => listing(&["dynamic/", "meta-data/", "user-data"]),
        "/latest/meta-data" => listing(&[
            "ami-id",
            "hostname",
            "iam/",
            "instance-id",
            "instance-type",
            "local-ipv4",
            "placement/",
        ]),
        "/latest/meta-data/ami-id" => "ami-0abcdef1234567890".into(),
        "/latest/meta-data/hostname" => "ip-10-0-0-12.ec2.internal".into(),
        "/latest/meta-data/instance-id" => INSTANCE_ID.into(),
        "/latest/meta-data/instance-type" => "m6i.large".into(),
        "/latest/meta-data/local-ipv4" => "10.0.0.12".into(),
        "/latest/meta-data/placement" => listing(&["availability-zone", "region"]),
        "/latest/meta-data/placement/availability-zone" => "us-east-1a".into(),
        "/latest/meta-data/placement/region" => "us-east-1".into(),
        "/latest/meta-data/iam" => listing(&["info", "security-credentials/"]),
        "/latest/meta-data/iam/info" => format!(
            "{{\"Code\":\"Success\",\"LastUpdated\":\"{}\",\"InstanceProfileArn\":\"arn:aws:iam::123456789012:instance-profile/{role}\",\"InstanceProfileId\":\"AIPAFAKE\"}}",
            iso8601(SystemTime::now())
        ),
        "/latest/meta-data/iam/security-credentials" => role.clone(),
        k if k == format!("/latest/meta-data/iam/security-credentials/{role}") => {
            credentials(config.credential_lifetime)
        }
        "/latest/user-data" => config.user_data.clone(),
        "/latest/dynamic" => listing(&["instance-identity/"]),
        "/latest/dynamic/instance-identity" => listing(&["document", "pkcs7", "signature"]),
        "/latest/dynamic/instance-identity/document" => format!(
            "{{\"accountId\":\"123456789012\",\"instanceId\":\"{INSTANCE_ID}\",\"region\":\"us-east-1\",\"availabilityZone\":\"us-east-1a\"}}"
        ),
        _ => return None,
    })
}

fn credentials(lifetime: Duration) -> String {
    let now = SystemTime::now();
    format!(
        "{{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \"{}\",\n  \"Type\" : \"AWS-HMAC\",\n  \"AccessKeyId\" : \"{ACCESS_KEY_PREFIX}{}\",\n  \"SecretAccessKey\" : \"{}\",\n  \"Token\" : \"{}\",\n  \"Expiration\" : \"{}\"\n}}",
        iso8601(now),
        random_hex(6).to_uppercase(),
        random_hex(20),
        random_hex(40),
        iso8601(now + lifetime),
    )
}

/// An answer's body, sent with its head or held back for a while after it.
struct HeldBody {
    body: Full<Bytes>,
    delay: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl HeldBody {
    fn now(body: Full<Bytes>) -> Self {
        Self::after(body, None)
    }

    fn after(body: Full<Bytes>, delay: Option<Duration>) -> Self {
        Self {
            body,
            delay: delay.map(|delay| Box::pin(tokio::time::sleep(delay))),
        }
    }
}

impl hyper::body::Body for HeldBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        if let Some(delay) = &mut self.delay {
            std::task::ready!(delay.as_mut().poll(cx));
            self.delay = None;
        }
        hyper::body::Body::poll_frame(Pin::new(&mut self.body), cx)
    }

    // The length goes out with the head (Content-Length), as the real services send it.
    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::Body::size_hint(&self.body)
    }

    fn is_end_stream(&self) -> bool {
        self.delay.is_none() && hyper::body::Body::is_end_stream(&self.body)
    }
}

pub(crate) fn reply(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    headers.insert(header::SERVER, HeaderValue::from_static("EC2ws"));
    response
}

pub(crate) fn random_hex(bytes: usize) -> String {
    use std::io::Read as _;
    let mut buffer = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buffer))
        .expect("read /dev/urandom");
    buffer.iter().map(|b| format!("{b:02x}")).collect()
}

/// Binds every address (the caller runs in the right network namespace).
/// A TLS acceptor with `dir`'s server.crt and server.key that requires a client certificate
/// issued by client-ca.crt, as GCP's metadata server does on port 443.
pub fn tls_acceptor(dir: &std::path::Path) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs = |file: &str| -> Result<Vec<CertificateDer<'static>>, String> {
        CertificateDer::pem_file_iter(dir.join(file))
            .and_then(Iterator::collect)
            .map_err(|e| format!("{file}: {e}"))
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in certs("client-ca.crt")? {
        roots.add(ca).map_err(|e| e.to_string())?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).map_err(|e| e.to_string())?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs("server.crt")?, key)
        .map_err(|e| e.to_string())?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

pub async fn bind(addrs: &[SocketAddr]) -> std::io::Result<Vec<TcpListener>> {
    let mut listeners = Vec::new();
    for addr in addrs {
        listeners.push(TcpListener::bind(addr).await?);
    }
    Ok(listeners)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(tokens_required: bool) -> State {
        State {
            config: Config {
                tokens_required,
                ..Config::default()
            },
            tokens: Mutex::new(HashMap::new()),
            arrivals: Mutex::new(HashMap::new()),
        }
    }

    fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(path);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn token_ttl_rules() {
        let s = state(true);
        for (ttl, status) in [
            ("0", 400),
            ("21601", 400),
            ("abc", 400),
            ("-5", 400),
            ("1", 200),
            ("21600", 200),
        ] {
            let r = respond(
                &s,
                &request("PUT", "/latest/api/token", &[(TTL_HEADER, ttl)]),
            );
            assert_eq!(r.status().as_u16(), status, "ttl {ttl}");
        }
        let missing = respond(&s, &request("PUT", "/latest/api/token", &[]));
        assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
        let ok = respond(
            &s,
            &request("PUT", "/latest/api/token", &[(TTL_HEADER, "60")]),
        );
        assert_eq!(ok.headers()[TTL_HEADER], "60");
        let xff = respond(
            &s,
            &request(
                "PUT",
                "/latest/api/token",
                &[(TTL_HEADER, "60"), ("x-forwarded-for", "1.2.3.4")],
            ),
        );
        assert_eq!(xff.status(), StatusCode::FORBIDDEN);
        let versioned = respond(
            &s,
            &request("PUT", "/2021-03-23/api/token", &[(TTL_HEADER, "60")]),
        );
        assert_eq!(versioned.status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn tokens_gate_reads_when_required() {
        let s = state(true);
        let id = "/latest/meta-data/instance-id";
        assert_eq!(
            respond(&s, &request("GET", id, &[])).status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            respond(&s, &request("GET", id, &[(TOKEN_HEADER, "nope")])).status(),
            StatusCode::UNAUTHORIZED
        );
        s.tokens
            .lock()
            .unwrap()
            .insert("t".into(), Instant::now() + Duration::from_secs(60));
        assert_eq!(
            respond(&s, &request("GET", id, &[(TOKEN_HEADER, "t")])).status(),
            StatusCode::OK
        );
        s.tokens
            .lock()
            .unwrap()
            .insert("old".into(), Instant::now() - Duration::from_secs(1));
        assert_eq!(
            respond(&s, &request("GET", id, &[(TOKEN_HEADER, "old")])).status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            respond(&state(false), &request("GET", id, &[])).status(),
            StatusCode::OK
        );
    }

    #[test]
    fn tree_listings_and_unknown_paths() {
        let s = state(false);
        let get = |p: &str| respond(&s, &request("GET", p, &[])).status();
        assert_eq!(get("/latest/meta-data/"), StatusCode::OK);
        assert_eq!(
            get("/latest/meta-data/iam/security-credentials/demo-node-role"),
            StatusCode::OK
        );
        assert_eq!(
            get("/latest/meta-data/iam/security-credentials/demo-node-role/"),
            StatusCode::OK
        );
        assert_eq!(get("/latest/meta-data/nope"), StatusCode::NOT_FOUND);
        assert_eq!(
            respond(&s, &request("POST", "/latest/meta-data/", &[])).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
