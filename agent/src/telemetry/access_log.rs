//! Access logs: one JSON line per HTTP request and per TCP connection, on the agent's stdout, with
//! Envoy's default fields and Istio's (reporter, both workloads and principals, the policy decision).
//! Lines are handed to one writer thread through a bounded buffer, so a slow log reader never stalls the
//! proxy: what does not fit is dropped and counted (`warren_access_log_dropped_total`). The writer takes
//! the buffer once a second (Envoy's default access-log flush interval), or sooner when it is half full,
//! and writes it at once: waking a thread and a system call per line would cost more than the line.
use std::{
    io::Write,
    sync::{Arc, Condvar, Mutex},
    time::{Duration, SystemTime},
};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

/// Lines buffered for the writer before new ones are dropped.
const CAPACITY: usize = 16384;
/// How long a line may wait for the writer.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Buffer {
    lines: Mutex<Vec<String>>,
    half_full: Condvar,
}

#[derive(Clone)]
pub struct AccessLog {
    buffer: Arc<Buffer>,
    pub dropped: Counter,
}

impl AccessLog {
    /// Starts the writer thread (stdout).
    pub fn stdout() -> AccessLog {
        let log = AccessLog { buffer: Arc::default(), dropped: Counter::default() };
        let buffer = log.buffer.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(&buffer, std::io::stdout()))
            .expect("spawning the access log writer");
        log
    }

    pub fn write(&self, entry: &Entry<'_>) {
        let Ok(line) = serde_json::to_string(entry) else { return };
        let mut lines = self.buffer.lines.lock().unwrap();
        if lines.len() >= CAPACITY {
            drop(lines);
            self.dropped.inc();
            return;
        }
        lines.push(line);
        if lines.len() == CAPACITY / 2 {
            self.buffer.half_full.notify_one();
        }
    }
}

/// Takes what is buffered every [`FLUSH_EVERY`] (or when half full) and writes it in one go; runs for
/// the agent's life.
fn write_lines(buffer: &Buffer, out: impl Write) {
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, out);
    loop {
        let batch = {
            let lines = buffer.lines.lock().unwrap();
            let (mut lines, _) = buffer.half_full.wait_timeout(lines, FLUSH_EVERY).unwrap();
            std::mem::take(&mut *lines)
        };
        for line in &batch {
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
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_with_milliseconds() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_680_400_123);
        assert_eq!(timestamp(at), "2025-12-02T13:00:00.123Z");
    }

    /// A writer that records each write (a system call, for stdout).
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<usize>>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.len());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn entry() -> Entry<'static> {
        Entry {
            start_time: String::new(), reporter: "source", protocol: "TCP", method: None, path: None, authority: None,
            response_code: 0, grpc_status: None, response_flags: "-", response_code_details: None, bytes_received: 0,
            bytes_sent: 0, duration: 0, user_agent: None, request_id: None, x_forwarded_for: None, traceparent: None,
            downstream_remote_address: String::new(), downstream_local_address: String::new(), upstream_host: None,
            upstream_cluster: None, source_workload: "a", source_namespace: "n", source_principal: "unknown",
            destination_workload: "b", destination_namespace: "n", destination_principal: "unknown",
            destination_service: "unknown", connection_security_policy: "none", policy: None,
        }
    }

    #[test]
    fn lines_are_written_together_within_a_second() {
        let log = AccessLog { buffer: Arc::default(), dropped: Counter::default() };
        let writes = Writes::default();
        let (buffer, out) = (log.buffer.clone(), writes.clone());
        std::thread::spawn(move || write_lines(&buffer, out));
        for _ in 0..100 {
            log.write(&entry());
        }
        std::thread::sleep(Duration::from_millis(200));
        assert!(writes.0.lock().unwrap().is_empty(), "nothing written before the flush interval");
        std::thread::sleep(FLUSH_EVERY);
        assert_eq!(writes.0.lock().unwrap().len(), 1, "one write for the hundred lines");
    }

    #[test]
    fn a_full_buffer_drops_and_counts() {
        let log = AccessLog { buffer: Arc::default(), dropped: Counter::default() };
        for _ in 0..CAPACITY + 3 {
            log.write(&entry());
        }
        assert_eq!(log.dropped.get(), 3);
    }
}
