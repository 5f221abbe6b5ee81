//! Who may talk to the server and how the client finds it: tokens made by the cli,
//! `serve` refusing a non-loopback address without one, the client config file.

use super::{farm, run, sleep_graph, stderr, write};
use serde_json::Value;
use std::process::Command;
use std::time::Duration;
use tokio::time::Instant;

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
