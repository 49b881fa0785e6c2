//! The shape phase: a listing the caller may read is filtered to the entries it may read, so
//! that no listing discloses a name (a role, a service account) the policy hides.

use http::{Response, StatusCode, header};
use http_body_util::BodyExt as _;

use super::{Body, forward::UpstreamError, full_body, request::ValidRequest};

/// A listing larger than this is refused (502) rather than passed unfiltered, so that no
/// listing can carry a name the caller may not see.
const MAX_LISTING_BYTES: usize = 1 << 20;

/// A directory listing: a successful GET of a path ending in `/`, as plain text.
pub fn is_listing(request: &ValidRequest, response: &Response<Body>) -> bool {
    request.method == http::Method::GET
        && request.path.ends_with('/')
        && response.status() == StatusCode::OK
        && response
            .headers()
            .get(header::CONTENT_TYPE)
            .is_none_or(|t| t.as_bytes().starts_with(b"text/plain"))
}

/// Keeps the listing's lines for which `visible` holds; the rest of the response is unchanged
/// (the length is recomputed).
pub async fn filter_listing(
    response: Response<Body>,
    visible: impl Fn(&str) -> bool,
) -> Result<Response<Body>, UpstreamError> {
    let (mut parts, body) = response.into_parts();
    let limited = http_body_util::Limited::new(body, MAX_LISTING_BYTES);
    let bytes = limited
        .collect()
        .await
        .map_err(|_| UpstreamError::ListingTooLarge)?
        .to_bytes();
    let text = std::str::from_utf8(&bytes).map_err(|_| UpstreamError::ListingNotUtf8)?;
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| !line.is_empty() && visible(line))
        .collect();
    let filtered = kept.join("\n");
    parts.headers.remove(header::CONTENT_LENGTH);
    Ok(Response::from_parts(parts, full_body(filtered)))
}
