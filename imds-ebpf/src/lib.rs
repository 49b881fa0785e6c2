//! Kernel programs of the enforcer. The programs live in the `imds-ebpf` binary (`src/main.rs`);
//! this library exists so that `imds-agent` can build-depend on the crate and be rebuilt when
//! it changes (the aya-template layout).
#![no_std]
