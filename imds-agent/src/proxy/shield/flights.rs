//! Coalescing: identical reads in flight at the same moment share one upstream request. The
//! first is the leader and asks the service; the others wait for its answer. Each caller was
//! decided by its own policy before it got here, and each answer is shaped for its caller
//! after (listings, views).

use std::{collections::HashMap, sync::Mutex};

use tokio::sync::watch;

use super::{Key, Shared};
use crate::proxy::forward::UpstreamError;

pub type Outcome = Result<Shared, UpstreamError>;

#[derive(Default)]
pub struct Flights {
    flights: Mutex<HashMap<Key, watch::Receiver<Option<Outcome>>>>,
}

/// A request's place in its flight.
pub enum Seat<'f> {
    /// Asks the service, and hands the answer to the others.
    Leader(Lead<'f>),
    /// Waits for the leader's answer.
    Follower(watch::Receiver<Option<Outcome>>),
}

pub struct Lead<'f> {
    flights: &'f Flights,
    key: Key,
    sender: watch::Sender<Option<Outcome>>,
}

impl Flights {
    pub fn join(&self, key: &Key) -> Seat<'_> {
        let mut flights = self.flights.lock().expect("flights lock");
        if let Some(receiver) = flights.get(key) {
            return Seat::Follower(receiver.clone());
        }
        let (sender, receiver) = watch::channel(None);
        flights.insert(key.clone(), receiver);
        Seat::Leader(Lead {
            flights: self,
            key: key.clone(),
            sender,
        })
    }

    /// Flights under way (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.flights.lock().unwrap().len()
    }
}

impl Lead<'_> {
    /// Hands `outcome` to the followers; the flight ends (a request arriving now starts
    /// another).
    pub fn land(self, outcome: &Outcome) {
        self.flights
            .flights
            .lock()
            .expect("flights lock")
            .remove(&self.key);
        self.sender.send_replace(Some(outcome.clone()));
    }
}

impl Drop for Lead<'_> {
    /// A leader gone without an answer (its client went away mid-request) leaves its
    /// followers an error rather than waiting forever.
    fn drop(&mut self) {
        let mut flights = self.flights.flights.lock().expect("flights lock");
        if flights
            .get(&self.key)
            .is_some_and(|r| r.same_channel(&self.sender.subscribe()))
        {
            flights.remove(&self.key);
        }
        drop(flights);
        if self.sender.borrow().is_none() {
            self.sender.send_replace(Some(Err(UpstreamError::Request)));
        }
    }
}

/// The leader's outcome, for a follower.
pub async fn landed(mut receiver: watch::Receiver<Option<Outcome>>) -> Outcome {
    match receiver.wait_for(Option::is_some).await {
        Ok(outcome) => outcome.clone().expect("waited for"),
        Err(_) => Err(UpstreamError::Request),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key {
            address: "169.254.169.254:80".parse().unwrap(),
            target: "/metadata/instance?api-version=2021-02-01".into(),
            variant: String::new(),
        }
    }

    fn answer() -> Shared {
        Shared {
            status: http::StatusCode::OK,
            headers: http::HeaderMap::new(),
            body: "{}".into(),
        }
    }

    #[tokio::test]
    async fn followers_get_the_leaders_answer_and_a_later_request_asks_again() {
        let flights = Flights::default();
        let Seat::Leader(lead) = flights.join(&key()) else {
            panic!("the first leads");
        };
        let Seat::Follower(first) = flights.join(&key()) else {
            panic!("the second follows");
        };
        let Seat::Follower(second) = flights.join(&key()) else {
            panic!("the third follows");
        };
        lead.land(&Ok(answer()));
        assert_eq!(landed(first).await.unwrap().body, "{}");
        assert_eq!(landed(second).await.unwrap().body, "{}");
        assert_eq!(flights.len(), 0);
        assert!(matches!(flights.join(&key()), Seat::Leader(_)));
    }

    #[tokio::test]
    async fn a_leader_gone_without_an_answer_fails_its_followers() {
        let flights = Flights::default();
        let lead = flights.join(&key());
        let Seat::Follower(follower) = flights.join(&key()) else {
            panic!("follows");
        };
        drop(lead);
        assert!(matches!(
            landed(follower).await,
            Err(UpstreamError::Request)
        ));
        assert_eq!(flights.len(), 0);
    }
}
