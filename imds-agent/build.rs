//! Builds the kernel programs with aya-build and leaves the object in OUT_DIR/imds-ebpf, where
//! `loader` embeds it. With AYA_BUILD_SKIP=1 an empty stub is written instead, so host-only
//! checks (clippy, docs) compile without the BPF toolchain; loading a stub fails at run time.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        fs::write(out_dir.join("imds-ebpf"), [])?;
    }
    let ebpf = aya_build::Package {
        name: "imds-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../imds-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}
