//! Validation results back into Kubernetes: an `Accepted` condition in each checked Istio object's status
//! (observedGeneration, reason, the fields and why) and, for an invalid one, a Warning Event naming the
//! field — what `kubectl describe` and `kubectl get -o yaml` show.
use std::collections::HashMap;

use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::pipeline::Verdict;

fn api_resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(warren_config::check::group_of(kind), "v1", kind))
}

fn joined(fields: &[warren_config::validate::FieldError]) -> String {
    fields.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// The `Accepted` condition (status, reason, message) and, for a Warning Event, its reason.
fn condition(verdict: &Verdict) -> (&'static str, &'static str, String, Option<&'static str>) {
    if !verdict.errors.is_empty() {
        let kept = match verdict.kept_generation {
            Some(g) => format!(" (generation {g} stays in force)"),
            None if verdict.fail_closed => {
                " (never valid: fails closed — it allows nothing, or as DENY denies everything it selects)".to_string()
            }
            None => " (not applied)".to_string(),
        };
        let unsupported = if verdict.unsupported.is_empty() {
            String::new()
        } else {
            format!("; not honoured: {}", joined(&verdict.unsupported))
        };
        return ("False", "Invalid", format!("{}{kept}{unsupported}", joined(&verdict.errors)), Some("InvalidConfig"));
    }
    if !verdict.unsupported.is_empty() {
        let text = format!("in force without what Warren does not honour yet: {}", joined(&verdict.unsupported));
        return ("True", "Unsupported", text, Some("UnsupportedConfig"));
    }
    ("True", "Valid", "the configuration is valid and in force".to_string(), None)
}

/// Writes each verdict once per (object, generation, outcome).
pub async fn run(client: Client, mut verdicts: watch::Receiver<Vec<Verdict>>) {
    let mut written: HashMap<(String, String, String), (Option<i64>, String)> = HashMap::new();
    loop {
        let current = verdicts.borrow_and_update().clone();
        for verdict in current {
            let key = (verdict.kind.to_string(), verdict.namespace.clone(), verdict.name.clone());
            let outcome = (verdict.generation, condition(&verdict).2);
            if written.get(&key) == Some(&outcome) {
                continue;
            }
            match write(&client, &verdict).await {
                Ok(()) => {
                    written.insert(key, outcome);
                }
                Err(e) => {
                    warn!(kind = verdict.kind, namespace = %verdict.namespace, name = %verdict.name, "writing status: {e:#}")
                }
            }
        }
        if verdicts.changed().await.is_err() {
            return;
        }
    }
}

async fn write(client: &Client, verdict: &Verdict) -> anyhow::Result<()> {
    let now = Timestamp::now();
    let (status, reason, text, event_reason) = condition(verdict);
    let patch = serde_json::json!({"status": {
        "observedGeneration": verdict.generation,
        "conditions": [{
            "type": "Accepted", "status": status, "reason": reason, "message": text,
            "observedGeneration": verdict.generation, "lastTransitionTime": Time(now),
        }],
    }});
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &verdict.namespace, &api_resource(verdict.kind));
    api.patch_status(&verdict.name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    debug!(kind = verdict.kind, name = %verdict.name, status, "status written");
    if let Some(event_reason) = event_reason {
        let events: Api<Event> = Api::namespaced(client.clone(), &verdict.namespace);
        let event = Event {
            metadata: ObjectMeta { generate_name: Some(format!("{}.", verdict.name)), ..Default::default() },
            involved_object: ObjectReference {
                api_version: Some(format!("{}/v1", api_resource(verdict.kind).group)),
                kind: Some(verdict.kind.to_string()),
                name: Some(verdict.name.clone()),
                namespace: Some(verdict.namespace.clone()),
                uid: verdict.uid.clone(),
                ..Default::default()
            },
            reason: Some(event_reason.into()),
            message: Some(text),
            type_: Some("Warning".into()),
            source: Some(EventSource { component: Some("warren-controller".into()), host: None }),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            event_time: Some(MicroTime(now)).filter(|_| false),
            count: Some(1),
            reporting_component: Some("warren-controller".into()),
            reporting_instance: Some(std::env::var("HOSTNAME").unwrap_or_else(|_| "warren-controller".into())),
            ..Default::default()
        };
        events.create(&PostParams::default(), &event).await?;
    }
    Ok(())
}
