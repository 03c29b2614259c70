//! `warren-testapp load`: HTTP load at a fixed rate, open loop as wrk2 and fortio run it, or closed loop as
//! fast as answers come; one JSON line at the end (warren_testbed::app::LoadReport). What it sends and how
//! latency is counted: warren_testbed::app::Load.
use std::{
    collections::BTreeMap,
    io::Write,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderValue, Request, header};
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;
use warren_testbed::app::{Load, LoadReport};

use crate::client::{Sender, connect};

/// One request: when it was due, when the generator handed it to its connection, when its answer ended
/// (or why there was none).
struct Sample {
    due: Instant,
    dispatched: Instant,
    end: Instant,
    outcome: Result<(), String>,
}

struct Shared {
    to: SocketAddr,
    load: Load,
    body: Bytes,
    host: String,
    samples: Mutex<Vec<Sample>>,
}

impl Shared {
    fn record(&self, due: Instant, dispatched: Instant, outcome: Result<(), String>) {
        let sample = Sample { due, dispatched, end: Instant::now(), outcome };
        self.samples.lock().unwrap().push(sample);
    }

    fn request(&self) -> Result<Request<Full<Bytes>>, String> {
        let load = &self.load;
        let uri = if load.http2 { format!("http://{}{}", self.host, load.path) } else { load.path.clone() };
        let mut request = Request::post(uri).header(header::CONTENT_TYPE, "application/octet-stream");
        if !load.http2 {
            let host = HeaderValue::from_str(&self.host).map_err(|e| format!("request: host: {e}"))?;
            request = request.header(header::HOST, host);
        }
        request.body(Full::new(self.body.clone())).map_err(|e| format!("request: {e}"))
    }

    fn deadline(&self, due: Instant) -> tokio::time::Instant {
        tokio::time::Instant::from_std(due + Duration::from_millis(self.load.timeout_ms))
    }
}

