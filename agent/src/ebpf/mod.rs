//! Loads Warren's eBPF object, pins its maps and links, attaches the programs, and gives the rest of the
//! agent typed access to the maps. The map layouts live in the `warren-maps` crate.
//!
//! Everything the kernel needs to keep redirecting is pinned under the pin directory: the maps, and the
//! links of the cgroup programs and of every enrolled pod's sk_lookup. A restarted agent loads its
//! programs again, re-using the pinned maps, attaches new links and then swaps the pins — so redirect
//! never stops for lack of an attached program. (Between the two, both run; the second sees a loopback
//! destination and leaves it alone.)
mod authz;
#[cfg(test)]
mod authz_tests;
mod pinned;

pub use authz::{AuthzTrie, KernelDenial, TrieContents, l4_authz_entries, read_trie, spawn_denial_reader, sync_lpm_trie};
pub use pinned::PinnedMaps;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf, SockHash},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SkLookup, SkMsg, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use tokio::sync::mpsc::UnboundedReceiver;
use warren_maps::{
    AuthzEntryKey, AuthzVerdict, ConnectionKey, Counter, EnrolledNetns, ListenerKey, OriginalDst, ServiceKey, ServiceRoute,
    Settings, names,
};

use crate::config::EbpfLogLevel;

/// The object compiled from agent-ebpf by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/warren-ebpf.o"));

/// The loaded programs and the maps the agent writes.
pub struct Datapath {
    ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, EnrolledNetns>,
    inbound_listeners: SockHash<MapData, ListenerKey>,
    /// Not read again, but its fd must stay open: aya relocates the map's fd into the programs, which
    /// are verified after the maps are taken.
    _settings: Array<MapData, Settings>,
    original_dst: OriginalDstLookup,
    counters: EbpfCounters,
    service_routes: SyncedMap<ServiceKey, ServiceRoute>,
    connect_faults: SyncedMap<ServiceKey, warren_maps::ConnectFault>,
    l4_authz: AuthzTrie,
    /// Until [`Datapath::take_denials`] hands it to the reader. (Taken before capture_inbound is
    /// verified, like every map a program uses: its fd is what aya relocated into the program.)
    authz_denials: Option<RingBuf<MapData>>,
    pub pin_dir: PathBuf,
    pub attach_cgroup: PathBuf,
    /// Entries the agent last wrote to the maps the controller's tables fill.
    sizes: Arc<MapSizes>,
}

/// How full the maps that hold the controller's tables are (written on each sync, read at scrape time).
#[derive(Debug, Default)]
pub struct MapSizes {
    pub service_routes: AtomicUsize,
    pub connect_faults: AtomicUsize,
    pub l4_authz: AtomicUsize,
}

