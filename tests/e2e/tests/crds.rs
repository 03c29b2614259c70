//! Istio's CRDs as Warren ships them (deploy/helm/warren/crds/istio.yaml), on the real local kube-apiserver (v1.20):
//! they become Established; Istio's bookinfo networking samples apply unchanged and read back identical at
//! every served version; the structural schemas refuse wrongly typed fields; and fields Warren does not
//! model are kept as written.
use std::{
    collections::BTreeSet,
    panic::AssertUnwindSafe,
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::{api::core::v1::Namespace, apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition};
use kube::{
    Client, Config, ResourceExt,
    api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{conditions, wait::await_condition},
};
use serde::Deserialize;
use serde_json::{Value, json};
use warren_testbed::{in_ci, require_privileges};

static CLUSTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

const NAMESPACE: &str = "bookinfo";

/// Skips (or under CI fails) when the local cluster is not built.
fn cluster_built() -> bool {
    if xtask::cluster::is_built() {
        return true;
    }
    let reason = "the local Kubernetes is not built (cargo xtask setup --kubernetes)";
    assert!(!in_ci(), "CI=true, but {reason}");
    eprintln!("SKIPPED: {reason}");
    false
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Istio's bookinfo samples (shared conformance data, outside the project); skips (or under CI fails)
/// when they are not there.
fn bookinfo_samples() -> Option<PathBuf> {
    // Beside the project (../shared), or where $WARREN_CONFORMANCE_DIR says, or the machines' shared copy.
    let candidates = [
        std::env::var_os("WARREN_CONFORMANCE_DIR").map(PathBuf::from),
        Some(workspace().join("../shared/conformance/istio-bookinfo")),
        Some(PathBuf::from("/work/shared/conformance/istio-bookinfo")),
    ];
    if let Some(dir) = candidates.iter().flatten().find(|d| d.is_dir()) {
        return Some(dir.clone());
    }
    let dir = workspace().join("../shared/conformance/istio-bookinfo");
    let reason = format!("Istio's bookinfo samples are not at {}", dir.display());
    assert!(!in_ci(), "CI=true, but {reason}");
    eprintln!("SKIPPED: {reason}");
    None
}

/// The versions each Istio group serves (all with the same schema).
fn served_versions(group: &str) -> &'static [&'static str] {
    match group {
        "networking.istio.io" => &["v1", "v1beta1", "v1alpha3"],
        "security.istio.io" => &["v1", "v1beta1"],
        other => panic!("not an Istio group: {other}"),
    }
}

#[test]
fn istio_crds_accept_istio_yaml_unchanged_and_refuse_wrong_types() {
    require_privileges!();
    if !cluster_built() {
        return;
    }
    let Some(samples) = bookinfo_samples() else { return };
    let _cluster = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    // A failed assertion inside the scenario must not leave the cluster running: catch it, bring the
    // cluster down, then report.
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let kubeconfig = xtask::cluster::up(false)?;
        tokio::runtime::Runtime::new()?.block_on(scenario(&kubeconfig, &samples))
    }));
    xtask::cluster::down().unwrap();
    match result {
        Ok(result) => result.unwrap(),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

async fn scenario(kubeconfig: &Path, samples: &Path) -> anyhow::Result<()> {
    let config = Config::from_custom_kubeconfig(Kubeconfig::read_from(kubeconfig)?, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;

    // 1. Every CRD applies and becomes Established.
    let installed = install_crds(&client).await?;
    let expected: BTreeSet<String> = [
        "virtualservices.networking.istio.io",
        "destinationrules.networking.istio.io",
        "gateways.networking.istio.io",
        "serviceentries.networking.istio.io",
        "peerauthentications.security.istio.io",
        "authorizationpolicies.security.istio.io",
    ]
    .map(String::from)
    .into();
    assert_eq!(installed, expected);

    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": NAMESPACE}}))?).await?;

    // 2 + 3. Every bookinfo sample is accepted as it is and reads back identical at every served version.
    // Files reuse names (two `ratings` VirtualServices...), so each file's objects go before the next.
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(samples)?.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "yaml")).collect();
    files.sort();
    assert!(files.len() >= 8, "expected Istio's bookinfo samples in {}, found {files:?}", samples.display());
    let mut kinds = BTreeSet::new();
    for file in &files {
        let file_name = file.file_name().unwrap().to_string_lossy().into_owned();
        let documents = yaml_documents(file)?;
        assert!(!documents.is_empty(), "{file_name}: no YAML documents");
        // The CRDs are under test: the platform manifest's Services and Deployments are the API server's own.
        let documents: Vec<Value> = documents.into_iter().filter(|d| d["apiVersion"].as_str().is_some_and(|v| v.contains(".istio.io/"))).collect();
        if documents.is_empty() {
            continue;
        }
        for document in &documents {
            create(&client, document).await.unwrap_or_else(|e| panic!("{file_name}: {} refused: {e}", describe(document)));
            kinds.insert(document["kind"].as_str().unwrap_or_default().to_string());
        }
        for document in &documents {
            assert_round_trips(&client, document, &file_name).await?;
        }
        for document in &documents {
            delete(&client, document).await?;
        }
    }
    assert_eq!(kinds, ["DestinationRule", "Gateway", "VirtualService"].map(String::from).into());

    // 4. The schemas refuse obviously wrong types, at every served version. (v1.20 names the field
    // without array indices: `spec.http.route.weight`.)
    for (bad, field) in [
        (json!({"kind": "VirtualService", "spec": {"hosts": 5}}), "spec.hosts"),
        (
            json!({"kind": "VirtualService", "spec": {"hosts": ["a"], "http": [{"route": [{"destination": {"host": "a"}, "weight": "half"}]}]}}),
            "spec.http.route.weight",
        ),
        (json!({"kind": "DestinationRule", "spec": {"subsets": [{"name": "v1"}]}}), "spec.host"),
        (json!({"kind": "Gateway", "spec": {"servers": [{"port": {"number": "eighty"}, "hosts": ["*"]}]}}), "spec.servers.port.number"),
        (json!({"kind": "ServiceEntry", "spec": {"hosts": "api.example.com"}}), "spec.hosts"),
        (json!({"kind": "PeerAuthentication", "spec": {"mtls": {"mode": "SOMETIMES"}}}), "spec.mtls.mode"),
        (json!({"kind": "AuthorizationPolicy", "spec": {"action": "MAYBE"}}), "spec.action"),
    ] {
        let kind = bad["kind"].as_str().unwrap();
        let group = group_of(kind);
        for version in served_versions(group) {
            let mut object = bad.clone();
            object["apiVersion"] = json!(format!("{group}/{version}"));
            object["metadata"] = json!({"name": "wrong"});
            let message = refusal(&client, &object).await?;
            assert!(message.contains(field), "{kind} {version} refused, but not for {field}: {message}");
        }
    }

    // 5. What Warren does not model is kept (spec at every version, and status as Warren writes it).
    for object in [
        json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "mirrored"},
            "spec": {"hosts": ["reviews"], "foo": "bar", "http": [{
                "route": [{"destination": {"host": "reviews", "subset": "v1", "unmodeled": true}, "weight": 100}],
                "mirror": {"host": "reviews", "subset": "v2"}, "mirrorPercentage": {"value": 5},
                "corsPolicy": {"allowOrigins": [{"exact": "https://example.com"}]}}]}}),
        json!({"apiVersion": "networking.istio.io/v1beta1", "kind": "ServiceEntry", "metadata": {"name": "external-api"},
            "spec": {"hosts": ["api.example.com"], "location": "MESH_EXTERNAL", "resolution": "DNS",
                "ports": [{"number": 443, "name": "https", "protocol": "TLS"}], "workloadSelector": {"labels": {"app": "x"}}}}),
        json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": {"name": "reviews"},
            "spec": {"selector": {"matchLabels": {"app": "reviews"}}, "mtls": {"mode": "STRICT"},
                "portLevelMtls": {"9080": {"mode": "PERMISSIVE"}}}}),
        json!({"apiVersion": "security.istio.io/v1beta1", "kind": "AuthorizationPolicy", "metadata": {"name": "no-posts"},
            "spec": {"action": "DENY", "targetRefs": [{"kind": "Service", "name": "reviews"}], "rules": [{
                "from": [{"source": {"notNamespaces": ["bookinfo"]}}],
                "to": [{"operation": {"methods": ["POST"], "ports": ["9080"]}}],
                "when": [{"key": "request.headers[x-debug]", "values": ["1"]}]}]}}),
    ] {
        create(&client, &object).await?;
        assert_round_trips(&client, &object, "the test's own objects").await?;
        let status = json!({"conditions": [{"type": "Reconciled", "status": "True", "reason": "Accepted", "message": ""}],
            "observedGeneration": 1, "validationMessages": [{"type": {"code": "IST0101"}}]});
        let api = api_for(&client, &object, None).await?;
        api.patch_status(&name(&object), &PatchParams::default(), &Patch::Merge(json!({"status": status}))).await?;
        let read = api.get(&name(&object)).await?;
        assert_eq!(read.data["status"], status, "{} status", describe(&object));
        assert_eq!(read.data["spec"], object["spec"], "{} spec after a status update", describe(&object));
    }
    Ok(())
}

