//! The contract between warren-controller and warren-agent: the tables the controller compiles and pushes
//! ([`tables`], [`push`]), the workloads model ([`workloads`]), and AuthorizationPolicy compiled into typed
//! match structures with the one evaluation both sides use ([`authz`]). Istio's CRDs, validation and
//! compilation stay in `warren-config`; the agent depends only on this crate.
pub mod admin;
pub mod authz;
pub mod exposition;
pub mod flows;
pub mod http;
pub mod push;
pub mod resilience;
pub mod tables;
pub mod workloads;
