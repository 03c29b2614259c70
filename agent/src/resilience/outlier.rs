//! Outlier detection, Envoy's consecutive-error kinds (the ones Istio configures): an endpoint that fails
//! `consecutive_5xx` times in a row (or `consecutive_gateway` times with 502/503/504, or, with
//! `split_local_origin`, `consecutive_local` connect failures) is ejected from load balancing for a while.
//!
//! As in Envoy:
//! - a threshold reached resets its counter whether or not the ejection happens (so a bout of errors is
//!   detected again even with no success in between), and results of an ejected endpoint are ignored;
//! - the ejection lasts `base_ejection × multiplier`, at most Envoy's `max_ejection_time` (300 s unless
//!   `base_ejection` is longer; Istio does not set it), and ends at the first sweep (every `interval` from
//!   the detector's `epoch`) after that; the multiplier grows by one per ejection (no further once the
//!   time is capped) and shrinks by one per sweep interval the endpoint then stays un-ejected;
//! - un-ejection resets every counter, so a few errors right after do not eject it again;
//! - [`may_eject`] is `maxEjectionPercent` (with the classic Envoy rule: at least one endpoint can always be
//!   ejected), [`in_panic`] is `minHealthPercent` (Envoy's healthy panic threshold).
//!
//! The state machine has no clock: every time is passed in, and ejections end lazily when
//! [`EndpointHealth::is_ejected`] (or [`EndpointHealth::eject`]) sees a `now` past them.
use std::time::Duration;

use tokio::time::Instant;
use warren_api::resilience::OutlierDetection;

/// Outlier detection settings with Istio's defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detection {
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub consecutive_local: u32,
    pub split_local_origin: bool,
    pub interval: Duration,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
}

impl Detection {
    /// Envoy's default `max_ejection_time`.
    pub const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(300);

    /// The longest one ejection lasts: Envoy's default `max_ejection_time`, or `base_ejection` if longer.
    pub fn max_ejection(&self) -> Duration {
        self.base_ejection.max(Detection::DEFAULT_MAX_EJECTION)
    }
}

impl From<&OutlierDetection> for Detection {
    fn from(od: &OutlierDetection) -> Detection {
        Detection {
            consecutive_5xx: od.consecutive_5xx_errors(),
            consecutive_gateway: od.consecutive_gateway_errors(),
            consecutive_local: od.consecutive_local_origin_failures(),
            split_local_origin: od.split_external_local_origin_errors,
            interval: Duration::from_millis(od.interval_ms()),
            base_ejection: Duration::from_millis(od.base_ejection_time_ms()),
            max_ejection_percent: od.max_ejection_percent(),
            min_health_percent: od.min_health_percent(),
        }
    }
}

/// Istio's defaults for an `outlierDetection` block with no field set.
impl Default for Detection {
    fn default() -> Detection {
        Detection::from(&OutlierDetection::default())
    }
}

/// One try's result as outlier detection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryOutcome {
    /// The upstream answered with this status (any).
    Status(u16),
    /// No answer: connect failure, reset, timeout (Envoy's local-origin errors).
    LocalFailure,
    /// Connected (local-origin success; matters with split_local_origin).
    Connected,
}

/// One endpoint's outlier state (see the module doc). `Default` is healthy and never ejected.
#[derive(Debug, Clone, Default)]
pub struct EndpointHealth {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    consecutive_local: u32,
    /// Envoy's ejection time back-off: what `base_ejection` is multiplied by.
    multiplier: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
    unejected_at: Option<Instant>,
}

