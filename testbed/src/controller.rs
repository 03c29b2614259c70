//! warren-controller for a testbed: in the host's netns, with the testbed's CA as the mesh root, reading a
//! directory of YAML or a Kubernetes API; agents reach its push port through each node's loopback.
use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::{Process, Testbed, bin_path, process::tail};

pub struct ControllerOptions {
    /// Read the configuration from this directory (else `kubeconfig`).
    pub config_dir: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    /// 127.0.0.1 port of the push service (0: pick a free one).
    pub push_port: u16,
    /// How often the controller checks `config_dir` (default: its own, 200 ms).
    pub config_poll_ms: Option<u64>,
}

pub struct Controller {
    pub process: Process,
    pub push_port: u16,
    /// `127.0.0.1:<port>` of the monitoring endpoint (`/metrics`, `/ready`), in the host's netns.
    pub monitoring_addr: String,
}

impl Controller {
    pub(crate) fn start(bed: &Testbed, options: ControllerOptions) -> Result<Controller> {
        let (cert, key) = bed.ca_files()?;
        let free = || -> Result<u16> { Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()) };
        let push_port = if options.push_port == 0 { free()? } else { options.push_port };
        let monitoring_addr = format!("127.0.0.1:{}", free()?);
        let mut cmd = Command::new(bin_path("warren-controller")?);
        cmd.arg("run")
            .arg("--ca-cert")
            .arg(&cert)
            .arg("--ca-key")
            .arg(&key)
            .arg("--push-listen")
            .arg(format!("127.0.0.1:{push_port}"))
            .arg("--ca-listen")
            .arg(format!("127.0.0.1:{}", free()?))
            .arg("--monitoring-addr")
            .arg(&monitoring_addr)
            .env("WARREN_LOG", "info");
        match (&options.config_dir, &options.kubeconfig) {
            (Some(dir), _) => {
                if let Some(ms) = options.config_poll_ms {
                    cmd.arg("--config-poll-ms").arg(ms.to_string());
                }
                cmd.arg("--config-dir").arg(dir)
            }
            (None, Some(kubeconfig)) => cmd.arg("--kubeconfig").arg(kubeconfig),
            (None, None) => bail!("ControllerOptions: set config_dir or kubeconfig"),
        };
        let process = Process::spawn(&bed.inner, cmd, "", &[])?;
        let controller = Controller { process, push_port, monitoring_addr };
        controller.wait_ready(Duration::from_secs(60))?;
        Ok(controller)
    }

    fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains("push service ready") {
                return Ok(());
            }
            if let Some(status) = self.process.exited() {
                bail!("warren-controller exited ({status}) before it was ready:\n{}", tail(&self.log(), 30));
            }
            if Instant::now() > deadline {
                bail!("warren-controller not ready after {timeout:?}:\n{}", tail(&self.log(), 30));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The controller's log (stderr) so far.
    pub fn log(&self) -> String {
        self.process.stderr()
    }

    /// `127.0.0.1:<push port>`, the address agents are given (each node forwards it to the host).
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.push_port)
    }

    /// The controller's Prometheus exposition (`GET /metrics`).
    pub fn metrics(&self) -> Result<String> {
        crate::agent::http_get(&self.monitoring_addr, "/metrics")
    }

    /// Kills the controller (SIGKILL: an outage, not a shutdown).
    pub fn kill(&self) {
        self.process.signal(libc::SIGKILL);
        let _ = self.process.wait_exit(Duration::from_secs(5));
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.process.terminate();
    }
}
