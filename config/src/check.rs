//! One check for every Istio object, wherever it is read (the controller's pipeline, `analyze`): its
//! validation errors ([`crate::validate`]) and the fields Warren does not honour ([`crate::support`]).
use kube::ResourceExt;
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    istio::{
        AuthorizationPolicy, AuthorizationPolicySpec, AuthorizationRule, DestinationRule, Gateway, ServiceEntry,
        VirtualService, WorkloadSelector,
    },
    support,
    validate::{self, FieldError},
    workloads::peer_authentication::PeerAuthentication,
};

/// What checking one object found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checked {
    /// Invalid values: the object is not applied (its last valid generation stays).
    pub errors: Vec<FieldError>,
    /// Set but not honoured (or not Istio's): the object is applied without them (security: fail closed).
    pub unsupported: Vec<FieldError>,
}

/// An Istio kind Warren reads.
pub trait IstioObject: Serialize + DeserializeOwned + Clone {
    const KIND: &'static str;
    const GROUP: &'static str;
    fn namespace_name(&self) -> (String, String);
    fn generation(&self) -> Option<i64>;
    fn uid(&self) -> Option<String>;
    fn validate(&self) -> Vec<FieldError>;
    fn spec_json(&self) -> serde_json::Value;

    /// What stands in for this object while it is invalid and never had a valid generation (default:
    /// nothing — the object is left out).
    fn stand_in(&self) -> Option<Self> {
        None
    }

    fn check(&self) -> Checked {
        Checked { errors: self.validate(), unsupported: support::review(Self::KIND, &self.spec_json()) }
    }
}

macro_rules! istio_object {
    ($type:ty, $kind:literal, $group:literal, $validate:path $(, stand_in = $stand_in:path)?) => {
        impl IstioObject for $type {
            const KIND: &'static str = $kind;
            const GROUP: &'static str = $group;
            fn namespace_name(&self) -> (String, String) {
                (self.namespace().unwrap_or_default(), self.name_any())
            }
            fn generation(&self) -> Option<i64> {
                self.metadata.generation
            }
            fn uid(&self) -> Option<String> {
                self.metadata.uid.clone()
            }
            fn validate(&self) -> Vec<FieldError> {
                let mut errors = $validate(&self.spec);
                errors.extend(validate::annotations($kind, self.metadata.annotations.as_ref()));
                errors
            }
            fn spec_json(&self) -> serde_json::Value {
                serde_json::to_value(&self.spec).unwrap_or_default()
            }
            $(fn stand_in(&self) -> Option<Self> {
                $stand_in(self)
            })?
        }
    };
}

istio_object!(VirtualService, "VirtualService", "networking.istio.io", validate::virtual_service);
istio_object!(DestinationRule, "DestinationRule", "networking.istio.io", validate::destination_rule);
istio_object!(Gateway, "Gateway", "networking.istio.io", validate::gateway);
istio_object!(ServiceEntry, "ServiceEntry", "networking.istio.io", validate::service_entry);
istio_object!(
    AuthorizationPolicy,
    "AuthorizationPolicy",
    "security.istio.io",
    validate::authorization_policy,
    stand_in = fail_closed
);

/// An AuthorizationPolicy that was never valid must not leave access wider than its author meant: as an
/// ALLOW policy (or one whose action is unreadable) it allows nothing; as DENY or CUSTOM it denies every
/// connection to the workloads it selects; AUDIT changes nothing and is left out.
fn fail_closed(policy: &AuthorizationPolicy) -> Option<AuthorizationPolicy> {
    let (action, rules) = match policy.spec.action.as_deref() {
        Some("AUDIT") => return None,
        Some("DENY" | "CUSTOM") => ("DENY", Some(vec![AuthorizationRule::default()])),
        _ => ("ALLOW", None),
    };
    let selector = policy
        .spec
        .selector
        .as_ref()
        .map(|s| WorkloadSelector { match_labels: s.match_labels.clone(), ..Default::default() });
    let mut stand_in = policy.clone();
    stand_in.spec = AuthorizationPolicySpec { selector, action: Some(action.into()), rules, ..Default::default() };
    Some(stand_in)
}

impl IstioObject for PeerAuthentication {
    const KIND: &'static str = "PeerAuthentication";
    const GROUP: &'static str = "security.istio.io";
    fn namespace_name(&self) -> (String, String) {
        (self.metadata.namespace.clone(), self.metadata.name.clone())
    }
    fn generation(&self) -> Option<i64> {
        self.metadata.generation
    }
    fn uid(&self) -> Option<String> {
        self.metadata.uid.clone()
    }
    fn validate(&self) -> Vec<FieldError> {
        validate::peer_authentication(&self.spec)
    }
    fn spec_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.spec).unwrap_or_default()
    }
}

/// The API group of an Istio kind (for status and Events).
pub fn group_of(kind: &str) -> &'static str {
    match kind {
        "AuthorizationPolicy" | "PeerAuthentication" => "security.istio.io",
        _ => "networking.istio.io",
    }
}
