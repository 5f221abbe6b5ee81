//! The client commands as a user runs them: the real binary against a real server and
//! simulated backends. Exit codes: 0 succeeded, 1 failed, 130 cancelled, 2 usage or
//! connection errors.

use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_attach_uploads_the_file_and_names_it_in_the_input() {
    let farm = farm(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let graph = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "att"}}
    });
    let file = write(dir.path(), "w.json", &graph);
    let png = gantry_sim::image::Picture::from_color(12, 10, 0x204060)
        .png()
        .unwrap();
    let face = dir.path().join("face.png");
    std::fs::write(&face, &png).unwrap();
    let out = dir.path().join("out");
    let o = run(farm.gantry(&[
        "submit",
        &file,
        "--attach",
        &format!("1.image={}", face.display()),
        "--out",
        out.to_str().unwrap(),
    ]))
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let files: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    // The backend loaded the attached picture, not a placeholder.
    let got = gantry_sim::image::Picture::from_png(&std::fs::read(&files[0]).unwrap()).unwrap();
    assert_eq!(
        (got.width, got.height, got.rgb),
        (12, 10, [0x20, 0x40, 0x60])
    );

    let missing = dir.path().join("nope.png");
    let o = run(farm.gantry(&[
        "submit",
        &file,
        "--attach",
        &format!("9.image={}", face.display()),
    ]))
    .await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--attach 9.image="), "{}", stderr(&o));
    assert!(stderr(&o).contains("has no node 9"), "{}", stderr(&o));
    let o = run(farm.gantry(&[
        "submit",
        &file,
        "--attach",
        &format!("1.image={}", missing.display()),
    ]))
    .await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot read"), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_watch_runs_to_success_with_edits_and_outputs_on_disk() {
    let farm = farm(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "w.json", &sleep_graph(2.0, 4));
    let out = dir.path().join("out");
    let o = run(farm.gantry(&[
        "submit",
        &file,
        "--watch",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "2.seed=77",
        "--set",
        "3.filename_prefix=edited",
        "--priority",
        "-2",
        "--timeout",
        "node_stall=1m",
    ]))
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    let err = stderr(&o);
    assert!(err.contains("dispatched to a"), "{err}");
    assert!(err.contains("step 4"), "progress is shown: {err}");
    assert!(err.contains(&format!("job {id} succeeded")), "{err}");
    let files: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let png = std::fs::read(&files[0]).unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    assert!(files[0]
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("edited"));

    let job = farm.job(&id).await;
    assert_eq!(job["priority"], -2);
    assert_eq!(job["timeouts"]["node_stall_ms"], 60_000);
    // The backend ran the edited graph: a number stayed a number, a string a string.
    let prompt_id = job["attempts"][0]["prompt_id"].as_str().unwrap();
    let history: Value = farm
        .http
        .get(format!("{}/history/{prompt_id}", farm.sim.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let graph = &history[prompt_id]["prompt"][2];
    assert_eq!(graph["2"]["inputs"]["seed"], 77);
    assert_eq!(graph["3"]["inputs"]["filename_prefix"], "edited");

    // show, jobs and outputs read the same job.
    let o = run(farm.gantry(&["show", &id, "--json"])).await;
    assert_eq!(o.status.code(), Some(0));
    let shown: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(shown["state"], "succeeded");
    let o = run(farm.gantry(&["jobs", "--state", "succeeded", "--json"])).await;
    let listed: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(listed[0]["id"], json!(id));
    let again = dir.path().join("again");
    let o = run(farm.gantry(&["outputs", &id, "--out", again.to_str().unwrap()])).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(std::fs::read_dir(&again).unwrap().count(), 1);
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_during_watch_cancels_the_job_on_the_server() {
    let farm = farm(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "w.json", &sleep_graph(600.0, 300));
    let (child, id) = farm.spawn_submit(&["submit", &file, "--watch"]).await;
    farm.wait_job(&id, "executing", |j| {
        j["attempts"][0]["status"] == "executing"
    })
    .await;
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let o = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("job {id} cancelled")),
        "{}",
        stderr(&o)
    );
    let job = farm.job(&id).await;
    assert_eq!(job["state"], "cancelled", "{job:#}");
    // Down to the backend: nothing of it runs there any more.
    let queue: Value = farm
        .http
        .get(format!("{}/queue", farm.sim.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(queue["queue_running"], json!([]), "{queue:#}");
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_leaves_the_job_running_and_watch_follows_it_again() {
    let farm = farm(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "w.json", &sleep_graph(20.0, 10));
    let (child, id) = farm
        .spawn_submit(&["submit", &file, "--watch", "--detach"])
        .await;
    farm.wait_job(&id, "executing", |j| {
        j["attempts"][0]["status"] == "executing"
    })
    .await;
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let o = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(stderr(&o).contains("left job"), "{}", stderr(&o));
    assert_eq!(farm.job(&id).await["cancel_requested"], false);
    let o = run(farm.gantry(&["watch", &id])).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_an_unreachable_server_exit_2_with_a_clear_message() {
    let farm = farm(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let ui_format = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/workflows/ui-format-example.json"
    ))
    .unwrap();
    let ui = dir.path().join("ui.json");
    std::fs::write(&ui, ui_format).unwrap();
    let not_json = dir.path().join("bad.json");
    std::fs::write(&not_json, "{ nope").unwrap();
    let good = write(dir.path(), "w.json", &sleep_graph(1.0, 1));
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["submit".into(), ui.display().to_string()],
            "Export (API)",
        ),
        (
            vec!["submit".into(), not_json.display().to_string()],
            "is not JSON",
        ),
        (
            vec!["submit".into(), "/nonexistent/w.json".into()],
            "cannot read /nonexistent/w.json",
        ),
        (
            vec![
                "submit".into(),
                good.clone(),
                "--set".into(),
                "9.seed=1".into(),
            ],
            "no node 9 (its nodes: 1, 2, 3)",
        ),
        (
            vec![
                "submit".into(),
                good.clone(),
                "--timeout".into(),
                "warmup=5s".into(),
            ],
            "no phase \"warmup\"",
        ),
        (
            vec![
                "submit".into(),
                good.clone(),
                "--timeout".into(),
                "start=soon".into(),
            ],
            "--timeout start=soon",
        ),
        (
            vec![
                "submit".into(),
                good.clone(),
                "--priority".into(),
                "x".into(),
            ],
            "--priority",
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = run(farm.gantry(&args)).await;
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
    // Nothing was submitted by any of them.
    let o = run(farm.gantry(&["jobs", "--json"])).await;
    assert_eq!(
        serde_json::from_slice::<Value>(&o.stdout).unwrap(),
        json!([])
    );
    // A workflow from stdin, refused by the server for a class no backend has.
    let mut c = farm.gantry(&["submit", "-"]);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(br#"{"1": {"class_type": "NoSuchNode", "inputs": {}}}"#)
            .unwrap();
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("NoSuchNode"), "{}", stderr(&o));

    let mut c = farm.gantry(&["jobs"]);
    c.env("GANTRY_SERVER", "http://127.0.0.1:1");
    let o = run(c).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("cannot reach gantry at http://127.0.0.1:1"),
        "{}",
        stderr(&o)
    );
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_exits_1_and_queued_jobs_cancel_retry_and_wait_out_a_drain() {
    let farm = farm(&["error:class=GantrySleep"]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "w.json", &sleep_graph(1.0, 1));
    let o = run(farm.gantry(&["submit", &file, "--wait", "--max-attempts", "1"])).await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("failed"), "{}", stderr(&o));
    // With the backend hung on a first job, a second waits in gantry's queue; a
    // cancel ends it at once.
    farm.sim.set_faults(&["hang-before-start"]).unwrap();
    let o = run(farm.gantry(&["submit", &file])).await;
    let first = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    farm.wait_job(&first, "pending on the hung backend", |j| {
        j["phase"] == "pending"
    })
    .await;
    let o = run(farm.gantry(&["submit", &file])).await;
    let id = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    assert_eq!(farm.job(&id).await["state"], "queued");
    let o = run(farm.gantry(&["cancel", &id])).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("{id}: cancelled")
    );
    assert_eq!(farm.job(&id).await["state"], "cancelled");
    let o = run(farm.gantry(&["watch", &id])).await;
    assert_eq!(o.status.code(), Some(130));
    // The backends table names the hung backend busy with the first job.
    let o = run(farm.gantry(&["backends"])).await;
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    let row = table
        .lines()
        .find(|l| l.starts_with("a "))
        .unwrap_or_default();
    assert!(row.contains("busy") && row.contains(&first), "{table}");
    let o = run(farm.gantry(&["backends", "--json"])).await;
    let list: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list["backends"][0]["name"], "a");
    // Mended, the backend runs the first job; then drained, it takes nothing new: the
    // retried job below waits until it is resumed. Unknown backends are refused.
    farm.sim.set_faults(&[]).unwrap();
    farm.wait_job(&first, "the first job ends", |j| j["state"] == "succeeded")
        .await;
    let o = run(farm.gantry(&["backends", "drain", "a"])).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "a: drained");
    let o = run(farm.gantry(&["backends", "drain", "zz"])).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no backend zz"), "{}", stderr(&o));
    // Retry makes a new job of the cancelled one's request.
    let o = run(farm.gantry(&["retry", &id, "--json"])).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let retried: Value = serde_json::from_slice(&o.stdout).unwrap();
    let new_id = retried["id"].as_str().unwrap();
    assert_ne!(new_id, id);
    assert_eq!(retried["retry_of"], json!(id));
    let again = farm.job(new_id).await;
    let before = farm.job(&id).await;
    assert_eq!(again["workflow_hash"], before["workflow_hash"]);
    assert_eq!(again["max_attempts"], before["max_attempts"]);
    let o = run(farm.gantry(&["backends", "--json"])).await;
    let list: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list["backends"][0]["status"], "drained", "{list:#}");
    assert_eq!(farm.job(new_id).await["state"], "queued");
    let o = run(farm.gantry(&["backends", "resume", "a"])).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = run(farm.gantry(&["watch", new_id])).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        farm.job(new_id).await["attempts"].as_array().unwrap().len(),
        1
    );
    farm.shutdown().await;
}

