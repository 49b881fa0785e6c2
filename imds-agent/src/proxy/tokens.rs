//! Token binding: AWS session tokens (IMDSv2) are bearer tokens, valid for any process on the
//! instance. The agent sees every token it hands out and who asked for it, so it binds each
//! token to that caller (cgroup, uid, gid) and refuses it from anyone else: a token stolen from
//! one workload is useless in another. Tokens the agent did not hand out (obtained before it
//! started, or by a process it does not govern) are refused too; SDKs answer a 401 by fetching
//! a new token, which is then bound.
//!
//! Only a keyed hash of each token is kept, never the token (HMAC-SHA256 with a random key,
//! which a successor takes over with the bindings; see `handover`).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::BodyExt as _;

use super::{Body, forward::UpstreamError, full_body, request::ValidRequest};
use crate::{identity::CallerKey as Owner, policy::TokenRules, provider::SessionTokens};

/// The policy name in denials by token binding (not a policy file's decision).
pub const TOKEN_BINDING_POLICY: &str = "(token binding)";

/// The longest session-token lifetime (AWS and Alibaba: 6 hours): how long a token is bound
/// when neither the request nor the response states its lifetime.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(21_600);

/// Tokens remembered at most; beyond it the one expiring soonest is forgotten (its holder gets
/// a 401 and fetches another).
const MAX_TOKENS: usize = 65_536;

/// The rule name of a refusal of a token this agent did not hand out.
pub const NOT_ISSUED: &str = "token-not-issued-to-caller";

/// How long a request with a token this agent does not know waits for its predecessor's
/// bindings during an upgrade, at most.
pub const HANDOVER_WAIT: Duration = Duration::from_secs(5);

pub struct TokenBindings {
    key: [u8; 32],
    hmac: ring::hmac::Key,
    tokens: Mutex<HashMap<u64, (Owner, Instant)>>,
    /// Set while a predecessor's bindings are still to come (an upgrade in progress).
    awaiting: tokio::sync::watch::Sender<bool>,
}

impl Default for TokenBindings {
    fn default() -> Self {
        let mut key = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
            .expect("the system's random source");
        Self::with_key(key)
    }
}

/// Whose a presented token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// The caller's own, still valid.
    Owner,
    /// Handed out to another caller.
    Other,
    /// Not handed out by this agent, or expired.
    Unknown,
}

impl TokenBindings {
    /// Bindings hashed with `key` (a predecessor's, to take its bindings over).
    pub fn with_key(key: [u8; 32]) -> Self {
        Self {
            key,
            hmac: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
            tokens: Mutex::new(HashMap::new()),
            awaiting: tokio::sync::watch::Sender::new(false),
        }
    }

    pub fn key(&self) -> [u8; 32] {
        self.key
    }

    fn hash(&self, token: &[u8]) -> u64 {
        let tag = ring::hmac::sign(&self.hmac, token);
        let mut first = [0u8; 8];
        first.copy_from_slice(&tag.as_ref()[..8]);
        u64::from_ne_bytes(first)
    }

    /// Every live binding: (hash, owner, time left).
    pub fn export(&self) -> Vec<(u64, Owner, Duration)> {
        let now = Instant::now();
        self.tokens
            .lock()
            .expect("token lock")
            .iter()
            .filter(|(_, (_, expires))| *expires > now)
            .map(|(hash, (owner, expires))| (*hash, *owner, *expires - now))
            .collect()
    }

    /// Takes over a predecessor's bindings (hashed with this key), and stops waiting for them.
    pub fn import(&self, bindings: impl IntoIterator<Item = (u64, Owner, Duration)>) {
        let now = Instant::now();
        let mut tokens = self.tokens.lock().expect("token lock");
        for (hash, owner, left) in bindings {
            if tokens.len() < MAX_TOKENS {
                tokens.entry(hash).or_insert((owner, now + left));
            }
        }
        drop(tokens);
        self.awaiting.send_replace(false);
    }

    /// From now until [`Self::import`] (or [`Self::stop_awaiting`]), an unknown token may be
    /// a predecessor's.
    pub fn await_predecessor(&self) {
        self.awaiting.send_replace(true);
    }

    pub fn stop_awaiting(&self) {
        self.awaiting.send_replace(false);
    }

    /// Waits, within `max`, until no predecessor's bindings are awaited; whether any are.
    pub async fn settled(&self, max: Duration) -> bool {
        let mut awaiting = self.awaiting.subscribe();
        let _ = tokio::time::timeout(max, awaiting.wait_for(|a| !*a)).await;
        !*self.awaiting.borrow()
    }

    pub fn awaiting(&self) -> bool {
        *self.awaiting.borrow()
    }