/// Applies every CRD of deploy/helm/warren/crds/istio.yaml and waits until each is Established; returns their names.
async fn install_crds(client: &Client) -> anyhow::Result<BTreeSet<String>> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = BTreeSet::new();
    for document in yaml_documents(&workspace().join("deploy/helm/warren/crds/istio.yaml"))? {
        let crd: CustomResourceDefinition = serde_json::from_value(document)?;
        let name = crd.name_any();
        assert_eq!(crd.labels().get("app.kubernetes.io/part-of").map(String::as_str), Some("warren"), "{name}");
        crds.patch(&name, &PatchParams::apply("warren-e2e").force(), &Patch::Apply(&crd))
            .await
            .map_err(|e| anyhow::anyhow!("CRD {name} refused: {e}"))?;
        tokio::time::timeout(Duration::from_secs(30), await_condition(crds.clone(), &name, conditions::is_crd_established()))
            .await
            .map_err(|_| anyhow::anyhow!("CRD {name} not Established within 30 s"))??;
        names.insert(name);
    }
    Ok(names)
}

/// The non-empty documents of a YAML file, as JSON.
fn yaml_documents(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path)?;
    let mut documents = vec![];
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value = Value::deserialize(document).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    Ok(documents)
}

fn group_of(kind: &str) -> &'static str {
    match kind {
        "PeerAuthentication" | "AuthorizationPolicy" => "security.istio.io",
        _ => "networking.istio.io",
    }
}

