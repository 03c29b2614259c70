//! warren-testapp: the workload inside testbed pods.
//!
//! - `serve`: TCP echo on 7000 and HTTP on 8080; HTTP answers `{"pod", "version", "client", "path"}`.
//! - `send`: streams N pseudo-random bytes to an echo server while reading them back, and reports (JSON)
//!   whether every byte returned in order.
//! - `http-get`: one request, prints the body.
//! - `connect-times`: opens connections one after another, each with one echo, and reports how long each took.
//! - `hold`: opens one connection, checks an echo, then keeps it open and reports when (and how) it ended.
//! - `pause`: sleeps; a testbed pod's first process, as Kubernetes' pause container.
//! - `app`: an HTTP/1.1 + h2c application stand-in (bookinfo's services), calling its upstreams per request.
//! - `http`: an HTTP client: N requests over C keep-alive connections, one JSON report.
//! - `load`: a load generator: POSTs at a fixed rate (open loop, as wrk2) or as fast as answered, on C
//!   keep-alive connections; one JSON line with latency percentiles and the rate achieved.
//!
//! `app` and `http` speak warren_testbed::app's types.
#[path = "testapp/app.rs"]
mod app;
#[path = "testapp/client.rs"]
mod client;
#[path = "testapp/load.rs"]
mod load;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "warren-testapp")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A server-first protocol (as SMTP or MySQL): each connection gets `220 <name> ready` before the
    /// client says anything, then an echo of each line.
    Banner {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
    },
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "v1")]
        version: String,
        #[arg(long, default_value_t = 7000)]
        echo_port: u16,
        #[arg(long, default_value_t = 8080)]
        http_port: u16,
        /// Also a sink on this port: reads each connection to its end, then answers the byte count it read
        /// (8 bytes, little endian) and closes — one-way throughput.
        #[arg(long)]
        sink_port: Option<u16>,
    },
    Send {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 65536)]
        bytes: u64,
        /// Open this many connections first (all open at once), then exchange `bytes` on each.
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// Pause this long halfway through sending (a long-lived connection).
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
    },
    /// Connect, exchange `bytes`, close — every `interval-ms` for `duration-ms`; one JSON line per attempt.
    Loop {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1024)]
        bytes: u64,
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
        #[arg(long)]
        duration_ms: u64,
    },
    HttpGet {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
    },
    /// `count` connections one after another — connect, echo `bytes`, close — and one JSON line with each
    /// one's time in µs, from `connect()` until the echo is back (`{"ok":true,"micros":[…]}`).
    /// [`Cmd::ConnectTimes`] that keeps going past failures: one JSON line
    /// `{"micros":[…],"refused":N,"failed":[…]}` — the times of the connections that worked, how many connects
    /// were refused (ECONNREFUSED), and every other failure.
    ConnectOutcomes {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 100)]
        count: usize,
        #[arg(long, default_value_t = 64)]
        bytes: usize,
    },
    ConnectTimes {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 100)]
        count: usize,
        #[arg(long, default_value_t = 64)]
        bytes: usize,
        /// Through this SOCKS5 proxy (a ztunnel's): greeting, CONNECT and the echo's bytes in one write.
        #[arg(long)]
        socks5: Option<SocketAddr>,
    },
    /// Connect, check a `bytes` echo, print `{"event":"connected",…}`; then keep the connection open
    /// (an echo of one byte every `probe-ms`, `{"event":"alive","probes":N}` every tenth; 0: none, the
    /// client only waits for its peer to speak) and print
    /// `{"event":"closed","at_ms",…}` when it ends, or `{"event":"open",…}` after `max-ms`.
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1024)]
        bytes: u64,
        #[arg(long, default_value_t = 50)]
        probe_ms: u64,
        #[arg(long, default_value_t = 60_000)]
        max_ms: u64,
    },
    /// Sleep until killed (a pod's pause process).
    Pause,
    /// An application stand-in on `port`: answers every path with a JSON echo of the request, after calling
    /// each `--call NAME=ADDRESS[,timeout_ms=N][,retries=N]` (`GET /NAME/0`, Host `NAME:PORT`).
    App {
        #[arg(long)]
        service: String,
        #[arg(long, default_value = "v1")]
        version: String,
        #[arg(long, default_value_t = warren_testbed::app::BOOKINFO_PORT)]
        port: u16,
        /// The pod's name, reported in answers (default: the service's).
        #[arg(long)]
        pod: Option<String>,
        #[arg(long = "call")]
        calls: Vec<String>,
        /// Timeout of each call attempt that does not give its own.
        #[arg(long, default_value_t = 10_000)]
        call_timeout_ms: u64,
        /// Retries of each call that does not give its own.
        #[arg(long, default_value_t = 0)]
        call_retries: u32,
        /// No line on stdout per request received.
        #[arg(long)]
        quiet: bool,
        /// Answer every N-th request with --fail-status (1: every request).
        #[arg(long, default_value_t = 0)]
        fail_every: u32,
        #[arg(long, default_value_t = 500)]
        fail_status: u16,
        /// Wait this long before every answer.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// `count` requests over `concurrency` keep-alive connections; prints one JSON report.
    Http {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value = "GET")]
        method: String,
        /// A request header, `name: value` (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        #[arg(long)]
        host: Option<String>,
        #[arg(long, default_value_t = 0)]
        body_bytes: usize,
        #[arg(long)]
        http2: bool,
        #[arg(long)]
        upgrade_websocket: bool,
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
    },
    /// `POST path` with a `body-bytes` body at `rps` a second (open loop; 0: closed loop, as fast as
    /// answered) on `connections` keep-alive connections, for `warm-up-ms` uncounted then `duration-ms`;
    /// prints `measuring`, `measured` around the counted part, then one JSON report (latency from each
    /// request's due time).
    Load {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        rps: u64,
        #[arg(long, default_value_t = 0)]
        warm_up_ms: u64,
        #[arg(long)]
        duration_ms: u64,
        #[arg(long, default_value_t = 4)]
        connections: usize,
        #[arg(long, default_value_t = 1024)]
        body_bytes: usize,
        #[arg(long)]
        http2: bool,
        #[arg(long)]
        host: Option<String>,
        #[arg(long, default_value = "/bytes/1024")]
        path: String,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// Open every connection through this SOCKS5 proxy (a ztunnel's).
        #[arg(long)]
        socks5: Option<SocketAddr>,
    },
}

