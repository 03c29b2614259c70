//! The controller → agent push protocol, carried on one long-lived HTTP/2 stream over mTLS
//! (`POST /warren.push.v1/stream`; docs/control-plane.md says why plain h2 and not gRPC).
//!
//! Both directions are a sequence of frames: a 4-byte big-endian length, then that many bytes of JSON.
//! The controller sends [`Update`]s: the first on every stream is `full` (the agent replaces everything
//! it holds), later ones carry only what changed. The agent answers each with [`Reply::Ack`] once its
//! eBPF maps and proxy tables hold that version, or [`Reply::Nack`] with the reason, keeping its last
//! good version. The controller diffs the next update against what the agent last ACKed. Between
//! replies, the agent sends its flow summary ([`Reply::Flows`]) for the mesh-wide service graph.
use std::{collections::BTreeMap, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::tables::{Resource, Tables};

pub const PATH: &str = "/warren.push.v1/stream";
/// Header naming the agent's node (the agent's certificate proves it is an agent).
pub const NODE_HEADER: &str = "warren-node";
/// Frames larger than this are refused (a full snapshot of a large mesh fits comfortably).
pub const MAX_FRAME: usize = 512 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Update {
    pub version: u64,
    /// Replace everything held with `upserts`.
    pub full: bool,
    #[serde(default)]
    pub upserts: Vec<Resource>,
    /// Keys (see [`Resource::key`]) to drop.
    #[serde(default)]
    pub removals: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Reply {
    Ack { version: u64 },
    Nack { version: u64, error: String },
    /// The agent's live service graph (every [`FLOW_REPORT_EVERY`]), for the controller's mesh-wide page.
    Flows { graph: crate::flows::FlowGraph },
}

/// How often agents send their [`Reply::Flows`].
pub const FLOW_REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// `len(4, BE) ++ json`.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let json = serde_json::to_vec(message).expect("push messages serialize");
    let mut frame = Vec::with_capacity(json.len() + 4);
    frame.extend_from_slice(&(json.len() as u32).to_be_bytes());
    frame.extend_from_slice(&json);
    frame
}

/// Splits complete frames off the front of `buffer`.
#[derive(Default)]
pub struct FrameReader {
    buffer: Vec<u8>,
}

impl FrameReader {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete frame decoded, `Ok(None)` when more bytes are needed.
    pub fn next<T: serde::de::DeserializeOwned>(&mut self) -> Result<Option<T>, String> {
        if self.buffer.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes(self.buffer[..4].try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME {
            return Err(format!("frame of {len} bytes exceeds the {MAX_FRAME}-byte limit"));
        }
        if self.buffer.len() < 4 + len {
            return Ok(None);
        }
        let message = serde_json::from_slice(&self.buffer[4..4 + len]).map_err(|e| format!("malformed frame: {e}"));
        self.buffer.drain(..4 + len);
        message.map(Some)
    }
}

/// What changed from `acked` to `next`, as an incremental update.
pub fn diff(version: u64, acked: &BTreeMap<String, Arc<Resource>>, next: &BTreeMap<String, Arc<Resource>>) -> Update {
    let upserts = next
        .iter()
        .filter(|(k, v)| acked.get(*k).is_none_or(|old| !Arc::ptr_eq(old, v) && old != *v))
        .map(|(_, v)| (**v).clone())
        .collect();
    let removals = acked.keys().filter(|k| !next.contains_key(*k)).cloned().collect();
    Update { version, full: false, upserts, removals }
}

/// Applies `update` to `held`, returning the new table set (`held` itself is left as it was).
pub fn apply(held: &Tables, update: &Update) -> Tables {
    let mut next = if update.full { Tables::new() } else { held.clone() };
    for key in &update.removals {
        next.remove(key);
    }
    for resource in &update.upserts {
        next.insert(resource.key(), resource.clone());
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::Namespace;

    fn ns(name: &str, label: &str) -> Arc<Resource> {
        Arc::new(Resource::Namespace(Namespace { name: name.into(), labels: [("l".to_string(), label.to_string())].into() }))
    }

    #[test]
    fn diff_then_apply_reaches_the_next_state() {
        let acked: BTreeMap<_, _> = [("namespace//a".to_string(), ns("a", "1")), ("namespace//b".to_string(), ns("b", "1"))].into();
        let next: BTreeMap<_, _> = [("namespace//a".to_string(), ns("a", "2")), ("namespace//c".to_string(), ns("c", "1"))].into();
        let update = diff(7, &acked, &next);
        assert_eq!(update.upserts.len(), 2);
        assert_eq!(update.removals, ["namespace//b"]);
        let held: Tables = acked.iter().map(|(k, v)| (k.clone(), (**v).clone())).collect();
        let applied = apply(&held, &update);
        let expected: Tables = next.iter().map(|(k, v)| (k.clone(), (**v).clone())).collect();
        assert_eq!(applied, expected);
    }

    #[test]
    fn frames_split_and_reassemble() {
        let mut reader = FrameReader::default();
        let frame = encode(&Reply::Ack { version: 3 });
        reader.push(&frame[..3]);
        assert_eq!(reader.next::<Reply>(), Ok(None));
        reader.push(&frame[3..]);
        reader.push(&encode(&Reply::Nack { version: 4, error: "x".into() }));
        assert_eq!(reader.next::<Reply>(), Ok(Some(Reply::Ack { version: 3 })));
        assert_eq!(reader.next::<Reply>(), Ok(Some(Reply::Nack { version: 4, error: "x".into() })));
        reader.push(&[0, 0, 0, 2, b'{', b'x']);
        assert!(reader.next::<Reply>().unwrap_err().starts_with("malformed frame"));
    }
}
