//! Choosing an endpoint among the usable ones, as Envoy's load balancers do: least request (the power of
//! two choices), round robin, random, slow-start (warm-up) weights, and the two consistent hashes, ring
//! hash (Ketama) and Maglev, with the stable 64-bit hash (xxHash64, Envoy's) they and hash keys use.
//!
//! Randomness is passed in (`random` yields uniform `u64`s), so every choice is reproducible in tests.
//! Candidates carry a `weight`: 1 normally, less while warming up ([`warmup_weight`]). The consistent
//! hashes are built once per endpoint set and take a `usable` predicate at lookup, so ejected or already
//! tried endpoints are skipped without rebuilding — the other keys keep their endpoint.
use std::fmt;

/// An endpoint as the simple balancers see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Requests in flight to it.
    pub active: u32,
    /// 1 normally, below 1 while warming up (a weight that is not a positive number counts as 0).
    pub weight: f64,
}

impl Candidate {
    fn weight(&self) -> f64 {
        if self.weight.is_finite() && self.weight > 0.0 { self.weight } else { 0.0 }
    }
}

/// Least request as Envoy's with equal weights: of two candidates drawn at random (distinct when there are
/// two or more), the one with fewer active requests; a tie keeps the first drawn. A weight below 1 scales
/// a candidate down: the comparison is of `(active + 1) / weight` (Envoy's weighted form, bias 1), so an
/// idle warming endpoint still loses to an idle warm one. Returns the index into `candidates`.
pub fn least_request(candidates: &[Candidate], random: &mut impl FnMut() -> u64) -> Option<usize> {
    let n = candidates.len() as u64;
    match n {
        0 => None,
        1 => Some(0),
        _ => {
            let first = (random() % n) as usize;
            let mut second = (random() % (n - 1)) as usize;
            if second >= first {
                second += 1;
            }
            let load = |i: usize| (f64::from(candidates[i].active) + 1.0) / candidates[i].weight();
            Some(if load(second) < load(first) { second } else { first })
        }
    }
}

/// Round robin from a shared counter value (the caller increments an `AtomicUsize` per pick). A candidate
/// weighted below 1 (warming up) is skipped with probability 1 − weight and the next one tried, at most
/// `n` tries; if all are skipped, the counter's own candidate. Equal weights take no random numbers.
pub fn round_robin(candidates: &[Candidate], counter: usize, random: &mut impl FnMut() -> u64) -> Option<usize> {
    let n = candidates.len();
    if n == 0 {
        return None;
    }
    let start = counter % n;
    for i in (0..n).map(|k| (start + k) % n) {
        let weight = candidates[i].weight();
        if weight >= 1.0 || (weight > 0.0 && unit(random()) < weight) {
            return Some(i);
        }
    }
    Some(start)
}

/// A random candidate, in proportion to the weights (uniform when they are equal; Envoy's random balancer
/// ignores warm-up, which is a no-op here for endpoints already warm).
pub fn random_pick(candidates: &[Candidate], random: &mut impl FnMut() -> u64) -> Option<usize> {
    let n = candidates.len();
    if n == 0 {
        return None;
    }
    let total: f64 = candidates.iter().map(Candidate::weight).sum();
    if !(total.is_finite() && total > 0.0) {
        return Some((random() % n as u64) as usize);
    }
    let mut point = unit(random()) * total;
    for (i, c) in candidates.iter().enumerate() {
        if point < c.weight() {
            return Some(i);
        }
        point -= c.weight();
    }
    candidates.iter().rposition(|c| c.weight() > 0.0)
}

/// A uniform `u64` as a fraction in [0, 1) (its top 53 bits, exact in an `f64`).
pub(super) fn unit(random: u64) -> f64 {
    (random >> 11) as f64 / (1u64 << 53) as f64
}

/// Envoy's slow start with aggression 1.0 and minimum weight 10 %: an endpoint `age` old during `warmup`
/// gets `max(0.1, age / warmup)`, 1.0 once warm (and always with no warm-up).
pub fn warmup_weight(age: std::time::Duration, warmup: std::time::Duration) -> f64 {
    if warmup.is_zero() || age >= warmup {
        return 1.0;
    }
    (age.as_secs_f64() / warmup.as_secs_f64()).max(0.1)
}

/// xxHash64 of `bytes` with seed 0: stable across runs, processes and machines (and Envoy's hash for
/// ring entries, Maglev permutations and hash policies).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    xxhash64(bytes, 0)
}

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

