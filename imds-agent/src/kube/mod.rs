//! Kubernetes: the policy resources and the watches that feed the agent (this node's pods,
//! ImdsPolicies, ClusterImdsPolicies).

pub mod crd;
pub mod events;
pub mod taint;
pub mod watch;

#[cfg(test)]
mod watch_tests;
