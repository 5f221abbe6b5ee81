//! `gantry profile` and `gantry stats`: where a job's time went, node timings over
//! what ran, stall limits suggested from history.

use super::{farm, run, sleep_graph, stderr, write};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::time::Instant;

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
