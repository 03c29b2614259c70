//! A real Prometheus (Debian's `prometheus` package) in a node's netns, scraping agents' `/stats/prometheus`
//! every second, answering PromQL over its HTTP API: what a user's monitoring sees of the mesh.
use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::{Context, Result, bail};

use crate::{Node, Process, http_get, in_netns};

/// Where Prometheus listens, in the node's netns.
const LISTEN: &str = "127.0.0.1:9090";

pub struct Prometheus {
    _process: Process,
    netns: String,
}

/// One series of an instant query's answer.
#[derive(Debug, Clone)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Prometheus {
    /// Starts Prometheus in `node`'s netns scraping `targets` (`host:port`, reachable from there) every
    /// second; its data and config go under `dir`. Returns once every target has been scraped up.
    pub fn start(node: &Node, targets: &[String], dir: &Path) -> Result<Prometheus> {
        std::fs::create_dir_all(dir)?;
        let quoted: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             scrape_configs:\n- job_name: warren-agents\n  metrics_path: /stats/prometheus\n  \
             static_configs: [{{targets: [{}]}}]\n",
            quoted.join(", ")
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let mut command = std::process::Command::new("prometheus");
        command
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={LISTEN}"))
            .arg("--log.level=warn");
        let process = node.spawn(command).context("prometheus (Debian's prometheus package)")?;
        let prometheus = Prometheus { _process: process, netns: node.netns.clone() };
        prometheus.wait_up(targets.len(), Duration::from_secs(30))?;
        Ok(prometheus)
    }

    fn wait_up(&self, targets: usize, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let up = self.query("up == 1").map(|s| s.len()).unwrap_or(0);
            if up == targets {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!("Prometheus: {up} of {targets} targets up after {timeout:?}: {:?}", self.get("/api/v1/targets"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn get(&self, path: &str) -> Result<String> {
        let path = path.to_string();
        in_netns(&self.netns, move || http_get(LISTEN, &path))?
    }

    /// An instant query's vector.
    pub fn query(&self, promql: &str) -> Result<Vec<Sample>> {
        let encoded: String = form_urlencoded::byte_serialize(promql.as_bytes()).collect();
        let body = self.get(&format!("/api/v1/query?query={encoded}"))?;
        let answer: serde_json::Value = serde_json::from_str(&body).with_context(|| format!("Prometheus answered {body}"))?;
        if answer["status"] != "success" {
            bail!("{promql}: {answer}");
        }
        let result = answer["data"]["result"].as_array().with_context(|| format!("{promql}: not a vector: {answer}"))?;
        result.iter().map(sample).collect()
    }
}

fn sample(series: &serde_json::Value) -> Result<Sample> {
    let labels = series["metric"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
        .unwrap_or_default();
    let value = series["value"][1].as_str().context("a sample value")?;
    Ok(Sample { labels, value: value.parse().with_context(|| format!("value {value:?}"))? })
}
