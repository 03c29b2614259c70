//! `inspect connections|workloads|certs|services|routes|faults|policies`: read from the running agent's
//! admin endpoint.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use warren_api::admin::PoliciesView;

use super::{Output, table};

fn fetch(admin: SocketAddr, path: &str) -> Result<Value> {
    let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(2))
        .with_context(|| format!("warren-agent is not answering on {admin} (is it running on this node?)"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {admin}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("malformed response from the agent")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("the agent answered {path} with {}", head.lines().next().unwrap_or("?"));
    }
    serde_json::from_str(body).with_context(|| format!("the agent's {path} is not JSON"))
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

pub fn connections(admin: SocketAddr, output: Output) -> Result<String> {
    let view = fetch(admin, "/connections")?;
    if output == Output::Json {
        return Ok(serde_json::to_string_pretty(&view)? + "\n");
    }
    let row = |c: &Value| {
        vec![
            text(&c["id"]),
            text(&c["direction"]),
            text(&c["pod"]),
            text(&c["client"]),
            text(&c["original_dst"]),
            text(&c["sent_bytes"]),
            text(&c["received_bytes"]),
            if c["closed"] == Value::Bool(true) { "closed".into() } else { "open".into() },
            text(&c["error"]),
        ]
    };
    let rows: Vec<Vec<String>> = view["open"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(view["recently_closed"].as_array().into_iter().flatten().rev())
        .map(row)
        .collect();
    Ok(table(&["ID", "DIRECTION", "POD", "CLIENT", "DESTINATION", "SENT", "RECEIVED", "STATE", "ERROR"], &rows))
}

pub fn workloads(admin: SocketAddr, output: Output) -> Result<String> {
    let view = fetch(admin, "/workloads")?;
    if output == Output::Json {
        return Ok(serde_json::to_string_pretty(&view)? + "\n");
    }
    let rows: Vec<Vec<String>> = view
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let ips = p["ips"].as_array().map(|a| a.iter().map(text).collect::<Vec<_>>().join(",")).unwrap_or_default();
            vec![
                text(&p["pod"]),
                text(&p["uid"]),
                ips,
                if p["enrolled"] == Value::Bool(true) { "yes".into() } else { "no".into() },
                text(&p["cgroup"]),
                text(&p["error"]),
            ]
        })
        .collect();
    Ok(table(&["POD", "UID", "IPS", "ENROLLED", "CGROUP", "ERROR"], &rows))
}

pub fn certificates(admin: SocketAddr, output: Output) -> Result<String> {
    let view = fetch(admin, "/certificates")?;
    if output == Output::Json {
        return Ok(serde_json::to_string_pretty(&view)? + "\n");
    }
    let when = |v: &Value| {
        let secs = v.as_u64().unwrap_or(0);
        let (days, rest) = (secs / 86_400, secs % 86_400);
        format!("{days}d{:02}:{:02}:{:02} since epoch", rest / 3600, rest % 3600 / 60, rest % 60)
    };
    let rows: Vec<Vec<String>> = view
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            vec![
                text(&c["identity"]),
                text(&c["serial"]),
                when(&c["not_before_unix"]),
                when(&c["not_after_unix"]),
                format!("{}s", c["renews_in_seconds"].as_u64().unwrap_or(0)),
                format!("{} certificates", c["chain"].as_array().map_or(0, Vec::len)),
            ]
        })
        .collect();
    Ok(table(&["IDENTITY", "SERIAL", "NOT BEFORE", "NOT AFTER", "ROTATES IN", "CHAIN"], &rows))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigView {
    Services,
    Routes,
    Faults,
}

fn join(v: &Value) -> String {
    match v.as_array() {
        Some(items) if !items.is_empty() => items.iter().map(text).collect::<Vec<_>>().join(","),
        _ => "-".into(),
    }
}

