//! ComfyUI workflows in API format, checked at the edge: a `Workflow` that exists is an
//! object of nodes, each with a `class_type` and `inputs`, whose links all point at nodes
//! that exist. Also the facts routing needs: the classes used, the model files named, and
//! a hash of the workflow's shape.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap, HashSet};

/// Inputs that name a model file, by the names ComfyUI's loaders use.
const MODEL_INPUTS: &[&str] = &[
    "ckpt_name",
    "lora_name",
    "vae_name",
    "unet_name",
    "clip_name",
    "clip_name1",
    "clip_name2",
    "control_net_name",
    "upscale_model_name",
    "style_model_name",
    "gligen_name",
    "model_name",
];

const MODEL_EXTENSIONS: &[&str] = &[
    ".safetensors",
    ".ckpt",
    ".pt",
    ".pth",
    ".bin",
    ".gguf",
    ".sft",
];

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("the workflow must be a JSON object of nodes keyed by node id, got {got}")]
    NotAnObject { got: &'static str },
    #[error(
        "the workflow is in the UI's save format (\"nodes\" and \"links\"), not API format: \
         in ComfyUI use Workflow > Export (API) (or enable dev mode options and use \
         \"Save (API Format)\") and submit that file"
    )]
    UiFormat,
    #[error(
        "the workflow looks like a whole /prompt request body: submit the graph under its \
         \"prompt\" key as the workflow"
    )]
    PromptBody,
    #[error("the workflow has no nodes")]
    Empty,
    #[error("node {node}: must be an object with \"class_type\" and \"inputs\"")]
    NodeNotAnObject { node: String },
    #[error("node {node}: \"class_type\" is missing or not a non-empty string")]
    MissingClassType { node: String },
    #[error("node {node} ({class_type}): \"inputs\" is missing or not an object")]
    MissingInputs { node: String, class_type: String },
    #[error("node {node} ({class_type}): input {input} is a link but not [node_id, output_index]")]
    BadLink {
        node: String,
        class_type: String,
        input: String,
    },
    #[error("node {node} ({class_type}): input {input} links to node {target}, which is not in the workflow")]
    MissingLinkTarget {
        node: String,
        class_type: String,
        input: String,
        target: String,
    },
    #[error(
        "node {node} ({class_type}): its inputs lead back to it ({path}); a workflow must not loop"
    )]
    Cycle {
        node: String,
        class_type: String,
        /// The loop, as `a -> b -> a` (cut short past a few nodes).
        path: String,
    },
}

impl Error {
    /// The node at fault, for the API's `details`.
    pub fn node(&self) -> Option<&str> {
        match self {
            Error::NotAnObject { .. } | Error::UiFormat | Error::PromptBody | Error::Empty => None,
            Error::NodeNotAnObject { node }
            | Error::MissingClassType { node }
            | Error::MissingInputs { node, .. }
            | Error::BadLink { node, .. }
            | Error::MissingLinkTarget { node, .. }
            | Error::Cycle { node, .. } => Some(node),
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Error::UiFormat => "ui_format",
            Error::MissingLinkTarget { .. } => "missing_link_target",
            Error::NotAnObject { .. }
            | Error::PromptBody
            | Error::Empty
            | Error::NodeNotAnObject { .. }
            | Error::MissingClassType { .. }
            | Error::MissingInputs { .. }
            | Error::BadLink { .. }
            | Error::Cycle { .. } => "invalid_workflow",
        }
    }
}

/// A model file a node names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ModelRef {
    pub node: String,
    pub input: String,
    pub file: String,
}

/// The files a backend offers for each model input of each node class, as its
/// `/object_info` lists them (a combo's values): what lets gantry refuse at submit a
/// workflow whose checkpoint no backend has.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelChoices(HashMap<(String, String), HashSet<String>>);

impl ModelChoices {
    /// Read from `/object_info` (or `/object_info/{class}`): every input named like a
    /// model input whose spec is a combo, as `[[values], {...}]` or ComfyUI's newer
    /// `["COMBO", {"options": [values]}]`. Anything else is skipped, never guessed.
    pub fn from_object_info<'a>(info: impl IntoIterator<Item = (&'a String, &'a Value)>) -> Self {
        let mut out = HashMap::new();
        for (class, spec) in info {
            for group in ["required", "optional"] {
                let Some(inputs) = spec
                    .get("input")
                    .and_then(|i| i.get(group))
                    .and_then(Value::as_object)
                else {
                    continue;
                };
                for (input, def) in inputs {
                    if !(MODEL_INPUTS.contains(&input.as_str()) || input.ends_with("_name")) {
                        continue;
                    }
                    let values = match def.get(0) {
                        Some(Value::Array(values)) => Some(values),
                        Some(Value::String(kind)) if kind == "COMBO" => def
                            .get(1)
                            .and_then(|o| o.get("options"))
                            .and_then(Value::as_array),
                        _ => None,
                    };
                    if let Some(values) = values {
                        let set = values
                            .iter()
                            .filter_map(Value::as_str)
                            .map(str::to_owned)
                            .collect();
                        out.insert((class.clone(), input.clone()), set);
                    }
                }
            }
        }
        ModelChoices(out)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Take what a fresher read says of the classes it covers.
    pub fn update(&mut self, fresher: ModelChoices) {
        self.0.extend(fresher.0);
    }

