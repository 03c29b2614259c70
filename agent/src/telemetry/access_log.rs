//! Access logs: one JSON line per HTTP request and per TCP connection, on the agent's stdout, with
//! Envoy's default fields and Istio's (reporter, both workloads and principals, the policy decision).
//! Lines go through a bounded queue to one writer thread, so a slow log reader never stalls the proxy:
//! what does not fit is dropped and counted (`warren_access_log_dropped_total`).
use std::{
    io::Write,
    sync::mpsc::{Receiver, SyncSender, TrySendError},
    time::SystemTime,
};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

/// Lines queued for the writer before new ones are dropped.
const QUEUE: usize = 8192;

#[derive(Clone)]
pub struct AccessLog {
    lines: SyncSender<String>,
    pub dropped: Counter,
}

impl AccessLog {
    /// Starts the writer thread (stdout).
    pub fn stdout() -> AccessLog {
        let (lines, queue) = std::sync::mpsc::sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(queue, std::io::stdout()))
            .expect("spawning the access log writer");
        AccessLog { lines, dropped: Counter::default() }
    }

    pub fn write(&self, entry: &Entry<'_>) {
        let Ok(line) = serde_json::to_string(entry) else { return };
        match self.lines.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }
}

/// Writes lines as they come, flushing whenever the queue is empty.
fn write_lines(queue: Receiver<String>, out: impl Write) {
    let mut out = std::io::BufWriter::new(out);
    while let Ok(line) = queue.recv() {
        let _ = writeln!(out, "{line}");
        while let Ok(line) = queue.try_recv() {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }
}

/// One line. Field names are Envoy's JSON access log's (and Istio's `accessLogEncoding: JSON`), plus the
/// mesh's own; absent values are `null`, as Envoy writes `-`.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    pub start_time: String,
    pub reporter: &'static str,
    /// `HTTP/1.1`, `HTTP/2`, or `TCP`.
    pub protocol: &'static str,
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
    pub authority: Option<&'a str>,
    pub response_code: u16,
    pub grpc_status: Option<u32>,
    pub response_flags: &'static str,
    pub response_code_details: Option<&'a str>,
    /// Bytes from the downstream (request body; for TCP, the client's bytes).
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// Milliseconds from the first byte to the last.
    pub duration: u64,
    pub user_agent: Option<&'a str>,
    pub request_id: Option<&'a str>,
    pub x_forwarded_for: Option<&'a str>,
    pub traceparent: Option<&'a str>,
    pub downstream_remote_address: String,
    pub downstream_local_address: String,
    pub upstream_host: Option<String>,
    /// Envoy's cluster name: `outbound|9080|v1|reviews.default.svc.cluster.local`, `inbound|9080||`.
    pub upstream_cluster: Option<String>,
    pub source_workload: &'a str,
    pub source_namespace: &'a str,
    pub source_principal: &'a str,
    pub destination_workload: &'a str,
    pub destination_namespace: &'a str,
    pub destination_principal: &'a str,
    pub destination_service: &'a str,
    pub connection_security_policy: &'static str,
    /// The AuthorizationPolicy decision: `allow`, or `deny` with the policy that denied.
    pub policy: Option<&'a str>,
}

/// RFC 3339 with milliseconds, UTC (Envoy's `%START_TIME%`).
pub fn timestamp(at: SystemTime) -> String {
    let at = time::OffsetDateTime::from(at);
    let format = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    at.format(&format).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn timestamps_are_rfc3339_with_milliseconds() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_680_400_123);
        assert_eq!(timestamp(at), "2025-12-02T13:00:00.123Z");
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (lines, _queue) = std::sync::mpsc::sync_channel(1);
        let log = AccessLog { lines, dropped: Counter::default() };
        let entry = Entry {
            start_time: String::new(), reporter: "source", protocol: "TCP", method: None, path: None, authority: None,
            response_code: 0, grpc_status: None, response_flags: "-", response_code_details: None, bytes_received: 0,
            bytes_sent: 0, duration: 0, user_agent: None, request_id: None, x_forwarded_for: None, traceparent: None,
            downstream_remote_address: String::new(), downstream_local_address: String::new(), upstream_host: None,
            upstream_cluster: None, source_workload: "a", source_namespace: "n", source_principal: "unknown",
            destination_workload: "b", destination_namespace: "n", destination_principal: "unknown",
            destination_service: "unknown", connection_security_policy: "none", policy: None,
        };
        log.write(&entry);
        log.write(&entry);
        assert_eq!(log.dropped.get(), 1);
    }
}