#[test]
fn completions_are_printed_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let o = Command::new(env!("CARGO_BIN_EXE_gantry"))
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(o.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&o.stdout);
        assert!(
            script.contains("submit") && script.contains("watch-timeout"),
            "{shell}"
        );
    }
    let o = Command::new(env!("CARGO_BIN_EXE_gantry"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}

/// Tokens made by `gantry token create` in the running server's store: from then on the
/// server asks for one, a read token cannot submit, and a revoked one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_made_by_the_cli_guard_the_api_by_scope() {
    let farm = farm(&[]).await;
    let data = farm._data.path().join("d");
    let data = data.to_str().unwrap();
    let create = |scope: &str| {
        let mut c = farm.gantry(&[
            "token",
            "create",
            "--scope",
            scope,
            "--name",
            scope,
            "--data-dir",
            data,
            "--json",
        ]);
        c.env_remove("GANTRY_SERVER");
        c
    };
    let o = run(create("read")).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let read: Value = serde_json::from_slice(&o.stdout).unwrap();
    let o = run(create("submit")).await;
    let submit: Value = serde_json::from_slice(&o.stdout).unwrap();
    let bad = run(farm.gantry(&["token", "create", "--scope", "root", "--data-dir", data])).await;
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("use read, submit, admin or agent"),
        "{}",
        stderr(&bad)
    );

    // The server notices within its refresh: a request without a token is refused.
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let o = run(farm.gantry(&["jobs"])).await;
        if o.status.code() == Some(2) {
            assert!(stderr(&o).contains("asks for a token"), "{}", stderr(&o));
            break;
        }
        assert!(
            Instant::now() < give_up,
            "the server never asked for a token"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "w.json", &sleep_graph(0.1, 1));
    let read_token = read["token"].as_str().unwrap();
    let o = run(farm.gantry(&["submit", &file, "--token", read_token])).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("has scope read") && stderr(&o).contains("needs scope submit"),
        "{}",
        stderr(&o)
    );
    let o = run(farm.gantry(&[
        "submit",
        &file,
        "--wait",
        "--token",
        submit["token"].as_str().unwrap(),
    ]))
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(farm.gantry(&["jobs", "--json", "--token", read_token])).await;
    let jobs: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(jobs.as_array().unwrap().len(), 1);
    assert_eq!(jobs[0]["owner"], submit["id"]);

    let o = run(farm.gantry(&["token", "list", "--data-dir", data, "--json"])).await;
    let list: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains(read_token),
        "list shows no token"
    );
    let o = run(farm.gantry(&[
        "token",
        "revoke",
        read["id"].as_str().unwrap(),
        "--data-dir",
        data,
    ]))
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(farm.gantry(&["jobs", "--token", read_token])).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("revoked"), "{}", stderr(&o));
    farm.shutdown().await;
}

