//! Cluster state in, versioned snapshots out: validate each Istio object (an invalid one is replaced by its
//! last valid version, or left out if it never had one — so a bad edit leaves the data plane as it was),
//! compile, and publish a new version when the result differs.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    panic::AssertUnwindSafe,
    sync::Arc,
    time::Instant,
};

use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};
use warren_config::{
    check::{Checked, IstioObject},
    cluster::ClusterState,
    compile::{Compiled, compile},
    istio::{AuthorizationPolicy, DestinationRule, Gateway, ServiceEntry, VirtualService},
    tables::Resource,
    validate::FieldError,
    workloads::peer_authentication::PeerAuthentication,
};

use crate::metrics::Metrics;

/// The kinds [`Accepted::filter`] checks: the only values a verdict's `kind` takes.
pub const CHECKED_KINDS: [&str; 6] = [
    VirtualService::KIND,
    DestinationRule::KIND,
    Gateway::KIND,
    ServiceEntry::KIND,
    AuthorizationPolicy::KIND,
    PeerAuthentication::KIND,
];

/// The cluster states the pipeline compiles: the first, then every change, handed over rather than copied
/// (cloning a state of 10k Services and their Endpoints takes ~45 ms, a third of an edit's way to the agents).
/// The channel holds one state: a source waits while the pipeline is busy and, when it is let go, sends what
/// it then holds, so no change is lost and a burst compiles as few versions as the pipeline can keep up with.
pub struct States {
    pub first: ClusterState,
    pub changes: mpsc::Receiver<ClusterState>,
}

impl States {
    /// A source's end of the channel, and the pipeline's.
    pub fn channel(first: ClusterState) -> (mpsc::Sender<ClusterState>, States) {
        let (tx, changes) = mpsc::channel(1);
        (tx, States { first, changes })
    }
}

/// One compiled version of the mesh.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub version: u64,
    pub compiled: Compiled,
}

/// An Istio object's check, for its status and Events.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    pub uid: Option<String>,
    pub errors: Vec<FieldError>,
    /// Fields set but not honoured: the object applies without them (security fields fail closed).
    pub unsupported: Vec<FieldError>,
    /// An invalid object whose last valid generation stays in force.
    pub kept_generation: Option<i64>,
    /// An invalid object that never had a valid generation, replaced by what fails closed
    /// ([`warren_config::check::IstioObject::stand_in`]).
    pub fail_closed: bool,
}

type ObjectKey = (&'static str, String, String);

/// Keeps the last valid version of every object across changes.
#[derive(Default)]
pub struct Accepted {
    last_valid: HashMap<ObjectKey, serde_json::Value>,
    /// Set on every state compiled (the mesh's configuration, not the cluster's).
    root_namespace: Option<String>,
}

impl Accepted {
    /// `state` with invalid objects replaced (or removed), and a verdict per checked object.
    pub fn filter(&mut self, mut state: ClusterState) -> (ClusterState, Vec<Verdict>) {
        let mut run = Run { accepted: self, verdicts: Vec::new(), seen: HashSet::new() };
        state.virtual_services = run.keep(std::mem::take(&mut state.virtual_services));
        state.destination_rules = run.keep(std::mem::take(&mut state.destination_rules));
        state.gateways = run.keep(std::mem::take(&mut state.gateways));
        state.service_entries = run.keep(std::mem::take(&mut state.service_entries));
        state.authorization_policies = run.keep(std::mem::take(&mut state.authorization_policies));
        state.peer_authentications = run.keep(std::mem::take(&mut state.peer_authentications));
        let Run { verdicts, seen, .. } = run;
        // Deleted objects are forgotten: re-creating one starts afresh.
        self.last_valid.retain(|key, _| seen.contains(key));
        (state, verdicts)
    }
}

/// One pass of [`Accepted::filter`].
struct Run<'a> {
    accepted: &'a mut Accepted,
    verdicts: Vec<Verdict>,
    seen: HashSet<ObjectKey>,
}

impl Run<'_> {
    fn keep<K: IstioObject>(&mut self, objects: Vec<K>) -> Vec<K> {
        let mut out = Vec::new();
        for object in objects {
            let (namespace, name) = object.namespace_name();
            let key = (K::KIND, namespace.clone(), name.clone());
            self.seen.insert(key.clone());
            let Checked { errors, unsupported } = object.check();
            let mut verdict = Verdict {
                kind: K::KIND,
                namespace,
                name,
                generation: object.generation(),
                uid: object.uid(),
                errors,
                unsupported,
                kept_generation: None,
                fail_closed: false,
            };
            let last_valid = &mut self.accepted.last_valid;
            if verdict.errors.is_empty() {
                if let Ok(value) = serde_json::to_value(&object) {
                    last_valid.insert(key, value);
                }
                out.push(object);
            } else if let Some(previous) =
                last_valid.get(&key).and_then(|v| serde_json::from_value::<K>(v.clone()).ok())
            {
                verdict.kept_generation = previous.generation();
                out.push(previous);
            } else if let Some(stand_in) = object.stand_in() {
                // Never valid: what stands in fails closed (an AuthorizationPolicy allows nothing).
                verdict.fail_closed = true;
                out.push(stand_in);
            }
            self.verdicts.push(verdict);
        }
        out
    }
}

