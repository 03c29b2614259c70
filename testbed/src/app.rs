//! What warren-testapp's `app` server and `http` client say, as types both the binary and tests use.
//!
//! `app` is a stand-in for a mesh application such as bookinfo's: an HTTP server (HTTP/1.1 keep-alive and
//! h2c) answering every path with a JSON echo of the request ([`AppResponse`]), after calling its
//! configured upstreams ([`Upstream`]) the way bookinfo's services call each other: `GET /<name>/0` with
//! `Host: <name>:<port>`, the request's tracing and user headers propagated, a timeout and retries per
//! upstream. `/status/N` answers N, `/delay/MS` (or `?delay_ms=MS`) waits first, `/bytes/N` answers N
//! bytes (calling nothing); `application/grpc` requests get a gRPC echo, `Upgrade: websocket` a byte echo
//! on the upgraded connection. Every request it receives is one [`ReceivedRequest`] line on its stdout
//! (unless [`AppOptions::quiet`]).
//!
//! `http` is the client: `count` requests over `concurrency` keep-alive connections ([`HttpRequests`]),
//! one [`HttpResult`] per request. `load` is a load generator ([`Load`]): requests at a fixed rate, open
//! loop, or as fast as answers come; one [`LoadReport`].
use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::Process;

/// Port bookinfo's services listen on.
pub const BOOKINFO_PORT: u16 = 9080;

/// Request headers bookinfo's apps copy from the request they serve onto the calls they make (tracing,
/// user, auth); `x-b3-*` stands for every header with that prefix.
pub const PROPAGATED_HEADERS: &[&str] =
    &["end-user", "x-request-id", "traceparent", "tracestate", "x-b3-*", "b3", "user-agent", "cookie", "authorization"];

/// A service the app calls for every request it answers (other than `/status/N`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Upstream {
    /// The service's name: the call is `GET /<name>/0` with `Host: <name>:<port>`.
    pub name: String,
    /// Where to connect (a service VIP).
    pub address: SocketAddr,
    /// How long one attempt may take, until the whole response is read.
    pub timeout_ms: u64,
    /// Attempts after the first, made when one fails (error, timeout) or answers 5xx.
    pub retries: u32,
}

impl Upstream {
    /// An upstream called with a 10 s timeout and no retry (reviews → ratings in bookinfo).
    pub fn new(name: &str, address: SocketAddr) -> Upstream {
        Upstream { name: name.to_string(), address, timeout_ms: 10_000, retries: 0 }
    }

    pub fn timeout(mut self, timeout: Duration) -> Upstream {
        self.timeout_ms = timeout.as_millis() as u64;
        self
    }

    pub fn retries(mut self, retries: u32) -> Upstream {
        self.retries = retries;
        self
    }

    /// The `--call` argument: `name=address[,timeout_ms=N][,retries=N]`.
    pub fn to_arg(&self) -> String {
        format!("{}={},timeout_ms={},retries={}", self.name, self.address, self.timeout_ms, self.retries)
    }

    /// Parses a `--call` argument; options it does not give take `timeout_ms` and `retries`.
    pub fn parse_arg(text: &str, timeout_ms: u64, retries: u32) -> Result<Upstream> {
        let mut parts = text.split(',');
        let (name, address) = parts.next().unwrap_or("").split_once('=').context("expected NAME=ADDRESS")?;
        let mut upstream = Upstream { name: name.to_string(), address: address.parse()?, timeout_ms, retries };
        for option in parts {
            match option.split_once('=') {
                Some(("timeout_ms", v)) => upstream.timeout_ms = v.parse()?,
                Some(("retries", v)) => upstream.retries = v.parse()?,
                _ => bail!("unknown call option {option:?} (timeout_ms=N, retries=N)"),
            }
        }
        Ok(upstream)
    }
}

/// How to start `warren-testapp app` ([`crate::Pod::serve_app`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppOptions {
    /// The service it stands in for (`reviews`), and its version (`v2`): both are in every answer.
    pub service: String,
    pub version: String,
    pub port: u16,
    pub calls: Vec<Upstream>,
    /// No [`ReceivedRequest`] line per request (under load: thousands a second).
    #[serde(default)]
    pub quiet: bool,
    /// Misbehaviour, to exercise the mesh's resilience: every `fail_every`-th request (counted over all
    /// but `/status/N`) is answered `fail_status` at once (0: never; 1: always).
    #[serde(default)]
    pub fail_every: u32,
    #[serde(default = "default_fail_status")]
    pub fail_status: u16,
    /// Every answer waits this long first (a slow endpoint).
    #[serde(default)]
    pub delay_ms: u64,
}

fn default_fail_status() -> u16 {
    500
}

