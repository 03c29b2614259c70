//! Locating the workspace's binaries from a test or xtask process.
use std::path::PathBuf;

use anyhow::{Result, bail};

/// Path of a workspace binary (`warren-agent`, `warren-testapp`, …) in the same target directory as the
/// running executable; `WARREN_BIN_DIR` overrides. `cargo xtask test` builds them before testing.
pub fn bin_path(name: &str) -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("WARREN_BIN_DIR") {
        let path = PathBuf::from(dir).join(name);
        if path.is_file() {
            return Ok(path);
        }
        bail!("{name} not found in WARREN_BIN_DIR ({})", path.display());
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    for dir in exe.ancestors().skip(1).take(3) {
        let path = dir.join(name);
        if path.is_file() {
            return Ok(path);
        }
    }
    bail!("{name} is not built next to {} — run `cargo build --workspace --bins` (cargo xtask test does)", exe.display())
}
