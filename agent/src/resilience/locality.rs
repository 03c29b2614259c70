//! Locality-aware load balancing as Istio configures Envoy (`localityLbSetting`):
//! - [`priorities`]: each endpoint's priority level relative to the client — Istio's `failover` (by
//!   region/zone/subzone) or `failoverPriority` (by labels), compacted to 0..N as Istio sends them;
//! - [`priority_load`]: Envoy's share of traffic per level, spilling to the next level as a level loses
//!   healthy endpoints (overprovisioning factor 1.4), and [`pick_level`] to draw one;
//! - [`distribute_weights`]: `distribute`, explicit weights from the client's locality to others.
//!
//! Istio applies failover only where outlier detection is configured (the caller's check), and `distribute`
//! and failover never together: with `distribute` set every endpoint is priority 0.
use std::cmp::Reverse;
use std::collections::BTreeMap;

use warren_api::resilience::{Locality, LocalityFailover, LocalityLb};

use super::balance::unit;
use super::outlier;

const REGION_LABEL: &str = "topology.kubernetes.io/region";
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
const SUBZONE_LABEL: &str = "topology.istio.io/subzone";

/// Envoy's default overprovisioning factor, in percent.
pub const OVERPROVISIONING_PERCENT: u64 = 140;

/// Each endpoint's priority relative to the client, as Istio assigns them.
///
/// Without `failoverPriority`: 0 same region/zone/subzone, 1 same region and zone, 2 same region, 3 other
/// regions — or, when a `failover` rule's `from` is the client's region, 3 its `to` region and 4 the rest.
/// An endpoint without a locality is in another region; a client without one puts everything at 0.
///
/// With `failoverPriority` (labels in order; `label=value` compares with `value` instead of the client's):
/// `n − j` where `j` is the first label whose value differs between client and endpoint (0 when all match;
/// a label missing on both sides matches). `topology.kubernetes.io/region`, `…/zone` and
/// `topology.istio.io/subzone` take the locality's part when it has one (Istio adds those labels from the
/// locality). A client with neither labels nor locality gets no label priorities. With `failover` too, the
/// locality priority above refines each label level (`label × 5 + locality`, as Istio).
///
/// Finally the priorities are compacted, as Istio does: the levels present become 0, 1, 2, … in order, so
/// no level is empty (this changes no traffic: an empty level gets no load anyway).
pub fn priorities(
    client: Option<&Locality>,
    client_labels: &BTreeMap<String, String>,
    endpoints: &[(Option<&Locality>, &BTreeMap<String, String>)],
    setting: &LocalityLb,
) -> Vec<u32> {
    if setting.enabled == Some(false) || !setting.distribute.is_empty() {
        return vec![0; endpoints.len()];
    }
    let by_locality = |client: &Locality| -> Vec<u32> {
        endpoints.iter().map(|(l, _)| locality_priority(client, *l, &setting.failover)).collect()
    };
    let raw = match (setting.failover_priority.is_empty(), client) {
        (true, None) => return vec![0; endpoints.len()],
        (true, Some(client)) => by_locality(client),
        (false, _) => {
            let labelled = label_priorities(client, client_labels, endpoints, &setting.failover_priority);
            match client {
                Some(client) if !setting.failover.is_empty() => {
                    labelled.iter().zip(by_locality(client)).map(|(label, locality)| label * 5 + locality).collect()
                }
                _ => labelled,
            }
        }
    };
    compact(&raw)
}

/// Istio's `LbPriority` with the `failover` rule for the client's region.
fn locality_priority(client: &Locality, endpoint: Option<&Locality>, failover: &[LocalityFailover]) -> u32 {
    match endpoint {
        Some(e) if e.region == client.region => {
            if e.zone != client.zone {
                2
            } else if e.subzone != client.subzone {
                1
            } else {
                0
            }
        }
        _ => match failover.iter().find(|rule| rule.from == client.region) {
            Some(rule) if endpoint.is_some_and(|e| e.region == rule.to) => 3,
            Some(_) => 4,
            None => 3,
        },
    }
}

