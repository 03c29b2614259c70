//! How many retries the traffic allows, so that retries cannot multiply load on a failing service (a retry
//! storm). Two budgets:
//! - [`BudgetConfig::Concurrent`], Envoy's retry budget: retries in flight at most `percent` % of the
//!   requests in flight (the caller's count), never fewer than `min_concurrency` — Envoy computes
//!   `max(min_retry_concurrency, budget_percent / 100 × active)` and lets a retry go while fewer are active;
//! - [`BudgetConfig::Windowed`], Warren's: over a sliding window, retries at most `floor + percent` % of the
//!   new requests seen in it (gRPC's and Finagle's retry budget shape). It is Warren's default
//!   ([`BudgetConfig::warren_default`]) because it also bounds retries of short requests, which rarely
//!   overlap in flight.
//!
//! The window is 10 slots of `window / 10`: counts cover the current slot and the nine before it, so a
//! request stops counting between 0.9 and 1 window after it was seen. Every budget keeps the window's
//! counts for [`RetryBudget::snapshot`] (the non-windowed ones over 10 s).
//!
//! [`RetryBudget`] is shared by every task of a cluster through `&self`: its state sits in an `Arc` (a
//! mutex for the window, atomics for the rest) that each [`RetryPermit`] also holds, so a permit is `Send +
//! 'static` and can travel with the retry's future; dropping it ends the retry's time in flight.
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

/// Which retry budget applies (see the module doc).
#[derive(Debug, Clone, PartialEq)]
pub enum BudgetConfig {
    /// Envoy's retry budget: retries in flight ≤ max(min_concurrency, percent% × requests in flight).
    Concurrent { percent: f64, min_concurrency: u32 },
    /// Over a sliding window (10 slots): retries in the window ≤ floor + percent% × requests in the window.
    Windowed { window: Duration, percent: f64, floor: u32 },
    Unlimited,
}

impl BudgetConfig {
    /// The window the non-windowed budgets count over, for [`RetryBudget::snapshot`] only.
    pub const SNAPSHOT_WINDOW: Duration = Duration::from_secs(10);

    /// Warren's default when no DestinationRule sets `retryBudget`: over 10 s, 20 % of the requests plus
    /// 100 (10 retries a second), so a quiet service can still retry and a busy one cannot storm.
    pub fn warren_default() -> BudgetConfig {
        BudgetConfig::Windowed { window: Duration::from_secs(10), percent: 20.0, floor: 100 }
    }

    /// A DestinationRule's `retryBudget`: with `budgetInterval`, windowed over it (`minRetryConcurrency`
    /// is the floor); without, Envoy's concurrent budget. Istio's defaults (20 %, 3) fill unset fields.
    pub fn from_istio(budget: &warren_api::resilience::RetryBudget) -> BudgetConfig {
        let (percent, minimum) = (budget.percent(), budget.min_retry_concurrency());
        match budget.budget_interval_ms {
            Some(ms) => BudgetConfig::Windowed { window: Duration::from_millis(ms), percent, floor: minimum },
            None => BudgetConfig::Concurrent { percent, min_concurrency: minimum },
        }
    }

    fn window(&self) -> Duration {
        match self {
            BudgetConfig::Windowed { window, .. } => *window,
            _ => BudgetConfig::SNAPSHOT_WINDOW,
        }
    }
}

/// What `inspect` shows of a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BudgetSnapshot {
    /// New requests counted in the current window.
    pub requests: u64,
    /// Retries let through in the current window.
    pub retries: u64,
    /// Retries whose permit is still held.
    pub retries_in_flight: u32,
    /// Retries refused since the budget was made.
    pub refused: u64,
}

/// One cluster's retry budget (see the module doc).
#[derive(Debug)]
pub struct RetryBudget {
    config: BudgetConfig,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    in_flight: AtomicU32,
    refused: AtomicU64,
    window: Mutex<Window>,
}

/// A retry let through by the budget: it counts as in flight until dropped.
#[derive(Debug)]
pub struct RetryPermit {
    shared: Arc<Shared>,
}