    /// Records a token handed out to `owner`, valid for `ttl`.
    pub fn bind(&self, token: &[u8], owner: Owner, ttl: Duration) {
        let key = self.hash(token);
        let now = Instant::now();
        let mut tokens = self.tokens.lock().expect("token lock");
        if tokens.len() >= MAX_TOKENS {
            tokens.retain(|_, (_, expires)| *expires > now);
        }
        if tokens.len() >= MAX_TOKENS
            && let Some(soonest) = tokens
                .iter()
                .min_by_key(|(_, (_, expires))| *expires)
                .map(|(k, _)| *k)
        {
            tokens.remove(&soonest);
        }
        tokens.insert(key, (owner, now + ttl));
    }

    pub fn holder(&self, token: &[u8], caller: Owner) -> Holder {
        let key = self.hash(token);
        match self.tokens.lock().expect("token lock").get(&key) {
            Some((_, expires)) if *expires <= Instant::now() => Holder::Unknown,
            Some((owner, _)) if *owner == caller => Holder::Owner,
            Some(_) => Holder::Other,
            None => Holder::Unknown,
        }
    }

    /// Forgets expired tokens.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.tokens
            .lock()
            .expect("token lock")
            .retain(|_, (_, expires)| *expires > now);
    }

    pub fn len(&self) -> usize {
        self.tokens.lock().expect("token lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A token request asking for a longer lifetime than the caller may have asks for the cap.
pub fn cap_token_ttl(session: &SessionTokens, headers: &mut http::HeaderMap, max: u32) {
    if session.ttl(headers).is_some_and(|ttl| ttl > u64::from(max)) {
        headers.insert(session.ttl_header, HeaderValue::from(max));
    }
}

/// Why this request's token (or its absence) is refused, as (policy, rule); `None` if not.
/// `bindings` is `None` when tokens are not bound to callers (`--no-token-binding`).
pub fn token_refusal<'a>(
    session: &SessionTokens,
    bindings: Option<&TokenBindings>,
    caller: Owner,
    valid: &ValidRequest,
    rules: &TokenRules<'a>,
) -> Option<(&'a str, &'static str)> {
    if session.is_token_request(&valid.method, &valid.path) {
        return None;
    }
    let Some(token) = valid.headers.get(session.token_header) else {
        return rules.required_by.map(|policy| (policy, "tokens-required"));
    };
    match bindings?.holder(token.as_bytes(), caller) {
        Holder::Owner => None,
        Holder::Other => Some((TOKEN_BINDING_POLICY, "token-of-another-caller")),
        Holder::Unknown => Some((TOKEN_BINDING_POLICY, NOT_ISSUED)),
    }
}

/// Records the token in a successful token response as `caller`'s, for its lifetime: the one
/// the response states (AWS echoes it), else the one asked for, else the longest.
pub async fn bind_token(
    bindings: &TokenBindings,
    session: &SessionTokens,
    caller: Owner,
    requested_ttl: Option<u64>,
    response: Response<Body>,
) -> Result<Response<Body>, UpstreamError> {
    if response.status() != StatusCode::OK {
        return Ok(response);
    }
    let ttl = session
        .ttl(response.headers())
        .or(requested_ttl)
        .map_or(MAX_TOKEN_TTL, Duration::from_secs)
        .min(MAX_TOKEN_TTL);
    let (parts, body) = response.into_parts();
    // A token is about 60 bytes; anything much larger is not a token response.
    let limited = http_body_util::Limited::new(body, 4096);
    let bytes: Bytes = limited
        .collect()
        .await
        .map_err(|_| UpstreamError::TokenResponse)?
        .to_bytes();
    bindings.bind(bytes.trim_ascii(), caller, ttl);
    Ok(Response::from_parts(parts, full_body(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_its_owners_until_it_expires() {
        let bindings = TokenBindings::default();
        let caller = |cgroup_id| Owner {
            cgroup_id,
            uid: 1000,
            gid: 1000,
        };
        let (alice, bob) = (caller(1), caller(2));
        bindings.bind(b"token-a", alice, Duration::from_secs(60));
        assert_eq!(bindings.holder(b"token-a", alice), Holder::Owner);
        assert_eq!(bindings.holder(b"token-a", bob), Holder::Other);
        assert_eq!(bindings.holder(b"token-b", alice), Holder::Unknown);
        bindings.bind(b"short", alice, Duration::ZERO);
        assert_eq!(bindings.holder(b"short", alice), Holder::Unknown);
        bindings.sweep();
        assert_eq!(bindings.len(), 1);

        // A successor with the same key holds the same bindings.
        let successor = TokenBindings::with_key(bindings.key());
        successor.await_predecessor();
        assert!(successor.awaiting());
        successor.import(bindings.export());
        assert!(!successor.awaiting());
        assert_eq!(successor.holder(b"token-a", alice), Holder::Owner);
        assert_eq!(successor.holder(b"token-a", bob), Holder::Other);
        // Another key: another hash.
        let stranger = TokenBindings::default();
        stranger.import(bindings.export());
        assert_eq!(stranger.holder(b"token-a", alice), Holder::Unknown);
    }
}
