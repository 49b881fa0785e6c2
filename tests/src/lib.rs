//! End-to-end test support: the fake metadata service and the sandbox fixtures. The tests
//! themselves are in `tests/`; `xtask demo` uses the same sandbox.

pub mod fake_imds;
pub mod fake_kube;
pub mod kubelet;
pub mod sandbox;
pub mod seccomp;
