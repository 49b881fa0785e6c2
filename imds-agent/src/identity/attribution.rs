//! Attribution: the kernel's record of a connection becoming an identity. A pod's connection
//! may arrive before the pod watch reports the pod; it waits for it, within bounds.

use std::{sync::Arc, time::Duration};

use imds_common::Caller;

use super::{Identity, Resolver, Workload};

/// The identity of the caller the kernel recorded. `pod_wait` bounds how long a connection
/// from a pod not yet known waits for the pod watch (zero: not at all). `digests`: whether a
/// policy pins executables' digests (only then are they read).
pub async fn attribute(
    resolver: &Resolver,
    caller: &Caller,
    pod_wait: Duration,
    digests: bool,
) -> Arc<Identity> {
    resolver.want_digests(digests);
    let identity = resolver.identify(caller);
    let Workload::Pod { pod_uid, .. } = &identity.workload else {
        return identity;
    };
    if identity.pod.is_some() || pod_wait.is_zero() {
        return identity;
    }
    // Started before the watch reported it: wait for it, within bounds. After that the caller
    // has no pod metadata, so no namespace's or pod's policy can select it.
    if resolver.pods().wait_for(pod_uid, pod_wait).await.is_some() {
        return resolver.identify(caller);
    }
    tracing::warn!(pod_uid = %pod_uid, wait = ?pod_wait, "a pod the API server has not reported: deciding without pod metadata");
    identity
}