/// Each destination with its share of traffic (weights are relative, as in Istio).
fn destinations(v: &Value) -> String {
    let items = v.as_array().map(Vec::as_slice).unwrap_or_default();
    let total: u64 = items.iter().filter_map(|d| d["weight"].as_u64()).sum();
    items
        .iter()
        .map(|d| {
            let subset = d["subset"].as_str().map(|s| format!("/{s}")).unwrap_or_default();
            let weight = d["weight"].as_u64().unwrap_or(0);
            let share = if total == 0 { 0.0 } else { weight as f64 * 100.0 / total as f64 };
            format!("{}{subset}:{share:.0}%", text(&d["service"]))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A percentage as written: `30`, `12.5`.
fn percent(value: &Value) -> String {
    value.as_f64().map(|p| format!("{p}")).unwrap_or_else(|| text(value))
}

/// The pushed tables, one view at a time; the header line says which version and whether the stream is up.
pub fn config(admin: SocketAddr, what: ConfigView, output: Output) -> Result<String> {
    let view = fetch(admin, "/config")?;
    let key = match what {
        ConfigView::Services => "services",
        ConfigView::Routes => "routes",
        ConfigView::Faults => "faults",
    };
    if output == Output::Json {
        let selected = serde_json::json!({"version": view["version"], "push": view["push"], key: view[key]});
        return Ok(serde_json::to_string_pretty(&selected)? + "\n");
    }
    let push = &view["push"];
    let mut out = if push.is_null() {
        format!("version {} (no controller configured)\n", text(&view["version"]))
    } else {
        let state =
            if push["connected"] == Value::Bool(true) { "connected" } else { "disconnected, serving the last version" };
        let nack = push["lastNack"].as_str().map(|n| format!("; last NACK: {n}")).unwrap_or_default();
        format!("version {} from {} ({state}){nack}\n", text(&view["version"]), text(&push["controller"]))
    };
    let items = view[key].as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = match what {
        ConfigView::Services => items
            .iter()
            .flat_map(|s| {
                let routes = s["l4Routes"].as_array().cloned().unwrap_or_default();
                let base = vec![text(&s["name"]), join(&s["vips"]), text(&s["endpoints"]), join(&s["subsets"])];
                let origin = text(&s["origin"]);
                if routes.is_empty() {
                    return vec![[base, vec!["-".into(), "-".into(), origin]].concat()];
                }
                routes
                    .iter()
                    .map(|r| {
                        let route_origin = r["origin"].as_str().map(String::from).unwrap_or_else(|| origin.clone());
                        [base.clone(), vec![text(&r["vip"]), destinations(&r["destinations"]), route_origin]].concat()
                    })
                    .collect()
            })
            .collect(),
        ConfigView::Routes => items
            .iter()
            .flat_map(|r| {
                let rules = r["http"].as_array().cloned().unwrap_or_default().into_iter().enumerate().map(|(i, h)| {
                    let matched = if h["matches"].as_array().is_some_and(|m| !m.is_empty()) {
                        h["matches"].to_string()
                    } else {
                        "*".into()
                    };
                    (format!("http[{i}]"), matched, destinations(&h["destinations"]))
                });
                let tcp = r["tcp"].as_array().cloned().unwrap_or_default().into_iter().enumerate().map(|(i, t)| {
                    (
                        format!("tcp[{i}]"),
                        t["port"].as_u64().map(|p| format!("port {p}")).unwrap_or("*".into()),
                        destinations(&t["destinations"]),
                    )
                });
                rules
                    .chain(tcp)
                    .map(|(rule, matched, to)| vec![join(&r["hosts"]), rule, matched, to, text(&r["origin"])])
                    .collect::<Vec<_>>()
            })
            .collect(),
        ConfigView::Faults => items
            .iter()
            .map(|f| {
                let fault = &f["fault"];
                let delay = fault["delayMs"]
                    .as_u64()
                    .map(|ms| format!("{ms}ms @{}%", percent(&fault["delayPercent"])))
                    .unwrap_or("-".into());
                let abort = match (fault["abortHttpStatus"].as_u64(), fault["abortGrpcStatus"].as_u64()) {
                    (_, Some(code)) => format!("grpc-status {code} @{}%", percent(&fault["abortPercent"])),
                    (Some(status), None) => format!("{status} @{}%", percent(&fault["abortPercent"])),
                    _ if fault["abortConnect"] == Value::Bool(true) => {
                        format!("ECONNREFUSED @{}%", percent(&fault["abortPercent"]))
                    }
                    _ => "-".into(),
                };
                vec![join(&f["services"]), text(&f["rule"]), delay, abort, f["matches"].to_string(), text(&f["origin"])]
            })
            .collect(),
    };
    out += &match what {
        ConfigView::Services => {
            table(&["SERVICE", "VIPS", "ENDPOINTS", "SUBSETS", "VIP:PORT", "L4 ROUTE", "FROM"], &rows)
        }
        ConfigView::Routes => table(&["HOSTS", "RULE", "MATCH", "DESTINATIONS", "FROM"], &rows),
        ConfigView::Faults => table(&["SERVICES", "RULE", "DELAY", "ABORT", "MATCH", "FROM"], &rows),
    };
    Ok(out)
}

/// `inspect policies [--hits]`: per local workload, the policies in evaluation order; then what the kernel
/// refuses (plaintext clients, by source prefix).
pub fn policies(admin: SocketAddr, hits: bool, output: Output) -> Result<String> {
    let view: PoliciesView = serde_json::from_value(fetch(admin, "/policies")?).context("the agent's /policies")?;
    if output == Output::Json {
        return Ok(serde_json::to_string_pretty(&view)? + "\n");
    }
    let mut out = format!("version {}\n", view.version);
    let mut rows = Vec::new();
    for workload in &view.workloads {
        for (order, p) in workload.policies.iter().enumerate() {
            let action =
                if p.policy == "-" { "ALLOW (none matched: deny)".to_string() } else { p.action.as_str().to_string() };
            let mut row =
                vec![workload.workload.clone(), (order + 1).to_string(), p.policy.clone(), action, p.rules.to_string()];
            if hits {
                row.extend([p.hits.allowed.to_string(), p.hits.denied.to_string(), p.hits.audited.to_string()]);
            }
            rows.push(row);
        }
    }
    let mut headers = vec!["WORKLOAD", "ORDER", "POLICY", "ACTION", "RULES"];
    if hits {
        headers.extend(["ALLOWED", "DENIED", "AUDITED"]);
    }
    out += &table(&headers, &rows);
    let refused: Vec<String> = view
        .kernel
        .iter()
        .filter(|k| !k.allowed)
        .map(|k| {
            let port = k.port.map(|p| p.to_string()).unwrap_or_else(|| "*".into());
            let by = if k.decided_by == "-" { "no ALLOW policy matches" } else { &k.decided_by };
            format!("{}:{port} from {} ({by})", k.destination, k.source)
        })
        .collect();
    out += &format!(
        "refused in the kernel (L4_AUTHZ): {}\n",
        if refused.is_empty() { "-".into() } else { refused.join(", ") }
    );
    Ok(out)
}