/// `serve` on a non-loopback address with no token refuses to start and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_non_loopback_address_without_tokens() {
    let data = tempfile::tempdir().unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_gantry"));
    c.args([
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--backend",
        "http://127.0.0.1:9",
        "--data-dir",
    ])
    .arg(data.path())
    .env("RUST_LOG", "warn")
    .env_remove("GANTRY_INSECURE");
    let o = run(c).await;
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("refusing to serve on 0.0.0.0:0") && e.contains("--insecure"),
        "{e}"
    );
}

/// The client config file: its keys apply where no flag or variable is given, flags and
/// variables win over it, the default location is found, and a bad key is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_config_file_fills_in_what_flags_and_variables_leave() {
    let farm = farm(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("client.toml");
    let bare = |args: &[&str]| {
        let mut c = farm.gantry(args);
        c.env_remove("GANTRY_SERVER")
            .env_remove("GANTRY_WATCH_TIMEOUT")
            .env("XDG_CONFIG_HOME", dir.path().join("xdg"));
        c
    };
    std::fs::write(
        &conf,
        format!(
            "server = \"{}\"\nwatch_timeout = \"300ms\"\n",
            farm.server.url()
        ),
    )
    .unwrap();
    let file = write(dir.path(), "w.json", &sleep_graph(30.0, 30));
    let c = conf.to_str().unwrap();
    // The server and the watch timeout from the file.
    let o = run(bare(&[
        "submit",
        &file,
        "--watch",
        "--detach",
        "--client-config",
        c,
    ]))
    .await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("after the watch timeout (300ms)"),
        "{}",
        stderr(&o)
    );
    let id = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    assert_eq!(farm.job(&id).await["state"], "running");
    // A flag wins over the file.
    let o = run(bare(&[
        "show",
        &id,
        "--client-config",
        c,
        "--server",
        "http://127.0.0.1:9",
    ]))
    .await;
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("cannot reach gantry at http://127.0.0.1:9"),
        "{}",
        stderr(&o)
    );
    // So does a variable.
    let mut o = bare(&["show", &id, "--client-config", c]);
    o.env("GANTRY_SERVER", "http://127.0.0.1:9");
    assert_eq!(run(o).await.status.code(), Some(2));

    // The default location, with no flag.
    let xdg = dir.path().join("xdg").join("gantry");
    std::fs::create_dir_all(&xdg).unwrap();
    std::fs::copy(&conf, xdg.join("client.toml")).unwrap();
    let o = run(bare(&["cancel", &id])).await;
    assert!(o.status.success(), "{}", stderr(&o));

    // A misspelt key is refused by name; a named file that is missing too.
    std::fs::write(&conf, "srever = \"http://x\"\n").unwrap();
    let o = run(bare(&["jobs", "--client-config", c])).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("srever"), "{}", stderr(&o));
    let o = run(bare(&[
        "jobs",
        "--client-config",
        "/nonexistent/client.toml",
    ]))
    .await;
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("/nonexistent/client.toml"),
        "{}",
        stderr(&o)
    );
    farm.shutdown().await;
}

