//! What several areas' tests share.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Polls `done` until it holds or `limit` has passed; one last look at the end.
pub fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done()
}

/// A kustomization that enables components of deploy/ (`startup-taint`, `seccomp`), as a
/// user's overlay does (kustomize takes only relative paths, so it lives under target/);
/// removed on drop.
pub struct Overlay(pub PathBuf);

impl Overlay {
    pub fn with(components: &[&str]) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = repo().join(format!("target/overlay-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("overlay directory");
        let components: Vec<String> = components
            .iter()
            .map(|c| format!("../../deploy/{c}"))
            .collect();
        std::fs::write(
            dir.join("kustomization.yaml"),
            format!(
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
                 resources: [../../deploy]\ncomponents: [{}]\n",
                components.join(", ")
            ),
        )
        .expect("overlay");
        Self(dir)
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
