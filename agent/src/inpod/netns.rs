use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{OnceLock, mpsc},
    thread,
};

use anyhow::{Context, Result, anyhow};
use tokio::net::TcpSocket;

type Job = Box<dyn FnOnce() + Send>;

/// A handle on a network namespace, with a thread that lives in it for work that blocks (listeners,
/// anything slow). `socket()` takes the netns of the calling thread; once created, a socket can be used
/// from any thread. The agent's connection sockets are made on the calling thread itself
/// ([`Netns::agent_socket`]: setns in, socket, setns back, as ztunnel does): a hop to the netns thread and
/// back costs two thread wake-ups on every new connection, the most of a connection's set-up here.
pub struct Netns {
    path: PathBuf,
    jobs: mpsc::Sender<Job>,
    /// Kept open: the fd sk_lookup attaches to, and proof the netns still exists.
    file: File,
}

impl Netns {
    /// Uses an already open netns file; `label` names it in messages.
    pub fn from_file(file: File, label: &Path) -> Result<Self> {
        let path = label.to_path_buf();
        let thread_file = file.try_clone()?;
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (entered_tx, entered_rx) = mpsc::channel();
        let name = "netns".to_string();
        thread::Builder::new().name(name).spawn(move || {
            let entered = if unsafe { libc::setns(thread_file.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            };
            let ok = entered.is_ok();
            let _ = entered_tx.send(entered);
            if ok {
                for job in inbox {
                    job();
                }
            }
        })?;
        entered_rx
            .recv()
            .map_err(|_| anyhow!("netns thread exited"))?
            .with_context(|| format!("entering network namespace {}", path.display()))?;
        Ok(Netns { path, jobs, file })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Runs `f` inside the namespace without blocking the async runtime.
    pub async fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Result<R> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move || {
            let _ = tx.send(f());
        }))?;
        rx.await.map_err(|_| anyhow!("netns thread for {} stopped", self.path.display()))
    }

    /// A TCP socket (no delay) in this netns, marked as the agent's own ([`warren_maps::AGENT_SOCKET_MARK`])
    /// so that connect4/6 leave it alone although the netns is enrolled. Made and marked on this thread
    /// while it is in the netns ([`Netns::enter`]): no unmarked socket of the agent ever exists there.
    pub async fn agent_socket(&self, ipv4: bool) -> Result<TcpSocket> {
        let socket = self.enter(|| -> Result<TcpSocket> {
            let socket = if ipv4 { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            crate::sys::set_mark(&socket, warren_maps::AGENT_SOCKET_MARK).context("SO_MARK on the agent's socket")?;
            Ok(socket)
        })??;
        socket.set_nodelay(true)?;
        Ok(socket)
    }

    /// Runs `f` (short, never blocking: it holds a runtime worker) with this thread in the namespace, then
    /// returns the thread to the agent's own. A thread that cannot return aborts the agent: a worker left
    /// in a pod's namespace would open other pods' connections from there.
    fn enter<R>(&self, f: impl FnOnce() -> R) -> Result<R> {
        let home = home_netns().context("opening the agent's own network namespace")?;
        // SAFETY: setns takes a valid netns fd (kept open by `self.file`) and changes only this thread's
        // network namespace; the guard below changes it back before anything else runs on the thread.
        if unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            let error = std::io::Error::last_os_error();
            return Err(error).with_context(|| format!("entering network namespace {}", self.path.display()));
        }
        let _back = ReturnHome(home);
        Ok(f())
    }

    fn submit(&self, job: Job) -> Result<()> {
        self.jobs.send(job).map_err(|_| anyhow!("netns thread for {} stopped", self.path.display()))
    }
}

/// The agent's own network namespace (where every runtime worker lives), opened once — by the first
/// thread to enter a pod's, from its own namespace: a thread is always home when it calls
/// [`Netns::enter`], while `/proc/self` (the main thread's) could be inside a pod's at that moment.
fn home_netns() -> std::io::Result<&'static File> {
    static HOME: OnceLock<File> = OnceLock::new();
    if let Some(file) = HOME.get() {
        return Ok(file);
    }
    let file = File::open("/proc/thread-self/ns/net")?;
    Ok(HOME.get_or_init(|| file))
}

/// Puts the thread back in the agent's namespace when dropped (also when the closure panics).
struct ReturnHome(&'static File);

impl Drop for ReturnHome {
    fn drop(&mut self) {
        // SAFETY: as in `Netns::enter`; the fd is the process's own netns, open for the process's life.
        if unsafe { libc::setns(self.0.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            eprintln!("warren-agent: cannot return a thread to its network namespace: {}", std::io::Error::last_os_error());
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// The netns this thread is in, by its inode.
    fn current() -> u64 {
        std::fs::metadata("/proc/thread-self/ns/net").expect("own netns").ino()
    }

    /// A fresh network namespace, kept by an open fd.
    fn fresh_netns() -> File {
        thread::spawn(|| {
            // SAFETY: unshare affects only this short-lived thread, which ends right after.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare: {}", std::io::Error::last_os_error());
            File::open("/proc/thread-self/ns/net").expect("the new netns")
        })
        .join()
        .expect("unshare thread")
    }

    #[tokio::test(flavor = "current_thread")]
    async fn sockets_are_made_in_the_pod_netns_and_the_thread_returns_home() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true, but this test needs root (setns)");
            return eprintln!("SKIPPED (needs root for setns)");
        }
        let home = current();
        let netns = Netns::from_file(fresh_netns(), Path::new("test")).expect("netns");
        let inside = netns.agent_socket(true).await.expect("a socket in the pod netns");
        assert_eq!(current(), home, "the thread is back in its own netns");
        // A listener on the agent's loopback: unreachable from the fresh netns, reachable from home.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        inside.connect(address).await.expect_err("the agent's loopback is not the pod netns'");
        TcpSocket::new_v4().unwrap().connect(address).await.expect("control: from the agent's own netns");
        // A closure that panics inside still brings the thread home.
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| netns.enter(|| panic!("inside"))));
        assert!(panicked.is_err());
        assert_eq!(current(), home, "home again after a panic inside");
    }
}
