//! Istio's ztunnel as a peer on the netns substrate — for `cargo xtask interop` (wire compatibility) and
//! `cargo xtask bench l4 --peer-agent` (the same L4 paths with ztunnel in place of Warren's agent).
//!
//! Nothing of ztunnel is part of this project: the user builds it (with the `testing` feature, for its fake
//! CA) and passes the binary. Each ztunnel runs in dedicated mode inside one pod's netns, with no cluster:
//! its workloads come from a local file ([`local_config`]), its certificates from its fake CA (signed by its
//! test root, `src/tls/root-cert.pem` in its checkout). Dedicated mode has no redirect, so a client sends
//! through its ztunnel's SOCKS5 listener on the pod's loopback ([`SOCKS5`]); the receiving ztunnel serves
//! HBONE on the pod's 15008 and dials the app in its own pod.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};

use crate::{LoadReport, Pod, Process, app, bin_path, eventually, in_netns};

/// The trust domain of the workloads in [`local_config`] (ztunnel's local file would default it to empty).
pub const TRUST_DOMAIN: &str = "cluster.local";
/// ztunnel's SOCKS5 listener, on the loopback of the pod it runs in.
pub const SOCKS5: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15080));
/// ztunnel's HBONE port.
pub const HBONE_PORT: u16 = 15008;

/// The SPIFFE identity ztunnel gives a pod of [`local_config`] (its service account is its name).
pub fn identity(pod: &Pod) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}", pod.namespace, pod.name)
}

/// ztunnel's local config (the file form of its xDS workloads): each pod with its node, as an HBONE
/// workload whose service account is its name.
pub fn local_config(pods: &[(&Pod, &str)]) -> String {
    let mut out = String::from("workloads:\n");
    for (pod, node) in pods {
        out += &format!(
            "- uid: warren//v1/Pod/{ns}/{name}\n  name: {name}\n  namespace: {ns}\n  serviceAccount: {name}\n  \
             workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: {node}\n  network: \"\"\n  services: {{}}\n  \
             trustDomain: {TRUST_DOMAIN}\n",
            ns = pod.namespace,
            name = pod.name,
            ip = pod.ip,
        );
    }
    out
}

/// One ztunnel in `pod`'s netns, dedicated to that pod (`config`: a [`local_config`] file), its SOCKS5
/// listener on; `rust_log` is its RUST_LOG, `env` any further settings (e.g. `POOL_UNUSED_RELEASE_TIMEOUT`).
/// Returns once its HBONE port and its SOCKS5 listener accept connections.
pub fn start(binary: &Path, pod: &Pod, config: &Path, rust_log: &str, env: &[(&str, &str)]) -> Result<Process> {
    ensure!(binary.is_file(), "ztunnel binary {}: no such file", binary.display());
    let mut cmd = Command::new(binary);
    cmd.env("FAKE_CA", "true")
        .env("XDS_ADDRESS", "")
        .env("LOCAL_XDS_PATH", config)
        .env("PROXY_MODE", "dedicated")
        .env("PROXY_WORKLOAD_INFO", format!("{}/{}/{}", pod.namespace, pod.name, pod.name))
        // As root outside in-pod mode, ztunnel would dial the app from the client's address (and the
        // replies would go elsewhere).
        .env("ENABLE_ORIG_SRC", "false")
        .env("UNSTABLE_ENABLE_SOCKS5", "true")
        .env("RUST_LOG", rust_log);
    for (key, value) in env {
        cmd.env(key, value);
    }
    let process = pod.spawn(cmd)?;
    let hbone = SocketAddr::new(pod.ip.into(), HBONE_PORT);
    for listener in [hbone, SOCKS5] {
        let listening = eventually(Duration::from_secs(20), || {
            let up = in_netns(&pod.netns, || TcpStream::connect_timeout(&listener, Duration::from_millis(200)).is_ok());
            up.ok()?.then_some(())
        });
        if listening.is_none() {
            bail!("ztunnel in {} did not listen on {listener}: {}{}", pod.name, process.stdout(), process.stderr());
        }
    }
    Ok(process)
}

/// A SOCKS5 greeting (no authentication) and a CONNECT to `to` (RFC 1928), in one buffer: a client may
/// send both at once, and the first data after them, since ztunnel reads exactly each message.
pub fn socks5_request(to: SocketAddr) -> Vec<u8> {
    let mut request = vec![5, 1, 0, 5, 1, 0];
    match to {
        SocketAddr::V4(v4) => {
            request.push(1);
            request.extend_from_slice(&v4.ip().octets());
        }
        SocketAddr::V6(v6) => {
            request.push(4);
            request.extend_from_slice(&v6.ip().octets());
        }
    }
    request.extend_from_slice(&to.port().to_be_bytes());
    request
}