/// `gantry backends add URL --tag T`: the server drives it at once and the table shows
/// it; a bad URL exits 2 naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_add_puts_a_server_in_rotation() {
    let farm = farm(&[]).await;
    let late = gantry_sim::spawn(gantry_sim::SimConfig {
        speed: 20.0,
        ..Default::default()
    })
    .await
    .unwrap();
    let o = run(farm.gantry(&[
        "backends",
        "add",
        &late.url(),
        "--name",
        "late",
        "--tag",
        "big",
    ]))
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("late: added"));
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "w.json", &sleep_graph(0.1, 1));
    let o = run(farm.gantry(&["submit", &file, "--tag", "big", "--wait", "--json"])).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let line = String::from_utf8_lossy(&o.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    let id = serde_json::from_str::<Value>(&line).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(farm.job(&id).await["attempts"][0]["backend"], "late");
    let o = run(farm.gantry(&["backends"])).await;
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("late") && l.contains("big")),
        "{table}"
    );

    let o = run(farm.gantry(&["backends", "add", "ftp://nowhere"])).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("ftp://nowhere"), "{}", stderr(&o));
    let o = run(farm.gantry(&["backends", "add", &late.url()])).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("backend_exists"), "{}", stderr(&o));
    late.shutdown().await;
    farm.shutdown().await;
}

