//! What the agent's admin endpoints answer, typed once for the agent that serves it, the CLI that renders
//! it and the tests that read it.
use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::authz::{Action, IpNet};

/// `/policies`: per local enrolled workload, the policies that apply in evaluation order, with their hits;
/// and the kernel's plaintext verdicts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoliciesView {
    pub version: u64,
    pub workloads: Vec<WorkloadPolicies>,
    pub kernel: Vec<KernelVerdict>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadPolicies {
    /// `namespace/name`.
    pub workload: String,
    pub addresses: Vec<IpAddr>,
    /// DENY, then ALLOW, then AUDIT; last, when ALLOW policies apply, the implicit deny (`-`).
    pub policies: Vec<AppliedPolicy>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppliedPolicy {
    /// `namespace/name`, or `-`: "ALLOW policies apply and none matched".
    pub policy: String,
    pub action: Action,
    pub rules: usize,
    pub hits: PolicyHits,
}

/// Connections a policy decided (or, for AUDIT, matched) since the agent started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyHits {
    pub allowed: u64,
    pub denied: u64,
    pub audited: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadHits {
    pub workload: String,
    pub policies: BTreeMap<String, PolicyHits>,
}

/// One entry of the kernel's table (L4_AUTHZ).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KernelVerdict {
    pub destination: IpAddr,
    /// `None`: every port no other entry names.
    pub port: Option<u16>,
    pub source: IpNet,
    pub allowed: bool,
    /// `namespace/name#rule` of the deciding rule, `-` for "no ALLOW policy matched" (or an allow region).
    pub decided_by: String,
}

/// `/endpoints` (`inspect endpoints`, as `istioctl proxy-config endpoints`): per (service, subset, port) the
/// agent's clients sent requests to, the endpoints with their health and load, and the pool's limits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointsView {
    pub version: u64,
    pub clusters: Vec<ClusterView>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    /// Envoy's cluster name: `outbound|PORT|SUBSET|HOST`.
    pub name: String,
    /// `namespace/name`.
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    pub port: u16,
    /// `LEAST_REQUEST`, `ROUND_ROBIN`, `RANDOM`, `PASSTHROUGH`, `RING_HASH`, `MAGLEV`.
    pub load_balancer: String,
    /// Whether outlier detection is configured (and so ejection and locality failover act).
    pub outlier_detection: bool,
    pub limits: PoolLimits,
    /// In flight now.
    pub open: PoolCounts,
    /// Requests refused because a limit was full (503, flag UO), by limit, since the agent started.
    pub overflows: PoolCounts,
    pub retry_budget: RetryBudgetView,
    pub endpoints: Vec<EndpointView>,
}

/// `None`: unlimited (Istio's default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolLimits {
    pub max_connections: Option<u32>,
    pub max_pending_requests: Option<u32>,
    pub max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: Option<u32>,
    pub connect_timeout_ms: u64,
    pub idle_timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolCounts {
    pub connections: u64,
    pub pending: u64,
    pub requests: u64,
    pub retries: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudgetView {
    /// `concurrent 20% (min 3)`, `20% of 10s + 100`, `unlimited`.
    pub policy: String,
    /// Requests and retries counted in the current window (windowed budgets).
    pub window_requests: u64,
    pub window_retries: u64,
    /// Retries the budget refused since the agent started.
    pub refused: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointView {
    pub address: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<String>,
    /// `HEALTHY` or `EJECTED`.
    pub health: String,
    /// Milliseconds until an ejection ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ejected_for_ms: Option<u64>,
    pub times_ejected: u32,
    /// Locality priority from this agent's clients (0: their own zone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// Requests in flight.
    pub active: u32,
    /// Tries sent, and those that failed (5xx or no answer), since the agent started.
    pub requests: u64,
    pub failures: u64,
}
