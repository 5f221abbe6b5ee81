//! Property tests: whatever a config file holds, `apply_toml` answers an error that
//! names the key at fault and leaves the config as it was, or a config whose every
//! duration a timer can add to the clock. `PROPTEST_CASES` asks for more cases.

use super::*;
use proptest::prelude::*;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        rng_seed: proptest::test_runner::RngSeed::Fixed(24),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Every key of the file, with the table it lives in.
const KEYS: &[(&str, &str)] = &[
    ("", "listen"),
    ("", "data_dir"),
    ("", "store"),
    ("", "artifacts"),
    ("", "retention"),
    ("", "stats_retention"),
    ("", "coordinator"),
    ("", "lease"),
    ("", "max_body_bytes"),
    ("", "max_attachment_bytes"),
    ("", "public_url"),
    ("", "max_attempts"),
    ("", "cancel_grace"),
    ("", "liveness"),
    ("", "agent_heartbeat"),
    ("", "resync_gap"),
    ("", "block_cooldown"),
    ("", "circuit_cooldown"),
    ("", "circuit_threshold"),
    ("", "backoff_base"),
    ("", "backoff_max"),
    ("", "pipeline"),
    ("", "insecure"),
    ("", "routing"),
    ("", "no_such_key"),
    ("callback", "url"),
    ("callback", "events"),
    ("callback", "allow_hosts"),
    ("callback", "retry_for"),
    ("callback", "backoff"),
    ("callback", "timeout"),
    ("adaptive", "classes"),
    ("adaptive", "factor"),
    ("adaptive", "floor"),
    ("adaptive", "min_samples"),
    ("timeouts", "submit"),
    ("timeouts", "start"),
    ("timeouts", "node_stall"),
    ("timeouts", "deadline"),
    ("timeouts", "queue"),
    ("timeouts.node_class", "KSampler"),
    ("timeouts.command", "default"),
    ("timeouts.command", "model_download"),
    ("backends", "name"),
    ("backends", "url"),
    ("backends", "tags"),
    ("backends", "priority"),
];

/// A TOML value, good or bad for whichever key gets it.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        // Durations: usual, zero, huge, overflowing, junk.
        prop::sample::select(vec![
            "\"30s\"",
            "\"0s\"",
            "\"5m\"",
            "\"1h30m\"",
            "\"9y\"",
            "\"11y\"",
            "\"500000000000y\"",
            "\"18446744073709551615s\"",
            "\"99999999999999999999999ms\"",
            "\"soon\"",
            "\"\"",
            "\"-1s\"",
        ])
        .prop_map(str::to_owned),
        // Numbers of every size and sign.
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        Just("nan".to_owned()),
        Just("inf".to_owned()),
        any::<bool>().prop_map(|b| b.to_string()),
        // Strings: addresses, URLs, unicode.
        prop::sample::select(vec![
            "\"127.0.0.1:0\"",
            "\"[::1]:8700\"",
            "\"http://127.0.0.1:8188\"",
            "\"postgres://u@h/db\"",
            "\"mysql://x\"",
            "\"embedded\"",
            "\"warm\"",
            "\"random\"",
            "\"ftp://h\"",
            "\"*\"",
        ])
        .prop_map(str::to_owned),
        "\\PC{0,12}".prop_map(|s| format!("{s:?}")),
        Just("[\"a\", \"\"]".to_owned()),
        Just("[]".to_owned()),
        Just("{ first_progress = \"20m\", node_stall = \"2m\" }".to_owned()),
    ]
}

/// A file of some of the keys (tables in the order TOML needs), each with a value.
fn file() -> impl Strategy<Value = String> {
    prop::collection::vec((prop::sample::select(KEYS.to_vec()), value()), 0..8).prop_map(
        |mut pairs| {
            pairs.sort_by_key(|((table, _), _)| *table);
            pairs.dedup_by_key(|((table, key), _)| (*table, *key));
            let mut text = String::new();
            let mut current = "";
            for ((table, key), value) in pairs {
                if table != current {
                    if table == "backends" {
                        text.push_str("[[backends]]\n");
                    } else {
                        text.push_str(&format!("[{table}]\n"));
                    }
                    current = table;
                }
                text.push_str(&format!("{key} = {value}\n"));
            }
            text
        },
    )
}

