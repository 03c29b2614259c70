//! AuthorizationPolicy end to end, as Istio's authorization tasks (authz-deny, authz-tcp, authz-ip) run them:
//! users' `security.istio.io/v1` YAML in the controller's directory, pushed to the agents, enforced on real
//! connections between testbed pods — by the kernel (sk_lookup) for plaintext clients where addresses and
//! ports decide, by the server's agent for HBONE clients, whose certificate proves who they are.
//!
//! The mesh of every scenario: on node-1 the clients — `sleep` and `notsleep` (enrolled, namespace
//! default), `curl` (enrolled, namespace foo), `legacy` and `legacy-2` (not enrolled: plaintext); on node-2
//! the server `tcp-echo` (enrolled, echo on 7000). Each pod's service account is its name, so `sleep` is
//! `cluster.local/ns/default/sa/sleep`. Every scenario shows the connection it refuses getting through
//! without the policy (or before it), and asserts the refusals — never only the allows.
use std::{net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use warren_e2e::eventually;
use warren_testbed::{
    Agent, AgentOptions, Controller, ControllerOptions, ECHO_PORT, HoldEvent, Pod, Process, Testbed, bin_path, now_ms,
    require_privileges,
};

const SLEEP: &str = "cluster.local/ns/default/sa/sleep";
const DENIED: &str = "connection denied by AuthorizationPolicy";
const AUDITED: &str = "AuthorizationPolicy AUDIT: connection matches";

/// One mesh per scenario: a controller reading `dir`, an agent per node, the pods above.
struct Mesh {
    _bed: Testbed,
    dir: PathBuf,
    controller: Controller,
    /// node-1's agent (the clients').
    clients: Agent,
    /// node-2's agent (the server's): where inbound policy is enforced.
    agent: Agent,
    server: Pod,
    sleep: Pod,
    notsleep: Pod,
    curl: Pod,
    legacy: Pod,
    legacy2: Pod,
    _serving: Vec<Process>,
}

fn pod_yaml(pod: &Pod, node: &str, enrolled: bool) -> String {
    let opt_out = if enrolled { "" } else { ", warren.dev/mesh: disabled" };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}, uid: {}, labels: {{app: {}{opt_out}}}}}\n\
         spec: {{nodeName: {node}, serviceAccountName: {}, containers: [{{name: app, image: testapp}}]}}\n\
         status: {{phase: Running, podIP: {}}}\n---\n",
        pod.name, pod.namespace, pod.uid, pod.name, pod.name, pod.ip
    )
}

fn namespace_yaml(name: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{warren.dev/mesh: enabled}}}}\n---\n")
}

/// Builds the mesh and runs `steps` on it; a failure comes with the tail of every component's log.
fn scenario(label: &str, steps: impl FnOnce(&mut Mesh) -> Result<()>) -> Result<()> {
    let mut mesh = mesh(label)?;
    steps(&mut mesh).map_err(|e| {
        let tail = |log: String| {
            log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
        };
        e.context(format!(
            "server agent (node-2):\n{}\n\nclient agent (node-1):\n{}\n\ncontroller:\n{}",
            tail(mesh.agent.log()),
            tail(mesh.clients.log()),
            tail(mesh.controller.log())
        ))
    })
}

fn mesh(label: &str) -> Result<Mesh> {
    let bed = Testbed::new(label)?;
    let (n1, n2) = (bed.add_node("node-1")?, bed.add_node("node-2")?);
    let sleep = n1.add_pod("sleep", true)?;
    let notsleep = n1.add_pod("notsleep", true)?;
    let curl = n1.add_pod_in("foo", "curl", true)?;
    let legacy = n1.add_pod("legacy", false)?;
    let legacy2 = n1.add_pod("legacy-2", false)?;
    let server = n2.add_pod("tcp-echo", true)?;
    let serving = vec![server.serve("v1")?];

    let dir = bed.state_dir().join("mesh-config");
    std::fs::create_dir_all(&dir)?;
    let mut yaml = namespace_yaml("default") + &namespace_yaml("foo");
    for pod in [&sleep, &notsleep, &curl] {
        yaml += &pod_yaml(pod, "node-1", true);
    }
    for pod in [&legacy, &legacy2] {
        yaml += &pod_yaml(pod, "node-1", false);
    }
    yaml += &pod_yaml(&server, "node-2", true);
    std::fs::write(dir.join("00-mesh.yaml"), yaml)?;
    let controller = bed.start_controller(ControllerOptions {
        config_dir: Some(dir.clone()),
        kubeconfig: None,
        push_port: 0,
        config_poll_ms: None,
    })?;
    let options = AgentOptions {
        mtls: true,
        controller: Some(controller.address()),
        ebpf_log_level: "info",
        ..Default::default()
    };
    for node in [&n1, &n2] {
        node.reach_host_port(controller.push_port)?;
    }
    let clients = n1.start_agent_with(options.clone())?;
    let agent = n2.start_agent_with(options)?;
    for pod in [&sleep, &notsleep, &curl] {
        clients.wait_enrolled(pod, true, Duration::from_secs(15))?;
    }
    agent.wait_enrolled(&server, true, Duration::from_secs(15))?;
    Ok(Mesh {
        _bed: bed,
        dir,
        controller,
        clients,
        agent,
        server,
        sleep,
        notsleep,
        curl,
        legacy,
        legacy2,
        _serving: serving,
    })
}

/// What the server's agent counted so far.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Counters {
    /// sk_lookup refused (warren_ebpf_events{event="inbound_denied"}).
    kernel_denied: f64,
    /// Connections the agent accepted inbound (HBONE streams and plaintext).
    inbound_opened: f64,
    /// Inbound connections the agent refused by policy (HBONE 401s, plaintext resets).
    policy_refused: f64,
    /// Denial log lines.
    denial_lines: usize,
}

impl Mesh {
    fn counters(&self) -> Result<Counters> {
        Ok(Counters {
            kernel_denied: self.agent.metric("warren_ebpf_events_total", &[("event", "inbound_denied")])?,
            inbound_opened: self.agent.metric("warren_tcp_connections_opened_total", &[("direction", "inbound")])?,
            policy_refused: self.agent.metric("warren_inbound_policy_refused_total", &[])?,
            denial_lines: self.denials().len(),
        })
    }

    /// The server agent's denial log lines, oldest first.
    fn denials(&self) -> Vec<String> {
        self.agent.log().lines().filter(|l| l.contains(DENIED)).map(str::to_string).collect()
    }

