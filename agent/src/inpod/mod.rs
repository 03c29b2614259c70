//! Working inside pods: finding them ([`discover`]), their network namespaces ([`Netns`]), and keeping
//! enrollment in line with the workloads ([`InpodManager`]). The agent's listeners and upstream sockets for
//! a pod are created in that pod's netns (as ztunnel's in-pod mode does), so traffic leaves with the pod's
//! address and the pod's own loopback reaches the agent.
pub mod discover;
mod manager;
mod netns;

pub use manager::{InpodManager, PodStatus, PortConfig};
pub use netns::Netns;
