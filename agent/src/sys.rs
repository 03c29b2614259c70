//! Small Linux facts the agent needs: where cgroup2 is mounted, cgroup ids, bpffs, socket options.
use std::{
    ffi::CString,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cgroup2 mount point, read from /proc/self/mountinfo (hybrid hosts mount it at
/// /sys/fs/cgroup/unified, unified hosts at /sys/fs/cgroup).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    cgroup2_mount_from(&info).context("no cgroup2 filesystem is mounted (needed to attach cgroup eBPF programs)")
}

fn cgroup2_mount_from(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> <source> <superopts>"
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

fn statfs_magic(path: &Path) -> Option<i64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type as i64)
}

/// Mounts bpffs at `/sys/fs/bpf` when it is not (a fresh host), as Cilium does, then creates `pin_dir`.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if statfs_magic(root) != Some(BPF_FS_MAGIC) {
        std::fs::create_dir_all(root).ok();
        let target = CString::new("/sys/fs/bpf").unwrap();
        let fstype = CString::new("bpf").unwrap();
        let rc = unsafe {
            libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null())
        };
        if rc != 0 {
            bail!("mounting bpffs at /sys/fs/bpf: {}", std::io::Error::last_os_error());
        }
        tracing::info!("mounted bpffs at /sys/fs/bpf");
    }
    if statfs_magic(pin_dir.parent().unwrap_or(root)) != Some(BPF_FS_MAGIC) && !pin_dir.starts_with(root) {
        bail!("pin directory {} is not on a bpffs mount", pin_dir.display());
    }
    std::fs::create_dir_all(pin_dir).with_context(|| format!("creating pin directory {}", pin_dir.display()))
}

/// The cookie of the network namespace a socket lives in (what bpf_get_netns_cookie() returns).
/// Sets SO_MARK (needs CAP_NET_ADMIN).
pub fn set_mark(sock: &impl AsRawFd, mark: u32) -> std::io::Result<()> {
    // SAFETY: setsockopt reads exactly `size_of::<u32>()` bytes from a live local.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mark as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

pub fn socket_netns_cookie(sock: &impl AsRawFd) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 { Ok(cookie) } else { Err(std::io::Error::last_os_error()) }
}

/// Raises the soft limit on open files to the hard limit: every proxied connection holds two sockets.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    limit.rlim_cur as u64
}

/// Whether a process with this pid exists.
pub fn process_alive(pid: i32) -> bool {
    pid > 0 && (unsafe { libc::kill(pid, 0) } == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_layouts() {
        let hybrid = "30 24 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                      35 30 0:31 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount_from(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let unified = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount_from(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(cgroup2_mount_from("1 0 0:1 / / rw - ext4 /dev/vda rw\n"), None);
    }
}
