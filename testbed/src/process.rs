//! Real processes inside pods and nodes: spawned into a netns (and cgroup), output captured, killed on
//! teardown.
use std::{
    fs::{File, OpenOptions},
    io::Read,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::Path,
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::Inner;

/// A process the testbed started; its stdout and stderr are captured as they arrive.
pub struct Process {
    child: Arc<Mutex<Child>>,
    pub pid: u32,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Process {
    /// Spawns `command` in `netns` ("" for the test's own) and in each of `cgroups` (a cgroup v2 group
    /// and, for a pod laid out as a cgroup v1 kubelet does, a v1 one too).
    pub(crate) fn spawn(bed: &Arc<Inner>, mut command: Command, netns: &str, cgroups: &[&Path]) -> Result<Process> {
        // Open everything before fork: between fork and exec only setns() and write() run.
        // An empty name: the test process's own (host) netns.
        let netns_file = match netns {
            "" => None,
            name => Some(File::open(Path::new("/run/netns").join(name)).with_context(|| format!("netns {name}"))?),
        };
        let procs: Vec<File> = cgroups
            .iter()
            .map(|dir| {
                OpenOptions::new().write(true).open(dir.join("cgroup.procs")).with_context(|| format!("cgroup {}", dir.display()))
            })
            .collect::<Result<_>>()?;
        let ns_fd = netns_file.as_ref().map(|f| f.as_raw_fd());
        let procs_fds: Vec<i32> = procs.iter().map(|f| f.as_raw_fd()).collect();
        // SAFETY: between fork and exec the closure only calls write() and setns() on descriptors opened
        // above (kept open until the spawn returns) and reads a Vec built before the fork: no allocation.
        unsafe {
            command.pre_exec(move || {
                for &fd in &procs_fds {
                    // "0" moves the writing process itself.
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(ns_fd) = ns_fd
                    && libc::setns(ns_fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().with_context(|| format!("spawning {:?} in {netns}", command.get_program()))?;
        drop((netns_file, procs));
        let pid = child.id();
        let (stdout, stderr) = (Arc::new(Mutex::new(vec![])), Arc::new(Mutex::new(vec![])));
        let readers = vec![
            pump(child.stdout.take().expect("piped"), stdout.clone()),
            pump(child.stderr.take().expect("piped"), stderr.clone()),
        ];
        let child = Arc::new(Mutex::new(child));
        bed.processes.lock().unwrap().push(child.clone());
        Ok(Process { child, pid, stdout, stderr, readers })
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&self) -> Option<ExitStatus> {
        self.child.lock().unwrap().try_wait().ok().flatten()
    }

    /// Waits until stdout has a line equal to `line`; fails if the process exits first or on timeout.
    pub fn wait_for_line(&mut self, line: &str, timeout: Duration) -> Result<()> {
        self.wait_for(timeout, |out, _| out.lines().any(|l| l.trim() == line)).with_context(|| format!("waiting for {line:?}"))
    }

    /// Waits until `done(stdout, stderr)` holds; fails if the process exits first or on timeout.
    pub fn wait_for(&self, timeout: Duration, done: impl Fn(&str, &str) -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.stdout(), &self.stderr()) {
                return Ok(());
            }
            if let Some(status) = self.exited() {
                // What it wrote last may still be in the pipes: read to their end (the pumps' EOF; bounded,
                // a child of it may hold them), then look once more.
                let drained = Instant::now() + Duration::from_secs(1);
                while !self.readers.iter().all(|r| r.is_finished()) && Instant::now() < drained {
                    std::thread::sleep(Duration::from_millis(1));
                }
                if done(&self.stdout(), &self.stderr()) {
                    return Ok(());
                }
                bail!("process {} exited ({status}); stderr:\n{}", self.pid, tail(&self.stderr(), 40));
            }
            if Instant::now() > deadline {
                bail!("timed out after {timeout:?}; stderr:\n{}", tail(&self.stderr(), 40));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn wait_with_output(mut self) -> Result<Output> {
        let status = self.child.lock().unwrap().wait()?;
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        Ok(Output { status, stdout: self.stdout.lock().unwrap().clone(), stderr: self.stderr.lock().unwrap().clone() })
    }

    /// SIGTERM, then SIGKILL after 5 s; returns the exit status.
    pub fn terminate(&self) -> Option<ExitStatus> {
        terminate(&self.child)
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn signal(&self, signal: i32) {
        unsafe { libc::kill(self.pid as i32, signal) };
    }
}

fn pump(mut from: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    })
}

pub(crate) fn terminate(child: &Arc<Mutex<Child>>) -> Option<ExitStatus> {
    let mut child = child.lock().unwrap();
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    child.wait().ok()
}

pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What `warren-testapp send` reports.
#[derive(Debug, Clone, Deserialize)]
pub struct SendResult {
    /// Every byte came back, in order.
    pub ok: bool,
    pub sent: u64,
    pub received: u64,
    /// The client's local address and the peer address it saw.
    pub local: Option<String>,
    pub peer: Option<String>,
    pub error: Option<String>,
}

impl SendResult {
    pub(crate) fn parse(out: &Output) -> Result<SendResult> {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().rev().find(|l| l.starts_with('{')).with_context(|| {
            format!("warren-testapp send printed no result ({}); stderr: {}", out.status, String::from_utf8_lossy(&out.stderr))
        })?;
        Ok(serde_json::from_str(line)?)
    }
}

/// One connect-exchange-close of a [`ConnectLoop`].
#[derive(Debug, Clone, Deserialize)]
pub struct Attempt {
    /// Wall clock (ms since the epoch) when the attempt started.
    pub at_ms: u128,
    pub ok: bool,
    /// The address the client's socket was connected to (127.0.0.1:15001 when redirected).
    pub peer: Option<String>,
    pub error: Option<String>,
}

/// A client looping connects inside a pod.
pub struct ConnectLoop {
    pub process: Process,
}

impl ConnectLoop {
    /// Waits for the loop to finish and returns every attempt.
    pub fn attempts(self) -> Result<Vec<Attempt>> {
        let out = self.process.wait_with_output()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).with_context(|| format!("attempt record {l}")))
            .collect()
    }
}

/// Wall clock in ms since the epoch (to compare with [`Attempt::at_ms`]).
pub fn now_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

/// What `warren-testapp hold` reports: `connected`, `alive` every tenth probe, then `closed` (or `open`
/// when it gave up waiting).
#[derive(Debug, Clone, Deserialize)]
pub struct HoldEvent {
    pub event: String,
    /// Wall clock (ms since the epoch), comparable with [`now_ms`].
    pub at_ms: u128,
    /// Echoes of the one-byte probe that crossed the connection before it ended.
    #[serde(default)]
    pub probes: u64,
    /// How it ended: `eof`, `read: …`, `write: …`.
    pub error: Option<String>,
}

/// A long-lived connection from inside a pod ([`crate::Pod::hold_connection`]).
pub struct HeldConnection {
    pub(crate) process: Process,
}

impl HeldConnection {
    /// Every event so far.
    pub fn events(&self) -> Result<Vec<HoldEvent>> {
        self.process
            .stdout()
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).with_context(|| format!("hold event {l}")))
            .collect()
    }

    /// `Some(event)` once the connection has ended.
    pub fn closed(&self) -> Result<Option<HoldEvent>> {
        Ok(self.events()?.into_iter().find(|e| e.event == "closed"))
    }

    /// Waits up to `timeout` for the connection to end; `None` if it is still open then.
    pub fn wait_closed(&self, timeout: Duration) -> Result<Option<HoldEvent>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(closed) = self.closed()? {
                return Ok(Some(closed));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Probes echoed so far, as last reported (every tenth, and at the end): the connection still carries
    /// data while this grows.
    pub fn probes(&self) -> u64 {
        self.events().ok().and_then(|e| e.last().map(|e| e.probes)).unwrap_or(0)
    }
}

/// utime + stime of a process (all its threads), in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command's `(name)`: state is field 3; utime and stime are fields 14 and 15.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks: u64 = [11, 12].iter().filter_map(|i| fields.get(*i)?.parse::<u64>().ok()).sum();
    // SAFETY: sysconf only reads a configuration value.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// VmRSS of a process, in MiB: its anonymous memory and the pages of its binary and libraries it touched.
pub fn rss_mib(pid: u32) -> f64 {
    status_kib(pid, "VmRSS:") / 1024.0
}

/// RssAnon of a process, in MiB: the memory it allocated (heap, stacks), without the file pages VmRSS
/// also counts (which other processes running the same binary share).
pub fn rss_anon_mib(pid: u32) -> f64 {
    status_kib(pid, "RssAnon:") / 1024.0
}

fn status_kib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = status.lines().find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse::<f64>().ok());
    kib.unwrap_or(0.0)
}
