//! warren-agent: the per-node half of Warren.
//!
//! Data flows one way: a workload [`sources`] (a local file today; the Kubernetes API and the controller's
//! push next) → [`state`] (which pods, enrolled or not) → [`inpod`] reconciles: [`ebpf`] maps that steer
//! enrolled pods' sockets, and the [`proxy`] listeners inside each pod's network namespace. [`admin`]
//! exposes metrics and state; [`inspect`] is the CLI that reads them back; [`uninstall`] tells the last agent
//! of a node from a restarting one.
pub mod admin;
pub mod config;
pub mod identity;
pub mod ebpf;
pub mod inpod;
pub mod inspect;
pub mod metrics;
pub mod proxy;
pub mod resilience;
pub mod run;
pub mod sources;
pub mod uninstall;
pub mod state;
pub mod sys;
pub mod telemetry;