/// `gantry profile`: the table (slowest first, a bar on the time axis, cached nodes
/// marked), CSV and JSON exports, and `--vs` with per-node deltas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_shows_where_the_time_went_and_compares_two_jobs() {
    let farm = farm(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "w.json", &sleep_graph(1.0, 4));
    let submit = || async {
        let o = run(farm.gantry(&["submit", &file, "--wait"])).await;
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    };
    let first = submit().await;
    // The same workflow again: ComfyUI answers from its cache.
    let second = submit().await;

    let o = run(farm.gantry(&["profile", &first])).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    let rows: Vec<&str> = table
        .lines()
        .skip_while(|l| !l.starts_with("NODE"))
        .skip(1)
        .collect();
    assert_eq!(rows.len(), 3, "{table}");
    assert!(
        rows[0].starts_with("2 ") && rows[0].contains("GantrySleep"),
        "slowest first:\n{table}"
    );
    assert!(
        rows[0].contains('#') && rows[0].contains("4 steps"),
        "{table}"
    );

    let o = run(farm.gantry(&["profile", &second])).await;
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(table.contains("(cached)"), "{table}");

    let o = run(farm.gantry(&["profile", &first, "--format", "csv"])).await;
    let csv = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut lines = csv.lines();
    assert!(lines
        .next()
        .unwrap()
        .starts_with("node,class_type,title,status"));
    let sleep: Vec<&str> = lines
        .find(|l| l.starts_with("2,"))
        .unwrap()
        .split(',')
        .collect();
    assert_eq!(
        (sleep[1], sleep[3], sleep[7]),
        ("GantrySleep", "completed", "4")
    );
    assert!(sleep[6].parse::<i64>().unwrap() > 0);

    let o = run(farm.gantry(&["profile", &first, "--format", "json"])).await;
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["profile"]["nodes"].as_array().unwrap().len(), 3);

    let o = run(farm.gantry(&["profile", &first, "--vs", &second, "--format", "json"])).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let node2 = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "2")
        .unwrap()
        .clone();
    assert_eq!(
        (node2["a_status"].as_str(), node2["b_status"].as_str()),
        (Some("completed"), Some("cached"))
    );
    assert!(node2["a_ms"].as_i64().unwrap() > 0 && node2["b_ms"].is_null());
    let o = run(farm.gantry(&["profile", &first, "--vs", &second])).await;
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        table.contains("B - A") && table.contains("cached"),
        "{table}"
    );

    // A job with no finished attempt has nothing to profile: exit 1, saying so.
    let long = write(dir.path(), "long.json", &sleep_graph(60.0, 60));
    let o = run(farm.gantry(&["submit", &long])).await;
    let running = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    let o = run(farm.gantry(&["profile", &running])).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("nothing to profile"), "{}", stderr(&o));
    run(farm.gantry(&["cancel", &running])).await;
    farm.shutdown().await;
}

