//! Cluster state in, versioned snapshots out: validate each Istio object (an invalid one is replaced by its
//! last valid version, or left out if it never had one — so a bad edit leaves the data plane as it was),
//! compile, and publish a new version when the result differs.
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Instant,
};

use kube::ResourceExt;
use tokio::sync::watch;
use tracing::{info, warn};
use warren_config::{
    cluster::ClusterState,
    compile::{Compiled, compile},
    tables::Resource,
    validate::{self, FieldError},
};

/// One compiled version of the mesh.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub version: u64,
    pub compiled: Compiled,
}

/// An Istio object's validation outcome, for its status and Events.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    pub uid: Option<String>,
    pub errors: Vec<FieldError>,
    /// An invalid object whose last valid generation stays in force.
    pub kept_generation: Option<i64>,
}

/// Keeps the last valid version of every object across changes.
#[derive(Default)]
pub struct Accepted {
    last_valid: HashMap<(&'static str, String, String), serde_json::Value>,
}

impl Accepted {
    /// `state` with invalid objects replaced (or removed), and a verdict per checked object.
    pub fn filter(&mut self, mut state: ClusterState) -> (ClusterState, Vec<Verdict>) {
        let mut verdicts = Vec::new();
        let mut seen = std::collections::HashSet::new();
        state.virtual_services =
            self.keep("VirtualService", std::mem::take(&mut state.virtual_services), |o| validate::virtual_service(&o.spec), &mut verdicts, &mut seen);
        state.destination_rules =
            self.keep("DestinationRule", std::mem::take(&mut state.destination_rules), |o| validate::destination_rule(&o.spec), &mut verdicts, &mut seen);
        state.authorization_policies = self.keep(
            "AuthorizationPolicy",
            std::mem::take(&mut state.authorization_policies),
            |o| validate::authorization_policy(&o.spec),
            &mut verdicts,
            &mut seen,
        );
        // Deleted objects are forgotten: re-creating one starts afresh.
        self.last_valid.retain(|key, _| seen.contains(key));
        (state, verdicts)
    }

    fn keep<K>(
        &mut self,
        kind: &'static str,
        objects: Vec<K>,
        check: impl Fn(&K) -> Vec<FieldError>,
        verdicts: &mut Vec<Verdict>,
        seen: &mut std::collections::HashSet<(&'static str, String, String)>,
    ) -> Vec<K>
    where
        K: kube::Resource + serde::Serialize + serde::de::DeserializeOwned,
    {
        let mut out = Vec::new();
        for object in objects {
            let key = (kind, object.namespace().unwrap_or_default(), object.name_any());
            seen.insert(key.clone());
            let errors = check(&object);
            let mut verdict = Verdict {
                kind,
                namespace: key.1.clone(),
                name: key.2.clone(),
                generation: object.meta().generation,
                uid: object.meta().uid.clone(),
                errors: errors.clone(),
                kept_generation: None,
            };
            if errors.is_empty() {
                if let Ok(value) = serde_json::to_value(&object) {
                    self.last_valid.insert(key, value);
                }
                out.push(object);
            } else if let Some(previous) = self.last_valid.get(&key).and_then(|v| serde_json::from_value::<K>(v.clone()).ok()) {
                verdict.kept_generation = previous.meta().generation;
                out.push(previous);
            }
            verdicts.push(verdict);
        }
        out
    }
}

/// Runs the pipeline: every new cluster state becomes a snapshot (a new version only when the compiled
/// tables changed); invalid objects' verdicts go to `verdicts`.
pub fn run(mut states: watch::Receiver<ClusterState>, verdicts: watch::Sender<Vec<Verdict>>) -> watch::Receiver<Arc<Snapshot>> {
    let mut accepted = Accepted::default();
    let first = step(&mut accepted, states.borrow_and_update().clone(), None, &verdicts);
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        while states.changed().await.is_ok() {
            let state = states.borrow_and_update().clone();
            let previous = tx.borrow().clone();
            let next = step(&mut accepted, state, Some(&previous), &verdicts);
            if next.version != previous.version && tx.send(Arc::new(next)).is_err() {
                return;
            }
        }
    });
    rx
}

fn step(
    accepted: &mut Accepted,
    state: ClusterState,
    previous: Option<&Snapshot>,
    verdicts: &watch::Sender<Vec<Verdict>>,
) -> Snapshot {
    let started = Instant::now();
    let (state, checked) = accepted.filter(state);
    for v in checked.iter().filter(|v| !v.errors.is_empty()) {
        let errors: Vec<String> = v.errors.iter().map(ToString::to_string).collect();
        warn!(kind = v.kind, namespace = %v.namespace, name = %v.name, kept_generation = ?v.kept_generation,
            "invalid: {}", errors.join("; "));
    }
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
        info!(version, resources = compiled.resources.len(), compile_ms = started.elapsed().as_millis() as u64, "compiled");
    }
    Snapshot { version, compiled }
}

fn same(a: &BTreeMap<String, Arc<Resource>>, b: &BTreeMap<String, Arc<Resource>>) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|((ka, va), (kb, vb))| ka == kb && Arc::ptr_eq(va, vb))
}
