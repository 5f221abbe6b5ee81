//! Property tests: whatever JSON a client sends as a workflow, `parse` answers a checked
//! graph or an error that names what is wrong, and never panics. `PROPTEST_CASES` asks
//! for more cases than the default.

use super::*;
use proptest::prelude::*;
use serde_json::json;

/// A fixed seed (another with `PROPTEST_RNG_SEED`), so that a run is the same on every
/// machine; a failing case is kept as a plain test rather than in a regressions file.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        rng_seed: proptest::test_runner::RngSeed::Fixed(24),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Any JSON: odd numbers, unicode, nesting.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("1"),
            Just("2"),
            Just(""),
            Just("class_type"),
            Just("inputs")
        ]
        .prop_map(|s| Value::String(s.to_owned())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Object keys: mostly small node ids, so links often find (or just miss) a node.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u8..6).prop_map(|n| n.to_string()),
        Just("class_type".to_owned()),
        Just("inputs".to_owned()),
        "\\PC{0,8}",
    ]
}

/// A graph of API-format shape whose class types, inputs and links may each be
/// wrong: links to missing nodes, to themselves, in loops, with odd indexes.
fn graph_like() -> impl Strategy<Value = Value> {
    let link = (
        prop_oneof![
            (0u8..8).prop_map(|n| Value::from(n.to_string())),
            any_json()
        ],
        prop_oneof![(0u64..3).prop_map(Value::from), any_json()],
    )
        .prop_map(|(id, n)| json!([id, n]));
    let input = prop_oneof![3 => link, 1 => any_json()];
    let class = prop_oneof![
        4 => "[A-Za-z]{1,10}".prop_map(Value::String),
        1 => any_json(),
    ];
    let node = (
        class,
        prop::collection::vec(("[a-z_]{1,6}", input), 0..4),
        any::<bool>(),
    )
        .prop_map(|(class, inputs, inputs_object)| {
            let inputs: Map<String, Value> = inputs.into_iter().collect();
            if inputs_object {
                json!({"class_type": class, "inputs": inputs})
            } else {
                json!({"class_type": class, "inputs": Value::Array(inputs.into_values().collect())})
            }
        });
    prop::collection::vec(((0u8..8).prop_map(|n| n.to_string()), node), 0..8)
        .prop_map(|nodes| Value::Object(nodes.into_iter().collect()))
}

/// The real prompts of the captures, by file name.
fn fixtures() -> Vec<(String, Value)> {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/comfyui/workflows");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("fixtures/comfyui/workflows") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        out.push((
            name,
            serde_json::from_str(&text).expect("a fixture is JSON"),
        ));
    }
    assert!(out.len() > 10, "the fixtures are there");
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// One change to a real prompt: a node's input, class type or whole body replaced,
/// a link pointed elsewhere, a node removed or added.
fn mutated_fixture() -> impl Strategy<Value = Value> {
    let fixtures: Vec<Value> = fixtures().into_iter().map(|(_, v)| v).collect();
    (
        0..fixtures.len(),
        any::<prop::sample::Index>(),
        any::<prop::sample::Index>(),
        0u8..6,
        any_json(),
    )
        .prop_map(move |(f, node_at, input_at, how, junk)| {
            let mut graph = fixtures[f].as_object().cloned().unwrap_or_default();
            let ids: Vec<String> = graph.keys().cloned().collect();
            let id = node_at.get(&ids).clone();
            let other = input_at.get(&ids).clone();
            let node = graph.get_mut(&id).and_then(Value::as_object_mut);
            match (how, node) {
                (0, Some(node)) => {
                    node.insert("class_type".into(), junk);
                }
                (1, Some(node)) => {
                    if let Some(inputs) = node.get_mut("inputs").and_then(Value::as_object_mut) {
                        let names: Vec<String> = inputs.keys().cloned().collect();
                        if !names.is_empty() {
                            inputs.insert(input_at.get(&names).clone(), junk);
                        }
                    }
                }
                (2, Some(node)) => {
                    // A link back from `id` to `other`: a loop when `other` feeds `id`.
                    if let Some(inputs) = node.get_mut("inputs").and_then(Value::as_object_mut) {
                        inputs.insert("loop".into(), json!([other, 0]));
                    }
                }
                (3, _) => {
                    graph.remove(&id);
                }
                (4, _) => {
                    graph.insert(id, junk);
                }
                _ => {
                    graph.insert(format!("{id}x"), junk);
                }
            }
            Value::Object(graph)
        })
}

