//! The benchmarks of `gantry bench`: scenarios that start their own simulators and server
//! (each in its own process, so the server's cost is measured alone), drive them, and
//! print a result table and JSON. BENCHMARKS.md reports their numbers.
//!
//! The cli parses the flags into each scenario's `Options` and calls [`run`]. Errors are
//! `anyhow`'s: a scenario is the body of a command whose every error goes to the person
//! who ran it, with its context, and nothing matches on them.

pub mod chaos;
pub mod cluster;
pub mod engine;
pub mod failover;
pub mod overhead;
pub mod profile;
pub mod restart;
pub mod routing;
pub mod scale;
pub mod throughput;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// A scenario and what it runs with.
pub enum Scenario {
    Overhead(overhead::Options),
    Throughput(throughput::Options),
    Engine(engine::Options),
    Failover(failover::Options),
    Scale(scale::Options),
    Restart(restart::Options),
    Cluster(cluster::Options),
    Profile(profile::Options),
    Routing(routing::Options),
    Chaos(chaos::Options),
}

/// The `gantry` executable the scenarios start `gantry serve` and `gantry sim` from, each
/// in a process of its own (`gantry bench` gives its own).
#[derive(Clone, Debug)]
pub struct Binary(PathBuf);

impl Binary {
    pub fn at(path: PathBuf) -> Binary {
        Binary(path)
    }

    fn command(&self) -> Command {
        Command::new(&self.0)
    }
}

