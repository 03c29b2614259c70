//! The wait before a retry: Envoy's fully jittered exponential back-off as its docs define it. Retry `n`
//! (1 = the first retry) waits a uniformly random time in `[0, (2^n − 1) × base)`, the range capped at
//! `max` (default 10 × base): with Envoy's 25 ms base, 0–25 ms, then 0–75 ms, 0–175 ms, … up to 0–250 ms.
//! Full jitter keeps retries from many clients from arriving in lockstep; the cap bounds the added latency.
//!
//! Deviation, noted: the range is capped (so the wait stays uniform in `[0, max)` once the range reaches
//! `max`) where Envoy's older code clamped the drawn value (a pile-up at `max`); current Envoy caps the
//! range too. The random value is passed in, so a delay is a pure function of (retry, random).
use std::time::Duration;

/// Envoy's retry back-off (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
}

impl Backoff {
    /// `base` with Envoy's default cap, 10 × base.
    pub const fn new(base: Duration) -> Backoff {
        Backoff { base, max: base.saturating_mul(10) }
    }

    pub fn with_max(base: Duration, max: Duration) -> Backoff {
        Backoff { base, max }
    }

    pub fn base(&self) -> Duration {
        self.base
    }

    pub fn max(&self) -> Duration {
        self.max
    }

    /// The upper (exclusive) bound of retry `retry`'s wait: (2^retry − 1) × base, at most `max`.
    pub fn range(&self, retry: u32) -> Duration {
        let multiplier = (1u128 << retry.min(64)) - 1;
        let upper = multiplier.saturating_mul(self.base.as_nanos());
        from_nanos(upper.min(self.max.as_nanos()))
    }

    /// The wait before retry `retry` (1 = first; 0 waits nothing): `random` reduced into the range, so the
    /// same `random` always gives the same wait, and a uniform `random` a uniform wait.
    pub fn delay(&self, retry: u32, random: u64) -> Duration {
        let upper = self.range(retry).as_nanos();
        if upper == 0 {
            return Duration::ZERO;
        }
        from_nanos(u128::from(random) % upper)
    }
}

fn from_nanos(nanos: u128) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
    Duration::new(secs, (nanos % NANOS_PER_SEC) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_range_grows_as_two_to_the_n_minus_one_then_stops_at_ten_times_base() {
        let b = Backoff::new(25 * MS);
        let ranges: Vec<Duration> = (0..7).map(|n| b.range(n)).collect();
        assert_eq!(ranges, [Duration::ZERO, 25 * MS, 75 * MS, 175 * MS, 250 * MS, 250 * MS, 250 * MS]);
        assert_eq!(b.range(u32::MAX), 250 * MS, "huge retry numbers do not overflow");
    }

    #[test]
    fn a_delay_is_the_random_value_reduced_into_the_range() {
        let b = Backoff::new(25 * MS);
        assert_eq!(b.delay(1, 0), Duration::ZERO);
        assert_eq!(b.delay(1, 7_000_000), 7 * MS);
        assert_eq!(b.delay(1, 25_000_000), Duration::ZERO, "the range's end is excluded");
        assert_eq!(b.delay(2, 74_999_999), 75 * MS - Duration::from_nanos(1));
        assert_eq!(b.delay(3, 100_000_000 + 175_000_000), 100 * MS, "wraps modulo the range");
        assert_eq!(b.delay(0, 12345), Duration::ZERO);
    }

    #[test]
    fn the_same_random_value_gives_the_same_delay_and_every_delay_stays_under_the_cap() {
        let b = Backoff::with_max(Duration::from_secs(1), Duration::from_millis(2500));
        let mut x = 0x1234_5678_9abc_def0u64;
        for retry in 1..40 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let d = b.delay(retry, x);
            assert_eq!(d, b.delay(retry, x));
            assert!(d < b.range(retry) && b.range(retry) <= Duration::from_millis(2500), "retry {retry}: {d:?}");
        }
        assert_eq!(b.range(2), Duration::from_millis(2500), "3 s capped at 2.5 s");
    }

    #[test]
    fn delays_spread_over_the_whole_range() {
        // A uniform random value gives waits over all of [0, range): each tenth of it gets some.
        let b = Backoff::new(25 * MS);
        let mut buckets = [0u32; 10];
        let mut x = 1u64;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let d = b.delay(3, x);
            buckets[(d.as_nanos() * 10 / b.range(3).as_nanos()) as usize] += 1;
        }
        assert!(buckets.iter().all(|&n| (800..1200).contains(&n)), "{buckets:?}");
    }

    #[test]
    fn a_zero_base_never_waits() {
        let b = Backoff::new(Duration::ZERO);
        assert_eq!((b.max(), b.delay(3, u64::MAX)), (Duration::ZERO, Duration::ZERO));
    }
}