/// xxHash64 (Yann Collet's reference algorithm).
pub fn xxhash64(bytes: &[u8], seed: u64) -> u64 {
    let mut rest = bytes;
    let mut hash = if bytes.len() >= 32 {
        let mut lanes = [seed.wrapping_add(P1).wrapping_add(P2), seed.wrapping_add(P2), seed, seed.wrapping_sub(P1)];
        while rest.len() >= 32 {
            for (i, lane) in lanes.iter_mut().enumerate() {
                *lane = xx_round(*lane, read_u64(&rest[i * 8..]));
            }
            rest = &rest[32..];
        }
        let [a, b, c, d] = lanes;
        let hash = a.rotate_left(1).wrapping_add(b.rotate_left(7)).wrapping_add(c.rotate_left(12));
        lanes.iter().fold(hash.wrapping_add(d.rotate_left(18)), |h, lane| xx_merge(h, *lane))
    } else {
        seed.wrapping_add(P5)
    };
    hash = hash.wrapping_add(bytes.len() as u64);
    while rest.len() >= 8 {
        hash ^= xx_round(0, read_u64(rest));
        hash = hash.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
        rest = &rest[8..];
    }
    if rest.len() >= 4 {
        hash ^= u64::from(u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]])).wrapping_mul(P1);
        hash = hash.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
        rest = &rest[4..];
    }
    for byte in rest {
        hash ^= u64::from(*byte).wrapping_mul(P5);
        hash = hash.rotate_left(11).wrapping_mul(P1);
    }
    avalanche(hash)
}

fn xx_round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2)).rotate_left(31).wrapping_mul(P1)
}

fn xx_merge(hash: u64, lane: u64) -> u64 {
    (hash ^ xx_round(0, lane)).wrapping_mul(P1).wrapping_add(P4)
}

fn avalanche(mut hash: u64) -> u64 {
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(P2);
    hash ^= hash >> 29;
    hash = hash.wrapping_mul(P3);
    hash ^ (hash >> 32)
}

fn read_u64(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"))
}

/// The first host of `sequence` that is `usable`, remembering refusals so each host is asked once; `None`
/// as soon as all `hosts` refused (or the sequence ends).
fn first_usable(sequence: impl Iterator<Item = usize>, hosts: usize, usable: impl Fn(usize) -> bool) -> Option<usize> {
    let mut refused: Vec<bool> = Vec::new();
    let mut count = 0;
    for host in sequence {
        if refused.get(host).copied().unwrap_or(false) {
            continue;
        }
        if usable(host) {
            return Some(host);
        }
        if refused.is_empty() {
            refused = vec![false; hosts];
        }
        refused[host] = true;
        count += 1;
        if count >= hosts {
            return None;
        }
    }
    None
}

/// Envoy's cap on a ring's size.
pub const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;

/// Ketama-style ring, as Envoy builds it with equal weights: each host gets `ceil(minimum_ring_size / n)`
/// entries (so the total is at least the minimum, and at most [`MAX_RING_SIZE`]), entry `i` of a host at
/// `xxHash64(host hash ‖ i)`. A key goes to the first entry clockwise from its hash whose host is usable.
#[derive(Clone)]
pub struct RingHash {
    /// (entry hash, host index), sorted.
    ring: Vec<(u64, u32)>,
    hosts: usize,
}

impl RingHash {
    /// `hosts`: each host's [`stable_hash`] of its address, in the caller's index order.
    pub fn new(hosts: &[u64], minimum_ring_size: u64) -> RingHash {
        let n = hosts.len() as u64;
        if n == 0 {
            return RingHash { ring: Vec::new(), hosts: 0 };
        }
        let per_host = entries_per_host(n, minimum_ring_size);
        let mut ring = Vec::with_capacity((per_host * n) as usize);
        for (index, host) in hosts.iter().enumerate() {
            ring.extend((0..per_host).map(|i| (ring_entry(*host, i), index as u32)));
        }
        ring.sort_unstable();
        RingHash { ring, hosts: hosts.len() }
    }

