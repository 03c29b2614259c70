//! The local workloads file (the embedded default, and hosts without a cluster): YAML with `namespaces`
//! and `pods`, re-read when it changes, so enrolling and un-enrolling is an edit.
use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use tokio::sync::watch;
use tracing::{info, warn};

use super::Workloads;

const POLL: Duration = Duration::from_millis(100);

pub fn read(path: &std::path::Path) -> Result<Workloads> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading workloads file {}", path.display()))?;
    let workloads: Workloads =
        serde_yaml::from_str(&text).with_context(|| format!("invalid workloads file {}", path.display()))?;
    workloads.validate().map_err(anyhow::Error::msg).with_context(|| format!("invalid workloads file {}", path.display()))?;
    Ok(workloads)
}

/// Reads the file now (failing if it is invalid), then publishes every valid change. An invalid edit is
/// logged and ignored: the last good workloads stay in force.
pub fn watch(path: PathBuf) -> Result<watch::Receiver<Workloads>> {
    let initial = read(&path)?;
    let (tx, rx) = watch::channel(initial);
    tokio::spawn(async move {
        let mut last_text = std::fs::read_to_string(&path).unwrap_or_default();
        loop {
            tokio::time::sleep(POLL).await;
            let Ok(text) = tokio::fs::read_to_string(&path).await else { continue };
            if text == last_text {
                continue;
            }
            last_text = text;
            match read(&path) {
                Ok(workloads) => {
                    info!(file = %path.display(), pods = workloads.pods.len(), "workloads file changed");
                    if tx.send(workloads).is_err() {
                        return;
                    }
                }
                Err(e) => warn!("{e:#}; keeping the previous workloads"),
            }
        }
    });
    Ok(rx)
}