fn main() -> ExitCode {
    raise_fd_limit();
    match Cli::parse().command {
        Cmd::Serve { name, version, echo_port, http_port, sink_port } => {
            if let Some(port) = sink_port {
                let sink = TcpListener::bind(("::", port)).unwrap_or_else(|e| panic!("bind :{port}: {e}"));
                std::thread::spawn(move || sink_connections(sink));
            }
            serve(name, version, echo_port, http_port)
        }
        Cmd::Send { to, bytes, connections: 1, hold_ms } => send(to, bytes, Duration::from_millis(hold_ms)),
        Cmd::Send { to, bytes, connections, .. } => send_concurrently(to, bytes, connections),
        Cmd::Loop { to, bytes, interval_ms, duration_ms } => connect_loop(to, bytes, interval_ms, duration_ms),
        Cmd::HttpGet { to, path } => http_get(to, &path),
        Cmd::ConnectTimes { to, count, bytes, socks5: None } => connect_times(to, count, bytes),
        Cmd::ConnectTimes { to, count, bytes, socks5: Some(proxy) } => connect_times_socks5(proxy, to, count, bytes),
        Cmd::ConnectOutcomes { to, count, bytes } => connect_outcomes(to, count, bytes),
        Cmd::Hold { to, bytes, probe_ms, max_ms } => hold(to, bytes, Duration::from_millis(probe_ms), Duration::from_millis(max_ms)),
        Cmd::Banner { name, port } => banner(&name, port),
        Cmd::Pause => loop {
            std::thread::park();
        },
        Cmd::App { service, version, port, pod, calls, call_timeout_ms, call_retries, quiet, fail_every, fail_status, delay_ms } => {
            let calls: Result<Vec<_>, _> = calls
                .iter()
                .map(|c| {
                    warren_testbed::app::Upstream::parse_arg(c, call_timeout_ms, call_retries)
                        .map_err(|e| format!("--call {c}: {e}"))
                })
                .collect();
            let calls = match calls {
                Ok(calls) => calls,
                Err(e) => {
                    eprintln!("warren-testapp app: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let pod = pod.unwrap_or_else(|| service.clone());
            let options = warren_testbed::app::AppOptions { service, version, port, calls, quiet, fail_every, fail_status, delay_ms };
            app::run(options, pod)
        }
        Cmd::Http {
            to,
            count,
            concurrency,
            path,
            method,
            headers,
            host,
            body_bytes,
            http2,
            upgrade_websocket,
            timeout_ms,
        } => {
            let mut parsed = vec![];
            for h in &headers {
                let Some((name, value)) = h.split_once(':') else {
                    eprintln!("warren-testapp http: -H {h:?}: expected 'name: value'");
                    return ExitCode::FAILURE;
                };
                parsed.push((name.trim().to_string(), value.trim().to_string()));
            }
            let requests = warren_testbed::app::HttpRequests {
                count,
                concurrency,
                method,
                path,
                headers: parsed,
                host,
                body_bytes,
                http2,
                upgrade_websocket,
                timeout_ms,
            };
            client::run(to, requests)
        }
        Cmd::Load { to, rps, warm_up_ms, duration_ms, connections, body_bytes, http2, host, path, timeout_ms, socks5 } => {
            if let Some(proxy) = socks5 {
                let _ = client::SOCKS5.set(proxy);
            }
            let load = warren_testbed::Load {
                rps,
                warm_up_ms,
                duration_ms,
                connections,
                body_bytes,
                http2,
                host,
                path,
                timeout_ms,
            };
            load::run(to, load)
        }
    }
}

fn serve(name: String, version: String, echo_port: u16, http_port: u16) -> ExitCode {
    // [::] is dual-stack: one listener for IPv4 and IPv6 clients.
    let bind = |port| TcpListener::bind(("::", port)).unwrap_or_else(|e| panic!("bind :{port}: {e}"));
    let (echo, http) = (bind(echo_port), bind(http_port));
    println!("ready");
    let _ = std::io::stdout().flush();
    std::thread::spawn(move || {
        for stream in echo.incoming().flatten() {
            // Small stacks, and a failed spawn (thread limits under a parallel test load) must not kill the
            // accept loop: dropping the listener would reset every connection still in its backlog.
            let mut stream = Some(stream);
            while let Some(s) = stream.take() {
                let cell = std::sync::Arc::new(std::sync::Mutex::new(Some(s)));
                let taken = cell.clone();
                let spawned = std::thread::Builder::new().stack_size(256 * 1024).spawn(move || {
                    if let Some(s) = taken.lock().unwrap().take() {
                        echo_connection(s)
                    }
                });
                if spawned.is_err() {
                    stream = cell.lock().unwrap().take();
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
        }
    });
    for stream in http.incoming().flatten() {
        let (name, version) = (name.clone(), version.clone());
        std::thread::spawn(move || http_connection(stream, &name, &version));
    }
    ExitCode::SUCCESS
}

/// Many connections at once need more than the default 1024 descriptors.
fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// An IPv4 client of a dual-stack listener shows as ::ffff:a.b.c.d; report it as IPv4.
fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().map_or(addr, |v4| SocketAddr::new(v4.into(), v6.port())),
        v4 => v4,
    }
}

/// A blocking read that retries spurious EAGAIN. On a socket that socket acceleration (sockmap) put in
/// the kernel's sockhash, a blocking reader woken without data — e.g. by its own socket's write-space
/// wakeup while another thread writes — gets EAGAIN instead of sleeping again. POSIX only allows EAGAIN
/// for a blocking read after SO_RCVTIMEO, so a retry is correct; `spurious` counts them. `deadline` is the
/// read timeout we set.
fn read_retrying(stream: &mut TcpStream, buf: &mut [u8], spurious: &mut u64, timeout: Duration) -> std::io::Result<usize> {
    let started = std::time::Instant::now();
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && started.elapsed() < timeout => {
                *spurious += 1;
                SPURIOUS_EAGAIN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                std::thread::yield_now();
            }
            other => return other,
        }
    }
}

fn sink_connections(listener: TcpListener) {
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || sink_connection(stream));
    }
}

