//! Chaos with the coordinator killed: `gantry bench chaos` at a CI size, on the embedded
//! store (one coordinator SIGKILLed twice and restarted on its data dir) and on
//! PostgreSQL (two coordinators, one SIGKILLed and restarted at each kill). The scenario
//! checks the promises itself (RELIABILITY.md) and lists what it found broken under
//! `problems`; these tests also check that the run meant something (the kills came with
//! attempts in flight, stalls were met). The full size is `gantry bench chaos` with its
//! defaults. `GANTRY_CHAOS_SEED` replays a run; nothing here asserts a time.

use serde_json::Value;
use std::process::{Command, Stdio};

/// Jobs of the CI run: a couple of minutes on two cores for both stores.
const JOBS: &str = "600";

fn seed() -> String {
    let seed = std::env::var("GANTRY_CHAOS_SEED").unwrap_or_else(|_| "24006".to_owned());
    eprintln!("chaos: GANTRY_CHAOS_SEED={seed}");
    seed
}

/// Run `gantry bench chaos ARGS` and answer its results; a run that found a problem
/// fails with its table.
fn chaos(args: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("chaos.json");
    let seed = seed();
    let run = Command::new(env!("CARGO_BIN_EXE_gantry"))
        .args(["bench", "chaos", "--jobs", JOBS, "--seed", &seed])
        .args(["--speed", "40", "--limit", "600ms", "--window", "24"])
        .args(args)
        .arg("--json")
        .arg(&out)
        .env("RUST_LOG", "error")
        .env_remove("GANTRY_CHAOS_SEED")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "gantry bench chaos {args:?} (seed {seed}) failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let r = doc["results"].clone();
    assert_eq!(r["problems"], Value::Array(Vec::new()), "{stdout}");
    r
}

/// What every run must show besides an empty `problems`: both kills happened with
/// attempts in flight, every job was acknowledged and found, the jobs that could
/// succeed did, and stalls were met and timed.
fn check_meaningful(r: &Value) {
    let jobs: u64 = JOBS.parse().unwrap();
    assert_eq!(r["kills"].as_array().unwrap().len(), 2, "{r:#}");
    assert_eq!(r["restarts"], 2, "{r:#}");
    assert_eq!(r["acknowledged"], jobs, "{r:#}");
    assert_eq!(r["found"], jobs, "{r:#}");
    let doomed = r["doomed"].as_u64().unwrap();
    assert!(doomed > 0, "{r:#}");
    assert_eq!(r["states"]["succeeded"], jobs - doomed, "{r:#}");
    assert_eq!(r["states"]["failed"], doomed, "{r:#}");
    for (k, at) in r["in_flight_at_kills"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let n: u64 = at
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert!(
            n > 0,
            "kill {} came with no attempt in flight: {r:#}",
            k + 1
        );
    }
    assert!(r["stall_lag_ms"]["n"].as_u64().unwrap() > 0, "{r:#}");
    assert!(r["hang_mended"].as_u64().unwrap() > 0, "{r:#}");
}

#[test]
fn chaos_with_the_embedded_coordinator_killed_twice_loses_nothing() {
    let r = chaos(&[]);
    check_meaningful(&r);
    assert_eq!(r["store"], "embedded");
    // The farm's stream was lost at each kill and resumed on the new process.
    assert!(r["stream_resumes"].as_u64().unwrap() >= 2, "{r:#}");
}

#[test]
fn chaos_with_one_of_two_postgres_coordinators_killed_loses_nothing() {
    let Ok(url) = std::env::var(gantry_store::testing::POSTGRES_URL_VAR) else {
        eprintln!("GANTRY_TEST_POSTGRES_URL is not set: this Postgres test is skipped");
        return;
    };
    let r = chaos(&["--store", &url, "--coordinators", "2", "--lease", "1s"]);
    check_meaningful(&r);
    assert_eq!(r["store"], "postgres");
    assert_eq!(r["coordinators"], 2);
    // Every job was claimed at least once, and the log of claims was checked.
    let claims = r["dispatch_claims"].as_u64().unwrap();
    assert!(claims >= JOBS.parse().unwrap(), "{claims} claims: {r:#}");
}