/// Istio's `failoverPriority` match (see [`priorities`]).
fn label_priorities(
    client: Option<&Locality>,
    client_labels: &BTreeMap<String, String>,
    endpoints: &[(Option<&Locality>, &BTreeMap<String, String>)],
    failover_priority: &[String],
) -> Vec<u32> {
    if client.is_none() && client_labels.is_empty() {
        return vec![0; endpoints.len()];
    }
    let rules: Vec<(&str, Option<&str>)> = failover_priority.iter().map(|entry| label_override(entry)).collect();
    let priority = |(locality, labels): &(Option<&Locality>, &BTreeMap<String, String>)| {
        let differs = |(key, wanted): &(&str, Option<&str>)| {
            wanted.unwrap_or_else(|| label_value(client, client_labels, key)) != label_value(*locality, labels, key)
        };
        rules.iter().position(differs).map_or(0, |j| (rules.len() - j) as u32)
    };
    endpoints.iter().map(priority).collect()
}

/// `label=value` → (label, Some(value)); anything else (Istio splits on every `=`) is a plain label.
fn label_override(entry: &str) -> (&str, Option<&str>) {
    match entry.split_once('=') {
        Some((key, value)) if !value.contains('=') => (key, Some(value)),
        _ => (entry.split('=').next().unwrap_or(entry), None),
    }
}

/// A label's value ("" when missing, as Go's maps answer), the topology ones from the locality when set.
fn label_value<'a>(locality: Option<&'a Locality>, labels: &'a BTreeMap<String, String>, key: &str) -> &'a str {
    let part = locality.map_or("", |l| match key {
        REGION_LABEL => l.region.as_str(),
        ZONE_LABEL => l.zone.as_str(),
        SUBZONE_LABEL => l.subzone.as_str(),
        _ => "",
    });
    if part.is_empty() { labels.get(key).map_or("", String::as_str) } else { part }
}

/// The levels present, renumbered 0, 1, 2, … in order.
fn compact(raw: &[u32]) -> Vec<u32> {
    let mut levels = raw.to_vec();
    levels.sort_unstable();
    levels.dedup();
    raw.iter().map(|p| levels.partition_point(|l| l < p) as u32).collect()
}

/// Envoy's priority load with panic mode off (Istio's default `minHealthPercent: 0`): given (healthy, total)
/// endpoints per level in priority order, the percentage of traffic each level gets. A level's
/// availability is `min(100, 140 × healthy / total)`; levels take it in order (scaled up when all together
/// have less than 100) until 100 is given out; integer percentages, as Envoy, with the rounding left-over
/// to the first available level. Sums to 100 when any endpoint is healthy; all to level 0 when none is.
pub fn priority_load(levels: &[(usize, usize)]) -> Vec<f64> {
    priority_load_with_panic(levels, 0)
}

/// [`priority_load`] with Envoy's healthy panic threshold (`minHealthPercent`): when the levels together are
/// less than fully available and every level is in panic, traffic goes by endpoint count instead.
pub fn priority_load_with_panic(levels: &[(usize, usize)], panic_percent: u32) -> Vec<f64> {
    if levels.is_empty() {
        return Vec::new();
    }
    let availability: Vec<u64> = levels.iter().map(|&(healthy, total)| available(healthy, total)).collect();
    let normalized = availability.iter().sum::<u64>().min(100);
    let panics = |&(healthy, total): &(usize, usize)| outlier::in_panic(healthy, total, panic_percent);
    if normalized < 100 && panic_percent > 0 && levels.iter().all(panics) {
        let totals: Vec<u64> = levels.iter().map(|&(_, total)| total as u64).collect();
        return shares(&totals, totals.iter().sum());
    }
    shares(&availability, normalized)
}

fn available(healthy: usize, total: usize) -> u64 {
    if total == 0 { 0 } else { (OVERPROVISIONING_PERCENT * healthy as u64 / total as u64).min(100) }
}

