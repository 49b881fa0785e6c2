//! `cargo xtask image`: the agent's OCI image, built with buildah from this repository alone
//! (no daemon, no registry: `FROM scratch` and a root file system assembled here).
//!
//! The root file system holds the release binary and the shared libraries it is linked
//! against, taken from the same sysroot that linked it (the host's for amd64, Debian's
//! cross libc for arm64), at the paths Debian's dynamic loader searches, and the system's
//! trusted certificates. Nothing else: the agent reads no file of its own at run time beyond
//! these and what the DaemonSet mounts.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{AGENT_RELEASE_BUILD, Result, cargo, output, pgo, run, workspace_root};

/// One architecture the image is built for.
pub struct Arch {
    /// The OCI name (`amd64`, `arm64`).
    pub name: &'static str,
    /// The Rust target, or `None` for the host's own (whose release build `cargo deb` and the
    /// benchmark share).
    triple: Option<&'static str>,
    /// Debian's multiarch directory inside the image, where the loader looks for libraries.
    multiarch: &'static str,
    /// Where the build's libraries are found on this machine.
    sysroot_libs: &'static [&'static str],
    /// Prefix of the cross binutils and C compiler (empty for the host's).
    tool_prefix: &'static str,
    /// The emulator that starts this architecture's binaries here, if it is not native.
    emulator: Option<&'static str>,
}

pub const AMD64: Arch = Arch {
    name: "amd64",
    triple: None,
    multiarch: "x86_64-linux-gnu",
    sysroot_libs: &[
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/lib64",
    ],
    tool_prefix: "",
    emulator: None,
};

/// Graviton and Ampere nodes: cross-built with rustup's target and Debian's cross gcc.
pub const ARM64: Arch = Arch {
    name: "arm64",
    triple: Some("aarch64-unknown-linux-gnu"),
    multiarch: "aarch64-linux-gnu",
    sysroot_libs: &["/usr/aarch64-linux-gnu/lib"],
    tool_prefix: "aarch64-linux-gnu-",
    emulator: Some("qemu-aarch64-static"),
};

pub const ARCHES: [&Arch; 2] = [&AMD64, &ARM64];

/// podman's settings for this machine (runc, cgroupfs, limits it can grant), shared with the
/// container test.
const CONTAINERS_CONF: &str = "tests/containers.conf";

/// Debian's bundle of the system's trusted certificates (the ca-certificates package).
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The repository name of the image in local storage; deploy/ names it with the version tag.
pub const IMAGE: &str = "localhost/imds-agent";

/// Builds the image for every architecture, tagged `IMAGE:<version>-<arch>`; this machine's
/// architecture also as `IMAGE:<version>` (what deploy/ names and the container test runs);
/// and the manifest list `IMAGE:<version>-multiarch` that `podman manifest push --all` sends
/// to a registry. Each is also written as an OCI archive under target/image/.
pub fn image() -> Result {
    if std::env::consts::ARCH != "x86_64" {
        return Err("the image is built on x86_64 machines (arm64 is cross-built there)".into());
    }
    let root = workspace_root();
    let version = package_field(&root.join("imds-agent/Cargo.toml"), "version")?;
    let source = package_field(&root.join("Cargo.toml"), "repository")?;
    let revision = git(&["rev-parse", "HEAD"])?;
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"])?.is_empty();
    // The commit's time, not the build's: the same commit gives the same image.
    let created = git(&["log", "-1", "--format=%ct"])?;
    let out = root.join("target/image");
    fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;

    let labels = [
        ("org.opencontainers.image.title", "imds-agent".to_owned()),
        (
            "org.opencontainers.image.description",
            "Per-cgroup eBPF enforcer for the cloud instance metadata service".to_owned(),
        ),
        ("org.opencontainers.image.version", version.clone()),
        (
            "org.opencontainers.image.revision",
            if dirty {
                format!("{revision}-dirty")
            } else {
                revision
            },
        ),
        ("org.opencontainers.image.source", source),
        ("org.opencontainers.image.licenses", "Apache-2.0".to_owned()),
    ];

    let mut archives = Vec::new();
    for arch in ARCHES {
        let binary = build(arch)?;
        let context = out.join(arch.name);
        assemble_rootfs(arch, &binary, &context.join("rootfs"))?;
        let tag = format!("{IMAGE}:{version}-{}", arch.name);
        let mut bud = Command::new("buildah");
        bud.args(["bud", "--network", "none", "--pull-never", "--layers=false"])
            .args(["--platform", &format!("linux/{}", arch.name)])
            .args(["--timestamp", &created])
            .arg("--file")
            .arg(root.join("packaging/Containerfile"))
            .args(["--tag", &tag]);
        for (key, value) in &labels {
            bud.args(["--label", &format!("{key}={value}")]);
        }
        run(bud.arg(&context))?;
        let archive = out.join(format!("imds-agent-{version}-{}.oci.tar", arch.name));
        let _ = fs::remove_file(&archive);
        run(Command::new("buildah").args([
            "push",
            "--quiet",
            &tag,
            &format!("oci-archive:{}:imds-agent:{version}", archive.display()),
        ]))?;
        archives.push(archive);
        check_starts(arch, &tag, &version)?;
    }

    // This machine's architecture under the plain version tag: what deploy/ names.
    let native = format!("{IMAGE}:{version}");
    run(Command::new("buildah").args(["tag", &format!("{native}-{}", AMD64.name), &native]))?;

    let list = format!("{IMAGE}:{version}-multiarch");
    let _ = Command::new("buildah")
        .args(["manifest", "rm", &list])
        .output();
    run(Command::new("buildah").args(["manifest", "create", &list]))?;
    for arch in ARCHES {
        run(Command::new("buildah").args([
            "manifest",
            "add",
            &list,
            &format!("containers-storage:{IMAGE}:{version}-{}", arch.name),
        ]))?;
    }
    let index = out.join(format!("imds-agent-{version}.oci.tar"));
    let _ = fs::remove_file(&index);
    run(Command::new("buildah").args([
        "manifest",
        "push",
        "--all",
        "--quiet",
        &list,
        &format!("oci-archive:{}:imds-agent:{version}", index.display()),
    ]))?;
    // What a registry gets from `skopeo copy --all`: an index of both architectures.
    let listed = output(Command::new("skopeo").args([
        "inspect",
        "--raw",
        &format!("oci-archive:{}", index.display()),
    ]))?;
    for arch in ARCHES {
        if !listed.contains(&format!("\"architecture\":\"{}\"", arch.name)) {
            return Err(format!(
                "{}: the index lists no {} image: {listed}",
                index.display(),
                arch.name
            ));
        }
    }
    archives.push(index);
    eprintln!("xtask: built {native} (amd64) and the manifest list {list}; archives:");
    for archive in &archives {
        eprintln!("  {}", archive.display());
    }
    Ok(())
}

