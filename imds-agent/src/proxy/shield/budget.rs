//! The upstream budget: requests to the metadata service beyond its limits wait their turn,
//! for a bounded time, instead of drawing its 429s (and the SDKs' retries after them).

use std::{
    collections::VecDeque,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

use super::paths::Limit;

/// The window a rate counts in, with a margin: the service counts by arrival, and arrivals
/// are a little less evenly spaced than departures.
const WINDOW: Duration = Duration::from_millis(1_100);

/// One limit and its state.
struct Budget {
    limit: Limit,
    /// When the last `rate` requests were (or are to be) sent.
    sent: Mutex<VecDeque<Instant>>,
    in_flight: Option<Arc<Semaphore>>,
}

/// Every limit on requests to the metadata service, most specific first.
pub struct Budgets {
    budgets: Vec<Budget>,
    /// The longest a request waits for its turn; then 429.
    wait: Duration,
}

/// A request's turn: holds its place among those in flight until dropped.
pub struct Turn {
    _in_flight: Option<OwnedSemaphorePermit>,
    /// How long the request waited for it.
    pub waited: Duration,
}

impl Budgets {
    pub fn new(limits: Vec<Limit>, wait: Duration) -> Self {
        Self {
            budgets: limits
                .into_iter()
                .filter(|l| l.rate > 0 || l.in_flight > 0)
                .map(|limit| Budget {
                    limit,
                    sent: Mutex::new(VecDeque::new()),
                    in_flight: (limit.in_flight > 0)
                        .then(|| Arc::new(Semaphore::new(limit.in_flight as usize))),
                })
                .collect(),
            wait,
        }
    }

    /// Waits for the turn of a request to `address` for `path`, at most the bound; `None`
    /// when it would have to wait longer.
    pub async fn turn(&self, address: IpAddr, path: &str) -> Option<Turn> {
        let started = Instant::now();
        let Some(budget) = self
            .budgets
            .iter()
            .find(|b| b.limit.address == address && path.starts_with(b.limit.prefix))
        else {
            return Some(Turn {
                _in_flight: None,
                waited: Duration::ZERO,
            });
        };
        let deadline = started + self.wait;
        let in_flight = match &budget.in_flight {
            Some(semaphore) => Some(
                tokio::time::timeout_at(deadline, semaphore.clone().acquire_owned())
                    .await
                    .ok()?
                    .expect("never closed"),
            ),
            None => None,
        };
        if budget.limit.rate > 0 {
            let at = budget.reserve(Instant::now(), deadline)?;
            tokio::time::sleep_until(at).await;
        }
        Some(Turn {
            _in_flight: in_flight,
            waited: started.elapsed(),
        })
    }
}

impl Budget {
    /// The earliest time at or after `now` that keeps at most `rate` sends in any window,
    /// reserved; `None` if it is past `deadline` (nothing is reserved then).
    fn reserve(&self, now: Instant, deadline: Instant) -> Option<Instant> {
        let rate = self.limit.rate as usize;
        let mut sent = self.sent.lock().expect("budget lock");
        let at = if sent.len() < rate {
            now
        } else {
            now.max(sent[sent.len() - rate] + WINDOW)
        };
        if at > deadline {
            return None;
        }
        sent.push_back(at);
        while sent.len() > rate {
            sent.pop_front();
        }
        Some(at)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn budget(rate: u32) -> Budget {
        Budget {
            limit: Limit {
                address: IpAddr::V4(Ipv4Addr::LOCALHOST),
                prefix: "/",
                rate,
                in_flight: 0,
            },
            sent: Mutex::new(VecDeque::new()),
            in_flight: None,
        }
    }

    #[test]
    fn no_window_holds_more_than_the_rate_and_a_turn_too_far_off_is_refused() {
        let budget = budget(5);
        let start = Instant::now();
        let far = start + Duration::from_secs(60);
        let times: Vec<Instant> = (0..23)
            .map(|_| budget.reserve(start, far).unwrap())
            .collect();
        for (i, at) in times.iter().enumerate() {
            let in_window = times
                .iter()
                .filter(|t| **t >= *at && **t < *at + WINDOW)
                .count();
            assert!(in_window <= 5, "{i}: {in_window} in one window");
        }
        assert_eq!(times[4], start);
        assert_eq!(times[5], start + WINDOW);
        assert_eq!(times[22], start + WINDOW * 4);
        // A request whose turn would come after its deadline waits for nothing.
        assert_eq!(budget.reserve(start, start + Duration::from_secs(1)), None);
        assert_eq!(budget.sent.lock().unwrap().len(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn turns_wait_in_flight_and_rate_and_give_up_at_the_bound() {
        let address = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let budgets = Budgets::new(
            vec![Limit {
                address,
                prefix: "/id/",
                rate: 20,
                in_flight: 1,
            }],
            Duration::from_millis(500),
        );
        let first = budgets.turn(address, "/id/token").await.expect("a turn");
        assert_eq!(first.waited, Duration::ZERO);
        // Other paths, and other addresses, have no budget here.
        assert!(budgets.turn(address, "/other").await.is_some());
        // The one in flight holds the only place: the next gives up at the bound.
        assert!(budgets.turn(address, "/id/token").await.is_none());
        drop(first);
        assert!(budgets.turn(address, "/id/token").await.is_some());
    }
}
