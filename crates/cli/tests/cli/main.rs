//! Tests of the `gantry` binary as a user runs it: a real process, killed for real.

mod chaos;
mod client;
mod farm;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

fn workflow(seed: u64, seconds: f64) -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/comfyui/workflows/a_normal.json"
    ))
    .unwrap();
    let mut w: Value = serde_json::from_str(&text).unwrap();
    w["2"]["inputs"]["seed"] = json!(seed);
    w["2"]["inputs"]["seconds"] = json!(seconds);
    w
}

/// Start `gantry serve` on a free port and answer the process and its URL, read from the
/// line it prints once it listens.
fn serve(data_dir: &std::path::Path, backend: &str) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gantry"))
        .args(["serve", "--listen", "127.0.0.1:0", "--backend"])
        .arg(format!("sim={backend}"))
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let url = serving_url(&mut child);
    (child, url)
}

/// The URL a `gantry serve` child prints on its first line, once it listens.
fn serving_url(child: &mut Child) -> String {
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next().unwrap().unwrap();
    line.strip_prefix("gantry: serving on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line}"))
        .to_owned()
}

async fn get(http: &reqwest::Client, url: &str) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

async fn wait_for(
    http: &reqwest::Client,
    url: &str,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = get(http, url).await;
        if ok(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGKILL the server with one job running, one queued behind it on the backend and one
/// queued in gantry, start it again on the same data dir: the two on the backend are
/// re-attached (not run again), the queued one runs, and every job succeeds exactly once.
#[tokio::test]
async fn sigkill_restart_loses_nothing_and_runs_nothing_twice() {
    let sim = gantry_sim::spawn(gantry_sim::SimConfig {
        speed: 4.0,
        ..Default::default()
    })
    .await
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let (mut first, url) = serve(data.path(), &sim.url());

    let mut ids = Vec::new();
    for seed in 0..3 {
        // Four seconds of sleep at speed 4: one second on the backend.
        let resp = http
            .post(format!("{url}/v1/jobs"))
            .json(&json!({"workflow": workflow(seed, 4.0)}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
        let body: Value = resp.json().await.unwrap();
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    wait_for(
        &http,
        &format!("{url}/v1/jobs/{}", ids[0]),
        "the first job to execute",
        |j| j["phase"] == "executing",
    )
    .await;
    // The second waits on the backend behind the first (pipelined), the third in gantry.
    wait_for(
        &http,
        &format!("{url}/v1/jobs/{}", ids[1]),
        "the second job queued on the backend",
        |j| j["phase"] == "pending",
    )
    .await;
    let queued = get(&http, &format!("{url}/v1/jobs?state=queued")).await;
    assert_eq!(queued["jobs"].as_array().unwrap().len(), 1, "{queued}");

    first.kill().unwrap();
    first.wait().unwrap();

    let (mut second, url) = serve(data.path(), &sim.url());
    let mut prompt_ids = Vec::new();
    for id in &ids {
        let job = wait_for(
            &http,
            &format!("{url}/v1/jobs/{id}"),
            "the job to finish",
            |j| {
                matches!(
                    j["state"].as_str(),
                    Some("succeeded" | "failed" | "cancelled")
                )
            },
        )
        .await;
        assert_eq!(job["state"], "succeeded", "{job}");
        let attempts = job["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 1, "one attempt each, none re-run: {job}");
        prompt_ids.push(attempts[0]["prompt_id"].as_str().unwrap().to_owned());
    }
    // The backend ran each prompt once.
    let history: Value = get(&http, &format!("{}/history", sim.url())).await;
    let ran: Vec<&String> = history.as_object().unwrap().keys().collect();
    assert_eq!(ran.len(), 3, "{ran:?}");
    for pid in &prompt_ids {
        assert!(ran.contains(&pid), "{pid} not in the backend's history");
    }
    second.kill().unwrap();
    second.wait().unwrap();
    sim.shutdown().await;
}

/// `gantry demo --jobs N --exit-when-done` runs N jobs through three simulated backends,
/// one of them faulty, and exits 0 with a summary only when all succeeded.
#[test]
fn demo_exits_zero_when_every_job_succeeded() {
    let out = Command::new(env!("CARGO_BIN_EXE_gantry"))
        .args([
            "demo",
            "--jobs",
            "8",
            "--exit-when-done",
            "--speed",
            "50",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("demo: 8 succeeded, 0 failed, 0 cancelled"),
        "{stdout}"
    );
}

/// `gantry demo` prints the monitor's address beside the API's, and that address
/// answers the monitor page.
#[tokio::test]
async fn demo_prints_the_monitor_address_and_it_answers_the_page() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gantry"))
        .args([
            "demo",
            "--jobs",
            "1",
            "--speed",
            "50",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let monitor = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(rest) = line.trim_start().strip_prefix("monitor: ") {
                return rest.split_whitespace().next().unwrap().to_owned();
            }
            seen.push(line);
        }
        panic!("no monitor line in {seen:#?}");
    })
    .await;
    let page = match &monitor {
        Ok(url) => reqwest::get(url.as_str()).await.map(|r| (r.status(), r)),
        Err(_) => {
            let _ = child.kill();
            panic!("{monitor:?}");
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let (status, response) = page.unwrap();
    assert_eq!(status, 200);
    let body = response.text().await.unwrap();
    assert!(body.contains("<title>gantry monitor</title>"), "{body}");
}

/// Logs carry colour codes only on a terminal: piped, stderr has no ESC byte.
#[test]
fn logs_to_a_pipe_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    // The demo logs at info (its backends connecting, its jobs running).
    let out = Command::new(env!("CARGO_BIN_EXE_gantry"))
        .args([
            "demo",
            "--jobs",
            "2",
            "--exit-when-done",
            "--speed",
            "50",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("INFO"), "no log line to check: {stderr}");
    assert!(
        !out.stderr.contains(&0x1b),
        "colour codes in piped logs: {stderr:?}"
    );
}

/// `gantry token create --help` names every scope there is, with what it allows.
#[test]
fn token_create_help_lists_every_scope() {
    let help = |flag: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_gantry"))
            .args(["token", "create", flag])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let long = help("--help");
    let names: Vec<&str> = gantry_core::auth::Scope::ALL
        .iter()
        .map(|s| s.as_str())
        .collect();
    assert!(names.contains(&"agent"));
    for name in &names {
        assert!(
            long.contains(&format!("- {name}:")),
            "{name} missing:\n{long}"
        );
    }
    let short = help("-h");
    assert!(
        short.contains(&format!("[possible values: {}]", names.join(", "))),
        "{short}"
    );
}

/// Run `gantry bench ARGS --json FILE` and answer the results document. Benchmarks are
/// smoke-tested small: they must run end to end and report every job; their numbers are
/// for BENCHMARKS.md, never asserted against the clock.
fn bench(args: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench.json");
    let status = Command::new(env!("CARGO_BIN_EXE_gantry"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .arg(&out)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "gantry bench {args:?} failed");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(doc["scenario"], args[0]);
    assert!(doc["machine"]["cores"].as_u64().unwrap() >= 1);
    doc["results"].clone()
}

#[test]
fn bench_overhead_compares_the_direct_client_with_gantry() {
    let r = bench(&[
        "overhead",
        "--jobs",
        "8",
        "--backends",
        "2",
        "--job-ms",
        "50",
    ]);
    for mode in ["direct", "gantry_closed", "gantry_backlog"] {
        assert_eq!(r[mode]["jobs"], 8, "{mode}");
        assert_eq!(r[mode]["failed"], 0, "{mode}");
        assert_eq!(r[mode]["success_to_done_ms"]["n"], 8, "{mode}");
    }
    assert!(r["wall_ratio_backlog"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_throughput_runs_cached_jobs_through_the_real_protocol() {
    let r = bench(&[
        "throughput",
        "--jobs",
        "40",
        "--backends",
        "4",
        "--submitters",
        "4",
        "--profile",
        "false",
    ]);
    assert_eq!(r["latency_ms"]["n"], 40);
    assert!(r["jobs_per_s_overall"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_engine_runs_every_job_through_the_store() {
    let r = bench(&["engine", "--jobs", "500", "--backends", "8"]);
    assert_eq!(r["events"], 2500, "five committed events a job");
    assert_eq!(r["submit_ack_ms"]["n"], 500);
}

#[test]
fn bench_failover_detects_every_fault_and_every_job_succeeds() {
    let r = bench(&["failover", "--backends", "4", "--jobs", "12"]);
    assert_eq!(r["succeeded"], 12, "{r:#}");
    // One backend of four hangs and one stalls: the first jobs there must fault.
    assert!(r["all"]["faults"].as_u64().unwrap() > 0, "{r:#}");
    // (A job taken back from behind a stalled prompt is retried too, with no lag of
    // its own to measure.)
    assert!(
        r["all"]["detection_lag_ms"]["n"].as_u64().unwrap() > 0,
        "{r:#}"
    );
}

#[test]
fn bench_restart_loses_no_job_and_runs_none_twice() {
    let r = bench(&[
        "restart",
        "--queued",
        "30",
        "--running",
        "6",
        "--job-ms",
        "500",
    ]);
    assert_eq!(r["end_state"]["clean"], true, "{r:#}");
    assert_eq!(r["end_state"]["succeeded_once"], 36, "{r:#}");
}

#[test]
fn bench_scale_keeps_queued_jobs_parked_and_streams_every_event_in_order() {
    let r = bench(&[
        "scale",
        "--backends",
        "1,3",
        "--queued",
        "50,200",
        "--subscribers",
        "1,4",
        "--probes",
        "3",
        "--equal-probes",
        "2",
        "--fanout-jobs",
        "20",
    ]);
    for run in r["backends"]["runs"].as_array().unwrap() {
        assert_eq!(run["all_connected"], true, "{run:#}");
    }
    for run in r["queue"]["runs"].as_array().unwrap() {
        assert_eq!(run["all_parked"], true, "{run:#}");
        assert_eq!(run["probes"]["equal"]["starved"], false, "{run:#}");
    }
    for run in r["fanout"]["runs"].as_array().unwrap() {
        assert_eq!(run["complete_in_order"], run["subscribers"], "{run:#}");
    }
}

#[test]
fn bench_cluster_runs_one_and_several_coordinators_on_postgres() {
    if std::env::var(gantry_store::testing::POSTGRES_URL_VAR).is_err() {
        eprintln!("GANTRY_TEST_POSTGRES_URL is not set: this Postgres test is skipped");
        return;
    }
    let r = bench(&[
        "cluster",
        "--jobs",
        "60",
        "--backends",
        "4",
        "--submitters",
        "4",
        "--coordinators",
        "1,2",
    ]);
    let runs = r["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for (run, n) in runs.iter().zip([1, 2]) {
        assert_eq!(run["coordinators"], n);
        assert_eq!(run["job_ms"]["n"], 60, "{run:#}");
        assert_eq!(run["dispatch_ms"]["n"], 60, "{run:#}");
        assert_eq!(run["idle_job_ms"]["n"], 200, "{run:#}");
    }
}

/// `--log-format json`: every line is a JSON object, and what the driver logs about an
/// attempt carries its span (job id, attempt, backend).
#[tokio::test]
async fn serve_logs_json_lines_with_the_attempt_span() {
    let sim = gantry_sim::spawn(gantry_sim::SimConfig {
        speed: 20.0,
        faults: vec!["error:class=GantrySleep".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gantry"))
        .args([
            "--log-format",
            "json",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--backend",
        ])
        .arg(format!("sim={}", sim.url()))
        .arg("--data-dir")
        .arg(data.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let url = serving_url(&mut child);
    let http = reqwest::Client::new();
    let job: Value = http
        .post(format!("{url}/v1/jobs"))
        .json(&json!({"workflow": workflow(1, 0.5), "max_attempts": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    wait_for(&http, &format!("{url}/v1/jobs/{id}"), "job failed", |j| {
        j["state"] == "failed"
    })
    .await;
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let failed = lines
        .iter()
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("attempt failed"))
        })
        .unwrap_or_else(|| panic!("no attempt failure logged: {text}"));
    assert_eq!(failed["span"]["name"], "attempt", "{failed}");
    assert_eq!(failed["span"]["job_id"], json!(id), "{failed}");
    assert_eq!(failed["span"]["attempt"], 1, "{failed}");
    assert_eq!(failed["span"]["backend"], "sim", "{failed}");
    sim.shutdown().await;
}

#[test]
fn bench_profile_measures_the_profile_against_parsing() {
    let r = bench(&["profile", "--jobs", "50", "--steps", "10"]);
    assert_eq!(r["profile_us"]["n"], 50, "{r:#}");
    assert_eq!(r["parse_us"]["n"], 50, "{r:#}");
    assert!(r["profile_bytes"].as_u64().unwrap() > 0);
    assert!(r["profile_over_parse_p50"].as_f64().unwrap().is_finite());
}

#[test]
fn bench_routing_runs_the_batch_warm_and_random_and_counts_cold_loads() {
    let r = bench(&[
        "routing",
        "--backends",
        "2",
        "--jobs",
        "12",
        "--models",
        "2",
        "--cold-ms",
        "300",
        "--steps",
        "1",
    ]);
    for mode in ["warm", "random"] {
        let m = &r[mode];
        assert_eq!(m["job_s"]["n"], 12, "{r:#}");
        // Every backend's first load is cold; no job loads more than once.
        let cold = m["cold_loads"].as_u64().unwrap();
        assert!((1..=12).contains(&cold), "{mode}: {cold} cold loads: {r:#}");
        assert!(m["total_s"].as_f64().unwrap() > 0.0);
    }
    assert!(r["random_over_warm"].as_f64().unwrap().is_finite());
}
