//! What `cargo xtask bench` reports, in one shape for every suite so that figures can be tracked from run to
//! run: each suite writes `target/bench/<suite>.json`, a list of [`Row`]s — a figure of one path (`direct`,
//! `plaintext`, `hbone`, `+accel` where socket acceleration is on, `ztunnel-…` for the peer agent's) with its
//! ratio to the `direct` path's figure of the same metric measured in the same run. `cargo xtask bench` with
//! no suite runs them all and prints one table of every file.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The no-mesh baseline every other path of a suite is divided by.
pub const DIRECT: &str = "direct";

/// One figure of one path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub path: String,
    /// What was measured, e.g. `throughput_1conn`, `p99_1000rps`, `new_connection`, `cpu_1000rps`.
    pub metric: String,
    pub value: f64,
    pub unit: String,
    /// `value` ÷ the `direct` path's value of the same metric in the same run (> 1 is better for a
    /// throughput, worse for a latency); `None` where the suite has no direct path for the metric.
    pub ratio_to_direct: Option<f64>,
}

/// A suite's rows as they are measured; [`Report::write`] adds the ratios and writes the file.
#[derive(Debug, Default)]
pub struct Report {
    suite: String,
    rows: Vec<Row>,
}

impl Report {
    pub fn new(suite: &str) -> Report {
        Report { suite: suite.to_string(), rows: vec![] }
    }

    pub fn add(&mut self, path: &str, metric: &str, value: f64, unit: &str) {
        let row = Row { path: path.into(), metric: metric.into(), value, unit: unit.into(), ratio_to_direct: None };
        self.rows.push(row);
    }

    /// The rows with their ratios to `direct`.
    pub fn rows(&self) -> Vec<Row> {
        with_ratios(&self.rows)
    }

    /// Writes `target/bench/<suite>.json` and returns its path.
    pub fn write(&self) -> Result<PathBuf> {
        let dir = crate::workspace_root().join("target").join("bench");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let file = dir.join(format!("{}.json", self.suite));
        let json = serde_json::to_string_pretty(&self.rows()).expect("rows serialize");
        std::fs::write(&file, json + "\n").with_context(|| format!("writing {}", file.display()))?;
        Ok(file)
    }

    /// [`table`] of this suite's rows.
    pub fn table(&self) -> String {
        table(&self.suite, &self.rows())
    }
}

fn with_ratios(rows: &[Row]) -> Vec<Row> {
    let direct: BTreeMap<&str, f64> =
        rows.iter().filter(|r| r.path == DIRECT).map(|r| (r.metric.as_str(), r.value)).collect();
    rows.iter()
        .map(|r| {
            let base = direct.get(r.metric.as_str()).filter(|v| **v != 0.0 && v.is_finite());
            Row { ratio_to_direct: base.map(|b| r.value / b), ..r.clone() }
        })
        .collect()
}

/// A markdown table: a line per metric, a column per path (in the order they first appear), each cell the
/// value and its ratio to direct.
pub fn table(suite: &str, rows: &[Row]) -> String {
    let mut paths: Vec<&str> = vec![];
    let mut metrics: Vec<(&str, &str)> = vec![];
    for row in rows {
        if !paths.contains(&row.path.as_str()) {
            paths.push(&row.path);
        }
        if !metrics.iter().any(|(m, _)| *m == row.metric) {
            metrics.push((&row.metric, &row.unit));
        }
    }
    let mut out = format!("| {suite} | unit | {} |\n|---|---|{}\n", paths.join(" | "), "---|".repeat(paths.len()));
    for (metric, unit) in metrics {
        let cells: Vec<String> = paths
            .iter()
            .map(|path| match rows.iter().find(|r| r.path == *path && r.metric == metric) {
                Some(Row { value, ratio_to_direct: Some(ratio), .. }) if *path != DIRECT => {
                    format!("{} ({ratio:.2}×)", number(*value))
                }
                Some(row) => number(row.value),
                None => String::new(),
            })
            .collect();
        let _ = writeln!(out, "| {metric} | {unit} | {} |", cells.join(" | "));
    }
    out
}

fn number(value: f64) -> String {
    if value.abs() >= 100.0 || value == value.trunc() { format!("{value:.0}") } else { format!("{value:.3}") }
}

/// Every suite's rows found in `target/bench/`, by suite.
pub fn read_all(dir: &Path) -> Result<Vec<(String, Vec<Row>)>> {
    let mut suites = vec![];
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(suites) };
    let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "json")).collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        let rows: Vec<Row> = serde_json::from_str(&text).with_context(|| format!("{}: not a list of bench rows", file.display()))?;
        let suite = file.file_stem().unwrap_or_default().to_string_lossy().into_owned();
        suites.push((suite, rows));
    }
    Ok(suites)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let mut r = Report::new("l4");
        r.add("direct", "throughput_1conn", 1600.0, "MiB/s");
        r.add("hbone", "throughput_1conn", 800.0, "MiB/s");
        r.add("hbone", "new_connection", 250.0, "µs");
        r.add("direct", "p99_1000rps", 0.0, "µs");
        r.add("hbone", "p99_1000rps", 300.0, "µs");
        r
    }

    #[test]
    fn ratios_are_to_the_direct_row_of_the_same_metric() {
        let rows = report().rows();
        let ratio = |path: &str, metric: &str| rows.iter().find(|r| r.path == path && r.metric == metric).unwrap().ratio_to_direct;
        assert_eq!(ratio("hbone", "throughput_1conn"), Some(0.5));
        assert_eq!(ratio("direct", "throughput_1conn"), Some(1.0));
        // No direct row for the metric, or a zero one: no ratio rather than a made-up one.
        assert_eq!(ratio("hbone", "new_connection"), None);
        assert_eq!(ratio("hbone", "p99_1000rps"), None);
    }

    #[test]
    fn the_table_has_a_line_per_metric_and_a_column_per_path() {
        let table = report().table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "| l4 | unit | direct | hbone |");
        assert_eq!(lines[2], "| throughput_1conn | MiB/s | 1600 | 800 (0.50×) |");
        assert_eq!(lines[3], "| new_connection | µs |  | 250 |");
        assert_eq!(lines.len(), 5);
    }

    #[test]
    fn every_suites_file_is_read_back_by_suite() {
        let dir = std::env::temp_dir().join(format!("warren-bench-rows-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rows = report().rows();
        std::fs::write(dir.join("l4.json"), serde_json::to_string(&rows).unwrap()).unwrap();
        std::fs::write(dir.join("control.json"), "[]").unwrap();
        std::fs::write(dir.join("notes.md"), "not rows").unwrap();
        let suites = read_all(&dir).unwrap();
        let names: Vec<&str> = suites.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(names, ["control", "l4"], "each .json file is a suite, in name order; others are ignored");
        assert_eq!(suites[1].1, rows);
        std::fs::write(dir.join("broken.json"), "{").unwrap();
        let error = read_all(&dir).unwrap_err().to_string();
        assert!(error.contains("broken.json"), "a file that is not rows is named: {error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rows_round_trip_through_the_file_format() {
        let rows = report().rows();
        let json = serde_json::to_string(&rows).unwrap();
        assert!(json.contains("\"ratio_to_direct\":0.5"), "{json}");
        let back: Vec<Row> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, rows);
    }
}
