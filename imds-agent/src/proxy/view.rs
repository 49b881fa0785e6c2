//! The view phase: an allowed answer cut to the caller's view (`policy::View`, applied by
//! `reduce`): only the keys of user data the caller may read, a document without the fields
//! the view removes. An answer that cannot be cut is refused whole.

use http::{Response, StatusCode, header};
use http_body_util::BodyExt as _;

use super::{Body, forward::UpstreamError, full_body};
use crate::{
    policy::{CanonicalPath, View},
    reduce::{self, Unservable},
};

/// An answer larger than this is refused rather than passed uncut (user data is at most
/// 16 KiB on EC2 and 64 KiB on Azure; instance documents are a few KiB).
const MAX_VIEWED_BYTES: usize = 1 << 20;

/// Why a viewed answer is not served.
pub enum ViewFailure {
    Upstream(UpstreamError),
    Unservable(Unservable),
}

/// `response`, the answer to `method` `path`, cut to `view`, and what the view kept (for the
/// audit line). Only a successful answer is cut; errors pass as they are. A HEAD answer
/// loses its length and ETag, which would describe the whole.
pub async fn apply(
    view: &View,
    method: &http::Method,
    path: &CanonicalPath<'_>,
    response: Response<Body>,
) -> Result<(Response<Body>, String), ViewFailure> {
    if response.status() != StatusCode::OK || !view.cuts(path) {
        return Ok((response, String::new()));
    }
    let (mut parts, body) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::ETAG);
    if method == http::Method::HEAD {
        return Ok((
            Response::from_parts(parts, body),
            "view: length withheld".into(),
        ));
    }
    let bytes = http_body_util::Limited::new(body, MAX_VIEWED_BYTES)
        .collect()
        .await
        .map_err(|_| ViewFailure::Upstream(UpstreamError::ViewedTooLarge))?
        .to_bytes();
    let reduced = reduce::reduce(view, path, &bytes).map_err(ViewFailure::Unservable)?;
    Ok((
        Response::from_parts(parts, full_body(reduced.body)),
        format!("view: {}", reduced.summary),
    ))
}
