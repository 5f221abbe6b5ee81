//! `POST /prompt` validation, mirroring ComfyUI's `validate_prompt` and `validate_inputs`
//! (execution.py): the same checks in the same order, the same error shapes, and the same
//! quirks (errors found while validating one output are credited to every failing output
//! that follows; a link to a missing node is an exception reported on the node that holds
//! the link).

use crate::nodes::Catalog;
use indexmap::IndexMap;
use serde_json::{json, Map, Number, Value};

/// What validation decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Queued with these outputs (those that passed) and the converted graph; a
    /// non-empty `node_errors` means other outputs were dropped.
    Accepted {
        graph: Map<String, Value>,
        outputs: Vec<String>,
        node_errors: Map<String, Value>,
    },
    /// Answered 400 with `{error, node_errors}`.
    Rejected {
        error: Value,
        node_errors: Map<String, Value>,
    },
}

fn top_error(kind: &str, message: &str, details: &str) -> Value {
    json!({"type": kind, "message": message, "details": details, "extra_info": {}})
}

/// An exception raised while validating, as Python would raise it.
struct Raised {
    kind: &'static str,
    message: String,
    traceback: Vec<String>,
}

const TB_INNER: &str = "  File \"/opt/ComfyUI/execution.py\", line 808, in validate_inputs\n    r = await validate_inputs(prompt_id, prompt, o_id, validated)\n        ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n";
const TB_PROMPT: &str = "  File \"/opt/ComfyUI/execution.py\", line 1010, in validate_prompt\n    m = await validate_inputs(prompt_id, prompt, o, validated)\n        ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n";
const TB_KEY: &str = "  File \"/opt/ComfyUI/execution.py\", line 788, in validate_inputs\n    o_class_type = prompt[o_id]['class_type']\n                   ~~~~~~^^^^^^\n";

