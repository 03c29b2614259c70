//! The controller's Prometheus metrics and the monitoring endpoint that serves them (`--monitoring-addr`,
//! istiod's 15014): `/metrics` and `/stats/prometheus` in prometheus-client's text encoding (OpenMetrics),
//! `/ready`, and the mesh graph's page and data (`/graph`, `/graph.json`, [`crate::graph`]). Every label has a closed set of values (enums, the Istio kinds the pipeline checks): no
//! series per object, agent or connection, so the exposition stays the same size however big the mesh.
use std::{
    convert::Infallible,
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::{
    graph::FlowStore,
    pipeline::{CHECKED_KINDS, Verdict},
};

/// prometheus-client's text encoding.
const CONTENT_TYPE: &str = warren_config::exposition::PROMETHEUS_TEXT;

/// Send → ACK of a table version: an agent applies a diff in milliseconds; a full snapshot of a large mesh
/// (tens of MB of JSON, eBPF maps rewritten) takes seconds.
const PUSH_BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// An enum whose variants are a label's values, as Prometheus shows them, and `ALL` of them (each series
/// is created at zero when the metrics are, so a query sees 0, not "no data", before the first event).
macro_rules! label_value {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &[$name] = &[$($name::$variant),+];
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                encoder.write_str(match self { $($name::$variant => $text),+ })
            }
        }
    };
}

label_value!(
    /// How an agent answered a table version.
    PushResult { Ack => "ack", Nack => "nack", Error => "error" }
);
label_value!(
    /// `Error`: compiling panicked (a bug); the version in force stays.
    CompileResult { Ok => "ok", Error => "error" }
);
label_value!(
    /// Why the CA refused a certificate request.
    RefusalReason {
        BadRequest => "bad_request",
        Unauthenticated => "unauthenticated",
        Forbidden => "forbidden",
        Internal => "internal",
    }
);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PushLabels {
    result: PushResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CompileLabels {
    result: CompileResult,
}

/// Only the kinds of [`CHECKED_KINDS`]: constants, never a name from users' YAML.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: RefusalReason,
}

pub struct Metrics {
    registry: Registry,
    connected_agents: Gauge,
    pushes: Family<PushLabels, Counter>,
    push_duration: Histogram,
    config_version: Gauge,
    compiles: Family<CompileLabels, Counter>,
    invalid_objects: Family<KindLabels, Gauge>,
    certificates_issued: Counter,
    certificate_requests_refused: Family<RefusalLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let metrics = Metrics {
            registry: Registry::default(),
            connected_agents: Gauge::default(),
            pushes: Family::default(),
            push_duration: Histogram::new(PUSH_BUCKETS),
            config_version: Gauge::default(),
            compiles: Family::default(),
            invalid_objects: Family::default(),
            certificates_issued: Counter::default(),
            certificate_requests_refused: Family::default(),
        };
        // Every series at zero from the start (the guards these return are dropped at once).
        for &result in PushResult::ALL {
            let _ = metrics.pushes.get_or_create(&PushLabels { result });
        }
        for &result in CompileResult::ALL {
            let _ = metrics.compiles.get_or_create(&CompileLabels { result });
        }
        for kind in CHECKED_KINDS {
            let _ = metrics.invalid_objects.get_or_create(&KindLabels { kind });
        }
        for &reason in RefusalReason::ALL {
            let _ = metrics.certificate_requests_refused.get_or_create(&RefusalLabels { reason });
        }
        metrics.registered()
    }
}

impl Metrics {
    /// Registers clones (they share their values) of every metric; counters without `_total`, which
    /// prometheus-client appends.
    fn registered(mut self) -> Self {
        let r = &mut self.registry;
        r.register(
            "warren_controller_connected_agents",
            "Agents with an open push stream",
            self.connected_agents.clone(),
        );
        r.register(
            "warren_controller_pushes",
            "Table versions sent to agents, by how the agent answered: ack (applied), nack (refused, it keeps \
             its last good version) or error (the stream failed or closed before an answer)",
            self.pushes.clone(),
        );
        r.register(
            "warren_controller_push_duration_seconds",
            "Time from sending a table version to an agent to its ACK (the agent's eBPF maps and proxy hold it)",
            self.push_duration.clone(),
        );
        r.register(
            "warren_controller_config_version",
            "The newest compiled version of the mesh's tables",
            self.config_version.clone(),
        );
        r.register(
            "warren_controller_compiles",
            "Cluster states compiled into tables, by result (error: compiling panicked, the version in force stays)",
            self.compiles.clone(),
        );
        r.register(
            "warren_controller_invalid_objects",
            "Istio objects the last validation rejected, by kind (their last valid generation stays in force, \
             or they are left out)",
            self.invalid_objects.clone(),
        );
        r.register(
            "warren_controller_certificates_issued",
            "Workload certificates the CA signed for agents' requests",
            self.certificates_issued.clone(),
        );
        r.register(
            "warren_controller_certificate_requests_refused",
            "Certificate requests the CA refused, by reason",
            self.certificate_requests_refused.clone(),
        );
        self
    }