    /// The denial lines after the first `skip` that `enforcer` wrote, once there is one: the agent's log
    /// reaches the test through a pipe (and kernel denials reach the log through the agent's ring reader),
    /// so a line can trail the counters by a moment.
    fn new_denials(&self, skip: usize, enforcer: &str) -> Result<Vec<String>> {
        let tag = format!("enforcer=\"{enforcer}\"");
        eventually(Duration::from_secs(2), || {
            let lines: Vec<String> = self.denials().into_iter().skip(skip).filter(|l| l.contains(&tag)).collect();
            (!lines.is_empty()).then_some(lines)
        })
        .with_context(|| format!("no {enforcer} denial line in the agent's log after line {skip}"))
    }

    fn version(&self) -> Result<u64> {
        self.agent.config()?["version"].as_u64().context("no version in /config")
    }

    /// Writes `yaml` as `<name>.yaml` in the controller's directory and waits until the server's agent holds
    /// the version it makes; returns when the agent applied it (its clock, ms since the epoch).
    fn apply(&self, name: &str, yaml: &str) -> Result<u128> {
        let before = self.version()?;
        std::fs::write(self.dir.join(format!("{name}.yaml")), yaml)?;
        self.wait_version_after(before)
    }

    fn remove(&self, name: &str) -> Result<u128> {
        let before = self.version()?;
        std::fs::remove_file(self.dir.join(format!("{name}.yaml")))?;
        self.wait_version_after(before)
    }

    fn wait_version_after(&self, before: u64) -> Result<u128> {
        // The push status is written just after the tables take force: wait for both.
        let config = self.agent.wait_config(Duration::from_secs(5), |c| {
            c["version"].as_u64().is_some_and(|v| v > before) && c["push"]["version"] == c["version"]
        })?;
        Ok(u128::from(config["push"]["appliedAtUnixMs"].as_u64().context("no push status")?))
    }

    fn enrolled(&self, pod: &Pod) -> bool {
        ![&self.legacy, &self.legacy2].iter().any(|p| p.uid == pod.uid)
    }

    fn target(&self, port: u16) -> SocketAddr {
        self.server.socket(port)
    }

    /// `from` reaches the server on `port` with a byte-exact echo; an enrolled client over HBONE, as itself.
    fn assert_in(&self, from: &Pod, port: u16) -> Result<()> {
        let sent = from.send(self.target(port), 16 << 10)?;
        ensure!(sent.ok, "{} → {}: must get in, got {sent:?}", from.name, self.target(port));
        let connections = self.agent.connections()?;
        let inbound = connections["recently_closed"].as_array().and_then(|all| {
            all.iter().rev().find(|c| c["direction"] == "inbound" && c["original_dst"] == self.target(port).to_string())
        });
        let inbound = inbound.with_context(|| format!("the server's agent has no record of {} → {port}", from.name))?;
        if self.enrolled(from) {
            let identity = format!("spiffe://cluster.local/ns/{}/sa/{}", from.namespace, from.name);
            ensure!(
                inbound["protocol"] == "hbone" && inbound["peer_identity"] == identity.as_str(),
                "{} must arrive over HBONE as {identity}: {inbound:#}",
                from.name
            );
        }
        Ok(())
    }

    /// An enrolled client refused by the server's agent: its CONNECT gets 401, as ztunnel answers (the
    /// client's agent says so), the client's connection fails without a byte echoed, the agent opens
    /// nothing inbound, and the denial lines name `policy` (`ns/name` or `-`), `action` and the client's
    /// identity. (How many CONNECTs one refused connection makes is
    /// [`one_denied_connection_is_one_decision`]'s business.)
    fn assert_refused_over_hbone(&self, from: &Pod, port: u16, policy: &str, action: &str) -> Result<()> {
        let before = self.counters()?;
        let sent = from.send(self.target(port), 16 << 10)?;
        ensure!(!sent.ok && sent.received == 0, "{} → {port}: must be refused, got {sent:?}", from.name);
        let after = self.counters()?;
        ensure!(after.policy_refused > before.policy_refused, "a policy refusal: {before:?} → {after:?}");
        ensure!(after.inbound_opened == before.inbound_opened, "no inbound connection opened: {before:?} → {after:?}");
        let lines = self.new_denials(before.denial_lines, "hbone").with_context(|| format!("{} → {port}", from.name))?;
        let principal = format!("cluster.local/ns/{}/sa/{}", from.namespace, from.name);
        for line in &lines {
            for field in [
                format!("policy={policy} "),
                format!("action=\"{action}\""),
                "enforcer=\"hbone\"".to_string(),
                format!("peer=Some(\"{principal}\")"),
                format!("client={}:", from.ip),
                format!("destination={}", self.target(port)),
            ] {
                ensure!(line.contains(&field), "the denial line must say {field}: {line}");
            }
        }
        // The client's side saw the refusal: its agent's outbound leg failed with the server's 401.
        let outbound = self.clients.connections()?["recently_closed"]
            .as_array()
            .and_then(|all| all.iter().rev().find(|c| c["direction"] == "outbound").cloned())
            .context("no outbound record on the client's agent")?;
        let error = outbound["error"].as_str().unwrap_or_default();
        ensure!(error.contains("401 Unauthorized"), "the client's agent must report the 401: {outbound:#}");
        Ok(())
    }

    /// A plaintext client refused by the kernel: "connection refused" at connect, sk_lookup's counter up by
    /// one, and the agent never saw the connection.
    fn assert_refused_in_kernel(&self, from: &Pod, port: u16) -> Result<()> {
        let before = self.counters()?;
        let sent = from.send(self.target(port), 16 << 10)?;
        let error = sent.error.clone().unwrap_or_default();
        let after = self.counters()?;
        ensure!(
            !sent.ok && error.contains("Connection refused"),
            "{} → {port}: must be refused at connect, got {sent:?} ({before:?} → {after:?})",
            from.name
        );
        ensure!(after.kernel_denied == before.kernel_denied + 1.0, "refused in the kernel: {before:?} → {after:?}");
        ensure!(
            after.inbound_opened == before.inbound_opened && after.policy_refused == before.policy_refused,
            "the agent must never see it: {before:?} → {after:?}"
        );
        // The kernel's record reaches the agent's log (before the next step counts lines).
        self.new_denials(before.denial_lines, "kernel").with_context(|| format!("{} → {port}", from.name))?;
        Ok(())
    }

