//! The in-agent L4 proxy: listeners inside enrolled pods, the connection table, byte copying.
pub mod connections;
pub mod outbound;

pub use connections::{ConnectionInfo, ConnectionTable};