fn sink_connection(mut stream: TcpStream) {
    let (mut buf, mut spurious, mut total) = (vec![0u8; 256 * 1024], 0, 0u64);
    loop {
        match read_retrying(&mut stream, &mut buf, &mut spurious, Duration::from_secs(3600)) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) => {
                eprintln!("sink: read: {e} ({:?})", e.kind());
                return;
            }
        }
    }
    let _ = stream.write_all(&total.to_le_bytes());
}

fn echo_connection(stream: TcpStream) {
    let mut reader = stream.try_clone().expect("clone");
    let mut writer = stream;
    let (mut buf, mut spurious) = (vec![0u8; 64 * 1024], 0);
    loop {
        match read_retrying(&mut reader, &mut buf, &mut spurious, Duration::from_secs(3600)) {
            Ok(0) => break,
            Ok(n) => {
                if let Err(e) = writer.write_all(&buf[..n]) {
                    eprintln!("echo: write: {e} ({:?})", e.kind());
                    break;
                }
            }
            Err(e) => {
                eprintln!("echo: read: {e} ({:?})", e.kind());
                break;
            }
        }
    }
    let _ = writer.shutdown(Shutdown::Write);
}

fn http_connection(stream: TcpStream, name: &str, version: &str) {
    let client = stream.peer_addr().map(|a| unmapped(a).to_string()).unwrap_or_default();
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
        line.clear();
    }
    let body = serde_json::json!({ "pod": name, "version": version, "client": client, "path": path }).to_string();
    let mut stream = stream;
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Deterministic byte stream: a cheap xorshift, so both ends can generate it without storing it.
struct Pattern(u64);
impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *b = self.0 as u8;
        }
    }
}