    /// `warren-controller analyze --config-dir` on the mesh's directory: (success, stdout).
    fn analyze(&self) -> Result<(bool, String)> {
        let out =
            Command::new(bin_path("warren-controller")?).args(["analyze", "--config-dir"]).arg(&self.dir).output()?;
        Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned()))
    }

    /// `inspect policies --hits -o json` on the server's node: the server workload's rows as
    /// (policy, action, [allowed, denied, audited]), in the order the agent evaluates them.
    fn hits(&self) -> Result<Vec<(String, String, [u64; 3])>> {
        let view: serde_json::Value =
            serde_json::from_str(&self.agent.inspect_live(&["policies", "--hits", "-o", "json"])?)?;
        let workload = view["workloads"]
            .as_array()
            .and_then(|w| w.iter().find(|w| w["workload"] == "default/tcp-echo"))
            .with_context(|| format!("no default/tcp-echo in {view:#}"))?;
        let rows = workload["policies"].as_array().cloned().unwrap_or_default();
        Ok(rows
            .iter()
            .map(|p| {
                let h = &p["hits"];
                let n = |k: &str| h[k].as_u64().unwrap_or(u64::MAX);
                (
                    p["policy"].as_str().unwrap_or("?").to_string(),
                    p["action"].as_str().unwrap_or("?").to_string(),
                    [n("allowed"), n("denied"), n("audited")],
                )
            })
            .collect())
    }

    /// The kernel's plaintext table on the server's node, as `inspect policies -o json` shows it:
    /// (destination, port (`None`: every other port), source prefix, allowed, decided by).
    fn kernel_table(&self) -> Result<Vec<(String, Option<u64>, String, bool, String)>> {
        let view: serde_json::Value = serde_json::from_str(&self.agent.inspect_live(&["policies", "-o", "json"])?)?;
        let entries = view["kernel"].as_array().with_context(|| format!("no kernel table in {view:#}"))?;
        Ok(entries
            .iter()
            .map(|k| {
                let text = |key: &str| k[key].as_str().unwrap_or_default().to_string();
                (text("destination"), k["port"].as_u64(), text("source"), k["allowed"] == true, text("decidedBy"))
            })
            .collect())
    }

    fn decisions(&self, policy: &str, action: &str, decision: &str) -> Result<f64> {
        self.agent
            .metric("warren_authz_decisions_total", &[("policy", policy), ("action", action), ("decision", decision)])
    }

    /// Waits for a controller log line containing every one of `parts`.
    fn controller_says(&self, parts: &[&str]) -> Result<String> {
        eventually(Duration::from_secs(5), || {
            self.controller.log().lines().find(|l| parts.iter().all(|p| l.contains(p))).map(str::to_string)
        })
        .with_context(|| format!("no controller log line with {parts:?}:\n{}", self.controller.log()))
    }
}

/// Istio's policy on `app: tcp-echo` with `action` and one `rule` (YAML under `rules:`, indented 2).
fn policy(name: &str, action: &str, rule: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: default\n\
         spec:\n  selector:\n    matchLabels:\n      app: tcp-echo\n  action: {action}\n  rules:\n{rule}"
    )
}

fn from_principals(principals: &str) -> String {
    format!("  - from:\n    - source:\n        principals: [{principals}]\n")
}

// ------------------------------------------------------------------------------------------------
// authz-deny: allow-nothing
// ------------------------------------------------------------------------------------------------

/// `spec: {}` in a namespace allows nothing there: the enrolled client is refused by the server's agent
/// (401), the plaintext client by the kernel; deleting it lets both in again.
#[test]
fn allow_nothing_refuses_hbone_and_plaintext_clients() -> Result<()> {
    require_privileges!(Ok(()));
    scenario("authz-nothing", |mesh| {
        mesh.assert_in(&mesh.sleep, ECHO_PORT)?;
        mesh.assert_in(&mesh.legacy, ECHO_PORT)?;

        mesh.apply(
            "allow-nothing",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-nothing\n  namespace: default\nspec:\n  {}\n",
        )?;
        mesh.assert_refused_over_hbone(&mesh.sleep, ECHO_PORT, "-", "ALLOW")?;
        mesh.assert_refused_over_hbone(&mesh.curl, ECHO_PORT, "-", "ALLOW")
            .context("allow-nothing is the server's namespace's")?;
        mesh.assert_refused_in_kernel(&mesh.legacy, ECHO_PORT)?;

        mesh.remove("allow-nothing")?;
        mesh.assert_in(&mesh.sleep, ECHO_PORT)?;
        mesh.assert_in(&mesh.legacy, ECHO_PORT)
    })
}

// ------------------------------------------------------------------------------------------------
// ALLOW by principal, by namespace
// ------------------------------------------------------------------------------------------------

/// ALLOW from `cluster.local/ns/default/sa/sleep`: sleep in; every other client — enrolled, in another
/// namespace, or plaintext (no identity at all) — out.
#[test]
fn allow_only_the_sleep_principal() -> Result<()> {
    require_privileges!(Ok(()));
    scenario("authz-principal", |mesh| {
        mesh.assert_in(&mesh.notsleep, ECHO_PORT)?;
        mesh.assert_in(&mesh.legacy, ECHO_PORT)?;

        mesh.apply("allow-sleep", &policy("allow-sleep", "ALLOW", &from_principals(&format!("\"{SLEEP}\""))))?;
        mesh.assert_in(&mesh.sleep, ECHO_PORT)?;
        mesh.assert_refused_over_hbone(&mesh.notsleep, ECHO_PORT, "-", "ALLOW")?;
        mesh.assert_refused_over_hbone(&mesh.curl, ECHO_PORT, "-", "ALLOW")?;
        mesh.assert_refused_in_kernel(&mesh.legacy, ECHO_PORT)?;
        mesh.assert_refused_in_kernel(&mesh.legacy2, ECHO_PORT)?;
        // The agent's view: the policy, then "no ALLOW matched" (what refused the others).
        let policies = mesh.agent.inspect_live(&["policies"])?;
        ensure!(
            policies.contains("default/allow-sleep") && policies.contains("ALLOW (none matched: deny)"),
            "{policies}"
        );
        Ok(())
    })
}

