//! `warren-testapp http`: `count` requests over `concurrency` keep-alive connections, one JSON line with
//! every result (warren_testbed::app::HttpReport).
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warren_testbed::app::{HttpReport, HttpRequests, HttpResult, websocket_accept};

use crate::app::{header_map, parse_body, version_text};

/// The client's `Sec-WebSocket-Key` (any 16 bytes in base64).
const WEBSOCKET_KEY: &str = "d2FycmVuLXRlc3RhcHAtd3M=";

/// One connection's request sender.
pub enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

pub fn run(to: SocketAddr, requests: HttpRequests) -> std::process::ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let report = runtime.block_on(send_all(to, Arc::new(requests)));
    println!("{}", serde_json::to_string(&report).unwrap_or_default());
    std::process::ExitCode::SUCCESS
}

async fn send_all(to: SocketAddr, requests: Arc<HttpRequests>) -> HttpReport {
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..requests.concurrency.clamp(1, requests.count.max(1)))
        .map(|_| {
            let (requests, next) = (requests.clone(), next.clone());
            tokio::spawn(async move {
                let mut sender: Option<Sender> = None;
                let mut done = vec![];
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= requests.count {
                        return done;
                    }
                    done.push((index, one(to, &requests, index, &mut sender).await));
                }
            })
        })
        .collect();
    let mut results = vec![];
    for worker in workers {
        results.extend(worker.await.unwrap_or_default());
    }
    results.sort_by_key(|(index, _)| *index);
    let results: Vec<HttpResult> = results.into_iter().map(|(_, r)| r).collect();
    let mut errors: BTreeMap<&str, usize> = BTreeMap::new();
    for error in results.iter().filter_map(|r| r.error.as_deref()) {
        *errors.entry(error).or_default() += 1;
    }
    let errors = errors.into_iter().map(|(e, n)| format!("{n}× {e}")).collect();
    HttpReport { results, errors }
}

/// A SOCKS5 proxy (`load --socks5`) that [`connect`] opens every connection through.
pub static SOCKS5: std::sync::OnceLock<SocketAddr> = std::sync::OnceLock::new();

/// A TCP connection to `to`, through the [`SOCKS5`] proxy when one is set (handshake done).
async fn tcp_connect(to: SocketAddr) -> Result<tokio::net::TcpStream, String> {
    let Some(proxy) = SOCKS5.get() else {
        return tokio::net::TcpStream::connect(to).await.map_err(|e| format!("connect: {e}"));
    };
    let mut stream = tokio::net::TcpStream::connect(proxy).await.map_err(|e| format!("connect: SOCKS5 {proxy}: {e}"))?;
    stream.write_all(&warren_testbed::ztunnel::socks5_request(to)).await.map_err(|e| format!("connect: SOCKS5: {e}"))?;
    // Method choice (2 bytes) and the CONNECT reply's head (4), then its bound address and port.
    let mut head = [0u8; 6];
    stream.read_exact(&mut head).await.map_err(|e| format!("connect: SOCKS5 reply: {e}"))?;
    let rest = match head[5] {
        1 => 6,
        4 => 18,
        other => return Err(format!("connect: SOCKS5 reply {head:?} (address type {other})")),
    };
    let mut bound = vec![0u8; rest];
    stream.read_exact(&mut bound).await.map_err(|e| format!("connect: SOCKS5 reply: {e}"))?;
    let mut whole = head.to_vec();
    whole.extend_from_slice(&bound);
    warren_testbed::ztunnel::read_socks5_reply(&mut whole.as_slice(), to).map_err(|e| format!("connect: {e:#}"))?;
    Ok(stream)
}

pub async fn connect(to: SocketAddr, http2: bool, upgrades: bool) -> Result<Sender, String> {
    let stream = tcp_connect(to).await?;
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    if http2 {
        let (sender, connection) =
            http2::handshake(TokioExecutor::new(), io).await.map_err(|e| format!("connect: h2 handshake: {e}"))?;
        tokio::spawn(connection);
        Ok(Sender::H2(sender))
    } else {
        let (sender, connection) = http1::handshake(io).await.map_err(|e| format!("connect: handshake: {e}"))?;
        if upgrades {
            tokio::spawn(connection.with_upgrades());
        } else {
            tokio::spawn(connection);
        }
        Ok(Sender::H1(sender))
    }
}

