//! Read-only access to the maps a running agent pinned, for `warren-agent inspect maps`.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use aya::maps::{HashMap, LpmTrie, Map, MapData, PerCpuArray};
use warren_maps::{AuthzEntryKey, AuthzTarget, AuthzVerdict, ConnectionKey, Counter, EnrolledNetns, OriginalDst, names};

pub struct PinnedMaps {
    pub dir: PathBuf,
}

impl PinnedMaps {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.join(names::ENROLLED_NETNS).exists() {
            bail!("no pinned maps in {}: warren-agent has not run on this node", dir.display());
        }
        Ok(PinnedMaps { dir: dir.to_path_buf() })
    }

    fn map(&self, name: &str) -> Result<Map> {
        let path = self.dir.join(name);
        let data = MapData::from_pin(&path).map_err(|e| {
            let denied = matches!(&e, aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::EPERM) || s.io_error.raw_os_error() == Some(libc::EACCES));
            if denied {
                anyhow::anyhow!("permission denied opening {}: reading BPF maps needs root (CAP_BPF)", path.display())
            } else {
                anyhow::anyhow!("opening pinned map {}: {e}", path.display())
            }
        })?;
        Map::from_map_data(data).with_context(|| format!("pinned map {}", path.display()))
    }

    pub fn enrolled_netns(&self) -> Result<Vec<(u64, EnrolledNetns)>> {
        let map: HashMap<_, u64, EnrolledNetns> = HashMap::try_from(self.map(names::ENROLLED_NETNS)?)?;
        let mut entries: Vec<_> = map.iter().collect::<Result<_, _>>()?;
        entries.sort_by_key(|(id, _)| *id);
        Ok(entries)
    }

    pub fn original_dsts(&self) -> Result<Vec<(ConnectionKey, OriginalDst)>> {
        let map: HashMap<_, ConnectionKey, OriginalDst> = HashMap::try_from(self.map(names::ORIGINAL_DST)?)?;
        let mut entries: Vec<_> = map.iter().collect::<Result<_, _>>()?;
        entries.sort_by_key(|(k, _)| (k.netns_cookie, k.port));
        Ok(entries)
    }

    /// L4_AUTHZ's entries in key order (destination, port, source prefix), and how many keys it holds that
    /// are no valid entry (the agent never writes such; a sync removes them).
    pub fn l4_authz(&self) -> Result<(Vec<(AuthzEntryKey, AuthzVerdict)>, usize)> {
        let map: LpmTrie<_, AuthzTarget, AuthzVerdict> = LpmTrie::try_from(self.map(names::L4_AUTHZ)?)?;
        let (entries, foreign) = super::read_trie(&map)?;
        Ok((entries.into_iter().collect(), foreign.len()))
    }

    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        let map: PerCpuArray<_, u64> = PerCpuArray::try_from(self.map(names::COUNTERS)?)?;
        Counter::ALL
            .iter()
            .map(|c| Ok((*c, map.get(&(*c as u32), 0)?.iter().sum())))
            .collect()
    }
}