/// ALLOW from namespace foo: `curl` (namespace foo, its certificate says so) in; `sleep` (default) and the
/// plaintext client out.
#[test]
fn allow_only_from_namespace_foo() -> Result<()> {
    require_privileges!(Ok(()));
    scenario("authz-namespace", |mesh| {
        mesh.assert_in(&mesh.sleep, ECHO_PORT)?;
        mesh.assert_in(&mesh.legacy, ECHO_PORT)?;

        mesh.apply(
            "allow-foo",
            &policy("allow-foo", "ALLOW", "  - from:\n    - source:\n        namespaces: [\"foo\"]\n"),
        )?;
        mesh.assert_in(&mesh.curl, ECHO_PORT)?;
        // The identity comes from the controller's workload table: curl's certificate is foo's.
        let certificates: serde_json::Value = serde_json::from_str(&mesh.clients.get("/certificates")?)?;
        let identities: Vec<&str> =
            certificates.as_array().into_iter().flatten().filter_map(|c| c["identity"].as_str()).collect();
        ensure!(
            identities.contains(&"spiffe://cluster.local/ns/foo/sa/curl"),
            "node-1's agent must hold curl's foo identity: {identities:?}"
        );
        mesh.assert_refused_over_hbone(&mesh.sleep, ECHO_PORT, "-", "ALLOW")?;
        mesh.assert_refused_over_hbone(&mesh.notsleep, ECHO_PORT, "-", "ALLOW")?;
        mesh.assert_refused_in_kernel(&mesh.legacy, ECHO_PORT)
    })
}

// ------------------------------------------------------------------------------------------------
// authz-ip: DENY by ipBlocks, in the kernel
// ------------------------------------------------------------------------------------------------

/// DENY from the plaintext client's /32: refused by sk_lookup (the agent never sees it), named in the
/// agent's log, metrics and hits from the kernel's denial record; a client outside the block still in.
#[test]
fn deny_an_ip_block_in_the_kernel() -> Result<()> {
    require_privileges!(Ok(()));
    scenario("authz-ip", |mesh| {
        mesh.assert_in(&mesh.legacy, ECHO_PORT)?;

        let block = format!("{}/32", mesh.legacy.ip);
        mesh.apply(
            "deny-legacy",
            &policy("deny-legacy", "DENY", &format!("  - from:\n    - source:\n        ipBlocks: [\"{block}\"]\n")),
        )?;
        let kernel = mesh.kernel_table()?;
        let want = (mesh.server.ip.to_string(), None, block.clone(), false, "default/deny-legacy#0".to_string());
        ensure!(kernel.contains(&want), "no kernel entry {want:?}: {kernel:?}");
        mesh.assert_refused_in_kernel(&mesh.legacy, ECHO_PORT)?;
        mesh.assert_in(&mesh.legacy2, ECHO_PORT).context("legacy-2 is outside the block")?;
        mesh.assert_in(&mesh.sleep, ECHO_PORT)?;

        // The kernel's denial reaches the agent: one line naming the policy and rule, the decision counted.
        let line = eventually(Duration::from_secs(2), || {
            mesh.denials().into_iter().find(|l| l.contains("enforcer=\"kernel\""))
        })
        .with_context(|| format!("no kernel denial line in the agent's log:\n{}", mesh.agent.log()))?;
        for field in
            ["policy=default/deny-legacy ", "rule=Some(0)", "action=\"DENY\"", &format!("client={}:", mesh.legacy.ip)]
        {
            ensure!(line.contains(field), "the denial line must say {field}: {line}");
        }
        ensure!(mesh.decisions("default/deny-legacy", "DENY", "deny")? == 1.0, "{}", mesh.agent.get("/metrics")?);
        let hits = mesh.hits()?;
        ensure!(hits.first().is_some_and(|(p, _, h)| p == "default/deny-legacy" && h[1] == 1), "{hits:?}");
        Ok(())
    })
}

// ------------------------------------------------------------------------------------------------
// authz-tcp: ALLOW by port
// ------------------------------------------------------------------------------------------------

/// ALLOW `to: ports ["9080"]` on a workload listening on 9080 and 9090: 9080 works for every client; 9090
/// (and the echo port) are refused — in the kernel for the plaintext client, never reaching the agent.
#[test]
fn allow_one_port_refuses_the_others_in_the_kernel() -> Result<()> {
    require_privileges!(Ok(()));
    scenario("authz-tcp", |mesh| {
        let serving = [mesh.server.serve_echo(9080)?, mesh.server.serve_echo(9090)?];
        mesh._serving.extend(serving);
        for port in [9080, 9090] {
            mesh.assert_in(&mesh.legacy, port)?;
            mesh.assert_in(&mesh.sleep, port)?;
        }

        mesh.apply(
            "tcp-policy",
            &policy("tcp-policy", "ALLOW", "  - to:\n    - operation:\n        ports: [\"9080\"]\n"),
        )?;
        mesh.assert_in(&mesh.legacy, 9080)?;
        mesh.assert_in(&mesh.sleep, 9080)?;
        mesh.assert_refused_in_kernel(&mesh.legacy, 9090)?;
        mesh.assert_refused_in_kernel(&mesh.legacy, ECHO_PORT)?;
        mesh.assert_refused_over_hbone(&mesh.sleep, 9090, "-", "ALLOW")?;
        // The kernel's table: 9080 allowed, every other port refused, for every source.
        let kernel = mesh.kernel_table()?;
        let ip = mesh.server.ip.to_string();
        for want in [(ip.clone(), Some(9080), "0.0.0.0/0".to_string(), true), (ip, None, "0.0.0.0/0".to_string(), false)] {
            ensure!(kernel.iter().any(|k| (k.0.clone(), k.1, k.2.clone(), k.3) == want), "no kernel entry {want:?}: {kernel:?}");
        }
        Ok(())
    })
}

// ------------------------------------------------------------------------------------------------
// DENY with notPrincipals
// ------------------------------------------------------------------------------------------------

/// DENY from `notPrincipals: [sleep]`: only sleep gets in; another enrolled client and the plaintext one
/// (no principal is "not sleep" too) are denied, by this policy's rule.
#[test]
fn deny_everyone_but_sleep() -> Result<()> {
    require_privileges!(Ok(()));
    scenario("authz-notprincipals", |mesh| {
        mesh.assert_in(&mesh.notsleep, ECHO_PORT)?;
        mesh.assert_in(&mesh.legacy, ECHO_PORT)?;

        let rule = format!("  - from:\n    - source:\n        notPrincipals: [\"{SLEEP}\"]\n");
        mesh.apply("deny-not-sleep", &policy("deny-not-sleep", "DENY", &rule))?;
        mesh.assert_in(&mesh.sleep, ECHO_PORT)?;
        mesh.assert_refused_over_hbone(&mesh.notsleep, ECHO_PORT, "default/deny-not-sleep", "DENY")?;
        mesh.assert_refused_over_hbone(&mesh.curl, ECHO_PORT, "default/deny-not-sleep", "DENY")?;
        let line = mesh.denials().pop().unwrap_or_default();
        ensure!(line.contains("rule=Some(0)"), "{line}");
        mesh.assert_refused_in_kernel(&mesh.legacy, ECHO_PORT)
    })
}