impl MapSizes {
    /// `(map, entries, capacity)` for each.
    pub fn fill(&self) -> [(&'static str, usize, u32); 3] {
        [
            ("SERVICE_ROUTES", self.service_routes.load(Ordering::Relaxed), warren_maps::MAX_SERVICE_ROUTES),
            ("CONNECT_FAULTS", self.connect_faults.load(Ordering::Relaxed), warren_maps::MAX_CONNECT_FAULTS),
            ("L4_AUTHZ", self.l4_authz.load(Ordering::Relaxed), warren_maps::MAX_L4_AUTHZ),
        ]
    }
}

impl Datapath {
    /// Loads the programs (re-using pinned maps in `pin_dir`), writes `settings`, and attaches the cgroup
    /// programs to `attach_cgroup`, pinning their links.
    pub fn load(pin_dir: &Path, attach_cgroup: &Path, log_level: EbpfLogLevel, settings: Settings) -> Result<Self> {
        crate::sys::ensure_bpffs(pin_dir)?;
        std::fs::create_dir_all(links_dir(pin_dir).join("pods"))?;
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

        let mut settings_map: Array<MapData, Settings> = Array::try_from(take_map(&mut ebpf, names::SETTINGS)?)?;
        settings_map.set(0, settings, 0).context("writing settings")?;

        let cgroup = File::open(attach_cgroup)
            .with_context(|| format!("opening cgroup {} to attach to", attach_cgroup.display()))?;
        for name in ["connect4", "connect6"] {
            let program: &mut CgroupSockAddr = program(&mut ebpf, name)?.try_into()?;
            program.load().with_context(|| format!("verifying {name}"))?;
            let id = program
                .attach(cgroup.as_fd(), CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", attach_cgroup.display()))?;
            let link: FdLink = program.take_link(id)?.try_into()?;
            replace_pin(link, &links_dir(pin_dir).join(name))?;
        }
        let sockops: &mut SockOps = program(&mut ebpf, "track_sockets")?.try_into()?;
        sockops.load().context("verifying track_sockets (sock_ops)")?;
        let id = sockops
            .attach(cgroup.as_fd(), CgroupAttachMode::Single)
            .with_context(|| format!("attaching track_sockets to {}", attach_cgroup.display()))?;
        let link: FdLink = sockops.take_link(id)?.try_into()?;
        replace_pin(link, &links_dir(pin_dir).join("track_sockets"))?;

        // sk_msg attaches to the sockhash itself (and stays attached while the pinned map lives).
        let local_sockets: SockHash<MapData, warren_maps::SocketKey> =
            SockHash::try_from(take_map(&mut ebpf, names::LOCAL_SOCKETS)?)?;
        let sk_msg: &mut SkMsg = program(&mut ebpf, "redirect_to_peer")?.try_into()?;
        sk_msg.load().context("verifying redirect_to_peer (sk_msg)")?;
        let id = sk_msg.attach(local_sockets.fd()).context("attaching redirect_to_peer to LOCAL_SOCKETS")?;
        // Keep the attachment when this agent exits, like the pinned links.
        std::mem::forget(sk_msg.take_link(id)?);

        let l4_authz = LpmTrie::try_from(take_map(&mut ebpf, names::L4_AUTHZ)?)?;
        let authz_denials = RingBuf::try_from(take_map(&mut ebpf, names::AUTHZ_DENIALS)?)?;
        let sk_lookup: &mut SkLookup = program(&mut ebpf, "capture_inbound")?.try_into()?;
        sk_lookup.load().context("verifying capture_inbound (sk_lookup)")?;
        // Agents before L4_AUTHZ pinned a hash map L4_POLICY; nothing reads it any more. (Programs still
        // attached from such an agent keep their reference until their links are replaced.)
        let _ = std::fs::remove_file(pin_dir.join("L4_POLICY"));
        // Likewise ENROLLED_CGROUPS, before enrollment was keyed by network namespace.
        let _ = std::fs::remove_file(pin_dir.join("ENROLLED_CGROUPS"));
        let service_routes = SyncedMap::new(HashMap::try_from(take_map(&mut ebpf, names::SERVICE_ROUTES)?)?);
        let connect_faults = SyncedMap::new(HashMap::try_from(take_map(&mut ebpf, names::CONNECT_FAULTS)?)?);

        let enrolled = HashMap::try_from(take_map(&mut ebpf, names::ENROLLED_NETNS)?)?;
        let inbound_listeners = SockHash::try_from(take_map(&mut ebpf, names::INBOUND_LISTENERS)?)?;
        let original_dst =
            OriginalDstLookup(Arc::new(HashMap::try_from(take_map(&mut ebpf, names::ORIGINAL_DST)?)?));
        let counters = EbpfCounters(Arc::new(PerCpuArray::try_from(take_map(&mut ebpf, names::COUNTERS)?)?));
        tracing::info!(
            pin_dir = %pin_dir.display(), cgroup = %attach_cgroup.display(),
            socket_acceleration = settings.socket_acceleration == 1,
            "eBPF programs attached (connect4, connect6, track_sockets, redirect_to_peer)"
        );
        Ok(Datapath {
            ebpf,
            enrolled,
            inbound_listeners,
            _settings: settings_map,
            original_dst,
            counters,
            service_routes,
            connect_faults,
            l4_authz,
            authz_denials: Some(authz_denials),
            pin_dir: pin_dir.to_path_buf(),
            attach_cgroup: attach_cgroup.to_path_buf(),
            sizes: Arc::default(),
        })
    }

    pub fn map_sizes(&self) -> Arc<MapSizes> {
        self.sizes.clone()
    }

    /// Redirects the TCP connects of sockets in the network namespace `netns_cookie` into the agent.
    pub fn enroll(&mut self, netns_cookie: u64, entry: EnrolledNetns) -> Result<()> {
        self.enrolled.insert(netns_cookie, entry, 0).with_context(|| format!("enrolling netns {netns_cookie}"))
    }

    pub fn unenroll(&mut self, netns_cookie: u64) -> Result<()> {
        match self.enrolled.remove(&netns_cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("un-enrolling netns {netns_cookie}")),
        }
    }

