//! The helm chart deploy/helm/warren: `helm lint` finds nothing to report, the plain manifests in deploy/
//! are exactly what the chart renders (`cargo xtask manifests`), and the whole rendering, Istio's CRDs
//! included, is accepted by the real local kube-apiserver (`kubectl apply --dry-run=server`). Each has a
//! control: a broken chart fails lint, another value renders differently, an invalid value is refused.
use std::{
    io::Write,
    panic::AssertUnwindSafe,
    path::Path,
    process::{Command, Output, Stdio},
};

use anyhow::{Context, Result};
use warren_testbed::{in_ci, require_privileges};
use xtask::{cluster, manifests, workspace_root};

static CLUSTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// helm, or a skip (a failure under CI) when it is not installed.
fn helm() -> Option<std::path::PathBuf> {
    match manifests::helm() {
        Ok(helm) => Some(helm),
        Err(reason) => {
            assert!(!in_ci(), "CI=true, but {reason}");
            eprintln!("SKIPPED: {reason}");
            None
        }
    }
}

fn lint(helm: &Path, chart: &Path) -> Result<Output> {
    Command::new(helm).arg("lint").arg(chart).output().context("running helm lint")
}

#[test]
fn helm_lint_reports_nothing() -> Result<()> {
    let Some(helm) = helm() else { return Ok(()) };
    let chart = workspace_root().join(manifests::CHART);
    let out = lint(&helm, &chart)?;
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "helm lint failed: {report}");
    assert!(!report.contains("[WARNING]") && !report.contains("[ERROR]"), "helm lint: {report}");

    // Control: the same chart with a template that does not parse fails lint.
    let broken = std::env::temp_dir().join(format!("warren-chart-{}", std::process::id()));
    std::fs::create_dir_all(&broken)?;
    copy_dir(&chart, &broken)?;
    std::fs::write(broken.join("templates/broken.yaml"), "{{ .Values.agent.ports.admin \n")?;
    let out = lint(&helm, &broken);
    std::fs::remove_dir_all(&broken)?;
    let out = out?;
    assert!(!out.status.success(), "a broken template passed lint: {}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}

#[test]
fn deploy_manifests_are_the_rendered_chart() -> Result<()> {
    if helm().is_none() {
        return Ok(());
    }
    for (path, rendered) in manifests::render()? {
        let on_disk = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        assert!(
            on_disk == rendered,
            "{} is not what the chart renders: run `cargo xtask manifests` (and commit the result)",
            path.display()
        );
    }
    // Control: a value the chart honours changes the rendering.
    let debug = manifests::template(&["--set", "agent.logLevel=debug", "--show-only", "templates/agent.yaml"])?;
    let default = manifests::template(&["--show-only", "templates/agent.yaml"])?;
    assert!(debug != default && debug.contains("value: \"debug\""), "agent.logLevel is not rendered: {debug}");
    Ok(())
}

#[test]
fn the_chart_applies_to_the_local_api_server() {
    require_privileges!();
    if helm().is_none() {
        return;
    }
    if !cluster::is_built() {
        let reason = "the local Kubernetes is not built (cargo xtask setup --kubernetes)";
        assert!(!in_ci(), "CI=true, but {reason}");
        return eprintln!("SKIPPED: {reason}");
    }
    let _cluster = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    // A failed assertion must not leave the cluster running: catch it, bring the cluster down, then report.
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| -> Result<()> {
        let kubeconfig = cluster::up(false)?;
        let kubectl = |args: &[&str], stdin: &str| kubectl(&kubeconfig, args, stdin);
        kubectl(&["create", "namespace", manifests::NAMESPACE], "")?;
        // CRDs first (as helm installs crds/ before the templates), then everything else.
        let crds = std::fs::read_to_string(workspace_root().join(manifests::CHART).join("crds/istio.yaml"))?;
        let applied = kubectl(&["apply", "-f", "-"], &crds)?;
        assert!(applied.status.success(), "CRDs: {}", stderr(&applied));
        let rendered = manifests::template(&[])?;
        let dry_run = kubectl(&["apply", "--dry-run=server", "-f", "-"], &rendered)?;
        let said = String::from_utf8_lossy(&dry_run.stdout).into_owned();
        assert!(dry_run.status.success(), "the API server refused the chart: {}{said}", stderr(&dry_run));
        for object in ["daemonset.apps/warren-agent", "deployment.apps/warren-controller", "service/warren-controller"] {
            assert!(said.contains(&format!("{object} created (server dry run)")), "{object} missing: {said}");
        }
        // Control: a value the API server's validation refuses is refused.
        let invalid = manifests::template(&["--set", "controller.replicas=-1"])?;
        let refused = kubectl(&["apply", "--dry-run=server", "-f", "-"], &invalid)?;
        assert!(!refused.status.success(), "replicas -1 was accepted");
        assert!(stderr(&refused).contains("spec.replicas"), "refused for another reason: {}", stderr(&refused));
        Ok(())
    }));
    cluster::down().unwrap();
    match result {
        Ok(result) => result.unwrap(),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

fn kubectl(kubeconfig: &Path, args: &[&str], stdin: &str) -> Result<Output> {
    let mut child = Command::new(cluster::prefix().join("bin/kubectl"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running kubectl")?;
    child.stdin.take().expect("piped").write_all(stdin.as_bytes())?;
    child.wait_with_output().context("waiting for kubectl")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            std::fs::create_dir_all(&target)?;
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// The kind path on a machine that cannot run it (this one: a docker client, no engine, no kind) stops
/// at once with one line naming what is missing and how to get it; each action checks before doing anything.
#[test]
fn the_kind_path_names_what_is_missing_in_one_line() {
    for action in ["up", "install", "e2e", "down"] {
        let out = Command::new("bash")
            .arg(workspace_root().join("xtask/scripts/kind.sh"))
            .arg(action)
            .current_dir(workspace_root())
            .env("PATH", "/usr/bin:/bin")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{action}: must fail here");
        assert_eq!(stderr.trim().lines().count(), 1, "{action}: one line: {stderr}");
        assert!(stderr.starts_with("kind path: ") && stderr.contains("is not installed ("), "{action}: {stderr}");
    }
    // Control: a bad action is a usage error only once the tools are there, so it too fails here first
    // with what is missing, never a half-run.
    let out = Command::new("bash").arg(workspace_root().join("xtask/scripts/kind.sh")).arg("nonsense").env("PATH", "/usr/bin:/bin").output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("kind path: "));
}
