//! Strict checks on a parsed request, and the canonical request forwarded upstream.
//!
//! The decision and the forwarded bytes come from the same parse: what is forwarded is built
//! from the validated method, path, query and an explicit set of headers, never copied from
//! the client's bytes.

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Version, header};

use crate::policy::{CanonicalPath, PathError};

/// Why a request is refused before policy is consulted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    /// Fixed text: never includes request bytes.
    pub reason: &'static str,
    /// For the audit log only (not sent to the client).
    pub detail: Option<String>,
}

impl Rejection {
    fn bad(reason: &'static str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            reason,
            detail: None,
        }
    }
}

/// A request that passed every check, ready for policy and forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidRequest {
    pub method: Method,
    pub path: String,
    /// The query's parameters, decoded, names as written (see [`query_params`]).
    pub params: Vec<(String, String)>,
    /// The query forwarded: rebuilt from `params`, never the client's bytes (`None` without
    /// parameters).
    pub query: Option<String>,
    /// End-to-end headers to forward (no Host, no hop-by-hop headers).
    pub headers: HeaderMap,
}

impl ValidRequest {
    pub fn canonical_path(&self) -> CanonicalPath<'_> {
        CanonicalPath::parse(&self.path).expect("validated at construction")
    }

    /// Whether the answer may hold a whole subtree (GCP's `recursive=true`; any value but
    /// `false` is taken as true, the safe side). Names are read as the service reads them,
    /// percent-decoded: `%72ecursive=true` is recursive too. A directory asked for as JSON
    /// (`alt=json`) counts too: its answer is not the text listing that the shape phase
    /// filters, so it is decided as the subtree it may name.
    pub fn is_recursive(&self) -> bool {
        let param = |wanted: &str, holds: &dyn Fn(&str) -> bool| {
            self.params
                .iter()
                .any(|(name, value)| name.eq_ignore_ascii_case(wanted) && holds(value))
        };
        param("recursive", &|v| !v.eq_ignore_ascii_case("false"))
            || (self.path.ends_with('/') && param("alt", &|v| !v.eq_ignore_ascii_case("text")))
    }

    pub fn target(&self) -> String {
        match &self.query {
            Some(query) => format!("{}?{query}", self.path),
            None => self.path.clone(),
        }
    }
}

/// Headers that proxies use to claim a client address. The metadata services reject requests
/// carrying them (AWS on the token PUT, GCP, Azure, OCI); so does the filter, for every request.
const FORWARDING_HEADERS: [HeaderName; 4] = [
    HeaderName::from_static("x-forwarded-for"),
    header::FORWARDED,
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-real-ip"),
];

/// Hop-by-hop headers (RFC 9110 7.6.1): about this connection, never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

pub fn validate<B>(request: &Request<B>) -> Result<ValidRequest, Rejection> {
    if !matches!(request.version(), Version::HTTP_10 | Version::HTTP_11) {
        return Err(Rejection::bad("unsupported HTTP version"));
    }
    let uri = request.uri();
    // Only origin-form: absolute-form, authority-form (CONNECT) and asterisk-form name a target
    // other than this metadata service, or none.
    if uri.scheme().is_some() || uri.authority().is_some() || *request.method() == Method::CONNECT {
        return Err(Rejection::bad(
            "only origin-form request targets are accepted",
        ));
    }
    let path = uri.path();
    if let Err(error) = CanonicalPath::check(path) {
        return Err(Rejection {
            detail: Some(path_error_detail(&error)),
            ..Rejection::bad("invalid request path")
        });
    }
    let mut params = Vec::new();
    if let Some(query) = uri.query() {
        if !query.bytes().all(is_query_byte) {
            return Err(Rejection::bad("invalid query string"));
        }
        params = query_params(query)
            .map_err(|()| Rejection::bad("invalid percent-encoding in the query string"))?;
        // Azure's service refuses a name given twice; anywhere, the filter and the service
        // could each read a different one of them. Two spellings of one name count as one.
        let mut names: Vec<String> = params
            .iter()
            .map(|(name, _)| name.to_ascii_lowercase())
            .collect();
        names.sort_unstable();
        if names.windows(2).any(|pair| pair[0] == pair[1]) {
            return Err(Rejection::bad("duplicate query parameter"));
        }
    }
    let query = (!params.is_empty()).then(|| rebuild_query(&params));

    let headers = request.headers();
    if FORWARDING_HEADERS.iter().any(|h| headers.contains_key(h)) {
        return Err(Rejection {
            status: StatusCode::FORBIDDEN,
            reason: "requests carrying forwarding headers are refused",
            detail: None,
        });
    }
    let hosts = headers.get_all(header::HOST).iter().count();
    if hosts > 1 || (hosts == 0 && request.version() == Version::HTTP_11) {
        return Err(Rejection::bad("exactly one Host header is required"));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return Err(Rejection::bad("request bodies are not accepted"));
    }
    let lengths: Vec<&HeaderValue> = headers.get_all(header::CONTENT_LENGTH).iter().collect();
    if lengths.len() > 1 || lengths.first().is_some_and(|v| v.as_bytes() != b"0") {
        return Err(Rejection::bad("request bodies are not accepted"));
    }
    if headers.contains_key(header::UPGRADE) {
        return Err(Rejection::bad("protocol upgrades are not accepted"));
    }
    // A Connection header may only say keep-alive or close: anything else would nominate an
    // end-to-end header (a token, say) for removal between client and service.
    for value in headers.get_all(header::CONNECTION) {
        let ok = value.to_str().is_ok_and(|v| {
            v.split(',')
                .map(str::trim)
                .all(|t| t.eq_ignore_ascii_case("keep-alive") || t.eq_ignore_ascii_case("close"))
        });
        if !ok {
            return Err(Rejection::bad("Connection may only be keep-alive or close"));
        }
    }

    let mut forwarded = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if !HOP_BY_HOP.contains(&name.as_str()) && name != header::CONTENT_LENGTH {
            forwarded.append(name.clone(), value.clone());
        }
    }
    Ok(ValidRequest {
        method: request.method().clone(),
        path: path.to_owned(),
        params,
        query,
        headers: forwarded,
    })
}