    /// Removes every pin (maps and links): nothing outlives this agent, and its programs detach when it
    /// exits and lets go of its links.
    pub fn remove_pins(&self) -> Result<()> {
        std::fs::remove_dir_all(&self.pin_dir).with_context(|| format!("removing {}", self.pin_dir.display()))
    }

    /// Drops enrollments (left in the pinned map by an earlier run) that are not in `keep`.
    pub fn retain_enrolled(&mut self, keep: &BTreeSet<u64>) -> Result<()> {
        let stale: Vec<u64> = self.enrolled.keys().filter_map(Result::ok).filter(|k| !keep.contains(k)).collect();
        for id in stale {
            tracing::info!(netns_cookie = id, "removing stale enrollment");
            self.unenroll(id)?;
        }
        Ok(())
    }

    /// Makes `listener` the target of inbound connections to `key`'s address.
    pub fn add_inbound_listener(&mut self, key: ListenerKey, listener: &impl AsRawFd) -> Result<()> {
        self.inbound_listeners.insert(key, listener.as_raw_fd(), 0).context("adding an inbound listener")
    }

    pub fn remove_inbound_listener(&mut self, key: &ListenerKey) {
        let _ = self.inbound_listeners.remove(key);
    }

    /// Attaches inbound capture to a pod's netns and pins the link as `links/pods/<uid>`.
    pub fn attach_inbound_capture(&mut self, netns: &File, uid: &str) -> Result<()> {
        let sk_lookup: &mut SkLookup = program(&mut self.ebpf, "capture_inbound")?.try_into()?;
        let id = sk_lookup.attach(netns.as_fd()).context("attaching capture_inbound (sk_lookup) to the pod's netns")?;
        let link: FdLink = sk_lookup.take_link(id)?.into();
        replace_pin(link, &self.pod_link(uid))
    }

    /// Detaches inbound capture from a pod (removes its pinned link).
    pub fn detach_inbound_capture(&mut self, uid: &str) {
        let _ = std::fs::remove_file(self.pod_link(uid));
    }