impl AppOptions {
    /// `service` `version` on bookinfo's port 9080, calling nothing.
    pub fn new(service: &str, version: &str) -> AppOptions {
        let (service, version) = (service.to_string(), version.to_string());
        AppOptions {
            service,
            version,
            port: BOOKINFO_PORT,
            calls: vec![],
            quiet: false,
            fail_every: 0,
            fail_status: default_fail_status(),
            delay_ms: 0,
        }
    }

    /// Answers every `every`-th request with `status` (1: all of them).
    pub fn failing(mut self, every: u32, status: u16) -> AppOptions {
        (self.fail_every, self.fail_status) = (every, status);
        self
    }

    /// Waits `delay` before every answer.
    pub fn slow(mut self, delay: Duration) -> AppOptions {
        self.delay_ms = delay.as_millis() as u64;
        self
    }

    pub fn quiet(mut self) -> AppOptions {
        self.quiet = true;
        self
    }

    pub fn call(mut self, upstream: Upstream) -> AppOptions {
        self.calls.push(upstream);
        self
    }

    /// The command line after `warren-testapp` (the pod's name is added by [`crate::Pod::serve_app`]).
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec!["app".to_string(), "--service".into(), self.service.clone(), "--version".into()];
        args.extend([self.version.clone(), "--port".into(), self.port.to_string()]);
        for call in &self.calls {
            args.extend(["--call".to_string(), call.to_arg()]);
        }
        if self.quiet {
            args.push("--quiet".into());
        }
        if self.fail_every > 0 {
            args.extend(["--fail-every".into(), self.fail_every.to_string(), "--fail-status".into(), self.fail_status.to_string()]);
        }
        if self.delay_ms > 0 {
            args.extend(["--delay-ms".into(), self.delay_ms.to_string()]);
        }
        args
    }
}

/// How one upstream call went, as the app records it in [`AppResponse::calls`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallRecord {
    pub name: String,
    /// The last attempt's status, when it got a response.
    pub status: Option<u16>,
    /// Why the last attempt got no response: `timeout`, `connect: …`, `request: …`.
    pub error: Option<String>,
    /// All attempts together.
    pub latency_ms: u64,
    pub attempts: u32,
    /// The last response's body: JSON when it parses (another app's [`AppResponse`]), else text.
    pub body: Option<serde_json::Value>,
}

impl CallRecord {
    /// The upstream's answer as an [`AppResponse`], when it was one.
    pub fn response(&self) -> Option<AppResponse> {
        self.body.as_ref().and_then(|b| serde_json::from_value(b.clone()).ok())
    }

    /// `Ok(status)` for a 2xx answer, else `Err` with the error or `status N`.
    pub fn outcome(&self) -> std::result::Result<u16, String> {
        match (self.status, &self.error) {
            (Some(s), _) if (200..300).contains(&s) => Ok(s),
            (Some(s), _) => Err(format!("status {s}")),
            (None, Some(e)) => Err(e.clone()),
            (None, None) => Err("no response".into()),
        }
    }
}

/// The app's answer to a request (the JSON body of everything but gRPC and upgrades).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppResponse {
    pub service: String,
    pub version: String,
    pub pod: String,
    pub method: String,
    /// Path and query as received.
    pub path: String,
    /// The Host header (HTTP/1) or the URI's authority (HTTP/2).
    pub host: String,
    /// Every request header, lower-case; repeated headers joined with `, `.
    pub headers: BTreeMap<String, String>,
    pub calls: Vec<CallRecord>,
}

impl AppResponse {
    pub fn call(&self, name: &str) -> Option<&CallRecord> {
        self.calls.iter().find(|c| c.name == name)
    }
}

/// One line of the app's stdout per request it received (before it answers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReceivedRequest {
    /// Always `request`.
    pub event: String,
    pub method: String,
    pub path: String,
    pub host: String,
    /// `HTTP/1.1`, `HTTP/2.0`.
    pub version: String,
    pub headers: BTreeMap<String, String>,
}

/// The requests an app (started by [`crate::Pod::serve_app`]) received so far, oldest first.
pub fn received(app: &Process) -> Result<Vec<ReceivedRequest>> {
    app.stdout()
        .lines()
        .filter(|l| l.starts_with("{\"event\":\"request\""))
        .map(|l| serde_json::from_str(l).with_context(|| format!("request record {l}")))
        .collect()
}

