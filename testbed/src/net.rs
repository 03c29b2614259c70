//! Network namespaces and links, through iproute2 (the tool every reader of these tests knows).
use std::{fs::File, os::fd::AsRawFd, path::Path, process::Command};

use anyhow::{Context, Result, bail};

/// Runs `ip ARGS…`, failing with its stderr.
pub(crate) fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

pub(crate) fn add_netns(name: &str) -> Result<()> {
    ip(&["netns", "add", name])
}

pub(crate) fn del_netns(name: &str) {
    if Path::new("/run/netns").join(name).exists() {
        let _ = ip(&["netns", "del", name]);
    }
}

/// Writes a sysctl of a netns (`/proc/sys/net` shows the netns of the thread that opens it).
pub(crate) fn sysctl_in(netns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{key}");
    in_netns(netns, || std::fs::write(&path, value))?.with_context(|| format!("sysctl {key}={value} in {netns}"))
}

/// Runs `f` on a thread that has entered the named netns (`/run/netns/<name>`), and returns its result.
pub fn in_netns<R: Send>(name: &str, f: impl FnOnce() -> R + Send) -> Result<R> {
    let path = Path::new("/run/netns").join(name);
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns {}: {}", path.display(), std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| bail!("thread in netns {name} panicked"))
    })
}
