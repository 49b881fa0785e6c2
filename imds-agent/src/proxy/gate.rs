//! A strict gate in front of hyper: each request head is read whole, checked byte by byte,
//! and only then handed to hyper. hyper's parser is lenient where a smuggling attack lives
//! (bare LF line endings, for one) and forgets what it tolerated once parsed, so these rules
//! are checked on the raw bytes:
//!
//! - request line `METHOD SP origin-form SP HTTP/1.0|HTTP/1.1 CRLF`, no more than
//!   [`MAX_REQUEST_LINE`] bytes (else 414);
//! - every line ends in CRLF: no bare CR, no bare LF; no obs-fold; no whitespace before a
//!   colon; header names are tokens; values have no control bytes but HTAB;
//! - at most [`MAX_HEADERS`] headers and [`MAX_HEAD`] bytes (else 431);
//! - no Transfer-Encoding, Content-Length only `0` and once, one Host, no Upgrade or Expect,
//!   no duplicated security header (tokens, TTLs, Metadata-Flavor, ...).
//!
//! Because requests carry no body, a head's end is the start of the next pipelined request,
//! so every request on a connection passes the gate.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf as _, BytesMut};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub const MAX_REQUEST_LINE: usize = 8 * 1024;
pub const MAX_HEAD: usize = 16 * 1024;
pub const MAX_HEADERS: usize = 64;
/// Room made for each read from the client: a request head is a few hundred bytes.
const READ_SIZE: usize = 4096;

/// Headers that carry a credential or a security decision: exactly one of each, or none.
const SECURITY_HEADERS: [&str; 9] = [
    "x-aws-ec2-metadata-token",
    "x-aws-ec2-metadata-token-ttl-seconds",
    "metadata-flavor",
    "x-google-metadata-request",
    "metadata",
    "authorization",
    "x-aliyun-ecs-metadata-token",
    "x-aliyun-ecs-metadata-token-ttl-seconds",
    "x-forwarded-for",
];

/// Why a request head is refused. The text is fixed (never request bytes): it is the reason
/// the client reads and the audit line names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("bare CR or LF in the request head")]
    BareLineBreak,
    #[error("malformed request line")]
    MalformedRequestLine,
    #[error("only origin-form request targets are accepted")]
    NotOriginForm,
    #[error("unsupported HTTP version")]
    UnsupportedVersion,
    #[error("obsolete line folding")]
    ObsoleteLineFolding,
    #[error("whitespace before a colon or in a header name")]
    MalformedHeaderName,
    #[error("control character in a header value")]
    ControlCharacter,
    #[error("request bodies are not accepted")]
    Body,
    #[error("duplicate Content-Length")]
    DuplicateContentLength,
    #[error("exactly one Host header is required")]
    Host,
    #[error("protocol upgrades are not accepted")]
    Upgrade,
    #[error("duplicate security header")]
    DuplicateSecurityHeader,
    #[error("request line too long")]
    RequestLineTooLong,
    #[error("request head too large")]
    HeadTooLarge,
    #[error("too many headers")]
    TooManyHeaders,
    #[error("request head timed out")]
    HeadTimedOut,
    #[error("Expect is not accepted")]
    Expect,
    #[error("malformed header line")]
    MalformedHeaderLine,
    #[error("method not accepted")]
    Method,
}

