//! `inspect connections` and `inspect workloads`: read from the running agent's admin endpoint.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

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
