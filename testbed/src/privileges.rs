//! Whether this machine can run the privileged tests.
use std::path::Path;

/// `Err(reason)` when the tests that need root, BPF, cgroup2 and netns cannot run here.
pub fn check_privileges() -> Result<(), String> {
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root".into());
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    if !mountinfo.lines().any(|l| l.split_once(" - ").is_some_and(|(_, r)| r.starts_with("cgroup2 "))) {
        return Err("no cgroup2 filesystem mounted".into());
    }
    if !Path::new("/proc/self/ns/net").exists() {
        return Err("kernel without network namespaces".into());
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err("kernel without BTF (/sys/kernel/btf/vmlinux)".into());
    }
    if std::process::Command::new("ip").arg("-V").output().is_err() {
        return Err("iproute2's `ip` is not installed".into());
    }
    Ok(())
}

/// CI sets CI=true; there a test that would skip must fail instead.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}