impl Violation {
    pub fn status(self) -> StatusCode {
        match self {
            Self::RequestLineTooLong => StatusCode::URI_TOO_LONG,
            Self::HeadTooLarge | Self::TooManyHeaders => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            Self::HeadTimedOut => StatusCode::REQUEST_TIMEOUT,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Where the head ends (the index after CRLFCRLF), if it is complete in `buffer`.
pub fn head_end(buffer: &[u8]) -> Option<usize> {
    memchr::memmem::find(buffer, b"\r\n\r\n").map(|i| i + 4)
}

/// The index of the first CR not followed by LF, or LF not preceded by CR. A CR at the very
/// end may still be followed by its LF. Only CRs and LFs are visited (memchr), not every
/// byte: heads are checked per request.
fn first_bare_line_break(bytes: &[u8]) -> Option<usize> {
    memchr::memchr2_iter(b'\r', b'\n', bytes).find(|&i| {
        if bytes[i] == b'\n' {
            i == 0 || bytes[i - 1] != b'\r'
        } else {
            bytes.get(i + 1).is_some_and(|n| *n != b'\n')
        }
    })
}

/// Checks a complete head (ending in CRLFCRLF).
pub fn check_head(head: &[u8]) -> Result<(), Violation> {
    // Every CR is followed by LF and every LF is preceded by CR (a CR at the very end is bare
    // here: a complete head ends in LF). A head too large is refused as that first.
    if head.len() <= MAX_HEAD
        && (first_bare_line_break(head).is_some() || head.last() == Some(&b'\r'))
    {
        return Err(Violation::BareLineBreak);
    }
    check_paired_head(head)
}

/// Checks a complete head whose line breaks are known to be CRLF pairs: the rest of
/// [`check_head`], for the gate, which has scanned the line breaks already.
fn check_paired_head(head: &[u8]) -> Result<(), Violation> {
    if head.len() > MAX_HEAD {
        return Err(Violation::HeadTooLarge);
    }
    let text = &head[..head.len() - 4];
    let mut lines = text
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    check_request_line(request_line)?;

    let mut count = 0;
    let (mut hosts, mut lengths) = (0, 0);
    let mut seen_security = [false; SECURITY_HEADERS.len()];
    for line in lines {
        count += 1;
        if count > MAX_HEADERS {
            return Err(Violation::TooManyHeaders);
        }
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            return Err(Violation::ObsoleteLineFolding);
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(Violation::MalformedHeaderLine)?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.is_empty() || !name.iter().all(|&b| is_token_byte(b)) {
            return Err(Violation::MalformedHeaderName);
        }
        if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(Violation::ControlCharacter);
        }
        // Compared without regard to case, and without a lower-cased copy.
        let is = |known: &str| name.eq_ignore_ascii_case(known.as_bytes());
        let value = trim_ows(value);
        if is("transfer-encoding") {
            return Err(Violation::Body);
        } else if is("content-length") {
            lengths += 1;
            if lengths > 1 {
                return Err(Violation::DuplicateContentLength);
            }
            if value != b"0" {
                return Err(Violation::Body);
            }
        } else if is("host") {
            hosts += 1;
        } else if is("upgrade") || is("http2-settings") {
            return Err(Violation::Upgrade);
        } else if is("expect") {
            return Err(Violation::Expect);
        }
        if let Some(i) = SECURITY_HEADERS.iter().position(|h| is(h)) {
            if seen_security[i] {
                return Err(Violation::DuplicateSecurityHeader);
            }
            seen_security[i] = true;
        }
    }
    let http11 = request_line.ends_with(b"HTTP/1.1");
    if hosts > 1 || (hosts == 0 && http11) {
        return Err(Violation::Host);
    }
    Ok(())
}

fn trim_ows(value: &[u8]) -> &[u8] {
    let start = value
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(start, |i| i + 1);
    &value[start..end]
}

fn check_request_line(line: &[u8]) -> Result<(), Violation> {
    if line.len() > MAX_REQUEST_LINE {
        return Err(Violation::RequestLineTooLong);
    }
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Violation::MalformedRequestLine);
    };
    if method.is_empty() || !method.iter().all(|&b| is_token_byte(b)) {
        return Err(Violation::MalformedRequestLine);
    }
    if method == b"CONNECT" || method == b"PRI" {
        return Err(Violation::Method);
    }
    if version != b"HTTP/1.1" && version != b"HTTP/1.0" {
        return Err(Violation::UnsupportedVersion);
    }
    if target.first() != Some(&b'/') {
        return Err(Violation::NotOriginForm);
    }
    // RFC 3986 path and query characters only: no fragment, quotes, backslashes, spaces,
    // brackets or non-ASCII (each a way for two parsers to read one target differently).
    if !target
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b))
    {
        return Err(Violation::MalformedRequestLine);
    }
    Ok(())
}

/// Timeouts the gate enforces while reading heads.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From a head's first byte to its last (slowloris).
    pub head: Duration,
    /// Between requests on a keep-alive connection (and before the first).
    pub idle: Duration,
}