/// What `warren-testapp http` sends ([`crate::Pod::http`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpRequests {
    pub count: usize,
    /// Connections, each used by one request at a time, kept alive across requests (HTTP/2: one stream at
    /// a time on each).
    pub concurrency: usize,
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
    /// The Host header (HTTP/2: the authority); default: the address connected to.
    pub host: Option<String>,
    /// A request body of this many bytes (`x`), with a content-length.
    pub body_bytes: usize,
    /// HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
    pub http2: bool,
    /// Ask for `Upgrade: websocket` and, on a 101 whose `Sec-WebSocket-Accept` answers the key, echo a
    /// message over the upgraded connection (one connection per request, as upgrades consume it).
    pub upgrade_websocket: bool,
    /// How long one request may take, until its whole response is read.
    pub timeout_ms: u64,
}

impl Default for HttpRequests {
    fn default() -> Self {
        HttpRequests {
            count: 1,
            concurrency: 1,
            method: "GET".into(),
            path: "/".into(),
            headers: vec![],
            host: None,
            body_bytes: 0,
            http2: false,
            upgrade_websocket: false,
            timeout_ms: 30_000,
        }
    }
}

impl HttpRequests {
    /// `count` GETs of `path`, one at a time on one connection.
    pub fn get(path: &str, count: usize) -> HttpRequests {
        HttpRequests { count, path: path.to_string(), ..Default::default() }
    }

    pub fn header(mut self, name: &str, value: &str) -> HttpRequests {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn concurrency(mut self, connections: usize) -> HttpRequests {
        self.concurrency = connections;
        self
    }

    /// The command line after `warren-testapp`.
    pub fn to_args(&self, to: SocketAddr) -> Vec<String> {
        let mut args = vec!["http".to_string(), "--to".into(), to.to_string()];
        args.extend(["--count".into(), self.count.to_string()]);
        args.extend(["--concurrency".into(), self.concurrency.to_string(), "--method".into(), self.method.clone()]);
        args.extend(["--path".into(), self.path.clone(), "--timeout-ms".into(), self.timeout_ms.to_string()]);
        for (name, value) in &self.headers {
            args.extend(["-H".to_string(), format!("{name}: {value}")]);
        }
        if let Some(host) = &self.host {
            args.extend(["--host".to_string(), host.clone()]);
        }
        if self.body_bytes > 0 {
            args.extend(["--body-bytes".to_string(), self.body_bytes.to_string()]);
        }
        if self.http2 {
            args.push("--http2".into());
        }
        if self.upgrade_websocket {
            args.push("--upgrade-websocket".into());
        }
        args
    }
}

/// One request of `warren-testapp http`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpResult {
    /// The response's status; 0 when there was none (see `error`).
    pub status: u16,
    /// Why there was no (whole) response: `timeout`, `connect: …`, `request: …`, `body: …`.
    pub error: Option<String>,
    /// From sending the request until the whole response (and, for an upgrade, the echo) was read.
    pub latency_us: u64,
    /// `HTTP/1.1`, `HTTP/2.0`.
    pub version: String,
    /// Response headers, lower-case; repeated ones joined with `, `.
    pub headers: BTreeMap<String, String>,
    pub trailers: BTreeMap<String, String>,
    /// The body: JSON when it parses, else text (for an upgrade: the text echoed back).
    pub body: serde_json::Value,
}

impl HttpResult {
    /// The body as an app's [`AppResponse`], when it is one.
    pub fn app(&self) -> Option<AppResponse> {
        serde_json::from_value(self.body.clone()).ok()
    }

    pub fn latency(&self) -> Duration {
        Duration::from_micros(self.latency_us)
    }
}

/// The one JSON line `warren-testapp http` prints.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HttpReport {
    /// One per request, in the order they were started.
    pub results: Vec<HttpResult>,
    /// Each distinct error with how many requests got it, e.g. `3× timeout`.
    pub errors: Vec<String>,
}

/// What `warren-testapp load` sends ([`crate::Pod::load`]): `POST path` with a body of `body_bytes`, on
/// `connections` keep-alive connections (HTTP/2: that many connections, concurrent streams on them).
///
/// With `rps` > 0, open loop as wrk2 and fortio run it: request *i* is due at *start + i/rps*, on connection
/// *i mod connections*, whether or not the earlier ones were answered; its latency runs from when it was
/// due (not from when it could be sent) to the end of its response, so a stall counts for every request it
/// held back (the correction of coordinated omission). An HTTP/1.1 request whose connection still waits for
/// an answer waits too. With `rps` = 0, closed loop: each connection sends its next request as soon as the
/// last is answered — the most the path carries, `achieved_rps`.
///
/// The first `warm_up_ms` are sent alike but not counted; the process prints `measuring` when the counted
/// part starts and `measured` when it ends, then the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// Requests per second; 0: as fast as they are answered.
    pub rps: u64,
    pub warm_up_ms: u64,
    /// How long the counted part lasts.
    pub duration_ms: u64,
    pub connections: usize,
    pub body_bytes: usize,
    /// HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
    pub http2: bool,
    /// The Host header (HTTP/2: the authority); default: the address connected to.
    pub host: Option<String>,
    /// Path and query; the app answers `/bytes/N` with N bytes.
    pub path: String,
    /// How long one request may take, from when it was due.
    pub timeout_ms: u64,
}

