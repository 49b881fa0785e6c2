//! Every answer the agent gives itself, rendered in one place: a typed refusal carries its own
//! status and body, fixed text or names from policy files, never request bytes.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};

use super::{Body, forward::UpstreamError, full_body, gate::Violation, limits, request::Rejection};
use crate::{
    provider::{ProtocolRefusal, Provider},
    reduce::Unservable,
};

/// Why the agent answers a request itself instead of the metadata service.
#[derive(Debug)]
pub enum Refusal<'a> {
    /// The caller's in-flight or rate limit.
    Limit(limits::Refusal),
    /// The gate refused the raw request head.
    Malformed(Violation),
    /// The parsed request is not one the agent forwards.
    Invalid(Rejection),
    /// The cloud's own request rules (a required header, a closed legacy tree).
    Protocol(ProtocolRefusal),
    /// A policy denies the request.
    Denied {
        policy: &'a str,
        rule: &'a str,
        /// Why, for `--explain-denials`.
        explanation: Option<String>,
    },
    /// The session token, or its absence, is refused (as the metadata service answers a
    /// missing or invalid token, so SDKs fetch a new one and retry).
    Token { policy: &'a str, rule: &'a str },
    /// The metadata service did not answer usably.
    Upstream(UpstreamError),
    /// The policy allows the answer only through a view, and the answer cannot be cut to it
    /// (user data in a format no view takes apart, none of the granted keys in it).
    Unviewable {
        policy: &'a str,
        rule: &'a str,
        reason: Unservable,
        /// Whether the answer says why (`--explain-denials`).
        explain: bool,
    },
}

/// `--explain-denials`: why a request was denied, every policy's part in one line.
const EXPLAIN_HEADER: &str = "imds-agent-explain";
/// The header that carries the request id on the agent's own answers.
const REQUEST_ID_HEADER: &str = "imds-agent-request-id";

impl Refusal<'_> {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Limit(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Malformed(violation) => violation.status(),
            Self::Invalid(rejection) => rejection.status,
            Self::Protocol(refusal) => {
                StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::FORBIDDEN)
            }
            Self::Denied { .. } | Self::Unviewable { .. } => StatusCode::FORBIDDEN,
            Self::Token { .. } => StatusCode::UNAUTHORIZED,
            Self::Upstream(error) => error.status(),
        }
    }

    /// The decision the audit line and metrics name.
    pub fn decision(&self) -> &'static str {
        match self {
            Self::Limit(_) => "limit",
            Self::Malformed(_) | Self::Invalid(_) | Self::Protocol(_) => "reject",
            Self::Denied { .. } | Self::Token { .. } | Self::Unviewable { .. } => "deny",
            // The policy allowed; the audit names its decision (see `pipeline`).
            Self::Upstream(_) => "allow",
        }
    }

    /// The policy and rule that refused, for those a policy made.
    pub fn policy_and_rule(&self) -> (&str, &str) {
        match self {
            Self::Denied { policy, rule, .. }
            | Self::Token { policy, rule }
            | Self::Unviewable { policy, rule, .. } => (policy, rule),
            _ => ("", ""),
        }
    }

    /// What the audit line adds (never sent to the client).
    pub fn detail(&self) -> String {
        match self {
            Self::Limit(refusal) => limit_reason(*refusal).to_owned(),
            Self::Malformed(violation) => violation.to_string(),
            Self::Invalid(rejection) => rejection
                .detail
                .clone()
                .unwrap_or_else(|| rejection.reason.to_owned()),
            Self::Protocol(refusal) => refusal.reason.to_owned(),
            Self::Denied { .. } | Self::Token { .. } => String::new(),
            Self::Upstream(error) => error.to_string(),
            Self::Unviewable { reason, .. } => reason.to_string(),
        }
    }

    fn body(&self) -> String {
        match self {
            Self::Limit(refusal) => format!("imds-agent: {}\n", limit_reason(*refusal)),
            Self::Malformed(violation) => format!("imds-agent: bad request: {violation}\n"),
            Self::Invalid(rejection) => format!("imds-agent: bad request: {}\n", rejection.reason),
            Self::Protocol(refusal) => format!("imds-agent: {}\n", refusal.reason),
            Self::Denied { policy, rule, .. } => {
                format!("imds-agent: denied by policy '{policy}' rule '{rule}'\n")
            }
            Self::Token { policy, rule } => {
                format!("imds-agent: session token refused by policy '{policy}' rule '{rule}'\n")
            }
            Self::Upstream(error) => format!("imds-agent: metadata service unavailable: {error}\n"),
            Self::Unviewable { policy, rule, .. } => format!(
                "imds-agent: denied by policy '{policy}' rule '{rule}': the answer cannot be cut \
                 to this caller's view\n"
            ),
        }
    }

    /// The answer, shaped for `provider`'s clients, carrying `request_id`.
    pub fn answer(&self, provider: Provider, request_id: &str) -> Answer {
        let mut answer = Answer::new(provider, self.status(), self.body());
        if let Ok(id) = HeaderValue::from_str(request_id) {
            answer.headers.insert(REQUEST_ID_HEADER, id);
        }
        match self {
            Self::Limit(_) | Self::Upstream(UpstreamError::OverBudget) => {
                answer
                    .headers
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Self::Malformed(_) => {
                // Nothing more is read from this connection.
                answer
                    .headers
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Self::Denied {
                explanation: Some(explanation),
                ..
            } => {
                if let Some(value) = explain_header(explanation) {
                    answer.headers.insert(EXPLAIN_HEADER, value);
                }
            }
            Self::Unviewable {
                reason,
                explain: true,
                ..
            } => {
                if let Some(value) = explain_header(&reason.to_string()) {
                    answer.headers.insert(EXPLAIN_HEADER, value);
                }
            }
            _ => {}
        }
        answer
    }
}

fn limit_reason(refusal: limits::Refusal) -> &'static str {
    match refusal {
        limits::Refusal::TooManyInFlight => "too many requests in flight from this caller",
        limits::Refusal::RateExceeded => "request rate exceeded for this caller",
    }
}

