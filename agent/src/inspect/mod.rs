//! `warren-agent inspect …`: the agent's state, read back for people (tables) and tools (`-o json`).
pub mod live;
pub mod maps;

use std::path::Path;

use anyhow::{Result, bail};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Fails unless the agent that owns `run_dir` is alive.
pub fn require_running_agent(run_dir: &Path) -> Result<i32> {
    let pid_file = run_dir.join("agent.pid");
    let Ok(text) = std::fs::read_to_string(&pid_file) else {
        bail!("warren-agent is not running on this node (no {})", pid_file.display());
    };
    let pid: i32 = text.trim().parse().unwrap_or(0);
    if !crate::sys::process_alive(pid) {
        bail!("warren-agent is not running on this node ({} names pid {pid}, which has exited)", pid_file.display());
    }
    Ok(pid)
}

/// Renders rows as aligned columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}