/// The release binary for `arch`.
fn build(arch: &Arch) -> Result<PathBuf> {
    let mut command = cargo();
    command.args(AGENT_RELEASE_BUILD);
    let Some(triple) = arch.triple else {
        pgo::use_profile(&mut command);
        run(&mut command)?;
        return Ok(workspace_root().join("target/release/imds-agent"));
    };
    let env_triple = triple.replace('-', "_");
    let gcc = format!("{}gcc", arch.tool_prefix);
    command
        .args(["--target", triple])
        .env(
            format!("CARGO_TARGET_{}_LINKER", env_triple.to_uppercase()),
            &gcc,
        )
        // ring's C and assembly.
        .env(format!("CC_{env_triple}"), &gcc)
        .env(
            format!("AR_{env_triple}"),
            format!("{}ar", arch.tool_prefix),
        );
    run(&mut command)?;
    Ok(workspace_root().join(format!("target/{triple}/release/imds-agent")))
}

/// `rootfs/usr/bin/imds-agent`, its program interpreter and every library it needs, found by
/// following DT_NEEDED from the binary through each library.
fn assemble_rootfs(arch: &Arch, binary: &Path, rootfs: &Path) -> Result {
    if rootfs.exists() {
        fs::remove_dir_all(rootfs).map_err(|e| format!("{}: {e}", rootfs.display()))?;
    }
    let bin_dir = rootfs.join("usr/bin");
    fs::create_dir_all(&bin_dir).map_err(|e| format!("{}: {e}", bin_dir.display()))?;
    copy(binary, &bin_dir.join("imds-agent"))?;

    // The trust store of Debian's ca-certificates, where rustls looks for it: the API
    // client verifies a server whose kubeconfig names no CA against it.
    copy(
        Path::new(CA_BUNDLE),
        &rootfs.join(CA_BUNDLE.trim_start_matches('/')),
    )?;

    let readelf = format!("{}readelf", arch.tool_prefix);
    let interpreter = elf_interpreter(&readelf, binary)?;
    let interpreter_name = file_name(&interpreter)?;
    copy(
        &find_library(arch, &interpreter_name)?,
        &rootfs.join(interpreter.trim_start_matches('/')),
    )?;

    let lib_dir = rootfs.join("lib").join(arch.multiarch);
    fs::create_dir_all(&lib_dir).map_err(|e| format!("{}: {e}", lib_dir.display()))?;
    let mut seen = BTreeSet::from([interpreter_name]);
    let mut pending = elf_needed(&readelf, binary)?;
    while let Some(name) = pending.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let found = find_library(arch, &name)?;
        pending.extend(elf_needed(&readelf, &found)?);
        copy(&found, &lib_dir.join(&name))?;
    }
    Ok(())
}

fn find_library(arch: &Arch, name: &str) -> Result<PathBuf> {
    arch.sysroot_libs
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.exists())
        .ok_or_else(|| {
            format!(
                "{} library {name} not found in {:?} (cargo xtask setup installs the cross libc)",
                arch.name, arch.sysroot_libs
            )
        })
}