const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Spurious EAGAINs [`read_retrying`] retried in this process (reported by `send` as `spurious_eagain`).
static SPURIOUS_EAGAIN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One connection's exchange: stream `bytes` while reading the echo back; (received, first problem).
fn exchange(stream: TcpStream, bytes: u64) -> (u64, Option<String>) {
    exchange_holding(stream, bytes, Duration::ZERO)
}

/// [`exchange`] that pauses `hold` halfway through sending.
fn exchange_holding(stream: TcpStream, bytes: u64, hold: Duration) -> (u64, Option<String>) {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => return (0, Some(format!("clone: {e}"))),
    };
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut pattern, mut buf, mut left) = (Pattern(0x9e37_79b9_7f4a_7c15), vec![0u8; 64 * 1024], bytes);
        let mut held = hold.is_zero();
        while left > 0 {
            if !held && left <= bytes / 2 {
                std::thread::sleep(hold);
                held = true;
            }
            let n = left.min(buf.len() as u64) as usize;
            pattern.fill(&mut buf[..n]);
            writer.write_all(&buf[..n])?;
            left -= n as u64;
        }
        writer.shutdown(Shutdown::Write)
    });
    let (mut expected, mut want, mut got, mut received, mut problem) =
        (Pattern(0x9e37_79b9_7f4a_7c15), vec![0u8; 64 * 1024], vec![0u8; 64 * 1024], 0u64, None);
    let (mut reader, mut spurious) = (stream, 0);
    loop {
        match read_retrying(&mut reader, &mut got, &mut spurious, READ_TIMEOUT) {
            Ok(0) => break,
            Ok(n) => {
                expected.fill(&mut want[..n]);
                if problem.is_none() && want[..n] != got[..n] {
                    problem = Some(format!("echo differs within bytes {received}..{}", received + n as u64));
                }
                received += n as u64;
            }
            Err(e) => {
                problem.get_or_insert(format!("read: {e}"));
                break;
            }
        }
    }
    if let Ok(Err(e)) = sender.join() {
        problem.get_or_insert(format!("write: {e}"));
    }
    if problem.is_none() && received != bytes {
        problem = Some(format!("sent {bytes} bytes, {received} came back"));
    }
    (received, problem)
}

