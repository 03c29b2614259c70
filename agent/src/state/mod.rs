//! What the agent knows: workloads (the model is shared with the controller, warren-config) and the
//! pushed tables, indexed; the HTTP rules compiled for the L7 proxy.
pub mod gateways;
pub mod http_routes;
pub mod tls_routes;
mod tables;

pub use tables::{L4Route, MeshTables, pick_weighted, subset_id};
pub use warren_api::workloads::*;
