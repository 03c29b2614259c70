//! Warren's configuration model, shared by the controller (which compiles and pushes it) and the agent
//! (which applies it): data flows Kubernetes → [`cluster::ClusterState`] → [`compile`] → [`tables`] →
//! [`push`] → agent.
pub mod analyze;
pub mod check;
pub mod cluster;
pub mod compile;
pub mod connect_fault;
pub mod istio;
pub mod load;
pub mod support;
pub mod validate;

// What the controller pushes and the agent holds lives in warren-api; the paths stay as they were.
pub use warren_api::{authz, exposition, flows, push, tables, workloads};

/// Istio's bookinfo samples for tests: beside the project (`../shared`), `$WARREN_CONFORMANCE_DIR`, or the
/// machines' shared copy.
#[cfg(test)]
pub(crate) fn bookinfo_samples() -> Option<std::path::PathBuf> {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    [
        std::env::var_os("WARREN_CONFORMANCE_DIR").map(std::path::PathBuf::from),
        Some(manifest.join("../../shared/conformance/istio-bookinfo")),
        Some(std::path::PathBuf::from("/work/shared/conformance/istio-bookinfo")),
    ]
    .into_iter()
    .flatten()
    .find(|d| d.is_dir())
}
