//! The start-up taint. Pinned programs survive agent restarts, but not a node's reboot: on a
//! fresh node, pods could start (and fetch credentials) before the agent has attached. Nodes
//! that register with a taint (kubelet `--register-with-taints=KEY=:NoExecute`) keep
//! workloads off until the agent, once attached and synced, removes it
//! (`--remove-node-taint KEY`), as Cilium's agent does with its not-ready taint.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

/// Removes every taint with `key` from `node`; whether there was one. A concurrent change to
/// the node (409) is retried on the new version, so no other taint is lost.
pub async fn remove(client: Client, node: &str, key: &str) -> Result<bool, kube::Error> {
    let api: Api<Node> = Api::all(client);
    loop {
        let current = api.get(node).await?;
        let taints = current
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        if !taints.iter().any(|t| t.key == key) {
            return Ok(false);
        }
        let keep: Vec<_> = taints.into_iter().filter(|t| t.key != key).collect();
        // The resourceVersion makes the merge patch conditional on the node as read.
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": current.metadata.resource_version},
            "spec": {"taints": keep},
        });
        match api
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(error) => return Err(error),
        }
    }
}

/// Waits until `ready()`, then removes the taint, retrying every few seconds on errors.
pub async fn remove_when_ready(
    client: Client,
    node: String,
    key: String,
    ready: impl Fn() -> bool,
) {
    while !ready() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    loop {
        match remove(client.clone(), &node, &key).await {
            Ok(removed) => {
                tracing::info!(%node, taint = %key, removed, "start-up taint handled: enforcing, pods may start");
                return;
            }
            Err(error) => {
                tracing::warn!(%node, taint = %key, %error, "cannot remove the start-up taint; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}