/// The gate as an I/O wrapper: reads are served from checked heads only; writes pass through.
pub struct Gate<S> {
    inner: S,
    timeouts: Timeouts,
    /// Bytes read but not yet checked (the head in progress). Read into its spare capacity:
    /// no buffer is zeroed or copied per read.
    pending: BytesMut,
    /// Checked bytes not yet handed to hyper.
    ready: BytesMut,
    /// After a violation or EOF: nothing more is read from the client.
    closed: bool,
    /// What stopped the reading, when a head was refused: answered once hyper has answered
    /// the requests before it.
    violation: Option<Violation>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether `deadline` is set for the head in progress or the wait for the next one (else
    /// it is reset before it is polled again).
    armed: bool,
    /// Whether the deadline is the head timeout (a head is in progress) or the idle one.
    in_head: bool,
}

impl<S> Gate<S> {
    pub fn new(inner: S, timeouts: Timeouts) -> Self {
        Self {
            inner,
            timeouts,
            pending: BytesMut::new(),
            ready: BytesMut::new(),
            closed: false,
            violation: None,
            deadline: None,
            armed: false,
            in_head: false,
        }
    }

    /// The refused head, if reading stopped at one.
    pub fn violation(&self) -> Option<Violation> {
        self.violation
    }

    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Stops reading from the client: the heads already checked are still handed on (earlier
    /// pipelined requests are still answered), then the client's stream ends there.
    fn reject(&mut self, violation: Violation) {
        self.violation = Some(violation);
        self.pending.clear();
        self.closed = true;
        self.deadline = None;
        self.armed = false;
    }

    /// Moves complete, checked heads from `pending` to `ready`. A bare CR or LF rejects at
    /// once (with them a head might never "complete"), after the heads before it.
    fn check_pending(&mut self) {
        loop {
            let bare = first_bare_line_break(&self.pending);
            match head_end(&self.pending) {
                Some(end) if bare.is_none_or(|b| b >= end) => {
                    // No bare CR or LF before the end, and the head ends in LF.
                    if let Err(violation) = check_paired_head(&self.pending[..end]) {
                        self.reject(violation);
                        return;
                    }
                    if self.ready.is_empty() && end == self.pending.len() {
                        // The usual case, one whole head read: handed over without a copy.
                        std::mem::swap(&mut self.ready, &mut self.pending);
                    } else {
                        self.ready.extend_from_slice(&self.pending[..end]);
                        self.pending.advance(end);
                    }
                }
                _ if bare.is_some() => {
                    self.reject(Violation::BareLineBreak);
                    return;
                }
                _ => break,
            }
        }
        // An incomplete head that is already too large, or a request line that is too long.
        if self.pending.len() > MAX_HEAD {
            self.reject(Violation::HeadTooLarge);
        } else if !self.pending.contains(&b'\n') && self.pending.len() > MAX_REQUEST_LINE {
            self.reject(Violation::RequestLineTooLong);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Gate<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.ready.is_empty() {
                let n = out.remaining().min(this.ready.len());
                out.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.closed {
                return Poll::Ready(Ok(()));
            }
            // Arm the right timer: the head timeout while a head is in progress, else idle.
            let in_head = !this.pending.is_empty();
            if !this.armed || in_head != this.in_head {
                let timeout = if in_head {
                    this.timeouts.head
                } else {
                    this.timeouts.idle
                };
                let deadline = tokio::time::Instant::now() + timeout;
                // One timer per connection, moved for each head rather than made anew.
                match this.deadline.as_mut() {
                    Some(sleep) => sleep.as_mut().reset(deadline),
                    None => this.deadline = Some(Box::pin(tokio::time::sleep_until(deadline))),
                }
                this.armed = true;
                this.in_head = in_head;
            }
            this.pending.reserve(READ_SIZE);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.pending) {
                Poll::Ready(Ok(read)) => {
                    if read == 0 {
                        // EOF: an unfinished head is dropped, never half-passed on.
                        this.closed = true;
                        this.pending.clear();
                        continue;
                    }
                    let before = this.ready.len();
                    this.check_pending();
                    if this.ready.len() > before || this.closed {
                        // Progress: the next head gets a fresh deadline.
                        this.armed = false;
                    }
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => {
                    let deadline = this.deadline.as_mut().expect("armed above");
                    if deadline.as_mut().poll(cx).is_ready() {
                        if this.in_head {
                            this.reject(Violation::HeadTimedOut);
                            continue;
                        }
                        // Idle keep-alive connection: close quietly.
                        this.closed = true;
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Gate<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    // Passed on, so that hyper writes a response's head and body with one writev instead of
    // copying them into one buffer first.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, data)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(head: &str) -> Result<(), (u16, Violation)> {
        check_head(head.as_bytes()).map_err(|v| (v.status().as_u16(), v))
    }

    const OK: &str = "GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\nX-aws-ec2-metadata-token: t\r\n\r\n";

    #[test]
    fn a_plain_request_passes() {
        assert_eq!(check(OK), Ok(()));
        assert_eq!(check("GET / HTTP/1.0\r\n\r\n"), Ok(()));
        assert_eq!(
            check("PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"),
            Ok(())
        );
    }

    #[test]
    fn smuggling_shapes_are_rejected() {
        let table: [(&str, u16, Violation); 16] = [
            ("GET / HTTP/1.1\nHost: x\n\n", 400, Violation::BareLineBreak),
            (
                "GET / HTTP/1.1\r\nHost: x\rX: y\r\n\r\n",
                400,
                Violation::BareLineBreak,
            ),
            (
                "GET http://evil/ HTTP/1.1\r\nHost: x\r\n\r\n",
                400,
                Violation::NotOriginForm,
            ),
            (
                "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
                400,
                Violation::NotOriginForm,
            ),
            (
                "CONNECT 169.254.169.254:80 HTTP/1.1\r\nHost: x\r\n\r\n",
                400,
                Violation::Method,
            ),
            ("PRI * HTTP/2.0\r\n\r\n", 400, Violation::Method),
            (
                "GET  / HTTP/1.1\r\nHost: x\r\n\r\n",
                400,
                Violation::MalformedRequestLine,
            ),
            (
                "GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n",
                400,
                Violation::ObsoleteLineFolding,
            ),
            (
                "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
                400,
                Violation::MalformedHeaderName,
            ),
            (
                "GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
                Violation::Body,
            ),
            (
                "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n",
                400,
                Violation::Body,
            ),
            (
                "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
                400,
                Violation::DuplicateContentLength,
            ),
            (
                "GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
                400,
                Violation::Host,
            ),
            ("GET / HTTP/1.1\r\n\r\n", 400, Violation::Host),
            (
                "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\n\r\n",
                400,
                Violation::Upgrade,
            ),
            (
                "GET / HTTP/1.1\r\nHost: x\r\nx-aws-ec2-metadata-token: a\r\nX-AWS-EC2-METADATA-TOKEN: b\r\n\r\n",
                400,
                Violation::DuplicateSecurityHeader,
            ),
        ];
        for (head, status, reason) in table {
            assert_eq!(check(head), Err((status, reason)), "{head:?}");
        }
    }

    #[test]
    fn every_security_header_is_recognised_in_any_case() {
        for name in SECURITY_HEADERS {
            let head = format!(
                "GET / HTTP/1.1\r\nHost: x\r\n{name}: a\r\n{}: b\r\n\r\n",
                name.to_ascii_uppercase()
            );
            assert_eq!(
                check(&head),
                Err((400, Violation::DuplicateSecurityHeader)),
                "{name}"
            );
        }
        let framing = "GET / HTTP/1.1\r\nHost: x\r\nTRANSFER-ENCODING: chunked\r\n\r\n";
        assert_eq!(check(framing), Err((400, Violation::Body)));
    }

    #[test]
    fn limits_have_their_own_statuses() {
        let long = format!(
            "GET /{} HTTP/1.1\r\nHost: x\r\n\r\n",
            "a".repeat(MAX_REQUEST_LINE)
        );
        assert_eq!(check(&long).unwrap_err().0, 414);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(
            check(&format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n"))
                .unwrap_err()
                .0,
            431
        );
    }

    proptest::proptest! {
        /// The scans that skip to line breaks (memchr) find what a walk over every byte finds.
        #[test]
        fn the_line_break_scans_agree_with_a_byte_by_byte_walk(
            bytes in proptest::collection::vec(proptest::sample::select(b"\r\nA :".to_vec()), 0..40)
        ) {
            let walked = bytes.iter().enumerate().position(|(i, &b)| {
                (b == b'\n' && (i == 0 || bytes[i - 1] != b'\r'))
                    || (b == b'\r' && bytes.get(i + 1).is_some_and(|n| *n != b'\n'))
            });
            proptest::prop_assert_eq!(first_bare_line_break(&bytes), walked);
            let end = bytes.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
            proptest::prop_assert_eq!(head_end(&bytes), end);
            // check_head on a complete head: bare CR or LF anywhere in it (a final CR
            // included) is refused.
            let mut head = b"GET / HTTP/1.0\r\n".to_vec();
            head.extend_from_slice(&bytes);
            head.extend_from_slice(b"\r\n\r\n");
            let bare = head.iter().enumerate().any(|(i, &b)| {
                (b == b'\r' && head.get(i + 1) != Some(&b'\n'))
                    || (b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
            });
            if bare {
                proptest::prop_assert_eq!(check_head(&head), Err(Violation::BareLineBreak));
            } else {
                proptest::prop_assert_ne!(check_head(&head), Err(Violation::BareLineBreak));
            }
        }
    }

    #[tokio::test]
    async fn a_head_that_never_ends_times_out_with_408() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (mut client, server) = tokio::io::duplex(1024);
        let timeouts = Timeouts {
            head: Duration::from_millis(100),
            idle: Duration::from_secs(30),
        };
        let mut gate = Gate::new(server, timeouts);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut out = vec![0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), gate.read(&mut out))
            .await
            .expect("the gate must time the head out")
            .unwrap();
        // hyper reads the end of the stream; the connection answers the violation.
        assert_eq!(n, 0);
        assert_eq!(gate.violation(), Some(Violation::HeadTimedOut));
        assert_eq!(
            Violation::HeadTimedOut.status(),
            StatusCode::REQUEST_TIMEOUT
        );
    }

    #[tokio::test]
    async fn heads_read_in_pieces_pass_whole_and_only_when_complete() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let timeouts = Timeouts {
            head: Duration::from_secs(5),
            idle: Duration::from_secs(5),
        };
        let heads = format!("{OK}{OK}{OK}");
        for piece in [1, 7, 50, OK.len() + 3] {
            let (mut client, server) = tokio::io::duplex(1024);
            let mut gate = Gate::new(server, timeouts);
            let chunks: Vec<Vec<u8>> = heads.as_bytes().chunks(piece).map(<[u8]>::to_vec).collect();
            let (first, rest) = chunks.split_first().unwrap();
            client.write_all(first).await.unwrap();
            // Less than a head has arrived: the gate hands nothing on.
            let mut byte = [0u8; 1];
            if piece < OK.len() {
                let early = tokio::time::timeout(Duration::from_millis(50), gate.read(&mut byte));
                assert!(
                    early.await.is_err(),
                    "piece {piece}: bytes of an incomplete head were passed on"
                );
            }
            let writer = {
                let rest = rest.to_vec();
                tokio::spawn(async move {
                    for chunk in rest {
                        client.write_all(&chunk).await.unwrap();
                        tokio::task::yield_now().await;
                    }
                })
            };
            // Read in small pieces too, as hyper may.
            let mut out = Vec::new();
            let mut buffer = [0u8; 13];
            while out.len() < heads.len() {
                let n = gate.read(&mut buffer).await.unwrap();
                assert_ne!(n, 0, "piece {piece}: the stream ended early");
                out.extend_from_slice(&buffer[..n]);
            }
            writer.await.unwrap();
            assert_eq!(String::from_utf8(out).unwrap(), heads, "piece {piece}");
            assert_eq!(gate.violation(), None);
        }
    }

    #[tokio::test]
    async fn pipelined_heads_each_pass_the_gate_and_a_bad_one_stops_the_stream() {
        use tokio::io::AsyncReadExt as _;
        let input = format!("{OK}{OK}GET / HTTP/1.1\nHost: x\n\n{OK}");
        // (the bare LF is caught before the head could complete)
        let timeouts = Timeouts {
            head: Duration::from_secs(1),
            idle: Duration::from_secs(1),
        };
        let mut gate = Gate::new(input.as_bytes(), timeouts);
        let mut out = String::new();
        gate.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, format!("{OK}{OK}"));
        assert_eq!(gate.violation(), Some(Violation::BareLineBreak));
    }
}
