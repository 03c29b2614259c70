//! `warren-testapp app`: a mesh application stand-in (see warren_testbed::app for what it answers).
use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    io::Write,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use warren_testbed::app::{AppOptions, AppResponse, CallRecord, PROPAGATED_HEADERS, ReceivedRequest, Upstream};

/// A body of frames known up front: data, then maybe trailers.
pub struct Frames(pub VecDeque<Frame<Bytes>>);

impl Frames {
    pub fn data(bytes: impl Into<Bytes>) -> Frames {
        Frames(VecDeque::from([Frame::data(bytes.into())]))
    }
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        match (self.0.len(), self.0.front().and_then(|f| f.data_ref())) {
            (0, _) => SizeHint::with_exact(0),
            (1, Some(data)) => SizeHint::with_exact(data.len() as u64),
            _ => SizeHint::default(),
        }
    }
}

struct App {
    options: AppOptions,
    pod: String,
    client: Client<HttpConnector, Empty<Bytes>>,
    /// Requests counted for `fail_every`.
    served: std::sync::atomic::AtomicU64,
}

pub fn run(options: AppOptions, pod: String) -> std::process::ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async move {
        // [::] is dual-stack: IPv4 and IPv6 clients.
        let listener = match tokio::net::TcpListener::bind(("::", options.port)).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("warren-testapp app: bind :{}: {e}", options.port);
                return std::process::ExitCode::FAILURE;
            }
        };
        // Bookinfo's apps keep their upstream connections alive (a pool per upstream).
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(90)).build(connector);
        let app = Arc::new(App { options, pod, client, served: Default::default() });
        println!("ready");
        let _ = std::io::stdout().flush();
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            let app = app.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let app = app.clone();
                    async move { Ok::<_, Infallible>(app.handle(request).await) }
                });
                let builder = auto::Builder::new(TokioExecutor::new());
                if let Err(e) = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await {
                    eprintln!("warren-testapp app: connection: {e}");
                }
            });
        }
    })
}

/// Every header, lower-case, repeated ones joined with `, `.
pub fn header_map(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        map.entry(name.as_str().to_string()).and_modify(|v| *v = format!("{v}, {value}")).or_insert(value);
    }
    map
}

fn version_name(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

pub fn version_text(version: http::Version) -> String {
    version_name(version).to_string()
}

fn propagated(name: &str) -> bool {
    PROPAGATED_HEADERS.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == *p,
    })
}

fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response<Frames> {
    let body = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Frames::data(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The largest `/bytes/N` answer.
const MAX_BYTES: usize = 16 << 20;

/// `size` bytes of `x` (a payload of a known size, as load generators ask for).
fn bytes_response(size: usize) -> Response<Frames> {
    let mut response = Response::new(Frames::data(vec![b'x'; size]));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    response
}

impl App {
    async fn handle(&self, request: Request<Incoming>) -> Response<Frames> {
        let path = request.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| request.uri().authority().map(|a| a.to_string()))
            .unwrap_or_default();
        let headers = header_map(request.headers());
        let received = ReceivedRequest {
            event: "request".into(),
            method: request.method().to_string(),
            path: path.clone(),
            host: host.clone(),
            version: version_text(request.version()),
            headers: headers.clone(),
        };
        // One line per request, whole (println! holds stdout's lock for the line).
        if !self.options.quiet {
            println!("{}", serde_json::to_string(&received).unwrap_or_default());
        }

        let grpc = headers.get("content-type").is_some_and(|c| c.starts_with("application/grpc"));
        if grpc {
            return self.grpc(request).await;
        }
        if headers.get("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket")) {
            return upgrade(request);
        }
        let method = request.method().to_string();
        // The request body is read (and dropped) before answering, as a real app would.
        let _ = request.into_body().collect().await;

        let mut answer = AppResponse {
            service: self.options.service.clone(),
            version: self.options.version.clone(),
            pod: self.pod.clone(),
            method,
            path: path.clone(),
            host,
            headers,
            calls: vec![],
        };
        let bare = path.split('?').next().unwrap_or("");
        if let Some(size) = bare.strip_prefix("/bytes/") {
            return match size.parse::<usize>() {
                Ok(size) if size <= MAX_BYTES => bytes_response(size),
                _ => json_response(StatusCode::BAD_REQUEST, &answer),
            };
        }
        if !bare.starts_with("/status/") {
            if self.options.delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(self.options.delay_ms)).await;
            }
            let n = self.served.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if self.options.fail_every > 0 && n % u64::from(self.options.fail_every) == 0 {
                let status = StatusCode::from_u16(self.options.fail_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return json_response(status, &answer);
            }
        }
        if let Some(code) = bare.strip_prefix("/status/") {
            let status = code.parse().ok().and_then(|c| StatusCode::from_u16(c).ok());
            let status = status.unwrap_or(StatusCode::BAD_REQUEST);
            return json_response(status, &answer);
        }
        let delay = bare.strip_prefix("/delay/").map(str::to_string).or_else(|| {
            let query = path.split_once('?')?.1;
            query.split('&').find_map(|kv| kv.strip_prefix("delay_ms=")).map(str::to_string)
        });
        if let Some(ms) = delay {
            match ms.parse() {
                Ok(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                Err(_) => return json_response(StatusCode::BAD_REQUEST, &answer),
            }
        }
        let forward: Vec<(String, String)> =
            answer.headers.iter().filter(|(k, _)| propagated(k)).map(|(k, v)| (k.clone(), v.clone())).collect();
        for upstream in &self.options.calls {
            answer.calls.push(self.call(upstream, &forward).await);
        }
        json_response(StatusCode::OK, &answer)
    }

    /// `GET /<name>/0` at the upstream, attempts until one succeeds or retries run out.
    async fn call(&self, upstream: &Upstream, forward: &[(String, String)]) -> CallRecord {
        let started = Instant::now();
        let mut record = CallRecord {
            name: upstream.name.clone(),
            status: None,
            error: None,
            latency_ms: 0,
            attempts: 0,
            body: None,
        };
        while record.attempts <= upstream.retries {
            record.attempts += 1;
            let timeout = Duration::from_millis(upstream.timeout_ms);
            let outcome = tokio::time::timeout(timeout, self.attempt(upstream, forward)).await;
            (record.status, record.error, record.body) = match outcome {
                Ok(Ok((status, body))) => (Some(status), None, Some(body)),
                Ok(Err(e)) => (None, Some(e), None),
                Err(_) => (None, Some("timeout".into()), None),
            };
            if record.status.is_some_and(|s| s < 500) {
                break;
            }
        }
        record.latency_ms = started.elapsed().as_millis() as u64;
        record
    }

    async fn attempt(
        &self,
        upstream: &Upstream,
        forward: &[(String, String)],
    ) -> Result<(u16, serde_json::Value), String> {
        let uri = format!("http://{}/{}/0", upstream.address, upstream.name);
        let host = format!("{}:{}", upstream.name, upstream.address.port());
        let mut request = Request::get(uri).header(header::HOST, host);
        for (name, value) in forward {
            request = request.header(name.as_str(), value.as_str());
        }
        let request = request.body(Empty::new()).map_err(|e| format!("request: {e}"))?;
        let response = self.client.request(request).await.map_err(|e| {
            // The whole chain: "client error (Connect): tcp connect error: Connection refused (os error 111)".
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text = format!("{text}: {s}");
                source = s.source();
            }
            if e.is_connect() { format!("connect: {text}") } else { format!("request: {text}") }
        })?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
        Ok((status, parse_body(&body)))
    }

    /// A unary gRPC echo: the request's first message back, `grpc-status` from `x-grpc-status` (else 0).
    async fn grpc(&self, request: Request<Incoming>) -> Response<Frames> {
        let code = request.headers().get("x-grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("0").to_string();
        let mut body = match request.into_body().collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => Bytes::new(),
        };
        // The first length-prefixed message (flag byte, u32 length), whole.
        let message = if body.len() >= 5 {
            let length = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
            body.advance(5);
            body.slice(..length.min(body.len()))
        } else {
            Bytes::new()
        };
        let mut framed = Vec::with_capacity(message.len() + 5);
        framed.push(0);
        framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
        framed.extend_from_slice(&message);
        let mut trailers = HeaderMap::new();
        let value = |s: &str| HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("?"));
        trailers.insert("grpc-status", value(&code));
        trailers.insert("x-echo-service", value(&self.options.service));
        trailers.insert("x-echo-version", value(&self.options.version));
        let frames = Frames(VecDeque::from([Frame::data(Bytes::from(framed)), Frame::trailers(trailers)]));
        let mut response = Response::new(frames);
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        response
    }
}

/// Answers 101 (with the handshake's `Sec-WebSocket-Accept`) and echoes whatever bytes arrive on the
/// upgraded connection, as they come (no WebSocket framing: enough to show an upgrade went through).
fn upgrade(request: Request<Incoming>) -> Response<Frames> {
    let key = request.headers().get("sec-websocket-key").and_then(|k| k.to_str().ok()).unwrap_or("").to_string();
    tokio::spawn(async move {
        match hyper::upgrade::on(request).await {
            Ok(upgraded) => {
                let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            }
            Err(e) => eprintln!("warren-testapp app: upgrade: {e}"),
        }
    });
    let mut response = Response::new(Frames(VecDeque::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    if let Ok(accept) = HeaderValue::from_str(&warren_testbed::app::websocket_accept(&key)) {
        response.headers_mut().insert("sec-websocket-accept", accept);
    }
    response.headers_mut().insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    response
}

/// JSON when it parses, else (lossy) text.
pub fn parse_body(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(body).into_owned()))
}
