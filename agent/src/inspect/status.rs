//! `warren-agent status`: is the agent on this node healthy, and if not, why — from its pid file, the
//! links and maps it pinned, and its admin endpoint (pushed tables, certificates, pods).
use std::{
    net::SocketAddr,
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData};
use serde::Serialize;
use serde_json::Value;
use warren_maps::{ConnectFault, EnrolledNetns, ServiceKey, ServiceRoute, names};

use super::{Output, live::fetch, structured, table};

/// The cgroup programs every running agent has attached (pinned under `links/`).
const PROGRAMS: [&str; 3] = ["connect4", "connect6", "track_sockets"];
/// A map this full is a problem: the next entries would be refused.
const MAP_FULL_PERCENT: f64 = 90.0;
/// A certificate this close to expiry is a problem (renewal runs at half its life).
const CERTIFICATE_MARGIN_SECONDS: u64 = 3600;

#[derive(Serialize)]
pub struct Status {
    pub healthy: bool,
    /// Why it is not healthy: each problem with what it means.
    pub problems: Vec<String>,
    pub pid: Option<i32>,
    pub programs: Vec<Program>,
    /// Enrolled pods' netns with inbound capture (sk_lookup) attached.
    pub pods_captured: usize,
    pub maps: Vec<MapFill>,
    /// The controller's push stream (absent when workloads come from elsewhere).
    pub controller: Option<Value>,
    pub config_version: Option<u64>,
    pub certificates: Vec<CertificateExpiry>,
    pub pods_enrolled: usize,
    pub pods_failing: usize,
}

#[derive(Serialize)]
pub struct Program {
    pub name: &'static str,
    pub attached: bool,
}

#[derive(Serialize)]
pub struct MapFill {
    pub name: &'static str,
    pub entries: usize,
    pub capacity: u32,
}

#[derive(Serialize)]
pub struct CertificateExpiry {
    pub identity: String,
    pub expires_in_seconds: i64,
}

/// Entries and capacity of the pinned hash map `name` (keys `K`, values `V`).
fn fill<K: aya::Pod, V: aya::Pod>(pin_dir: &Path, name: &'static str) -> Result<MapFill> {
    let data = MapData::from_pin(pin_dir.join(name)).with_context(|| format!("opening the pinned map {name}"))?;
    let capacity = data.info()?.max_entries();
    let map: HashMap<_, K, V> = HashMap::try_from(aya::maps::Map::HashMap(data))?;
    Ok(MapFill { name, entries: map.keys().filter(Result::is_ok).count(), capacity })
}

pub fn collect(pin_dir: &Path, run_dir: &Path, admin: SocketAddr) -> Status {
    let mut problems = vec![];
    let pid = super::require_running_agent(run_dir).map_err(|e| problems.push(format!("{e:#}"))).ok();
    let links = pin_dir.join("links");
    let programs: Vec<Program> =
        PROGRAMS.iter().map(|name| Program { name, attached: links.join(name).exists() }).collect();
    for p in programs.iter().filter(|p| !p.attached) {
        let link = links.join(p.name);
        problems.push(format!("program {} is not attached (no pinned link {}): pods are not redirected", p.name, link.display()));
    }
    let pods_captured = std::fs::read_dir(links.join("pods")).map(|d| d.count()).unwrap_or(0);
    let maps: Vec<MapFill> = [
        fill::<u64, EnrolledNetns>(pin_dir, names::ENROLLED_NETNS),
        fill::<ServiceKey, ServiceRoute>(pin_dir, names::SERVICE_ROUTES),
        fill::<ServiceKey, ConnectFault>(pin_dir, names::CONNECT_FAULTS),
    ]
    .into_iter()
    .filter_map(|m| m.map_err(|e| problems.push(format!("reading the pinned maps: {e:#}"))).ok())
    .collect();
    for m in &maps {
        let percent = m.entries as f64 * 100.0 / f64::from(m.capacity.max(1));
        if percent >= MAP_FULL_PERCENT {
            let (name, entries, capacity) = (m.name, m.entries, m.capacity);
            problems.push(format!("map {name} is {percent:.0}% full ({entries} of {capacity}): new entries will be refused"));
        }
    }
    let mut status = Status {
        healthy: false,
        problems: vec![],
        pid,
        programs,
        pods_captured,
        maps,
        controller: None,
        config_version: None,
        certificates: vec![],
        pods_enrolled: 0,
        pods_failing: 0,
    };
    if pid.is_some() {
        add_live(&mut status, admin, &mut problems);
    }
    status.healthy = problems.is_empty();
    status.problems = problems;
    status
}