/// Query strings are forwarded as received once every byte is in this set (RFC 3986 query
/// characters); `#`, spaces, quotes, backslashes, controls and non-ASCII are refused.
fn is_query_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

/// A query's parameters as the services' parsers read them (Go's `url.ParseQuery` on GCP):
/// names and values percent-decoded, `+` as a space. Empty pairs (`a=1&&b=2`) are skipped.
/// An invalid escape is an error.
fn query_params(query: &str) -> Result<Vec<(String, String)>, ()> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((percent_decode(name)?, percent_decode(value)?))
        })
        .collect()
}

/// The query forwarded for `params`: `name=value` pairs joined by `&`, every byte but the
/// unreserved ones (RFC 3986) percent-encoded, so that the service decodes exactly the
/// values the filter read, whatever the client's spelling.
fn rebuild_query(params: &[(String, String)]) -> String {
    let encode = |text: &str, out: &mut String| {
        for &b in text.as_bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    };
    let mut query = String::new();
    for (i, (name, value)) in params.iter().enumerate() {
        if i > 0 {
            query.push('&');
        }
        encode(name, &mut query);
        query.push('=');
        encode(value, &mut query);
    }
    query
}

fn percent_decode(text: &str) -> Result<String, ()> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(())?;
                let hex = std::str::from_utf8(hex).map_err(|_| ())?;
                decoded.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
                i += 3;
            }
            b'+' => {
                decoded.push(b' ');
                i += 1;
            }
            b => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    Ok(String::from_utf8_lossy(&decoded).into_owned())
}

fn path_error_detail(error: &PathError) -> String {
    error.to_string()
}

