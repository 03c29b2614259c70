//! What a CONNECT carries besides its bytes, in the forms Istio's ztunnel writes and reads:
//! - `:authority`: the destination, `ip:port` — or `hostname:port` naming a service ([`HboneAddress`]);
//! - `forwarded`: `for="<client ip:port>"`, plus `;host=<service hostname>` when the client addressed a
//!   service ([`Forwarded`]);
//! - `baggage`: the sending workload's names (namespace, workload, canonical service and revision,
//!   locality, cluster), on the request for the source and on the 200 for the destination ([`Baggage`]);
//! - `traceparent`: a W3C trace context naming the tunnel ([`TraceParent`]).
//!
//! Parsing never fails a tunnel over `forwarded`, `baggage` or `traceparent` (ztunnel ignores what it
//! cannot read there too); only the authority decides whether the request is understood.
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use http::HeaderValue;
use warren_api::workloads::{Pod, naming};

pub const FORWARDED: &str = "forwarded";
pub const BAGGAGE: &str = "baggage";
pub const TRACEPARENT: &str = "traceparent";

/// A DNS name is at most 253 characters; with `:65535` that is the longest authority worth reading.
const MAX_AUTHORITY: usize = 253 + ":65535".len();

/// Where a CONNECT goes, as its `:authority` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HboneAddress {
    /// A workload address: the destination pod's IP and the port its workload listens on.
    Socket(SocketAddr),
    /// A service by hostname and service port (ztunnel sends these for service traffic): the receiving
    /// side maps the port to the target port on its own pod.
    Service { host: String, port: u16 },
}

/// Why an `:authority` was not understood (answered 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    #[error("no :authority")]
    Missing,
    #[error("authority of {0} characters (at most {MAX_AUTHORITY})")]
    TooLong(usize),
    #[error("authority {0:?} has no port")]
    NoPort(String),
    #[error("authority {0:?}: port is not 1-65535")]
    BadPort(String),
    #[error("authority {0:?}: not an IP address or a DNS name")]
    BadHost(String),
}

impl HboneAddress {
    pub fn parse(authority: &str) -> Result<HboneAddress, AuthorityError> {
        if authority.len() > MAX_AUTHORITY {
            return Err(AuthorityError::TooLong(authority.len()));
        }
        if let Ok(socket) = authority.parse::<SocketAddr>() {
            if socket.port() == 0 {
                return Err(AuthorityError::BadPort(authority.into()));
            }
            return Ok(HboneAddress::Socket(socket));
        }
        let (host, port) = authority.rsplit_once(':').ok_or_else(|| AuthorityError::NoPort(authority.into()))?;
        let port = port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| AuthorityError::BadPort(authority.into()))?;
        if !is_dns_name(host) {
            return Err(AuthorityError::BadHost(authority.into()));
        }
        // DNS names compare case-insensitively; service hostnames are lowercase.
        Ok(HboneAddress::Service { host: host.to_ascii_lowercase(), port })
    }
}

impl fmt::Display for HboneAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HboneAddress::Socket(socket) => write!(f, "{socket}"),
            HboneAddress::Service { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Letters, digits, `-` (not first or last) and `_` in dot-separated labels of 1 to 63 (`_` for
/// ServiceEntry hosts such as `_grpc._tcp.example.com`), the last not all digits: so never an IP address,
/// nor a mistyped one.
fn is_dns_name(host: &str) -> bool {
    let label = |l: &str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let numeric = host.rsplit('.').next().is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()));
    (1..=253).contains(&host.len()) && host.split('.').all(label) && !numeric
}

/// `forwarded`'s `for=`: the client a tunnel carries. Without a port when the tunnel carries a pooled
/// connection that many of the pod's clients share (the L7 proxy's upstream connections).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardedFor {
    pub ip: IpAddr,
    pub port: Option<u16>,
}

impl fmt::Display for ForwardedFor {
    /// RFC 7239's node, always quoted: `"10.0.0.1:4000"`, `"[fd00::1]:4000"`, `"10.0.0.1"`, `"[fd00::1]"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.ip, self.port) {
            (ip, Some(port)) => write!(f, "\"{}\"", SocketAddr::new(ip, port)),
            (IpAddr::V4(ip), None) => write!(f, "\"{ip}\""),
            (IpAddr::V6(ip), None) => write!(f, "\"[{ip}]\""),
        }
    }
}

/// The `forwarded` header of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    pub client: ForwardedFor,
    /// The service hostname the client addressed (none for a workload addressed directly).
    pub host: Option<String>,
}

impl Forwarded {
    pub fn header(&self) -> HeaderValue {
        let mut text = format!("for={}", self.client);
        // A hostname from the tables is a DNS name; anything else would not survive a peer's parser.
        if let Some(host) = self.host.as_deref().filter(|h| is_dns_name(h)) {
            text.push_str(";host=");
            text.push_str(host);
        }
        HeaderValue::from_str(&text).expect("an address and a DNS name are valid header text")
    }

    /// The `host=` of a received `forwarded` (the first, quotes removed), lowercased: the service the
    /// client's proxy says it addressed. `None` for a header without one or one that is not ASCII, or
    /// whose host is not a DNS name (with an optional port).
    pub fn host_of(value: &HeaderValue) -> Option<String> {
        let text = value.to_str().ok()?;
        let pair = text.split([',', ';']).map(str::trim).find_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            name.trim().eq_ignore_ascii_case("host").then_some(value.trim())
        })?;
        let host = pair.strip_prefix('"').and_then(|h| h.strip_suffix('"')).unwrap_or(pair);
        let name = match host.rsplit_once(':') {
            Some((name, port)) if port.parse::<u16>().is_ok() => name,
            _ => host,
        };
        is_dns_name(name).then(|| host.to_ascii_lowercase())
    }
}