    pub fn len(&self) -> usize {
        self.ring.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    /// The host of `key` (a [`stable_hash`]): the first entry at or after it, wrapping, whose host is
    /// `usable`; `None` when no host is.
    pub fn pick(&self, key: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let start = self.ring.partition_point(|(hash, _)| *hash < key);
        let clockwise = self.ring[start..].iter().chain(&self.ring[..start]).map(|(_, host)| *host as usize);
        first_usable(clockwise, self.hosts, usable)
    }
}

/// Envoy's `ceil(min_normalized_weight × minimum_ring_size)` with equal weights, within the 8M cap (and at
/// least one).
fn entries_per_host(hosts: u64, minimum_ring_size: u64) -> u64 {
    minimum_ring_size.clamp(1, MAX_RING_SIZE).div_ceil(hosts).min((MAX_RING_SIZE / hosts).max(1))
}

fn ring_entry(host: u64, i: u64) -> u64 {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&host.to_le_bytes());
    key[8..].copy_from_slice(&i.to_le_bytes());
    stable_hash(&key)
}

impl fmt::Debug for RingHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingHash").field("entries", &self.ring.len()).field("hosts", &self.hosts).finish()
    }
}

/// Envoy's default Maglev table size, and its largest.
pub const DEFAULT_MAGLEV_TABLE_SIZE: u64 = 65_537;
pub const MAX_MAGLEV_TABLE_SIZE: u64 = 5_000_011;

/// Alternate lookups before the scan, as many as Istio lets Envoy retry a host selection.
const MAGLEV_ALTERNATES: u64 = 5;

const EMPTY: u32 = u32::MAX;

/// Maglev (Eisenbud et al., as Envoy builds it with equal weights): each host has a permutation of the table
/// (`offset` = xxHash64(host, seed 0) mod M, `skip` = xxHash64(host, seed 1) mod (M − 1) + 1); hosts take
/// turns claiming their next free slot until the table is full. A key goes to `table[key mod M]`. When that
/// host is not usable, the fallback is deterministic: the slots of `xxHash64(key, seed a)` for a = 1..=5,
/// then the table scanned forward from the key's slot. The rehashes spread a lost host's keys over the
/// others in proportion to their slots, as rebuilding the table without it would (Envoy's retry rehash,
/// `key XOR (2^64 − a)`, mirrors the slot and skews the spread). `M` must be prime for the permutations to
/// cover the table: another size is rounded up to the next prime (0 means Envoy's default, 65537; at most
/// 5000011).
#[derive(Clone)]
pub struct Maglev {
    table: Vec<u32>,
    /// Hosts holding a slot (all of them unless the table is smaller than the host list).
    present: usize,
}

impl Maglev {
    /// `hosts`: each host's [`stable_hash`] of its address, in the caller's index order.
    pub fn new(hosts: &[u64], table_size: u64) -> Maglev {
        let size = maglev_size(table_size);
        if hosts.is_empty() {
            return Maglev { table: Vec::new(), present: 0 };
        }
        let permutations: Vec<(u64, u64)> = hosts.iter().map(|h| permutation(*h, size)).collect();
        let mut next = vec![0u64; hosts.len()];
        let mut table = vec![EMPTY; size as usize];
        let mut filled = 0;
        while filled < table.len() {
            for (host, (offset, skip)) in permutations.iter().enumerate() {
                let mut slot = ((offset + skip * next[host]) % size) as usize;
                while table[slot] != EMPTY {
                    next[host] += 1;
                    slot = ((offset + skip * next[host]) % size) as usize;
                }
                table[slot] = host as u32;
                next[host] += 1;
                filled += 1;
                if filled == table.len() {
                    break;
                }
            }
        }
        Maglev { table, present: hosts.len().min(size as usize) }
    }

    pub fn table_size(&self) -> usize {
        self.table.len()
    }

    /// The host of `key` (a [`stable_hash`]), or the deterministic fallback (see the type's doc) when it is
    /// not `usable`; `None` when no host is.
    pub fn pick(&self, key: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let size = self.table.len() as u64;
        if size == 0 {
            return None;
        }
        let host = |hash: u64| self.table[(hash % size) as usize] as usize;
        let rehash = |attempt: u64| if attempt == 0 { key } else { xxhash64(&key.to_le_bytes(), attempt) };
        let alternates = (0..=MAGLEV_ALTERNATES).map(|attempt| host(rehash(attempt)));
        let start = key % size;
        let scan = (1..size).map(|i| host(start + i));
        first_usable(alternates.chain(scan), self.present, usable)
    }
}

impl fmt::Debug for Maglev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Maglev").field("table_size", &self.table.len()).field("hosts", &self.present).finish()
    }
}

