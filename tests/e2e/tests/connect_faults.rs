//! Connection faults (Warren's L4 fault injection, `fault.warren.dev/*` annotations on a VirtualService):
//! decided in the kernel at connect() — an aborted connect fails with ECONNREFUSED and never reaches the
//! agent; a delayed one is held by the agent before it connects upstream.
//!
//! The mesh: the client `sleep` on node-1; `db` (an echo server on 7000) on node-2, behind the service
//! `db` (10.96.2.10, port 5432 `tcp-postgres`).
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result, ensure};
use warren_e2e::{directory_mesh, log_tail, namespace_yaml, pod_yaml};
use warren_testbed::{Agent, Controller, Pod, Process, Testbed, require_privileges};

const DB: &str = "10.96.2.10:5432";

struct Mesh {
    _bed: Testbed,
    dir: PathBuf,
    controller: Controller,
    agents: [Agent; 2],
    sleep: Pod,
    _db: Process,
}

fn mesh(label: &str) -> Result<Mesh> {
    let bed = Testbed::new(label)?;
    let (n1, n2) = (bed.add_node("node-1")?, bed.add_node("node-2")?);
    let sleep = n1.add_pod("sleep", true)?;
    let db = n2.add_pod("db", true)?;
    let serving = db.serve("v1")?;
    let dir = bed.state_dir().join("mesh-config");
    std::fs::create_dir_all(&dir)?;
    let services = "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: default}\n\
        spec: {clusterIP: 10.96.2.10, selector: {app: db}, ports: [{name: tcp-postgres, port: 5432, targetPort: 7000}]}\n---\n";
    let pods = pod_yaml(&sleep, "node-1", "app: sleep") + &pod_yaml(&db, "node-2", "app: db");
    std::fs::write(dir.join("00-mesh.yaml"), format!("{}{services}{pods}", namespace_yaml("default")))?;
    let (controller, agents) = directory_mesh(&bed, &dir, &[&n1, &n2])?;
    let agents: [Agent; 2] = agents.try_into().map_err(|_| anyhow::anyhow!("two agents"))?;
    agents[0].wait_enrolled(&sleep, true, Duration::from_secs(15))?;
    agents[1].wait_enrolled(&db, true, Duration::from_secs(15))?;
    agents[0].wait_config(Duration::from_secs(15), |c| c.to_string().contains("default/db"))?;
    Ok(Mesh { _bed: bed, dir, controller, agents, sleep, _db: serving })
}

fn scenario(label: &str, steps: impl FnOnce(&Mesh) -> Result<()>) -> Result<()> {
    let mesh = mesh(label)?;
    steps(&mesh).map_err(|e| {
        e.context(format!(
            "client agent:\n{}\n\ncontroller:\n{}",
            log_tail(&mesh.agents[0].log(), 30),
            log_tail(&mesh.controller.log(), 30)
        ))
    })
}

impl Mesh {
    /// A VirtualService routing db with `annotations`; returns once the client's agent holds it.
    fn annotate(&self, annotations: &str) -> Result<()> {
        let before = self.agents[0].config()?["version"].as_u64().context("no version")?;
        let yaml = format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
             metadata: {{name: db, namespace: default, annotations: {{{annotations}}}}}\n\
             spec: {{hosts: [db], tcp: [{{route: [{{destination: {{host: db}}}}]}}]}}\n"
        );
        std::fs::write(self.dir.join(".10-vs.tmp"), yaml)?;
        std::fs::rename(self.dir.join(".10-vs.tmp"), self.dir.join("10-vs.yaml"))?;
        self.agents[0].wait_config(Duration::from_secs(10), |c| c["version"].as_u64().is_some_and(|v| v > before))?;
        Ok(())
    }

    fn counter(&self, event: &str) -> Result<f64> {
        self.agents[0].metric("warren_ebpf_events_total", &[("event", event)])
    }

    fn proxied(&self) -> Result<f64> {
        self.agents[0].metric("warren_tcp_connections_opened_total", &[("direction", "outbound")])
    }
}

fn median(micros: &[u64]) -> Duration {
    let mut sorted = micros.to_vec();
    sorted.sort_unstable();
    Duration::from_micros(sorted.get(sorted.len() / 2).copied().unwrap_or(0))
}

#[test]
fn thirty_percent_of_connects_are_refused_in_the_kernel() -> Result<()> {
    require_privileges!(Ok(()));
    scenario("connect-abort", |mesh| {
        let db: SocketAddr = DB.parse()?;
        let control = mesh.sleep.connect_outcomes(db, 100, 64)?;
        ensure!(control.micros.len() == 100 && control.refused == 0, "control, no fault: {control:?}");
        mesh.annotate("fault.warren.dev/connect-abort-percent: '30'")?;
        let (aborted_before, proxied_before) = (mesh.counter("connect_aborted")?, mesh.proxied()?);
        let outcomes = mesh.sleep.connect_outcomes(db, 1000, 64)?;
        ensure!(outcomes.failed.is_empty(), "only refusals, no other failure: {:?}", outcomes.failed);
        let share = outcomes.refused as f64 / 1000.0;
        eprintln!("refused {} of 1000 connects ({:.1} %)", outcomes.refused, share * 100.0);
        ensure!((share - 0.30).abs() <= 0.05, "30 % ± 5 points refused, got {:.1} %", share * 100.0);
        ensure!(outcomes.micros.len() + outcomes.refused == 1000, "{outcomes:?}");
        let aborted = mesh.counter("connect_aborted")? - aborted_before;
        let proxied = mesh.proxied()? - proxied_before;
        ensure!(aborted as usize == outcomes.refused, "decided in eBPF: connect_aborted {aborted} vs {} refused", outcomes.refused);
        ensure!(proxied as usize == outcomes.micros.len(), "the agent saw only the others: {proxied} proxied");
        let faults = mesh.agents[0].inspect_live(&["faults"])?;
        ensure!(faults.contains("ECONNREFUSED @30%") && faults.contains("connect (eBPF)"), "{faults}");
        Ok(())
    })
}

#[test]
fn a_connect_delay_holds_each_connection() -> Result<()> {
    require_privileges!(Ok(()));
    scenario("connect-delay", |mesh| {
        let db: SocketAddr = DB.parse()?;
        let control = median(&mesh.sleep.connect_outcomes(db, 20, 64)?.micros);
        ensure!(control < Duration::from_millis(100), "control, no fault: median {control:?}");
        mesh.annotate("fault.warren.dev/connect-delay: 200ms")?;
        let outcomes = mesh.sleep.connect_outcomes(db, 20, 64)?;
        ensure!(outcomes.micros.len() == 20, "{outcomes:?}");
        let delayed = median(&outcomes.micros);
        eprintln!("connect + echo: median {control:?} without the fault, {delayed:?} with a 200 ms delay");
        ensure!(delayed >= Duration::from_millis(200) && delayed < Duration::from_millis(400), "median {delayed:?}");
        ensure!(mesh.counter("connect_delayed")? >= 20.0, "marked in eBPF");
        Ok(())
    })
}
