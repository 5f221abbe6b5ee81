//! `gantry backends add`: a server put in rotation at run time.

use super::{farm, run, sleep_graph, stderr, write};
use serde_json::Value;

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
