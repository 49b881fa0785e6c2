//! Profile-guided optimisation of the agent's amd64 release build.
//!
//! `cargo xtask pgo` builds an instrumented agent, runs section 4's requests through it in a
//! sandbox (`imds-bench train`), and merges what it counted into
//! `imds-agent/pgo/x86_64-llvm<N>.profdata`, which is committed: the same commit then gives
//! the same binary, and building needs no root or eBPF. The release builds this tool runs for
//! amd64 (the image, the package, the benchmark) are optimised with it (`use_profile`).
//!
//! A profile is read only by the LLVM it was written with (N is its major version), so a
//! rustc with another LLVM builds without one and says so. Functions changed since the
//! profile was recorded are optimised as if there were none; `cargo xtask pgo` again brings
//! them back.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{AGENT_RELEASE_BUILD, Result, cargo, output, run, workspace_root};

/// Cargo's per-target flags: unlike RUSTFLAGS, they leave the eBPF build (bpfel) alone.
const TARGET_RUSTFLAGS: &str = "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS";

/// The directory of the committed profiles.
fn profile_dir() -> PathBuf {
    workspace_root().join("imds-agent/pgo")
}

/// The profile recorded with LLVM `major`.
fn profile_path(major: u32) -> PathBuf {
    profile_dir().join(format!("x86_64-llvm{major}.profdata"))
}

/// The LLVM major version in `rustc -vV`'s output ("LLVM version: 22.1.2").
fn llvm_major(rustc_version: &str) -> Option<u32> {
    rustc_version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|version| version.split('.').next())
        .and_then(|major| major.trim().parse().ok())
}

/// The LLVM major version of the rustc cargo runs.
fn rustc_llvm_major() -> Result<u32> {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = output(
        Command::new(&rustc)
            .arg("-vV")
            .current_dir(workspace_root()),
    )?;
    llvm_major(&version).ok_or_else(|| format!("{rustc} -vV names no LLVM version: {version}"))
}

/// The profile a release build of the host's architecture is optimised with, or why it goes
/// without.
fn chosen_profile(
    host_arch: &str,
    llvm: Result<u32>,
    exists: impl Fn(&Path) -> bool,
    flags_set: bool,
) -> Result<PathBuf> {
    if host_arch != "x86_64" {
        return Err(format!("no profile for {host_arch} builds"));
    }
    if flags_set {
        return Err(format!(
            "RUSTFLAGS or {TARGET_RUSTFLAGS} is set, and cargo would use it instead"
        ));
    }
    let major = llvm?;
    let profile = profile_path(major);
    if !exists(&profile) {
        return Err(format!(
            "no profile recorded with rustc's LLVM {major} ({}); `cargo xtask pgo` records one",
            profile.display()
        ));
    }
    Ok(profile)
}

/// The flags that optimise with `profile`. Cargo rebuilds when flags change, not when a file
/// they name does: the profile is passed as a copy named by its contents, so a new recording
/// rebuilds every crate with it.
fn flags_for(profile: &Path) -> Result<String> {
    use std::hash::{Hash as _, Hasher as _};
    let bytes = fs::read(profile).map_err(|e| format!("{}: {e}", profile.display()))?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    let dir = workspace_root().join("target/pgo/use");
    let copy = dir.join(format!("{:016x}.profdata", hasher.finish()));
    if !copy.is_file() {
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        fs::write(&copy, &bytes).map_err(|e| format!("{}: {e}", copy.display()))?;
    }
    let copy = copy.display().to_string();
    if copy.contains(char::is_whitespace) {
        return Err(format!(
            "{copy}: a path with spaces cannot be passed in rustflags"
        ));
    }
    Ok(format!("-Cprofile-use={copy}"))
}

/// `cargo ARGS` for a release build, optimised with the committed profile where it can be.
pub fn release_cargo(args: &[&str]) -> Command {
    let mut command = cargo();
    command.args(args);
    use_profile(&mut command);
    command
}

/// Optimises a release build of the host's architecture with the committed profile, or says
/// why it goes without. Every release build this tool runs calls it, so that they share one
/// set of flags (and cargo's cache).
pub fn use_profile(command: &mut Command) {
    let flags_set = env::var_os("RUSTFLAGS").is_some() || env::var_os(TARGET_RUSTFLAGS).is_some();
    match chosen_profile(
        env::consts::ARCH,
        rustc_llvm_major(),
        Path::is_file,
        flags_set,
    )
    .and_then(|profile| flags_for(&profile))
    {
        Ok(flags) => {
            command.env(TARGET_RUSTFLAGS, flags);
        }
        Err(why) => eprintln!("xtask: release build without the agent's profile (PGO): {why}"),
    }
}