fn send_concurrently(to: SocketAddr, bytes: u64, connections: usize) -> ExitCode {
    let mut streams = Vec::with_capacity(connections);
    for i in 0..connections {
        match TcpStream::connect_timeout(&to, Duration::from_secs(10)) {
            Ok(s) => streams.push(s),
            Err(e) => {
                println!("{}", serde_json::json!({"ok": false, "connections": i, "error": format!("connect #{i}: {e}")}));
                return ExitCode::FAILURE;
            }
        }
    }
    // Every connection is open now; exchange on all of them from a pool of threads.
    let workers = 32.min(connections);
    let chunks: Vec<Vec<TcpStream>> = {
        let mut chunks: Vec<Vec<TcpStream>> = (0..workers).map(|_| vec![]).collect();
        for (i, s) in streams.into_iter().enumerate() {
            chunks[i % workers].push(s);
        }
        chunks
    };
    let handles: Vec<_> = chunks
        .into_iter()
        .map(|chunk| std::thread::spawn(move || chunk.into_iter().map(|s| exchange(s, bytes)).collect::<Vec<_>>()))
        .collect();
    let results: Vec<(u64, Option<String>)> = handles.into_iter().flat_map(|h| h.join().expect("worker")).collect();
    let failed: Vec<&String> = results.iter().filter_map(|(_, p)| p.as_ref()).collect();
    let received: u64 = results.iter().map(|(r, _)| r).sum();
    let ok = failed.is_empty() && results.len() == connections;
    println!(
        "{}",
        serde_json::json!({"ok": ok, "connections": connections, "sent": bytes * connections as u64, "received": received,
                            "failed": failed.len(), "error": failed.first(),
                            "spurious_eagain": SPURIOUS_EAGAIN.load(std::sync::atomic::Ordering::Relaxed)})
    );
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn connect_loop(to: SocketAddr, bytes: u64, interval_ms: u64, duration_ms: u64) -> ExitCode {
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_millis(duration_ms) {
        let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let record = match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
            Ok(stream) => {
                let peer = stream.peer_addr().ok().map(|a| a.to_string());
                let (received, problem) = exchange(stream, bytes);
                serde_json::json!({"at_ms": at, "ok": problem.is_none(), "peer": peer, "received": received, "error": problem})
            }
            Err(e) => serde_json::json!({"at_ms": at, "ok": false, "peer": null, "received": 0, "error": format!("connect: {e}")}),
        };
        println!("{record}");
        std::thread::sleep(Duration::from_millis(interval_ms));
    }
    ExitCode::SUCCESS
}

