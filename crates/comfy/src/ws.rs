//! WebSocket messages of a ComfyUI server (PROTOCOL.md section 4).
//!
//! Text frames are `{"type": T, "data": {...}}` and parse into [`ServerMessage`]; binary
//! frames start with a big-endian u32 event type and parse into [`BinaryMessage`]. Field
//! order in every struct is the real server's, so what the simulator sends reads the same.

use bytes::{BufMut, Bytes, BytesMut};
use indexmap::IndexMap;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

/// A text frame from the server.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    Status(Status),
    ExecutionStart(ExecutionStart),
    ExecutionCached(ExecutionCached),
    Executing(Executing),
    Executed(Executed),
    Progress(Progress),
    ProgressState(ProgressState),
    ExecutionSuccess(ExecutionSuccess),
    ExecutionError(ExecutionError),
    ExecutionInterrupted(ExecutionInterrupted),
    FeatureFlags(Map<String, Value>),
    /// A message type this crate does not know, kept whole.
    Unknown {
        kind: String,
        data: Value,
    },
}

/// Why a frame could not be read as a message at all.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("frame is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("frame has no string \"type\"")]
    NoType,
    #[error("{kind} message: {source}")]
    Data {
        kind: String,
        source: serde_json::Error,
    },
    #[error("binary frame shorter than its header ({0} bytes)")]
    ShortBinary(usize),
}

fn data<T: DeserializeOwned>(kind: &str, data: Value) -> Result<T, ParseError> {
    serde_json::from_value(data).map_err(|source| ParseError::Data {
        kind: kind.to_string(),
        source,
    })
}

impl ServerMessage {
    /// Parses a text frame. An unknown `type` is not an error; a known type whose data
    /// lacks a required field is.
    pub fn parse(text: &str) -> Result<ServerMessage, ParseError> {
        let mut envelope: Map<String, Value> = serde_json::from_str(text)?;
        let kind = match envelope.remove("type") {
            Some(Value::String(s)) => s,
            _ => return Err(ParseError::NoType),
        };
        let payload = envelope.remove("data").unwrap_or(Value::Null);
        Self::from_parts(kind, payload)
    }

    /// Builds a message from its type and data.
    pub fn from_parts(kind: String, payload: Value) -> Result<ServerMessage, ParseError> {
        let k = kind.as_str();
        Ok(match k {
            "status" => ServerMessage::Status(data(k, payload)?),
            "execution_start" => ServerMessage::ExecutionStart(data(k, payload)?),
            "execution_cached" => ServerMessage::ExecutionCached(data(k, payload)?),
            "executing" => ServerMessage::Executing(data(k, payload)?),
            "executed" => ServerMessage::Executed(data(k, payload)?),
            "progress" => ServerMessage::Progress(data(k, payload)?),
            "progress_state" => ServerMessage::ProgressState(data(k, payload)?),
            "execution_success" => ServerMessage::ExecutionSuccess(data(k, payload)?),
            "execution_error" => ServerMessage::ExecutionError(data(k, payload)?),
            "execution_interrupted" => ServerMessage::ExecutionInterrupted(data(k, payload)?),
            "feature_flags" => ServerMessage::FeatureFlags(data(k, payload)?),
            _ => ServerMessage::Unknown {
                kind,
                data: payload,
            },
        })
    }

    /// The wire name of the message type.
    pub fn kind(&self) -> &str {
        match self {
            ServerMessage::Status(_) => "status",
            ServerMessage::ExecutionStart(_) => "execution_start",
            ServerMessage::ExecutionCached(_) => "execution_cached",
            ServerMessage::Executing(_) => "executing",
            ServerMessage::Executed(_) => "executed",
            ServerMessage::Progress(_) => "progress",
            ServerMessage::ProgressState(_) => "progress_state",
            ServerMessage::ExecutionSuccess(_) => "execution_success",
            ServerMessage::ExecutionError(_) => "execution_error",
            ServerMessage::ExecutionInterrupted(_) => "execution_interrupted",
            ServerMessage::FeatureFlags(_) => "feature_flags",
            ServerMessage::Unknown { kind, .. } => kind,
        }
    }