    /// The registry in prometheus-client's text encoding.
    /// In Prometheus' text format, as the agents serve theirs.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(warren_config::exposition::open_metrics_to_prometheus(&text))
    }

    /// Counts an agent's push stream as open until the guard is dropped, however the stream ends.
    pub fn agent_connected(self: &Arc<Self>) -> ConnectedAgent {
        self.connected_agents.inc();
        ConnectedAgent(self.clone())
    }

    /// A table version about to be sent to an agent: the guard counts its answer, or an error if it is
    /// dropped unanswered.
    pub fn push_sent(self: &Arc<Self>) -> PendingPush {
        PendingPush { metrics: self.clone(), sent_at: Instant::now(), answered: false }
    }

    /// A cluster state compiled into `version` (the same version when nothing changed).
    pub fn compiled(&self, version: u64) {
        self.compiles.get_or_create(&CompileLabels { result: CompileResult::Ok }).inc();
        self.config_version.set(i64::try_from(version).unwrap_or(i64::MAX));
    }

    pub fn compile_panicked(&self) {
        self.compiles.get_or_create(&CompileLabels { result: CompileResult::Error }).inc();
    }

    /// The last validation's verdicts: how many objects of each kind it rejected.
    pub fn validated(&self, verdicts: &[Verdict]) {
        for kind in CHECKED_KINDS {
            let invalid = verdicts.iter().filter(|v| v.kind == kind && !v.errors.is_empty()).count();
            self.invalid_objects.get_or_create(&KindLabels { kind }).set(i64::try_from(invalid).unwrap_or(i64::MAX));
        }
    }

    pub fn certificate_issued(&self) {
        self.certificates_issued.inc();
    }

    pub fn certificate_refused(&self, reason: RefusalReason) {
        self.certificate_requests_refused.get_or_create(&RefusalLabels { reason }).inc();
    }
}

/// See [`Metrics::agent_connected`].
pub struct ConnectedAgent(Arc<Metrics>);

impl Drop for ConnectedAgent {
    fn drop(&mut self) {
        self.0.connected_agents.dec();
    }
}

/// See [`Metrics::push_sent`].
pub struct PendingPush {
    metrics: Arc<Metrics>,
    sent_at: Instant,
    answered: bool,
}

impl PendingPush {
    pub fn elapsed(&self) -> Duration {
        self.sent_at.elapsed()
    }

    /// The agent's answer (`Ack` is timed); `Error` for an answer that does not fit the version sent.
    pub fn answered(mut self, result: PushResult) {
        self.record(result);
    }

    fn record(&mut self, result: PushResult) {
        self.answered = true;
        if result == PushResult::Ack {
            self.metrics.push_duration.observe(self.sent_at.elapsed().as_secs_f64());
        }
        self.metrics.pushes.get_or_create(&PushLabels { result }).inc();
    }
}

impl Drop for PendingPush {
    fn drop(&mut self) {
        if !self.answered {
            self.record(PushResult::Error);
        }
    }
}

pub async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("--monitoring-addr {addr}"))
}

