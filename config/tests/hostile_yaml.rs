//! Hostile input costs little: a 500 KB file nested 100k deep took serde_yaml 165 s before the depth check
//! (see `warren_config::load`). Not a timing test — machines are noisy — but a bound far below that, so a
//! regression to quadratic parsing fails here. `cargo xtask bench parse` has the figures.
use std::time::{Duration, Instant};

use warren_config::{cluster::ClusterState, load};

#[test]
fn a_file_nested_100k_deep_is_rejected_with_the_depth_error_quickly() {
    let dir = std::env::temp_dir().join(format!("warren-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let depth = 100_000;
    std::fs::write(dir.join("deep.yaml"), format!("{}1{}\n", "{\"a\":".repeat(depth), "}".repeat(depth))).unwrap();
    let started = Instant::now();
    let state = ClusterState::from_dir(&dir).unwrap();
    let took = started.elapsed();
    std::fs::remove_dir_all(&dir).unwrap();
    let messages: Vec<String> = state.notices.iter().map(ToString::to_string).collect();
    assert_eq!(messages, ["Error [WAR0005] (deep.yaml:1) collections nested deeper than 64 levels; the document is skipped"]);
    assert_eq!(state.notices[0].code, load::LIMIT_EXCEEDED);
    assert!(took < Duration::from_secs(10), "took {took:?}");
}
