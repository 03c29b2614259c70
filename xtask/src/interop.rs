//! `cargo xtask interop --ztunnel BIN --ztunnel-src DIR`: HBONE wire compatibility with Istio's ztunnel,
//! both ways, on the netns substrate. node-1 runs a real `warren-agent`; on node-2 each of two pods runs its
//! own ztunnel (dedicated mode, no cluster: a local config file, ztunnel's fake CA). Warren takes ztunnel's
//! test root (`DIR/src/tls/root-cert.pem` and `ca-key.pem`, read from the user's checkout at run time) as
//! its user-supplied root, so both meshes issue certificates the other trusts.
//!
//! - Warren → ztunnel: an enrolled pod on node-1 sends 1 MiB to the echo server of `zt-server`; Warren's
//!   agent tunnels it over HBONE to that pod's ztunnel. Checked: the echo is byte-exact, Warren's agent saw
//!   the peer as `zt-server`'s identity, and ztunnel logged Warren's client identity.
//! - ztunnel → Warren: `zt-client` sends 1 MiB through its ztunnel (SOCKS5, so no redirect is needed) to an
//!   enrolled pod on node-1; Warren's agent serves the HBONE stream. Checked: byte-exact echo, and Warren's
//!   agent saw the peer as `zt-client`'s identity.
//!
//! Not part of `cargo xtask test`: it needs a ztunnel the user built (never this project's code):
//! `../shared/recipes/ztunnel/README.md` in this workplace, or ztunnel's own Development.md.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use warren_testbed::{
    AgentOptions, ECHO_PORT, Pod, Process, Testbed, eventually, in_netns,
    ztunnel::{self, TRUST_DOMAIN, identity, local_config},
};

const MIB: usize = 1 << 20;

/// How to get what the command needs, printed when a path is missing.
pub const HOW_TO: &str = "cargo xtask interop needs Istio's ztunnel, built by you:
  --ztunnel BIN        a ztunnel binary built with the `testing` feature (FAKE_CA), e.g.
                         cargo build --profile quick-release --no-default-features --features testing,tls-ring
  --ztunnel-src DIR    that ztunnel checkout (its test root src/tls/root-cert.pem and src/tls/ca-key.pem)
Steps that work without a cluster or network access: ../shared/recipes/ztunnel/README.md (this workplace),
or ztunnel's Development.md (\"Local Testing\"). Nothing of ztunnel is part of this project.";

pub fn run(ztunnel: Option<&Path>, source: Option<&Path>) -> Result<()> {
    let (Some(ztunnel), Some(source)) = (ztunnel, source) else { bail!("{HOW_TO}") };
    ensure!(ztunnel.is_file(), "--ztunnel {}: no such file", ztunnel.display());
    let root = source.join("src/tls/root-cert.pem");
    let key = source.join("src/tls/ca-key.pem");
    for file in [&root, &key] {
        ensure!(file.is_file(), "--ztunnel-src {}: no {} (is it a ztunnel checkout?)", source.display(), file.display());
    }
    let bed = Testbed::new("interop")?;
    let mesh = Mesh::new(&bed, ztunnel, &root, &key)?;
    warren_to_ztunnel(&mesh)?;
    println!("interop: Warren agent → ztunnel over HBONE: byte-exact, identities checked both sides");
    ztunnel_to_warren(&mesh)?;
    println!("interop: ztunnel → Warren agent over HBONE: byte-exact, identities checked");
    Ok(())
}

struct Mesh {
    agent: warren_testbed::Agent,
    warren_client: Pod,
    warren_server: Pod,
    zt_server: Pod,
    zt_client: Pod,
    zt_server_proxy: Process,
    _processes: Vec<Process>,
}

impl Mesh {
    fn new(bed: &Testbed, ztunnel: &Path, root: &Path, key: &Path) -> Result<Mesh> {
        let (node1, node2) = (bed.add_node("node-1")?, bed.add_node("node-2")?);
        let warren_client = node1.add_pod("warren-client", true)?;
        let warren_server = node1.add_pod("warren-server", true)?;
        // Enrolled, so Warren's agent takes them for HBONE peers; no Warren agent runs on node-2.
        let zt_server = node2.add_pod("zt-server", true)?;
        let zt_client = node2.add_pod("zt-client", true)?;
        let servers = vec![warren_server.serve("v1")?, zt_server.serve("v1")?];
        let config = local_config(&[(&warren_client, "node-1"), (&warren_server, "node-1"), (&zt_server, "node-2"), (&zt_client, "node-2")]);
        let config_file = bed.state_dir().join("ztunnel-local.yaml");
        std::fs::write(&config_file, config)?;
        let identity = serde_json::json!({ "trustDomain": TRUST_DOMAIN, "caCertFile": root, "caKeyFile": key });
        let agent = node1.start_agent_with(AgentOptions { identity: Some(identity), ebpf_log_level: "info", ..Default::default() })?;
        agent.wait_enrolled(&warren_client, true, Duration::from_secs(15))?;
        agent.wait_enrolled(&warren_server, true, Duration::from_secs(15))?;
        // Its inbound logs each CONNECT request with its headers at debug.
        let log = "info,ztunnel::proxy::inbound=debug";
        let zt_server_proxy = ztunnel::start(ztunnel, &zt_server, &config_file, log, &[])?;
        let zt_client_proxy = ztunnel::start(ztunnel, &zt_client, &config_file, log, &[])?;
        let mut processes = servers;
        processes.push(zt_client_proxy);
        Ok(Mesh { agent, warren_client, warren_server, zt_server, zt_client, zt_server_proxy, _processes: processes })
    }
}

