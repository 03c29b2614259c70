//! Telling an uninstall from a restart. On SIGTERM the agent keeps its pinned programs and maps so that the
//! next agent takes over with no gap in redirection: right for an upgrade, a restart, an eviction. When its
//! DaemonSet is gone (`helm uninstall`, `kubectl delete`), no agent follows, and enrolled pods would keep
//! being redirected to a port nobody listens on. So on SIGTERM an agent that runs in a DaemonSet asks the
//! API server whether the DaemonSet is still there; if it is not (or is being deleted, or the agent's own
//! Role and ServiceAccount are gone with it), the agent un-enrolls every pod and removes its pins, which
//! detaches its programs when it exits.
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::{Api, Client};

/// How long the question may take: SIGTERM handling must not hang on an unreachable API server.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// The DaemonSet this agent's pod belongs to, from the environment the chart sets (downward API).
pub struct Owner {
    pub namespace: String,
    pub daemonset: String,
}

impl Owner {
    /// `WARREN_POD_NAMESPACE` and `WARREN_DAEMONSET`; `None` outside a DaemonSet (a test, a host process).
    pub fn from_env() -> Option<Owner> {
        let namespace = std::env::var("WARREN_POD_NAMESPACE").ok().filter(|n| !n.is_empty())?;
        let daemonset = std::env::var("WARREN_DAEMONSET").ok().filter(|n| !n.is_empty())?;
        Some(Owner { namespace, daemonset })
    }

    /// Whether the DaemonSet is gone or going: then this agent is the last one on its node.
    pub async fn is_gone(&self) -> Result<bool> {
        let ask = async {
            let client = Client::try_default().await.context("in-cluster Kubernetes client")?;
            let daemonsets: Api<DaemonSet> = Api::namespaced(client, &self.namespace);
            match daemonsets.get_opt(&self.daemonset).await {
                Ok(found) => anyhow::Ok(found.is_none_or(|d| d.metadata.deletion_timestamp.is_some())),
                // `helm uninstall` deletes the agent's Role and ServiceAccount along with the DaemonSet: no
                // longer allowed to read it (403), or no longer known at all (401), is an uninstall too.
                Err(kube::Error::Api(e)) if e.code == 401 || e.code == 403 => Ok(true),
                Err(e) => Err(e).with_context(|| format!("reading DaemonSet {}/{}", self.namespace, self.daemonset)),
            }
        };
        tokio::time::timeout(ASK_TIMEOUT, ask).await.context("the API server did not answer in time")?
    }
}