// ------------------------------------------------------------------------------------------------
// AUDIT and CUSTOM
// ------------------------------------------------------------------------------------------------

/// AUDIT from sleep: nobody is blocked; sleep's connection (and only sleep's) is logged as an AUDIT match
/// naming the policy, and `inspect policies --hits` counts it as audited.
#[test]
fn audit_logs_matches_and_blocks_nothing() -> Result<()> {
    require_privileges!(Ok(()));
    scenario("authz-audit", |mesh| {
        mesh.apply("audit-sleep", &policy("audit-sleep", "AUDIT", &from_principals(&format!("\"{SLEEP}\""))))?;
        let before = mesh.counters()?;
        mesh.assert_in(&mesh.sleep, ECHO_PORT)?;
        mesh.assert_in(&mesh.notsleep, ECHO_PORT)?;
        mesh.assert_in(&mesh.legacy, ECHO_PORT)?;
        let after = mesh.counters()?;
        ensure!(
            after.denial_lines == before.denial_lines && after.kernel_denied == before.kernel_denied,
            "{before:?} → {after:?}"
        );

        let log = mesh.agent.log();
        let audits: Vec<&str> = log.lines().filter(|l| l.contains(AUDITED)).collect();
        ensure!(audits.len() == 1, "exactly sleep's connection matches the AUDIT rule: {audits:#?}");
        for field in ["policy=default/audit-sleep", "rule=0", &format!("peer=Some(\"{SLEEP}\")"), "allowed=true"] {
            ensure!(audits[0].contains(field), "the AUDIT line must say {field}: {}", audits[0]);
        }
        let hits = mesh.hits()?;
        ensure!(hits == [("default/audit-sleep".to_string(), "AUDIT".to_string(), [0, 0, 1])], "{hits:?}");
        let table = mesh.agent.inspect_live(&["policies", "--hits"])?;
        let row = table.lines().find(|l| l.contains("default/audit-sleep")).unwrap_or_default();
        ensure!(
            row.split_whitespace().collect::<Vec<_>>()
                == ["default/tcp-echo", "1", "default/audit-sleep", "AUDIT", "1", "0", "0", "1"],
            "{table}"
        );
        Ok(())
    })
}

