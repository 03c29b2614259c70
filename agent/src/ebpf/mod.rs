//! Loads Warren's eBPF object, pins its maps, attaches the cgroup programs, and gives the rest of the agent
//! typed access to the maps. The map layouts live in the `warren-maps` crate.
mod pinned;

pub use pinned::PinnedMaps;

use std::{
    collections::BTreeSet,
    fs::File,
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, SockOps},
};
use warren_maps::{ConnectionKey, Counter, EnrolledCgroup, OriginalDst, names};

use crate::config::EbpfLogLevel;

/// The object compiled from agent-ebpf by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/warren-ebpf.o"));

/// The loaded programs (attached for as long as this value lives) and the maps the agent writes.
pub struct Datapath {
    _ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, EnrolledCgroup>,
    original_dst: OriginalDstLookup,
    counters: EbpfCounters,
    pub pin_dir: PathBuf,
    pub attach_cgroup: PathBuf,
}

impl Datapath {
    /// Loads the programs, pinning (or re-using already pinned) maps in `pin_dir`, and attaches
    /// connect4 and sockops to `attach_cgroup`.
    pub fn load(pin_dir: &Path, attach_cgroup: &Path, log_level: EbpfLogLevel) -> Result<Self> {
        crate::sys::ensure_bpffs(pin_dir)?;
        let level = log_level.as_aya_level();
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .override_global(aya_log::LEVEL, &level, false)
            .load(EBPF_OBJECT)
            .context("loading the eBPF object (are you root, with BPF rights?)")?;

        if log_level != EbpfLogLevel::Off {
            match aya_log::EbpfLogger::init(&mut ebpf) {
                Ok(logger) => spawn_log_forwarder(logger)?,
                Err(e) => tracing::warn!("eBPF log forwarding unavailable: {e}"),
            }
        }

        let cgroup = File::open(attach_cgroup)
            .with_context(|| format!("opening cgroup {} to attach to", attach_cgroup.display()))?;
        let connect4: &mut CgroupSockAddr = program(&mut ebpf, "connect4")?.try_into()?;
        connect4.load().context("verifying connect4")?;
        connect4
            .attach(cgroup.as_fd(), CgroupAttachMode::Single)
            .with_context(|| format!("attaching connect4 to {}", attach_cgroup.display()))?;
        let sockops: &mut SockOps = program(&mut ebpf, "record_original_dst")?.try_into()?;
        sockops.load().context("verifying record_original_dst (sockops)")?;
        sockops
            .attach(cgroup.as_fd(), CgroupAttachMode::Single)
            .with_context(|| format!("attaching sockops to {}", attach_cgroup.display()))?;

        let enrolled = HashMap::try_from(take_map(&mut ebpf, names::ENROLLED_CGROUPS)?)?;
        let original_dst =
            OriginalDstLookup(Arc::new(HashMap::try_from(take_map(&mut ebpf, names::ORIGINAL_DST)?)?));
        let counters = EbpfCounters(Arc::new(PerCpuArray::try_from(take_map(&mut ebpf, names::COUNTERS)?)?));
        tracing::info!(
            pin_dir = %pin_dir.display(), cgroup = %attach_cgroup.display(),
            "eBPF programs attached (connect4, sockops)"
        );
        Ok(Datapath {
            _ebpf: ebpf,
            enrolled,
            original_dst,
            counters,
            pin_dir: pin_dir.to_path_buf(),
            attach_cgroup: attach_cgroup.to_path_buf(),
        })
    }

    /// Redirects the sockets of `cgroup_id` (and its descendants) into the agent.
    pub fn enroll(&mut self, cgroup_id: u64, entry: EnrolledCgroup) -> Result<()> {
        self.enrolled.insert(cgroup_id, entry, 0).with_context(|| format!("enrolling cgroup {cgroup_id}"))
    }

    pub fn unenroll(&mut self, cgroup_id: u64) -> Result<()> {
        match self.enrolled.remove(&cgroup_id) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("un-enrolling cgroup {cgroup_id}")),
        }
    }

    /// Drops enrollments (left in the pinned map by an earlier run) that are not in `keep`.
    pub fn retain_enrolled(&mut self, keep: &BTreeSet<u64>) -> Result<()> {
        let stale: Vec<u64> = self.enrolled.keys().filter_map(Result::ok).filter(|k| !keep.contains(k)).collect();
        for id in stale {
            tracing::info!(cgroup_id = id, "removing stale enrollment");
            self.unenroll(id)?;
        }
        Ok(())
    }

    /// A shareable handle for the proxy's per-connection lookups.
    pub fn original_dst_lookup(&self) -> OriginalDstLookup {
        self.original_dst.clone()
    }

    pub fn counters(&self) -> EbpfCounters {
        self.counters.clone()
    }
}

/// Looks up what a redirected client had dialed (one map lookup per accepted connection).
#[derive(Clone)]
pub struct OriginalDstLookup(Arc<HashMap<MapData, ConnectionKey, OriginalDst>>);

impl OriginalDstLookup {
    pub fn get(&self, key: &ConnectionKey) -> Option<OriginalDst> {
        self.0.get(key, 0).ok()
    }
}

/// The programs' per-CPU event counters, summed over CPUs.
#[derive(Clone)]
pub struct EbpfCounters(Arc<PerCpuArray<MapData, u64>>);

impl EbpfCounters {
    pub fn get(&self, counter: Counter) -> u64 {
        self.0.get(&(counter as u32), 0).map(|per_cpu| per_cpu.iter().sum()).unwrap_or(0)
    }
}

impl std::fmt::Debug for EbpfCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(Counter::ALL.iter().map(|c| (c.name(), self.get(*c)))).finish()
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name).ok_or_else(|| anyhow!("the eBPF object has no program {name}"))
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name).ok_or_else(|| anyhow!("the eBPF object has no map {name}"))
}

/// aya-log records arrive on a ring buffer; forward them to the agent's `log`/`tracing` output.
fn spawn_log_forwarder(logger: aya_log::EbpfLogger<&'static dyn log::Log>) -> Result<()> {
    // SAFETY: the logger owns the ring buffer's fd for as long as the AsyncFd owns the logger.
    let mut fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow!("watching the eBPF log ring buffer: {e}"))?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else { return };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}