impl EndpointHealth {
    /// Counts the outcome; true when a threshold is reached and the endpoint should be ejected now (the
    /// caller checks [`may_eject`] first, then calls [`EndpointHealth::eject`]). Without
    /// `split_local_origin`, a local failure is Envoy's 503 (a 5xx and a gateway error) and `Connected`
    /// means nothing; with it, local failures count only toward `consecutive_local`, which `Connected` (or
    /// any status, which implies a connection) resets. A 5xx other than 502–504 resets the gateway count;
    /// anything not 5xx resets both. A threshold of 0 is off. An ejected endpoint's results are ignored.
    pub fn record(&mut self, outcome: TryOutcome, detection: &Detection) -> bool {
        if self.ejected_until.is_some() {
            return false;
        }
        let split = detection.split_local_origin;
        match outcome {
            TryOutcome::Status(code) => {
                if split {
                    self.consecutive_local = 0;
                }
                self.status(code, detection)
            }
            TryOutcome::LocalFailure if split => bump(&mut self.consecutive_local, detection.consecutive_local),
            TryOutcome::LocalFailure => self.status(503, detection),
            TryOutcome::Connected => {
                if split {
                    self.consecutive_local = 0;
                }
                false
            }
        }
    }

    /// Envoy's `putHttpResponseCode`.
    fn status(&mut self, code: u16, detection: &Detection) -> bool {
        if !(500..600).contains(&code) {
            self.consecutive_5xx = 0;
            self.consecutive_gateway = 0;
            return false;
        }
        let gateway = if (502..=504).contains(&code) {
            bump(&mut self.consecutive_gateway, detection.consecutive_gateway)
        } else {
            self.consecutive_gateway = 0;
            false
        };
        bump(&mut self.consecutive_5xx, detection.consecutive_5xx) | gateway
    }

    /// Ejects until the first sweep (`epoch + k × interval`) at or after `now + base_ejection × multiplier`
    /// (capped at [`Detection::max_ejection`]), the multiplier first decayed by the sweeps spent un-ejected
    /// since the last ejection ended, then counting this one. No-op while already ejected.
    pub fn eject(&mut self, now: Instant, epoch: Instant, detection: &Detection) {
        if self.is_ejected(now) {
            return;
        }
        self.decay(now, detection.interval);
        let (base, max) = (detection.base_ejection, detection.max_ejection());
        if base.saturating_mul(self.multiplier) < max.saturating_add(base) {
            self.multiplier += 1;
        }
        let length = base.saturating_mul(self.multiplier).min(max);
        let end = now.checked_add(length).unwrap_or(now);
        self.ejected_until = Some(next_sweep(epoch, end, detection.interval));
        self.ejections = self.ejections.saturating_add(1);
    }

    /// Envoy lowers the multiplier at each sweep that finds the endpoint un-ejected for an interval or
    /// more; the ejection ended at a sweep, so that is one step per whole interval since.
    fn decay(&mut self, now: Instant, interval: Duration) {
        let Some(since) = self.unejected_at else { return };
        if interval.is_zero() {
            return;
        }
        let steps = now.saturating_duration_since(since).as_nanos() / interval.as_nanos();
        self.multiplier = self.multiplier.saturating_sub(u32::try_from(steps).unwrap_or(u32::MAX));
    }

    /// Whether ejected at `now`. An ejection past its end is over: it is recorded as ended at its end,
    /// and the counters reset.
    pub fn is_ejected(&mut self, now: Instant) -> bool {
        match self.ejected_until {
            Some(until) if now >= until => {
                self.ejected_until = None;
                self.unejected_at = Some(until);
                self.consecutive_5xx = 0;
                self.consecutive_gateway = 0;
                self.consecutive_local = 0;
                false
            }
            Some(_) => true,
            None => false,
        }
    }

    /// The end of the current ejection (it may be past, until [`EndpointHealth::is_ejected`] sees it).
    pub fn ejected_until(&self) -> Option<Instant> {
        self.ejected_until
    }

    /// The ejection multiplier as of the last ejection: +1 per ejection (the one in force included), −1
    /// per interval spent un-ejected since (applied at the next ejection), as Envoy counts it.
    pub fn times_ejected(&self) -> u32 {
        self.multiplier
    }

    /// Every ejection so far (Envoy's `num_ejections`).
    pub fn ejections_total(&self) -> u32 {
        self.ejections
    }
}

