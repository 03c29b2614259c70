//! The per-workload index that keeps a decision fast with many policies: most rules say who the client must
//! be (principals, namespaces), so a connection need only be checked against the rules whose identity
//! values its principal or namespace hits — found by hashing, not by comparing against every value.
//!
//! Each distinct principal or namespace value of the workload's rules is a matcher with an id. A rule whose
//! every source names principals (or, failing that, namespaces) is *gated*: it can only match when one of
//! those matchers hits, so it is listed under each of them. Every other rule is checked for every
//! connection. Candidates are then checked in full ([`Rule::matches`]), in evaluation order.
use std::hash::{BuildHasherDefault, Hasher};

use super::{Connection, Rule, StringMatch};

/// FNV-1a: the index hashes short identity strings on every connection, where SipHash's DoS resistance
/// buys nothing (the keys are the operator's policy values) and costs several times as much.
#[derive(Default)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut hash = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for byte in bytes {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = hash;
    }
}

type HashMap<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<Fnv>>;

/// Distinct string matchers of one attribute (principal or namespace), by id.
#[derive(Debug, Clone, Default)]
struct Matchers {
    ids: HashMap<StringMatch, u32>,
    exact: HashMap<String, Vec<u32>>,
    /// By prefix length, then prefix.
    prefix: Vec<(usize, HashMap<String, Vec<u32>>)>,
    suffix: Vec<(usize, HashMap<String, Vec<u32>>)>,
    present: Vec<u32>,
}

impl Matchers {
    fn id(&mut self, m: &StringMatch) -> u32 {
        if let Some(id) = self.ids.get(m) {
            return *id;
        }
        let id = self.ids.len() as u32;
        self.ids.insert(m.clone(), id);
        let by_len = |groups: &mut Vec<(usize, HashMap<String, Vec<u32>>)>, value: &str| {
            let at = match groups.iter().position(|(len, _)| *len == value.len()) {
                Some(at) => at,
                None => {
                    groups.push((value.len(), HashMap::default()));
                    groups.len() - 1
                }
            };
            groups[at].1.entry(value.to_string()).or_default().push(id);
        };
        match m {
            StringMatch::Exact(v) => self.exact.entry(v.clone()).or_default().push(id),
            StringMatch::Prefix(v) => by_len(&mut self.prefix, v),
            StringMatch::Suffix(v) => by_len(&mut self.suffix, v),
            StringMatch::Present => self.present.push(id),
        }
        id
    }

    /// Calls `hit` with every matcher that matches `value`.
    fn hits(&self, value: Option<&str>, mut hit: impl FnMut(u32)) {
        let Some(value) = value else { return };
        if value.is_empty() {
            return;
        }
        self.exact.get(value).into_iter().flatten().for_each(|id| hit(*id));
        for (len, values) in &self.prefix {
            if let Some(ids) = value.get(..*len).and_then(|p| values.get(p)) {
                ids.iter().for_each(|id| hit(*id));
            }
        }
        for (len, values) in &self.suffix {
            let suffix = value.len().checked_sub(*len).and_then(|start| value.get(start..));
            if let Some(ids) = suffix.and_then(|s| values.get(s)) {
                ids.iter().for_each(|id| hit(*id));
            }
        }
        self.present.iter().for_each(|id| hit(*id));
    }
}

/// Candidate rules, by their position in evaluation order.
#[derive(Debug, Clone, Default)]
pub(super) struct RuleIndex {
    principals: Matchers,
    namespaces: Matchers,
    /// Matcher id → rules gated by it.
    by_principal: Vec<Vec<u32>>,
    by_namespace: Vec<Vec<u32>>,
    /// Rules checked for every connection.
    always: Vec<u32>,
}

impl RuleIndex {
    /// Indexes `rules`, given in evaluation order.
    pub(super) fn new<'a>(rules: impl IntoIterator<Item = &'a Rule>) -> RuleIndex {
        let mut index = RuleIndex::default();
        for (position, rule) in rules.into_iter().enumerate() {
            let position = position as u32;
            let gated =
                !rule.from.is_empty() && rule.from.iter().all(|s| !s.principals.is_empty() || !s.namespaces.is_empty());
            if !gated {
                index.always.push(position);
                continue;
            }
            for source in &rule.from {
                // One gate per source: its principals if it names any (a source must match all its fields).
                let (matchers, lists, values) = if source.principals.is_empty() {
                    (&mut index.namespaces, &mut index.by_namespace, &source.namespaces)
                } else {
                    (&mut index.principals, &mut index.by_principal, &source.principals)
                };
                for value in values {
                    let id = matchers.id(value) as usize;
                    if lists.len() <= id {
                        lists.resize(id + 1, Vec::new());
                    }
                    if lists[id].last() != Some(&position) {
                        lists[id].push(position);
                    }
                }
            }
        }
        index
    }

    /// The rules `c` could match, in evaluation order, without duplicates.
    pub(super) fn candidates(&self, c: &Connection, out: &mut Vec<u32>) {
        out.extend_from_slice(&self.always);
        self.principals.hits(c.principal, |id| out.extend_from_slice(&self.by_principal[id as usize]));
        self.namespaces.hits(c.namespace, |id| out.extend_from_slice(&self.by_namespace[id as usize]));
        if out.len() > self.always.len() {
            out.sort_unstable();
            out.dedup();
        }
    }
}
