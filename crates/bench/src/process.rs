//! The `gantry` executable the scenarios start, and what the benchmarks read of a child
//! process: the lines it announces itself with, its memory.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The `gantry` executable the scenarios start `gantry serve` and `gantry sim` from, each
/// in a process of its own (`gantry bench` gives its own).
#[derive(Clone, Debug)]
pub struct Binary(PathBuf);

impl Binary {
    pub fn at(path: PathBuf) -> Binary {
        Binary(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    pub(crate) fn command(&self) -> Command {
        Command::new(&self.0)
    }
}

/// Read `child`'s stdout until `count` lines starting with `prefix` have come; answer
/// what followed the prefix on each.
pub(crate) async fn read_announced(
    child: &mut Child,
    prefix: &str,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    let stdout = child.stdout.take().context("child has no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut found = Vec::with_capacity(count);
    let deadline = Instant::now() + Duration::from_secs(120);
    while found.len() < count {
        let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
            .await
            .context("the child did not start in time")??;
        let Some(line) = line else {
            bail!(
                "the child exited before announcing itself ({} of {count})",
                found.len()
            );
        };
        if let Some(rest) = line.strip_prefix(prefix) {
            found.push(rest.trim().to_owned());
        }
    }
    // Keep draining so the child never blocks on a full pipe; a read error means the
    // pipe is gone, and with it anything to drain.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(found)
}

pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}