fn failed(error: String, started: Instant) -> HttpResult {
    HttpResult {
        status: 0,
        error: Some(error),
        latency_us: started.elapsed().as_micros() as u64,
        version: String::new(),
        headers: BTreeMap::new(),
        trailers: BTreeMap::new(),
        body: serde_json::Value::Null,
    }
}

/// One request (on the worker's connection, opened again when it broke), within the timeout.
async fn one(to: SocketAddr, requests: &HttpRequests, index: usize, sender: &mut Option<Sender>) -> HttpResult {
    let started = Instant::now();
    let timeout = Duration::from_millis(requests.timeout_ms);
    match tokio::time::timeout(timeout, exchange(to, requests, index, sender, started)).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => {
            *sender = None;
            failed(e, started)
        }
        Err(_) => {
            // The connection may still carry the late response: a new one for the next request.
            *sender = None;
            failed("timeout".into(), started)
        }
    }
}

async fn exchange(
    to: SocketAddr,
    requests: &HttpRequests,
    index: usize,
    sender: &mut Option<Sender>,
    started: Instant,
) -> Result<HttpResult, String> {
    let usable = match sender {
        Some(Sender::H1(s)) => !s.is_closed(),
        Some(Sender::H2(s)) => !s.is_closed(),
        None => false,
    };
    // An upgrade consumes its connection.
    if !usable || requests.upgrade_websocket {
        *sender = Some(connect(to, requests.http2, requests.upgrade_websocket).await?);
    }
    let host = requests.host.clone().unwrap_or_else(|| to.to_string());
    let uri = if requests.http2 { format!("http://{host}{}", requests.path) } else { requests.path.clone() };
    let mut request = Request::builder().method(requests.method.as_str()).uri(uri);
    if !requests.http2 {
        request = request.header(header::HOST, host.as_str());
    }
    for (name, value) in &requests.headers {
        request = request.header(name.as_str(), value.as_str());
    }
    if requests.upgrade_websocket {
        request = request
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", WEBSOCKET_KEY);
    }
    let body = Full::new(Bytes::from(vec![b'x'; requests.body_bytes]));
    let request = request.body(body).map_err(|e| format!("request: {e}"))?;
    let response = match sender.as_mut().expect("connected") {
        Sender::H1(s) => {
            s.ready().await.map_err(|e| format!("request: {e}"))?;
            s.send_request(request).await
        }
        Sender::H2(s) => {
            s.ready().await.map_err(|e| format!("request: {e}"))?;
            s.send_request(request).await
        }
    }
    .map_err(|e| format!("request: {e}"))?;
    let (status, version) = (response.status().as_u16(), version_text(response.version()));
    let headers = header_map(response.headers());
    if status == 101 && requests.upgrade_websocket {
        let accept = headers.get("sec-websocket-accept").map(String::as_str);
        if accept != Some(websocket_accept(WEBSOCKET_KEY).as_str()) {
            return Err(format!("upgrade: sec-websocket-accept {accept:?} does not answer the key"));
        }
        let upgraded = hyper::upgrade::on(response).await.map_err(|e| format!("upgrade: {e}"))?;
        let mut io = TokioIo::new(upgraded);
        let message = format!("warren-testapp upgraded echo #{index}");
        io.write_all(message.as_bytes()).await.map_err(|e| format!("upgraded write: {e}"))?;
        let mut back = vec![0u8; message.len()];
        io.read_exact(&mut back).await.map_err(|e| format!("upgraded read: {e}"))?;
        *sender = None;
        let latency_us = started.elapsed().as_micros() as u64;
        let body = serde_json::Value::String(String::from_utf8_lossy(&back).into_owned());
        return Ok(HttpResult { status, error: None, latency_us, version, headers, trailers: BTreeMap::new(), body });
    }
    let collected = response.into_body().collect().await.map_err(|e| format!("body: {e}"))?;
    let trailers = collected.trailers().map(header_map).unwrap_or_default();
    let body = parse_body(&collected.to_bytes());
    let latency_us = started.elapsed().as_micros() as u64;
    Ok(HttpResult { status, error: None, latency_us, version, headers, trailers, body })
}
