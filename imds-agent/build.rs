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
    git_revision();
    let ebpf = aya_build::Package {
        name: "imds-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../imds-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}

/// IMDS_AGENT_REVISION: the commit the agent is built from (`imds_agent_build_info`), when
/// built from a git checkout. Rebuilt when the checked-out commit changes.
fn git_revision() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let Some(revision) = git(&["rev-parse", "HEAD"]) else {
        return;
    };
    println!("cargo:rustc-env=IMDS_AGENT_REVISION={revision}");
    for watched in ["HEAD", "packed-refs"] {
        if let Some(path) = git(&["rev-parse", "--git-path", watched]) {
            println!("cargo:rerun-if-changed={root}/{path}");
        }
    }
    if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"])
        && let Some(path) = git(&["rev-parse", "--git-path", &reference])
    {
        println!("cargo:rerun-if-changed={root}/{path}");
    }
}
