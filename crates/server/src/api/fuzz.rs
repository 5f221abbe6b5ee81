//! Property tests of what the API parses: any body, broken valid bodies, `since` and the
//! stats' `since`.

use super::parse::{parse_attachments, parse_submit};
use super::stats::stats_since;
use super::streams::since_of;
use super::ApiError;
use crate::clock::rfc3339;
use gantry_core::MAX_LIMIT_MS;
use proptest::prelude::*;
use serde_json::{json, Value};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        rng_seed: proptest::test_runner::RngSeed::Fixed(24),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "\\PC{0,10}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec(
                (prop_oneof![Just("workflow".to_owned()), "\\PC{0,6}"], inner),
                0..5
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Valid submit bodies of every kind, each to be broken one place at a time.
fn valid_bodies() -> Vec<Value> {
    let workflow = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "face.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    });
    vec![
        json!({"workflow": workflow}),
        json!({
            "workflow": workflow, "priority": 5, "max_attempts": 2, "tags": ["gpu"],
            "timeouts": {"node_stall_ms": 1000, "deadline_ms": 60000},
            "idempotency_key": "k-1", "metadata": {"who": "me"},
            "attachments": [{"name": "face.png", "data": "aGVsbG8="}],
        }),
        json!({"workflow": workflow, "attachments": [{"name": "face.png", "sha256": "ab".repeat(32)}]}),
        json!({"kind": "command", "command": {"argv": ["/bin/echo", "hi"], "env": {"A": "1"},
            "cwd": "/tmp", "timeout_ms": 5000, "operation": "model_download"}}),
    ]
}

fn mutated_body() -> impl Strategy<Value = Value> {
    let bodies = valid_bodies();
    (
        0..bodies.len(),
        any::<usize>(),
        prop_oneof![
            any_json(),
            // Huge and odd numbers where numbers go.
            prop::sample::select(vec![
                json!(u64::MAX),
                json!(i64::MIN),
                json!(1e300),
                json!(-0.5),
                json!(gantry_core::MAX_LIMIT_MS + 1),
                json!(9_223_372_036_854_775_000u64),
            ]),
        ],
        any::<bool>(),
    )
        .prop_map(move |(b, at, junk, remove)| {
            let mut body = bodies[b].clone();
            mutate(&mut body, at, junk, remove);
            body
        })
}

/// Replaces (or removes) the value at one of `v`'s paths, picked by `at`.
fn mutate(v: &mut Value, at: usize, junk: Value, remove: bool) {
    fn count(v: &Value) -> usize {
        1 + match v {
            Value::Object(m) => m.values().map(count).sum(),
            Value::Array(a) => a.iter().map(count).sum(),
            _ => 0,
        }
    }
    // Walks down to the `n`th value in pre-order and changes it there.
    fn at_nth(v: &mut Value, n: &mut usize, junk: &mut Option<Value>, remove: bool) -> bool {
        let children: Vec<String> = match v {
            Value::Object(m) => m.keys().cloned().collect(),
            Value::Array(a) => (0..a.len()).map(|i| i.to_string()).collect(),
            _ => Vec::new(),
        };
        for key in children {
            *n -= 1;
            if *n == 0 {
                match v {
                    Value::Object(m) if remove => {
                        m.remove(&key);
                    }
                    Value::Array(a) if remove => {
                        a.remove(key.parse::<usize>().unwrap_or_default());
                    }
                    Value::Object(m) => {
                        m.insert(key, junk.take().unwrap_or_default());
                    }
                    Value::Array(a) => {
                        a[key.parse::<usize>().unwrap_or_default()] =
                            junk.take().unwrap_or_default();
                    }
                    _ => {}
                }
                return true;
            }
            let child = match v {
                Value::Object(m) => m.get_mut(&key),
                Value::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
                _ => None,
            };
            if let Some(child) = child {
                if at_nth(child, n, junk, remove) {
                    return true;
                }
            }
        }
        false
    }
    let mut n = at % count(v);
    if n == 0 {
        *v = junk;
        return;
    }
    at_nth(v, &mut n, &mut Some(junk), remove);
}

/// A refusal of a parser: a 4xx whose message says something.
fn check_refusal(e: &ApiError) -> Result<(), TestCaseError> {
    match e {
        ApiError::BadRequest { message, code, .. } => {
            prop_assert!(!message.is_empty() && !code.is_empty());
        }
        ApiError::FileTooLarge { message, .. } => prop_assert!(!message.is_empty()),
        other => prop_assert!(false, "a parser answered {other:?}"),
    }
    Ok(())
}