/// Runs the pipeline: every new cluster state becomes a snapshot (a new version only when the compiled
/// tables changed); invalid objects' verdicts go to `verdicts`.
/// `root_namespace`: Istio's meshConfig.rootNamespace (`None`: istio-system).
pub fn run(
    states: States,
    verdicts: watch::Sender<Vec<Verdict>>,
    root_namespace: Option<String>,
    metrics: Arc<Metrics>,
) -> watch::Receiver<Arc<Snapshot>> {
    let mut accepted = Accepted { root_namespace, ..Default::default() };
    let States { first, mut changes } = states;
    let first = step(&mut accepted, first, None, &verdicts, &metrics);
    metrics.compiled(first.version);
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        while let Some(state) = changes.recv().await {
            let previous = tx.borrow().clone();
            // A bug in compile must not freeze the control plane: the version in force stays, and the next
            // change is compiled afresh.
            let stepped =
                std::panic::catch_unwind(AssertUnwindSafe(|| step(&mut accepted, state, Some(&previous), &verdicts, &metrics)));
            let next = match stepped {
                Ok(next) => next,
                Err(panic) => {
                    metrics.compile_panicked();
                    let what =
                        panic.downcast_ref::<String>().map(String::as_str).or(panic.downcast_ref::<&str>().copied());
                    error!(
                        version = previous.version,
                        "compiling the new state panicked ({}); version {} stays in force",
                        what.unwrap_or("?"),
                        previous.version
                    );
                    continue;
                }
            };
            metrics.compiled(next.version);
            let changed = next.version != previous.version;
            drop(previous);
            if changed && tx.send(Arc::new(next)).is_err() {
                return;
            }
            release_freed_memory();
        }
    });
    rx
}

/// Hands memory freed since to the kernel: compiling a large state frees tens of MiB (the state's copy,
/// the previous version) that glibc would otherwise keep in its arenas, counted in the controller's RSS.
pub fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free pages of the allocator's arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn step(
    accepted: &mut Accepted,
    state: ClusterState,
    previous: Option<&Snapshot>,
    verdicts: &watch::Sender<Vec<Verdict>>,
    metrics: &Metrics,
) -> Snapshot {
    let started = Instant::now();
    let (mut state, checked) = accepted.filter(state);
    state.root_namespace.clone_from(&accepted.root_namespace);
    for v in checked.iter().filter(|v| !v.errors.is_empty()) {
        let errors: Vec<String> = v.errors.iter().map(ToString::to_string).collect();
        warn!(kind = v.kind, namespace = %v.namespace, name = %v.name, kept_generation = ?v.kept_generation, fail_closed = v.fail_closed,
            "invalid: {}", errors.join("; "));
    }
    for v in checked.iter().filter(|v| v.errors.is_empty() && !v.unsupported.is_empty()) {
        let fields: Vec<String> = v.unsupported.iter().map(ToString::to_string).collect();
        warn!(kind = v.kind, namespace = %v.namespace, name = %v.name, "applied without what Warren does not honour: {}", fields.join("; "));
    }
    metrics.validated(&checked);
    verdicts.send_if_modified(|current| {
        let changed = *current != checked;
        *current = checked;
        changed
    });
    let mut compiled = compile(&state);
    // Entries equal to the previous version's share its allocation: diffs per agent compare pointers.
    if let Some(p) = previous {
        for (key, entry) in compiled.resources.iter_mut() {
            if let Some(old) = p.compiled.resources.get(key)
                && old == entry
            {
                *entry = old.clone();
            }
        }
    }
    let unchanged = previous.is_some_and(|p| same(&p.compiled.resources, &compiled.resources));
    let version = match previous {
        Some(p) if unchanged => p.version,
        Some(p) => p.version + 1,
        None => 1,
    };
    if !unchanged {
        info!(
            version,
            resources = compiled.resources.len(),
            compile_ms = started.elapsed().as_millis() as u64,
            "compiled"
        );
    }
    Snapshot { version, compiled }
}

