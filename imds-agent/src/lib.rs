//! The imds-agent: loads the kernel programs that divert metadata connections from enforced
//! cgroups to the agent, identifies each caller, and serves or denies each request by policy.

pub mod audit;
pub mod calendar;
pub mod cases;
pub mod cli;
pub mod detect;
pub mod explain;
pub mod fs;
pub mod handover;
pub mod identity;
pub mod inventory;
pub mod kube;
pub mod loader;
pub mod metrics;
pub mod node;
pub mod notify;
pub mod policy;
pub mod provider;
pub mod proxy;
pub mod reduce;
pub mod run;
pub mod status;
pub mod supervisor;
pub mod tally;
