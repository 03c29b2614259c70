//! One check for every Istio object, wherever it is read (the controller's pipeline, `analyze`): its
//! validation errors ([`crate::validate`]) and the fields Warren does not honour ([`crate::support`]).
use kube::ResourceExt;
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    istio::{AuthorizationPolicy, DestinationRule, Gateway, ServiceEntry, VirtualService},
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

    fn check(&self) -> Checked {
        Checked { errors: self.validate(), unsupported: support::review(Self::KIND, &self.spec_json()) }
    }
}

macro_rules! istio_object {
    ($type:ty, $kind:literal, $group:literal, $validate:path) => {
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
                $validate(&self.spec)
            }
            fn spec_json(&self) -> serde_json::Value {
                serde_json::to_value(&self.spec).unwrap_or_default()
            }
        }
    };
}

istio_object!(VirtualService, "VirtualService", "networking.istio.io", validate::virtual_service);
istio_object!(DestinationRule, "DestinationRule", "networking.istio.io", validate::destination_rule);
istio_object!(Gateway, "Gateway", "networking.istio.io", validate::gateway);
istio_object!(ServiceEntry, "ServiceEntry", "networking.istio.io", validate::service_entry);
istio_object!(AuthorizationPolicy, "AuthorizationPolicy", "security.istio.io", validate::authorization_policy);

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
