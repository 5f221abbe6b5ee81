//! Command jobs: `gantry watch` streaming a command's output from an agent, and
//! `gantry exec` running a program there, Ctrl+C killing its process group.

use super::{farm, run, stderr, Farm};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

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
