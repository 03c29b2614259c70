use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
};

use anyhow::{Context, Result, anyhow};

type Job = Box<dyn FnOnce() + Send>;

/// A handle on a network namespace, with a thread that lives in it. `socket()` takes the netns of the
/// calling thread; once created, a socket can be used from any thread, so only creation runs here.
/// A persistent thread keeps setns() off tokio's workers and costs one channel hop per socket.
pub struct Netns {
    path: PathBuf,
    jobs: mpsc::Sender<Job>,
}

impl Netns {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("opening network namespace {}", path.display()))?;
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (entered_tx, entered_rx) = mpsc::channel();
        let name = format!("netns-{}", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
        thread::Builder::new().name(name).spawn(move || {
            let entered = if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
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
        Ok(Netns { path: path.to_path_buf(), jobs })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` inside the namespace and waits for its result (for setup paths).
    pub fn run_blocking<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Result<R> {
        let (tx, rx) = mpsc::channel();
        self.submit(Box::new(move || {
            let _ = tx.send(f());
        }))?;
        rx.recv().map_err(|_| anyhow!("netns thread for {} stopped", self.path.display()))
    }

    /// Runs `f` inside the namespace without blocking the async runtime.
    pub async fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Result<R> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move || {
            let _ = tx.send(f());
        }))?;
        rx.await.map_err(|_| anyhow!("netns thread for {} stopped", self.path.display()))
    }

    fn submit(&self, job: Job) -> Result<()> {
        self.jobs.send(job).map_err(|_| anyhow!("netns thread for {} stopped", self.path.display()))
    }
}