/// One more error: true (and the counter starts over) when that reaches a threshold other than 0.
fn bump(counter: &mut u32, threshold: u32) -> bool {
    *counter = counter.saturating_add(1);
    if threshold == 0 || *counter < threshold {
        return false;
    }
    *counter = 0;
    true
}

/// The first sweep `epoch + k × interval` (k ≥ 0) at or after `at`; `at` itself with no interval.
fn next_sweep(epoch: Instant, at: Instant, interval: Duration) -> Instant {
    if interval.is_zero() {
        return at;
    }
    let step = interval.as_nanos();
    let sweeps = at.saturating_duration_since(epoch).as_nanos().div_ceil(step);
    let offset = sweeps.saturating_mul(step);
    let offset = Duration::new((offset / 1_000_000_000) as u64, (offset % 1_000_000_000) as u32);
    epoch.checked_add(offset).unwrap_or(at)
}

/// Another ejection is allowed while ejected/total × 100 < max_percent (at most 100) — and at least one
/// endpoint can always be ejected, as in Envoy before `always_eject_one_host` became opt-in.
pub fn may_eject(ejected: usize, total: usize, max_percent: u32) -> bool {
    let max_percent = u128::from(max_percent.min(100));
    total > 0 && (ejected == 0 || ejected as u128 * 100 < max_percent * total as u128)
}

