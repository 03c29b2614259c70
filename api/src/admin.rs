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
