//! Token binding: AWS session tokens (IMDSv2) are bearer tokens, valid for any process on the
//! instance. The agent sees every token it hands out and who asked for it, so it binds each
//! token to that caller (cgroup, uid, gid) and refuses it from anyone else: a token stolen from
//! one workload is useless in another. Tokens the agent did not hand out (obtained before it
//! started, or by a process it does not govern) are refused too; SDKs answer a 401 by fetching
//! a new token, which is then bound.
//!
//! Only a keyed hash of each token is kept, never the token.

use std::{
    collections::HashMap,
    hash::{BuildHasher as _, RandomState},
    sync::Mutex,
    time::{Duration, Instant},
};

/// The caller a token belongs to: the kernel-attested cgroup id, uid and gid.
pub type Owner = (u64, u32, u32);

/// Tokens remembered at most; beyond it the one expiring soonest is forgotten (its holder gets
/// a 401 and fetches another).
const MAX_TOKENS: usize = 65_536;

pub struct TokenBindings {
    hasher: RandomState,
    tokens: Mutex<HashMap<u64, (Owner, Instant)>>,
}

impl Default for TokenBindings {
    fn default() -> Self {
        Self {
            hasher: RandomState::new(),
            tokens: Mutex::new(HashMap::new()),
        }
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
    /// Records a token handed out to `owner`, valid for `ttl`.
    pub fn bind(&self, token: &[u8], owner: Owner, ttl: Duration) {
        let key = self.hasher.hash_one(token);
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
        let key = self.hasher.hash_one(token);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_its_owners_until_it_expires() {
        let bindings = TokenBindings::default();
        let (alice, bob) = ((1, 1000, 1000), (2, 1000, 1000));
        bindings.bind(b"token-a", alice, Duration::from_secs(60));
        assert_eq!(bindings.holder(b"token-a", alice), Holder::Owner);
        assert_eq!(bindings.holder(b"token-a", bob), Holder::Other);
        assert_eq!(bindings.holder(b"token-b", alice), Holder::Unknown);
        bindings.bind(b"short", alice, Duration::ZERO);
        assert_eq!(bindings.holder(b"short", alice), Holder::Unknown);
        bindings.sweep();
        assert_eq!(bindings.len(), 1);
    }
}