impl Drop for RetryPermit {
    fn drop(&mut self) {
        self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl RetryBudget {
    pub fn new(config: BudgetConfig, now: Instant) -> RetryBudget {
        let window = Mutex::new(Window::new(config.window(), now));
        let shared = Arc::new(Shared { in_flight: AtomicU32::new(0), refused: AtomicU64::new(0), window });
        RetryBudget { config, shared }
    }

    pub fn config(&self) -> &BudgetConfig {
        &self.config
    }

    /// A new request (not a retry) started: counts toward the windowed budget.
    pub fn on_request(&self, now: Instant) {
        let mut window = self.window(now);
        let slot = window.slot();
        window.requests[slot] += 1;
    }

    /// May one more retry go? `active_requests` is the caller's count of requests in flight (used by
    /// [`BudgetConfig::Concurrent`], as Envoy's active plus pending requests). `Some(permit)` counts the
    /// retry — in flight until the permit drops, in the window once taken; `None`: the budget is spent.
    /// The check and the count happen under one lock, so concurrent callers never overshoot the budget.
    pub fn try_retry(&self, now: Instant, active_requests: u32) -> Option<RetryPermit> {
        let mut window = self.window(now);
        let in_flight = self.shared.in_flight.load(Ordering::Acquire);
        let allowed = match self.config {
            BudgetConfig::Concurrent { percent, min_concurrency } => {
                u64::from(in_flight) < concurrent_limit(percent, min_concurrency, active_requests)
            }
            BudgetConfig::Windowed { percent, floor, .. } => {
                let (requests, retries) = window.totals();
                (retries + 1) as f64 <= f64::from(floor) + share(percent, requests)
            }
            BudgetConfig::Unlimited => true,
        };
        if !allowed {
            self.shared.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let slot = window.slot();
        window.retries[slot] += 1;
        self.shared.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(RetryPermit { shared: self.shared.clone() })
    }

    /// For `inspect`: (requests, retries) counted in the current window, retries in flight, retries refused.
    pub fn snapshot(&self, now: Instant) -> BudgetSnapshot {
        let (requests, retries) = self.window(now).totals();
        BudgetSnapshot {
            requests,
            retries,
            retries_in_flight: self.shared.in_flight.load(Ordering::Acquire),
            refused: self.shared.refused.load(Ordering::Relaxed),
        }
    }

    /// The window, moved on to `now`. A panic elsewhere while it was held leaves plain counters behind, so a
    /// poisoned lock is still used.
    fn window(&self, now: Instant) -> MutexGuard<'_, Window> {
        let mut window = self.shared.window.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        window.advance(now);
        window
    }
}

/// Envoy's `max(min_retry_concurrency, budget_percent / 100 × active)`, the product truncated.
fn concurrent_limit(percent: f64, min_concurrency: u32, active_requests: u32) -> u64 {
    (share(percent, u64::from(active_requests)) as u64).max(u64::from(min_concurrency))
}

/// `percent` % of `count` (a percent that is not a positive number allows nothing).
fn share(percent: f64, count: u64) -> f64 {
    if percent.is_finite() && percent > 0.0 { percent * count as f64 / 100.0 } else { 0.0 }
}

const SLOTS: u64 = 10;

/// Counts over a sliding window of [`SLOTS`] slots; `current` is the absolute number of the newest slot.
#[derive(Debug)]
struct Window {
    origin: Instant,
    slot_nanos: u128,
    current: u64,
    requests: [u64; SLOTS as usize],
    retries: [u64; SLOTS as usize],
}

impl Window {
    fn new(length: Duration, now: Instant) -> Window {
        let slot_nanos = (length.as_nanos() / u128::from(SLOTS)).max(1);
        Window { origin: now, slot_nanos, current: 0, requests: [0; SLOTS as usize], retries: [0; SLOTS as usize] }
    }

    /// Moves to the slot of `now`, emptying the slots passed over. A `now` older than the newest slot (tasks
    /// read the clock at slightly different times) counts in the newest slot.
    fn advance(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.origin).as_nanos();
        let index = u64::try_from(elapsed / self.slot_nanos).unwrap_or(u64::MAX);
        if index <= self.current {
            return;
        }
        for k in 1..=(index - self.current).min(SLOTS) {
            let slot = ((self.current + k) % SLOTS) as usize;
            self.requests[slot] = 0;
            self.retries[slot] = 0;
        }
        self.current = index;
    }

    fn slot(&self) -> usize {
        (self.current % SLOTS) as usize
    }

    fn totals(&self) -> (u64, u64) {
        (self.requests.iter().sum(), self.retries.iter().sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn windowed(floor: u32, percent: f64) -> BudgetConfig {
        BudgetConfig::Windowed { window: secs(10), percent, floor }
    }

    #[test]
    fn istio_budgets_map_to_the_two_kinds_with_istio_defaults() {
        use warren_api::resilience::RetryBudget as Istio;
        let plain = Istio { percent: None, min_retry_concurrency: None, budget_interval_ms: None };
        assert_eq!(BudgetConfig::from_istio(&plain), BudgetConfig::Concurrent { percent: 20.0, min_concurrency: 3 });
        let interval = Istio { percent: Some(50.0), min_retry_concurrency: Some(7), budget_interval_ms: Some(2_500) };
        let expected = BudgetConfig::Windowed { window: Duration::from_millis(2_500), percent: 50.0, floor: 7 };
        assert_eq!(BudgetConfig::from_istio(&interval), expected);
        let default = BudgetConfig::Windowed { window: secs(10), percent: 20.0, floor: 100 };
        assert_eq!(BudgetConfig::warren_default(), default);
    }

    #[test]
    fn concurrent_allows_min_concurrency_when_idle_and_percent_of_active_when_busy() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(BudgetConfig::Concurrent { percent: 20.0, min_concurrency: 3 }, t0);
        let held: Vec<_> = (0..3).map(|_| budget.try_retry(t0, 0).expect("within the minimum")).collect();
        assert!(budget.try_retry(t0, 0).is_none(), "a 4th concurrent retry with nothing else in flight");
        // 20 % of 24 is 4.8, truncated to 4: one more.
        let fourth = budget.try_retry(t0, 24).expect("20 % of 24 active");
        assert!(budget.try_retry(t0, 24).is_none());
        let fifth = budget.try_retry(t0, 25);
        assert!(fifth.is_some(), "20 % of 25 is 5");
        assert_eq!(budget.snapshot(t0).retries_in_flight, 5);
        drop((held, fourth, fifth));
        assert_eq!(budget.snapshot(t0).retries_in_flight, 0);
        assert!(budget.try_retry(t0, 0).is_some(), "dropped permits free the budget");
        assert_eq!(budget.snapshot(t0).refused, 2);
    }

    #[test]
    fn windowed_allows_floor_plus_percent_of_requests_in_the_window() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(windowed(2, 50.0), t0);
        for _ in 0..4 {
            budget.on_request(t0);
        }
        // 2 + 50 % × 4 = 4 retries, whether or not their permits are still held.
        for _ in 0..4 {
            drop(budget.try_retry(t0, 0).expect("within the budget"));
        }
        assert!(budget.try_retry(t0, 0).is_none());
        budget.on_request(t0 + secs(1));
        budget.on_request(t0 + secs(1));
        assert!(budget.try_retry(t0 + secs(1), 0).is_some(), "two more requests: one more retry");
        assert!(budget.try_retry(t0 + secs(1), 0).is_none());
        let expected = BudgetSnapshot { requests: 6, retries: 5, retries_in_flight: 0, refused: 2 };
        assert_eq!(budget.snapshot(t0 + secs(1)), expected);
    }

    #[test]
    fn the_window_slides_by_tenths() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(windowed(0, 100.0), t0);
        budget.on_request(t0);
        budget.on_request(t0 + Duration::from_millis(1_500));
        assert!(budget.try_retry(t0 + Duration::from_millis(1_600), 0).is_some());
        let at = |ms| budget.snapshot(t0 + Duration::from_millis(ms));
        assert_eq!((at(9_999).requests, at(9_999).retries), (2, 1));
        assert_eq!((at(10_000).requests, at(10_000).retries), (1, 1), "the first second's slot is gone at 10 s");
        assert_eq!((at(10_999).requests, at(10_999).retries), (1, 1));
        assert_eq!((at(11_000).requests, at(11_000).retries), (0, 0));
        assert_eq!(at(60_000).requests, 0);
        budget.on_request(t0 + secs(60));
        assert_eq!(at(60_500).requests, 1, "counting resumes after a long idle gap");
    }

