//! The end-to-end tests, one module per area, built as one test binary: the agent, kube-rs
//! and hyper are linked once instead of once per area. Each area runs against the real kernel
//! in sandboxes of its own (see `imds_tests::sandbox`), so areas run side by side safely.

mod attacks;
mod azure;
mod cli;
mod containers;
mod deploy;
mod enforcer;
mod gcp;
mod host;
mod identity;
mod kubernetes;
mod pods;
mod providers;
mod shield;
mod suggest;
mod support;
mod tokens;
mod upgrades;
mod views;
mod workloads;
