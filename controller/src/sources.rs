//! Where the controller's input comes from: kube-rs reflectors over the Kubernetes API, or a directory of
//! YAML files. Either publishes whole [`ClusterState`]s on a watch channel, coalescing bursts of changes.
use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1 as core;
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt, reflector, reflector::Store, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tracing::{info, warn};
use warren_config::{
    cluster::{ClusterState, namespace_from_k8s, pod_from_k8s},
    istio::{AuthorizationPolicy, DestinationRule, Gateway, ServiceEntry, VirtualService},
    workloads::peer_authentication::PeerAuthentication,
};

/// Changes closer together than this are compiled once.
const COALESCE: Duration = Duration::from_millis(20);

/// PeerAuthentication as a typed API resource (the agent-side type has no kube derive).
mod peer_authentication {
    use kube::CustomResource;
    use serde::{Deserialize, Serialize};

    #[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[kube(group = "security.istio.io", version = "v1", kind = "PeerAuthentication", namespaced, schema = "disabled")]
    pub struct PeerAuthenticationSpec {
        #[serde(flatten)]
        pub fields: std::collections::BTreeMap<String, serde_json::Value>,
    }
}

fn watch_kind<K>(api: Api<K>, changed: Arc<Notify>, what: &'static str) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    tokio::spawn(async move {
        let mut stream = reflector(writer, watcher(api, watcher::Config::default())).default_backoff().touched_objects().boxed();
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                warn!("{what} watch: {e}");
            }
            changed.notify_one();
        }
    });
    store
}

struct Stores {
    namespaces: Store<core::Namespace>,
    pods: Store<core::Pod>,
    services: Store<core::Service>,
    endpoints: Store<core::Endpoints>,
    virtual_services: Store<VirtualService>,
    destination_rules: Store<DestinationRule>,
    gateways: Store<Gateway>,
    service_entries: Store<ServiceEntry>,
    authorization_policies: Store<AuthorizationPolicy>,
    peer_authentications: Store<peer_authentication::PeerAuthentication>,
}

fn all<K: Clone>(objects: Vec<Arc<K>>) -> Vec<K> {
    objects.into_iter().map(|o| (*o).clone()).collect()
}

impl Stores {
    fn snapshot(&self) -> ClusterState {
        ClusterState {
            namespaces: self.namespaces.state().iter().map(|n| namespace_from_k8s(n)).collect(),
            pods: self.pods.state().iter().filter_map(|p| pod_from_k8s(p)).collect(),
            services: all(self.services.state()),
            endpoints: all(self.endpoints.state()),
            virtual_services: all(self.virtual_services.state()),
            destination_rules: all(self.destination_rules.state()),
            gateways: all(self.gateways.state()),
            service_entries: all(self.service_entries.state()),
            authorization_policies: all(self.authorization_policies.state()),
            peer_authentications: self
                .peer_authentications
                .state()
                .iter()
                .filter_map(|p| {
                    // Re-read through the agent's type: same JSON, the fields the agent evaluates.
                    let value = serde_json::to_value(p.as_ref()).ok()?;
                    serde_json::from_value::<PeerAuthentication>(value).ok()
                })
                .collect(),
            ..Default::default()
        }
    }

    /// Waits for the core kinds; the Istio kinds get a few seconds — without their CRDs the controller still
    /// runs (and its CA serves), and their watchers fill in once the CRDs are installed.
    async fn wait_until_ready(&self) -> Result<()> {
        let core = async {
            self.namespaces.wait_until_ready().await?;
            self.pods.wait_until_ready().await?;
            self.services.wait_until_ready().await?;
            self.endpoints.wait_until_ready().await
        };
        tokio::time::timeout(Duration::from_secs(60), core)
            .await
            .context("initial list of namespaces, pods, services and endpoints timed out")?
            .context("initial list of namespaces, pods, services and endpoints")?;
        let istio = async {
            let _ = self.virtual_services.wait_until_ready().await;
            let _ = self.destination_rules.wait_until_ready().await;
            let _ = self.gateways.wait_until_ready().await;
            let _ = self.service_entries.wait_until_ready().await;
            let _ = self.authorization_policies.wait_until_ready().await;
            let _ = self.peer_authentications.wait_until_ready().await;
        };
        if tokio::time::timeout(Duration::from_secs(5), istio).await.is_err() {
            warn!("Istio's CRDs are not (all) served yet (install deploy/crds/istio.yaml); continuing, their watches retry");
        }
        Ok(())
    }
}

/// Watches everything the controller compiles; the receiver holds the first full state once every list
/// has synced.
pub async fn kubernetes(client: Client) -> Result<watch::Receiver<ClusterState>> {
    let changed = Arc::new(Notify::new());
    let c = || changed.clone();
    let stores = Stores {
        namespaces: watch_kind(Api::all(client.clone()), c(), "namespace"),
        pods: watch_kind(Api::all(client.clone()), c(), "pod"),
        services: watch_kind(Api::all(client.clone()), c(), "service"),
        endpoints: watch_kind(Api::all(client.clone()), c(), "endpoints"),
        virtual_services: watch_kind(Api::all(client.clone()), c(), "VirtualService"),
        destination_rules: watch_kind(Api::all(client.clone()), c(), "DestinationRule"),
        gateways: watch_kind(Api::all(client.clone()), c(), "Gateway"),
        service_entries: watch_kind(Api::all(client.clone()), c(), "ServiceEntry"),
        authorization_policies: watch_kind(Api::all(client.clone()), c(), "AuthorizationPolicy"),
        peer_authentications: watch_kind(Api::all(client), c(), "PeerAuthentication"),
    };
    stores.wait_until_ready().await?;
    let initial = stores.snapshot();
    info!(
        namespaces = initial.namespaces.len(),
        pods = initial.pods.len(),
        services = initial.services.len(),
        virtual_services = initial.virtual_services.len(),
        "watching the Kubernetes API"
    );
    let (tx, rx) = watch::channel(initial);
    tokio::spawn(async move {
        loop {
            changed.notified().await;
            tokio::time::sleep(COALESCE).await;
            if tx.send(stores.snapshot()).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// Reads `dir` now (failing if it is invalid) and again whenever a file in it changes; an invalid edit is
/// logged and the last good state stays.
pub fn directory(dir: PathBuf, poll: Duration) -> Result<watch::Receiver<ClusterState>> {
    let initial = ClusterState::from_dir(&dir)?;
    let (tx, rx) = watch::channel(initial);
    tokio::spawn(async move {
        let mut last = fingerprint(&dir);
        loop {
            tokio::time::sleep(poll).await;
            let now = fingerprint(&dir);
            if now == last {
                continue;
            }
            last = now;
            match ClusterState::from_dir(&dir) {
                Ok(state) => {
                    info!(dir = %dir.display(), "config directory changed");
                    if tx.send(state).is_err() {
                        return;
                    }
                }
                Err(e) => warn!("{e:#}; keeping the previous config"),
            }
        }
    });
    Ok(rx)
}

/// Names, sizes and modification times of the directory's files.
fn fingerprint(dir: &std::path::Path) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((e.path(), meta.len(), meta.modified().ok()))
        })
        .collect();
    files.sort();
    files
}
