//! What the agent knows: workloads (the model is shared with the controller, warren-config) and the
//! pushed tables, indexed.
mod tables;

pub use tables::{L4Route, MeshTables, pick_weighted, subset_id};
pub use warren_api::workloads::*;