/// Envoy's `distributeLoad`: each level `min(left, value × 100 / of)`, in order; what is left (rounding, or
/// all of it when every value is 0) goes to the first level with a value, else to level 0.
fn shares(values: &[u64], of: u64) -> Vec<f64> {
    let mut loads = vec![0u64; values.len()];
    let mut left = 100u64;
    for (load, value) in loads.iter_mut().zip(values) {
        *load = (value * 100).checked_div(of).unwrap_or(0).min(left);
        left -= *load;
    }
    loads[values.iter().position(|v| *v > 0).unwrap_or(0)] += left;
    loads.into_iter().map(|l| l as f64).collect()
}

/// A level drawn from the loads: `random` (uniform over u64) maps to a point in [0, 100) — in [0, sum) if
/// the loads do not sum to 100 — and the level whose share covers it wins. 0 when no level has load.
pub fn pick_level(loads: &[f64], random: u64) -> usize {
    let positive = |load: &&f64| **load > 0.0;
    let total: f64 = loads.iter().filter(positive).sum();
    if !(total.is_finite() && total > 0.0) {
        return 0;
    }
    let mut point = unit(random) * total;
    for (level, load) in loads.iter().enumerate().filter(|(_, load)| positive(load)) {
        if point < *load {
            return level;
        }
        point -= load;
    }
    loads.iter().rposition(|load| positive(&load)).unwrap_or(0)
}

/// `distribute`: the first rule whose `from` matches the client's locality gives each endpoint a weight —
/// each `to` entry's weight split evenly over the endpoints it matches, an endpoint taken by the first
/// entry that matches it (most specific first: Istio walks the map in Go's random order, so only this
/// order gives `{"r/z1/*": 80, "r/*": 20}` its evident meaning), 0 for endpoints no entry matches (Istio
/// drops them). `*` matches any part, and a missing zone or subzone in a pattern matches any. `None`
/// when no rule applies (or locality load balancing is disabled).
pub fn distribute_weights(
    client: Option<&Locality>,
    endpoints: &[Option<&Locality>],
    setting: &LocalityLb,
) -> Option<Vec<f64>> {
    if setting.enabled == Some(false) {
        return None;
    }
    let rule = setting.distribute.iter().find(|rule| locality_matches(client, &rule.from))?;
    let mut targets: Vec<(&str, u32)> = rule.to.iter().map(|(pattern, weight)| (pattern.as_str(), *weight)).collect();
    targets.sort_by_key(|(pattern, _)| Reverse(specificity(pattern)));
    let mut weights = vec![0.0; endpoints.len()];
    let mut taken = vec![false; endpoints.len()];
    for (pattern, weight) in targets {
        let matched: Vec<usize> =
            (0..endpoints.len()).filter(|i| !taken[*i] && locality_matches(endpoints[*i], pattern)).collect();
        for &i in &matched {
            taken[i] = true;
            weights[i] = f64::from(weight) / matched.len() as f64;
        }
    }
    Some(weights)
}

/// Istio's `LocalityMatch` against `region/zone/subzone` (a locality-less side is all empty parts).
fn locality_matches(locality: Option<&Locality>, pattern: &str) -> bool {
    let empty = Locality::default();
    let l = locality.unwrap_or(&empty);
    let mut parts = pattern.split('/');
    let (region, zone, subzone) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let part = |rule: &str, value: &str| rule == "*" || rule.is_empty() || rule == value;
    (region == "*" || region == l.region) && part(zone, &l.zone) && part(subzone, &l.subzone)
}

