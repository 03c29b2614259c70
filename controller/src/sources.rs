//! Where the controller's input comes from: kube-rs reflectors over the Kubernetes API, or a directory of
//! YAML files. Either hands whole [`ClusterState`]s to the pipeline ([`States`]), coalescing bursts of changes.
use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1 as core;
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt, reflector, reflector::Store, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, mpsc};
use tracing::{error, info, warn};
use warren_config::{
    analyze::{Level, Message},
    cluster::{ClusterState, namespace_from_k8s, pod_from_k8s},
    istio::{AuthorizationPolicy, DestinationRule, Gateway, ServiceEntry, VirtualService},
    load::Directory,
    workloads::peer_authentication::PeerAuthentication,
};

use crate::pipeline::States;

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
    watch_selected(api, watcher::Config::default(), changed, what)
}

fn watch_selected<K>(api: Api<K>, config: watcher::Config, changed: Arc<Notify>, what: &'static str) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    tokio::spawn(async move {
        let mut stream = reflector(writer, watcher(api, config)).default_backoff().touched_objects().boxed();
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
    /// TLS credentials for gateways' `credentialName`.
    secrets: Store<core::Secret>,
    /// `istio` ConfigMaps (Istio's mesh config).
    mesh_config_maps: Store<core::ConfigMap>,
}

/// Only Secrets that hold a certificate, a key or a CA as Istio's credentials do are kept in the state.
fn is_credential(secret: &core::Secret) -> bool {
    const KEYS: [&str; 6] = ["tls.crt", "tls.key", "cert", "key", "ca.crt", "cacert"];
    let has = |keys: Option<Vec<&String>>| keys.is_some_and(|k| k.iter().any(|k| KEYS.contains(&k.as_str())));
    has(secret.data.as_ref().map(|d| d.keys().collect())) || has(secret.string_data.as_ref().map(|d| d.keys().collect()))
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
            secrets: self.secrets.state().iter().filter(|s| is_credential(s)).map(|s| (**s).clone()).collect(),
            mesh_config_maps: all(self.mesh_config_maps.state()),
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
            let _ = self.secrets.wait_until_ready().await;
            let _ = self.mesh_config_maps.wait_until_ready().await;
        };
        if tokio::time::timeout(Duration::from_secs(5), istio).await.is_err() {
            warn!("Istio's CRDs are not (all) served yet (install deploy/helm/warren/crds/istio.yaml); continuing, their watches retry");
        }
        Ok(())
    }
}

/// Watches everything the controller compiles; the first state is the full one once every list has synced.
pub async fn kubernetes(client: Client) -> Result<States> {
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
        peer_authentications: watch_kind(Api::all(client.clone()), c(), "PeerAuthentication"),
        secrets: watch_kind(Api::all(client.clone()), c(), "secret"),
        mesh_config_maps: watch_selected(
            Api::all(client),
            watcher::Config::default().fields(&format!("metadata.name={}", warren_config::compile::MESH_CONFIG_MAP)),
            c(),
            "istio ConfigMap",
        ),
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
    let (tx, states) = States::channel(initial);
    tokio::spawn(async move {
        loop {
            changed.notified().await;
            tokio::time::sleep(COALESCE).await;
            // While the pipeline is busy this waits; changes meanwhile leave a permit in `changed`, so the
            // next pass takes a fresh snapshot.
            if tx.send(stores.snapshot()).await.is_err() {
                return;
            }
        }
    });
    Ok(states)
}

/// Reads `dir` now and again whenever a file in it changes (only the files that changed). What cannot be
/// read is logged and left out — or, if it was read before, its last good version stays — so a bad file
/// neither stops `run` from starting nor changes what was in force. Fails only if `dir` cannot be listed.
pub fn directory(dir: PathBuf, poll: Duration) -> Result<States> {
    let mut files = Directory::new(&dir);
    files.refresh()?;
    let initial = files.state();
    log_notices(&[], &initial.notices);
    info!(dir = %dir.display(), pods = initial.pods.len(), services = initial.services.len(),
        virtual_services = initial.virtual_services.len(), "reading the config directory");
    let logged = initial.notices.clone();
    let (tx, states) = States::channel(initial);
    // A thread of its own: reading a large file blocks, and must not hold up the runtime's workers.
    std::thread::Builder::new()
        .name("config-dir".into())
        .spawn(move || poll_directory(files, dir, poll, tx, logged))
        .context("starting the config directory thread")?;
    Ok(states)
}

fn poll_directory(mut files: Directory, dir: PathBuf, poll: Duration, tx: mpsc::Sender<ClusterState>, mut logged: Vec<Message>) {
    while !tx.is_closed() {
        std::thread::sleep(poll);
        // Reading catches its own panics per file; this catches the rest, so no bug stops the polling.
        let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            files.refresh().map(|changed| changed.then(|| files.state()))
        }));
        match step {
            Ok(Ok(Some(state))) => {
                log_notices(&logged, &state.notices);
                logged = state.notices.clone();
                info!(dir = %dir.display(), "config directory changed");
                // Waits while the pipeline compiles the state before (the directory is polled again after).
                if tx.blocking_send(state).is_err() {
                    return;
                }
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => warn!("{e:#}; keeping the previous config"),
            Err(_) => error!(dir = %dir.display(), "reading the config directory panicked (a bug); keeping the previous config"),
        }
    }
}

/// Logs the notices not logged before (a file read again repeats those of the files that did not change).
fn log_notices(before: &[Message], now: &[Message]) {
    for notice in now.iter().filter(|n| !before.contains(n)) {
        match notice.level {
            Level::Error | Level::Warning => warn!("{notice}"),
            Level::Info => info!("{notice}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vs(name: &str, host: &str) -> String {
        format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}}}\nspec: {{hosts: [{host}]}}\n")
    }

    fn hosts(state: &ClusterState) -> Vec<String> {
        state.virtual_services.iter().map(|v| v.spec.hosts.join(",")).collect()
    }

    /// Waits for the next state handed over.
    fn next(states: &mut States) -> ClusterState {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(state) = states.changes.try_recv() {
                return state;
            }
            assert!(std::time::Instant::now() < deadline, "no new state");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_bad_file_neither_stops_the_start_nor_replaces_what_was_read() {
        let dir = std::env::temp_dir().join(format!("warren-sources-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), vs("a", "one")).unwrap();
        std::fs::write(dir.join("b.yaml"), "b: [\n").unwrap();
        let mut rx = directory(dir.clone(), Duration::from_millis(5)).expect("starts despite b.yaml");
        let first = rx.first.clone();
        assert_eq!(hosts(&first), ["one"]);
        assert!(first.notices.iter().any(|n| n.level == Level::Error && n.source.as_deref() == Some("b.yaml:2")), "{:?}", first.notices);
        // Written whole, by rename, as ConfigMap mounts and many editors do (a poll between truncate and write
        // would see an empty file, which holds no objects).
        let write = |text: &str| {
            std::fs::write(dir.join("a.tmp"), text).unwrap();
            std::fs::rename(dir.join("a.tmp"), dir.join("a.yaml")).unwrap();
        };
        // a.yaml broken: its last good version stays; then fixed: the edit applies.
        write("a: [\n");
        assert_eq!(hosts(&next(&mut rx)), ["one"]);
        write(&vs("a", "two"));
        assert_eq!(hosts(&next(&mut rx)), ["two"]);
        std::fs::remove_dir_all(&dir).unwrap();
        // Control: a directory that cannot be listed is the one thing that stops the start.
        assert!(directory(dir, Duration::from_millis(5)).is_err());
    }
}