pub fn run(to: SocketAddr, load: Load) -> std::process::ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    match runtime.block_on(generate(to, load)) {
        Ok(report) => {
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("warren-testapp load: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn generate(to: SocketAddr, load: Load) -> Result<LoadReport, String> {
    if load.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    let host = load.host.clone().unwrap_or_else(|| to.to_string());
    let body = Bytes::from(vec![b'x'; load.body_bytes]);
    let mut senders = Vec::with_capacity(load.connections);
    for _ in 0..load.connections {
        senders.push(connect(to, load.http2, false).await?);
    }
    let shared = Arc::new(Shared { to, load, body, host, samples: Mutex::new(vec![]) });
    let counted_from = if shared.load.rps == 0 {
        closed_loop(shared.clone(), senders).await
    } else {
        open_loop(shared.clone(), senders).await
    };
    let samples = std::mem::take(&mut *shared.samples.lock().unwrap());
    Ok(report(&samples, counted_from))
}

/// Request *i* due at *start + i/rps*, on connection *i mod connections*; returns when the counted part
/// began.
async fn open_loop(shared: Arc<Shared>, senders: Vec<Sender>) -> Instant {
    let load = &shared.load;
    let interval_ns = 1_000_000_000 / load.rps;
    let warm_up = load.warm_up_ms * load.rps / 1000;
    let total = warm_up + load.duration_ms * load.rps / 1000;
    let start = Instant::now() + Duration::from_millis(10);
    let due = move |i: u64| start + Duration::from_nanos(interval_ns * i);
    let mut queues = Vec::with_capacity(senders.len());
    let mut connections = Vec::with_capacity(senders.len());
    for sender in senders {
        let (queue, requests) = mpsc::unbounded_channel();
        queues.push(queue);
        connections.push(tokio::spawn(connection(shared.clone(), sender, requests)));
    }
    // Due times kept by a thread of its own: a thread's sleep wakes within tens of µs, tokio's timer in
    // 1 ms ticks — as long as what is measured.
    let schedule = tokio::task::spawn_blocking(move || {
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
        for i in 0..total {
            let due = due(i);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if i == warm_up {
                say("measuring");
            }
            let _ = queues[(i % queues.len() as u64) as usize].send((due, Instant::now()));
        }
        say("measured");
    });
    let _ = schedule.await;
    for connection in connections {
        let _ = connection.await;
    }
    due(warm_up)
}

/// One connection's requests, as they come due. HTTP/1.1: one at a time (a request waits for the answer
/// to the one before); HTTP/2: each on a stream of its own, at once.
async fn connection(
    shared: Arc<Shared>,
    sender: Sender,
    mut requests: mpsc::UnboundedReceiver<(Instant, Instant)>,
) {
    let mut slot = Some(sender);
    let mut streams = tokio::task::JoinSet::new();
    while let Some((due, dispatched)) = requests.recv().await {
        if !shared.load.http2 {
            let outcome = on_connection(&shared, &mut slot, due).await;
            shared.record(due, dispatched, outcome);
            continue;
        }
        if !usable(&slot) {
            match connect(shared.to, true, false).await {
                Ok(sender) => slot = Some(sender),
                Err(e) => {
                    shared.record(due, dispatched, Err(e));
                    continue;
                }
            }
        }
        let Some(Sender::H2(sender)) = &slot else { unreachable!("an HTTP/2 connection") };
        let mut stream = Sender::H2(sender.clone());
        let shared = shared.clone();
        streams.spawn(async move {
            let outcome = match tokio::time::timeout_at(shared.deadline(due), exchange(&shared, &mut stream)).await {
                Ok(outcome) => outcome,
                Err(_) => Err("timeout".into()),
            };
            shared.record(due, dispatched, outcome);
        });
    }
    while streams.join_next().await.is_some() {}
}

fn usable(slot: &Option<Sender>) -> bool {
    match slot {
        Some(Sender::H1(s)) => !s.is_closed(),
        Some(Sender::H2(s)) => !s.is_closed(),
        None => false,
    }
}

/// One request on the connection in `slot` (opened again when it broke), by `due` + the timeout; a
/// connection that failed or timed out is dropped (a late answer may still come on it).
async fn on_connection(shared: &Shared, slot: &mut Option<Sender>, due: Instant) -> Result<(), String> {
    let attempt = async {
        if !usable(slot) {
            *slot = Some(connect(shared.to, shared.load.http2, false).await?);
        }
        exchange(shared, slot.as_mut().expect("connected")).await
    };
    let outcome = match tokio::time::timeout_at(shared.deadline(due), attempt).await {
        Ok(outcome) => outcome,
        Err(_) => Err("timeout".into()),
    };
    if outcome.is_err() {
        *slot = None;
    }
    outcome
}

/// Sends one request and reads its whole answer; a status other than 2xx is an error.
async fn exchange(shared: &Shared, sender: &mut Sender) -> Result<(), String> {
    let request = shared.request()?;
    let response = match sender {
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
    let status = response.status();
    response.into_body().collect().await.map_err(|e| format!("body: {e}"))?;
    if !status.is_success() {
        return Err(format!("status {}", status.as_u16()));
    }
    Ok(())
}

/// Each connection sends its next request as soon as the last one is answered, for the warm-up and then
/// the counted part; returns when the counted part began.
async fn closed_loop(shared: Arc<Shared>, senders: Vec<Sender>) -> Instant {
    let counted_from = Instant::now() + Duration::from_millis(shared.load.warm_up_ms);
    let end = counted_from + Duration::from_millis(shared.load.duration_ms);
    let connections: Vec<_> = senders
        .into_iter()
        .map(|sender| {
            let shared = shared.clone();
            tokio::spawn(async move {
                let mut slot = Some(sender);
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        return;
                    }
                    let outcome = on_connection(&shared, &mut slot, sent).await;
                    shared.record(sent, sent, outcome);
                }
            })
        })
        .collect();
    tokio::time::sleep_until(tokio::time::Instant::from_std(counted_from)).await;
    say("measuring");
    tokio::time::sleep_until(tokio::time::Instant::from_std(end)).await;
    say("measured");
    for connection in connections {
        let _ = connection.await;
    }
    counted_from
}

/// The nearest-rank percentile `p` (0–1) of `sorted`; 0 when it is empty.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (sorted.len() as f64 * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn report(samples: &[Sample], counted_from: Instant) -> LoadReport {
    let counted: Vec<&Sample> = samples.iter().filter(|s| s.due >= counted_from).collect();
    let micros = |d: Duration| d.as_micros() as u64;
    let mut latencies: Vec<u64> =
        counted.iter().filter(|s| s.outcome.is_ok()).map(|s| micros(s.end.duration_since(s.due))).collect();
    latencies.sort_unstable();
    let mut late: Vec<u64> = counted.iter().map(|s| micros(s.dispatched.duration_since(s.due))).collect();
    late.sort_unstable();
    let mut kinds: BTreeMap<&str, u64> = BTreeMap::new();
    for error in counted.iter().filter_map(|s| s.outcome.as_ref().err()) {
        *kinds.entry(error).or_default() += 1;
    }
    let ok = latencies.len() as u64;
    let last = counted.iter().filter(|s| s.outcome.is_ok()).map(|s| s.end).max();
    let window = last.map_or(0.0, |last| last.duration_since(counted_from).as_secs_f64());
    LoadReport {
        sent: counted.len() as u64,
        ok,
        errors: counted.len() as u64 - ok,
        error_kinds: kinds.into_iter().map(|(e, n)| format!("{n}× {e}")).collect(),
        p50_us: percentile(&latencies, 0.50),
        p90_us: percentile(&latencies, 0.90),
        p99_us: percentile(&latencies, 0.99),
        p999_us: percentile(&latencies, 0.999),
        max_us: latencies.last().copied().unwrap_or(0),
        achieved_rps: if window > 0.0 { ok as f64 / window } else { 0.0 },
        dispatch_late_p99_us: percentile(&late, 0.99),
    }
}
