//! Pods on the real local cluster, for the scenarios that run the kubelet's pods.
use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::PostParams,
    runtime::{conditions, wait::await_condition},
};

/// The busybox image the local node imports when it starts (xtask/scripts/k8s-build.sh).
pub const BUSYBOX: &str = "docker.io/library/busybox:1.35-local";

/// Creates a pod once its namespace's default ServiceAccount exists (the controller-manager makes it
/// shortly after the namespace; admission refuses pods until then).
pub async fn create_pod(api: &Api<Pod>, pod: &Pod) -> Result<Pod> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match api.create(&PostParams::default(), pod).await {
            Ok(created) => return Ok(created),
            Err(e) if tokio::time::Instant::now() < deadline && e.to_string().contains("serviceaccount") => {
                tokio::time::sleep(Duration::from_millis(300)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A busybox pod `name` (label `app: name`) running `sh -c command`, once it is Running.
pub async fn busybox_pod(pods: &Api<Pod>, name: &str, command: &str) -> Result<Pod> {
    let object: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"containers": [{"name": "c", "image": BUSYBOX, "imagePullPolicy": "Never",
                 "command": ["sh", "-c", command]}],
                 "terminationGracePeriodSeconds": 1}
    }))?;
    create_pod(pods, &object).await?;
    tokio::time::timeout(Duration::from_secs(120), await_condition(pods.clone(), name, conditions::is_pod_running()))
        .await
        .map_err(|_| anyhow::anyhow!("pod {name} not Running within 120 s"))??;
    Ok(pods.get(name).await?)
}

/// A client that fetches `http://to/hostname` every 200 ms and prints `ok` after each answer.
pub fn fetch_loop(to: &str) -> String {
    format!("while true; do wget -q -O /dev/null http://{to}/hostname && echo ok; sleep 0.2; done")
}

/// How many of its requests pod `name` (a [`fetch_loop`]) says were answered.
pub async fn answered(pods: &Api<Pod>, name: &str) -> Result<usize> {
    Ok(pods.logs(name, &Default::default()).await?.lines().filter(|l| *l == "ok").count())
}
