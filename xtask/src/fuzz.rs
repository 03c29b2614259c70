//! Fuzzing with cargo-fuzz (libFuzzer): the targets in `fuzz/` (see docs/testing.md, "Fuzzing").
//!
//! cargo-fuzz is built once into ~/.cache/warren/cargo-fuzz-<version>. Targets build without a sanitizer by
//! default: Debian's rustc-web (CI's toolchain) ships no ASan runtime, and without a sanitizer cargo-fuzz
//! passes only stable rustc flags, so no nightly and no `RUSTC_BOOTSTRAP`. `--sanitizer address` works where
//! the toolchain has the runtime (rustup's), with `RUSTC_BOOTSTRAP=1` for `-Zsanitizer` on stable.
use std::{
    collections::VecDeque,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::JoinHandle,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::{cargo, run, setup::scripts_dir, workspace_root};

pub const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// The fuzz targets (`fuzz/fuzz_targets/<name>.rs`).
pub const TARGETS: [&str; 2] = ["config_yaml", "push_frame"];
/// How long `cargo xtask test` runs each target (`WARREN_FUZZ_SECONDS` overrides; 0 skips).
pub const SMOKE_SECONDS: u64 = 60;

/// Where `cargo xtask` installs cargo-fuzz.
pub fn install_root() -> PathBuf {
    warren_ebpf_build::cache_dir().join(format!("cargo-fuzz-{CARGO_FUZZ_VERSION}"))
}

pub fn fuzz_dir() -> PathBuf {
    workspace_root().join("fuzz")
}

/// The committed seed corpus of a target.
pub fn seeds_dir(target: &str) -> PathBuf {
    fuzz_dir().join("corpus").join(target)
}

/// The corpus a run grows (libFuzzer writes new inputs to the first corpus directory): under fuzz/target,
/// so it is kept between runs on one machine and never lands in git.
pub fn work_corpus_dir(target: &str) -> PathBuf {
    fuzz_dir().join("target/corpus").join(target)
}

/// Istio's bookinfo samples, read (not copied) as extra seeds for `config_yaml`: as the config crate's
/// tests find them.
fn bookinfo_samples() -> Option<PathBuf> {
    [
        std::env::var_os("WARREN_CONFORMANCE_DIR").map(PathBuf::from),
        Some(workspace_root().join("../shared/conformance/istio-bookinfo")),
        Some(PathBuf::from("/work/shared/conformance/istio-bookinfo")),
    ]
    .into_iter()
    .flatten()
    .find(|d| d.is_dir())
}

fn on_path(name: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|d| d.join(name).is_file())
}