/// (offset, skip) of a host's permutation of a table of `size` slots.
fn permutation(host: u64, size: u64) -> (u64, u64) {
    let bytes = host.to_le_bytes();
    (xxhash64(&bytes, 0) % size, xxhash64(&bytes, 1) % (size - 1) + 1)
}

fn maglev_size(requested: u64) -> u64 {
    let size = if requested == 0 { DEFAULT_MAGLEV_TABLE_SIZE } else { requested.clamp(2, MAX_MAGLEV_TABLE_SIZE) };
    (size..).find(|n| is_prime(*n)).expect("a prime at most 5000011")
}

fn is_prime(n: u64) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// splitmix64: a deterministic stream of uniform u64s.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut state = seed;
        move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    fn idle(n: usize) -> Vec<Candidate> {
        vec![Candidate { active: 0, weight: 1.0 }; n]
    }

    fn counts(n: usize, picks: impl Iterator<Item = Option<usize>>) -> Vec<usize> {
        let mut counts = vec![0; n];
        for pick in picks {
            counts[pick.expect("a pick")] += 1;
        }
        counts
    }

    fn hosts(n: usize) -> Vec<u64> {
        (0..n).map(|i| stable_hash(format!("10.0.0.{}:8080", i + 1).as_bytes())).collect()
    }

    fn keys(n: usize) -> Vec<u64> {
        (0..n).map(|i| stable_hash(format!("user-{i}").as_bytes())).collect()
    }

    fn within_30_percent(counts: &[usize], total: usize) -> bool {
        let fair = total as f64 / counts.len() as f64;
        counts.iter().all(|c| (*c as f64 - fair).abs() <= 0.3 * fair)
    }

    #[test]
    fn xxhash64_matches_the_reference_vectors() {
        assert_eq!(stable_hash(b""), 0xef46_db37_51d8_e999);
        assert_eq!(stable_hash(b"a"), 0xd24e_c4f1_a98c_6e5b);
        assert_eq!(stable_hash(b"abc"), 0x44bc_2cf5_ad77_0999);
        assert_eq!(stable_hash(b"10.0.0.1:8080"), 0xcb97_2177_068e_b685);
        assert_eq!(stable_hash(b"Nobody inspects the spammish repetition"), 0xfbce_a83c_8a37_8bf1);
        assert_eq!(stable_hash(b"0123456789abcdef0123456789abcdef0123456789"), 0xa761_90c3_acf0_8a1c);
        assert_eq!(xxhash64(b"abc", 1), 0xbea9_ca81_9932_8908);
        assert_eq!(xxhash64(b"0123456789abcdef0123456789abcdef0123456789", 1), 0x2b8d_7720_869b_31a6);
    }

    #[test]
    fn least_request_avoids_the_busy_candidate_that_round_robin_keeps_feeding() {
        let mut candidates = idle(4);
        candidates[0].active = 10;
        let mut random = rng(1);
        let p2c = counts(4, (0..4_000).map(|_| least_request(&candidates, &mut random)));
        let rr = counts(4, (0..4_000).map(|c| round_robin(&candidates, c, &mut random)));
        assert_eq!(rr, [1_000; 4]);
        assert_eq!(p2c[0], 0, "two distinct draws: the busy one always meets an idle one");
        assert!(within_30_percent(&p2c[1..], 4_000), "{p2c:?}");
        candidates[1].active = 2;
        let p2c = counts(4, (0..4_000).map(|_| least_request(&candidates, &mut random)));
        assert!(p2c[0] < p2c[1] && p2c[1] < p2c[2] && p2c[1] < p2c[3], "fewer the busier: {p2c:?}");
    }

    #[test]
    fn least_request_ties_keep_the_first_draw_and_small_sets_need_no_draw() {
        let mut draws = [7u64, 0].into_iter();
        assert_eq!(least_request(&idle(3), &mut || draws.next().unwrap()), Some(1), "7 % 3 = 1 first, tie");
        let mut none = || unreachable!("no random number needed");
        assert_eq!((least_request(&[], &mut none), least_request(&idle(1), &mut none)), (None, Some(0)));
    }

    #[test]
    fn least_request_scales_a_warming_candidate_down() {
        let mut candidates = idle(2);
        candidates[1].weight = 0.25;
        let mut random = rng(2);
        let picks = counts(2, (0..100).map(|_| least_request(&candidates, &mut random)));
        assert_eq!(picks, [100, 0], "idle and warm beats idle and warming");
        candidates[0].active = 4;
        let picks = counts(2, (0..100).map(|_| least_request(&candidates, &mut random)));
        assert_eq!(picks, [0, 100], "(4 + 1) / 1 = 5 against (0 + 1) / 0.25 = 4");
    }

    #[test]
    fn round_robin_is_exactly_even_and_survives_counter_wraparound() {
        let mut none = || unreachable!("equal weights need no random number");
        let rr = counts(3, (0..3_000).map(|c| round_robin(&idle(3), c, &mut none)));
        assert_eq!(rr, [1_000; 3]);
        assert_eq!(round_robin(&idle(3), usize::MAX, &mut none), Some(usize::MAX % 3));
        assert_eq!(round_robin(&[], 5, &mut none), None);
    }

    #[test]
    fn round_robin_skips_warming_candidates_in_proportion() {
        let mut candidates = idle(2);
        candidates[1].weight = 0.2;
        let mut random = rng(3);
        let picks = counts(2, (0..10_000).map(|c| round_robin(&candidates, c, &mut random)));
        // Candidate 1's own turns go to it 20 % of the time: about 1000 of 10000.
        assert!((800..1_200).contains(&picks[1]), "{picks:?}");
        candidates[0].weight = 0.0;
        candidates[1].weight = 0.0;
        assert_eq!(round_robin(&candidates, 7, &mut random), Some(1), "all skipped: the counter's own");
    }

    #[test]
    fn random_pick_is_uniform_and_follows_weights() {
        let mut random = rng(4);
        let picks = counts(4, (0..8_000).map(|_| random_pick(&idle(4), &mut random)));
        assert!(within_30_percent(&picks, 8_000), "{picks:?}");
        let weighted = [Candidate { active: 0, weight: 1.0 }, Candidate { active: 0, weight: 0.25 }];
        let picks = counts(2, (0..10_000).map(|_| random_pick(&weighted, &mut random)));
        assert!((1_800..2_200).contains(&picks[1]), "0.25 of 1.25 is 20 %: {picks:?}");
        let dead = [Candidate { active: 0, weight: 0.0 }, Candidate { active: 0, weight: 1.0 }];
        assert!((0..100).all(|_| random_pick(&dead, &mut random) == Some(1)));
        assert_eq!(random_pick(&[], &mut random), None);
    }

    #[test]
    fn warmup_ramps_linearly_from_ten_percent() {
        let s = Duration::from_secs;
        assert_eq!(warmup_weight(s(0), s(10)), 0.1);
        assert_eq!(warmup_weight(Duration::from_millis(500), s(10)), 0.1, "5 % is below the floor");
        assert_eq!(warmup_weight(s(5), s(10)), 0.5);
        assert_eq!(warmup_weight(Duration::from_millis(7_500), s(10)), 0.75);
        assert_eq!((warmup_weight(s(10), s(10)), warmup_weight(s(99), s(10))), (1.0, 1.0));
        assert_eq!(warmup_weight(s(0), Duration::ZERO), 1.0, "no warm-up");
    }

    #[test]
    fn ring_hash_sizes_as_envoy() {
        assert_eq!(RingHash::new(&hosts(3), 1024).len(), 3 * 342);
        assert_eq!(RingHash::new(&hosts(2000), 1024).len(), 2000, "at least one entry per host");
        assert_eq!(entries_per_host(3, u64::MAX), MAX_RING_SIZE / 3, "capped at 8M in all");
        assert_eq!((entries_per_host(3, 0), entries_per_host(10_000_000, 1024)), (1, 1));
        assert!(RingHash::new(&[], 1024).pick(1, |_| true).is_none());
    }

    #[test]
    fn ring_hash_is_stable_and_spreads_keys_evenly() {
        let ring = RingHash::new(&hosts(5), 1024);
        let picks: Vec<usize> = keys(10_000).iter().map(|k| ring.pick(*k, |_| true).unwrap()).collect();
        let again = RingHash::new(&hosts(5), 1024);
        assert!(keys(10_000).iter().zip(&picks).all(|(k, p)| again.pick(*k, |_| true) == Some(*p)));
        assert!(within_30_percent(&counts(5, picks.iter().map(|p| Some(*p))), 10_000));
    }

    #[test]
    fn ring_hash_skips_an_unusable_host_and_moves_only_its_keys() {
        let ring = RingHash::new(&hosts(4), 1024);
        let mut moved_to = [0; 4];
        for key in keys(4_000) {
            let before = ring.pick(key, |_| true).unwrap();
            let after = ring.pick(key, |h| h != 2).unwrap();
            assert!(after != 2);
            if before == 2 {
                moved_to[after] += 1;
            } else {
                assert_eq!(before, after, "a key of another host stays");
            }
        }
        assert!(moved_to.iter().enumerate().all(|(h, n)| h == 2 || *n > 150), "spread clockwise: {moved_to:?}");
        assert_eq!(ring.pick(42, |_| false), None);
    }

    #[test]
    fn ring_hash_rebuilt_without_a_host_moves_about_a_fifth_of_the_keys() {
        let all = hosts(5);
        let (before, after) = (RingHash::new(&all, 1024), RingHash::new(&all[..4], 1024));
        let keys = keys(10_000);
        let moved = keys.iter().filter(|k| before.pick(**k, |_| true) != after.pick(**k, |_| true)).count();
        // The lost host's fifth, plus some from the survivors' extra entries (205 → 256 each).
        assert!((2_000..3_500).contains(&moved), "{moved}");
    }

    #[test]
    fn maglev_rounds_its_size_to_a_prime_and_fills_the_table_evenly() {
        assert_eq!((maglev_size(0), maglev_size(65_537), maglev_size(u64::MAX)), (65_537, 65_537, 5_000_011));
        assert_eq!(Maglev::new(&hosts(3), 1024).table_size(), 1031);
        let maglev = Maglev::new(&hosts(3), 65_537);
        let slots = counts(3, maglev.table.iter().map(|h| Some(*h as usize)));
        assert!(slots.iter().all(|s| s.abs_diff(65_537 / 3) <= 1), "{slots:?}");
        assert!(Maglev::new(&[], 7).pick(1, |_| true).is_none());
    }

    #[test]
    fn maglev_is_stable_and_spreads_keys_evenly() {
        let maglev = Maglev::new(&hosts(4), 65_537);
        let picks: Vec<usize> = keys(10_000).iter().map(|k| maglev.pick(*k, |_| true).unwrap()).collect();
        let again = Maglev::new(&hosts(4), 65_537);
        assert!(keys(10_000).iter().zip(&picks).all(|(k, p)| again.pick(*k, |_| true) == Some(*p)));
        assert!(within_30_percent(&counts(4, picks.iter().map(|p| Some(*p))), 10_000));
    }

    #[test]
    fn maglev_rebuilt_without_a_host_keeps_most_other_keys_in_place() {
        let all = hosts(5);
        let (before, after) = (Maglev::new(&all, 65_537), Maglev::new(&all[..4], 65_537));
        let keys = keys(10_000);
        let survivors: Vec<&u64> = keys.iter().filter(|k| before.pick(**k, |_| true) != Some(4)).collect();
        let stayed = survivors.iter().filter(|k| before.pick(***k, |_| true) == after.pick(***k, |_| true)).count();
        assert!(stayed * 100 >= survivors.len() * 98, "{stayed} of {}", survivors.len());
    }

    #[test]
    fn maglev_skips_an_unusable_host_spreading_its_keys_and_moving_no_other() {
        let maglev = Maglev::new(&hosts(4), 65_537);
        let mut moved_to = [0; 4];
        for key in keys(4_000) {
            let before = maglev.pick(key, |_| true).unwrap();
            let after = maglev.pick(key, |h| h != 1).unwrap();
            if before == 1 {
                moved_to[after] += 1;
            } else {
                assert_eq!(before, after);
            }
        }
        assert_eq!(moved_to[1], 0);
        assert!(moved_to.iter().enumerate().all(|(h, n)| h == 1 || *n > 250), "evenly: {moved_to:?}");
        assert_eq!(maglev.pick(7, |h| h == 3), Some(3), "found by the scan if not by the alternates");
        assert_eq!(maglev.pick(7, |_| false), None);
    }

    #[test]
    fn maglev_smaller_than_the_host_list_still_answers() {
        let maglev = Maglev::new(&hosts(10), 3);
        assert_eq!(maglev.table_size(), 3);
        let found: std::collections::BTreeSet<_> = (0..3).filter_map(|slot| maglev.pick(slot, |_| true)).collect();
        assert_eq!(found, [0, 1, 2].into(), "the first three hosts took one slot each");
        assert_eq!(maglev.pick(0, |h| h >= 3), None, "hosts without a slot cannot be found");
    }
}