/// Every duration of `c`, with what it is.
fn durations(c: &Config) -> Vec<(String, Duration)> {
    let ms = |v: Option<u64>| Duration::from_millis(v.unwrap_or_default());
    let t = &c.timeouts;
    let mut out = vec![
        ("retention", c.retention),
        ("stats_retention", c.stats_retention),
        ("lease", c.lease),
        ("cancel_grace", c.cancel_grace),
        ("liveness", c.liveness),
        ("agent_heartbeat", c.agent_heartbeat),
        ("backoff_base", c.backoff_base),
        ("backoff_max", c.backoff_max),
        ("callback.retry_for", c.callbacks.retry_for),
        ("callback.backoff", c.callbacks.backoff),
        ("callback.timeout", c.callbacks.timeout),
        ("block_cooldown", Duration::from_millis(c.health.block_ms)),
        (
            "circuit_cooldown",
            Duration::from_millis(c.health.circuit_ms),
        ),
        ("timeouts.submit", ms(t.submit_ms)),
        ("timeouts.start", ms(t.start_ms)),
        ("timeouts.first_progress", ms(t.first_progress_ms)),
        ("timeouts.node_stall", ms(t.node_stall_ms)),
        ("timeouts.deadline", ms(t.deadline_ms)),
        ("timeouts.queue", ms(t.queue_ms)),
    ]
    .into_iter()
    .map(|(k, d)| (k.to_owned(), d))
    .collect::<Vec<_>>();
    if let Some(a) = &c.adaptive {
        out.push(("adaptive.floor".into(), a.floor));
    }
    for (op, d) in c.command_timeouts.iter() {
        out.push((format!("timeouts.command.{op}"), *d));
    }
    for (class, l) in c.node_class.iter() {
        out.push((format!("timeouts.node_class.{class}"), ms(l.node_stall_ms)));
        out.push((
            format!("timeouts.node_class.{class}+"),
            ms(l.first_progress_ms),
        ));
    }
    for b in &c.backends {
        out.push((
            format!("backends.{}.start", b.name),
            ms(b.timeouts.start_ms),
        ));
        out.push((
            format!("backends.{}.node_stall", b.name),
            ms(b.timeouts.node_stall_ms),
        ));
    }
    out
}

fn check(text: &str) -> Result<(), TestCaseError> {
    let mut c = Config::new(DEFAULT_LISTEN.parse().expect("address"), "d".into());
    let before = format!("{c:?}");
    match c.apply_toml(text) {
        Err(e) => {
            prop_assert!(!e.to_string().is_empty());
            prop_assert_eq!(
                format!("{c:?}"),
                before,
                "a refused file changed the config"
            );
        }
        Ok(()) => {
            for (what, d) in durations(&c) {
                prop_assert!(
                    d <= Duration::from_millis(gantry_core::MAX_LIMIT_MS),
                    "{what} = {d:?} was taken:\n{text}"
                );
            }
            let _ = c.validate();
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn any_text_is_a_config_or_an_error(text in "\\PC{0,80}") {
        check(&text)?;
    }

    #[test]
    fn files_of_odd_values_are_a_config_or_an_error(text in file()) {
        check(&text)?;
    }
}

/// Found by `files_of_odd_values_are_a_config_or_an_error`: a duration past what a
/// clock can hold was taken, and the first timer to add it panicked.
#[test]
fn a_duration_longer_than_ten_years_is_refused_by_name() {
    let mut c = Config::new(DEFAULT_LISTEN.parse().unwrap(), "d".into());
    let err = c
        .apply_toml("liveness = \"500000000000y\"")
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "liveness = \"500000000000y\": longer than the longest limit, 10 years (write durations like 30s, 5m or 1h30m)"
    );
    assert_eq!(c.liveness, Duration::from_secs(10));
    c.apply_toml("[timeouts]\ndeadline = \"9y\"").unwrap();
    assert!(c.apply_toml("[timeouts]\ndeadline = \"11y\"").is_err());
}

/// Found by the same property: a file refused halfway had already changed what came
/// before the bad key.
#[test]
fn a_refused_file_changes_nothing() {
    let mut c = Config::new(DEFAULT_LISTEN.parse().unwrap(), "d".into());
    assert!(c
        .apply_toml("max_attempts = 9\nliveness = \"soon\"")
        .is_err());
    assert_eq!(c.max_attempts, 3);
}
