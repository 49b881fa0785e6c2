//! Answers kept in memory: those fixed for the instance's life, and credentials until well
//! before they expire. Only successful answers, only small ones, a bounded number.

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
    entries: Mutex<HashMap<Key, Entry>>,
}

struct Entry {
    answer: Shared,
    /// Served until then (`None`: for the instance's life).
    until: Option<Instant>,
    /// For an access token with a relative `expires_in`: when it was asked for, from which
    /// its `expires_in` counts down when served.
    asked: Option<Instant>,
}

impl Cache {
    /// The kept answer for `key`, unless it has expired.
    pub fn get(&self, key: &Key) -> Option<Shared> {
        let mut entries = self.entries.lock().expect("cache lock");
        let entry = entries.get(key)?;
        if entry.until.is_some_and(|until| Instant::now() >= until) {
            entries.remove(key);
            return None;
        }
        match entry.asked {
            Some(asked) => counted_down(&entry.answer, asked.elapsed()),
            None => Some(entry.answer.clone()),
        }
    }

    /// Keeps `answer` (to a request sent upstream at `asked`) if its lifetime allows: a
    /// successful, small answer, fixed or a credential whose expiration is still far enough
    /// off.
    pub fn offer(&self, key: &Key, lifetime: Lifetime, answer: &Shared, asked: Instant) {
        if answer.status != http::StatusCode::OK || answer.body.len() > MAX_ANSWER_BYTES {
            return;
        }
        let (until, asked) = match lifetime {
            Lifetime::Never => return,
            Lifetime::Fixed => (None, None),
            Lifetime::UntilExpiration => match keep_until(&answer.body) {
                Some(until) => (Some(until), None),
                None => return,
            },
            Lifetime::UntilExpiresIn => match keep_until_relative(&answer.body, asked) {
                Some(until) => (Some(until), Some(asked)),
                None => return,
            },
        };
        let mut entries = self.entries.lock().expect("cache lock");
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(
            key.clone(),
            Entry {
                answer: answer.clone(),
                until,
                asked,
            },
        );
    }
}

/// The fields of an OAuth token answer that count seconds from the answer: GCP's answer has
/// `expires_in` alone; Azure's has `ext_expires_in` beside it, and answers of Microsoft's
/// identity platform may carry `refresh_in` (counted down too where present: a relative
/// field left as it was would be wrong by the time it was kept). Numbers on GCP, strings on
/// Azure.
const RELATIVE_FIELDS: [&str; 3] = ["expires_in", "ext_expires_in", "refresh_in"];