    /// The message's `data` as JSON.
    pub fn data(&self) -> Value {
        fn to<T: Serialize>(v: &T) -> Value {
            // Serializing these plain structs cannot fail: no map has non-string keys.
            serde_json::to_value(v).unwrap_or(Value::Null)
        }
        match self {
            ServerMessage::Status(d) => to(d),
            ServerMessage::ExecutionStart(d) => to(d),
            ServerMessage::ExecutionCached(d) => to(d),
            ServerMessage::Executing(d) => to(d),
            ServerMessage::Executed(d) => to(d),
            ServerMessage::Progress(d) => to(d),
            ServerMessage::ProgressState(d) => to(d),
            ServerMessage::ExecutionSuccess(d) => to(d),
            ServerMessage::ExecutionError(d) => to(d),
            ServerMessage::ExecutionInterrupted(d) => to(d),
            ServerMessage::FeatureFlags(d) => Value::Object(d.clone()),
            ServerMessage::Unknown { data, .. } => data.clone(),
        }
    }

    /// The whole frame as JSON: `{"type", "data"}`.
    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("type".into(), Value::String(self.kind().to_string()));
        m.insert("data".into(), self.data());
        Value::Object(m)
    }

    /// The frame's text, as the server sends it.
    pub fn to_text(&self) -> String {
        self.to_value().to_string()
    }

    /// The prompt this message is about, when it names one.
    pub fn prompt_id(&self) -> Option<&str> {
        match self {
            ServerMessage::Status(_) | ServerMessage::FeatureFlags(_) => None,
            ServerMessage::ExecutionStart(d) => Some(&d.prompt_id),
            ServerMessage::ExecutionCached(d) => Some(&d.prompt_id),
            ServerMessage::Executing(d) => d.prompt_id.as_deref(),
            ServerMessage::Executed(d) => Some(&d.prompt_id),
            ServerMessage::Progress(d) => Some(&d.prompt_id),
            ServerMessage::ProgressState(d) => Some(&d.prompt_id),
            ServerMessage::ExecutionSuccess(d) => Some(&d.prompt_id),
            ServerMessage::ExecutionError(d) => Some(&d.prompt_id),
            ServerMessage::ExecutionInterrupted(d) => Some(&d.prompt_id),
            ServerMessage::Unknown { data, .. } => data.get("prompt_id").and_then(Value::as_str),
        }
    }

    /// True for the `executing {node: null}` frame, the last one of every prompt.
    pub fn is_end_marker(&self) -> bool {
        matches!(self, ServerMessage::Executing(e) if e.node.is_none())
    }
}

