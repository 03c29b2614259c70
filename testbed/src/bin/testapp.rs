//! warren-testapp: the workload inside testbed pods.
//!
//! - `serve`: TCP echo on 7000 and HTTP on 8080; HTTP answers `{"pod", "version", "client", "path"}`.
//! - `send`: streams N pseudo-random bytes to an echo server while reading them back, and reports (JSON)
//!   whether every byte returned in order.
//! - `http-get`: one request, prints the body.
//! - `pause`: sleeps; a testbed pod's first process, as Kubernetes' pause container.
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
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "v1")]
        version: String,
        #[arg(long, default_value_t = 7000)]
        echo_port: u16,
        #[arg(long, default_value_t = 8080)]
        http_port: u16,
    },
    Send {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 65536)]
        bytes: u64,
    },
    HttpGet {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
    },
    /// Sleep until killed (a pod's pause process).
    Pause,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Serve { name, version, echo_port, http_port } => serve(name, version, echo_port, http_port),
        Cmd::Send { to, bytes } => send(to, bytes),
        Cmd::HttpGet { to, path } => http_get(to, &path),
        Cmd::Pause => loop {
            std::thread::park();
        },
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
            std::thread::spawn(move || echo_connection(stream));
        }
    });
    for stream in http.incoming().flatten() {
        let (name, version) = (name.clone(), version.clone());
        std::thread::spawn(move || http_connection(stream, &name, &version));
    }
    ExitCode::SUCCESS
}

/// An IPv4 client of a dual-stack listener shows as ::ffff:a.b.c.d; report it as IPv4.
fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().map_or(addr, |v4| SocketAddr::new(v4.into(), v6.port())),
        v4 => v4,
    }
}

fn echo_connection(stream: TcpStream) {
    let mut reader = stream.try_clone().expect("clone");
    let mut writer = stream;
    let _ = std::io::copy(&mut reader, &mut writer);
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

fn send(to: SocketAddr, bytes: u64) -> ExitCode {
    let report = |ok: bool, sent: u64, received: u64, local: Option<String>, peer: Option<String>, error: Option<String>| {
        println!("{}", serde_json::json!({"ok": ok, "sent": sent, "received": received, "local": local, "peer": peer, "error": error}));
        if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
    };
    let stream = match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => return report(false, 0, 0, None, None, Some(format!("connect {to}: {e}"))),
    };
    let local = stream.local_addr().ok().map(|a| a.to_string());
    let peer = stream.peer_addr().ok().map(|a| a.to_string());
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut writer = stream.try_clone().expect("clone");
    let sender = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut pattern, mut buf, mut left) = (Pattern(0x9e37_79b9_7f4a_7c15), vec![0u8; 64 * 1024], bytes);
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            pattern.fill(&mut buf[..n]);
            writer.write_all(&buf[..n])?;
            left -= n as u64;
        }
        writer.shutdown(Shutdown::Write)?;
        Ok(bytes)
    });
    let (mut expected, mut want, mut got, mut received, mut mismatch) =
        (Pattern(0x9e37_79b9_7f4a_7c15), vec![0u8; 64 * 1024], vec![0u8; 64 * 1024], 0u64, None);
    let mut reader = stream;
    loop {
        match reader.read(&mut got) {
            Ok(0) => break,
            Ok(n) => {
                expected.fill(&mut want[..n]);
                if mismatch.is_none() && want[..n] != got[..n] {
                    mismatch = Some(format!("echo differs within bytes {received}..{}", received + n as u64));
                }
                received += n as u64;
            }
            Err(e) => {
                mismatch.get_or_insert(format!("read: {e}"));
                break;
            }
        }
    }
    let sent = match sender.join().expect("sender thread") {
        Ok(n) => n,
        Err(e) => return report(false, 0, received, local, peer, Some(format!("write: {e}"))),
    };
    let ok = mismatch.is_none() && received == sent;
    let error = mismatch.or_else(|| (received != sent).then(|| format!("sent {sent} bytes, {received} came back")));
    report(ok, sent, received, local, peer, error)
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
