//! AuthorizationPolicy in the kernel, for plaintext inbound connections: the `L4_AUTHZ` trie sk_lookup
//! consults before capture, and the `AUTHZ_DENIALS` ring buffer of what it refused.
//!
//! Entries are keyed by [`AuthzEntryKey`] (destination pod address, port or 0, client source prefix): an
//! `Ord` form of the trie key (`aya::maps::lpm_trie::Key<AuthzTarget>`, which is packed and unordered),
//! so that the wanted contents are a `BTreeMap<AuthzEntryKey, AuthzVerdict>`. sk_lookup decides by the
//! entry with the longest source prefix containing the client among those for the exact port, else
//! among those for port 0; no entry: no decision in the kernel (the connection is captured).
use std::{collections::BTreeMap, net::SocketAddr};

use anyhow::{Context, Result};
use aya::maps::{LpmTrie, MapData, MapError, RingBuf, lpm_trie::Key};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc::UnboundedSender,
};
use warren_api::authz::PlaintextVerdict;
use warren_maps::{AUTHZ_ALLOW, AUTHZ_DENY, AuthzDenial, AuthzEntryKey, AuthzTarget, AuthzVerdict};

/// The `L4_AUTHZ` map as the agent holds it.
pub type AuthzTrie = LpmTrie<MapData, AuthzTarget, AuthzVerdict>;

/// A connection sk_lookup refused, from `AUTHZ_DENIALS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelDenial {
    /// The client's address and port.
    pub client: SocketAddr,
    /// The enrolled pod's address and port it tried to reach.
    pub destination: SocketAddr,
    /// [`AuthzVerdict::decision_id`] of the entry that denied (the policy and rule, as userspace numbers them).
    pub decision_id: u32,
}

impl KernelDenial {
    /// `None` for a record of an unknown address family.
    pub fn from_record(record: &AuthzDenial) -> Option<Self> {
        Some(KernelDenial { client: record.client()?, destination: record.destination()?, decision_id: record.decision_id })
    }
}

/// An `L4_AUTHZ` trie's entries, decoded, and the keys that are no valid [`AuthzEntryKey`].
pub type TrieContents = (BTreeMap<AuthzEntryKey, AuthzVerdict>, Vec<Key<AuthzTarget>>);

/// What `trie` holds now, decoded. Keys that are not valid [`AuthzEntryKey`]s (none the agent writes)
/// come back separately, so that a sync can remove them.
pub fn read_trie(trie: &LpmTrie<impl std::borrow::Borrow<MapData>, AuthzTarget, AuthzVerdict>) -> Result<TrieContents, MapError> {
    let mut entries = BTreeMap::new();
    let mut foreign = Vec::new();
    // `keys()` walks the trie with get_next_key; each key is then looked up. A lookup in an LPM trie
    // returns the longest prefix match of the key — for a key the trie holds, that is its own entry.
    let keys: Vec<Key<AuthzTarget>> = trie.keys().collect::<Result<_, _>>()?;
    for key in keys {
        match AuthzEntryKey::from_trie_key(&key) {
            Some(decoded) => match trie.get(&key, 0) {
                Ok(verdict) => {
                    entries.insert(decoded, verdict);
                }
                // Removed since the walk: it is not there.
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e),
            },
            None => foreign.push(key),
        }
    }
    Ok((entries, foreign))
}

