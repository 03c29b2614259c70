//! How Istio names a pod's workload and service in telemetry, so that dashboards and Kiali written for
//! Istio group Warren's series the same way: the workload is the pod's controller (a Deployment's pods →
//! the Deployment, through the ReplicaSet's `pod-template-hash` suffix; a CronJob's Jobs → the CronJob),
//! the canonical service and revision come from `service.istio.io/canonical-*` or the usual app labels.
use std::collections::BTreeMap;

/// Overrides the derived workload name (Istio's `service.istio.io/workload-name`).
pub const WORKLOAD_NAME_LABEL: &str = "service.istio.io/workload-name";
pub const CANONICAL_NAME_LABEL: &str = "service.istio.io/canonical-name";
pub const CANONICAL_REVISION_LABEL: &str = "service.istio.io/canonical-revision";

/// The pod's controlling owner reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Controller<'a> {
    pub kind: &'a str,
    pub name: &'a str,
}

/// The workload name Istio derives for a pod: the label override, else the controller's name with a
/// ReplicaSet's hash (Deployment) or a Job's schedule suffix (CronJob) trimmed, else the pod's name.
pub fn workload_name(pod: &str, controller: Option<Controller<'_>>, labels: &BTreeMap<String, String>) -> String {
    if let Some(name) = labels.get(WORKLOAD_NAME_LABEL).filter(|n| !n.is_empty()) {
        return name.clone();
    }
    let Some(Controller { kind, name }) = controller else {
        return pod.to_string();
    };
    let hash = labels.get("pod-template-hash").filter(|h| !h.is_empty());
    match (kind, hash) {
        ("ReplicaSet", Some(hash)) => name.strip_suffix(hash.as_str()).and_then(|n| n.strip_suffix('-')).unwrap_or(name),
        ("Job", _) => cron_job(name).unwrap_or(name),
        _ => name,
    }
    .to_string()
}

/// `nightly-28901234` → `nightly`: a CronJob names its Jobs with a suffix of 8 to 10 digits.
fn cron_job(job: &str) -> Option<&str> {
    let (base, suffix) = job.rsplit_once('-')?;
    let digits = (8..=10).contains(&suffix.len()) && suffix.bytes().all(|b| b.is_ascii_digit());
    (digits && !base.is_empty()).then_some(base)
}

/// `service.istio.io/canonical-name`, else `app.kubernetes.io/name`, else `app`, else the workload name.
pub fn canonical_service<'a>(labels: &'a BTreeMap<String, String>, workload: &'a str) -> &'a str {
    first_label(labels, &[CANONICAL_NAME_LABEL, "app.kubernetes.io/name", "app"]).unwrap_or(workload)
}

/// `service.istio.io/canonical-revision`, else `app.kubernetes.io/version`, else `version`, else `latest`.
pub fn canonical_revision(labels: &BTreeMap<String, String>) -> &str {
    first_label(labels, &[CANONICAL_REVISION_LABEL, "app.kubernetes.io/version", "version"]).unwrap_or("latest")
}

/// The `app` label (or `app.kubernetes.io/name`), as Istio's `source_app` / `destination_app`.
pub fn app(labels: &BTreeMap<String, String>) -> Option<&str> {
    first_label(labels, &["app", "app.kubernetes.io/name"])
}

/// The `version` label (or `app.kubernetes.io/version`).
pub fn version(labels: &BTreeMap<String, String>) -> Option<&str> {
    first_label(labels, &["version", "app.kubernetes.io/version"])
}

fn first_label<'a>(labels: &'a BTreeMap<String, String>, keys: &[&str]) -> Option<&'a str> {
    keys.iter().find_map(|k| labels.get(*k).filter(|v| !v.is_empty())).map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn workloads_are_named_as_istio_names_them() {
        let deployment = labels(&[("pod-template-hash", "7d4b9c8f6")]);
        let rs = Some(Controller { kind: "ReplicaSet", name: "reviews-v1-7d4b9c8f6" });
        assert_eq!(workload_name("reviews-v1-7d4b9c8f6-x2x4p", rs, &deployment), "reviews-v1");
        // A ReplicaSet of its own (no hash label, or a name without it) keeps its name.
        assert_eq!(workload_name("rs-abcde", Some(Controller { kind: "ReplicaSet", name: "rs" }), &labels(&[])), "rs");
        assert_eq!(workload_name("p", Some(Controller { kind: "ReplicaSet", name: "other" }), &deployment), "other");
        let job = Some(Controller { kind: "Job", name: "nightly-28901234" });
        assert_eq!(workload_name("nightly-28901234-abcde", job, &labels(&[])), "nightly");
        let plain_job = Some(Controller { kind: "Job", name: "migrate-1" });
        assert_eq!(workload_name("migrate-1-abcde", plain_job, &labels(&[])), "migrate-1");
        let sts = Some(Controller { kind: "StatefulSet", name: "db" });
        assert_eq!(workload_name("db-0", sts, &labels(&[])), "db");
        assert_eq!(workload_name("standalone", None, &labels(&[])), "standalone");
        let named = labels(&[(WORKLOAD_NAME_LABEL, "custom")]);
        assert_eq!(workload_name("p", rs, &named), "custom");
    }

    #[test]
    fn canonical_labels_fall_back_as_istio_does() {
        let l = labels(&[("app", "reviews"), ("version", "v2")]);
        assert_eq!((canonical_service(&l, "w"), canonical_revision(&l)), ("reviews", "v2"));
        let l = labels(&[("app", "reviews"), (CANONICAL_NAME_LABEL, "rev"), (CANONICAL_REVISION_LABEL, "r1")]);
        assert_eq!((canonical_service(&l, "w"), canonical_revision(&l)), ("rev", "r1"));
        let none = labels(&[]);
        assert_eq!((canonical_service(&none, "w"), canonical_revision(&none)), ("w", "latest"));
        assert_eq!((app(&none), version(&none)), (None, None));
    }
}
