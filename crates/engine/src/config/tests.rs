//! Flags and files taken, and every bad value refused by name.

use super::*;

#[test]
fn backend_specs() {
    let b = BackendConfig::parse("http://10.0.0.5:8188").unwrap();
    assert_eq!(
        (b.name.as_str(), b.url.as_str()),
        ("10.0.0.5:8188", "http://10.0.0.5:8188")
    );
    let b = BackendConfig::parse("gpu-1=http://h:8188/").unwrap();
    assert_eq!(b.name, "gpu-1");
    assert!(BackendConfig::parse("gpu=ftp://h").is_err());
    assert!(BackendConfig::parse("=http://h").is_err());
}

#[test]
fn the_callback_table_sets_a_checked_default_and_the_retry_policy() {
    let mut c = Config::new("127.0.0.1:0".parse().unwrap(), "d".into());
    let err = c
        .apply_toml("[callback]\nurl = \"http://10.0.0.1/hook\"")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("[callback]") && err.contains("loopback"),
        "{err}"
    );
    c.apply_toml(
        "public_url = \"https://gantry.example.com/\"\n[callback]\nurl = \"https://hooks.example.com/in\"\n\
         events = [\"failed\"]\nsecret = \"k\"\nallow_hosts = [\"hooks.example.com\"]\n\
         retry_for = \"2m\"\nbackoff = \"250ms\"\ntimeout = \"3s\"",
    )
    .unwrap();
    let d = c.callbacks.default.as_ref().unwrap();
    assert_eq!(
        (d.events.as_slice(), d.secret.as_deref()),
        (&["failed".to_owned()][..], Some("k"))
    );
    assert_eq!(c.callbacks.retry_for, Duration::from_secs(120));
    assert_eq!(c.callbacks.backoff, Duration::from_millis(250));
    assert_eq!(c.public_url.as_deref(), Some("https://gantry.example.com"));
    let err = c
        .apply_toml("[callback]\nsecret = \"k\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("need a url"), "{err}");
}

#[test]
fn store_urls_are_checked_and_postgres_needs_shared_artifacts() {
    assert_eq!(
        StoreConfig::parse("embedded").unwrap(),
        StoreConfig::Embedded
    );
    assert_eq!(
        StoreConfig::parse("postgres://u@h/db").unwrap(),
        StoreConfig::Postgres("postgres://u@h/db".into())
    );
    let err = StoreConfig::parse("mysql://u@h/db")
        .unwrap_err()
        .to_string();
    assert!(err.contains("a mysql store is not supported"), "{err}");
    assert!(StoreConfig::parse("nonsense").is_err());
    let mut c = Config::new("127.0.0.1:0".parse().unwrap(), "d".into());
    c.apply_toml("store = \"postgres://u@h/db\"\nretention = \"2d\"\nstats_retention = \"0s\"")
        .unwrap();
    assert_eq!(c.retention, Duration::from_secs(2 * 24 * 3600));
    assert_eq!(c.stats_retention, Duration::ZERO);
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("--artifacts"), "{err}");
    c.apply_toml("artifacts = \"/shared/gantry\"").unwrap();
    c.validate().unwrap();
}

#[test]
fn backoff_is_set_from_the_file_and_checked() {
    let mut c = Config::new("127.0.0.1:0".parse().unwrap(), "d".into());
    c.apply_toml("backoff_base = \"50ms\"\nbackoff_max = \"2s\"")
        .unwrap();
    assert_eq!(c.backoff_base, Duration::from_millis(50));
    assert_eq!(c.backoff_max, Duration::from_secs(2));
    c.validate().unwrap();
    c.apply_toml("backoff_max = \"10ms\"").unwrap();
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("backoff_max"), "{err}");
    assert!(c.apply_toml("backoff_base = \"soon\"").is_err());
}