/// Makes `trie` hold exactly `want`; returns (written, removed). Writes first, then removes: a lookup
/// never misses an entry that is wanted before and after.
///
/// (The hash maps' `sync_map` compares with `get`, which an LPM trie answers with the longest *matching*
/// prefix, possibly a shorter entry's; so this reads the whole trie first and compares entry by entry.)
pub fn sync_lpm_trie(trie: &mut AuthzTrie, want: &BTreeMap<AuthzEntryKey, AuthzVerdict>) -> Result<(usize, usize)> {
    let (current, foreign) = read_trie(trie)?;
    let mut written = 0;
    for (key, verdict) in want {
        if current.get(key) != Some(verdict) {
            trie.insert(&key.trie_key(), verdict, 0).with_context(|| format!("writing {key}"))?;
            written += 1;
        }
    }
    let stale = current.keys().filter(|k| !want.contains_key(k)).map(AuthzEntryKey::trie_key).chain(foreign);
    let mut removed = 0;
    for key in stale {
        match trie.remove(&key) {
            Ok(()) => removed += 1,
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok((written, removed))
}

/// Reads `AUTHZ_DENIALS` as records arrive and sends each to `tx`, until `tx`'s receiver is dropped.
/// Needs a tokio runtime. The task is the ring's only consumer (a ring buffer has one consumer position),
/// and it owns `ring` — so the map handle lives as long as the reader does.
///
/// `tx` is unbounded: the reader never blocks the ring, but a receiver that stops reading lets the queue
/// grow (a client retrying a denied connection in a loop produces records at its connect rate).
pub fn spawn_denial_reader(ring: RingBuf<MapData>, tx: UnboundedSender<KernelDenial>) -> Result<tokio::task::JoinHandle<()>> {
    // SAFETY: the fd is the map's, owned by the RingBuf's MapData, which the AsyncFd owns: it stays open
    // and the same for the AsyncFd's whole life (RingBuf::as_raw_fd always returns that one fd).
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("watching the AUTHZ_DENIALS ring buffer: {e}"))?;
    Ok(tokio::spawn(async move {
        loop {
            let mut guard = tokio::select! {
                ready = ring.readable_mut() => match ready {
                    Ok(guard) => guard,
                    Err(e) => {
                        tracing::warn!("AUTHZ_DENIALS: {e}; no more denial records");
                        return;
                    }
                },
                () = tx.closed() => return,
            };
            while let Some(item) = guard.get_inner_mut().next() {
                match AuthzDenial::from_bytes(&item).as_ref().and_then(KernelDenial::from_record) {
                    Some(denial) => {
                        if tx.send(denial).is_err() {
                            return;
                        }
                    }
                    None => tracing::warn!(bytes = item.len(), "AUTHZ_DENIALS: a record that is no AuthzDenial"),
                }
            }
            guard.clear_ready();
        }
    }))
}

/// L4_AUTHZ as it must be: the policy model's plaintext verdicts ([`warren_api::authz::plaintext_table`]),
/// one trie entry each (port 0: every port no other entry of that destination names).
pub fn l4_authz_entries(verdicts: &[PlaintextVerdict]) -> BTreeMap<AuthzEntryKey, AuthzVerdict> {
    verdicts
        .iter()
        .filter_map(|v| {
            let key = AuthzEntryKey::new(v.destination, v.port, v.source.addr(), v.source.prefix_len())?;
            let verdict = if v.allowed { AUTHZ_ALLOW } else { AUTHZ_DENY };
            Some((key, AuthzVerdict { verdict, decision_id: v.decision_id }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_verdict_is_one_entry_of_its_family() {
        let v4: std::net::IpAddr = "10.244.1.2".parse().unwrap();
        let v6: std::net::IpAddr = "fd00:10:244:1::2".parse().unwrap();
        let verdict = |destination, port, source: &str, allowed, decision_id| PlaintextVerdict {
            destination,
            port,
            source: source.parse().unwrap(),
            allowed,
            decision_id,
        };
        let entries = l4_authz_entries(&[
            verdict(v4, 0, "0.0.0.0/0", false, 0),
            verdict(v4, 9080, "10.1.0.0/16", true, 0),
            verdict(v6, 9080, "fd00::/8", false, 7),
            // Of another family than its destination: no entry (a v4 client never reaches a v6 address).
            verdict(v6, 80, "10.0.0.0/8", false, 9),
        ]);
        let shown: Vec<String> = entries.iter().map(|(k, v)| format!("{k} {} {}", v.verdict, v.decision_id)).collect();
        assert_eq!(
            shown,
            ["10.244.1.2:* from 0.0.0.0/0 1 0", "10.244.1.2:9080 from 10.1.0.0/16 0 0", "[fd00:10:244:1::2]:9080 from fd00::/8 1 7"]
        );
    }
}
