//! Who may have which certificate: the requesting agent is identified by its ServiceAccount token (bound
//! to the agent's pod), the pod tells the node, and only identities of pods on that node are granted.
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};
use warren_identity::Identity;

use crate::metrics::RefusalReason;

/// Why a request is refused; `status` is the HTTP status the CA answers with.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The body, the identity or the CSR cannot be read.
    #[error("{0}")]
    BadRequest(String),
    #[error("Authorization: Bearer <service account token> is required")]
    NoToken,
    #[error("token rejected: {0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("checking the request: {0}")]
    Internal(String),
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::BadRequest(_) => 400,
            Refusal::NoToken | Refusal::Unauthenticated(_) => 401,
            Refusal::Forbidden(_) => 403,
            Refusal::Internal(_) => 500,
        }
    }

    /// The metrics' `reason` label.
    pub fn reason(&self) -> RefusalReason {
        match self {
            Refusal::BadRequest(_) => RefusalReason::BadRequest,
            Refusal::NoToken | Refusal::Unauthenticated(_) => RefusalReason::Unauthenticated,
            Refusal::Forbidden(_) => RefusalReason::Forbidden,
            Refusal::Internal(_) => RefusalReason::Internal,
        }
    }
}

pub struct Authorizer {
    pub client: Client,
    /// Namespace and ServiceAccount the agents run as.
    pub agent_namespace: String,
    pub agent_service_account: String,
    pub trust_domain: String,
}

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

impl Authorizer {
    /// The node whose agent presented `token`.
    pub async fn node_of(&self, token: &str) -> Result<String, Refusal> {
        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec { token: token.to_string(), ..Default::default() },
            ..Default::default()
        };
        let review = reviews.create(&PostParams::default(), &review).await.map_err(|e| Refusal::Internal(format!("TokenReview: {e}")))?;
        let status = review.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(Refusal::Unauthenticated(status.error.unwrap_or_else(|| "not authenticated".into())));
        }
        let user = status.user.unwrap_or_default();
        let expected = format!("system:serviceaccount:{}:{}", self.agent_namespace, self.agent_service_account);
        if user.username.as_deref() != Some(expected.as_str()) {
            return Err(Refusal::Forbidden(format!(
                "{} is not the agent's service account ({expected})",
                user.username.unwrap_or_default()
            )));
        }
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        let (Some(pod_name), Some(pod_uid)) = (first(POD_NAME), first(POD_UID)) else {
            return Err(Refusal::Forbidden("the token is not bound to a pod (use a projected ServiceAccount token)".into()));
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.agent_namespace);
        let pod = pods
            .get_opt(&pod_name)
            .await
            .map_err(|e| Refusal::Internal(format!("reading pod {pod_name}: {e}")))?
            .filter(|p| p.metadata.uid.as_deref() == Some(pod_uid.as_str()))
            .ok_or_else(|| Refusal::Forbidden(format!("the token's pod {pod_name} ({pod_uid}) no longer exists")))?;
        pod.spec
            .and_then(|s| s.node_name)
            .ok_or_else(|| Refusal::Forbidden(format!("the agent pod {pod_name} is not scheduled on a node")))
    }

    /// Grants `identity` to the agent of `node` only if a pod on that node runs as it.
    pub async fn authorize(&self, node: &str, identity: &Identity) -> Result<(), Refusal> {
        if identity.trust_domain != self.trust_domain {
            return Err(Refusal::Forbidden(format!("{identity} is not in trust domain {}", self.trust_domain)));
        }
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &identity.namespace);
        let on_node = pods
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
            .map_err(|e| Refusal::Internal(format!("listing pods on {node}: {e}")))?;
        let runs_as = |p: &Pod| {
            p.spec.as_ref().and_then(|s| s.service_account_name.as_deref()).unwrap_or("default") == identity.service_account
        };
        if on_node.items.iter().any(runs_as) {
            Ok(())
        } else {
            Err(Refusal::Forbidden(format!("no pod on node {node} runs as {identity}")))
        }
    }
}