/// Removes hop-by-hop headers from an upstream response before it is relayed; hyper frames
/// the relayed body itself.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the few headers a metadata answer has (usually none of them hop-by-hop,
    // and then nothing is allocated), rather than a lookup per hop-by-hop name.
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|name| *name != header::HOST && HOP_BY_HOP.contains(&name.as_str()))
        .cloned()
        .collect();
    for name in present {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, target: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().method(method).uri(target);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    fn rejected(request: Request<()>) -> (StatusCode, &'static str) {
        let r = validate(&request).expect_err("request should be rejected");
        (r.status, r.reason)
    }

    const HOST: (&str, &str) = ("host", "169.254.169.254");

    #[test]
    fn forwards_only_end_to_end_headers() {
        let request = req(
            "GET",
            "/latest/meta-data/?x=1",
            &[
                HOST,
                ("x-aws-ec2-metadata-token", "t"),
                ("connection", "keep-alive"),
                ("user-agent", "curl"),
            ],
        );
        let valid = validate(&request).unwrap();
        assert_eq!(valid.path, "/latest/meta-data/");
        assert_eq!(valid.query.as_deref(), Some("x=1"));
        assert_eq!(valid.target(), "/latest/meta-data/?x=1");
        let names: Vec<&str> = valid.headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-aws-ec2-metadata-token", "user-agent"]);
    }

    #[test]
    fn rejects_what_could_be_read_two_ways() {
        let bad = StatusCode::BAD_REQUEST;
        assert_eq!(rejected(req("GET", "http://evil/latest", &[HOST])).0, bad);
        assert_eq!(rejected(req("GET", "/latest//meta-data", &[HOST])).0, bad);
        assert_eq!(
            rejected(req("GET", "/latest/meta-data/%69am", &[HOST])).0,
            bad
        );
        assert_eq!(
            rejected(req("GET", "/latest", &[])).0,
            bad,
            "HTTP/1.1 needs Host"
        );
        assert_eq!(rejected(req("GET", "/latest", &[HOST, HOST])).0, bad);
        assert_eq!(
            rejected(req(
                "PUT",
                "/latest/api/token",
                &[HOST, ("content-length", "5")]
            ))
            .0,
            bad
        );
        assert_eq!(
            rejected(req(
                "PUT",
                "/latest/api/token",
                &[HOST, ("transfer-encoding", "chunked")]
            ))
            .0,
            bad
        );
        assert_eq!(
            rejected(req("GET", "/latest", &[HOST, ("upgrade", "h2c")])).0,
            bad
        );
        assert_eq!(
            rejected(req(
                "GET",
                "/latest",
                &[HOST, ("connection", "x-aws-ec2-metadata-token")]
            ))
            .0,
            bad
        );
        assert_eq!(rejected(req("GET", "/latest?a={", &[HOST])).0, bad);
    }

    #[test]
    fn a_query_parameter_named_twice_is_refused_however_spelt() {
        for query in [
            "api-version=2021-02-01&api-version=2017-08-01",
            "recursive=false&recursive=true",
            "recursive=false&Recursive=true",
            "recursive=false&%72ecursive=true",
        ] {
            let (status, reason) =
                rejected(req("GET", &format!("/metadata/instance?{query}"), &[HOST]));
            assert_eq!(
                (status, reason),
                (StatusCode::BAD_REQUEST, "duplicate query parameter"),
                "{query}"
            );
        }
        for query in ["a=%zz", "a=%4"] {
            assert_eq!(
                rejected(req("GET", &format!("/latest?{query}"), &[HOST])).0,
                StatusCode::BAD_REQUEST,
                "{query}"
            );
        }
        let fine = req(
            "GET",
            "/metadata/instance?api-version=2021-02-01&format=text&&",
            &[HOST],
        );
        assert!(validate(&fine).is_ok());
    }

    #[test]
    fn forwarding_headers_are_forbidden() {
        for name in FORWARDING_HEADERS {
            let (status, _) = rejected(req(
                "PUT",
                "/latest/api/token",
                &[HOST, (name.as_str(), "1.2.3.4")],
            ));
            assert_eq!(status, StatusCode::FORBIDDEN, "{name}");
        }
    }

    #[test]
    fn an_empty_body_is_fine() {
        let request = req("PUT", "/latest/api/token", &[HOST, ("content-length", "0")]);
        assert!(validate(&request).is_ok());
    }

    #[test]
    fn recursive_means_anything_but_false() {
        let with = |query: &str| {
            validate(&req(
                "GET",
                &format!("/computeMetadata/v1/instance/?{query}"),
                &[HOST],
            ))
            .expect("a valid query")
        };
        for (query, recursive) in [
            ("recursive=true", true),
            ("alt=json&recursive=TRUE", true),
            ("recursive", true),
            ("recursive=1", true),
            ("recursive=false", false),
            ("nonrecursive=true", false),
            // As GCP's server decodes it.
            ("%72ecursive=true", true),
            ("RECURSIVE=true", true),
            ("recursive=fals%65", false),
            // A directory as JSON may name what its text listing would have hidden.
            ("alt=json", true),
            ("alt=text", false),
        ] {
            assert_eq!(with(query).is_recursive(), recursive, "{query}");
        }
        let leaf = validate(&req(
            "GET",
            "/computeMetadata/v1/instance/id?alt=json",
            &[HOST],
        ))
        .expect("a valid query");
        assert!(!leaf.is_recursive());
    }

    #[test]
    fn the_forwarded_query_is_rebuilt_from_what_was_read() {
        for (received, forwarded) in [
            ("alt=json&recursive=true", "alt=json&recursive=true"),
            // One spelling of each value, whatever the client's.
            (
                "resource=https://management.azure.com/&api-version=2018-02-01",
                "resource=https%3A%2F%2Fmanagement.azure.com%2F&api-version=2018-02-01",
            ),
            ("%72ecursive=tru%65", "recursive=true"),
            ("a=b+c&&d", "a=b%20c&d="),
            ("x=%2526", "x=%2526"),
        ] {
            let valid = validate(&req("GET", &format!("/m?{received}"), &[HOST])).unwrap();
            assert_eq!(valid.query.as_deref(), Some(forwarded), "{received}");
            assert_eq!(valid.target(), format!("/m?{forwarded}"));
        }
        let bare = validate(&req("GET", "/m?", &[HOST])).unwrap();
        assert_eq!((bare.target(), bare.query), ("/m".to_owned(), None));
    }
}