fn send(to: SocketAddr, bytes: u64, hold: Duration) -> ExitCode {
    let stream = match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            println!("{}", serde_json::json!({"ok": false, "sent": 0, "received": 0, "error": format!("connect {to}: {e}")}));
            return ExitCode::FAILURE;
        }
    };
    let local = stream.local_addr().ok().map(|a| a.to_string());
    let peer = stream.peer_addr().ok().map(|a| a.to_string());
    let (received, problem) = exchange_holding(stream, bytes, hold);
    let ok = problem.is_none();
    println!(
        "{}",
        serde_json::json!({"ok": ok, "sent": bytes, "received": received, "local": local, "peer": peer, "error": problem})
    );
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn connect_outcomes(to: SocketAddr, count: usize, bytes: usize) -> ExitCode {
    let (out, mut back) = (vec![0x5au8; bytes], vec![0u8; bytes]);
    let (mut micros, mut refused, mut failed) = (Vec::with_capacity(count), 0, Vec::new());
    for _ in 0..count {
        let started = std::time::Instant::now();
        let connected = TcpStream::connect_timeout(&to, Duration::from_secs(5));
        let mut stream = match connected {
            Ok(stream) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                refused += 1;
                continue;
            }
            Err(e) => {
                failed.push(format!("connect: {e}"));
                continue;
            }
        };
        let exchange = (|| -> std::io::Result<()> {
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream.write_all(&out)?;
            stream.read_exact(&mut back)
        })();
        match exchange {
            Ok(()) if back == out => micros.push(started.elapsed().as_micros() as u64),
            Ok(()) => failed.push("echo differs".into()),
            Err(e) => failed.push(format!("echo: {e}")),
        }
    }
    println!("{}", serde_json::json!({"micros": micros, "refused": refused, "failed": failed}));
    ExitCode::SUCCESS
}

fn connect_times(to: SocketAddr, count: usize, bytes: usize) -> ExitCode {
    let (out, mut back) = (vec![0x5au8; bytes], vec![0u8; bytes]);
    let mut micros = Vec::with_capacity(count);
    for i in 0..count {
        let mut one = || -> std::io::Result<Duration> {
            let started = std::time::Instant::now();
            let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream.write_all(&out)?;
            stream.read_exact(&mut back)?;
            Ok(started.elapsed())
        };
        match one() {
            Ok(took) if back == out => micros.push(took.as_micros() as u64),
            Ok(_) => {
                println!("{}", serde_json::json!({"ok": false, "done": i, "error": "echo differs"}));
                return ExitCode::FAILURE;
            }
            Err(e) => {
                println!("{}", serde_json::json!({"ok": false, "done": i, "error": format!("connection {i} to {to}: {e}")}));
                return ExitCode::FAILURE;
            }
        }
    }
    println!("{}", serde_json::json!({"ok": true, "micros": micros}));
    ExitCode::SUCCESS
}