/// A token answer's `expires_in` in seconds.
fn expires_in(document: &serde_json::Value) -> Option<u64> {
    match document.get("expires_in")? {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Until when an access token may be served from memory: `expires_in` counted from when it
/// was asked for (the service answered later, so the token lives at least that long), less
/// the margin, if that is still ahead; `None` for anything else (never kept).
fn keep_until_relative(body: &[u8], asked: Instant) -> Option<Instant> {
    let document: serde_json::Value = serde_json::from_slice(body).ok()?;
    let left = Duration::from_secs(expires_in(&document)?).checked_sub(CREDENTIAL_MARGIN)?;
    let until = asked + left;
    (until > Instant::now()).then_some(until)
}

/// A kept token answer as the service would give it `elapsed` after it was asked for: its
/// relative lifetimes less that time, rounded down, so no caller believes a token lives
/// longer than it does. `None` if the answer cannot be read (never served then).
fn counted_down(answer: &Shared, elapsed: Duration) -> Option<Shared> {
    let mut document: serde_json::Value = serde_json::from_slice(&answer.body).ok()?;
    let spent = elapsed.as_secs() + u64::from(elapsed.subsec_nanos() > 0);
    for field in RELATIVE_FIELDS {
        let Some(value) = document.get_mut(field) else {
            continue;
        };
        *value = match value {
            serde_json::Value::Number(n) => n.as_u64()?.saturating_sub(spent).into(),
            serde_json::Value::String(s) => {
                let seconds: u64 = s.trim().parse().ok()?;
                seconds.saturating_sub(spent).to_string().into()
            }
            _ => return None,
        };
    }
    let mut served = answer.clone();
    served.body = serde_json::to_vec(&document).ok()?.into();
    // The body's length changed with it: hyper sets the new one.
    served.headers.remove(http::header::CONTENT_LENGTH);
    Some(served)
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
            Instant::now(),
        );
        assert!(cache.get(&role).is_none(), "within the margin: never kept");
        cache.offer(
            &role,
            Lifetime::UntilExpiration,
            &credential(Duration::from_secs(6 * 3600)),
            Instant::now(),
        );
        let until = cache.entries.lock().unwrap()[&role].until.unwrap();
        let expected = Instant::now() + Duration::from_secs(6 * 3600) - CREDENTIAL_MARGIN;
        assert!(until <= expected && until + Duration::from_secs(5) > expected);
        assert!(cache.get(&role).is_some());
        // Past its time it is gone.
        cache.entries.lock().unwrap().get_mut(&role).unwrap().until = Some(Instant::now());
        assert!(cache.get(&role).is_none());
        // A document without a readable Expiration is never kept.
        let mut odd = credential(Duration::from_secs(3600));
        odd.body = r#"{"Expiration":"soon"}"#.into();
        cache.offer(&role, Lifetime::UntilExpiration, &odd, Instant::now());
        assert!(cache.get(&role).is_none());
    }

    #[test]
    fn only_successful_fixed_answers_are_kept() {
        let cache = Cache::default();
        let id = key("/latest/meta-data/instance-id");
        let mut answer = credential(Duration::ZERO);
        answer.status = http::StatusCode::NOT_FOUND;
        cache.offer(&id, Lifetime::Fixed, &answer, Instant::now());
        assert!(cache.get(&id).is_none());
        answer.status = http::StatusCode::OK;
        cache.offer(&id, Lifetime::Never, &answer, Instant::now());
        assert!(cache.get(&id).is_none());
        cache.offer(&id, Lifetime::Fixed, &answer, Instant::now());
        assert!(cache.get(&id).is_some());
    }

    fn token(body: &str) -> Shared {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::CONTENT_LENGTH, body.len().into());
        Shared {
            status: http::StatusCode::OK,
            headers,
            body: body.to_owned().into(),
        }
    }

    #[test]
    fn access_tokens_are_served_counting_down_and_never_near_their_end() {
        let cache = Cache::default();
        let gcp = key("/computeMetadata/v1/instance/service-accounts/default/token");
        let azure = key("/metadata/identity/oauth2/token?api-version=2018-02-01&resource=r");
        let asked = Instant::now() - Duration::from_millis(61_500);
        cache.offer(
            &gcp,
            Lifetime::UntilExpiresIn,
            &token(r#"{"access_token":"ya29.x","expires_in":3599,"token_type":"Bearer"}"#),
            asked,
        );
        cache.offer(
            &azure,
            Lifetime::UntilExpiresIn,
            &token(
                r#"{"access_token":"ey.x","expires_in":"3599","ext_expires_in":"3599","refresh_in":1799,"expires_on":"1900000000","token_type":"Bearer"}"#,
            ),
            asked,
        );
        // 61.5 s after it was asked for, 62 s are gone (rounded up), in the type the service
        // used, the other fields as they were, in their order; the length is hyper's to set.
        let served = cache.get(&gcp).expect("kept");
        assert_eq!(
            served.body,
            r#"{"access_token":"ya29.x","expires_in":3537,"token_type":"Bearer"}"#
        );
        assert!(!served.headers.contains_key(http::header::CONTENT_LENGTH));
        assert_eq!(
            cache.get(&azure).expect("kept").body,
            r#"{"access_token":"ey.x","expires_in":"3537","ext_expires_in":"3537","refresh_in":1737,"expires_on":"1900000000","token_type":"Bearer"}"#
        );
        // Kept until the margin before its end, counted from when it was asked for.
        let until = cache.entries.lock().unwrap()[&gcp].until.unwrap();
        assert_eq!(until, asked + Duration::from_secs(3599) - CREDENTIAL_MARGIN);
        // A token that lives less than the margin, or whose lifetime cannot be read, is
        // never kept.
        let short = key("/computeMetadata/v1/instance/service-accounts/short/token");
        cache.offer(
            &short,
            Lifetime::UntilExpiresIn,
            &token(r#"{"access_token":"a","expires_in":1100}"#),
            Instant::now(),
        );
        cache.offer(
            &short,
            Lifetime::UntilExpiresIn,
            &token(r#"{"access_token":"a","expires_in":"soon"}"#),
            Instant::now(),
        );
        assert!(cache.get(&short).is_none());
    }
}