/// Reads the two answers to [`socks5_request`] (method choice, CONNECT reply) and checks both say yes.
pub fn read_socks5_reply(stream: &mut impl Read, to: SocketAddr) -> Result<()> {
    let mut head = [0u8; 6];
    stream.read_exact(&mut head).with_context(|| format!("SOCKS5 CONNECT {to}: reading the reply"))?;
    ensure!(head[..2] == [5, 0], "SOCKS5: the proxy chose method {:?}, not no-authentication", &head[..2]);
    ensure!(head[2] == 5 && head[3] == 0, "SOCKS5: the proxy refused CONNECT {to} (reply {})", head[3]);
    // The bound address: IPv4, IPv6 or a name, then the port.
    let rest = match head[5] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut len = [0u8];
            stream.read_exact(&mut len)?;
            len[0] as usize + 2
        }
        other => bail!("SOCKS5: reply with address type {other}"),
    };
    stream.read_exact(&mut vec![0u8; rest])?;
    Ok(())
}

/// A connection to `to` from inside `pod` through the SOCKS5 listener of the ztunnel that runs there,
/// handshake done.
pub fn connect(pod: &Pod, to: SocketAddr) -> Result<TcpStream> {
    let mut stream = in_netns(&pod.netns, || TcpStream::connect(SOCKS5))?.context("connecting to ztunnel's SOCKS5 listener")?;
    stream.write_all(&socks5_request(to))?;
    read_socks5_reply(&mut stream, to)?;
    Ok(stream)
}

impl Pod {
    /// [`Pod::connect_times`] through the SOCKS5 proxy at `socks5` (in this pod's netns): each connection
    /// sends the SOCKS5 greeting, its CONNECT and the echo's bytes in one write, as a client would send its
    /// first bytes to a transparent proxy, then reads the proxy's replies and the echo.
    pub fn connect_times_via(&self, socks5: SocketAddr, to: SocketAddr, count: usize, bytes: usize) -> Result<Vec<Duration>> {
        let mut cmd = Command::new(bin_path("warren-testapp")?);
        cmd.args(["connect-times", "--to", &to.to_string(), "--count", &count.to_string(), "--bytes", &bytes.to_string()]);
        cmd.args(["--socks5", &socks5.to_string()]);
        let out = self.run(cmd)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().rev().find(|l| l.starts_with('{')).with_context(|| {
            format!("connect-times printed no result ({}); stderr: {}", out.status, String::from_utf8_lossy(&out.stderr))
        })?;
        let result: serde_json::Value = serde_json::from_str(line)?;
        if result["ok"] != true {
            bail!("{} → {to} via SOCKS5 {socks5}: {}", self.name, result["error"]);
        }
        let micros = result["micros"].as_array().context("no micros")?;
        Ok(micros.iter().filter_map(|m| m.as_u64()).map(Duration::from_micros).collect())
    }

    /// [`Pod::spawn_load`] whose connections go through the SOCKS5 proxy at `socks5` (in this pod's
    /// netns): the handshake once per connection, before its first request.
    pub fn spawn_load_via(&self, socks5: SocketAddr, to: SocketAddr, load: &crate::Load) -> Result<Process> {
        let mut cmd = Command::new(bin_path("warren-testapp")?);
        cmd.args(load.to_args(to)).args(["--socks5", &socks5.to_string()]);
        self.spawn(cmd)
    }

    /// [`Pod::load`] through the SOCKS5 proxy at `socks5`.
    pub fn load_via(&self, socks5: SocketAddr, to: SocketAddr, load: &crate::Load) -> Result<LoadReport> {
        app::load_report(self.spawn_load_via(socks5, to, load)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socks5_request_is_a_greeting_then_a_connect() {
        let to: SocketAddr = "10.244.1.2:7000".parse().unwrap();
        assert_eq!(socks5_request(to), [5, 1, 0, 5, 1, 0, 1, 10, 244, 1, 2, 0x1b, 0x58]);
        let to6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        let request = socks5_request(to6);
        assert_eq!(request[6], 4);
        assert_eq!(request.len(), 7 + 16 + 2);
    }

    #[test]
    fn replies_are_read_to_their_end_and_refusals_are_errors() {
        let to: SocketAddr = "10.244.1.2:7000".parse().unwrap();
        // Yes, then CONNECT ok with a bound IPv4 address; the echo's first byte stays unread.
        let mut ok: &[u8] = &[5, 0, 5, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0x42];
        read_socks5_reply(&mut ok, to).unwrap();
        assert_eq!(ok, [0x42]);
        let mut refused: &[u8] = &[5, 0, 5, 5, 0, 1, 0, 0, 0, 0, 0, 0];
        let error = read_socks5_reply(&mut refused, to).unwrap_err().to_string();
        assert!(error.contains("refused CONNECT 10.244.1.2:7000 (reply 5)"), "{error}");
        let mut method: &[u8] = &[5, 0xff, 5, 0, 0, 1];
        assert!(read_socks5_reply(&mut method, to).is_err());
    }
}