/// `gantry stats`: node timings over what ran, as a table and as JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_prints_node_timings_over_what_ran() {
    let farm = farm(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    for seed in [1, 2] {
        let mut graph = sleep_graph(0.4, 2);
        graph["2"]["inputs"]["seed"] = json!(seed);
        let file = write(dir.path(), &format!("w{seed}.json"), &graph);
        let o = run(farm.gantry(&["submit", &file, "--wait"])).await;
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let give_up = Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let o = run(farm.gantry(&["stats", "--class", "GantrySleep", "--json"])).await;
        assert!(o.status.success(), "{}", stderr(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        if v["stats"][0]["count"] == 2 {
            break v;
        }
        assert!(Instant::now() < give_up, "never counted both runs: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(stats["stats"][0]["measured"], 2);
    let o = run(farm.gantry(&["stats", "--by", "backend"])).await;
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    let row = table
        .lines()
        .find(|l| l.starts_with("GantrySleep"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.trim_end().ends_with(" a") && row.contains(" 2 "),
        "{table}"
    );
    let o = run(farm.gantry(&["stats", "--by", "colour"])).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("by=colour"), "{}", stderr(&o));
    farm.shutdown().await;
}

/// `gantry stats --suggest-timeouts`: each class's learnt stall limit and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_suggests_stall_limits_from_history() {
    let farm = farm(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "w.json", &sleep_graph(0.4, 2));
    let o = run(farm.gantry(&["submit", &file, "--wait"])).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(farm.gantry(&["stats", "--suggest-timeouts", "--class", "GantrySleep"])).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains("off (what [adaptive] would set)"), "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("GantrySleep"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains("too few runs (1 here"), "{out}");
    assert!(!out.contains("SaveImage"), "filtered by class: {out}");
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gantry_agent_serves_its_local_comfyui_until_sigterm() {
    let farm = farm(&[]).await;
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("agent.json");
    let gpu = gantry_sim::spawn(gantry_sim::SimConfig {
        speed: 20.0,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut agent = farm
        .gantry(&[
            "agent",
            "--state",
            state.to_str().unwrap(),
            "--server",
            &farm.server.url(),
            "--name",
            "gpu-2",
            "--tag",
            "remote",
            "--comfyui",
            &gpu.url(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status_of = |farm: &Farm| {
        let http = farm.http.clone();
        let url = format!("{}/v1/backends", farm.server.url());
        async move {
            let list: Value = http.get(url).send().await.unwrap().json().await.unwrap();
            list["backends"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["name"] == "gpu-2")
                .map(|b| b["status"].as_str().unwrap_or_default().to_owned())
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while status_of(&farm).await.as_deref() != Some("idle") {
        assert!(
            Instant::now() < deadline,
            "the agent's backend never became idle"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "w.json",
        &json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 1}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "remote"}}
        }),
    );
    let o = run(farm.gantry(&["submit", &file, "--tag", "remote", "--wait", "--json"])).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let runs: Value = farm
        .http
        .get(format!("{}/sim/runs", gpu.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        runs["runs"].as_array().unwrap().len(),
        1,
        "it ran on the agent's ComfyUI"
    );

    // SIGTERM (what systemd sends): the agent exits cleanly; its backend goes offline.
    let pid = agent.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let exit = tokio::task::spawn_blocking(move || agent.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
    let deadline = Instant::now() + Duration::from_secs(20);
    while status_of(&farm).await.as_deref() != Some("offline") {
        assert!(
            Instant::now() < deadline,
            "the agent's backend never went offline"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The state file keeps the name and identity: a restart needs no --name, another
    // name with this file is refused.
    let kept: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(kept["name"], "gpu-2");
    assert!(
        kept["id"].as_str().is_some_and(|id| id.len() == 36),
        "{kept}"
    );
    let st = state.to_str().unwrap();
    let o = run(farm.gantry(&[
        "agent",
        "--state",
        st,
        "--server",
        "http://127.0.0.1:9",
        "--name",
        "other",
    ]))
    .await;
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("is agent \"gpu-2\"'s"),
        "{}",
        stderr(&o)
    );
    let fresh = state_dir.path().join("never.json");
    let o = run(farm.gantry(&[
        "agent",
        "--state",
        fresh.to_str().unwrap(),
        "--server",
        "ftp://x",
        "--name",
        "n",
    ]))
    .await;
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("use http or https"), "{}", stderr(&o));
    assert!(!fresh.exists(), "a refused start writes nothing");
}

/// The processes whose parent is `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        if rest.split_whitespace().nth(1) == Some(&pid.to_string()) {
            out.push(child);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gantry_agent_spawn_restarts_a_killed_comfyui_and_the_job_succeeds_on_retry() {
    // The dead backend's block for this workflow is short: the retry waits for it.
    let farm = farm_with(&[], |c| {
        c.health.block_ms = 300;
        c.backoff_base = Duration::from_millis(50);
    })
    .await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let comfyui = format!("http://127.0.0.1:{port}");
    let child_cmd = format!(
        "env RUST_LOG=info {} sim --listen 127.0.0.1:{port} --speed 20",
        env!("CARGO_BIN_EXE_gantry")
    );
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("agent.json");
    let mut agent = farm
        .gantry(&[
            "agent",
            "--state",
            state.to_str().unwrap(),
            "--server",
            &farm.server.url(),
            "--name",
            "gpu-3",
            "--tag",
            "supervised",
            "--comfyui",
            &comfyui,
            "--spawn",
            &child_cmd,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let agent_pid = agent.id();
    let http = farm.http.clone();
    let logs_url = format!("{}/v1/backends/gpu-3/logs", farm.server.url());
    let logs = || {
        let (http, url) = (http.clone(), logs_url.clone());
        async move {
            let r = http.get(url).send().await.unwrap();
            if r.status() == 200 {
                r.json::<Value>().await.unwrap()
            } else {
                Value::Null
            }
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while logs().await["child"]["state"] != "ready" {
        assert!(
            Instant::now() < deadline,
            "the child never became ready: {}",
            logs().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first_child = children_of(agent_pid);
    assert_eq!(first_child.len(), 1, "one child: {first_child:?}");
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "w.json", &sleep_graph(40.0, 40));
    // Follow the job while the child is killed mid-run.
    let mut watch = farm
        .gantry(&["submit", &file, "--tag", "supervised", "--wait"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let jobs: Value = farm
            .http
            .get(format!("{}/v1/jobs?state=running", farm.server.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if jobs["jobs"][0]["phase"] == "executing" {
            break;
        }
        assert!(Instant::now() < deadline, "the job never ran: {jobs}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed = Command::new("kill")
        .args(["-KILL", &first_child[0].to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = tokio::task::spawn_blocking(move || {
        let status = watch.wait().unwrap();
        (status, watch)
    })
    .await
    .unwrap();
    assert_eq!(out.0.code(), Some(0), "the job succeeded on retry");
    let l = logs().await;
    let restarts = l["restarts"].as_array().unwrap();
    assert!(
        restarts.iter().any(|r| r["reason"] == "exited (signal 9)"),
        "{l:#}"
    );
    assert!(
        !l["lines"].as_array().unwrap().is_empty(),
        "the child's output is kept: {l:#}"
    );
    let second_child = children_of(agent_pid);
    assert_eq!(second_child.len(), 1, "{second_child:?}");
    assert_ne!(second_child, first_child, "a new child");

    // SIGTERM to the agent takes its child down too: no orphan.
    Command::new("kill")
        .args(["-TERM", &agent_pid.to_string()])
        .status()
        .unwrap();
    let exit = tokio::task::spawn_blocking(move || agent.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
    assert!(
        !std::path::Path::new(&format!("/proc/{}", second_child[0])).exists()
            || std::fs::read_to_string(format!("/proc/{}/stat", second_child[0]))
                .is_ok_and(|s| s.contains(") Z ")),
        "the child is gone with the agent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gantry_agent_spawn_restarts_a_comfyui_stuck_past_its_interrupt_and_the_job_fails_over() {
    let farm = farm_with(&[], |c| {
        c.cancel_grace = Duration::from_millis(300);
        c.backoff_base = Duration::from_millis(50);
    })
    .await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let comfyui = format!("http://127.0.0.1:{port}");
    // A node blocked in one call: the interrupt never lands (PROTOCOL.md capture d3).
    let child_cmd = format!(
        "{} sim --listen 127.0.0.1:{port} --speed 20 --fault stall:at=50,uninterruptible",
        env!("CARGO_BIN_EXE_gantry")
    );
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("agent.json");
    let mut agent = farm
        .gantry(&[
            "agent",
            "--state",
            state.to_str().unwrap(),
            "--server",
            &farm.server.url(),
            "--name",
            "gpu-4",
            "--comfyui",
            &comfyui,
            "--spawn",
            &child_cmd,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = farm.server.url();
    let http = farm.http.clone();
    let get = |path: String| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let r = http.get(format!("{base}{path}")).send().await.unwrap();
            r.json::<Value>().await.unwrap_or(Value::Null)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while get("/v1/backends/gpu-4/logs".into()).await["child"]["state"] != "ready" {
        assert!(Instant::now() < deadline, "the child never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Only gpu-4 takes the job at first.
    let drained = http
        .post(format!("{base}/v1/backends/a/drain"))
        .send()
        .await
        .unwrap();
    assert_eq!(drained.status(), 200);
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "w.json", &sleep_graph(40.0, 40));
    let o = run(farm.gantry(&["submit", &file, "--timeout", "node_stall=1s"])).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(format!("/v1/jobs/{id}")).await["attempts"][0]["backend"] != "gpu-4" {
        assert!(Instant::now() < deadline, "the job never went to gpu-4");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    http.post(format!("{base}/v1/backends/a/resume"))
        .send()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let job = loop {
        let job = get(format!("/v1/jobs/{id}")).await;
        if job["state"] == "succeeded" || job["state"] == "failed" {
            break job;
        }
        assert!(Instant::now() < deadline, "the job never ended: {job:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["attempts"][0]["backend"], "gpu-4");
    assert_eq!(job["attempts"][1]["backend"], "a", "failed over: {job:#}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = get("/v1/backends/gpu-4/logs".into()).await;
        let stuck = logs["restarts"].as_array().is_some_and(|r| {
            r.iter().any(|x| {
                x["reason"].as_str().is_some_and(|s| {
                    s.starts_with("stuck: prompt") && s.contains("after its interrupt")
                })
            })
        });
        if stuck {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no restart for the stuck prompt: {logs:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status()
        .unwrap();
    let exit = tokio::task::spawn_blocking(move || agent.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gantry_watch_streams_a_command_jobs_output_from_an_agent_that_allows_it() {
    use std::io::BufRead;
    let farm = farm(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("cmd-1.json");
    // A program named by a relative path is refused before anything starts.
    let o = run(farm.gantry(&[
        "agent",
        "--state",
        state.to_str().unwrap(),
        "--server",
        &farm.server.url(),
        "--name",
        "cmd-1",
        "--allow",
        "sh",
    ]))
    .await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--allow sh: give the program's absolute path"),
        "{}",
        stderr(&o)
    );
    assert!(!state.exists());
    let _agent = command_agent(&farm, dir.path(), "cmd-1").await;
    let gate = dir.path().join("gate");
    assert!(Command::new("mkfifo")
        .arg(&gate)
        .status()
        .unwrap()
        .success());
    let body = json!({"kind": "command", "tags": ["cmd"], "command": {"argv": [
        "/bin/sh", "-c", format!("read go < {}; echo downloading; echo 'half way' >&2; exit 0", gate.display())
    ]}});
    let r = farm
        .http
        .post(format!("{}/v1/jobs", farm.server.url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut watch = farm
        .gantry(&["watch", &id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let err = watch.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // The gate opens once watch has shown the start, so the lines come while it follows.
    let (rx, _) =
        tokio::task::spawn_blocking(move || lines_until(rx, &["started on cmd-1"], Vec::new()))
            .await
            .unwrap();
    let g = gate.clone();
    tokio::task::spawn_blocking(move || std::fs::write(g, "go\n"))
        .await
        .unwrap()
        .unwrap();
    let needles = [
        "[stdout] downloading",
        "[stderr] half way",
        "command exited with code 0",
    ];
    let (_, out) = tokio::task::spawn_blocking(move || lines_until(rx, &needles, Vec::new()))
        .await
        .unwrap();
    let status = tokio::task::spawn_blocking(move || watch.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "{out:?}");
}

/// Reads lines from `rx` into `seen` until each needle is in one of them.
fn lines_until(
    rx: std::sync::mpsc::Receiver<String>,
    needles: &[&str],
    mut seen: Vec<String>,
) -> (std::sync::mpsc::Receiver<String>, Vec<String>) {
    for needle in needles {
        while !seen.iter().any(|l| l.contains(needle)) {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(l) => seen.push(l),
                Err(_) => panic!("{needle:?} never came; got {seen:?}"),
            }
        }
    }
    (rx, seen)
}

/// A child process killed (and reaped) when dropped, a failed test included.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `gantry agent` named `name` allowing /bin/sh in front of the farm's simulator,
/// and waits until the coordinator shows its allow-list.
async fn command_agent(farm: &Farm, dir: &Path, name: &str) -> Reaped {
    let state = dir.join(format!("{name}.json"));
    let agent = Reaped(
        farm.gantry(&[
            "agent",
            "--state",
            state.to_str().unwrap(),
            "--server",
            &farm.server.url(),
            "--name",
            name,
            "--tag",
            "cmd",
            "--comfyui",
            &farm.sim.url(),
            "--allow",
            "/bin/sh",
            "--heartbeat",
            "1s",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list: Value = farm
            .http
            .get(format!("{}/v1/backends", farm.server.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let allows = list["backends"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["name"] == name && b["allow"] == json!(["/bin/sh"]));
        if allows {
            return agent;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never said what it allows: {list}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gantry_exec_runs_a_program_on_an_agent_and_ctrl_c_kills_its_process_group() {
    use std::io::BufRead;
    let farm = farm(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let _agent = command_agent(&farm, dir.path(), "exec-1").await;
    // Its output comes out as written: stdout here on stdout, stderr on stderr.
    let o = run(farm.gantry(&[
        "exec",
        "--tag",
        "cmd",
        "--env",
        "WHO=agent",
        "--",
        "/bin/sh",
        "-c",
        "echo hello from $WHO; echo warning >&2",
    ]))
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hello from agent\n");
    assert!(stderr(&o).contains("warning\n"), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("command exited with code 0"),
        "{}",
        stderr(&o)
    );
    let err = stderr(&o);
    let id = err
        .lines()
        .find_map(|l| l.strip_prefix("job "))
        .unwrap_or_else(|| panic!("{err}"))
        .to_owned();
    let o = run(farm.gantry(&["show", &id])).await;
    let shown = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        shown.contains("command   /bin/sh -c \"echo hello from $WHO; echo warning >&2\""),
        "{shown}"
    );
    assert!(shown.contains("exit code 0"), "{shown}");
    assert!(shown.contains("  | hello from agent"), "{shown}");
    let o = run(farm.gantry(&["backends"])).await;
    let rows = String::from_utf8_lossy(&o.stdout).into_owned();
    let row = rows
        .lines()
        .find(|l| l.starts_with("exec-1"))
        .unwrap_or_else(|| panic!("{rows}"));
    assert!(row.ends_with("agent (allows /bin/sh)"), "{rows}");
    // A failing program: exit 1, its code named.
    let o = run(farm.gantry(&["exec", "--tag", "cmd", "--", "/bin/sh", "-c", "exit 3"])).await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("exited with code 3"), "{}", stderr(&o));
    // A program no agent allows: refused, exit 2.
    let o = run(farm.gantry(&["exec", "--", "/usr/bin/env"])).await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("does not allow program \"/usr/bin/env\""),
        "{}",
        stderr(&o)
    );
    // Ctrl+C reaches the agent and kills the whole group.
    let mut exec = farm
        .gantry(&[
            "exec",
            "--tag",
            "cmd",
            "--",
            "/bin/sh",
            "-c",
            "echo $$; sleep 600 & sleep 600; wait",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = exec.stdout.take().unwrap();
    let pgid: u32 = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line).unwrap();
        line.trim().parse().unwrap()
    })
    .await
    .unwrap();
    assert!(gantry_agent::process::group_alive(pgid));
    let pid = exec.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::task::spawn_blocking(move || exec.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(
        !gantry_agent::process::group_alive(pgid),
        "a process of the command's group survived Ctrl+C"
    );
}