/// Serves the monitoring endpoint; `ready` turns true once the push service accepts agents. The mesh's
/// live graph is here too (`/graph`, `/graph.json`), from the agents' flow reports in `flows`.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, ready: Arc<AtomicBool>, flows: Arc<FlowStore>) {
    tracing::info!(addr = ?listener.local_addr().ok(), "monitoring endpoint ready (/metrics, /ready, /graph)");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (metrics, ready, flows) = (metrics.clone(), ready.clone(), flows.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let answer = match req.uri().path() {
                    "/graph" => page(StatusCode::OK, "text/html; charset=utf-8", crate::graph::PAGE.to_string()),
                    "/graph.json" => page(StatusCode::OK, "application/json", serde_json::to_string(&flows.mesh()).unwrap_or_default()),
                    path => answer(path, &metrics, &ready),
                };
                std::future::ready(Ok::<_, Infallible>(answer))
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn answer(path: &str, metrics: &Metrics, ready: &AtomicBool) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" | "/stats/prometheus" => match metrics.encode() {
            Ok(text) => (StatusCode::OK, CONTENT_TYPE, text),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("encoding metrics: {e}\n")),
        },
        "/ready" if ready.load(Ordering::Relaxed) => (StatusCode::OK, "text/plain", "ready\n".to_string()),
        "/ready" => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "starting: the push service is not serving yet\n".into()),
        _ => (StatusCode::NOT_FOUND, "text/plain", "endpoints: /metrics /stats/prometheus /ready /graph /graph.json\n".to_string()),
    };
    page(status, content_type, body)
}

fn page(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The value of the sample line `series` (name and labels as exposed), if there is one.
    pub(crate) fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_series_exists_at_zero_and_counters_get_total() {
        let text = Metrics::default().encode().unwrap();
        for series in [
            "warren_controller_connected_agents",
            "warren_controller_pushes_total{result=\"ack\"}",
            "warren_controller_pushes_total{result=\"nack\"}",
            "warren_controller_pushes_total{result=\"error\"}",
            "warren_controller_push_duration_seconds_count",
            "warren_controller_config_version",
            "warren_controller_compiles_total{result=\"error\"}",
            "warren_controller_invalid_objects{kind=\"VirtualService\"}",
            "warren_controller_invalid_objects{kind=\"PeerAuthentication\"}",
            "warren_controller_certificates_issued_total",
            "warren_controller_certificate_requests_refused_total{reason=\"forbidden\"}",
        ] {
            assert_eq!(sample(&text, series), Some(0.0), "{series} in:\n{text}");
        }
        assert!(!text.contains("_total_total"), "registered without _total: {text}");
        // Prometheus' text format: counter families named with `_total`, no OpenMetrics trailer.
        assert!(text.contains("# TYPE warren_controller_pushes_total counter") && !text.contains("# EOF"), "{text}");
    }

    #[test]
    fn a_push_counts_once_by_its_answer_and_unanswered_is_an_error() {
        let metrics = Arc::new(Metrics::default());
        metrics.push_sent().answered(PushResult::Ack);
        metrics.push_sent().answered(PushResult::Nack);
        drop(metrics.push_sent());
        let text = metrics.encode().unwrap();
        for result in ["ack", "nack", "error"] {
            assert_eq!(sample(&text, &format!("warren_controller_pushes_total{{result=\"{result}\"}}")), Some(1.0), "{text}");
        }
        assert_eq!(sample(&text, "warren_controller_push_duration_seconds_count"), Some(1.0), "only the ACK is timed");
    }

    #[test]
    fn connected_agents_follow_the_guards() {
        let metrics = Arc::new(Metrics::default());
        let (a, b) = (metrics.agent_connected(), metrics.agent_connected());
        assert_eq!(sample(&metrics.encode().unwrap(), "warren_controller_connected_agents"), Some(2.0));
        drop((a, b));
        assert_eq!(sample(&metrics.encode().unwrap(), "warren_controller_connected_agents"), Some(0.0));
    }

    #[test]
    fn the_endpoint_answers_metrics_ready_and_names_its_paths() {
        let (metrics, ready) = (Metrics::default(), AtomicBool::new(false));
        let metrics_answer = answer("/stats/prometheus", &metrics, &ready);
        assert_eq!(metrics_answer.status(), StatusCode::OK);
        assert_eq!(metrics_answer.headers()["content-type"], CONTENT_TYPE);
        assert_eq!(answer("/ready", &metrics, &ready).status(), StatusCode::SERVICE_UNAVAILABLE);
        ready.store(true, Ordering::Relaxed);
        assert_eq!(answer("/ready", &metrics, &ready).status(), StatusCode::OK);
        assert_eq!(answer("/nope", &metrics, &ready).status(), StatusCode::NOT_FOUND);
    }
}