    /// Removes pinned per-pod links of pods not in `keep` (an earlier agent's pods that are gone).
    pub fn retain_pod_links(&mut self, keep: &BTreeSet<String>) {
        let dir = links_dir(&self.pin_dir).join("pods");
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let uid = entry.file_name().to_string_lossy().into_owned();
            if !keep.contains(&uid) {
                tracing::info!(uid, "removing stale inbound capture link");
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    fn pod_link(&self, uid: &str) -> PathBuf {
        links_dir(&self.pin_dir).join("pods").join(uid)
    }

    /// Makes CONNECT_FAULTS hold exactly `want`; returns (written, removed).
    pub fn sync_connect_faults(&mut self, want: &BTreeMap<ServiceKey, warren_maps::ConnectFault>) -> Result<(usize, usize)> {
        let synced = self.connect_faults.sync(want).context("writing CONNECT_FAULTS")?;
        self.sizes.connect_faults.store(want.len(), Ordering::Relaxed);
        Ok(synced)
    }

    /// Makes SERVICE_ROUTES hold exactly `want`; returns (written, removed).
    pub fn sync_service_routes(&mut self, want: &BTreeMap<ServiceKey, ServiceRoute>) -> Result<(usize, usize)> {
        let synced = self.service_routes.sync(want).context("writing SERVICE_ROUTES")?;
        self.sizes.service_routes.store(want.len(), Ordering::Relaxed);
        Ok(synced)
    }

    /// Makes L4_AUTHZ hold exactly `want` (see [`AuthzEntryKey`] for the key and sk_lookup's lookup
    /// order); returns (written, removed).
    pub fn sync_l4_authz(&mut self, want: &BTreeMap<AuthzEntryKey, AuthzVerdict>) -> Result<(usize, usize)> {
        let synced = sync_lpm_trie(&mut self.l4_authz, want).context("writing L4_AUTHZ")?;
        self.sizes.l4_authz.store(want.len(), Ordering::Relaxed);
        Ok(synced)
    }

    /// The connections sk_lookup refuses, as they happen. The first call starts the reader of
    /// `AUTHZ_DENIALS` (see [`spawn_denial_reader`]; needs a tokio runtime) and returns its receiver;
    /// later calls return `None`. Until it is called nothing consumes the ring: once full, new records
    /// are dropped and counted (`denial_events_lost`).
    pub fn take_denials(&mut self) -> Result<Option<UnboundedReceiver<KernelDenial>>> {
        let Some(ring) = self.authz_denials.take() else { return Ok(None) };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        spawn_denial_reader(ring, tx)?;
        Ok(Some(rx))
    }

    /// A shareable handle for the proxy's per-connection lookups.
    pub fn original_dst_lookup(&self) -> OriginalDstLookup {
        self.original_dst.clone()
    }

    pub fn counters(&self) -> EbpfCounters {
        self.counters.clone()
    }
}

/// A hash map the agent alone writes, with what it last wrote: a sync of 10k entries where one changed
/// costs one write, not 10k lookups and a walk of every key. Until the first sync (a restarted agent finds
/// its pinned map holding an earlier agent's entries) and after any failed write, nothing is assumed and
/// the map itself is read.
struct SyncedMap<K, V> {
    map: HashMap<MapData, K, V>,
    written: Option<BTreeMap<K, V>>,
}

impl<K: aya::Pod + Ord, V: aya::Pod + PartialEq> SyncedMap<K, V> {
    fn new(map: HashMap<MapData, K, V>) -> Self {
        SyncedMap { map, written: None }
    }

    /// Makes the map hold exactly `want`; returns (written, removed).
    fn sync(&mut self, want: &BTreeMap<K, V>) -> Result<(usize, usize)> {
        let synced = match self.written.take() {
            Some(written) => sync_from(&mut self.map, &written, want),
            None => sync_map(&mut self.map, want),
        }?;
        self.written = Some(want.clone());
        Ok(synced)
    }
}

/// [`sync_map`] against what the map was last made to hold (`written`) instead of the map.
fn sync_from<K, V>(map: &mut HashMap<MapData, K, V>, written: &BTreeMap<K, V>, want: &BTreeMap<K, V>) -> Result<(usize, usize)>
where
    K: aya::Pod + Ord,
    V: aya::Pod + PartialEq,
{
    let mut changed = 0;
    for (key, value) in want.iter().filter(|(key, value)| written.get(key) != Some(value)) {
        map.insert(key, value, 0)?;
        changed += 1;
    }
    let stale: Vec<&K> = written.keys().filter(|k| !want.contains_key(k)).collect();
    for key in &stale {
        match map.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok((changed, stale.len()))
}

/// Writes the entries of `want` that differ from the map, then removes what `want` lacks: a reader never
/// sees a key missing that is present before and after.
fn sync_map<K, V>(map: &mut HashMap<MapData, K, V>, want: &BTreeMap<K, V>) -> Result<(usize, usize)>
where
    K: aya::Pod + Ord,
    V: aya::Pod + PartialEq,
{
    let mut written = 0;
    for (key, value) in want {
        if map.get(key, 0).ok().as_ref() != Some(value) {
            map.insert(key, value, 0)?;
            written += 1;
        }
    }
    let stale: Vec<K> = map.keys().filter_map(Result::ok).filter(|k| !want.contains_key(k)).collect();
    for key in &stale {
        match map.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok((written, stale.len()))
}

fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(warren_maps::LINKS_DIR)
}

/// Pins `link` at `path`, replacing (and so detaching) whatever an earlier agent pinned there.
fn replace_pin(link: FdLink, path: &Path) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let pinned: PinnedLink = link.pin(path).with_context(|| format!("pinning link {}", path.display()))?;
    // The pin keeps the link; this process's fd is not needed.
    drop(pinned);
    Ok(())
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