/// Run `scenario`, print its table and its JSON report on stdout, write the report to
/// `json` too when given; an error when it could not run or found `problems`.
pub async fn run(gantry: &Binary, scenario: Scenario, json: Option<&Path>) -> anyhow::Result<()> {
    let (name, results) = match scenario {
        Scenario::Overhead(a) => ("overhead", overhead::run(a, gantry).await?),
        Scenario::Throughput(a) => ("throughput", throughput::run(a, gantry).await?),
        Scenario::Engine(a) => ("engine", engine::run(a).await?),
        Scenario::Failover(a) => ("failover", failover::run(a, gantry).await?),
        Scenario::Scale(a) => ("scale", scale::run(a, gantry).await?),
        Scenario::Restart(a) => ("restart", restart::run(a, gantry).await?),
        Scenario::Cluster(a) => ("cluster", cluster::run(a, gantry).await?),
        Scenario::Profile(a) => ("profile", profile::run(a).await?),
        Scenario::Routing(a) => ("routing", routing::run(a, gantry).await?),
        Scenario::Chaos(a) => ("chaos", chaos::run(a, gantry).await?),
    };
    let report = json!({
        "scenario": name,
        "machine": machine(),
        "results": results.json,
    });
    println!("\n== gantry bench {name} ==");
    for line in &results.table {
        println!("{line}");
    }
    let text = serde_json::to_string_pretty(&report)?;
    println!("\n{text}");
    if let Some(path) = json {
        std::fs::write(path, &text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    // A scenario that checks promises lists what it found broken under `problems`.
    if let Some(problems) = report["results"]["problems"]
        .as_array()
        .filter(|p| !p.is_empty())
    {
        bail!(
            "gantry bench {name}: {} problems (listed above)",
            problems.len()
        );
    }
    Ok(())
}

/// What a scenario found: lines for people and a document for scripts.
pub struct Results {
    pub table: Vec<String>,
    pub json: Value,
}

/// The machine the numbers come from.
fn machine() -> Value {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    json!({"cores": cores, "memory_gib": mem_kib / (1024 * 1024), "cpu": cpu})
}

/// Percentiles of a sample, by nearest rank on the sorted values.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Stats {
    pub fn of(values: &[f64]) -> Stats {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            return Stats {
                n,
                min: f64::NAN,
                p50: f64::NAN,
                p90: f64::NAN,
                p99: f64::NAN,
                max: f64::NAN,
                mean: f64::NAN,
            };
        }
        let at = |q: f64| v[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
        Stats {
            n,
            min: v[0],
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: v[n - 1],
            mean: v.iter().sum::<f64>() / n as f64,
        }
    }

    /// `p50 1.2 / p99 3.4 / max 5.6 ms (n=100)`.
    pub fn line(&self, unit: &str) -> String {
        format!(
            "p50 {:.3} / p90 {:.3} / p99 {:.3} / max {:.3} {unit} (n={})",
            self.p50, self.p90, self.p99, self.max, self.n
        )
    }
}

/// Wall-clock microseconds, comparable with the simulator's `/sim/runs` timestamps.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Read `child`'s stdout until `count` lines starting with `prefix` have come; answer
/// what followed the prefix on each.
async fn read_announced(
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
    // Keep draining so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(found)
}

/// Simulators in a process of their own.
pub struct Sims {
    /// Held so the simulators live as long as this handle (killed on drop).
    _process: Child,
    pub urls: Vec<String>,
}

impl Sims {
    pub async fn spawn(
        gantry: &Binary,
        count: usize,
        speed: f64,
        faults: &[String],
    ) -> anyhow::Result<Sims> {
        let args: Vec<String> = faults
            .iter()
            .flat_map(|f| ["--fault".to_owned(), f.clone()])
            .collect();
        Self::spawn_args(gantry, count, speed, &args).await
    }

    /// As `spawn`, with `args` given to `gantry sim` as they are.
    pub async fn spawn_args(
        gantry: &Binary,
        count: usize,
        speed: f64,
        args: &[String],
    ) -> anyhow::Result<Sims> {
        let mut cmd = gantry.command();
        cmd.args(["sim", "--listen", "127.0.0.1:0", "--count"])
            .arg(count.to_string())
            .arg("--speed")
            .arg(speed.to_string())
            .args(args);
        let mut child = cmd
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the simulators")?;
        let urls = read_announced(&mut child, "gantry sim: a ComfyUI server on ", count).await?;
        Ok(Sims {
            _process: child,
            urls,
        })
    }

    /// Every prompt each simulator ran, one list per simulator in `urls` order.
    pub async fn runs(&self, http: &reqwest::Client) -> anyhow::Result<Vec<Vec<Run>>> {
        let mut all = Vec::new();
        for url in &self.urls {
            let v: Value = http
                .get(format!("{url}/sim/runs"))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let runs = v["runs"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|r| Run {
                            prompt_id: r["prompt_id"].as_str().unwrap_or_default().to_owned(),
                            started_us: r["started_us"].as_i64().unwrap_or(0),
                            finished_us: r["finished_us"].as_i64().unwrap_or(0),
                            status: r["status"].as_str().unwrap_or_default().to_owned(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            all.push(runs);
        }
        Ok(all)
    }
}

#[derive(Clone, Debug)]
pub struct Run {
    pub prompt_id: String,
    pub started_us: i64,
    pub finished_us: i64,
    /// How it ended: `success`, `error` (an interrupt included).
    pub status: String,
}

/// Idle gaps in ms on each backend: from the end of one prompt to the start of the next.
pub fn idle_gaps(runs: &[Vec<Run>]) -> Vec<f64> {
    let mut gaps = Vec::new();
    for backend in runs {
        let mut sorted: Vec<&Run> = backend.iter().collect();
        sorted.sort_by_key(|r| r.started_us);
        for pair in sorted.windows(2) {
            gaps.push((pair[1].started_us - pair[0].finished_us) as f64 / 1000.0);
        }
    }
    gaps
}

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
                c.args(args).arg(&gantry.0);
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
            Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status()
                .await?;
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

pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
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

/// POST a job; answers its id.
pub async fn submit(http: &reqwest::Client, server: &str, body: &Value) -> anyhow::Result<String> {
    let resp = http
        .post(format!("{server}/v1/jobs"))
        .json(body)
        .send()
        .await
        .context("submit")?;
    let status = resp.status();
    let v: Value = resp.json().await.context("submit answer")?;
    if !status.is_success() {
        bail!("submit refused ({status}): {v}");
    }
    v["id"]
        .as_str()
        .map(str::to_owned)
        .context("submit answer has no id")
}

/// One event of `/v1/events`, with when it arrived (wall µs).
#[derive(Debug)]
pub struct StreamEvent {
    pub kind: String,
    pub data: Value,
    pub at_us: i64,
}

/// Follow `/v1/events?since=SINCE`, delivering each job event as it arrives.
pub async fn follow_events(
    http: &reqwest::Client,
    server: &str,
    since: i64,
) -> anyhow::Result<mpsc::UnboundedReceiver<StreamEvent>> {
    let mut resp = http
        .get(format!("{server}/v1/events?since={since}"))
        .send()
        .await?
        .error_for_status()?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut buf = String::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            let at_us = now_us();
            buf.push_str(&String::from_utf8_lossy(&chunk));
            // One pass over what came (a chunk may hold many events), then one drain:
            // shifting the buffer after every event would cost its length each time.
            let mut start = 0;
            while let Some(rel) = buf[start..].find("\n\n") {
                let block = &buf[start..start + rel];
                start += rel + 2;
                // Only job events (the ones with an `id`) are wanted here: backend rows
                // and progress are skipped unparsed, so the client's cost stays that of
                // the events it measures.
                if !block.lines().any(|l| l.starts_with("id:")) {
                    continue;
                }
                let mut kind = String::new();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        kind = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue;
                }
                let data = serde_json::from_str(&data).unwrap_or(Value::Null);
                if tx.send(StreamEvent { kind, data, at_us }).is_err() {
                    return;
                }
            }
            buf.drain(..start);
        }
    });
    Ok(rx)
}

