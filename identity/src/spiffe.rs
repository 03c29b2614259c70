use std::{fmt, str::FromStr};

/// A Kubernetes workload's SPIFFE identity: `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("SPIFFE ID {0:?}: must start with spiffe://")]
    Scheme(String),
    #[error("SPIFFE ID {0:?}: expected spiffe://<trust domain>/ns/<namespace>/sa/<service account>")]
    Shape(String),
    #[error("SPIFFE ID {id:?}: {field} {value:?} is not a valid name")]
    Name { id: String, field: &'static str, value: String },
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Identity {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

/// Trust domains are DNS-like; namespaces and service accounts are Kubernetes names.
fn valid(value: &str, allow_dots: bool) -> bool {
    !value.is_empty()
        && value.len() <= 253
        && value.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (allow_dots && c == '.'))
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(id: &str) -> Result<Self, IdentityError> {
        let rest = id.strip_prefix("spiffe://").ok_or_else(|| IdentityError::Scheme(id.to_string()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [trust_domain, "ns", namespace, "sa", service_account] = parts.as_slice() else {
            return Err(IdentityError::Shape(id.to_string()));
        };
        for (field, value, dots) in
            [("trust domain", trust_domain, true), ("namespace", namespace, false), ("service account", service_account, true)]
        {
            if !valid(value, dots) {
                return Err(IdentityError::Name { id: id.to_string(), field, value: value.to_string() });
            }
        }
        Ok(Identity::new(trust_domain, namespace, service_account))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_names_what_is_wrong() {
        let id: Identity = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews".parse().unwrap();
        assert_eq!(id, Identity::new("cluster.local", "bookinfo", "bookinfo-reviews"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews");
        assert_eq!("https://x/ns/a/sa/b".parse::<Identity>(), Err(IdentityError::Scheme("https://x/ns/a/sa/b".into())));
        assert!(matches!("spiffe://td/ns/a".parse::<Identity>(), Err(IdentityError::Shape(_))));
        assert_eq!(
            "spiffe://td/ns/Bad_NS/sa/b".parse::<Identity>().unwrap_err().to_string(),
            "SPIFFE ID \"spiffe://td/ns/Bad_NS/sa/b\": namespace \"Bad_NS\" is not a valid name"
        );
    }
}