/// [`connect_times`] through a SOCKS5 proxy: each connection writes the greeting, the CONNECT and the echo's
/// bytes at once (as a client's first write to a transparent proxy), then reads the two replies and the echo.
fn connect_times_socks5(proxy: SocketAddr, to: SocketAddr, count: usize, bytes: usize) -> ExitCode {
    let out = vec![0x5au8; bytes];
    let mut first = warren_testbed::ztunnel::socks5_request(to);
    first.extend_from_slice(&out);
    let mut back = vec![0u8; bytes];
    let mut micros = Vec::with_capacity(count);
    for i in 0..count {
        let mut one = || -> anyhow::Result<Duration> {
            let started = std::time::Instant::now();
            let mut stream = TcpStream::connect_timeout(&proxy, Duration::from_secs(5))?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream.write_all(&first)?;
            warren_testbed::ztunnel::read_socks5_reply(&mut stream, to)?;
            stream.read_exact(&mut back)?;
            Ok(started.elapsed())
        };
        match one() {
            Ok(took) if back == out => micros.push(took.as_micros() as u64),
            Ok(_) => {
                println!("{}", serde_json::json!({"ok": false, "done": i, "error": "echo differs"}));
                return ExitCode::FAILURE;
            }
            Err(e) => {
                println!("{}", serde_json::json!({"ok": false, "done": i, "error": format!("connection {i} to {to} via {proxy}: {e:#}")}));
                return ExitCode::FAILURE;
            }
        }
    }
    println!("{}", serde_json::json!({"ok": true, "micros": micros}));
    ExitCode::SUCCESS
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

fn hold(to: SocketAddr, bytes: u64, probe: Duration, max: Duration) -> ExitCode {
    let mut stream = match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            println!("{}", serde_json::json!({"event": "closed", "at_ms": unix_ms(), "connected": false, "error": format!("connect {to}: {e}")}));
            return ExitCode::FAILURE;
        }
    };
    let local = stream.local_addr().ok().map(|a| a.to_string());
    let _ = stream.set_nodelay(true);
    // The opening echo: proof that the connection reached the server.
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let (mut pattern, mut out, mut back) = (Pattern(0x9e37_79b9_7f4a_7c15), vec![0u8; bytes as usize], vec![0u8; bytes as usize]);
    pattern.fill(&mut out);
    let echoed = match stream.write_all(&out).and_then(|()| stream.read_exact(&mut back)) {
        Ok(()) if out == back => Ok(()),
        Ok(()) => Err("echo differs".to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = echoed {
        println!("{}", serde_json::json!({"event": "closed", "at_ms": unix_ms(), "connected": false, "local": local, "error": e}));
        return ExitCode::FAILURE;
    }
    println!("{}", serde_json::json!({"event": "connected", "at_ms": unix_ms(), "local": local}));
    let _ = std::io::stdout().flush();
    // Always blocked in a read (so the peer's FIN or RST shows at once), writing a one-byte probe every
    // `probe` whose echo shows the connection still carries data; with no probe (0), an idle client that
    // waits for its peer to speak.
    let probing = !probe.is_zero();
    let _ = stream.set_read_timeout(Some(if probing { probe } else { Duration::from_millis(100) }));
    let started = std::time::Instant::now();
    let (mut byte, mut probes, mut outstanding) = ([0u8; 1], 0u64, false);
    let mut last_probe = started - probe;
    let closed = |probes: u64, error: String| {
        println!("{}", serde_json::json!({"event": "closed", "at_ms": unix_ms(), "connected": true, "probes": probes, "error": error}));
        ExitCode::SUCCESS
    };
    while started.elapsed() < max {
        if probing && !outstanding && last_probe.elapsed() >= probe {
            if let Err(e) = stream.write_all(b"p") {
                return closed(probes, format!("write: {e}"));
            }
            (outstanding, last_probe) = (true, std::time::Instant::now());
        }
        match stream.read(&mut byte) {
            Ok(0) => return closed(probes, "eof".into()),
            Ok(_) => {
                (probes, outstanding) = (probes + 1, false);
                if probes % 10 == 0 {
                    println!("{}", serde_json::json!({"event": "alive", "at_ms": unix_ms(), "probes": probes}));
                    let _ = std::io::stdout().flush();
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return closed(probes, format!("read: {e}")),
        }
    }
    println!("{}", serde_json::json!({"event": "open", "at_ms": unix_ms(), "probes": probes}));
    ExitCode::SUCCESS
}

fn http_get(to: SocketAddr, path: &str) -> ExitCode {
    let run = || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(stream, "GET {path} HTTP/1.1\r\nhost: {to}\r\nconnection: close\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or(response))
    };
    match run() {
        Ok(body) => {
            println!("{body}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("warren-testapp: GET http://{to}{path}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn banner(name: &str, port: u16) -> ExitCode {
    let listener = match TcpListener::bind(("::", port)) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("warren-testapp: banner on {port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("ready");
    for stream in listener.incoming().flatten() {
        let greeting = format!("220 {name} ready\r\n");
        std::thread::spawn(move || {
            let mut writer = stream;
            if writer.write_all(greeting.as_bytes()).is_err() {
                return;
            }
            let Ok(reader) = writer.try_clone() else { return };
            for line in BufReader::new(reader).lines().map_while(Result::ok) {
                if writeln!(writer, "{line}").is_err() {
                    break;
                }
            }
        });
    }
    ExitCode::SUCCESS
}