/// What only the running agent knows: pushed tables, certificates, pods.
fn add_live(status: &mut Status, admin: SocketAddr, problems: &mut Vec<String>) {
    match fetch(admin, "/config") {
        Ok(config) => {
            status.config_version = config["version"].as_u64();
            let push = &config["push"];
            if !push.is_null() {
                if push["connected"] != Value::Bool(true) {
                    let version = status.config_version.unwrap_or(0);
                    let controller = &push["controller"];
                    problems.push(format!("the push stream from {controller} is down: serving version {version}"));
                }
                if let Some(nack) = push["lastNack"].as_str() {
                    problems.push(format!("the last push was refused: {nack}"));
                }
                status.controller = Some(push.clone());
            }
        }
        Err(e) => problems.push(format!("{e:#}")),
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    if let Ok(certificates) = fetch(admin, "/certificates") {
        for c in certificates.as_array().into_iter().flatten() {
            let identity = c["identity"].as_str().unwrap_or("?").to_string();
            let expires_in_seconds = c["not_after_unix"].as_i64().unwrap_or(0) - now;
            if expires_in_seconds < CERTIFICATE_MARGIN_SECONDS as i64 {
                let left = expires_in_seconds;
                problems.push(format!("the certificate of {identity} expires in {left} s: renewal is failing"));
            }
            status.certificates.push(CertificateExpiry { identity, expires_in_seconds });
        }
    }
    if let Ok(workloads) = fetch(admin, "/workloads") {
        for p in workloads.as_array().into_iter().flatten() {
            status.pods_enrolled += usize::from(p["enrolled"] == Value::Bool(true));
            if let Some(error) = p["error"].as_str() {
                status.pods_failing += 1;
                problems.push(format!("pod {} is not enrolled: {error}", p["pod"].as_str().unwrap_or("?")));
            }
        }
    }
}

pub fn render(status: &Status, output: Output) -> Result<String> {
    if let Some(text) = structured(status, output) {
        return text;
    }
    let mut out = if status.healthy { "healthy\n".to_string() } else { "NOT HEALTHY\n".to_string() };
    for problem in &status.problems {
        out += &format!("  - {problem}\n");
    }
    let attached: Vec<&str> = status.programs.iter().filter(|p| p.attached).map(|p| p.name).collect();
    out += &format!(
        "programs attached: {} (+ inbound capture in {} pod netns)\n",
        if attached.is_empty() { "none".into() } else { attached.join(", ") },
        status.pods_captured
    );
    out += &format!("pods enrolled: {}, failing: {}\n", status.pods_enrolled, status.pods_failing);
    let controller = match &status.controller {
        Some(push) => {
            let state = if push["connected"] == true { "connected" } else { "disconnected" };
            format!("{} ({state})", push["controller"].as_str().unwrap_or("?"))
        }
        None => "none (workloads from a file or the Kubernetes API)".into(),
    };
    let version = status.config_version.map_or("-".to_string(), |v| v.to_string());
    out += &format!("controller: {controller}; config version {version}\n\n");
    let rows: Vec<Vec<String>> =
        status.maps.iter().map(|m| vec![m.name.to_string(), m.entries.to_string(), m.capacity.to_string()]).collect();
    out += &table(&["MAP", "ENTRIES", "CAPACITY"], &rows);
    if !status.certificates.is_empty() {
        let rows: Vec<Vec<String>> = status
            .certificates
            .iter()
            .map(|c| {
                let (hours, minutes) = (c.expires_in_seconds / 3600, c.expires_in_seconds % 3600 / 60);
                vec![c.identity.clone(), format!("{hours}h{minutes:02}m")]
            })
            .collect();
        out += "\n";
        out += &table(&["CERTIFICATE", "EXPIRES IN"], &rows);
    }
    Ok(out)
}
