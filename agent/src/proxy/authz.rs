//! AuthorizationPolicy on inbound connections, where the agent sees them: HBONE (the peer's identity proved
//! by mTLS) and plaintext that sk_lookup handed over (the kernel already refused what its table decides).
//! Every decision is counted (`warren_authz_decisions_total`, per-workload hits for `inspect policies
//! --hits`); each denial is one log line naming the policy and rule; AUDIT matches are logged, never
//! enforced. When the tables change, established connections the new policies deny are closed.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::sync::watch;
use tracing::{info, warn};
use warren_api::{
    admin::{PolicyHits, WorkloadHits},
    authz::{Connection, DecidedBy, Decision},
};

use super::ConnectionTable;
use crate::{ebpf::KernelDenial, state::MeshTables};


#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    /// `namespace/name`, `-` when no policy decided.
    policy: String,
    action: &'static str,
    decision: &'static str,
}

/// Where a decision was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforcer {
    /// sk_lookup, from the kernel's table (plaintext).
    Kernel,
    /// The agent's HBONE server, on the peer's proved identity.
    Hbone,
    /// The agent's plaintext inbound listener.
    Plaintext,
    /// The inbound L7 stage, per HTTP request.
    Http,
}

impl Enforcer {
    fn as_str(self) -> &'static str {
        match self {
            Enforcer::Kernel => "kernel",
            Enforcer::Hbone => "hbone",
            Enforcer::Plaintext => "plaintext",
            Enforcer::Http => "http",
        }
    }
}

#[derive(Default)]
pub struct Authorizer {
    decisions: Family<DecisionLabels, Counter>,
    /// (workload, policy) → counts.
    hits: Mutex<BTreeMap<(String, String), PolicyHits>>,
}

impl Authorizer {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "warren_authz_decisions",
            "AuthorizationPolicy decisions on inbound connections, by the policy that decided",
            self.decisions.clone(),
        );
    }

    /// Decides `connection` (to `destination`, from `client`) by the tables in force, and records it.
    pub fn check(
        &self,
        tables: &MeshTables,
        connection: &Connection,
        client: SocketAddr,
        destination: SocketAddr,
        by: Enforcer,
    ) -> Decision {
        let decision = tables.authorize(connection);
        let authz = tables.authz_at(&destination.ip());
        let workload = authz.map(|w| w.workload.clone()).unwrap_or_default();
        if let Some(authz) = authz {
            for (policy, rule) in authz.policies.audits(connection) {
                info!(workload = %workload, client = %client, %destination, peer = ?connection.principal, policy = %policy.name(),
                    rule, allowed = decision.allowed, "AuthorizationPolicy AUDIT: connection matches");
                self.count_hit(&workload, &policy.name(), |h| h.audited += 1);
            }
        }
        if !decision.allowed && connection.request.is_some() {
            warn!(workload = %workload, client = %client, %destination, peer = ?connection.principal, policy = %decision.policy_name(),
                rule = ?rule_of(&decision), action = decision.action_name(), enforcer = by.as_str(), request = ?connection.request,
                "request denied by AuthorizationPolicy");
        } else if !decision.allowed {
            warn!(workload = %workload, client = %client, %destination, peer = ?connection.principal, policy = %decision.policy_name(),
                rule = ?rule_of(&decision), action = decision.action_name(), enforcer = by.as_str(),
                "connection denied by AuthorizationPolicy");
        }
        self.record(&workload, &decision);
        decision
    }

    /// A connection sk_lookup refused: the kernel's event, named by the tables in force.
    pub fn kernel_denied(&self, tables: &MeshTables, denial: &KernelDenial) {
        let workload = tables.authz_at(&denial.destination.ip()).map(|w| w.workload.clone()).unwrap_or_default();
        let decision = match tables.decision_named(denial.decision_id) {
            Some((policy, rule)) => Decision { allowed: false, by: DecidedBy::Rule { policy, rule } },
            None => Decision { allowed: false, by: DecidedBy::NoAllowMatched },
        };
        warn!(workload = %workload, client = %denial.client, destination = %denial.destination, peer = ?None::<&str>,
            policy = %decision.policy_name(), rule = ?rule_of(&decision), action = decision.action_name(),
            enforcer = Enforcer::Kernel.as_str(), decision_id = denial.decision_id, "connection denied by AuthorizationPolicy");
        self.record(&workload, &decision);
    }

    fn record(&self, workload: &str, decision: &Decision) {
        let verdict = if decision.allowed { "allow" } else { "deny" };
        let labels =
            DecisionLabels { policy: decision.policy_name(), action: decision.action_name(), decision: verdict };
        self.decisions.get_or_create(&labels).inc();
        let allowed = decision.allowed;
        self.count_hit(workload, &decision.policy_name(), |h| if allowed { h.allowed += 1 } else { h.denied += 1 });
    }

    fn count_hit(&self, workload: &str, policy: &str, count: impl FnOnce(&mut PolicyHits)) {
        let mut hits = self.hits.lock().unwrap();
        count(hits.entry((workload.to_string(), policy.to_string())).or_default());
    }

    /// Hits per workload and policy since the agent started.
    pub fn hits(&self) -> Vec<WorkloadHits> {
        let hits = self.hits.lock().unwrap();
        let mut out: Vec<WorkloadHits> = Vec::new();
        for ((workload, policy), h) in hits.iter() {
            match out.last_mut() {
                Some(last) if last.workload == *workload => {
                    last.policies.insert(policy.clone(), *h);
                }
                _ => out.push(WorkloadHits { workload: workload.clone(), policies: [(policy.clone(), *h)].into() }),
            }
        }
        out
    }
}

fn rule_of(decision: &Decision) -> Option<u32> {
    match decision.by {
        DecidedBy::Rule { rule, .. } => Some(rule),
        _ => None,
    }
}

/// Names and counts each connection the kernel refused, as its events arrive.
pub async fn record_kernel_denials(
    mut denials: tokio::sync::mpsc::UnboundedReceiver<KernelDenial>,
    tables: watch::Receiver<Arc<MeshTables>>,
    authorizer: Arc<Authorizer>,
) {
    while let Some(denial) = denials.recv().await {
        let current = tables.borrow().clone();
        authorizer.kernel_denied(&current, &denial);
    }
}

/// Closes established inbound connections that the tables, once changed, deny (as ztunnel does): each
/// open connection is decided again with what was known when it was accepted. Connections authorized
/// per request are left alone: their next request is decided by the new tables.
pub async fn close_newly_denied(
    mut tables: watch::Receiver<Arc<MeshTables>>,
    connections: ConnectionTable,
    authorizer: Arc<Authorizer>,
) {
    while tables.changed().await.is_ok() {
        let current = tables.borrow_and_update().clone();
        let closed = connections.close_where(|c| {
            if c.direction != "inbound" || c.protocol == "http" {
                return None;
            }
            let connection = Connection::new(c.client.ip(), c.peer_identity.as_deref(), c.original_dst);
            let decision = current.authorize(&connection);
            (!decision.allowed).then(|| {
                let by = if c.protocol == "hbone" { Enforcer::Hbone } else { Enforcer::Plaintext };
                authorizer.check(&current, &connection, c.client, c.original_dst, by);
                format!(
                    "closed: AuthorizationPolicy now denies it ({} {})",
                    decision.action_name(),
                    decision.policy_name()
                )
            })
        });
        if closed > 0 {
            info!(version = current.version, closed, "closed established connections the new policies deny");
        }
    }
}
