//! Builds `agent-ebpf` for `bpfel-unknown-none` with whichever eBPF-capable Rust toolchain this machine has.
//!
//! Two routes are supported (see docs/ebpf-toolchain.md):
//! - **rustup nightly + rust-src** (an ordinary developer machine): `cargo +nightly build -Z build-std=core`.
//! - **Debian's rustc-web + libstd-rust-web-dev-bpf** (our CI machines, where rustup's toolchains have no
//!   rust-src): that package ships a prebuilt `core` for bpfel, so no build-std is needed.
//!
//! Both need `bpf-linker` (LLVM 22 build). When something is missing, [`MissingTool`] says in one line what
//! and how to get it; `cargo xtask setup` installs it.
//!
//! Used by `agent/build.rs` (so a plain `cargo build` embeds the object) and by xtask (to diagnose/install).

use std::{
    env,
    ffi::OsString,
    fmt,
    path::{Path, PathBuf},
    process::Command,
};

/// The target the programs are compiled for.
pub const BPF_TARGET: &str = "bpfel-unknown-none";
/// The package and binary name of the eBPF crate.
pub const EBPF_PACKAGE: &str = "warren-ebpf";
/// bpf-linker version known to work with LLVM 22 (both rustc-web 1.96 and current nightlies).
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages of the Debian route.
pub const DEBIAN_PACKAGES: &[&str] = &["rustc-web", "cargo-web", "libstd-rust-web-dev-bpf", "llvm-22-dev"];

/// Something the eBPF build needs and cannot find; `Display` is the one-line explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingTool(pub String);

impl fmt::Display for MissingTool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for MissingTool {}

/// `~/.cache/warren` unless `WARREN_CACHE` says otherwise.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = env::var_os("WARREN_CACHE") {
        return PathBuf::from(dir);
    }
    let home = env::var_os("HOME").unwrap_or_else(|| OsString::from("/root"));
    PathBuf::from(home).join(".cache/warren")
}

/// Where `cargo xtask setup` installs bpf-linker.
pub fn bpf_linker_install_root() -> PathBuf {
    cache_dir().join(format!("bpf-linker-{BPF_LINKER_VERSION}"))
}

fn which(name: &str, path: &OsString) -> Option<PathBuf> {
    env::split_paths(path).map(|d| d.join(name)).find(|p| p.is_file())
}

fn system_path() -> OsString {
    env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"))
}

/// Finds bpf-linker: our cache first (a known-good build), then PATH, then cargo's bin dir.
pub fn find_bpf_linker() -> Result<PathBuf, MissingTool> {
    let cached = bpf_linker_install_root().join("bin/bpf-linker");
    if cached.is_file() {
        return Ok(cached);
    }
    if let Some(p) = which("bpf-linker", &system_path()) {
        return Ok(p);
    }
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env::var_os("HOME").unwrap_or_default()).join(".cargo"));
    let in_cargo = cargo_home.join("bin/bpf-linker");
    if in_cargo.is_file() {
        return Ok(in_cargo);
    }
    Err(MissingTool(format!(
        "bpf-linker not found (looked in {}, PATH, {}): run `cargo xtask setup`, or `cargo install bpf-linker`",
        cached.display(),
        in_cargo.display()
    )))
}

/// How agent-ebpf gets compiled on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// rustup's nightly with rust-src: `-Z build-std=core`.
    RustupNightly { rustup: PathBuf },
    /// Debian's rustc-web, whose libstd-rust-web-dev-bpf ships core for bpfel prebuilt.
    DebianPrebuiltCore { cargo: PathBuf, rustc: PathBuf },
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::RustupNightly { .. } => write!(f, "rustup nightly + rust-src (-Z build-std=core)"),
            Route::DebianPrebuiltCore { rustc, .. } => {
                write!(f, "Debian rustc-web ({}) with prebuilt core for {BPF_TARGET}", rustc.display())
            }
        }
    }
}

fn rustup_nightly_with_src() -> Option<PathBuf> {
    let rustup = which("rustup", &system_path())?;
    let out = Command::new(&rustup)
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml").is_file().then_some(rustup)
}

