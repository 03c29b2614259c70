//! Where the agent learns its node's workloads. Each source publishes whole [`Workloads`] snapshots on a
//! watch channel; the in-pod manager reconciles against the latest.
pub mod controller;
pub mod file;
pub mod kubernetes;

pub use crate::state::Workloads;
