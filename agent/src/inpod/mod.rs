//! Working inside pods' network namespaces: the agent's listeners and upstream sockets for a pod are
//! created in that pod's netns (as ztunnel's in-pod mode does), so traffic leaves with the pod's address
//! and the pod's own loopback reaches the agent.
mod netns;

pub use netns::Netns;
