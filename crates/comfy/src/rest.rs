//! HTTP request and answer shapes of a ComfyUI server (PROTOCOL.md sections 2 and 3).

use indexmap::IndexMap;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Number, Value};

/// An API-format workflow: `{node_id: {class_type, inputs, _meta?}}`, in submission order.
pub type Graph = Map<String, Value>;

/// Body of `POST /prompt`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptRequest {
    pub prompt: Graph,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_data: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub front: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<Number>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_execution_targets: Option<Vec<String>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// 200 answer of `POST /prompt`. A non-empty `node_errors` means some outputs were dropped
/// and only the valid ones will run (PROTOCOL.md pitfall 11).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptAccepted {
    pub prompt_id: String,
    /// Queue position: a counter, negative for `front: true`, or the client's own number.
    pub number: Number,
    pub node_errors: IndexMap<String, NodeError>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// 400 answer of `POST /prompt`: nothing was queued.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptRejected {
    pub error: PromptError,
    pub node_errors: IndexMap<String, NodeError>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The top-level `error` of a rejected prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptError {
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    pub details: String,
    pub extra_info: Map<String, Value>,
}

/// Validation errors of one node, with the outputs that depend on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeError {
    pub errors: Vec<ValidationError>,
    pub dependent_outputs: Vec<String>,
    pub class_type: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One validation error (`required_input_missing`, `value_not_in_list`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationError {
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    pub details: String,
    pub extra_info: Map<String, Value>,
}

/// `GET /prompt`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptInfo {
    pub exec_info: ExecInfo,
}

/// Queue size as the server counts it: pending plus running, for every client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecInfo {
    pub queue_remaining: u64,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `GET /queue`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Queue {
    pub queue_running: Vec<QueueItem>,
    pub queue_pending: Vec<QueueItem>,
}

/// A queue item, `[number, prompt_id, prompt, extra_data, outputs_to_execute]` on the wire.
/// Elements past the fifth are kept in `rest`.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueItem {
    pub number: Number,
    pub prompt_id: String,
    pub prompt: Graph,
    pub extra_data: Map<String, Value>,
    pub outputs_to_execute: Vec<String>,
    pub rest: Vec<Value>,
}

impl QueueItem {
    /// The `client_id` the prompt was submitted with, if any.
    pub fn client_id(&self) -> Option<&str> {
        self.extra_data.get("client_id").and_then(Value::as_str)
    }
}

impl Serialize for QueueItem {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut items = vec![
            Value::Number(self.number.clone()),
            Value::String(self.prompt_id.clone()),
            Value::Object(self.prompt.clone()),
            Value::Object(self.extra_data.clone()),
            Value::Array(
                self.outputs_to_execute
                    .iter()
                    .cloned()
                    .map(Value::String)
                    .collect(),
            ),
        ];
        items.extend(self.rest.iter().cloned());
        items.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for QueueItem {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let items = Vec::<Value>::deserialize(deserializer)?;
        let mut it = items.into_iter();
        let number = match it.next() {
            Some(Value::Number(n)) => n,
            other => return Err(D::Error::custom(format!("queue item number: {other:?}"))),
        };
        let prompt_id = match it.next() {
            Some(Value::String(s)) => s,
            other => return Err(D::Error::custom(format!("queue item prompt_id: {other:?}"))),
        };
        let prompt = match it.next() {
            Some(Value::Object(m)) => m,
            None => Map::new(),
            other => return Err(D::Error::custom(format!("queue item prompt: {other:?}"))),
        };
        let extra_data = match it.next() {
            Some(Value::Object(m)) => m,
            None => Map::new(),
            other => {
                return Err(D::Error::custom(format!(
                    "queue item extra_data: {other:?}"
                )))
            }
        };
        let outputs_to_execute = match it.next() {
            Some(v) => serde_json::from_value(v).map_err(D::Error::custom)?,
            None => Vec::new(),
        };
        Ok(QueueItem {
            number,
            prompt_id,
            prompt,
            extra_data,
            outputs_to_execute,
            rest: it.collect(),
        })
    }
}

/// Body of `POST /queue` and `POST /history`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeleteRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clear: Option<bool>,
}

/// Body of `POST /interrupt`; without `prompt_id` the interrupt hits whatever runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InterruptRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_id: Option<String>,
}

/// `GET /history` and `GET /history/{id}`: entries by prompt id, in insertion order.
pub type History = IndexMap<String, HistoryEntry>;

/// What the server remembers of a finished prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub prompt: QueueItem,
    /// UI outputs by node id, e.g. `{"images": [ImageRef]}`.
    pub outputs: IndexMap<String, Value>,
    pub status: HistoryStatus,
    #[serde(default)]
    pub meta: IndexMap<String, Value>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// How a prompt ended. An interrupted prompt is `error` with `completed: false`, told
/// apart only by its `execution_interrupted` message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryStatus {
    pub status_str: String,
    pub completed: bool,
    /// `[event, data]` pairs: execution_start, execution_cached and the terminal event.
    pub messages: Vec<(String, Value)>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl HistoryEntry {
    /// The outcome that the entry's status and messages tell.
    pub fn outcome(&self) -> Outcome {
        Outcome::of(&self.status)
    }

    /// Every image (or other file) reference in the UI outputs.
    pub fn files(&self) -> Vec<FileRef> {
        self.outputs
            .values()
            .filter_map(Value::as_object)
            .flat_map(|ui| ui.values())
            .filter_map(Value::as_array)
            .flatten()
            .filter_map(|v| serde_json::from_value::<FileRef>(v.clone()).ok())
            .collect()
    }
}

/// How a prompt ended, as history or the terminal WebSocket message says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Error,
    Interrupted,
}

impl Outcome {
    /// The outcome a history status tells.
    pub fn of(status: &HistoryStatus) -> Outcome {
        let has = |name: &str| status.messages.iter().any(|(m, _)| m == name);
        if status.status_str == "success" {
            Outcome::Success
        } else if has("execution_interrupted") {
            Outcome::Interrupted
        } else {
            Outcome::Error
        }
    }
}

/// A file written by an output node, fetched with `GET /view`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    pub filename: String,
    pub subfolder: String,
    #[serde(rename = "type")]
    pub kind: String,
}

/// `GET /features`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Features {
    pub supports_preview_metadata: bool,
    pub max_upload_size: u64,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `GET /system_stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SystemStats {
    pub system: System,
    pub devices: Vec<Device>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct System {
    pub os: String,
    pub ram_total: u64,
    pub ram_free: u64,
    pub comfyui_version: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub index: Option<u64>,
    pub vram_total: u64,
    pub vram_free: u64,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `GET /object_info`: node class specs by class type.
pub type ObjectInfo = IndexMap<String, Value>;