/// What must hold of `parse`'s answer for `value`, whatever it is.
fn check_parse(value: &Value) -> Result<(), TestCaseError> {
    match Workflow::parse(value) {
        Err(e) => {
            prop_assert!(!e.to_string().is_empty());
            prop_assert!(matches!(
                e.code(),
                "invalid_workflow" | "ui_format" | "missing_link_target"
            ));
            if let Some(node) = e.node() {
                prop_assert!(
                    value.get(node).is_some(),
                    "the error names node {node:?}, which is not in the graph: {e}"
                );
            }
        }
        Ok(w) => {
            prop_assert!(!w.graph().is_empty());
            for (id, class) in w.nodes() {
                prop_assert!(!class.is_empty(), "node {id} has an empty class");
                for target in links_of(&w.graph()[id]) {
                    prop_assert!(w.graph().contains_key(target));
                }
            }
            prop_assert!(find_cycle(w.graph()).is_none());
            // The rest of the type's surface takes any checked graph.
            let _ = (w.shape_hash(), w.models(), w.classes(), w.model_files());
            let back = Workflow::try_from(Value::from(w.clone()));
            prop_assert_eq!(back.as_ref().ok(), Some(&w));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn any_json_is_parsed_or_refused(value in any_json()) {
        check_parse(&value)?;
    }

    #[test]
    fn graphs_with_bad_nodes_and_links_are_parsed_or_refused(value in graph_like()) {
        check_parse(&value)?;
    }

    #[test]
    fn mutated_real_prompts_are_parsed_or_refused(value in mutated_fixture()) {
        check_parse(&value)?;
    }
}

#[test]
fn every_real_prompt_parses_but_those_that_break_the_graph() {
    for (name, value) in fixtures() {
        let got = Workflow::parse(&value).map(|_| ()).map_err(|e| e.code());
        let expect = match name.as_str() {
            "f_link_to_missing_node.json" | "f_one_of_two_outputs_invalid.json" => {
                Err("missing_link_target")
            }
            "f_missing_class_type.json" => Err("invalid_workflow"),
            _ => Ok(()),
        };
        assert_eq!(got, expect, "{name}");
    }
}

#[test]
fn loops_are_refused_with_their_path() {
    let check = |value: Value, expect: &str| {
        let got = Workflow::parse(&value)
            .map(|_| ())
            .map_err(|e| e.to_string());
        assert_eq!(got, Err(expect.to_owned()));
    };
    check(
        json!({"1": {"class_type": "A", "inputs": {"x": ["1", 0]}}}),
        "node 1 (A): its inputs lead back to it (1 -> 1); a workflow must not loop",
    );
    check(
        json!({
            "1": {"class_type": "A", "inputs": {"x": ["2", 0]}},
            "2": {"class_type": "B", "inputs": {"y": ["3", 0]}},
            "3": {"class_type": "C", "inputs": {"z": ["1", 0]}},
        }),
        "node 1 (A): its inputs lead back to it (1 -> 2 -> 3 -> 1); a workflow must not loop",
    );
    // A diamond is not a loop.
    let diamond = json!({
        "1": {"class_type": "A", "inputs": {}},
        "2": {"class_type": "B", "inputs": {"a": ["1", 0]}},
        "3": {"class_type": "C", "inputs": {"a": ["1", 0]}},
        "4": {"class_type": "D", "inputs": {"b": ["2", 0], "c": ["3", 0]}},
    });
    assert!(Workflow::parse(&diamond).is_ok());
}

#[test]
fn a_long_chain_is_checked_without_exhausting_the_stack() {
    // Far deeper than a recursive walk could go on a test thread's 2 MiB stack.
    let n = 50_000;
    let mut graph = Map::new();
    graph.insert("0".into(), json!({"class_type": "A", "inputs": {}}));
    for i in 1..n {
        graph.insert(
            i.to_string(),
            json!({"class_type": "A", "inputs": {"x": [(i - 1).to_string(), 0]}}),
        );
    }
    assert!(Workflow::parse(&Value::Object(graph.clone())).is_ok());
    graph.insert(
        "0".into(),
        json!({"class_type": "A", "inputs": {"x": [(n - 1).to_string(), 0]}}),
    );
    let err = Workflow::parse(&Value::Object(graph))
        .map(|_| ())
        .unwrap_err();
    assert!(
        err.to_string()
            .ends_with("-> ...); a workflow must not loop"),
        "{err}"
    );
}
