//! `cargo xtask bench parse`: what reading a config directory costs on hostile and on large input —
//! `ClusterState::from_dir` (release build) on
//!
//! 1. one file nested 100,000 deep (`{"a":{"a":…`, ~600 KB): before the depth check serde_yaml spent
//!    165 s on such a file (libyaml's scanner is quadratic in flow depth); now it is rejected up front;
//! 2. one 5 MB file of valid VirtualServices (block style, as users write them): all read.
//!
//! Prints a markdown table and writes it to `target/bench-parse.md`.
use std::{
    fmt::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use warren_config::cluster::ClusterState;

const DEPTH: usize = 100_000;
const LARGE_BYTES: usize = 5_000_000;
const RUNS: usize = 5;

fn deep() -> String {
    format!("{}1{}\n", "{\"a\":".repeat(DEPTH), "}".repeat(DEPTH))
}

/// VirtualServices with header matches, a weighted split, a timeout and retries, up to `LARGE_BYTES`.
fn large() -> String {
    let mut out = String::with_capacity(LARGE_BYTES + 1024);
    let mut i = 0;
    while out.len() < LARGE_BYTES {
        write!(
            out,
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: svc-{i}\n  namespace: ns-{}\n\
             spec:\n  hosts:\n  - svc-{i}\n  http:\n  - match:\n    - headers:\n        end-user:\n          exact: jason\n      uri:\n        prefix: /api/v1/\n    \
             route:\n    - destination:\n        host: svc-{i}\n        subset: v2\n  - route:\n    - destination:\n        host: svc-{i}\n        subset: v1\n      \
             weight: 90\n    - destination:\n        host: svc-{i}\n        subset: v3\n      weight: 10\n    timeout: 1.5s\n    retries:\n      attempts: 3\n      \
             perTryTimeout: 500ms\n",
            i % 50
        )
        .unwrap();
        i += 1;
    }
    out
}

/// The fastest and the median of `RUNS` reads, and the state of the last.
fn measure(dir: &Path) -> (Duration, Duration, ClusterState) {
    let mut times = Vec::new();
    let mut state = ClusterState::default();
    for _ in 0..RUNS {
        let started = Instant::now();
        state = ClusterState::from_dir(dir).expect("directory");
        times.push(started.elapsed());
    }
    times.sort();
    (times[0], times[RUNS / 2], state)
}

fn case(root: &Path, name: &str, text: &str) -> (Duration, Duration, ClusterState) {
    let dir = root.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench directory");
    std::fs::write(dir.join(format!("{name}.yaml")), text).expect("bench file");
    eprintln!("parse bench: {name} ({} bytes)…", text.len());
    measure(&dir)
}

fn main() {
    let root = xtask::workspace_root().join("target").join("bench-parse");
    let mut out = String::from("| input | size | fastest | median | outcome |\n|---|---|---|---|---|\n");
    let deep = deep();
    let (fast, median, state) = case(&root, "deep", &deep);
    let outcome = state.notices.first().map(ToString::to_string).unwrap_or_else(|| "accepted".into());
    writeln!(out, "| {DEPTH} deep | {} KB | {fast:.1?} | {median:.1?} | {outcome} |", deep.len() / 1000).unwrap();
    let large = large();
    let (fast, median, state) = case(&root, "large", &large);
    let outcome = format!("{} VirtualServices, {} notices", state.virtual_services.len(), state.notices.len());
    writeln!(out, "| VirtualServices | {:.1} MB | {fast:.1?} | {median:.1?} | {outcome} |", large.len() as f64 / 1e6).unwrap();
    let _ = std::fs::remove_dir_all(&root);
    println!("\n`ClusterState::from_dir`, {RUNS} runs each:\n\n{out}");
    let path = xtask::workspace_root().join("target").join("bench-parse.md");
    match std::fs::write(&path, &out) {
        Ok(()) => eprintln!("parse bench: results written to {}", path.display()),
        Err(e) => eprintln!("parse bench: writing {}: {e}", path.display()),
    }
}
