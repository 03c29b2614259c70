//! Warren's end-to-end tests live in `tests/`: each file is a group of scenarios on the testbed
//! (real eBPF, real sockets in network namespaces) or on the local Kubernetes cluster. [`bookinfo`] is the
//! lab of Istio's bookinfo that the traffic-management scenarios (and `cargo xtask demo`) share.

pub use warren_testbed::bookinfo;

use std::time::{Duration, Instant};

/// Polls `check` every 20 ms until it returns `Some` (that value) or `timeout` passes (`None`): the one
/// wait for "the system gets there" in scenarios, instead of hand-written deadline loops.
pub fn eventually<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`eventually`] for checks that await (API calls), polling every 50 ms.
pub async fn eventually_async<T, F>(timeout: Duration, mut check: impl FnMut() -> F) -> Option<T>
where
    F: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