/// CUSTOM (external authorization, Istio's ext-authz task): reported as not supported — the controller's
/// log and `analyze` (WAR0101 on spec.action) — and enforced as DENY, failing closed: its rule's path
/// cannot be checked at L4, so it denies every connection it selects.
#[test]
fn custom_is_reported_unsupported_and_denies() -> Result<()> {
    require_privileges!(Ok(()));
    scenario("authz-custom", |mesh| {
        mesh.assert_in(&mesh.sleep, ECHO_PORT)?;
        mesh.assert_in(&mesh.legacy, ECHO_PORT)?;

        let custom = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: ext-authz\n  namespace: default\n\
            spec:\n  selector:\n    matchLabels:\n      app: tcp-echo\n  action: CUSTOM\n  provider:\n    name: sample-ext-authz-grpc\n\
            \x20 rules:\n  - to:\n    - operation:\n        paths: [\"/headers\"]\n";
        mesh.apply("ext-authz", custom)?;
        let line = mesh.controller_says(&["AuthorizationPolicy", "ext-authz", "does not honour"])?;
        ensure!(line.contains("spec.action"), "the controller must name spec.action: {line}");
        let (ok, report) = mesh.analyze()?;
        let warning = "Warning [WAR0101] (AuthorizationPolicy default/ext-authz ext-authz.yaml:1) spec.action: CUSTOM (external \
            authorization) is not supported: fail closed";
        ensure!(report.contains(warning), "analyze must warn about CUSTOM:\n{report}");
        ensure!(ok, "a warning is not an error:\n{report}");

        mesh.assert_refused_over_hbone(&mesh.sleep, ECHO_PORT, "default/ext-authz", "DENY")?;
        mesh.assert_refused_in_kernel(&mesh.legacy, ECHO_PORT)?;
        mesh.remove("ext-authz")?;
        mesh.assert_in(&mesh.sleep, ECHO_PORT)
    })
}

// ------------------------------------------------------------------------------------------------
// Changes: new connections and established ones
// ------------------------------------------------------------------------------------------------

/// How long after `since` (ms since the epoch) `check` first holds, polling; `None` if not within 5 s.
fn first_time(since: u128, mut check: impl FnMut() -> Result<bool>) -> Result<Option<u128>> {
    let at = eventually(Duration::from_secs(5), || match check() {
        Ok(true) => Some(Ok(now_ms())),
        Ok(false) => None,
        Err(e) => Some(Err(e)),
    });
    at.transpose().map(|at| at.map(|at| at.saturating_sub(since)))
}

/// What one policy change took, in ms.
struct ChangeFigures {
    /// File written → the server's agent holds the new version (includes the controller's 200 ms poll).
    write_to_agent: u128,
    /// The agent holds it → a new connection is decided by it.
    agent_to_new: Option<u128>,
    /// How the established connections it denies ended (busy, waiting), as their clients saw it.
    closed: [Option<HoldEvent>; 2],
    /// When the agent held it (ms since the epoch).
    applied: u128,
}

impl ChangeFigures {
    const HEADER: &str = "policy change (ms)                                  write→agent  agent→closed (busy, waiting)  agent→new  write→new";

    fn agent_to_closed(&self) -> [Option<u128>; 2] {
        self.closed.each_ref().map(|c| c.as_ref().map(|c| c.at_ms.saturating_sub(self.applied)))
    }

    fn row(&self, what: &str) -> String {
        let ms = |v: Option<u128>| v.map_or("open >5s".to_string(), |v| v.to_string());
        let [busy, waiting] = self.agent_to_closed();
        format!(
            "{what:<52} {:>11}  {:>13}, {:<14} {:>9}  {:>9}",
            self.write_to_agent,
            ms(busy),
            ms(waiting),
            ms(self.agent_to_new),
            self.agent_to_new.map_or("-".to_string(), |v| (v + self.write_to_agent).to_string())
        )
    }
}

/// A changed policy applies to new connections at once, and established connections it denies are closed
/// — a client exchanging data and one waiting for the server alike — while those it still allows stay
/// open: no policy → ALLOW only sleep → ALLOW only notsleep. Prints the figures, from the agent holding the
/// new version and from the file write.
#[test]
fn a_changed_policy_applies_to_new_and_established_connections() -> Result<()> {
    require_privileges!(Ok(()));
    scenario("authz-change", |mesh| {
        let target = mesh.target(ECHO_PORT);
        let probing = Some(Duration::from_millis(20));
        let sleep_busy = mesh.sleep.hold_connection(target, probing)?;
        let sleep_waiting = mesh.sleep.hold_connection(target, None)?;
        let legacy_busy = mesh.legacy.hold_connection(target, probing)?;
        let legacy_waiting = mesh.legacy.hold_connection(target, None)?;
        let all = [&sleep_busy, &sleep_waiting, &legacy_busy, &legacy_waiting];

        // Control: a change that denies none leaves all open, the busy ones carrying data.
        mesh.apply("audit-sleep", &policy("audit-sleep", "AUDIT", &from_principals(&format!("\"{SLEEP}\""))))?;
        let probes = (sleep_busy.probes(), legacy_busy.probes());
        std::thread::sleep(Duration::from_millis(1000));
        for held in all {
            ensure!(held.closed()?.is_none(), "an AUDIT policy must close nothing: {:?}", held.closed()?);
        }
        ensure!(sleep_busy.probes() > probes.0 && legacy_busy.probes() > probes.1, "the connections still carry data");

        // ALLOW only sleep: legacy's established plaintext connections are closed; sleep's stay.
        let written = now_ms();
        let applied = mesh.apply("allow", &policy("allow", "ALLOW", &from_principals(&format!("\"{SLEEP}\""))))?;
        let refused = first_time(applied, || Ok(!mesh.notsleep.send(target, 1024)?.ok))?;
        let legacy_closed =
            [legacy_busy.wait_closed(Duration::from_secs(5))?, legacy_waiting.wait_closed(Duration::from_secs(2))?];
        let to_sleep = ChangeFigures {
            write_to_agent: applied.saturating_sub(written),
            agent_to_new: refused,
            closed: legacy_closed,
            applied,
        };
        ensure!(
            sleep_busy.closed()?.is_none() && sleep_waiting.closed()?.is_none(),
            "sleep is still allowed: its connections stay open"
        );
        mesh.assert_refused_over_hbone(&mesh.notsleep, ECHO_PORT, "-", "ALLOW")?;
        mesh.assert_refused_in_kernel(&mesh.legacy, ECHO_PORT)?;

        // ALLOW only notsleep: now sleep's established HBONE connections must go.
        let written = now_ms();
        let rule = from_principals("\"cluster.local/ns/default/sa/notsleep\"");
        let applied = mesh.apply("allow", &policy("allow", "ALLOW", &rule))?;
        let admitted = first_time(applied, || Ok(mesh.notsleep.send(target, 1024)?.ok))?;
        let sleep_closed =
            [sleep_busy.wait_closed(Duration::from_secs(5))?, sleep_waiting.wait_closed(Duration::from_secs(2))?];
        let to_notsleep = ChangeFigures {
            write_to_agent: applied.saturating_sub(written),
            agent_to_new: admitted,
            closed: sleep_closed,
            applied,
        };
        eprintln!("{}", ChangeFigures::HEADER);
        eprintln!("{}", to_sleep.row("ALLOW sleep: legacy (TCP) closed; notsleep refused"));
        eprintln!("{}", to_notsleep.row("ALLOW notsleep: sleep (HBONE) closed; notsleep in"));
        mesh.assert_refused_over_hbone(&mesh.sleep, ECHO_PORT, "-", "ALLOW")?;

        // The server's agent says why it closed them: legacy's two, then sleep's two.
        let closed_records: Vec<serde_json::Value> = mesh.agent.connections()?["recently_closed"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["error"].as_str().is_some_and(|e| e.starts_with("closed: AuthorizationPolicy now denies it")))
            .cloned()
            .collect();
        let protocols: Vec<&str> = closed_records.iter().filter_map(|c| c["protocol"].as_str()).collect();
        ensure!(
            protocols == ["tcp", "tcp", "hbone", "hbone"],
            "the agent closed legacy's, then sleep's connections: {closed_records:#?}"
        );

        for (who, figures) in [("legacy (plaintext)", &to_sleep), ("sleep (HBONE)", &to_notsleep)] {
            for (client, closed) in ["exchanging data", "waiting for the server"].iter().zip(figures.agent_to_closed())
            {
                let closed = closed.with_context(|| {
                    format!("{who}, {client}: the established connection the change denies is still open for its client 5 s on")
                })?;
                ensure!(closed < 1000, "{who}, {client}: closed {closed} ms after the agent held the change");
            }
            let new =
                figures.agent_to_new.with_context(|| format!("{who}: new connections did not follow within 5 s"))?;
            ensure!(new < 1000, "{who}: new connections followed {new} ms after the agent held the change");
        }
        Ok(())
    })
}

// ------------------------------------------------------------------------------------------------
// Fail closed
// ------------------------------------------------------------------------------------------------

/// An invalid edit of a valid ALLOW policy (a prefix length of 33) is refused by the controller with the
/// field named, and the last valid generation stays in force: sleep still in, notsleep still out — the
/// edit neither widens access (dropped) nor narrows it (a stand-in allowing nothing).
#[test]
fn an_invalid_edit_keeps_the_last_valid_policy() -> Result<()> {
    require_privileges!(Ok(()));
    scenario("authz-invalid-edit", |mesh| {
        mesh.apply("allow-sleep", &policy("allow-sleep", "ALLOW", &from_principals(&format!("\"{SLEEP}\""))))?;
        mesh.assert_in(&mesh.sleep, ECHO_PORT)?;
        mesh.assert_refused_over_hbone(&mesh.notsleep, ECHO_PORT, "-", "ALLOW")?;

        let version = mesh.version()?;
        let edit = format!(
            "  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/notsleep\"]\n        ipBlocks: [\"{}/33\"]\n",
            mesh.notsleep.ip
        );
        std::fs::write(mesh.dir.join("allow-sleep.yaml"), policy("allow-sleep", "ALLOW", &edit))?;
        let line = mesh.controller_says(&["invalid:", "allow-sleep", "spec.rules[0].from[0].source.ipBlocks[0]"])?;
        ensure!(line.contains("fail_closed=false"), "an object with a valid past keeps it: {line}");
        std::thread::sleep(Duration::from_millis(500));
        ensure!(mesh.version()? == version, "an invalid edit must not make a new version");
        mesh.assert_in(&mesh.sleep, ECHO_PORT)?;
        mesh.assert_refused_over_hbone(&mesh.notsleep, ECHO_PORT, "-", "ALLOW")?;
        mesh.assert_refused_in_kernel(&mesh.legacy, ECHO_PORT)?;
        let (ok, report) = mesh.analyze()?;
        ensure!(
            !ok && report.contains("allow-sleep") && report.contains("spec.rules[0].from[0].source.ipBlocks[0]"),
            "{report}"
        );
        Ok(())
    })
}

/// An ALLOW policy that was never valid (an invalid principal pattern) stands in as "allow nothing": the
/// server everyone reached is refused to all; fixing it applies the policy as meant.
#[test]
fn a_never_valid_policy_fails_closed() -> Result<()> {
    require_privileges!(Ok(()));
    scenario("authz-never-valid", |mesh| {
        mesh.assert_in(&mesh.sleep, ECHO_PORT)?;
        mesh.assert_in(&mesh.notsleep, ECHO_PORT)?;
        mesh.assert_in(&mesh.legacy, ECHO_PORT)?;

        let broken = from_principals("\"cluster.local/ns/*/sa/sleep\"");
        mesh.apply("allow-sleep", &policy("allow-sleep", "ALLOW", &broken))?;
        let line = mesh.controller_says(&["invalid:", "allow-sleep", "spec.rules[0].from[0].source.principals[0]"])?;
        ensure!(line.contains("fail_closed=true"), "{line}");
        mesh.assert_refused_over_hbone(&mesh.sleep, ECHO_PORT, "-", "ALLOW")?;
        mesh.assert_refused_over_hbone(&mesh.notsleep, ECHO_PORT, "-", "ALLOW")?;
        mesh.assert_refused_in_kernel(&mesh.legacy, ECHO_PORT)?;

        mesh.apply("allow-sleep", &policy("allow-sleep", "ALLOW", &from_principals(&format!("\"{SLEEP}\""))))?;
        mesh.assert_in(&mesh.sleep, ECHO_PORT)?;
        mesh.assert_refused_over_hbone(&mesh.notsleep, ECHO_PORT, "-", "ALLOW")?;
        mesh.assert_refused_in_kernel(&mesh.legacy, ECHO_PORT)
    })
}

// ------------------------------------------------------------------------------------------------
// What the agent shows
// ------------------------------------------------------------------------------------------------

/// `inspect policies --hits` lists the server's policies in evaluation order — DENY, ALLOW, AUDIT, then
/// "no ALLOW matched" — with exactly the connections this test made; `warren_authz_decisions_total` names
/// the deciding policy.
#[test]
fn inspect_policies_shows_evaluation_order_and_hits() -> Result<()> {
    require_privileges!(Ok(()));
    scenario("authz-inspect", |mesh| {
        mesh.assert_in(&mesh.curl, ECHO_PORT)?; // no policy yet: allowed by "-" (NONE)

        let deny = policy("deny-notsleep", "DENY", &from_principals("\"cluster.local/ns/default/sa/notsleep\""));
        let allow = policy("allow-sleep", "ALLOW", &from_principals(&format!("\"{SLEEP}\"")));
        let audit = policy("audit-sleep", "AUDIT", &from_principals(&format!("\"{SLEEP}\"")));
        // Written in the reverse of evaluation order: the view's order is the agent's, not the files'.
        for (name, yaml) in [("audit-sleep", &audit), ("allow-sleep", &allow), ("deny-notsleep", &deny)] {
            mesh.apply(name, yaml)?;
        }
        for _ in 0..3 {
            mesh.assert_in(&mesh.sleep, ECHO_PORT)?;
        }
        for _ in 0..2 {
            mesh.assert_refused_over_hbone(&mesh.notsleep, ECHO_PORT, "default/deny-notsleep", "DENY")?;
        }
        mesh.assert_refused_over_hbone(&mesh.curl, ECHO_PORT, "-", "ALLOW")?;

        let hits = mesh.hits()?;
        let want = [
            ("default/deny-notsleep", "DENY", [0, 2, 0]),
            ("default/allow-sleep", "ALLOW", [3, 0, 0]),
            ("default/audit-sleep", "AUDIT", [0, 0, 3]),
            ("-", "ALLOW", [1, 1, 0]),
        ];
        let want: Vec<(String, String, [u64; 3])> =
            want.iter().map(|(p, a, h)| (p.to_string(), a.to_string(), *h)).collect();
        ensure!(hits == want, "inspect policies --hits:\n got {hits:?}\nwant {want:?}");
        let table = mesh.agent.inspect_live(&["policies", "--hits"])?;
        let order: Vec<&str> = table
            .lines()
            .filter(|l| l.starts_with("default/tcp-echo"))
            .filter_map(|l| l.split_whitespace().nth(2))
            .collect();
        ensure!(order == ["default/deny-notsleep", "default/allow-sleep", "default/audit-sleep", "-"], "{table}");
        ensure!(table.contains("ALLOW (none matched: deny)"), "{table}");

        for (policy, action, decision, count) in [
            ("default/deny-notsleep", "DENY", "deny", 2.0),
            ("default/allow-sleep", "ALLOW", "allow", 3.0),
            ("-", "ALLOW", "deny", 1.0),
            ("-", "NONE", "allow", 1.0),
        ] {
            let got = mesh.decisions(policy, action, decision)?;
            ensure!(
                got == count,
                "warren_authz_decisions_total{{policy={policy},action={action},decision={decision}}} = {got}, want {count}"
            );
        }
        if mesh.decisions("default/audit-sleep", "AUDIT", "allow")? != 0.0 {
            bail!("AUDIT never decides: it must not appear as the deciding policy");
        }
        Ok(())
    })
}

/// One refused connection is one decision: one CONNECT answered 401, one denial line, one count in
/// `warren_authz_decisions_total` and in the policy's hits — also when the client's agent already holds an
/// HBONE connection to the server (a 401 is the server's answer, not a broken connection to dial again).
#[test]
fn one_denied_connection_is_one_decision() -> Result<()> {
    require_privileges!(Ok(()));
    scenario("authz-once", |mesh| {
        mesh.assert_in(&mesh.sleep, ECHO_PORT)?; // sleep's agent now pools an HBONE connection to the server
        let principals = format!("\"{SLEEP}\", \"cluster.local/ns/default/sa/notsleep\"");
        mesh.apply("deny-sleep", &policy("deny-sleep", "DENY", &from_principals(&principals)))?;
        let mut expected = 0.0;
        // notsleep's first connection (a fresh HBONE connection), then sleep's (over the pooled one).
        for client in [&mesh.notsleep, &mesh.sleep] {
            let before = mesh.counters()?;
            mesh.assert_refused_over_hbone(client, ECHO_PORT, "default/deny-sleep", "DENY")?;
            let after = mesh.counters()?;
            expected += 1.0;
            ensure!(
                after.policy_refused == before.policy_refused + 1.0 && after.denial_lines == before.denial_lines + 1,
                "{}'s one connection must be refused once: {} refusals, {} denial lines:\n{}",
                client.name,
                after.policy_refused - before.policy_refused,
                after.denial_lines - before.denial_lines,
                mesh.denials()[before.denial_lines..].join("\n")
            );
            let decided = mesh.decisions("default/deny-sleep", "DENY", "deny")?;
            ensure!(decided == expected, "{} decisions after {expected} refused connections", decided);
        }
        let hits = mesh.hits()?;
        ensure!(hits.first().is_some_and(|(p, _, h)| p == "default/deny-sleep" && h[1] == 2), "{hits:?}");
        Ok(())
    })
}

// ------------------------------------------------------------------------------------------------
// ztunnel's CONNECT by service hostname, sent from outside the mesh
// ------------------------------------------------------------------------------------------------

/// The server's service: port 80 → the echo's 7000.
const ECHO_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: tcp-echo, namespace: default}\n\
    spec: {selector: {app: tcp-echo}, ports: [{name: tcp, port: 80, targetPort: 7000}]}\n";
