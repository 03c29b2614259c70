//! A directory of YAML files, read again as it changes: only files whose name, size, modification time or
//! inode changed are re-read (a removed file's objects go), and an object that cannot be read this time
//! keeps the version read before.
use std::{
    collections::{BTreeMap, HashSet},
    ffi::OsString,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    time::SystemTime,
};

use anyhow::{Context, Result};

use super::{FileRead, KEPT_PREVIOUS, read_file};
use crate::{
    analyze::{Level, Message},
    cluster::ClusterState,
};

/// What tells a changed file: the inode too, because Kubernetes updates a mounted ConfigMap by swapping a
/// symlink (the file's own size and time can stay the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: (u64, u64),
}

#[derive(Debug)]
pub struct Directory {
    dir: PathBuf,
    files: BTreeMap<OsString, (Option<Stamp>, FileRead)>,
    reads: u64,
}

impl Directory {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Directory { dir: dir.into(), files: BTreeMap::new(), reads: 0 }
    }

    /// Reads the files that changed since the last call; `Ok(false)` when none did. Fails only when the
    /// directory cannot be listed (what was read before then stays).
    pub fn refresh(&mut self) -> Result<bool> {
        let listed = self.list()?;
        let before = self.files.len();
        self.files.retain(|name, _| listed.contains_key(name));
        let mut changed = self.files.len() != before;
        for (name, stamp) in listed {
            let cached = self.files.get(&name);
            // A file that cannot be stat'ed (a dangling symlink) has no stamp; it is read again once it has one.
            if cached.is_some_and(|(s, _)| *s == stamp) {
                continue;
            }
            let mut read = read_file(&self.dir.join(&name), &name.to_string_lossy());
            self.reads += 1;
            if let Some((_, previous)) = cached {
                keep_previous(&mut read, previous);
            }
            self.files.insert(name, (stamp, read));
            changed = true;
        }
        Ok(changed)
    }

    /// Everything read, as one state, with cluster IPs for the Services that have none (as the API server
    /// would allocate them: `cluster_ip`).
    pub fn state(&self) -> ClusterState {
        let mut state = ClusterState::default();
        state.apply_reads(self.files.values().map(|(_, read)| read));
        state.allocate_cluster_ips();
        state
    }

    /// How many times a file was read (parsed) so far.
    pub fn reads(&self) -> u64 {
        self.reads
    }

    fn list(&self) -> Result<BTreeMap<OsString, Option<Stamp>>> {
        let entries = std::fs::read_dir(&self.dir).with_context(|| format!("reading config directory {}", self.dir.display()))?;
        Ok(entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .filter_map(|p| {
                let name = p.file_name()?.to_owned();
                // Follows symlinks: the content is what changes. One that leads nowhere has no stamp.
                match std::fs::metadata(&p) {
                    // Directories, FIFOs (opening one would block until a writer came), devices: not files.
                    Ok(meta) if !meta.is_file() => None,
                    Ok(meta) => Some((name, Some(stamp(&meta)))),
                    Err(_) => Some((name, None)),
                }
            })
            .collect())
    }
}

fn stamp(meta: &std::fs::Metadata) -> Stamp {
    Stamp { len: meta.len(), modified: meta.modified().ok(), inode: (meta.dev(), meta.ino()) }
}

/// The last good generation: objects of `previous` that `read` failed on stay in force. Where a failure
/// names no object (a document that is not YAML, a file that could not be read), every object of
/// `previous` that `read` does not hold stays — which of them the broken part held cannot be told.
fn keep_previous(read: &mut FileRead, previous: &FileRead) {
    let unknown = read.failed.iter().any(Option::is_none);
    let failed: HashSet<_> = read.failed.iter().flatten().cloned().collect();
    let present: HashSet<_> = read.objects.iter().map(|o| o.key.clone()).collect();
    for object in &previous.objects {
        if present.contains(&object.key) || !(unknown || failed.contains(&object.key)) {
            continue;
        }
        let source = previous.location(object.line);
        read.notices.push(Message {
            level: Level::Warning,
            code: KEPT_PREVIOUS,
            object: object.key.origin(),
            field: None,
            text: format!("could not be read this time; the version read before ({source}) stays in force"),
            source: Some(source),
        });
        read.objects.push(object.clone());
    }
}