#[test]
fn file_sets_tags_priority_and_timeouts() {
    let mut c = Config::new(DEFAULT_LISTEN.parse().unwrap(), "d".into());
    c.backends
        .push(BackendConfig::parse("gpu-1=http://a:1").unwrap());
    c.apply_toml(
        r#"
        [timeouts]
        start = "45s"
        [[backends]]
        name = "gpu-1"
        tags = ["sdxl"]
        priority = 5
        [[backends]]
        name = "gpu-2"
        url = "http://b:2"
        "#,
    )
    .unwrap();
    assert_eq!(c.timeouts.start_ms, Some(45_000));
    assert_eq!(c.timeouts.submit_ms, Some(10_000));
    assert_eq!(c.backends[0].tags, ["sdxl"]);
    assert_eq!(c.backends[0].priority, 5);
    assert_eq!(c.backends[1].url, "http://b:2");
    let err = c.apply_toml("[timeouts]\nstart = \"soon\"").unwrap_err();
    assert!(
        err.to_string().starts_with("timeouts.start = \"soon\""),
        "{err}"
    );
    assert!(c.apply_toml("colour = 1").is_err());
}

#[test]
fn command_timeouts_by_operation_with_the_jobs_own_first() {
    let mut c = Config::new(DEFAULT_LISTEN.parse().unwrap(), "d".into());
    c.apply_toml("[timeouts.command]\nmodel_download = \"10m\"\nworker_install = \"15m\"")
        .unwrap();
    let spec = |op: Option<&str>, own: Option<u64>| gantry_core::CommandSpec {
        argv: vec!["x".into()],
        env: Default::default(),
        cwd: None,
        operation: op.map(str::to_owned),
        timeout_ms: own,
    };
    let t = |op, own| c.command_timeout(&spec(op, own));
    assert_eq!(t(Some("model_download"), None), Duration::from_secs(600));
    assert_eq!(t(Some("worker_install"), None), Duration::from_secs(900));
    assert_eq!(t(Some("other"), None), Duration::from_secs(30));
    assert_eq!(t(None, None), Duration::from_secs(30));
    assert_eq!(
        t(Some("model_download"), Some(1500)),
        Duration::from_millis(1500)
    );
    let err = c
        .apply_toml("[timeouts.command]\nmodel_download = \"0s\"")
        .unwrap_err();
    assert!(
        err.to_string().contains("timeouts.command.model_download"),
        "{err}"
    );
}

#[test]
fn node_class_and_backend_timeouts() {
    let mut c = Config::new(DEFAULT_LISTEN.parse().unwrap(), "d".into());
    c.apply_toml(
        r#"
        block_cooldown = "5s"
        circuit_threshold = 4
        [timeouts.node_class]
        CheckpointLoaderSimple = "15m"
        KSampler = { first_progress = "20m", node_stall = "2m" }
        [[backends]]
        name = "slow"
        url = "http://s:1"
        [backends.timeouts]
        start = "2m"
        "#,
    )
    .unwrap();
    let loader = &c.node_class["CheckpointLoaderSimple"];
    assert_eq!(
        (loader.first_progress_ms, loader.node_stall_ms),
        (Some(900_000), Some(900_000))
    );
    let ks = &c.node_class["KSampler"];
    assert_eq!(
        (ks.first_progress_ms, ks.node_stall_ms),
        (Some(1_200_000), Some(120_000))
    );
    assert_eq!(c.backends[0].timeouts.start_ms, Some(120_000));
    assert_eq!(c.backends[0].timeouts.node_stall_ms, None);
    assert_eq!(c.health.block_ms, 5_000);
    let err = c
        .apply_toml("[[backends]]\nname = \"x\"\nurl = \"http://x:1\"\n[backends.timeouts]\ndeadline = \"1m\"")
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("deadline and queue are limits of a job"),
        "{err}"
    );
    assert_eq!(c.health.circuit_threshold, 4);
    let err = c
        .apply_toml("[timeouts.node_class]\nKSampler = \"often\"")
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("timeouts.node_class.KSampler = \"often\""),
        "{err}"
    );
}