const ECHO_HOST: &str = "tcp-echo.default.svc.cluster.local";
/// Who the test's own client's certificate says it is.
const RAW_CLIENT: &str = "cluster.local/ns/default/sa/raw";

/// What a CONNECT from the test got: the status, and what came back through the tunnel when it opened.
#[derive(Debug)]
struct RawConnect {
    status: u16,
    echoed: Vec<u8>,
}

impl Mesh {
    /// A CONNECT naming `authority` to the server's HBONE port, as ztunnel sends one for service traffic
    /// (Warren's own agents always name an address): sent with h2, over mTLS as
    /// [`RAW_CLIENT`] (a certificate of the testbed's CA) from the not-enrolled `legacy` pod, on a
    /// connection of its own. An opened tunnel is sent `ping` and half-closed.
    fn raw_connect(&self, authority: &str) -> Result<RawConnect> {
        let (cert, key) = self._bed.ca_files()?;
        let (cert, key) = (std::fs::read_to_string(cert)?, std::fs::read_to_string(key)?);
        let ca = warren_identity::CertificateAuthority::from_pem("cluster.local", &cert, &key)?;
        let raw: warren_identity::Identity = format!("spiffe://{RAW_CLIENT}").parse()?;
        let issued = ca.issue(&raw, Duration::from_secs(3600), std::time::SystemTime::now())?;
        let bundle = warren_identity::tls::TrustBundle::from_pem("cluster.local", ca.root_pem())?;
        let server = warren_identity::Identity::new("cluster.local", "default", "tcp-echo");
        let config = warren_identity::tls::client_config(&issued, issued.key_pem.as_ref().context("a key")?, &bundle, vec![server])?;
        let hbone = SocketAddr::new(self.server.ip.into(), 15008);
        let tcp = warren_testbed::in_netns(&self.legacy.netns, || std::net::TcpStream::connect(hbone))??;
        tcp.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async {
            let tcp = tokio::net::TcpStream::from_std(tcp)?;
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from("hbone")?;
            let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await?;
            tokio::time::timeout(Duration::from_secs(5), raw_h2::connect(tls, authority)).await.context("no answer in 5 s")?
        })
    }
}