/// An answer of the agent's own: status, headers, body.
pub struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    /// In the shape the provider's clients read: Azure's read an error body as JSON (`error`,
    /// `error_description`, as IMDS writes them) and report a body they cannot parse as
    /// "unavailable" without its reason; the other clouds' read text.
    pub fn new(provider: Provider, status: StatusCode, body: String) -> Self {
        let (content_type, body) = if provider == Provider::Azure {
            let error = status
                .canonical_reason()
                .unwrap_or("error")
                .to_ascii_lowercase()
                .replace(' ', "_");
            let json = serde_json::json!({"error": error, "error_description": body.trim_end()});
            ("application/json; charset=utf-8", json.to_string())
        } else {
            ("text/plain; charset=utf-8", body)
        };
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        Self {
            status,
            headers,
            body: Bytes::from(body),
        }
    }

    /// As hyper sends it.
    pub fn into_response(self) -> Response<Body> {
        let mut response = Response::new(full_body(self.body));
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        response
    }

    /// As bytes on a connection hyper no longer serves (a refused head, a refused
    /// connection), which is closed after it.
    pub fn into_bytes(self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\n",
            self.status.as_str(),
            self.status.canonical_reason().unwrap_or("")
        )
        .into_bytes();
        for (name, value) in &self.headers {
            if name != header::CONNECTION {
                out.extend_from_slice(name.as_str().as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(value.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
        out.extend_from_slice(
            format!(
                "content-length: {}\r\nconnection: close\r\n\r\n",
                self.body.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(&self.body);
        out
    }
}

/// The explanation's lines joined by "; ", limited to visible ASCII and 4 KiB.
fn explain_header(explanation: &str) -> Option<HeaderValue> {
    let mut line: String = explanation
        .lines()
        .collect::<Vec<_>>()
        .join("; ")
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    line.truncate(4096);
    HeaderValue::from_str(&line).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_head_is_answered_as_http_and_closes() {
        let bytes = Refusal::Malformed(Violation::BareLineBreak)
            .answer(Provider::Aws, "id-1")
            .into_bytes();
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        assert!(
            text.contains("\r\nimds-agent-request-id: id-1\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nconnection: close\r\n\r\n"), "{text}");
        assert!(text.ends_with("imds-agent: bad request: bare CR or LF in the request head\n"));
        assert_eq!(text.matches("connection:").count(), 1, "{text}");
    }

    #[test]
    fn azure_clients_read_refusals_as_json() {
        let response = Refusal::Denied {
            policy: "p",
            rule: "r",
            explanation: None,
        }
        .answer(Provider::Azure, "id")
        .into_bytes();
        let text = String::from_utf8(response).unwrap();
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "forbidden");
        assert_eq!(
            json["error_description"],
            "imds-agent: denied by policy 'p' rule 'r'"
        );
    }
}