/// A C++ compiler (libfuzzer-sys compiles libFuzzer) and cargo-fuzz, installed once; returns cargo-fuzz.
pub fn setup() -> Result<PathBuf> {
    if !on_path("c++") {
        if !Path::new("/usr/bin/dpkg-query").exists() {
            bail!("fuzzing needs a C++ compiler for libFuzzer (c++ on PATH): install g++");
        }
        run(Command::new("bash").arg(scripts_dir().join("install-deps.sh"))).context("installing Debian packages")?;
    }
    let bin = install_root().join("bin/cargo-fuzz");
    if !bin.is_file() {
        eprintln!("xtask: building cargo-fuzz {CARGO_FUZZ_VERSION} into {} (once)", install_root().display());
        let mut cmd = cargo();
        cmd.args(["install", "--locked", &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"), "--root"])
            .arg(install_root())
            // Outside the workspace, so its config and lockfile do not apply.
            .current_dir(std::env::temp_dir());
        run(&mut cmd).context("building cargo-fuzz")?;
    }
    Ok(bin)
}

/// cargo-fuzz runs `cargo` from PATH: make that the cargo (and rustc) running xtask, so the fuzz build uses
/// the same toolchain as everything else (Debian's on CI, rustup's stable elsewhere).
fn cargo_fuzz(bin: &Path, subcommand: &str, sanitizer: &str) -> Command {
    let mut cmd = Command::new(bin);
    let mut path: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("CARGO").map(PathBuf::from).and_then(|c| c.parent().map(Path::to_path_buf)) {
        path.push(dir);
    }
    path.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    cmd.env("PATH", std::env::join_paths(path).expect("PATH entries are valid"));
    // What `cargo run` set for xtask itself: build scripts watch some of these (ring reruns on
    // CARGO_MANIFEST_DIR), which would rebuild half the tree between xtask and a plain `cargo fuzz`.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || ["CARGO", "CARGO_MANIFEST_DIR", "CARGO_MANIFEST_PATH", "CARGO_CRATE_NAME", "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE", "CARGO_RUSTC_CURRENT_DIR"]
                .contains(&name.as_ref())
        {
            cmd.env_remove(name.as_ref());
        }
    }
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    cmd.arg("fuzz")
        .arg(subcommand)
        .arg("--fuzz-dir")
        .arg(fuzz_dir())
        .args(["--sanitizer", sanitizer])
        // Builds use every core (2 on CI) and no more; a run is one libFuzzer process on one core.
        .env("CARGO_BUILD_JOBS", jobs.to_string())
        // cargo-fuzz sets RUSTFLAGS (and appends the user's); CARGO_ENCODED_RUSTFLAGS would replace them, and
        // CARGO_TARGET_DIR would move the build out of fuzz/target.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .current_dir(workspace_root());
    if sanitizer != "none" {
        // Each sanitizer builds into its own directory (other flags: a shared one would rebuild every time).
        cmd.arg("--target-dir").arg(fuzz_dir().join("target").join(sanitizer));
        // cargo-fuzz passes -Zsanitizer; stable rustc takes it with RUSTC_BOOTSTRAP.
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    cmd
}

/// Builds every target.
pub fn build(bin: &Path, sanitizer: &str) -> Result<()> {
    run(&mut cargo_fuzz(bin, "build", sanitizer)).context("building the fuzz targets")
}

/// What a finished run printed that matters: libFuzzer's final status line and `stat::` lines.
#[derive(Debug, Default)]
pub struct Summary {
    pub target: String,
    pub done: Option<String>,
    pub stats: Vec<String>,
    /// The crash report when there was one (from the first line that tells), else the last lines of output.
    pub tail: Vec<String>,
    pub log: PathBuf,
    pub success: bool,
}

impl Summary {
    pub fn report(&self) -> String {
        let mut out = format!("fuzz {}: {}", self.target, if self.success { "ok" } else { "FAILED" });
        if let Some(done) = &self.done {
            out.push_str(&format!("\n  {done}"));
        }
        let stats: Vec<String> = self
            .stats
            .iter()
            .map(|s| s.trim_start_matches("stat::").split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        if !stats.is_empty() {
            out.push_str(&format!("\n  {}", stats.join(", ")));
        }
        out
    }
}

/// A running `cargo fuzz run`; its output goes to `log` (and to our stderr when `echo`).
pub struct Running {
    target: String,
    child: Child,
    reader: JoinHandle<(Option<String>, Vec<String>, Vec<String>)>,
    log: PathBuf,
}

/// Starts fuzzing `target` for `seconds` (libFuzzer's -max_total_time), from its seeds and the work corpus.
pub fn start(bin: &Path, target: &str, seconds: u64, sanitizer: &str, extra: &[String], echo: bool) -> Result<Running> {
    if !TARGETS.contains(&target) {
        bail!("no fuzz target {target:?} (there are: {})", TARGETS.join(", "));
    }
    let work = work_corpus_dir(target);
    std::fs::create_dir_all(&work)?;
    let mut cmd = cargo_fuzz(bin, "run", sanitizer);
    cmd.arg(target).arg(&work).arg(seeds_dir(target));
    if target == "config_yaml"
        && let Some(samples) = bookinfo_samples()
    {
        cmd.arg(samples);
    }
    cmd.arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        // One input taking this long is a hang, and fails the run like a crash.
        .arg("-timeout=10");
    let dict = fuzz_dir().join(format!("{target}.dict"));
    if dict.is_file() {
        cmd.arg(format!("-dict={}", dict.display()));
    }
    cmd.args(extra);
    let log = fuzz_dir().join("target").join(format!("{target}.log"));
    let mut file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().with_context(|| format!("running {cmd:?}"))?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let reader = std::thread::spawn(move || {
        let (mut done, mut stats, mut tail) = (None, Vec::new(), VecDeque::new());
        let mut report: Option<Vec<String>> = None;
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(file, "{line}");
            if echo {
                eprintln!("{line}");
            }
            if line.contains("DONE ") && line.starts_with('#') {
                done = Some(line.replace('\t', " "));
            } else if line.starts_with("stat::") {
                stats.push(line.clone());
            }
            // libFuzzer's and Rust's ways of saying what went wrong; cargo-fuzz's own backtrace after
            // "Error: Fuzz target exited" adds nothing.
            let starts = ["panicked at", "==ERROR", "ALARM:", "out-of-memory", "deadly signal", "SUMMARY: libFuzzer"];
            if report.is_none() && starts.iter().any(|m| line.contains(m)) {
                report = Some(Vec::new());
            }
            if let Some(report) = report.as_mut()
                && report.len() < 60
                && !report.last().is_some_and(|l: &String| l.starts_with("Error: Fuzz target exited"))
            {
                report.push(line.clone());
            }
            tail.push_back(line);
            if tail.len() > 40 {
                tail.pop_front();
            }
        }
        (done, stats, report.unwrap_or_else(|| tail.into()))
    });
    Ok(Running { target: target.to_string(), child, reader, log })
}

impl Running {
    pub fn wait(mut self) -> Result<Summary> {
        let status = self.child.wait()?;
        let (done, stats, tail) = self.reader.join().expect("the output reader does not panic");
        Ok(Summary { target: self.target, done, stats, tail, log: self.log, success: status.success() })
    }
}

/// `cargo xtask fuzz <target>`: build, then run one target with its output on the terminal.
pub fn fuzz(target: &str, seconds: u64, sanitizer: &str, extra: &[String]) -> Result<()> {
    if target == "all" {
        return smoke(seconds, sanitizer, extra);
    }
    let bin = setup()?;
    build(&bin, sanitizer)?;
    let started = Instant::now();
    let summary = start(&bin, target, seconds, sanitizer, extra, true)?.wait()?;
    eprintln!("xtask: {} (in {:.0?}; corpus {}; log {})", summary.report(), started.elapsed(),
        corpus_size(&work_corpus_dir(target)), summary.log.display());
    if !summary.success {
        bail!("fuzz target {target} failed: the crashing input is in fuzz/artifacts/{target}/");
    }
    Ok(())
}

fn corpus_size(dir: &Path) -> String {
    let (files, bytes) = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .fold((0u64, 0u64), |(n, b), m| (n + 1, b + m.len()));
    format!("{files} files, {} KiB in {}", bytes / 1024, dir.display())
}

/// The smoke runs of `cargo xtask test` (and `cargo xtask fuzz all`): every target for `seconds`, side by
/// side when there are cores for it, output in fuzz/target/<target>.log; fails when one crashes (printing
/// its report).
pub fn smoke(seconds: u64, sanitizer: &str, extra: &[String]) -> Result<()> {
    let started = Instant::now();
    let bin = setup()?;
    build(&bin, sanitizer)?;
    let built = started.elapsed();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut summaries = Vec::new();
    for batch in TARGETS.chunks(cores.max(1)) {
        eprintln!("xtask: fuzzing {} for {seconds} s each", batch.join(", "));
        let running: Vec<Running> =
            batch.iter().map(|t| start(&bin, t, seconds, sanitizer, extra, false)).collect::<Result<_>>()?;
        for r in running {
            summaries.push(r.wait()?);
        }
    }
    let mut failed: Vec<&str> = Vec::new();
    for s in &summaries {
        eprintln!("xtask: {}", s.report());
        if !s.success {
            eprintln!("xtask: last lines of {}:", s.log.display());
            for line in &s.tail {
                eprintln!("    {line}");
            }
            failed.push(&s.target);
        }
    }
    eprintln!("xtask: fuzz smoke runs took {:.0?} (build {:.0?})", started.elapsed(), built);
    if !failed.is_empty() {
        bail!("fuzz targets failed: {} (crashing inputs in fuzz/artifacts/<target>/)", failed.join(", "));
    }
    Ok(())
}
