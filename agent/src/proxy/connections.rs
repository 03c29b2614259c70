//! What the proxy is carrying now, and the last connections it closed (for `inspect` and tests).
use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use serde::Serialize;

const RECENTLY_CLOSED: usize = 256;

#[derive(Debug, Clone, Serialize)]
pub struct ConnectionInfo {
    pub id: u64,
    pub direction: &'static str,
    /// `namespace/name` of the enrolled pod the connection belongs to.
    pub pod: String,
    /// The client's address as the agent accepted it (inside the pod's netns).
    pub client: SocketAddr,
    /// Where the workload wanted to go, recovered from the eBPF map.
    pub original_dst: SocketAddr,
    /// "tcp" (plain L4) or "hbone" (mTLS tunnel).
    pub protocol: &'static str,
    /// The peer workload's SPIFFE identity, when mTLS proved it.
    pub peer_identity: Option<String>,
    pub opened_unix_ms: u128,
    pub sent_bytes: u64,
    pub received_bytes: u64,
    pub closed: bool,
    pub error: Option<String>,
}

#[derive(Default)]
struct Inner {
    open: BTreeMap<u64, ConnectionInfo>,
    closers: BTreeMap<u64, Closer>,
    closed: VecDeque<ConnectionInfo>,
}

/// Lets the table end an open connection (its proxy task waits on [`Closer::closed`]).
#[derive(Clone, Default)]
pub struct Closer(Arc<CloserState>);

#[derive(Default)]
struct CloserState {
    notify: tokio::sync::Notify,
    reason: Mutex<Option<String>>,
}

impl Closer {
    /// Resolves once the connection is to be closed, with why.
    pub async fn closed(&self) -> String {
        self.0.notify.notified().await;
        self.0.reason.lock().unwrap().take().unwrap_or_else(|| "closed".into())
    }

    fn close(&self, reason: String) {
        *self.0.reason.lock().unwrap() = Some(reason);
        // A permit is stored if the task is not waiting yet.
        self.0.notify.notify_one();
    }
}

#[derive(Default, Clone)]
pub struct ConnectionTable {
    next_id: Arc<AtomicU64>,
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub open: Vec<ConnectionInfo>,
    pub recently_closed: Vec<ConnectionInfo>,
}

impl ConnectionTable {
    pub fn open(
        &self,
        direction: &'static str,
        pod: String,
        client: SocketAddr,
        original_dst: SocketAddr,
        protocol: &'static str,
        peer_identity: Option<String>,
    ) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let opened_unix_ms =
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let info = ConnectionInfo {
            id,
            direction,
            pod,
            client,
            original_dst,
            protocol,
            peer_identity,
            opened_unix_ms,
            sent_bytes: 0,
            received_bytes: 0,
            closed: false,
            error: None,
        };
        let mut inner = self.inner.lock().unwrap();
        inner.open.insert(id, info);
        inner.closers.insert(id, Closer::default());
        id
    }

    /// The handle that ends connection `id` early (a fresh one if it is not open any more).
    pub fn closer(&self, id: u64) -> Closer {
        self.inner.lock().unwrap().closers.get(&id).cloned().unwrap_or_default()
    }

    /// Closes every open connection for which `reason` gives one; returns how many.
    pub fn close_where(&self, mut reason: impl FnMut(&ConnectionInfo) -> Option<String>) -> usize {
        let inner = self.inner.lock().unwrap();
        let mut closed = 0;
        for (id, info) in &inner.open {
            if let (Some(why), Some(closer)) = (reason(info), inner.closers.get(id)) {
                closer.close(why);
                closed += 1;
            }
        }
        closed
    }

    pub fn close(&self, id: u64, sent_bytes: u64, received_bytes: u64, error: Option<String>) {
        let mut inner = self.inner.lock().unwrap();
        inner.closers.remove(&id);
        if let Some(mut info) = inner.open.remove(&id) {
            info.sent_bytes = sent_bytes;
            info.received_bytes = received_bytes;
            info.closed = true;
            info.error = error;
            if inner.closed.len() == RECENTLY_CLOSED {
                inner.closed.pop_front();
            }
            inner.closed.push_back(info);
        }
    }

    /// Connections opened since start.
    pub fn total(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed)
    }

    pub fn open_count(&self) -> usize {
        self.inner.lock().unwrap().open.len()
    }

    pub fn snapshot(&self) -> Snapshot {
        let inner = self.inner.lock().unwrap();
        Snapshot {
            open: inner.open.values().cloned().collect(),
            recently_closed: inner.closed.iter().cloned().collect(),
        }
    }
}
