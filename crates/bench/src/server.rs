//! A `gantry serve` in a process of its own, so its CPU and memory are its own, and the
//! config files the scenarios give it.

use crate::process::{read_announced, rss_kib, Binary};
use anyhow::{bail, Context};
use serde_json::Value;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// A `gantry serve` in a process of its own, on a fresh data dir unless given one.
pub struct ServerProc {
    pub child: Child,
    pub url: String,
    /// The child is a wrapper (a profiler) whose own child is the server.
    wrapped: bool,
}

impl ServerProc {
    pub async fn spawn(
        gantry: &Binary,
        data_dir: &Path,
        config_toml: &str,
    ) -> anyhow::Result<ServerProc> {
        Self::spawn_wrapped(gantry, data_dir, config_toml, &[]).await
    }

    /// Start the server under `wrapper` (e.g. `perf record ... --`), or alone when empty.
    pub async fn spawn_wrapped(
        gantry: &Binary,
        data_dir: &Path,
        config_toml: &str,
        wrapper: &[String],
    ) -> anyhow::Result<ServerProc> {
        std::fs::create_dir_all(data_dir)?;
        let config = data_dir.join("bench.toml");
        std::fs::write(&config, config_toml)?;
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(gantry.path());
                c
            }
            None => gantry.command(),
        };
        let mut child = cmd
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start gantry serve")?;
        let url = read_announced(&mut child, "gantry: serving on ", 1)
            .await?
            .remove(0);
        Ok(ServerProc {
            child,
            url,
            wrapped: !wrapper.is_empty(),
        })
    }

    /// The server's own process id.
    pub fn pid(&self) -> Option<u32> {
        let pid = self.child.id()?;
        if !self.wrapped {
            return Some(pid);
        }
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// Ask the server to shut down as on Ctrl+C, and wait for the child to end.
    pub async fn interrupt(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.pid() {
            let status = Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status()
                .await
                .context("cannot run kill")?;
            // A server that ended already is fine; one still running would never be
            // waited out.
            if !status.success() && self.child.try_wait()?.is_none() {
                bail!("kill -INT {pid} failed ({status}) and the server still runs");
            }
        }
        self.child.wait().await?;
        Ok(())
    }

    /// Resident memory of the server process, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.pid()?)
    }

    /// Total CPU time the server process has used, in seconds.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()?)).ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        Some(ticks / 100.0)
    }

    /// Wait until `count` backends are connected (idle or busy).
    pub async fn wait_backends(&self, http: &reqwest::Client, count: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let v: Value = http
                .get(format!("{}/v1/backends", self.url))
                .send()
                .await?
                .json()
                .await?;
            let up = v["backends"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|b| matches!(b["status"].as_str(), Some("idle" | "busy")))
                        .count()
                })
                .unwrap_or(0);
            if up >= count {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("only {up} of {count} backends connected after 120 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A config file naming `urls` as backends b0, b1, ...
pub fn backends_toml(urls: &[String], extra: &str) -> String {
    let mut s = String::from(extra);
    s.push('\n');
    for (i, url) in urls.iter().enumerate() {
        s.push_str(&format!("[[backends]]\nname = \"b{i}\"\nurl = \"{url}\"\n"));
    }
    s
}