fn name(object: &Value) -> String {
    object["metadata"]["name"].as_str().unwrap_or_default().to_string()
}

fn describe(object: &Value) -> String {
    format!("{} {} {}", object["apiVersion"].as_str().unwrap_or("?"), object["kind"].as_str().unwrap_or("?"), name(object))
}

/// The object's kind in namespace bookinfo, at `version` (or the object's own), as discovery serves it.
async fn api_for(client: &Client, object: &Value, version: Option<&str>) -> anyhow::Result<Api<DynamicObject>> {
    let kind = object["kind"].as_str().unwrap_or_default();
    let own_version = object["apiVersion"].as_str().and_then(|v| v.split_once('/')).map(|(_, v)| v).unwrap_or_default();
    let gvk = GroupVersionKind::gvk(group_of(kind), version.unwrap_or(own_version), kind);
    let (resource, _): (ApiResource, _) = kube::discovery::pinned_kind(client, &gvk).await?;
    Ok(Api::namespaced_with(client.clone(), NAMESPACE, &resource))
}

async fn create(client: &Client, object: &Value) -> anyhow::Result<DynamicObject> {
    let api = api_for(client, object, None).await?;
    Ok(api.create(&PostParams::default(), &serde_json::from_value(object.clone())?).await?)
}

async fn delete(client: &Client, object: &Value) -> anyhow::Result<()> {
    let api = api_for(client, object, None).await?;
    api.delete(&name(object), &DeleteParams::default()).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while api.get_opt(&name(object)).await?.is_some() {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "{} not deleted within 10 s", describe(object));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Reads the object back at every version its group serves: the spec is exactly what was written.
async fn assert_round_trips(client: &Client, object: &Value, source: &str) -> anyhow::Result<()> {
    let group = group_of(object["kind"].as_str().unwrap_or_default());
    for version in served_versions(group) {
        let read = api_for(client, object, Some(version)).await?.get(&name(object)).await?;
        let api_version = read.types.as_ref().map(|t| t.api_version.as_str()).unwrap_or_default();
        assert_eq!(api_version, format!("{group}/{version}"), "{source}: {}", describe(object));
        assert_eq!(read.data["spec"], object["spec"], "{source}: {} read at {version}", describe(object));
    }
    Ok(())
}

/// Creates an object the API server must refuse as invalid (422); returns its message.
async fn refusal(client: &Client, object: &Value) -> anyhow::Result<String> {
    match create(client, object).await {
        Ok(_) => anyhow::bail!("{} was accepted: {object}", describe(object)),
        Err(e) => match e.downcast::<kube::Error>()? {
            kube::Error::Api(status) if status.code == 422 => Ok(status.message),
            other => anyhow::bail!("{} refused, but not as invalid: {other}", describe(object)),
        },
    }
}