/// The controller kinds ztunnel names a workload by in baggage (`k8s.<kind>.name`); every other pod
/// (StatefulSet, DaemonSet, bare pod…) is named by itself, as Istio's control plane does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    Deployment,
    CronJob,
    Job,
    Pod,
}

impl WorkloadKind {
    fn key(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "k8s.deployment.name",
            WorkloadKind::CronJob => "k8s.cronjob.name",
            WorkloadKind::Job => "k8s.job.name",
            WorkloadKind::Pod => "k8s.pod.name",
        }
    }

    /// The pod's workload kind and name. The pod records only the derived name
    /// ([`naming::workload_name`]), so the kind comes from the labels the controllers set: a ReplicaSet of
    /// a Deployment stamps `pod-template-hash`, a Job `job-name` (its CronJob's name has a suffix more).
    pub fn of(pod: &Pod) -> (WorkloadKind, &str) {
        let Some(workload) = pod.workload.as_deref() else { return (WorkloadKind::Pod, &pod.name) };
        let job = ["batch.kubernetes.io/job-name", "job-name"].iter().find_map(|k| pod.labels.get(*k));
        if pod.labels.contains_key("pod-template-hash") {
            (WorkloadKind::Deployment, workload)
        } else if let Some(job) = job {
            let kind = if job == workload { WorkloadKind::Job } else { WorkloadKind::CronJob };
            (kind, workload)
        } else {
            (WorkloadKind::Pod, &pod.name)
        }
    }
}

/// A workload's names as W3C baggage, with ztunnel's keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baggage {
    pub cluster: Option<String>,
    pub namespace: Option<String>,
    pub workload: Option<(WorkloadKind, String)>,
    /// The canonical service (`service.istio.io/canonical-name`, `app.kubernetes.io/name`, `app`, else
    /// the workload's name), as Istio's control plane gives ztunnel.
    pub service: Option<String>,
    /// The canonical revision (…, `version`, else `latest`).
    pub version: Option<String>,
    pub region: Option<String>,
    pub zone: Option<String>,
}

impl Baggage {
    /// `pod` in cluster `cluster`.
    pub fn of(pod: &Pod, cluster: &str) -> Baggage {
        let (kind, name) = WorkloadKind::of(pod);
        let locality = pod.parsed_locality().unwrap_or_default();
        let some = |s: &str| Some(s.to_string()).filter(|s| !s.is_empty());
        Baggage {
            cluster: some(cluster),
            namespace: some(&pod.namespace),
            workload: some(name).map(|n| (kind, n)),
            service: some(naming::canonical_service(&pod.labels, pod.workload_name())),
            version: some(naming::canonical_revision(&pod.labels)),
            region: some(&locality.region),
            zone: some(&locality.zone),
        }
    }

    /// `key=value` pairs joined by `,`, in ztunnel's order; `None` when nothing is known. A value a peer
    /// could not read back unescaped (ztunnel's parser splits on `,` and `=` and decodes nothing) is left
    /// out rather than escaped.
    pub fn header(&self) -> Option<HeaderValue> {
        let pairs = [
            ("k8s.cluster.name", self.cluster.as_deref()),
            ("k8s.namespace.name", self.namespace.as_deref()),
            (self.workload.as_ref().map_or("", |(kind, _)| kind.key()), self.workload.as_ref().map(|(_, n)| n.as_str())),
            ("service.name", self.service.as_deref()),
            ("service.version", self.version.as_deref()),
            ("cloud.region", self.region.as_deref()),
            ("cloud.availability_zone", self.zone.as_deref()),
        ];
        let text = pairs
            .iter()
            .filter_map(|(key, value)| value.filter(|v| is_baggage_value(v)).map(|v| format!("{key}={v}")))
            .collect::<Vec<_>>()
            .join(",");
        (!text.is_empty()).then(|| HeaderValue::from_str(&text).expect("baggage values are visible ASCII"))
    }
}

/// W3C baggage's value octets (visible ASCII but `"` `,` `;` `\`), and no `=` (ztunnel keeps only what
/// precedes a second one).
fn is_baggage_value(value: &str) -> bool {
    !value.is_empty() && value.bytes().all(|b| (0x21..=0x7e).contains(&b) && !b"\",;\\=".contains(&b))
}

/// A W3C `traceparent` (`00-<trace id>-<span id>-00`): ztunnel names each tunnel with one (in its logs), and
/// the receiving side logs it with what it does to the tunnel. Not sampled: nothing is traced by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub span_id: u64,
}

impl TraceParent {
    /// Fresh random ids (the W3C format forbids all-zero ones).
    pub fn random() -> TraceParent {
        let nonzero = || loop {
            let n = crate::proxy::outbound::random();
            if n != 0 {
                break n;
            }
        };
        TraceParent { trace_id: (u128::from(nonzero()) << 64) | u128::from(nonzero()), span_id: nonzero() }
    }

    pub fn header(&self) -> HeaderValue {
        HeaderValue::from_str(&self.to_string()).expect("hex digits and dashes")
    }

    /// A received `traceparent` of version 00; `None` for anything else.
    pub fn parse(value: &HeaderValue) -> Option<TraceParent> {
        let text = value.to_str().ok()?;
        let mut parts = text.split('-');
        let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        if parts.next().is_some() || version != "00" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
            return None;
        }
        let parent = TraceParent { trace_id: u128::from_str_radix(trace, 16).ok()?, span_id: u64::from_str_radix(span, 16).ok()? };
        (parent.trace_id != 0 && parent.span_id != 0).then_some(parent)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{:032x}-{:016x}-00", self.trace_id, self.span_id)
    }
}