/// How many parts of a pattern name a value (not `*`, not left out).
fn specificity(pattern: &str) -> usize {
    pattern.split('/').take(3).filter(|part| !part.is_empty() && *part != "*").count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_api::resilience::LocalityDistribute;

    fn loc(text: &str) -> Locality {
        Locality::parse(text).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn failover(from: &str, to: &str) -> LocalityFailover {
        LocalityFailover { from: from.into(), to: to.into() }
    }

    /// Priorities for endpoints given by locality (None: no locality) and no labels.
    fn by_locality(client: Option<&str>, endpoints: &[Option<&str>], setting: &LocalityLb) -> Vec<u32> {
        let client = client.map(loc);
        let localities: Vec<Option<Locality>> = endpoints.iter().map(|e| e.map(loc)).collect();
        let none = BTreeMap::new();
        let endpoints: Vec<_> = localities.iter().map(|l| (l.as_ref(), &none)).collect();
        priorities(client.as_ref(), &none, &endpoints, setting)
    }

    #[test]
    fn default_priorities_go_subzone_zone_region_then_elsewhere() {
        let endpoints = [Some("r1/z1/s1"), Some("r1/z1/s2"), Some("r1/z2/s1"), Some("r2/z1/s1"), None];
        let p = by_locality(Some("r1/z1/s1"), &endpoints, &LocalityLb::default());
        assert_eq!(p, [0, 1, 2, 3, 3]);
    }

    #[test]
    fn a_failover_rule_for_the_clients_region_puts_its_target_before_the_rest() {
        let setting = LocalityLb { failover: vec![failover("r9", "r3"), failover("r1", "r2")], ..Default::default() };
        let endpoints = [Some("r1/z1/s1"), Some("r1/z1/s2"), Some("r1/z2"), Some("r3/z1"), Some("r2/z1"), None];
        assert_eq!(by_locality(Some("r1/z1/s1"), &endpoints, &setting), [0, 1, 2, 4, 3, 4]);
        let p = by_locality(Some("r5/z1"), &endpoints, &setting);
        assert_eq!(p, [0; 6], "no rule from r5: all in other regions alike (3, compacted to 0)");
    }

    #[test]
    fn priorities_are_compacted_as_istio_sends_them() {
        let endpoints = [Some("r2/z1"), Some("r1/z2"), Some("r1/z2/s9")];
        assert_eq!(by_locality(Some("r1/z1/s1"), &endpoints, &LocalityLb::default()), [1, 0, 0], "3, 2, 2");
    }

    #[test]
    fn no_client_locality_disabled_or_distribute_means_one_level() {
        let endpoints = [Some("r1/z1"), Some("r2/z1"), None];
        assert_eq!(by_locality(None, &endpoints, &LocalityLb::default()), [0, 0, 0]);
        let off = LocalityLb { enabled: Some(false), ..Default::default() };
        assert_eq!(by_locality(Some("r1/z1"), &endpoints, &off), [0, 0, 0]);
        let to = BTreeMap::from([("r2".to_string(), 100)]);
        let rule = LocalityDistribute { from: "*".into(), to };
        let distribute = LocalityLb { distribute: vec![rule], ..Default::default() };
        assert_eq!(by_locality(Some("r1/z1"), &endpoints, &distribute), [0, 0, 0]);
    }

    const NETWORK: &str = "topology.istio.io/network";

    fn failover_priority(entries: &[&str]) -> LocalityLb {
        LocalityLb { failover_priority: entries.iter().map(|e| e.to_string()).collect(), ..Default::default() }
    }

    #[test]
    fn failover_priority_counts_the_matching_prefix_of_labels() {
        let setting = failover_priority(&[NETWORK, REGION_LABEL, ZONE_LABEL]);
        let (client, client_labels) = (loc("r1/z1"), labels(&[(NETWORK, "n1")]));
        let (n1, n2) = (labels(&[(NETWORK, "n1")]), labels(&[(NETWORK, "n2")]));
        let (z1, z2, r2) = (loc("r1/z1/s7"), loc("r1/z2"), loc("r2/z1"));
        let region_label = labels(&[(NETWORK, "n1"), (REGION_LABEL, "r1"), (ZONE_LABEL, "z1")]);
        let endpoints = [(Some(&z1), &n1), (Some(&z2), &n1), (Some(&r2), &n1), (Some(&z1), &n2), (None, &region_label)];
        let p = priorities(Some(&client), &client_labels, &endpoints, &setting);
        assert_eq!(p, [0, 1, 2, 3, 0], "subzone is not listed; labels stand in for a missing locality");
    }

    #[test]
    fn failover_priority_overrides_and_missing_labels() {
        let setting = failover_priority(&[&format!("{NETWORK}=n2"), "tier"]);
        let client_labels = labels(&[(NETWORK, "n1"), ("tier", "gold")]);
        let (n1, n2) = (labels(&[(NETWORK, "n1"), ("tier", "gold")]), labels(&[(NETWORK, "n2"), ("tier", "gold")]));
        let untiered = labels(&[(NETWORK, "n2")]);
        let endpoints = [(None, &n1), (None, &n2), (None, &untiered)];
        assert_eq!(priorities(None, &client_labels, &endpoints, &setting), [2, 0, 1], "n2 preferred by the rule");
        let both_missing = failover_priority(&["tier"]);
        let bare = BTreeMap::new();
        let client = labels(&[("app", "x")]);
        assert_eq!(priorities(None, &client, &[(None, &bare), (None, &n1)], &both_missing), [0, 1], "\"\" == \"\"");
        assert_eq!(priorities(None, &bare, &[(None, &bare), (None, &n1)], &both_missing), [0, 0], "no client labels");
    }

    #[test]
    fn failover_priority_with_failover_refines_each_label_level_by_locality() {
        let setting = LocalityLb { failover: vec![failover("r1", "r2")], ..failover_priority(&["tier"]) };
        let (gold, silver) = (labels(&[("tier", "gold")]), labels(&[("tier", "silver")]));
        let (here, far, target) = (loc("r1/z1"), loc("r3/z1"), loc("r2/z1"));
        let endpoints = [(Some(&here), &gold), (Some(&far), &gold), (Some(&here), &silver), (Some(&target), &gold)];
        // Raw 0×5+0, 0×5+4, 1×5+0, 0×5+3 = 0, 4, 5, 3: compacted.
        assert_eq!(priorities(Some(&here), &gold, &endpoints, &setting), [0, 2, 3, 1]);
    }

    #[test]
    fn priority_load_matches_envoys_tables() {
        let two = |p0: usize| priority_load(&[(p0, 100), (100, 100)]);
        assert_eq!(two(100), [100.0, 0.0]);
        assert_eq!(two(72), [100.0, 0.0], "72 × 1.4 is over 100");
        assert_eq!(two(71), [99.0, 1.0]);
        assert_eq!(two(50), [70.0, 30.0]);
        assert_eq!(two(25), [35.0, 65.0]);
        assert_eq!(two(0), [0.0, 100.0]);
        assert_eq!(priority_load(&[(20, 100), (20, 100), (100, 100)]), [28.0, 28.0, 44.0]);
        assert_eq!(priority_load(&[(20, 100), (20, 100)]), [50.0, 50.0], "scaled up: 28 + 28 < 100");
        assert_eq!(priority_load(&[(10, 10)]), [100.0]);
    }

    #[test]
    fn priority_load_rounds_as_envoy_and_handles_empty_levels() {
        assert_eq!(priority_load(&[(1, 3), (1, 7)]), [70.0, 30.0], "69 + 30, the 1 left to level 0");
        assert_eq!(priority_load(&[(1, 3), (1, 3), (1, 3)]), [46.0, 46.0, 8.0]);
        assert_eq!(priority_load(&[(0, 0), (2, 2)]), [0.0, 100.0], "an empty level takes nothing");
        assert_eq!(priority_load(&[(0, 3), (0, 2)]), [100.0, 0.0], "nothing healthy: all to level 0");
        assert_eq!(priority_load(&[(0, 0), (0, 3)]), [100.0, 0.0]);
        assert!(priority_load(&[]).is_empty());
    }

    #[test]
    fn panic_spreads_by_endpoint_count_when_every_level_panics() {
        assert_eq!(priority_load_with_panic(&[(1, 10), (1, 10)], 50), [50.0, 50.0]);
        assert_eq!(priority_load_with_panic(&[(0, 4), (0, 6)], 50), [40.0, 60.0]);
        assert_eq!(priority_load_with_panic(&[(0, 1), (0, 2)], 50), [34.0, 66.0], "33 + 66, 1 left to the first");
        assert_eq!(priority_load_with_panic(&[(1, 10), (9, 10)], 50), [14.0, 86.0], "level 1 is not in panic");
        assert_eq!(priority_load_with_panic(&[(0, 4), (0, 6)], 0), [100.0, 0.0], "panic off");
    }

    fn at(fraction: f64) -> u64 {
        ((fraction * (1u64 << 53) as f64) as u64) << 11
    }

    #[test]
    fn pick_level_maps_the_random_number_over_the_loads() {
        let loads = [70.0, 30.0];
        assert_eq!((pick_level(&loads, 0), pick_level(&loads, u64::MAX)), (0, 1));
        assert_eq!((pick_level(&loads, at(0.6999)), pick_level(&loads, at(0.7001))), (0, 1));
        assert_eq!(pick_level(&[0.0, 100.0, 0.0], 0), 1, "a level without load is never drawn");
        assert_eq!(pick_level(&[0.0, 100.0, 0.0], u64::MAX), 1);
        assert_eq!((pick_level(&[], 5), pick_level(&[0.0, 0.0], 5)), (0, 0));
        assert_eq!(pick_level(&[1.0, 3.0], at(0.26)), 1, "loads not summing to 100 are scaled");
    }

    fn distribute(rules: &[(&str, &[(&str, u32)])]) -> LocalityLb {
        let rule = |(from, to): &(&str, &[(&str, u32)])| LocalityDistribute {
            from: from.to_string(),
            to: to.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        };
        LocalityLb { distribute: rules.iter().map(rule).collect(), ..Default::default() }
    }

    fn weights(client: Option<&str>, endpoints: &[Option<&str>], setting: &LocalityLb) -> Option<Vec<f64>> {
        let client = client.map(loc);
        let localities: Vec<Option<Locality>> = endpoints.iter().map(|e| e.map(loc)).collect();
        let endpoints: Vec<Option<&Locality>> = localities.iter().map(Option::as_ref).collect();
        distribute_weights(client.as_ref(), &endpoints, setting)
    }

    #[test]
    fn distribute_splits_each_weight_over_the_matching_endpoints() {
        let setting = distribute(&[
            ("r1/z1/*", &[("r1/z1/*", 80), ("r1/z2/*", 20)]),
            ("r1/z2/*", &[("r1/z1/*", 20), ("r1/z2/*", 80)]),
        ]);
        let endpoints = [Some("r1/z1/a"), Some("r1/z1/b"), Some("r1/z2/a"), Some("r2/z1/a"), None];
        assert_eq!(weights(Some("r1/z1/s"), &endpoints, &setting), Some(vec![40.0, 40.0, 20.0, 0.0, 0.0]));
        assert_eq!(weights(Some("r1/z2"), &endpoints, &setting), Some(vec![10.0, 10.0, 80.0, 0.0, 0.0]));
        assert_eq!(weights(Some("r2/z1"), &endpoints, &setting), None, "no rule from r2");
        assert_eq!(weights(None, &endpoints, &setting), None);
        let off = LocalityLb { enabled: Some(false), ..setting };
        assert_eq!(weights(Some("r1/z1/s"), &endpoints, &off), None);
    }

    #[test]
    fn distribute_gives_an_endpoint_to_the_most_specific_entry() {
        let setting = distribute(&[("*", &[("r1/*", 30), ("r1/z1", 60), ("*", 10)])]);
        let endpoints = [Some("r1/z1/a"), Some("r1/z2/a"), Some("r1/z3/a"), Some("r2/z1"), None];
        assert_eq!(weights(None, &endpoints, &setting), Some(vec![60.0, 15.0, 15.0, 5.0, 5.0]));
        assert!(locality_matches(Some(&loc("r1/z1/s")), "r1") && !locality_matches(None, "r1"));
        assert!(locality_matches(Some(&loc("r1/z1/s")), "*/z1/*") && !locality_matches(Some(&loc("r1/z2")), "*/z1"));
    }
}