/// What `create_job` does with a body before it touches the engine.
fn check_submit(body: &Value) -> Result<(), TestCaseError> {
    let spec = match parse_submit(body, 3) {
        Ok(spec) => spec,
        Err(e) => return check_refusal(&e),
    };
    prop_assert!((1..=100).contains(&spec.max_attempts));
    prop_assert!(spec.timeouts.over_max().is_none(), "{:?}", spec.timeouts);
    prop_assert!(spec.tags.iter().all(|t| !t.is_empty()));
    if let Some(c) = &spec.command {
        prop_assert!(!c.program().is_empty());
        prop_assert!(c.timeout_ms.is_none_or(|ms| ms <= MAX_LIMIT_MS));
    } else {
        prop_assert!(!spec.workflow.graph().is_empty());
    }
    match parse_attachments(body.get("attachments"), &spec.workflow, 1024) {
        Ok(list) => {
            for (name, _) in &list {
                prop_assert!(!name.is_empty() && !name.contains(['/', '\\']));
                prop_assert!(!spec.workflow.inputs_naming(name).is_empty());
            }
        }
        Err(e) => check_refusal(&e)?,
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn any_json_body_is_a_job_or_a_refusal(body in any_json()) {
        check_submit(&body)?;
    }

    #[test]
    fn broken_valid_bodies_are_jobs_or_refusals(body in mutated_body()) {
        check_submit(&body)?;
    }

    #[test]
    fn since_is_a_sequence_number_or_a_refusal(
        query in prop_oneof![Just(None), "\\PC{0,24}".prop_map(Some), any::<i64>().prop_map(|n| Some(n.to_string()))],
        header in prop_oneof![Just(None), prop::collection::vec(any::<u8>(), 0..24).prop_map(Some)],
    ) {
        let header = header.and_then(|h| axum::http::HeaderValue::from_bytes(&h).ok());
        match since_of(query.as_deref(), header.as_ref()) {
            Ok(n) => prop_assert!(n >= 0),
            Err(e) => check_refusal(&e)?,
        }
    }

    #[test]
    fn stats_since_is_a_time_or_a_refusal(
        since in prop_oneof![
            "\\PC{0,16}",
            (any::<u64>(), prop::sample::select(vec!["ms", "s", "m", "h", "d", "w", "y"])).prop_map(|(n, u)| format!("{n}{u}")),
            any::<i64>().prop_map(rfc3339),
        ],
        now in any::<i64>(),
    ) {
        if let Err(e) = stats_since(Some(&since), now) {
            check_refusal(&e)?;
        }
    }
}

/// Found by `broken_valid_bodies_are_jobs_or_refusals`: a deadline near `i64::MAX`
/// milliseconds was accepted, and the queue's `created_at + deadline` overflowed.
#[test]
fn a_timeout_over_ten_years_is_refused_by_field() {
    let body = json!({"workflow": {"1": {"class_type": "A", "inputs": {}}},
        "timeouts": {"deadline_ms": 9_223_372_036_854_775_000u64}});
    let Err(ApiError::BadRequest { message, .. }) = parse_submit(&body, 3) else {
        panic!("accepted");
    };
    assert_eq!(
        message,
        "timeouts.deadline_ms: must be at most 315360000000 (ten years), got 9223372036854775000"
    );
    let body =
        json!({"kind": "command", "command": {"argv": ["/bin/true"], "timeout_ms": u64::MAX}});
    let Err(ApiError::BadRequest { message, .. }) = parse_submit(&body, 3) else {
        panic!("accepted");
    };
    assert!(
        message.starts_with("command.timeout_ms: must be at most"),
        "{message}"
    );
}

/// Found by `stats_since_is_a_time_or_a_refusal`: a duration longer than the clock
/// reaches back (`?since=500000000000y`) overflowed the subtraction.
#[test]
fn a_stats_since_before_the_clock_began_is_from_the_beginning() {
    let since = stats_since(Some("500000000000y"), 1_700_000_000_000)
        .ok()
        .flatten();
    assert!(since.is_some_and(|ms| ms < 0), "{since:?}");
}

/// `Last-Event-ID` (and `since`) must be a sequence number: negative or garbled
/// ones are refused by name.
#[test]
fn since_names_where_it_came_from() {
    let header = axum::http::HeaderValue::from_static("-4");
    let Err(ApiError::BadRequest { message, .. }) = since_of(None, Some(&header)) else {
        panic!("accepted");
    };
    assert_eq!(
        message,
        "Last-Event-ID must be an event sequence number (0 or more), not \"-4\""
    );
    assert_eq!(since_of(Some(" 12 "), Some(&header)).ok(), Some(12));
    let opaque = axum::http::HeaderValue::from_bytes(&[0xff]).unwrap();
    assert!(since_of(None, Some(&opaque)).is_err());
    assert_eq!(since_of(None, None).ok(), Some(0));
}
