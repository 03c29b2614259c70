//! Installs what the build and tests need, idempotently; everything is cached under ~/.cache/warren.
use std::process::Command;

use anyhow::{Context, Result, bail};
use warren_ebpf_build as ebpf;

use crate::{run, workspace_root};

pub fn scripts_dir() -> std::path::PathBuf {
    workspace_root().join("xtask/scripts")
}

/// Debian packages (when on Debian and root), bpf-linker, and with `kubernetes` the local cluster's binaries.
pub fn setup(kubernetes: bool) -> Result<()> {
    std::fs::create_dir_all(ebpf::cache_dir())?;
    // Idempotent and quick when everything is there (it only asks dpkg), so always: a package added to
    // the list (prometheus, for the telemetry tests) reaches machines that have the rest.
    if std::path::Path::new("/usr/bin/dpkg-query").exists() {
        run(Command::new("bash").arg(scripts_dir().join("install-deps.sh"))).context("installing Debian packages")?;
    }
    let route = ebpf::detect_route()?;
    if ebpf::find_bpf_linker().is_err() {
        install_bpf_linker(&route)?;
    }
    let (route, linker) = ebpf::check()?;
    eprintln!("xtask: eBPF toolchain: {route}; bpf-linker: {}", linker.display());
    if kubernetes {
        crate::cluster::build()?;
    }
    Ok(())
}

/// `cargo install bpf-linker` into the cache. Debian: against llvm-22-dev (`--features llvm-22`); with
/// rustup: bpf-linker's defaults.
fn install_bpf_linker(route: &ebpf::Route) -> Result<()> {
    let root = ebpf::bpf_linker_install_root();
    eprintln!("xtask: building bpf-linker {} into {} (a few minutes, once)", ebpf::BPF_LINKER_VERSION, root.display());
    let mut cmd = match route {
        ebpf::Route::DebianPrebuiltCore { cargo, .. } => {
            if !std::path::Path::new("/usr/lib/llvm-22/lib").is_dir() {
                bail!("bpf-linker needs LLVM 22: apt-get install llvm-22-dev");
            }
            let mut cmd = Command::new(cargo);
            cmd.env("LLVM_PREFIX", "/usr/lib/llvm-22")
                .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
                .args(["install", "--locked", "--no-default-features", "--features", "llvm-22"]);
            cmd
        }
        ebpf::Route::RustupNightly { .. } => {
            let mut cmd = Command::new("cargo");
            cmd.args(["install", "--locked"]);
            cmd
        }
    };
    cmd.arg(format!("bpf-linker@{}", ebpf::BPF_LINKER_VERSION)).arg("--root").arg(&root);
    // Build outside the workspace so its config and lockfile do not apply.
    cmd.current_dir(std::env::temp_dir()).env_remove("RUSTUP_TOOLCHAIN").env_remove("CARGO");
    run(&mut cmd).context("building bpf-linker")
}
