use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
};

use anyhow::{Context, Result, anyhow};
use tokio::net::TcpSocket;

type Job = Box<dyn FnOnce() + Send>;

/// A handle on a network namespace, with a thread that lives in it. `socket()` takes the netns of the
/// calling thread; once created, a socket can be used from any thread, so only creation runs here.
/// A persistent thread keeps setns() off tokio's workers and costs one channel hop per socket.
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
    /// so that connect4/6 leave it alone although the netns is enrolled.
    pub async fn agent_socket(&self, ipv4: bool) -> Result<TcpSocket> {
        // Made and marked in one job on the netns thread: no unmarked socket of the agent ever exists there.
        let socket = self
            .run(move || -> Result<TcpSocket> {
                let socket = if ipv4 { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
                crate::sys::set_mark(&socket, warren_maps::AGENT_SOCKET_MARK).context("SO_MARK on the agent's socket")?;
                Ok(socket)
            })
            .await??;
        socket.set_nodelay(true)?;
        Ok(socket)
    }

    fn submit(&self, job: Job) -> Result<()> {
        self.jobs.send(job).map_err(|_| anyhow!("netns thread for {} stopped", self.path.display()))
    }
}