fn same(a: &BTreeMap<String, Arc<Resource>>, b: &BTreeMap<String, Arc<Resource>>) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|((ka, va), (kb, vb))| ka == kb && Arc::ptr_eq(va, vb))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(timeout: &str, weight_v2: i64) -> ClusterState {
        let mut state = ClusterState::default();
        state
            .add_yaml(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: shop}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{port: 80}}]}}\n---\n\
                 apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: shop, generation: {weight_v2}}}\n\
                 spec: {{hosts: [reviews], http: [{{timeout: {timeout}, route: [{{destination: {{host: reviews, subset: v1}}, weight: 1}}, {{destination: {{host: reviews, subset: v2}}, weight: {weight_v2}}}]}}]}}\n"
            ))
            .unwrap();
        state
    }

    #[tokio::test]
    async fn a_hostile_edit_is_refused_and_the_next_one_compiles() {
        let (states_tx, states) = States::channel(state("1s", 1));
        let (verdicts_tx, mut verdicts) = watch::channel(Vec::<Verdict>::new());
        let mut snapshots = run(states, verdicts_tx, None, Arc::default());
        assert_eq!(snapshots.borrow().version, 1);
        // Once a panic in Duration::from_secs_f64 that froze the pipeline.
        states_tx.send(state("100000000000000000000000h", 2)).await.unwrap();
        let refused = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            verdicts.wait_for(|v| v.iter().any(|v| !v.errors.is_empty())),
        )
        .await
        .unwrap()
        .unwrap()
        .clone();
        assert!(refused[0].errors[0].reason.contains("exceeds the longest duration"), "{refused:?}");
        assert_eq!(refused[0].kept_generation, Some(1));
        // The pipeline still compiles the next edit.
        states_tx.send(state("2s", 3)).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), snapshots.changed()).await.unwrap().unwrap();
        assert_eq!(snapshots.borrow().version, 2);
    }

    #[tokio::test]
    async fn compiles_versions_and_invalid_objects_are_counted() {
        use crate::metrics::tests::sample;
        let (states_tx, states) = States::channel(state("1s", 1));
        let (verdicts_tx, mut verdicts) = watch::channel(Vec::<Verdict>::new());
        let metrics = Arc::new(Metrics::default());
        let mut snapshots = run(states, verdicts_tx, None, metrics.clone());
        let text = metrics.encode().unwrap();
        assert_eq!(sample(&text, "warren_controller_config_version"), Some(1.0), "{text}");
        assert_eq!(sample(&text, "warren_controller_compiles_total{result=\"ok\"}"), Some(1.0), "{text}");
        assert_eq!(sample(&text, "warren_controller_invalid_objects{kind=\"VirtualService\"}"), Some(0.0), "{text}");

        states_tx.send(state("soon", 2)).await.unwrap();
        let wait = verdicts.wait_for(|v| v.iter().any(|v| !v.errors.is_empty()));
        tokio::time::timeout(std::time::Duration::from_secs(5), wait).await.unwrap().unwrap();
        let text = metrics.encode().unwrap();
        assert_eq!(sample(&text, "warren_controller_invalid_objects{kind=\"VirtualService\"}"), Some(1.0), "{text}");
        assert_eq!(sample(&text, "warren_controller_invalid_objects{kind=\"DestinationRule\"}"), Some(0.0), "{text}");

        // Fixed: a new version, and nothing invalid any more.
        states_tx.send(state("2s", 3)).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), snapshots.changed()).await.unwrap().unwrap();
        let text = metrics.encode().unwrap();
        assert_eq!(sample(&text, "warren_controller_config_version"), Some(2.0), "{text}");
        assert_eq!(sample(&text, "warren_controller_invalid_objects{kind=\"VirtualService\"}"), Some(0.0), "{text}");
        assert_eq!(sample(&text, "warren_controller_compiles_total{result=\"ok\"}"), Some(3.0), "{text}");
        assert_eq!(sample(&text, "warren_controller_compiles_total{result=\"error\"}"), Some(0.0), "{text}");
    }

    #[tokio::test]
    async fn unsupported_fields_are_named_and_the_object_applies() {
        let mut state = state("1s", 1);
        let cors = serde_json::json!({"allowOrigins": [{"exact": "x"}]});
        state.virtual_services[0].spec.http[0].cors_policy = Some(cors);
        let (_states_tx, states) = States::channel(state);
        let (verdicts_tx, verdicts) = watch::channel(Vec::new());
        let snapshots = run(states, verdicts_tx, None, Arc::default());
        let verdict = verdicts.borrow()[0].clone();
        assert!(verdict.errors.is_empty());
        assert_eq!(verdict.unsupported[0].field, "spec.http[0].corsPolicy");
        assert!(snapshots.borrow().compiled.resources.contains_key("route/shop/reviews"), "applied without the CORS policy");
    }

    #[tokio::test]
    async fn an_invalid_regex_is_named_by_its_field_and_the_last_valid_generation_stays() {
        let (states_tx, states) = States::channel(state("1s", 1));
        let (verdicts_tx, mut verdicts) = watch::channel(Vec::<Verdict>::new());
        let snapshots = run(states, verdicts_tx, None, Arc::default());
        let mut bad = state("1s", 2);
        let uri = warren_config::istio::StringMatch { regex: Some("(".into()), ..Default::default() };
        let matches = vec![warren_config::istio::HttpMatchRequest { uri: Some(uri), ..Default::default() }];
        bad.virtual_services[0].spec.http[0].matches = matches;
        states_tx.send(bad).await.unwrap();
        let refused = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            verdicts.wait_for(|v| v.iter().any(|v| !v.errors.is_empty())),
        )
        .await
        .unwrap()
        .unwrap()
        .clone();
        assert_eq!(refused[0].errors[0].field, "spec.http[0].match[0].uri.regex", "{refused:?}");
        assert!(refused[0].errors[0].reason.starts_with("\"(\" is not a valid regex: "), "{refused:?}");
        assert_eq!(refused[0].kept_generation, Some(1));
        let kept = snapshots.borrow().compiled.resources.get("route/shop/reviews").map(|r| (**r).clone());
        let Some(Resource::Route(route)) = kept else { panic!("the route stays") };
        assert!(route.http[0].matches.is_empty(), "generation 1, without the bad match");
    }

    fn policy(spec: &str) -> ClusterState {
        let mut state = ClusterState::default();
        state
            .add_yaml(&format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec: {spec}\n"))
            .unwrap();
        state
    }

    fn compiled_policy(
        state: ClusterState,
        root_namespace: Option<String>,
    ) -> (Option<warren_config::tables::Policy>, Verdict) {
        let (_states_tx, states) = States::channel(state);
        let (verdicts_tx, verdicts) = watch::channel(Vec::new());
        let snapshots = run(states, verdicts_tx, root_namespace, Arc::default());
        let policy = match snapshots.borrow().compiled.resources.get("policy/shop/p").map(|r| (**r).clone()) {
            Some(Resource::Policy(p)) => Some(p),
            _ => None,
        };
        (policy, verdicts.borrow()[0].clone())
    }

    #[tokio::test]
    async fn a_policy_that_was_never_valid_fails_closed() {
        use warren_config::tables::Action;
        // A bad principal pattern would have narrowed an ALLOW list: it allows nothing instead.
        let (allow, verdict) =
            compiled_policy(policy("{rules: [{from: [{source: {ipBlocks: [10.0.0.0/99]}}]}]}"), None);
        let allow = allow.expect("a stand-in is in force");
        assert!(!verdict.errors.is_empty() && verdict.fail_closed);
        assert_eq!((allow.action, allow.rules.len()), (Action::Allow, 0), "ALLOW that allows nothing");
        // A DENY that never parsed denies everything it selects.
        let (deny, _) = compiled_policy(
            policy(
                "{action: DENY, selector: {matchLabels: {app: a}}, rules: [{to: [{operation: {ports: ['99999']}}]}]}",
            ),
            None,
        );
        let deny = deny.unwrap();
        assert_eq!(
            (deny.action, deny.rules.len(), deny.rules[0].from.len(), deny.rules[0].to.len()),
            (Action::Deny, 1, 0, 0)
        );
        assert_eq!(deny.selector.unwrap()["app"], "a", "…of the workloads it selects");
        // Control: the valid policy compiles as written, no stand-in.
        let (valid, verdict) = compiled_policy(policy("{rules: [{from: [{source: {ipBlocks: [10.0.0.0/8]}}]}]}"), None);
        assert!(verdict.errors.is_empty() && !verdict.fail_closed);
        assert_eq!(valid.unwrap().rules[0].from[0].ip_blocks.len(), 1);
    }

    #[tokio::test]
    async fn the_root_namespace_is_the_controllers_setting() {
        let mut state = policy("{}");
        state.authorization_policies[0].metadata.namespace = Some("shop".into());
        let (policy, _) = compiled_policy(state.clone(), Some("shop".into()));
        assert!(policy.unwrap().mesh_wide);
        let (policy, _) = compiled_policy(state, None);
        assert!(!policy.unwrap().mesh_wide, "control: by default istio-system is the root");
    }
}
