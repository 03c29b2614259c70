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
    let group = if kind == "AuthorizationPolicy" { "security.istio.io" } else { "networking.istio.io" };
    ApiResource::from_gvk(&GroupVersionKind::gvk(group, "v1", kind))
}

/// Writes each verdict once per (object, generation, outcome).
pub async fn run(client: Client, mut verdicts: watch::Receiver<Vec<Verdict>>) {
    let mut written: HashMap<(String, String, String), (Option<i64>, String)> = HashMap::new();
    loop {
        let current = verdicts.borrow_and_update().clone();
        for verdict in current {
            let message = if verdict.errors.is_empty() {
                String::new()
            } else {
                verdict.errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
            };
            let key = (verdict.kind.to_string(), verdict.namespace.clone(), verdict.name.clone());
            let outcome = (verdict.generation, message.clone());
            if written.get(&key) == Some(&outcome) {
                continue;
            }
            match write(&client, &verdict, &message).await {
                Ok(()) => {
                    written.insert(key, outcome);
                }
                Err(e) => warn!(kind = verdict.kind, namespace = %verdict.namespace, name = %verdict.name, "writing status: {e:#}"),
            }
        }
        if verdicts.changed().await.is_err() {
            return;
        }
    }
}

async fn write(client: &Client, verdict: &Verdict, message: &str) -> anyhow::Result<()> {
    let now = Timestamp::now();
    let (status, reason, text) = if verdict.errors.is_empty() {
        ("True", "Valid", "the configuration is valid and in force".to_string())
    } else {
        let kept = match verdict.kept_generation {
            Some(g) => format!(" (generation {g} stays in force)"),
            None => " (not applied)".to_string(),
        };
        ("False", "Invalid", format!("{message}{kept}"))
    };
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
    if !verdict.errors.is_empty() {
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
            reason: Some("InvalidConfig".into()),
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
