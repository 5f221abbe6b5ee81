//! `Workflow::parse` refusals by name, the facts routing reads (models, classes, shape
//! hash) and `ModelChoices` from `/object_info`.

use super::*;
use serde_json::json;

fn check(value: Value, expect: &str) {
    let got = match Workflow::parse(&value) {
        Ok(_) => "ok".to_owned(),
        Err(e) => e.to_string(),
    };
    assert_eq!(got, expect);
}

#[test]
fn parse_names_what_is_wrong() {
    check(
        json!({"1": {"class_type": "EmptyImage", "inputs": {}}}),
        "ok",
    );
    check(
        json!([1]),
        "the workflow must be a JSON object of nodes keyed by node id, got an array",
    );
    check(json!({}), "the workflow has no nodes");
    check(
        json!({"nodes": [], "links": [], "version": 0.4}),
        "the workflow is in the UI's save format (\"nodes\" and \"links\"), not API format: in ComfyUI use Workflow > Export (API) (or enable dev mode options and use \"Save (API Format)\") and submit that file",
    );
    check(
        json!({"prompt": {"1": {"class_type": "X", "inputs": {}}}, "client_id": "c"}),
        "the workflow looks like a whole /prompt request body: submit the graph under its \"prompt\" key as the workflow",
    );
    check(
        json!({"1": 5}),
        "node 1: must be an object with \"class_type\" and \"inputs\"",
    );
    check(
        json!({"1": {"inputs": {}}}),
        "node 1: \"class_type\" is missing or not a non-empty string",
    );
    check(
        json!({"1": {"class_type": "A"}}),
        "node 1 (A): \"inputs\" is missing or not an object",
    );
    check(
        json!({"1": {"class_type": "A", "inputs": {"x": [1, 0]}}}),
        "node 1 (A): input x is a link but not [node_id, output_index]",
    );
    check(
        json!({"1": {"class_type": "A", "inputs": {"x": ["9", 0]}}}),
        "node 1 (A): input x links to node 9, which is not in the workflow",
    );
}

#[test]
fn models_and_classes() {
    let w = Workflow::parse(&json!({
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5.safetensors"}},
        "5": {"class_type": "LoraLoader", "inputs": {"lora_name": "d.safetensors", "model": ["4", 0], "clip": ["4", 1]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat.safetensors", "clip": ["5", 1]}}
    }))
    .unwrap();
    let files: Vec<String> = w.models().into_iter().map(|m| m.file).collect();
    assert_eq!(files, ["v1-5.safetensors", "d.safetensors"]);
    assert!(w.is_model_input("4", "ckpt_name"));
    assert!(!w.is_model_input("6", "text"));
    assert_eq!(
        w.classes().into_iter().collect::<Vec<_>>(),
        ["CLIPTextEncode", "CheckpointLoaderSimple", "LoraLoader"]
    );
}

#[test]
fn shape_hash_ignores_values_but_not_links() {
    let a = json!({"1": {"class_type": "A", "inputs": {"seed": 1}}, "2": {"class_type": "B", "inputs": {"x": ["1", 0]}}});
    let b = json!({"1": {"class_type": "A", "inputs": {"seed": 2}}, "2": {"class_type": "B", "inputs": {"x": ["1", 0]}}});
    let c = json!({"1": {"class_type": "A", "inputs": {"seed": 1}}, "2": {"class_type": "B", "inputs": {"x": ["1", 1]}}});
    let hash = |v: &Value| Workflow::parse(v).unwrap().shape_hash();
    assert_eq!(hash(&a), hash(&b));
    assert_ne!(hash(&a), hash(&c));
}

#[test]
fn model_choices_come_from_object_info_combos() {
    let info: serde_json::Map<String, Value> = serde_json::from_value(json!({
        "CheckpointLoaderSimple": {"input": {"required": {
            "ckpt_name": [["a.safetensors", "b.safetensors"], {"tooltip": "x"}]}}},
        "LoraLoader": {"input": {"required": {
            "model": ["MODEL", {}],
            "lora_name": ["COMBO", {"options": ["l.safetensors"]}],
            "strength_model": ["FLOAT", {"default": 1.0}]}}},
        "Odd": {"input": {"required": {"vae_name": "not a spec"}}, "optional": 3}
    }))
    .unwrap();
    let choices = ModelChoices::from_object_info(&info);
    let w = |ckpt: &str, lora: &str| {
        Workflow::parse(&json!({
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
            "5": {"class_type": "LoraLoader", "inputs": {"lora_name": lora, "model": ["4", 0]}},
            "6": {"class_type": "Odd", "inputs": {"vae_name": "v.safetensors"}}
        }))
        .unwrap()
    };
    assert_eq!(
        choices.first_missing(&w("a.safetensors", "l.safetensors")),
        None
    );
    assert_eq!(
        choices.first_missing(&w("nope.safetensors", "l.safetensors")),
        Some(ModelRef {
            node: "4".into(),
            input: "ckpt_name".into(),
            file: "nope.safetensors".into()
        })
    );
    assert_eq!(
        choices
            .first_missing(&w("b.safetensors", "x.safetensors"))
            .map(|m| m.input),
        Some("lora_name".into())
    );
    // A fresher read of one class replaces what was known of it.
    let mut updated = choices.clone();
    let fresher: serde_json::Map<String, Value> = serde_json::from_value(json!({
        "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["nope.safetensors"], {}]}}}
    }))
    .unwrap();
    updated.update(ModelChoices::from_object_info(&fresher));
    assert_eq!(
        updated.first_missing(&w("nope.safetensors", "l.safetensors")),
        None
    );
    assert!(ModelChoices::from_object_info(&serde_json::Map::new()).is_empty());
}