fn debian_prebuilt_core() -> Option<Route> {
    let (cargo, rustc) = (PathBuf::from("/usr/bin/cargo"), PathBuf::from("/usr/bin/rustc"));
    let core_dir = Path::new("/usr/lib/rustlib").join(BPF_TARGET).join("lib");
    let has_core = std::fs::read_dir(&core_dir)
        .map(|entries| entries.flatten().any(|e| e.file_name().to_string_lossy().starts_with("libcore-")))
        .unwrap_or(false);
    (has_core && cargo.is_file() && rustc.is_file()).then_some(Route::DebianPrebuiltCore { cargo, rustc })
}

/// Picks the route: `WARREN_EBPF_TOOLCHAIN=nightly|debian` forces one; otherwise nightly when it has
/// rust-src (the ordinary route), else Debian's prebuilt core.
pub fn detect_route() -> Result<Route, MissingTool> {
    let forced = env::var("WARREN_EBPF_TOOLCHAIN").ok();
    let want_nightly = forced.as_deref() != Some("debian");
    let want_debian = forced.as_deref() != Some("nightly");
    if want_nightly {
        if let Some(rustup) = rustup_nightly_with_src() {
            return Ok(Route::RustupNightly { rustup });
        }
    }
    if want_debian {
        if let Some(route) = debian_prebuilt_core() {
            return Ok(route);
        }
    }
    Err(MissingTool(format!(
        "no Rust toolchain that can build for {BPF_TARGET}: install rustup nightly with rust-src \
         (`rustup toolchain install nightly --component rust-src`) or, on Debian, `apt-get install {}`; \
         `cargo xtask setup` does this",
        DEBIAN_PACKAGES.join(" ")
    )))
}

/// Everything the build needs, or the first thing that is missing.
pub fn check() -> Result<(Route, PathBuf), MissingTool> {
    Ok((detect_route()?, find_bpf_linker()?))
}

/// Compiles agent-ebpf and returns the path of the ELF object.
///
/// `workspace_root` holds the workspace Cargo.toml; `target_dir` is a cargo target directory of its own
/// (a nested cargo must not share the outer build's directory lock).
pub fn build(workspace_root: &Path, target_dir: &Path, target_arch: &str) -> Result<PathBuf, String> {
    let (route, linker) = check().map_err(|e| e.to_string())?;
    let linker_dir = linker.parent().expect("bpf-linker path has a parent").to_path_buf();

    // The outer cargo's environment (RUSTC, RUSTFLAGS, RUSTUP_TOOLCHAIN, CARGO_* of a build script…) must
    // not leak into the nested build: start from a clean environment and pass only what cargo needs.
    let mut cmd;
    let mut path_dirs = vec![linker_dir];
    match &route {
        Route::RustupNightly { rustup } => {
            cmd = Command::new(rustup);
            cmd.args(["run", "nightly", "cargo", "build", "-Z", "build-std=core"]);
            path_dirs.extend(env::split_paths(&system_path()));
        }
        Route::DebianPrebuiltCore { cargo, .. } => {
            cmd = Command::new(cargo);
            cmd.arg("build");
            // Keep rustup's proxies off PATH: they would shadow Debian's rustc for sub-invocations.
            path_dirs.extend(
                env::split_paths(&system_path()).filter(|d| !d.join("rustup").exists()),
            );
        }
    }
    cmd.env_clear();
    for var in ["HOME", "USER", "TERM", "TMPDIR", "LANG", "CARGO_HOME", "RUSTUP_HOME", "CARGO_NET_OFFLINE"] {
        if let Some(v) = env::var_os(var) {
            cmd.env(var, v);
        }
    }
    if let Route::DebianPrebuiltCore { rustc, .. } = &route {
        cmd.env("RUSTC", rustc);
    }
    cmd.env("PATH", env::join_paths(path_dirs).expect("PATH entries are valid"))
        // aya-ebpf enables #![feature(asm_experimental_arch)] on bpf; Debian's stable rustc needs this.
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                format!("--cfg=bpf_target_arch=\"{target_arch}\""),
                "-Cdebuginfo=2".into(),
                "-Clink-arg=--btf".into(),
            ]
            .join("\x1f"),
        )
        .current_dir(workspace_root)
        .args(["--package", EBPF_PACKAGE, "--bins", "--release", "--target", BPF_TARGET, "--target-dir"])
        .arg(target_dir);

    let out = cmd.output().map_err(|e| format!("running the eBPF build ({route}): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "eBPF build failed ({route}):\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let object = target_dir.join(BPF_TARGET).join("release").join(EBPF_PACKAGE);
    if !object.is_file() {
        return Err(format!("eBPF build succeeded but {} is missing", object.display()));
    }
    Ok(object)
}