/// A deterministic payload that no two offsets of share (a shifted echo would not compare equal).
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3]).collect()
}

fn warren_to_ztunnel(mesh: &Mesh) -> Result<()> {
    let to = SocketAddr::new(mesh.zt_server.ip.into(), ECHO_PORT);
    let result = mesh.warren_client.send(to, MIB)?;
    ensure!(result.ok, "Warren → ztunnel: the echo of 1 MiB failed: {result:?}");
    let table = mesh.agent.connections()?;
    let closed = table["recently_closed"].as_array().cloned().unwrap_or_default();
    let tunnel = closed.iter().find(|c| c["original_dst"] == to.to_string().as_str());
    let tunnel = tunnel.with_context(|| format!("Warren's agent has no connection to {to}: {table}"))?;
    ensure!(tunnel["protocol"] == "hbone", "Warren → ztunnel went as {}, not HBONE: {tunnel}", tunnel["protocol"]);
    ensure!(tunnel["peer_identity"] == identity(&mesh.zt_server).as_str(), "Warren saw the wrong peer: {tunnel}");
    ensure!(tunnel["sent_bytes"] == MIB as u64, "Warren sent {} bytes, not 1 MiB: {tunnel}", tunnel["sent_bytes"]);
    let client = identity(&mesh.warren_client);
    let logged = eventually(Duration::from_secs(5), || {
        let proxy = &mesh.zt_server_proxy;
        (proxy.stdout() + &proxy.stderr()).contains(&client).then_some(())
    });
    ensure!(logged.is_some(), "ztunnel never named Warren's client {client}: {}", mesh.zt_server_proxy.stdout());
    let log = mesh.zt_server_proxy.stdout() + &mesh.zt_server_proxy.stderr();
    let request = log.lines().find(|l| l.contains("received request")).unwrap_or_default();
    let forwarded = format!("for=\\\"{}:", mesh.warren_client.ip);
    for header in ["\"forwarded\"", &forwarded, "\"baggage\"", "k8s.namespace.name=default", "\"traceparent\""] {
        ensure!(request.contains(header), "Warren's CONNECT as ztunnel logged it lacks {header}: {request}");
    }
    Ok(())
}

fn ztunnel_to_warren(mesh: &Mesh) -> Result<()> {
    let to = SocketAddr::new(mesh.warren_server.ip.into(), ECHO_PORT);
    let sent = payload(MIB);
    let echoed = in_netns(&mesh.zt_client.netns, || socks5_echo(to, &sent))??;
    ensure!(echoed == sent, "ztunnel → Warren: the echo differs from what was sent");
    let peer = identity(&mesh.zt_client);
    let seen = eventually(Duration::from_secs(5), || {
        let table = mesh.agent.connections().ok()?;
        let closed = table["recently_closed"].as_array()?.clone();
        closed.into_iter().find(|c| c["original_dst"] == to.to_string().as_str() && c["protocol"] == "hbone")
    });
    let inbound = seen.with_context(|| format!("Warren's agent saw no HBONE connection to {to}: {}", mesh.agent.connections().unwrap_or_default()))?;
    ensure!(inbound["peer_identity"] == peer.as_str(), "Warren saw the wrong peer (want {peer}): {inbound}");
    Ok(())
}

/// Through ztunnel's SOCKS5 listener (RFC 1928, no authentication, CONNECT to an address): sends
/// `data`, half-closes, reads the echo to its end.
fn socks5_echo(to: SocketAddr, data: &[u8]) -> Result<Vec<u8>> {
    let mut stream = TcpStream::connect(ztunnel::SOCKS5).context("connecting to ztunnel's SOCKS5 listener")?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.write_all(&ztunnel::socks5_request(to))?;
    ztunnel::read_socks5_reply(&mut stream, to)?;
    let reader = stream.try_clone()?;
    let receiver = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        let mut echoed = vec![];
        let mut reader = reader;
        reader.read_to_end(&mut echoed)?;
        Ok(echoed)
    });
    stream.write_all(data)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    Ok(receiver.join().map_err(|_| anyhow::anyhow!("the echo reader panicked"))??)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_ztunnel_it_says_how_to_get_one_and_fails() {
        let error = run(None, None).unwrap_err().to_string();
        assert!(error.contains("--ztunnel BIN") && error.contains("recipes/ztunnel"), "{error}");
        let error = run(Some(Path::new("/nonexistent/ztunnel")), Some(Path::new("/tmp"))).unwrap_err().to_string();
        assert!(error.contains("/nonexistent/ztunnel: no such file"), "{error}");
    }

    #[test]
    fn the_payload_never_repeats_at_a_shift() {
        let p = payload(4096);
        assert!((1..64).all(|shift| p[shift..] != p[..4096 - shift]));
    }
}