/// `cargo xtask pgo`: records the profile again (root, cgroup v2 and eBPF, as the benchmark).
pub fn pgo() -> Result {
    if env::consts::ARCH != "x86_64" {
        return Err("the profile is recorded on x86_64 machines".into());
    }
    let root = workspace_root();
    let major = rustc_llvm_major()?;
    let profdata = format!("llvm-profdata-{major}");
    if output(Command::new(&profdata).arg("--version")).is_err() {
        return Err(format!(
            "{profdata} is missing: it comes with Debian's llvm-{major} (`cargo xtask setup` \
             installs LLVM 22)"
        ));
    }
    let work = root.join("target/pgo");
    let counts = work.join("counts");
    empty_dir(&counts)?;

    // The instrumented build has a target directory of its own, so that the release build's
    // cache is not rebuilt with other flags. Like the release build, it names no `--target`:
    // cargo gives crates built for an explicit target other symbol names, which the release
    // build would then not find in the profile.
    let mut instrumented = cargo();
    instrumented
        .args(AGENT_RELEASE_BUILD)
        .arg("--target-dir")
        .arg(&work)
        .env(
            TARGET_RUSTFLAGS,
            format!("-Cprofile-generate={}", counts.display()),
        );
    run(&mut instrumented)?;
    // Build scripts are instrumented as well (without `--target` the flags reach them too):
    // what they counted while building is not the agent's.
    empty_dir(&counts)?;
    // The sandbox's clients and fake metadata service.
    run(&mut release_cargo(&[
        "build",
        "--release",
        "-p",
        "imds-tests",
        "--bins",
    ]))?;
    run(Command::new(root.join("target/release/imds-bench"))
        .arg("train")
        .arg(work.join("release/imds-agent"))
        .current_dir(&root))?;

    let mut raw: Vec<PathBuf> = fs::read_dir(&counts)
        .map_err(|e| format!("{}: {e}", counts.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "profraw"))
        .collect();
    if raw.is_empty() {
        return Err(format!(
            "{}: the instrumented agent wrote no counts",
            counts.display()
        ));
    }
    raw.sort();
    let dir = profile_dir();
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let profile = profile_path(major);
    // Sparse: functions that never ran are left out (a tenth of the size), not marked cold.
    run(Command::new(&profdata)
        .args(["merge", "--sparse", "-o"])
        .arg(&profile)
        .args(&raw))?;
    // Profiles of other LLVM versions are of an older toolchain.
    for entry in fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path != profile && path.extension().is_some_and(|ext| ext == "profdata") {
            fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    eprintln!(
        "xtask: wrote {}; commit it. `imds-bench builds` compares a build without it.",
        profile.display()
    );
    Ok(())
}

/// Makes `dir` an empty directory.
fn empty_dir(dir: &Path) -> Result {
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_is_read_from_rustcs_verbose_version() {
        let version = "rustc 1.95.0 (59807616e 2026-04-14)\nbinary: rustc\n\
                       host: x86_64-unknown-linux-gnu\nrelease: 1.95.0\nLLVM version: 22.1.2\n";
        assert_eq!(llvm_major(version), Some(22));
        assert_eq!(llvm_major("rustc 1.95.0\nrelease: 1.95.0\n"), None);
        assert_eq!(llvm_major("LLVM version: x.1\n"), None);
    }

    #[test]
    fn the_profile_is_used_only_by_the_llvm_that_wrote_it() {
        let recorded = profile_path(22);
        let exists = |path: &Path| path == recorded;
        assert_eq!(
            chosen_profile("x86_64", Ok(22), exists, false),
            Ok(recorded.clone())
        );
        let other = chosen_profile("x86_64", Ok(23), exists, false).unwrap_err();
        assert!(other.contains("LLVM 23"), "{other}");
        assert!(other.contains("cargo xtask pgo"), "{other}");
        // Not on arm64 (the image's cross build), not over flags the user set, and not when
        // rustc cannot be asked.
        assert!(chosen_profile("aarch64", Ok(22), exists, false).is_err());
        let set = chosen_profile("x86_64", Ok(22), exists, true).unwrap_err();
        assert!(set.contains("RUSTFLAGS"), "{set}");
        assert!(chosen_profile("x86_64", Err("no rustc".into()), exists, false).is_err());
    }

    #[test]
    fn a_new_recording_is_passed_under_a_new_name() {
        let dir = env::temp_dir().join(format!("xtask-pgo-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let profile = dir.join("x86_64-llvm22.profdata");
        fs::write(&profile, b"first recording").unwrap();
        let first = flags_for(&profile).unwrap();
        assert_eq!(
            flags_for(&profile).unwrap(),
            first,
            "same contents, same flags"
        );
        fs::write(&profile, b"second recording").unwrap();
        let second = flags_for(&profile).unwrap();
        assert_ne!(second, first);
        let copy = second.strip_prefix("-Cprofile-use=").unwrap();
        assert_eq!(fs::read(copy).unwrap(), b"second recording");
        for flags in [first, second] {
            fs::remove_file(flags.strip_prefix("-Cprofile-use=").unwrap()).unwrap();
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
