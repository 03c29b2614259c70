//! warren-agent: the per-node half of Warren.
//!
//! Data flows one way: [`config`] (today a local file; later the controller's push) → [`ebpf`] maps that
//! steer enrolled pods' sockets → the [`proxy`] listeners that [`inpod`] opens inside each pod's network
//! namespace. [`admin`] exposes metrics and state; [`inspect`] is the CLI that reads them back.
pub mod admin;
pub mod config;
pub mod ebpf;
pub mod inpod;
pub mod inspect;
pub mod metrics;
pub mod proxy;
pub mod run;
pub mod sys;