/// Validates a graph against the catalog. `input_files` are the files of the input
/// folder, with their subfolder (`sub/name`), that LoadImage and LoadAudio accept.
pub fn validate_prompt(
    prompt: &Map<String, Value>,
    catalog: &Catalog,
    input_files: &[String],
    partial: Option<&[String]>,
) -> Verdict {
    let mut outputs = Vec::new();
    for (id, node) in prompt {
        let class = node.get("class_type");
        let Some(class) = class else {
            return Verdict::Rejected {
                error: top_error(
                    "invalid_prompt",
                    "Cannot execute because a node is missing the class_type property.",
                    &format!("Node ID '#{id}'"),
                ),
                node_errors: Map::new(),
            };
        };
        let class_name = class.as_str().unwrap_or_default();
        if !catalog.has(class_name) {
            return Verdict::Rejected {
                error: top_error(
                    "invalid_prompt",
                    &format!(
                        "Cannot execute because node {} does not exist.",
                        python_str(class)
                    ),
                    &format!("Node ID '#{id}'"),
                ),
                node_errors: Map::new(),
            };
        }
        if catalog.is_output_node(class_name) && partial.is_none_or(|p| p.contains(id)) {
            outputs.push(id.clone());
        }
    }
    if outputs.is_empty() {
        return Verdict::Rejected {
            error: top_error("prompt_no_outputs", "Prompt has no outputs", ""),
            node_errors: Map::new(),
        };
    }

    let mut v = Validator {
        prompt: prompt.clone(),
        catalog,
        input_files,
        validated: IndexMap::new(),
    };
    let mut good = Vec::new();
    let mut failed: Vec<(String, Vec<Value>)> = Vec::new();
    let mut node_errors: Map<String, Value> = Map::new();
    for o in &outputs {
        let (valid, reasons) = match v.validate_inputs(o) {
            Ok(r) => r,
            Err(raised) => {
                let mut tb = vec![TB_PROMPT.to_string()];
                tb.extend(raised.traceback);
                let reasons = vec![json!({
                    "type": "exception_during_validation",
                    "message": "Exception when validating node",
                    "details": raised.message,
                    "extra_info": {"exception_type": raised.kind, "traceback": tb},
                })];
                v.validated.insert(o.clone(), (false, reasons.clone()));
                (false, reasons)
            }
        };
        if valid {
            good.push(o.clone());
            continue;
        }
        failed.push((o.clone(), reasons));
        for (node_id, (ok, reasons)) in &v.validated {
            if *ok || reasons.is_empty() {
                continue;
            }
            let entry = node_errors.entry(node_id.clone()).or_insert_with(|| {
                json!({
                    "errors": reasons,
                    "dependent_outputs": [],
                    "class_type": v.prompt[node_id]["class_type"],
                })
            });
            if let Some(deps) = entry["dependent_outputs"].as_array_mut() {
                deps.push(Value::String(o.clone()));
            }
        }
    }
    if good.is_empty() {
        let details = failed
            .iter()
            .flat_map(|(_, reasons)| reasons)
            .map(|r| {
                format!(
                    "{}: {}",
                    r["message"].as_str().unwrap_or_default(),
                    r["details"].as_str().unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        return Verdict::Rejected {
            error: top_error(
                "prompt_outputs_failed_validation",
                "Prompt outputs failed validation",
                &details,
            ),
            node_errors,
        };
    }
    Verdict::Accepted {
        graph: v.prompt,
        outputs: good,
        node_errors,
    }
}

struct Validator<'a> {
    /// The graph; widget values are converted in place (an INT given as "5" is queued as 5).
    prompt: Map<String, Value>,
    catalog: &'a Catalog,
    input_files: &'a [String],
    validated: IndexMap<String, (bool, Vec<Value>)>,
}

impl Validator<'_> {
    fn validate_inputs(&mut self, id: &str) -> Result<(bool, Vec<Value>), Raised> {
        if let Some(r) = self.validated.get(id) {
            return Ok(r.clone());
        }
        let node = &self.prompt[id];
        let class = node["class_type"].as_str().unwrap_or_default().to_string();
        let Some(inputs) = node.get("inputs").and_then(Value::as_object).cloned() else {
            return Err(Raised {
                kind: "KeyError",
                message: "'inputs'".into(),
                traceback: vec![],
            });
        };
        let custom = Catalog::custom_validated_inputs(&class);
        let mut errors = Vec::new();
        let mut valid = true;
        for (name, spec) in self.catalog.inputs(&class) {
            let Some(val) = inputs.get(&name) else {
                if spec.required {
                    errors.push(json!({
                        "type": "required_input_missing",
                        "message": "Required input is missing",
                        "details": name,
                        "extra_info": {"input_name": name},
                    }));
                }
                continue;
            };
            let info = self.catalog.input_config(&class, &name);
            if let Value::Array(link) = val {
                if link.len() != 2 {
                    errors.push(json!({
                        "type": "bad_linked_input",
                        "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                        "details": name,
                        "extra_info": {"input_name": name, "input_config": info, "received_value": val},
                    }));
                    continue;
                }
                let from = match &link[0] {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let Some(from_node) = self.prompt.get(&from) else {
                    return Err(Raised {
                        kind: "KeyError",
                        message: python_repr(&link[0]),
                        traceback: vec![TB_KEY.to_string()],
                    });
                };
                let from_class = from_node["class_type"].as_str().unwrap_or_default();
                let types = self.catalog.return_types(from_class);
                let Some(received) = link[1].as_u64().and_then(|i| types.get(i as usize)) else {
                    return Err(Raised {
                        kind: "IndexError",
                        message: "tuple index out of range".into(),
                        traceback: vec![],
                    });
                };
                if !types_match(received, &spec.kind) {
                    errors.push(json!({
                        "type": "return_type_mismatch",
                        "message": "Return type mismatch between linked nodes",
                        "details": format!("{name}, received_type({received}) mismatch input_type({})", python_str(&spec.kind)),
                        "extra_info": {"input_name": name, "input_config": info, "received_type": received, "linked_node": val},
                    }));
                    continue;
                }
                match self.validate_inputs(&from) {
                    Ok((true, _)) => {}
                    Ok((false, _)) => valid = false,
                    Err(raised) => {
                        valid = false;
                        let mut tb = vec![TB_INNER.to_string()];
                        tb.extend(raised.traceback);
                        let reasons = vec![json!({
                            "type": "exception_during_inner_validation",
                            "message": "Exception when validating inner node",
                            "details": raised.message,
                            "extra_info": {
                                "input_name": name,
                                "input_config": info,
                                "exception_message": raised.message,
                                "exception_type": raised.kind,
                                "traceback": tb,
                                "linked_node": val,
                            },
                        })];
                        self.validated.insert(from, (false, reasons));
                    }
                }
                continue;
            }
            let mut val = val.clone();
            if let Some(inner) = val.get("__value__") {
                val = inner.clone();
            }
            let converted = match spec.kind.as_str() {
                Some("INT") => to_int(&val),
                Some("FLOAT") => to_float(&val),
                Some("STRING") => Ok(Value::String(python_str(&val))),
                Some("BOOLEAN") => Ok(Value::Bool(truthy(&val))),
                _ => Ok(val.clone()),
            };
            let val = match converted {
                Ok(v) => v,
                Err(message) => {
                    errors.push(json!({
                        "type": "invalid_input_type",
                        "message": format!("Failed to convert an input value to a {} value", python_str(&spec.kind)),
                        "details": format!("{name}, {}, {message}", python_str(&val)),
                        "extra_info": {"input_name": name, "input_config": info, "received_value": val, "exception_message": message},
                    }));
                    continue;
                }
            };
            if let Some(slot) = self
                .prompt
                .get_mut(id)
                .and_then(|n| n.get_mut("inputs"))
                .and_then(|i| i.get_mut(&name))
            {
                *slot = val.clone();
            }
            if custom.iter().any(|(input, _)| *input == name) {
                continue;
            }
            if let (Some(min), Some(x)) = (spec.options.get("min"), val.as_f64()) {
                if min.as_f64().is_some_and(|m| x < m) {
                    errors.push(json!({
                        "type": "value_smaller_than_min",
                        "message": format!("Value {} smaller than min of {}", python_str(&val), python_str(min)),
                        "details": name,
                        "extra_info": {"input_name": name, "input_config": info, "received_value": val},
                    }));
                    continue;
                }
            }
            if let (Some(max), Some(x)) = (spec.options.get("max"), val.as_f64()) {
                if max.as_f64().is_some_and(|m| x > m) {
                    errors.push(json!({
                        "type": "value_bigger_than_max",
                        "message": format!("Value {} bigger than max of {}", python_str(&val), python_str(max)),
                        "details": name,
                        "extra_info": {"input_name": name, "input_config": info, "received_value": val},
                    }));
                    continue;
                }
            }
            if let Value::Array(options) = &spec.kind {
                if !options.contains(&val) {
                    let (list_info, config) = if options.len() > 20 {
                        (format!("(list of length {})", options.len()), Value::Null)
                    } else {
                        (python_repr(&spec.kind), info.clone())
                    };
                    errors.push(json!({
                        "type": "value_not_in_list",
                        "message": "Value not in list",
                        "details": format!("{name}: '{}' not in {list_info}", python_str(&val)),
                        "extra_info": {"input_name": name, "input_config": config, "received_value": val},
                    }));
                    continue;
                }
            }
        }
        for (name, what) in custom {
            let Some(file) = inputs.get(*name) else {
                continue;
            };
            let file = python_str(file);
            let path = crate::engine::input_name(&file);
            if !self.input_files.iter().any(|f| f == path) {
                errors.push(json!({
                    "type": "custom_validation_failed",
                    "message": "Custom validation failed for node",
                    "details": format!("{name} - Invalid {what} file: {file}"),
                    "extra_info": {"input_name": name},
                }));
            }
        }
        let r = (errors.is_empty() && valid, errors);
        self.validated.insert(id.to_string(), r.clone());
        Ok(r)
    }
}

/// ComfyUI's `validate_node_input`: equal types, `*`, or a comma-separated union.
fn types_match(received: &str, input: &Value) -> bool {
    let Some(input) = input.as_str() else {
        // A combo input fed by a link (a primitive node) is checked at run time.
        return true;
    };
    if received == input || received == "*" || input == "*" {
        return true;
    }
    let want: Vec<&str> = input.split(',').map(str::trim).collect();
    received
        .split(',')
        .map(str::trim)
        .all(|r| want.contains(&r))
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// Python's `int(val)`, with its error text.
fn to_int(v: &Value) -> Result<Value, String> {
    match v {
        Value::Number(n) if n.is_i64() || n.is_u64() => Ok(v.clone()),
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or(0.0);
            if f.is_finite() {
                Ok(Value::from(f.trunc() as i64))
            } else {
                Err("cannot convert float infinity to integer".into())
            }
        }
        Value::Bool(b) => Ok(Value::from(i64::from(*b))),
        Value::String(s) => s
            .trim()
            .replace('_', "")
            .parse::<i64>()
            .map(Value::from)
            .map_err(|_| format!("invalid literal for int() with base 10: '{s}'")),
        other => Err(format!(
            "int() argument must be a string, a bytes-like object or a real number, not '{}'",
            python_type(other)
        )),
    }
}

/// Python's `float(val)`, with its error text.
fn to_float(v: &Value) -> Result<Value, String> {
    let f = match v {
        Value::Number(n) => n.as_f64().unwrap_or(0.0),
        Value::Bool(b) => f64::from(u8::from(*b)),
        Value::String(s) => s
            .trim()
            .parse::<f64>()
            .map_err(|_| format!("could not convert string to float: '{s}'"))?,
        other => {
            return Err(format!(
                "float() argument must be a string or a real number, not '{}'",
                python_type(other)
            ))
        }
    };
    Number::from_f64(f)
        .map(Value::Number)
        .ok_or_else(|| "cannot represent a non-finite float in JSON".into())
}

fn python_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

/// Python's `str(val)` for a JSON value.
pub fn python_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => python_repr(other),
    }
}

/// Python's `repr(val)` for a JSON value.
pub fn python_repr(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")),
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(python_repr).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .map(|(k, v)| format!("'{k}': {}", python_repr(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}
