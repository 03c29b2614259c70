//! What keeps requests flowing when endpoints fail, on the client's agent: Istio's retries, load
//! balancing, connection pool limits and outlier detection (DestinationRule `trafficPolicy`, VirtualService
//! `retries`). The parts are explicit state machines with no I/O, driven with the time passed in (tokio's
//! clock, so tests pause it):
//! - [`backoff`]: the jittered exponential wait between tries;
//! - [`budget`]: how many retries the traffic allows (Envoy's retry budget; Warren's default);
//! - [`outlier`]: consecutive failures per endpoint → ejection, and when it ends;
//! - [`balance`]: least request (two random choices), round robin, random, ring hash, maglev, warm-up;
//! - [`locality`]: which endpoints the client prefers by locality, and how traffic spills over.
pub mod backoff;
pub mod balance;
pub mod budget;
pub mod locality;
pub mod outlier;
pub mod cluster;
