//! The client commands as a user runs them: the real binary against a real server and
//! simulated backends. Exit codes: 0 succeeded, 1 failed, 130 cancelled, 2 usage or
//! connection errors.

mod access;
mod agent;
mod backends;
mod exec;
mod exits;
mod profile;
mod submit;

use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use tokio::time::Instant;

struct Farm {
    server: gantry_server::Server,
    sim: gantry_sim::SimHandle,
    _data: tempfile::TempDir,
    http: reqwest::Client,
}

async fn farm(faults: &[&str]) -> Farm {
    farm_with(faults, |_| {}).await
}

async fn farm_with(faults: &[&str], tweak: impl FnOnce(&mut gantry_server::Config)) -> Farm {
    let sim = gantry_sim::spawn(gantry_sim::SimConfig {
        speed: 20.0,
        faults: faults.iter().map(|f| f.to_string()).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config =
        gantry_server::Config::new("127.0.0.1:0".parse().unwrap(), data.path().join("d"));
    config.backends =
        vec![gantry_server::BackendConfig::parse(&format!("a={}", sim.url())).unwrap()];
    tweak(&mut config);
    let server = gantry_server::Server::start(config).await.unwrap();
    Farm {
        server,
        sim,
        _data: data,
        http: reqwest::Client::new(),
    }
}

impl Farm {
    fn gantry(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gantry"));
        c.args(args)
            .env("GANTRY_SERVER", self.server.url())
            .env("RUST_LOG", "warn");
        c
    }

    async fn job(&self, id: &str) -> Value {
        self.http
            .get(format!("{}/v1/jobs/{id}", self.server.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn wait_job(&self, id: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let give_up = Instant::now() + Duration::from_secs(30);
        loop {
            let job = self.job(id).await;
            if ok(&job) {
                return job;
            }
            assert!(Instant::now() < give_up, "{what}: {job:#}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Start `gantry ARGS` (a submit) in the background; answers it and the job id it
    /// prints on its first line.
    async fn spawn_submit(&self, args: &[&str]) -> (std::process::Child, String) {
        let mut child = self
            .gantry(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let id = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            let mut line = String::new();
            std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .unwrap();
            line.trim().to_owned()
        })
        .await
        .unwrap();
        (child, id)
    }

    async fn shutdown(self) {
        self.server.shutdown().await;
        self.sim.shutdown().await;
    }
}

fn write(dir: &Path, name: &str, v: &Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec(v).unwrap()).unwrap();
    path.display().to_string()
}

fn sleep_graph(seconds: f64, steps: u64) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 1}},
        "2": {"class_type": "GantrySleep", "inputs": {"image": ["1", 0], "seconds": seconds, "steps": steps, "seed": 1}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "cli"}}
    })
}

/// Run to the end off the test's runtime (the command blocks).
async fn run(mut c: Command) -> Output {
    tokio::task::spawn_blocking(move || c.stdin(Stdio::null()).output().unwrap())
        .await
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
