//! Answers kept in memory: those fixed for the instance's life, and role credentials until
//! well before they expire. Only successful answers, only small ones, a bounded number.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use super::{Key, Shared, paths::Lifetime};

/// A credential is served from memory until this long before its `Expiration`: SDKs
/// refresh 15 minutes ahead (botocore's advisory refresh) and the service has the next one
/// ready by then.
pub const CREDENTIAL_MARGIN: Duration = Duration::from_secs(20 * 60);
/// Answers larger than this are not kept.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Answers kept at most; then the cache starts over.
const MAX_ENTRIES: usize = 4096;

#[derive(Default)]
pub struct Cache {
    entries: Mutex<HashMap<Key, (Shared, Option<Instant>)>>,
}

impl Cache {
    /// The kept answer for `key`, unless it has expired.
    pub fn get(&self, key: &Key) -> Option<Shared> {
        let mut entries = self.entries.lock().expect("cache lock");
        let (answer, until) = entries.get(key)?;
        if until.is_some_and(|until| Instant::now() >= until) {
            entries.remove(key);
            return None;
        }
        Some(answer.clone())
    }

    /// Keeps `answer` if its lifetime allows: a successful, small answer, fixed or a
    /// credential whose expiration is still far enough off.
    pub fn offer(&self, key: &Key, lifetime: Lifetime, answer: &Shared) {
        if answer.status != http::StatusCode::OK || answer.body.len() > MAX_ANSWER_BYTES {
            return;
        }
        let until = match lifetime {
            Lifetime::Never => return,
            Lifetime::Fixed => None,
            Lifetime::UntilExpiration => match keep_until(&answer.body) {
                Some(until) => Some(until),
                None => return,
            },
        };
        let mut entries = self.entries.lock().expect("cache lock");
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(key.clone(), (answer.clone(), until));
    }
}

/// Until when a credential document may be served from memory: its `Expiration` less the
/// margin, if that is still ahead; `None` for anything else (never kept).
fn keep_until(body: &[u8]) -> Option<Instant> {
    let document: serde_json::Value = serde_json::from_slice(body).ok()?;
    let expiration = crate::calendar::parse_iso8601(document.get("Expiration")?.as_str()?)?;
    let left = expiration
        .duration_since(SystemTime::now())
        .ok()?
        .checked_sub(CREDENTIAL_MARGIN)?;
    (!left.is_zero()).then(|| Instant::now() + left)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calendar::iso8601;

    fn credential(expires_in: Duration) -> Shared {
        let body = format!(
            r#"{{"Code":"Success","AccessKeyId":"ASIA","Expiration":"{}"}}"#,
            iso8601(SystemTime::now() + expires_in)
        );
        Shared {
            status: http::StatusCode::OK,
            headers: http::HeaderMap::new(),
            body: body.into(),
        }
    }

    fn key(path: &str) -> Key {
        Key {
            address: "169.254.169.254:80".parse().unwrap(),
            target: path.into(),
            variant: String::new(),
        }
    }

    #[test]
    fn credentials_are_kept_only_while_far_from_expiring() {
        let cache = Cache::default();
        let role = key("/latest/meta-data/iam/security-credentials/r");
        cache.offer(
            &role,
            Lifetime::UntilExpiration,
            &credential(Duration::from_secs(19 * 60)),
        );
        assert!(cache.get(&role).is_none(), "within the margin: never kept");
        cache.offer(
            &role,
            Lifetime::UntilExpiration,
            &credential(Duration::from_secs(6 * 3600)),
        );
        let until = cache.entries.lock().unwrap()[&role].1.unwrap();
        let expected = Instant::now() + Duration::from_secs(6 * 3600) - CREDENTIAL_MARGIN;
        assert!(until <= expected && until + Duration::from_secs(5) > expected);
        assert!(cache.get(&role).is_some());
        // Past its time it is gone.
        cache.entries.lock().unwrap().get_mut(&role).unwrap().1 = Some(Instant::now());
        assert!(cache.get(&role).is_none());
        // A document without a readable Expiration is never kept.
        let mut odd = credential(Duration::from_secs(3600));
        odd.body = r#"{"Expiration":"soon"}"#.into();
        cache.offer(&role, Lifetime::UntilExpiration, &odd);
        assert!(cache.get(&role).is_none());
    }

    #[test]
    fn only_successful_fixed_answers_are_kept() {
        let cache = Cache::default();
        let id = key("/latest/meta-data/instance-id");
        let mut answer = credential(Duration::ZERO);
        answer.status = http::StatusCode::NOT_FOUND;
        cache.offer(&id, Lifetime::Fixed, &answer);
        assert!(cache.get(&id).is_none());
        answer.status = http::StatusCode::OK;
        cache.offer(&id, Lifetime::Never, &answer);
        assert!(cache.get(&id).is_none());
        cache.offer(&id, Lifetime::Fixed, &answer);
        assert!(cache.get(&id).is_some());
    }
}
