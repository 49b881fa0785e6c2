//! The agent's background tasks, in one set: started as the agent starts, cancelled together
//! when it stops. A task meant to run as long as the agent that ends anyway (a panic, an
//! unexpected return) stops the agent: the kernel programs stay attached, so callers are
//! refused rather than let through, and the agent's supervisor (systemd, the kubelet)
//! restarts it.

use std::{collections::HashMap, future::Future};

use tokio::task::{Id, JoinSet};

#[derive(Default)]
pub struct Tasks {
    set: JoinSet<()>,
    /// Each task's name, and whether it may finish on its own.
    names: HashMap<Id, (&'static str, bool)>,
}

impl Tasks {
    /// A task that runs for the agent's life.
    pub fn service(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let id = self.set.spawn(task).id();
        self.names.insert(id, (name, false));
    }

    /// A task that may finish on its own (a one-off job).
    pub fn job(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let id = self.set.spawn(task).id();
        self.names.insert(id, (name, true));
    }

    /// Resolves when a service ends, saying which and how; never while all keep running.
    pub async fn failure(&mut self) -> String {
        loop {
            let Some(ended) = self.set.join_next_with_id().await else {
                return std::future::pending().await;
            };
            let (id, how) = match ended {
                Ok((id, ())) => (id, "returned".to_owned()),
                Err(error) => (error.id(), error.to_string()),
            };
            match self.names.remove(&id) {
                Some((_, true)) => {}
                Some((name, false)) => return format!("{name}: {how}"),
                None => return format!("a background task: {how}"),
            }
        }
    }

    /// Cancels every task and waits for them to end.
    pub async fn stop(mut self) {
        self.set.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_finished_job_is_no_failure_and_a_failed_service_is_named() {
        let mut tasks = Tasks::default();
        tasks.job("one-off", async {});
        tasks.service("forever", std::future::pending());
        tasks.service("fragile", async {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            panic!("boom");
        });
        let failure = tokio::time::timeout(std::time::Duration::from_secs(5), tasks.failure())
            .await
            .expect("the panic is reported");
        assert!(failure.starts_with("fragile: "), "{failure}");
        assert!(failure.contains("panicked"), "{failure}");
        tasks.stop().await;
    }
}