    /// The first model the workflow names that this backend does not offer (listed
    /// values for that input, without this one); inputs it says nothing of are not
    /// judged.
    pub fn first_missing(&self, workflow: &Workflow) -> Option<ModelRef> {
        workflow.models().into_iter().find(|m| {
            let class = workflow.class_of(&m.node).unwrap_or_default();
            self.0
                .get(&(class.to_owned(), m.input.clone()))
                .is_some_and(|offered| !offered.contains(&m.file))
        })
    }
}

/// A checked API-format workflow. Immutable once checked, and shared: a job, its
/// attempts and the engine's caches hold the same graph.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Value", into = "Value")]
pub struct Workflow(std::sync::Arc<Map<String, Value>>);

impl TryFrom<Value> for Workflow {
    type Error = Error;
    fn try_from(value: Value) -> Result<Workflow, Error> {
        // A command job's stored spec has the empty graph; a client's never does
        // (`parse` refuses it).
        if value.as_object().is_some_and(Map::is_empty) {
            return Ok(Workflow::none());
        }
        Workflow::parse(&value)
    }
}

impl From<Workflow> for Value {
    fn from(w: Workflow) -> Value {
        Value::Object(std::sync::Arc::unwrap_or_clone(w.0))
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The node ids an input of `node` links to (a checked graph's links only).
fn links_of(node: &Value) -> impl Iterator<Item = &str> {
    node.get("inputs")
        .and_then(Value::as_object)
        .into_iter()
        .flat_map(|inputs| inputs.values())
        .filter_map(|v| v.as_array()?.first()?.as_str())
}

/// A loop through links, if the graph has one: ComfyUI can never run such a graph (it
/// fails it as a dependency cycle once it executes), so it is refused at the edge.
/// Iterative, so that a long chain of nodes cannot exhaust the stack.
fn find_cycle(graph: &Map<String, Value>) -> Option<Error> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let mut marks: std::collections::HashMap<&str, Mark> =
        graph.keys().map(|k| (k.as_str(), Mark::New)).collect();
    for start in graph.keys() {
        if marks.get(start.as_str()) != Some(&Mark::New) {
            continue;
        }
        // The path from `start`, each node with the links it has left to follow.
        let mut path: Vec<(&str, Vec<&str>)> = vec![(start, links_of(&graph[start]).collect())];
        marks.insert(start, Mark::OnPath);
        while let Some(&mut (id, ref mut pending)) = path.last_mut() {
            let Some(next) = pending.pop() else {
                marks.insert(id, Mark::Done);
                path.pop();
                continue;
            };
            match marks.get(next).copied() {
                Some(Mark::New) => {
                    marks.insert(next, Mark::OnPath);
                    path.push((next, links_of(&graph[next]).collect()));
                }
                Some(Mark::OnPath) => {
                    let from = path.iter().position(|(n, _)| *n == next).unwrap_or(0);
                    let mut ids: Vec<&str> = path[from..].iter().map(|(n, _)| *n).collect();
                    const SHOWN: usize = 8;
                    let cut = ids.len() > SHOWN;
                    ids.truncate(SHOWN);
                    let mut shown = ids.join(" -> ");
                    shown.push_str(if cut { " -> ..." } else { " -> " });
                    if !cut {
                        shown.push_str(next);
                    }
                    return Some(Error::Cycle {
                        node: next.to_owned(),
                        class_type: graph[next]
                            .get("class_type")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                        path: shown,
                    });
                }
                // Done, or not a node (parse checked every target before this).
                Some(Mark::Done) | None => {}
            }
        }
    }
    None
}

impl Workflow {
    /// The empty graph of a command job, which runs a program instead.
    pub fn none() -> Workflow {
        Workflow(std::sync::Arc::new(Map::new()))
    }

    pub fn parse(value: &Value) -> Result<Workflow, Error> {
        let Value::Object(graph) = value else {
            return Err(Error::NotAnObject {
                got: kind_of(value),
            });
        };
        if graph.get("nodes").is_some_and(Value::is_array) && graph.contains_key("links") {
            return Err(Error::UiFormat);
        }
        if graph.get("prompt").is_some_and(Value::is_object) && !graph.contains_key("class_type") {
            let looks_like_nodes = graph
                .get("prompt")
                .and_then(Value::as_object)
                .is_some_and(|p| p.values().all(|n| n.get("class_type").is_some()));
            if looks_like_nodes {
                return Err(Error::PromptBody);
            }
        }
        if graph.is_empty() {
            return Err(Error::Empty);
        }
        for (id, node) in graph {
            let Value::Object(node) = node else {
                return Err(Error::NodeNotAnObject { node: id.clone() });
            };
            let class_type = match node.get("class_type") {
                Some(Value::String(c)) if !c.is_empty() => c.clone(),
                _ => return Err(Error::MissingClassType { node: id.clone() }),
            };
            let Some(Value::Object(inputs)) = node.get("inputs") else {
                return Err(Error::MissingInputs {
                    node: id.clone(),
                    class_type,
                });
            };
            for (input, v) in inputs {
                let Value::Array(link) = v else { continue };
                let target = match link.as_slice() {
                    [Value::String(target), Value::Number(n)] if n.as_u64().is_some() => target,
                    _ => {
                        return Err(Error::BadLink {
                            node: id.clone(),
                            class_type,
                            input: input.clone(),
                        })
                    }
                };
                if !graph.contains_key(target) {
                    return Err(Error::MissingLinkTarget {
                        node: id.clone(),
                        class_type,
                        input: input.clone(),
                        target: target.clone(),
                    });
                }
            }
        }
        if let Some(err) = find_cycle(graph) {
            return Err(err);
        }
        Ok(Workflow(std::sync::Arc::new(graph.clone())))
    }

    pub fn graph(&self) -> &Map<String, Value> {
        &self.0
    }

    /// `(node id, class_type)` for every node, in the workflow's order.
    pub fn nodes(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(id, node)| {
            let class = node
                .get("class_type")
                .and_then(Value::as_str)
                .unwrap_or_default();
            (id.as_str(), class)
        })
    }

    pub fn classes(&self) -> BTreeSet<&str> {
        self.nodes().map(|(_, class)| class).collect()
    }

    pub fn class_of(&self, node: &str) -> Option<&str> {
        self.0.get(node)?.get("class_type")?.as_str()
    }

    /// Model files named by loader inputs, for warm affinity and missing-model messages.
    pub fn models(&self) -> Vec<ModelRef> {
        let mut out = Vec::new();
        for (id, node) in self.0.iter() {
            let Some(inputs) = node.get("inputs").and_then(Value::as_object) else {
                continue;
            };
            for (input, v) in inputs {
                let Some(file) = v.as_str() else { continue };
                let lower = file.to_ascii_lowercase();
                if MODEL_INPUTS.contains(&input.as_str())
                    || (input.ends_with("_name")
                        && MODEL_EXTENSIONS.iter().any(|ext| lower.ends_with(ext)))
                {
                    out.push(ModelRef {
                        node: id.clone(),
                        input: input.clone(),
                        file: file.to_owned(),
                    });
                }
            }
        }
        out
    }

    /// The model files it loads, in node order (what `models` names, without where).
    /// The (node, input) pairs whose value is exactly the string `value`: where an
    /// attachment of that name is used.
    pub fn inputs_naming(&self, value: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (id, node) in self.0.iter() {
            let Some(inputs) = node.get("inputs").and_then(Value::as_object) else {
                continue;
            };
            for (input, v) in inputs {
                if v.as_str() == Some(value) {
                    out.push((id.clone(), input.clone()));
                }
            }
        }
        out
    }

    /// The graph with every string input equal to a key of `names` replaced by its
    /// value: attachments renamed to where a backend's upload route put them.
    pub fn with_names(
        &self,
        names: &std::collections::HashMap<String, String>,
    ) -> Map<String, Value> {
        let mut graph = (*self.0).clone();
        for node in graph.values_mut() {
            let Some(inputs) = node.get_mut("inputs").and_then(Value::as_object_mut) else {
                continue;
            };
            for v in inputs.values_mut() {
                if let Some(new) = v.as_str().and_then(|s| names.get(s)) {
                    *v = Value::String(new.clone());
                }
            }
        }
        graph
    }

    pub fn model_files(&self) -> Vec<String> {
        self.models().into_iter().map(|m| m.file).collect()
    }

    /// Whether `input` of `node` names a model file (so a backend that does not list the
    /// value lacks a model rather than the workflow being wrong).
    pub fn is_model_input(&self, node: &str, input: &str) -> bool {
        self.models()
            .iter()
            .any(|m| m.node == node && m.input == input)
    }

    /// A stable hash of the shape (node ids, classes and links), not of seeds, prompt
    /// text or other values, so reruns with new seeds share it.
    pub fn shape_hash(&self) -> String {
        let mut ids: Vec<&String> = self.0.keys().collect();
        ids.sort();
        let mut h = Sha256::new();
        for id in ids {
            let node = &self.0[id];
            h.update(id.as_bytes());
            h.update([0]);
            h.update(
                node.get("class_type")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .as_bytes(),
            );
            h.update([0]);
            if let Some(inputs) = node.get("inputs").and_then(Value::as_object) {
                let mut names: Vec<&String> = inputs.keys().collect();
                names.sort();
                for name in names {
                    h.update(name.as_bytes());
                    if let Value::Array(link) = &inputs[name] {
                        h.update(b"=");
                        h.update(link[0].as_str().unwrap_or_default().as_bytes());
                        h.update(b":");
                        h.update(link[1].to_string().as_bytes());
                    }
                    h.update([0]);
                }
            }
            h.update([1]);
        }
        hex::encode(&h.finalize()[..16])
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod fuzz;
