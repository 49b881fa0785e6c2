//! Overload protection. Per caller (cgroup, uid and gid, as the kernel attests them): at most `max_in_flight` requests at once
//! and a token-bucket rate; over either, 429. Globally: at most `max_connections` client
//! connections; over it, 503. Overload refuses, never bypasses: the kernel keeps diverting,
//! so a refused caller simply gets no answer from the metadata service.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use crate::identity::CallerKey;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitsConfig {
    pub max_in_flight: u32,
    /// Sustained requests per second per caller.
    pub rate: f64,
    /// Bucket size: requests a caller may make in a burst.
    pub burst: f64,
    pub max_connections: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            // SDKs make a handful of requests at start-up and on refresh; a GCP long-poll
            // holds one slot.
            max_in_flight: 16,
            // AWS throttles around this per instance; a caller beyond it is misbehaving.
            rate: 50.0,
            burst: 100.0,
            max_connections: 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TooManyInFlight,
    RateExceeded,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
    in_flight: u32,
}

#[derive(Debug)]
pub struct Limits {
    config: LimitsConfig,
    buckets: Mutex<HashMap<CallerKey, Bucket>>,
}

/// Held while a request is in flight.
#[derive(Debug)]
pub struct Permit {
    limits: Arc<Limits>,
    key: CallerKey,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(bucket) = self
            .limits
            .buckets
            .lock()
            .expect("limits lock")
            .get_mut(&self.key)
        {
            bucket.in_flight = bucket.in_flight.saturating_sub(1);
        }
    }
}

/// Buckets kept before idle ones are swept.
const SWEEP_AT: usize = 4096;

impl Limits {
    pub fn new(config: LimitsConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            buckets: Mutex::new(HashMap::new()),
        })
    }

    pub fn config(&self) -> LimitsConfig {
        self.config
    }

    /// Admits one request from `key` at `now`, or says why not.
    pub fn admit(self: &Arc<Self>, key: CallerKey, now: Instant) -> Result<Permit, Refusal> {
        let mut buckets = self.buckets.lock().expect("limits lock");
        if buckets.len() >= SWEEP_AT {
            let (rate, burst) = (self.config.rate, self.config.burst);
            // Idle and refilled: forgetting them changes nothing.
            buckets.retain(|_, b| {
                b.in_flight > 0
                    || b.tokens + now.duration_since(b.refilled).as_secs_f64() * rate < burst
            });
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.config.burst,
            refilled: now,
            in_flight: 0,
        });
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.config.rate).min(self.config.burst);
        bucket.refilled = now;
        if bucket.in_flight >= self.config.max_in_flight {
            return Err(Refusal::TooManyInFlight);
        }
        if bucket.tokens < 1.0 {
            return Err(Refusal::RateExceeded);
        }
        bucket.tokens -= 1.0;
        bucket.in_flight += 1;
        Ok(Permit {
            limits: self.clone(),
            key,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn caller(cgroup_id: u64) -> CallerKey {
        CallerKey {
            cgroup_id,
            uid: 0,
            gid: 0,
        }
    }

    fn limits(max_in_flight: u32, rate: f64, burst: f64) -> Arc<Limits> {
        Limits::new(LimitsConfig {
            max_in_flight,
            rate,
            burst,
            max_connections: 1,
        })
    }

    #[test]
    fn in_flight_requests_are_capped_per_caller() {
        let limits = limits(2, 1000.0, 1000.0);
        let now = Instant::now();
        let a = limits.admit(caller(1), now).unwrap();
        let _b = limits.admit(caller(1), now).unwrap();
        assert_eq!(
            limits.admit(caller(1), now).unwrap_err(),
            Refusal::TooManyInFlight
        );
        // Another caller is not affected; the same cgroup with another uid is another caller.
        assert!(limits.admit(caller(2), now).is_ok());
        assert!(
            limits
                .admit(
                    CallerKey {
                        uid: 1000,
                        ..caller(1)
                    },
                    now
                )
                .is_ok()
        );
        drop(a);
        assert!(limits.admit(caller(1), now).is_ok());
    }

    #[test]
    fn the_rate_refills_over_time() {
        let limits = limits(100, 10.0, 3.0);
        let start = Instant::now();
        for _ in 0..3 {
            drop(limits.admit(caller(1), start).unwrap());
        }
        assert_eq!(
            limits.admit(caller(1), start).unwrap_err(),
            Refusal::RateExceeded
        );
        // 10/s: one token back after 100 ms, not before.
        assert_eq!(
            limits
                .admit(caller(1), start + Duration::from_millis(50))
                .unwrap_err(),
            Refusal::RateExceeded
        );
        assert!(
            limits
                .admit(caller(1), start + Duration::from_millis(150))
                .is_ok()
        );
    }
}