impl Default for Load {
    fn default() -> Self {
        Load {
            rps: 1000,
            warm_up_ms: 0,
            duration_ms: 10_000,
            connections: 4,
            body_bytes: 1024,
            http2: false,
            host: None,
            path: "/bytes/1024".into(),
            timeout_ms: 10_000,
        }
    }
}

impl Load {
    /// The command line after `warren-testapp`.
    pub fn to_args(&self, to: SocketAddr) -> Vec<String> {
        let mut args = vec!["load".to_string(), "--to".into(), to.to_string(), "--rps".into(), self.rps.to_string()];
        args.extend(["--warm-up-ms".into(), self.warm_up_ms.to_string()]);
        args.extend(["--duration-ms".into(), self.duration_ms.to_string()]);
        args.extend(["--connections".into(), self.connections.to_string()]);
        args.extend(["--body-bytes".into(), self.body_bytes.to_string(), "--path".into(), self.path.clone()]);
        args.extend(["--timeout-ms".into(), self.timeout_ms.to_string()]);
        if let Some(host) = &self.host {
            args.extend(["--host".to_string(), host.clone()]);
        }
        if self.http2 {
            args.push("--http2".into());
        }
        args
    }
}

/// The one JSON line `warren-testapp load` prints last. Latencies are of the counted requests answered
/// 2xx (open loop: from when each was due).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Counted requests sent, answered 2xx, and failed (error, timeout or another status).
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
    /// Each distinct error with how many requests got it, e.g. `3× timeout`.
    pub error_kinds: Vec<String>,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    #[serde(default)]
    pub p999_us: u64,
    pub max_us: u64,
    /// Counted 2xx answers per second, over the counted part (until its last answer).
    pub achieved_rps: f64,
    /// Open loop: how late after its due time the generator handed each request to its connection, p99 —
    /// the generator's own timer and scheduling error, part of the latencies above.
    pub dispatch_late_p99_us: u64,
}

/// Waits for a `warren-testapp load` process ([`crate::Pod::spawn_load`]) to end; its report.
pub fn load_report(process: Process) -> Result<LoadReport> {
    let out = process.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{')).with_context(|| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        format!("warren-testapp load printed no report ({}); stderr: {stderr}", out.status)
    })?;
    serde_json::from_str(line).with_context(|| format!("warren-testapp load's report {line}"))
}

/// `Sec-WebSocket-Accept` for a request's `Sec-WebSocket-Key` (RFC 6455 §4.2.2: base64 of the SHA-1 of
/// the key followed by the protocol's GUID).
pub fn websocket_accept(key: &str) -> String {
    let digest = sha1(format!("{}258EAFA5-E914-47DA-95CA-C5AB0DC85B11", key.trim()).as_bytes());
    base64(&digest)
}

/// SHA-1 (FIPS 180-4), for the WebSocket handshake only.
fn sha1(message: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x6745_2301, 0xEFCD_AB89, 0x98BA_DCFE, 0x1032_5476, 0xC3D2_E1F0];
    let mut padded = message.to_vec();
    padded.push(0x80);
    while padded.len() % 64 != 56 {
        padded.push(0);
    }
    padded.extend_from_slice(&((message.len() as u64) * 8).to_be_bytes());
    for block in padded.chunks(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, word) in w.iter().enumerate() {
            let (f, k) = match i {
                0..20 => ((b & c) | (!b & d), 0x5A82_7999),
                20..40 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..60 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a.rotate_left(5).wrapping_add(f).wrapping_add(e).wrapping_add(k).wrapping_add(*word);
            (e, d, c, b, a) = (d, c, b.rotate_left(30), a, t);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (chunk, word) in out.chunks_mut(4).zip(h) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_accept_is_rfc_6455s() {
        // The example of RFC 6455 §1.3.
        assert_eq!(websocket_accept("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"a"), "YQ==");
    }

    #[test]
    fn call_arguments_round_trip() {
        let address = "10.96.0.5:9080".parse().unwrap();
        let upstream = Upstream::new("reviews", address).timeout(Duration::from_secs(3)).retries(1);
        assert_eq!(Upstream::parse_arg(&upstream.to_arg(), 0, 0).unwrap(), upstream);
        let defaults = Upstream::parse_arg("ratings=10.96.0.6:9080", 10_000, 2).unwrap();
        assert_eq!((defaults.timeout_ms, defaults.retries), (10_000, 2));
        assert!(Upstream::parse_arg("ratings=10.96.0.6:9080,speed=fast", 0, 0).is_err());
    }
}