/// `readelf -d`'s `(NEEDED) Shared library: [libc.so.6]` lines.
fn elf_needed(readelf: &str, path: &Path) -> Result<Vec<String>> {
    let dynamic = output(Command::new(readelf).args(["-d", "-W"]).arg(path))?;
    Ok(dynamic
        .lines()
        .filter(|line| line.contains("(NEEDED)"))
        .filter_map(|line| Some(line.split_once('[')?.1.split_once(']')?.0.to_owned()))
        .collect())
}

/// `readelf -l`'s `[Requesting program interpreter: /lib64/ld-linux-x86-64.so.2]`.
fn elf_interpreter(readelf: &str, path: &Path) -> Result<String> {
    let headers = output(Command::new(readelf).args(["-l", "-W"]).arg(path))?;
    headers
        .lines()
        .find_map(|line| {
            let rest = line.split_once("program interpreter: ")?.1;
            Some(rest.trim_end_matches(']').to_owned())
        })
        .ok_or_else(|| format!("{}: no program interpreter", path.display()))
}

/// Starts the image's own binary (under qemu-user for other architectures, from the image's
/// own root file system, so the libraries it finds are the image's) and checks its version.
fn check_starts(arch: &Arch, tag: &str, version: &str) -> Result {
    let printed = match arch.emulator {
        None => output(
            Command::new("podman")
                .args(["run", "--rm", "--network", "none", tag, "--version"])
                .env("CONTAINERS_CONF", workspace_root().join(CONTAINERS_CONF)),
        )?,
        Some(emulator) => {
            let container = output(Command::new("buildah").args(["from", "--pull-never", tag]))?;
            let mounted = output(Command::new("buildah").args(["mount", &container]));
            let printed = mounted.and_then(|rootfs| {
                output(
                    Command::new(emulator)
                        .arg("-L")
                        .arg(&rootfs)
                        .arg(Path::new(&rootfs).join("usr/bin/imds-agent"))
                        .arg("--version"),
                )
            });
            let _ = Command::new("buildah").args(["rm", &container]).output();
            printed?
        }
    };
    if printed.trim() == format!("imds-agent {version}") {
        eprintln!("xtask: {tag} starts: {}", printed.trim());
        Ok(())
    } else {
        Err(format!(
            "{tag}: `imds-agent --version` printed {printed:?}, not imds-agent {version}"
        ))
    }
}

/// `key = "value"` from a manifest's first table that has it.
fn package_field(manifest: &Path, key: &str) -> Result<String> {
    let text = fs::read_to_string(manifest).map_err(|e| format!("{}: {e}", manifest.display()))?;
    text.lines()
        .find_map(|line| {
            let (name, value) = line.split_once('=')?;
            (name.trim() == key).then(|| value.trim().trim_matches('"').to_owned())
        })
        .ok_or_else(|| format!("{}: no {key}", manifest.display()))
}

fn git(args: &[&str]) -> Result<String> {
    output(Command::new("git").args(args).current_dir(workspace_root()))
}

fn copy(from: &Path, to: &Path) -> Result {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| format!("copy {} to {}: {e}", from.display(), to.display()))
}

fn file_name(path: &str) -> Result<String> {
    Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| format!("{path}: no file name"))
}

/// The image the container test runs its workloads in (pods' curl and botocore): Debian from
/// the package mirror (mmdebstrap), imported into local storage. Rebuilt only when its recipe
/// changes, which the image carries as a label.
pub const WORKLOAD_IMAGE: &str = "localhost/imds-test-workload:latest";
const WORKLOAD_PACKAGES: &str = "curl,python3-botocore";
const RECIPE_LABEL: &str = "dev.imds-agent.recipe";

pub fn workload_image() -> Result {
    let recipe = format!("bookworm essential {WORKLOAD_PACKAGES}");
    let current = Command::new("podman")
        .env("CONTAINERS_CONF", workspace_root().join(CONTAINERS_CONF))
        .args(["image", "inspect", "--format"])
        .arg(format!("{{{{ index .Labels \"{RECIPE_LABEL}\" }}}}"))
        .arg(WORKLOAD_IMAGE)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if current.as_deref() == Some(recipe.as_str()) {
        return Ok(());
    }
    let out = workspace_root().join("target/image");
    fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let tarball = out.join("workload-rootfs.tar");
    run(Command::new("mmdebstrap")
        .args(["--variant=essential", "--quiet", "--format=tar"])
        .arg(format!("--include={WORKLOAD_PACKAGES}"))
        .args([
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "bookworm",
        ])
        .arg(&tarball))?;
    run(Command::new("podman")
        .env("CONTAINERS_CONF", workspace_root().join(CONTAINERS_CONF))
        .args(["import", "--quiet"])
        .args(["--change", &format!("LABEL {RECIPE_LABEL}=\"{recipe}\"")])
        .args(["--change", "CMD [\"sleep\", \"infinity\"]"])
        .arg(&tarball)
        .arg(WORKLOAD_IMAGE))?;
    let _ = fs::remove_file(&tarball);
    Ok(())
}