/// A job's terminal event kinds.
pub fn is_terminal(kind: &str) -> bool {
    matches!(kind, "succeeded" | "failed" | "cancelled")
}

/// What an event stream said until every job of `ids` was terminal.
pub struct UntilTerminal {
    /// Every event, in arrival order.
    pub log: Vec<StreamEvent>,
    /// The jobs of `ids` that reached a terminal state.
    pub done: HashSet<String>,
    /// `timeout` passed before they all did.
    pub timed_out: bool,
}

/// Read `events` until every job of `ids` is terminal or `timeout` has passed.
pub async fn follow_until_terminal(
    events: &mut mpsc::UnboundedReceiver<StreamEvent>,
    ids: &[String],
    timeout: Duration,
) -> anyhow::Result<UntilTerminal> {
    let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut followed = UntilTerminal {
        log: Vec::new(),
        done: HashSet::new(),
        timed_out: false,
    };
    let deadline = tokio::time::Instant::now() + timeout;
    while followed.done.len() < wanted.len() {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(e)) => {
                if is_terminal(&e.kind) {
                    if let Some(job) = e.data["job_id"].as_str().filter(|j| wanted.contains(j)) {
                        followed.done.insert(job.to_owned());
                    }
                }
                followed.log.push(e);
            }
            Ok(None) => bail!("the server's event stream ended"),
            Err(_) => {
                followed.timed_out = true;
                break;
            }
        }
    }
    Ok(followed)
}

/// A small image workflow whose middle node runs for `ms` (GantrySleep) with `steps`
/// progress steps; `seed` keeps it from the cache, the same seed makes it fully cached.
pub fn sleep_workflow(ms: u64, steps: u64, seed: u64) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "GantrySleep", "inputs": {"image": ["1", 0], "seconds": ms as f64 / 1000.0, "steps": steps, "seed": seed}},
        "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": "bench", "images": ["2", 0]}}
    })
}

/// HTTP client for benchmarks: no pool limit, no proxy.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1024)
        .build()
        .unwrap_or_default()
}

pub fn ms(us: i64) -> f64 {
    us as f64 / 1000.0
}
