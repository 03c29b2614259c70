//! Warren's configuration model, shared by the controller (which compiles and pushes it) and the agent
//! (which applies it): data flows Kubernetes → [`cluster::ClusterState`] → [`compile`] → [`tables`] →
//! [`push`] → agent.
pub mod analyze;
pub mod cluster;
pub mod compile;
pub mod istio;
pub mod push;
pub mod tables;
pub mod validate;
pub mod workloads;