/// `status`: the server-wide queue size; `sid` only on the first frame of a socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub status: StatusBody,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusBody {
    pub exec_info: crate::rest::ExecInfo,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Status {
    pub fn queue_remaining(&self) -> u64 {
        self.status.exec_info.queue_remaining
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionStart {
    pub prompt_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<i64>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionCached {
    pub nodes: Vec<String>,
    pub prompt_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<i64>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `executing`: a node started; `node: null` ends the prompt. The late-join frame sent on
/// connect has neither `display_node` nor `prompt_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Executing {
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_id: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `executed`: a node with UI output finished (or came from cache).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Executed {
    pub node: String,
    pub display_node: String,
    pub output: Value,
    pub prompt_id: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `progress`: a node's own step counter. `value`/`max` keep their JSON form (ints from
/// ProgressBar, floats elsewhere).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub value: Number,
    pub max: Number,
    pub prompt_id: String,
    pub node: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `progress_state`: a cumulative snapshot of every node that has started in the prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressState {
    pub prompt_id: String,
    pub nodes: IndexMap<String, NodeProgress>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeProgress {
    pub value: Number,
    pub max: Number,
    /// `running` or `finished` (the server defines `pending` and `error` but does not send them).
    pub state: String,
    pub node_id: String,
    pub prompt_id: String,
    pub display_node_id: Option<String>,
    pub parent_node_id: Option<String>,
    pub real_node_id: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionSuccess {
    pub prompt_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<i64>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionError {
    pub prompt_id: String,
    pub node_id: String,
    pub node_type: String,
    pub executed: Vec<String>,
    pub exception_message: String,
    pub exception_type: String,
    pub traceback: Vec<String>,
    pub current_inputs: Value,
    pub current_outputs: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<i64>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionInterrupted {
    pub prompt_id: String,
    pub node_id: String,
    pub node_type: String,
    pub executed: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<i64>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Binary event types.
pub const PREVIEW_IMAGE: u32 = 1;
pub const UNENCODED_PREVIEW_IMAGE: u32 = 2;
pub const TEXT: u32 = 3;
pub const PREVIEW_IMAGE_WITH_METADATA: u32 = 4;

/// Image formats of a type-1 preview.
pub const FORMAT_JPEG: u32 = 1;
pub const FORMAT_PNG: u32 = 2;

/// A binary frame from the server.
#[derive(Debug, Clone, PartialEq)]
pub enum BinaryMessage {
    /// Type 1: `u32 format` (1 JPEG, 2 PNG), then the image.
    PreviewImage { format: u32, image: Bytes },
    /// Type 3: `u32 node-id length`, the node id, then UTF-8 progress text.
    Text { node_id: String, text: String },
    /// Type 4: `u32 metadata length`, metadata JSON, then the image.
    PreviewImageWithMetadata { metadata: Value, image: Bytes },
    /// Any other event type, or a frame whose body does not fit its type, kept whole.
    Unknown { event_type: u32, payload: Bytes },
}

impl BinaryMessage {
    /// Parses a binary frame. Only a frame shorter than the 4-byte event type is an error.
    pub fn parse(frame: &[u8]) -> Result<BinaryMessage, ParseError> {
        let (head, body) = split_u32(frame).ok_or(ParseError::ShortBinary(frame.len()))?;
        let unknown = || BinaryMessage::Unknown {
            event_type: head,
            payload: Bytes::copy_from_slice(body),
        };
        Ok(match head {
            PREVIEW_IMAGE => match split_u32(body) {
                Some((format, image)) => BinaryMessage::PreviewImage {
                    format,
                    image: Bytes::copy_from_slice(image),
                },
                None => unknown(),
            },
            TEXT => match split_prefixed(body) {
                Some((node, text)) => {
                    match (std::str::from_utf8(node), std::str::from_utf8(text)) {
                        (Ok(node_id), Ok(text)) => BinaryMessage::Text {
                            node_id: node_id.to_string(),
                            text: text.to_string(),
                        },
                        _ => unknown(),
                    }
                }
                None => unknown(),
            },
            PREVIEW_IMAGE_WITH_METADATA => match split_prefixed(body) {
                Some((meta, image)) => match serde_json::from_slice(meta) {
                    Ok(metadata) => BinaryMessage::PreviewImageWithMetadata {
                        metadata,
                        image: Bytes::copy_from_slice(image),
                    },
                    Err(_) => unknown(),
                },
                None => unknown(),
            },
            _ => unknown(),
        })
    }

    pub fn event_type(&self) -> u32 {
        match self {
            BinaryMessage::PreviewImage { .. } => PREVIEW_IMAGE,
            BinaryMessage::Text { .. } => TEXT,
            BinaryMessage::PreviewImageWithMetadata { .. } => PREVIEW_IMAGE_WITH_METADATA,
            BinaryMessage::Unknown { event_type, .. } => *event_type,
        }
    }

    /// The frame's bytes, as the server sends them.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        out.put_u32(self.event_type());
        match self {
            BinaryMessage::PreviewImage { format, image } => {
                out.put_u32(*format);
                out.put_slice(image);
            }
            BinaryMessage::Text { node_id, text } => {
                out.put_u32(node_id.len() as u32);
                out.put_slice(node_id.as_bytes());
                out.put_slice(text.as_bytes());
            }
            BinaryMessage::PreviewImageWithMetadata { metadata, image } => {
                let meta = metadata.to_string();
                out.put_u32(meta.len() as u32);
                out.put_slice(meta.as_bytes());
                out.put_slice(image);
            }
            BinaryMessage::Unknown { payload, .. } => out.put_slice(payload),
        }
        out.freeze()
    }

    /// The prompt a type-4 preview names; other frames name none.
    pub fn prompt_id(&self) -> Option<&str> {
        match self {
            BinaryMessage::PreviewImageWithMetadata { metadata, .. } => {
                metadata.get("prompt_id").and_then(Value::as_str)
            }
            _ => None,
        }
    }
}

fn split_u32(b: &[u8]) -> Option<(u32, &[u8])> {
    let head: [u8; 4] = b.get(..4)?.try_into().ok()?;
    Some((u32::from_be_bytes(head), &b[4..]))
}

fn split_prefixed(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = split_u32(b)?;
    let len = usize::try_from(len).ok()?;
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// The first text frame a client may send: asks for type-4 previews.
pub fn feature_flags_request() -> String {
    serde_json::json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}})
        .to_string()
}