/// Below `min_health_percent` healthy endpoints, ejections are ignored (Envoy's panic threshold): true when
/// in panic. 0 = never. As in Envoy, an empty set is 0 % healthy.
pub fn in_panic(healthy: usize, total: usize, min_health_percent: u32) -> bool {
    min_health_percent > 0 && (total == 0 || (healthy as u128) * 100 < u128::from(min_health_percent) * total as u128)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn detection(consecutive_5xx: u32, consecutive_gateway: u32) -> Detection {
        Detection { consecutive_5xx, consecutive_gateway, ..Detection::default() }
    }

    fn record_all(health: &mut EndpointHealth, outcomes: &[TryOutcome], d: &Detection) -> Vec<bool> {
        outcomes.iter().map(|o| health.record(*o, d)).collect()
    }

    use TryOutcome::{Connected, LocalFailure, Status};

    #[test]
    fn istio_defaults_fill_an_empty_block() {
        let d = Detection::default();
        assert_eq!((d.consecutive_5xx, d.consecutive_gateway, d.consecutive_local), (5, 0, 5));
        assert!(!d.split_local_origin);
        assert_eq!((d.interval, d.base_ejection, d.max_ejection()), (secs(10), secs(30), secs(300)));
        assert_eq!((d.max_ejection_percent, d.min_health_percent), (10, 0));
        let od = OutlierDetection { base_ejection_time_ms: Some(400_000), ..Default::default() };
        assert_eq!(Detection::from(&od).max_ejection(), secs(400), "a longer base raises the cap");
    }

    #[test]
    fn five_consecutive_5xx_eject_and_the_count_starts_over() {
        let d = Detection::default();
        let mut h = EndpointHealth::default();
        let hits = record_all(&mut h, &[Status(500); 10], &d);
        assert_eq!(hits, [false, false, false, false, true, false, false, false, false, true]);
    }

    #[test]
    fn any_non_5xx_answer_resets_the_counts() {
        let d = Detection::default();
        let mut h = EndpointHealth::default();
        let errors = [Status(500); 4];
        for reset in [Status(200), Status(404), Status(101), Status(302)] {
            assert!(record_all(&mut h, &errors, &d).iter().all(|hit| !hit));
            assert!(!h.record(reset, &d));
        }
        assert!(!h.record(Status(599), &d) && !h.record(Status(503), &d), "two after the reset, not six");
    }

    #[test]
    fn gateway_errors_count_apart_and_other_5xx_reset_them() {
        let d = detection(0, 3);
        let mut h = EndpointHealth::default();
        assert_eq!(record_all(&mut h, &[Status(502), Status(503), Status(504)], &d), [false, false, true]);
        let broken = [Status(502), Status(502), Status(500), Status(502), Status(502), Status(502)];
        assert_eq!(record_all(&mut h, &broken, &d), [false, false, false, false, false, true]);
        assert!(record_all(&mut h, &[Status(500); 20], &d).iter().all(|hit| !hit), "consecutive_5xx 0 is off");
    }

    #[test]
    fn both_counters_run_on_gateway_errors() {
        let d = detection(3, 5);
        let mut h = EndpointHealth::default();
        assert_eq!(record_all(&mut h, &[Status(503); 3], &d), [false, false, true], "5xx first");
        assert_eq!(record_all(&mut h, &[Status(503); 2], &d), [false, true], "then the gateway count, 5 in all");
    }

    #[test]
    fn without_split_local_failures_are_503s_and_connected_means_nothing() {
        let d = detection(3, 0);
        let mut h = EndpointHealth::default();
        let outcomes = [LocalFailure, LocalFailure, Connected, LocalFailure];
        assert_eq!(record_all(&mut h, &outcomes, &d), [false, false, false, true]);
        let mut h = EndpointHealth::default();
        let hits = record_all(&mut h, &[Status(504), LocalFailure], &detection(0, 2));
        assert_eq!(hits, [false, true], "a local failure is a gateway error too");
    }

    #[test]
    fn with_split_local_failures_count_alone_and_a_connection_resets_them() {
        let d = Detection { consecutive_5xx: 2, consecutive_local: 3, split_local_origin: true, ..Default::default() };
        let mut h = EndpointHealth::default();
        let outcomes = [LocalFailure, LocalFailure, Connected, LocalFailure, LocalFailure, LocalFailure];
        assert_eq!(record_all(&mut h, &outcomes, &d), [false, false, false, false, false, true]);
        assert_eq!(record_all(&mut h, &[LocalFailure, LocalFailure, Status(500)], &d), [false, false, false]);
        assert!(!h.record(LocalFailure, &d), "the status implied a connection: local count back to 1");
        assert!(h.record(Status(500), &d), "local failures never touched the 5xx count (2 in a row now)");
    }

    #[test]
    fn an_ejection_ends_at_the_first_sweep_after_its_time() {
        let (epoch, d) = (Instant::now(), Detection::default());
        let mut h = EndpointHealth::default();
        h.eject(epoch + secs(3), epoch, &d);
        assert_eq!(h.ejected_until(), Some(epoch + secs(40)), "3 s + 30 s, at the 40 s sweep");
        assert_eq!((h.times_ejected(), h.ejections_total()), (1, 1));
        assert!(h.is_ejected(epoch + Duration::from_millis(39_999)));
        assert!(!h.is_ejected(epoch + secs(40)));
        assert_eq!(h.ejected_until(), None);
        let exact = Detection { interval: Duration::ZERO, ..d };
        let mut h = EndpointHealth::default();
        h.eject(epoch + secs(3), epoch, &exact);
        assert_eq!(h.ejected_until(), Some(epoch + secs(33)), "no sweeps: exactly the ejection time");
    }

    #[test]
    fn ejecting_an_ejected_endpoint_changes_nothing_and_its_results_are_ignored() {
        let (epoch, d) = (Instant::now(), detection(1, 0));
        let mut h = EndpointHealth::default();
        h.eject(epoch, epoch, &d);
        h.eject(epoch + secs(5), epoch, &d);
        assert_eq!((h.ejected_until(), h.ejections_total()), (Some(epoch + secs(30)), 1));
        assert!(!h.record(Status(500), &d), "ignored while ejected");
    }

    #[test]
    fn repeated_ejections_last_longer_and_intervals_of_health_shorten_them_again() {
        let (epoch, d) = (Instant::now(), Detection::default());
        let mut h = EndpointHealth::default();
        h.eject(epoch, epoch, &d);
        assert_eq!(h.ejected_until(), Some(epoch + secs(30)));
        assert!(!h.is_ejected(epoch + secs(30)));
        h.eject(epoch + secs(31), epoch, &d);
        assert_eq!(h.ejected_until(), Some(epoch + secs(100)), "31 + 60 s, at the 100 s sweep");
        assert!(!h.is_ejected(epoch + secs(100)));
        h.eject(epoch + secs(109), epoch, &d);
        assert_eq!(h.times_ejected(), 3, "9 s back: less than an interval, no decay");
        assert_eq!(h.ejected_until(), Some(epoch + secs(200)), "109 + 90 s");
        assert!(!h.is_ejected(epoch + secs(201)));
        // Back at the 200 s sweep; 25 s later two sweeps (210, 220) found it healthy: 3 − 2 + 1 = 2.
        h.eject(epoch + secs(225), epoch, &d);
        assert_eq!((h.times_ejected(), h.ejected_until()), (2, Some(epoch + secs(290))));
        assert!(!h.is_ejected(epoch + secs(290)));
        h.eject(epoch + secs(290 + 600), epoch, &d);
        assert_eq!((h.times_ejected(), h.ejections_total()), (1, 5), "long healthy: back to the base time");
        assert_eq!(h.ejected_until(), Some(epoch + secs(920)));
    }

    #[test]
    fn the_ejection_time_stops_at_300_s_and_the_multiplier_soon_after() {
        let (epoch, d) = (Instant::now(), Detection::default());
        let mut h = EndpointHealth::default();
        let mut now = epoch;
        let mut lengths = vec![];
        for _ in 0..13 {
            h.eject(now, epoch, &d);
            let until = h.ejected_until().unwrap();
            lengths.push((until - now).as_secs());
            assert!(!h.is_ejected(until));
            now = until;
        }
        assert_eq!(lengths, [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300, 300, 300]);
        assert_eq!(h.times_ejected(), 11, "Envoy stops at base × n ≥ max + base");
    }

    #[test]
    fn a_base_longer_than_300_s_is_its_own_cap() {
        let epoch = Instant::now();
        let d = Detection { base_ejection: secs(400), interval: Duration::ZERO, ..Detection::default() };
        let mut h = EndpointHealth::default();
        h.eject(epoch, epoch, &d);
        assert!(!h.is_ejected(epoch + secs(400)));
        h.eject(epoch + secs(400), epoch, &d);
        assert_eq!((h.ejected_until(), h.times_ejected()), (Some(epoch + secs(800)), 2));
    }

    #[test]
    fn un_ejection_resets_the_counters() {
        let (epoch, d) = (Instant::now(), detection(5, 2));
        let mut h = EndpointHealth::default();
        let hits = record_all(&mut h, &[Status(500), Status(500), Status(502), Status(502)], &d);
        assert_eq!(hits, [false, false, false, true], "gateway errors eject; the 5xx count is at 4");
        h.eject(epoch, epoch, &d);
        assert!(!h.is_ejected(epoch + secs(30)));
        assert!(!h.record(Status(500), &d), "a 5th 5xx would have ejected without the reset");
    }

    #[test]
    fn max_ejection_percent_with_one_always_allowed() {
        assert!(may_eject(0, 3, 10), "the first, though 1 of 3 is over 10 %");
        assert!(!may_eject(1, 3, 10));
        assert!(may_eject(1, 20, 10) && !may_eject(2, 20, 10), "5 % < 10 %, 10 % is not");
        assert!(may_eject(0, 5, 0));
        assert!(may_eject(4, 5, 100) && !may_eject(5, 5, 100) && !may_eject(5, 5, 250));
        assert!(!may_eject(0, 0, 100), "nothing to eject");
    }

    #[test]
    fn panic_below_min_health_percent() {
        assert!(!in_panic(5, 10, 50), "50 % is not below 50 %");
        assert!(in_panic(4, 10, 50));
        assert!(!in_panic(0, 10, 0), "0 disables it");
        assert!(in_panic(0, 0, 50) && !in_panic(0, 0, 0));
        assert!(in_panic(99, 100, 100) && !in_panic(100, 100, 100));
    }
}
