//! Workload identity for Warren, as Istio does it: SPIFFE IDs (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`)
//! carried as the URI SAN of short-lived X.509 certificates, issued by a CA, verified on both ends of
//! every mTLS connection (HBONE) — chain to the mesh's roots, validity, and trust domain.
//!
//! - [`Identity`]: parse and format SPIFFE IDs (field-named errors).
//! - [`CertificateAuthority`]: a root (generated, or the user's), issuing workload certificates from a
//!   CSR (the controller's path: the agent keeps its private keys) or with a fresh key.
//! - [`tls`]: rustls client/server configs whose verifiers check the chain against the mesh roots and the
//!   peer's SPIFFE identity, plus [`tls::peer_identity`].
mod ca;
mod spiffe;
pub mod tls;

pub use ca::{CertificateAuthority, WorkloadCertificate};
pub use spiffe::{Identity, IdentityError};

/// The trust domain Istio and Warren use unless configured otherwise.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
