//! Container images without Docker: each binary with the shared libraries it links (as `ldd` lists them),
//! packed by xtask/scripts/mkimage.py into a docker-archive tarball that containerd imports. The same
//! images as deploy/docker/*.Dockerfile build where Docker runs.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{cluster, setup::scripts_dir, workspace_root};

/// The binaries that ship, each as the image of the same name.
pub const BINARIES: [&str; 2] = ["warren-agent", "warren-controller"];

/// Builds an image tarball per binary of `bin_dir`, tagged `<binary>:<tag>`, into target/images/.
pub fn build(bin_dir: &Path, tag: &str) -> Result<Vec<PathBuf>> {
    let out_dir = workspace_root().join("target/images");
    std::fs::create_dir_all(&out_dir)?;
    BINARIES
        .iter()
        .map(|name| {
            let binary = bin_dir.join(name);
            if !binary.is_file() {
                bail!("{} is not built (cargo build --release -p {name})", binary.display());
            }
            let out = out_dir.join(format!("{name}.tar"));
            let entrypoint = format!(r#"["/usr/local/bin/{name}"]"#);
            let mut files = vec![format!("{}=/usr/local/bin/{name}", binary.display())];
            for library in shared_libraries(&binary)? {
                // The file the link points to, at the path the loader asks for.
                let real = std::fs::canonicalize(&library).with_context(|| format!("resolving {}", library.display()))?;
                files.push(format!("{}={}", real.display(), library.display()));
            }
            let status = Command::new("python3")
                .arg(scripts_dir().join("mkimage.py"))
                .arg(&out)
                .arg(format!("{name}:{tag}"))
                .arg(&entrypoint)
                .args(&files)
                .stdout(std::process::Stdio::null())
                .status()
                .context("running python3 xtask/scripts/mkimage.py")?;
            if !status.success() {
                bail!("mkimage.py failed for {name} ({status})");
            }
            Ok(out)
        })
        .collect()
}

/// The shared libraries `binary` links, with the dynamic loader, as absolute paths (`ldd`).
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output().context("running ldd")?;
    if !out.status.success() {
        bail!("ldd {}: {}", binary.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    // Lines: "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)", "/lib64/ld-linux-x86-64.so.2 (0x…)",
    // "linux-vdso.so.1 (0x…)" (in the kernel, no file).
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|line| {
            let path = line.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Imports an image tarball into the local node's containerd (namespace k8s.io, where the kubelet looks).
pub fn import(tarball: &Path) -> Result<()> {
    ctr(&["images", "import", &tarball.display().to_string()]).with_context(|| format!("importing {}", tarball.display()))
}

/// Removes the images `<binary>:<tag>` from the local node's containerd (they take its disk otherwise).
pub fn remove(tag: &str) -> Result<()> {
    for name in BINARIES {
        ctr(&["images", "rm", &format!("docker.io/library/{name}:{tag}")])?;
    }
    Ok(())
}

/// `ctr -n k8s.io ARGS` against the local node's containerd.
fn ctr(args: &[&str]) -> Result<()> {
    let prefix = cluster::prefix();
    let ctr = prefix.join("tools/ct/usr/bin/ctr");
    let socket = prefix.join("node/containerd/containerd.sock");
    if !socket.exists() {
        bail!("the local node's containerd is not running ({} is missing: cargo xtask cluster up --node)", socket.display());
    }
    let out = Command::new(&ctr)
        .arg("-a")
        .arg(&socket)
        .args(["-n", "k8s.io"])
        .args(args)
        .output()
        .with_context(|| format!("running {}", ctr.display()))?;
    if !out.status.success() {
        bail!("ctr {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