    #[test]
    fn retries_refused_once_the_window_is_spent_go_again_when_it_slides() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(windowed(1, 0.0), t0);
        assert!(budget.try_retry(t0, 1_000).is_some());
        assert!(budget.try_retry(t0 + Duration::from_millis(9_999), 1_000).is_none(), "the window ignores in-flight");
        assert!(budget.try_retry(t0 + secs(10), 1_000).is_some());
    }

    #[test]
    fn a_stale_clock_reading_counts_in_the_newest_slot() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(windowed(0, 100.0), t0 + secs(5));
        budget.on_request(t0 + secs(8));
        budget.on_request(t0 + secs(7));
        budget.on_request(t0);
        assert_eq!(budget.snapshot(t0 + secs(8)).requests, 3);
        assert_eq!(budget.snapshot(t0 + Duration::from_millis(17_999)).requests, 3);
        assert_eq!(budget.snapshot(t0 + secs(18)).requests, 0, "all three were counted in the 8 s slot");
    }

    #[test]
    fn unlimited_never_refuses_but_still_counts() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(BudgetConfig::Unlimited, t0);
        budget.on_request(t0);
        let permits: Vec<_> = (0..1_000).map(|_| budget.try_retry(t0, 0)).collect();
        assert!(permits.iter().all(Option::is_some));
        let expected = BudgetSnapshot { requests: 1, retries: 1_000, retries_in_flight: 1_000, refused: 0 };
        assert_eq!(budget.snapshot(t0), expected);
    }

    #[test]
    fn a_budget_that_is_not_a_number_allows_only_the_minimum() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(BudgetConfig::Concurrent { percent: f64::NAN, min_concurrency: 1 }, t0);
        let _first = budget.try_retry(t0, 1_000).expect("the minimum");
        assert!(budget.try_retry(t0, 1_000).is_none());
    }

    #[test]
    fn concurrent_callers_never_overshoot_and_permits_travel_between_threads() {
        fn send_static<T: Send + Sync + 'static>() {}
        send_static::<RetryPermit>();
        send_static::<RetryBudget>();
        let t0 = Instant::now();
        let budget = Arc::new(RetryBudget::new(BudgetConfig::Concurrent { percent: 0.0, min_concurrency: 5 }, t0));
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (budget, barrier) = (budget.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    (0..100).filter_map(|_| budget.try_retry(t0, 0)).collect::<Vec<_>>()
                })
            })
            .collect();
        let permits: Vec<RetryPermit> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        assert_eq!(permits.len(), 5);
        assert_eq!(budget.snapshot(t0).refused, 795);
        drop(permits);
        assert_eq!(budget.snapshot(t0).retries_in_flight, 0);
    }
}