/// One CONNECT on a fresh HTTP/2 connection (h2, the crate the agent itself uses): its status, and on a 200
/// the echo of `ping` sent with END_STREAM, read to its end.
mod raw_h2 {
    use anyhow::Result;
    use bytes::Bytes;
    use tokio::io::{AsyncRead, AsyncWrite};

    use super::RawConnect;

    pub async fn connect<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static>(io: IO, authority: &str) -> Result<RawConnect> {
        let (requests, connection) = h2::client::handshake(io).await?;
        tokio::spawn(connection);
        let request = http::Request::builder().method(http::Method::CONNECT).uri(authority).body(())?;
        let (response, mut send) = requests.ready().await?.send_request(request, false)?;
        let response = response.await?;
        let mut answer = RawConnect { status: response.status().as_u16(), echoed: vec![] };
        if answer.status != 200 {
            return Ok(answer);
        }
        send.send_data(Bytes::from_static(b"ping"), true)?;
        let mut body = response.into_body();
        while let Some(data) = body.data().await {
            let data = data?;
            let _ = body.flow_control().release_capacity(data.len());
            answer.echoed.extend_from_slice(&data);
        }
        Ok(answer)
    }
}

/// A CONNECT naming the server's service by hostname and service port (ztunnel's form for service
/// traffic) opens a tunnel to the service's target port on the server; a hostname no service has is
/// answered 503 (as ztunnel answers it); and once a policy denies the client, both forms are answered 401.
#[test]
fn a_connect_by_service_hostname_is_served_and_a_denied_one_answered_401() -> Result<()> {
    require_privileges!(Ok(()));
    scenario("authz-hostname", |mesh| {
        mesh.apply("echo-service", ECHO_SERVICE)?;
        let by_host = format!("{ECHO_HOST}:80");
        let by_address = mesh.target(ECHO_PORT).to_string();
        let served = mesh.raw_connect(&by_host)?;
        ensure!(served.status == 200 && served.echoed == b"ping", "by hostname, to the echo on 7000: {served:?}");
        let unknown = mesh.raw_connect("nosuch.default.svc.cluster.local:80")?;
        ensure!(unknown.status == 503 && unknown.echoed.is_empty(), "a hostname no service has: {unknown:?}");
        let not_a_port = mesh.raw_connect(&format!("{ECHO_HOST}:81"))?;
        ensure!(not_a_port.status == 503, "not a port of the service: {not_a_port:?}");
        let direct = mesh.raw_connect(&by_address)?;
        ensure!(direct.status == 200 && direct.echoed == b"ping", "control, by address: {direct:?}");

        mesh.apply("deny-raw", &policy("deny-raw", "DENY", &from_principals(&format!("\"{RAW_CLIENT}\""))))?;
        for authority in [&by_host, &by_address] {
            let denied = mesh.raw_connect(authority)?;
            ensure!(denied.status == 401 && denied.echoed.is_empty(), "{authority}, denied: {denied:?}");
        }
        Ok(())
    })
}
