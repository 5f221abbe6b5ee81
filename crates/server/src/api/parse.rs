//! A submit's body parsed and checked at the edge into a `JobSpec` (workflow, command,
//! attachments), every refusal naming the field or node at fault.

use gantry_core::{JobSpec, Timeouts, Workflow, MAX_LIMIT_MS};
use serde_json::{json, Map, Value};

use gantry_api as wire;

use crate::engine::Engine;

use super::error::*;

/// The body's fields, from the type the document describes it with.
pub(crate) const SUBMIT_FIELDS: &[&str] = wire::SubmitRequest::FIELDS;

pub(crate) fn parse_submit(body: &Value, default_attempts: u32) -> Result<JobSpec, ApiError> {
    let Value::Object(obj) = body else {
        return Err(ApiError::bad(
            "invalid_request",
            "the request body must be a JSON object with a \"workflow\" field",
            json!({}),
        ));
    };
    // The UI's save file posted as the whole body: say that, not "unknown field".
    if obj.get("nodes").is_some_and(Value::is_array) && obj.contains_key("links") {
        if let Err(e) = Workflow::parse(body) {
            return Err(ApiError::bad(e.code(), e.to_string(), json!({})));
        }
    }
    if let Some(unknown) = obj.keys().find(|k| !SUBMIT_FIELDS.contains(&k.as_str())) {
        let hint = if obj.contains_key("class_type")
            || obj.values().any(|v| v.get("class_type").is_some())
        {
            "; send the workflow under \"workflow\": {\"workflow\": {...}}"
        } else {
            ""
        };
        return Err(ApiError::bad(
            "unknown_field",
            format!(
                "unknown field {unknown:?}; the fields are {}{hint}",
                SUBMIT_FIELDS.join(", ")
            ),
            json!({"field": unknown}),
        ));
    }
    let field_err = |field: &str, message: String| {
        ApiError::bad(
            "invalid_field",
            format!("{field}: {message}"),
            json!({"field": field}),
        )
    };
    let kind = match obj.get("kind") {
        None | Some(Value::Null) => wire::JobKind::Workflow,
        Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
            field_err(
                "kind",
                format!("must be \"workflow\" or \"command\", got {v}"),
            )
        })?,
    };
    let (workflow, command) = match kind {
        wire::JobKind::Workflow => {
            if obj.contains_key("command") {
                return Err(field_err(
                    "command",
                    "is for a job of kind \"command\"; add \"kind\": \"command\" (and no workflow)"
                        .into(),
                ));
            }
            let workflow_value = obj.get("workflow").ok_or_else(|| {
                ApiError::bad(
                    "missing_field",
                    "the request has no \"workflow\" field (an API-format ComfyUI workflow)",
                    json!({"field": "workflow"}),
                )
            })?;
            let workflow = Workflow::parse(workflow_value).map_err(|e| {
                let mut details = json!({"field": "workflow"});
                if let Some(node) = e.node() {
                    details["node"] = json!(node);
                }
                ApiError::bad(e.code(), e.to_string(), details)
            })?;
            (workflow, None)
        }
        wire::JobKind::Command => {
            for field in ["workflow", "attachments"] {
                if obj.contains_key(field) {
                    return Err(field_err(
                        field,
                        "a job of kind \"command\" runs a program, not a workflow: leave it out"
                            .into(),
                    ));
                }
            }
            let v = obj.get("command").ok_or_else(|| {
                ApiError::bad(
                    "missing_field",
                    "a job of kind \"command\" needs a \"command\" field ({\"argv\": [...]})",
                    json!({"field": "command"}),
                )
            })?;
            (Workflow::none(), Some(parse_command(v, &field_err)?))
        }
    };
    let priority = match obj.get("priority") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| field_err("priority", format!("must be a 32-bit integer, got {v}")))?,
    };
    let max_attempts = match obj.get("max_attempts") {
        None | Some(Value::Null) => default_attempts,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=100).contains(n))
            .map(|n| n as u32)
            .ok_or_else(|| {
                field_err(
                    "max_attempts",
                    format!("must be an integer from 1 to 100, got {v}"),
                )
            })?,
    };
    let tags = match obj.get("tags") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|t| match t {
                Value::String(s) if !s.is_empty() => Ok(s.clone()),
                other => Err(field_err(
                    "tags",
                    format!("must be non-empty strings, got {other}"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(v) => {
            return Err(field_err(
                "tags",
                format!("must be an array of strings, got {v}"),
            ))
        }
    };
    let timeouts: Timeouts = match obj.get("timeouts") {
        None | Some(Value::Null) => Timeouts::default(),
        Some(v) => {
            serde_json::from_value(v.clone()).map_err(|e| field_err("timeouts", e.to_string()))?
        }
    };
    if let Some((field, ms)) = timeouts.over_max() {
        return Err(field_err(
            &format!("timeouts.{field}"),
            format!("must be at most {MAX_LIMIT_MS} (ten years), got {ms}"),
        ));
    }
    let idempotency_key = match obj.get("idempotency_key") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 255 => Some(s.clone()),
        Some(v) => {
            return Err(field_err(
                "idempotency_key",
                format!("must be a string of 1 to 255 bytes, got {v}"),
            ))
        }
    };
    let metadata = match obj.get("metadata") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(v) => return Err(field_err("metadata", format!("must be an object, got {v}"))),
    };
    Ok(JobSpec {
        workflow,
        priority,
        max_attempts,
        tags,
        timeouts,
        idempotency_key,
        metadata,
        owner: None,
        attachments: Vec::new(),
        callback: None,
        command,
    })
}

/// The `command` field of a command job.
pub(crate) fn parse_command(
    v: &Value,
    field_err: &dyn Fn(&str, String) -> ApiError,
) -> Result<gantry_core::CommandSpec, ApiError> {
    let req: gantry_core::CommandSpec =
        serde_json::from_value(v.clone()).map_err(|e| field_err("command", e.to_string()))?;
    let has_nul = |s: &str| s.contains('\0');
    match req.argv.first() {
        None => {
            return Err(field_err(
                "command.argv",
                "must name the program to run".into(),
            ))
        }
        Some(p) if p.is_empty() => {
            return Err(field_err(
                "command.argv",
                "argv[0] (the program) is empty".into(),
            ))
        }
        _ => {}
    }
    if let Some(i) = req.argv.iter().position(|a| has_nul(a)) {
        return Err(field_err(
            "command.argv",
            format!("argv[{i}] holds a NUL byte"),
        ));
    }
    if let Some(k) = req
        .env
        .iter()
        .find(|(k, v)| k.is_empty() || k.contains('=') || has_nul(k) || has_nul(v))
        .map(|(k, _)| k)
    {
        return Err(field_err(
            "command.env",
            format!("{k:?}: a variable's name must be non-empty, without '=' or NUL, and its value without NUL"),
        ));
    }
    if let Some(ms) = req.timeout_ms.filter(|ms| *ms > MAX_LIMIT_MS) {
        return Err(field_err(
            "command.timeout_ms",
            format!("must be at most {MAX_LIMIT_MS} (ten years), got {ms}"),
        ));
    }
    if let Some(cwd) = &req.cwd {
        if !std::path::Path::new(cwd).is_absolute() || has_nul(cwd) {
            return Err(field_err(
                "command.cwd",
                format!("{cwd:?} must be an absolute path"),
            ));
        }
    }
    Ok(req)
}

/// An attachment of a submit, checked but not yet stored.
pub(crate) enum Attaching {
    Stored(String),
    Inline(Vec<u8>),
}

/// The `attachments` field: names that the workflow uses, each once, each by hash or
/// inline. Storing and the existence check come after (`resolve_attachments`).
pub(crate) fn parse_attachments(
    value: Option<&Value>,
    workflow: &Workflow,
    max_bytes: u64,
) -> Result<Vec<(String, Attaching)>, ApiError> {
    use base64::Engine as _;
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(v) => {
            return Err(ApiError::bad(
                "invalid_field",
                format!("attachments: must be an array of {{name, sha256 | data}}, got {v}"),
                json!({"field": "attachments"}),
            ))
        }
    };
    let mut out: Vec<(String, Attaching)> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let field = format!("attachments[{i}]");
        let bad = |message: String| {
            ApiError::bad(
                "invalid_field",
                format!("{field}: {message}"),
                json!({"field": field}),
            )
        };
        let a: wire::AttachmentRequest =
            serde_json::from_value(item.clone()).map_err(|e| bad(e.to_string()))?;
        if a.name.is_empty() || a.name.len() > 255 || a.name.contains(['/', '\\']) {
            return Err(bad(format!(
                "name must be 1 to 255 bytes without / or \\, got {:?}",
                a.name
            )));
        }
        if out.iter().any(|(n, _)| *n == a.name) {
            return Err(bad(format!("name {:?} is attached twice", a.name)));
        }
        if workflow.inputs_naming(&a.name).is_empty() {
            return Err(ApiError::bad(
                "unused_attachment",
                format!(
                    "{field}: no input of the workflow names {:?}; a LoadImage-style input must \
                     have it as its value (\"image\": {:?})",
                    a.name, a.name
                ),
                json!({"field": field, "name": a.name}),
            ));
        }
        let source = match (a.sha256, a.data) {
            (Some(hash), None) => {
                let hash = hash.to_ascii_lowercase();
                if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad(format!("sha256 must be 64 hex digits, got {hash:?}")));
                }
                Attaching::Stored(hash)
            }
            (None, Some(data)) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(data.trim())
                    .map_err(|e| bad(format!("data is not base64: {e}")))?;
                if bytes.len() as u64 > max_bytes {
                    return Err(ApiError::FileTooLarge {
                        message: format!(
                            "{field}: {:?} is {} bytes, over the limit of {max_bytes} (max_attachment_bytes)",
                            a.name,
                            bytes.len()
                        ),
                        limit: max_bytes,
                    });
                }
                Attaching::Inline(bytes)
            }
            _ => return Err(bad("give exactly one of sha256 and data".into())),
        };
        out.push((a.name, source));
    }
    Ok(out)
}

/// Checks that each attachment by hash is stored here and within the size limit, and
/// stores the inline ones. Nothing about the job is written before this succeeds.
pub(crate) async fn resolve_attachments(
    engine: &Engine,
    pending: Vec<(String, Attaching)>,
) -> Result<Vec<gantry_core::Attachment>, ApiError> {
    let max = engine.config().max_attachment_bytes;
    let mut out = Vec::new();
    for (name, source) in pending {
        let (sha256, size) = match source {
            Attaching::Stored(hash) => {
                let size = match engine.attachments().size(&hash).await {
                    Some(size) => size,
                    None => {
                        return Err(ApiError::bad(
                            "missing_attachment",
                            format!(
                                "attachment {name:?}: no file {hash} here; upload it first with POST /v1/files"
                            ),
                            json!({"name": name, "sha256": hash}),
                        ))
                    }
                };
                if size > max {
                    return Err(ApiError::FileTooLarge {
                        message: format!("attachment {name:?} is {size} bytes, over the limit of {max} (max_attachment_bytes)"),
                        limit: max,
                    });
                }
                (hash, size)
            }
            Attaching::Inline(bytes) => {
                let size = bytes.len() as u64;
                let hash = engine.attachments().put(bytes.into()).await.map_err(|e| {
                    tracing::error!(error = %e, "cannot store an attachment");
                    ApiError::Unavailable(format!("cannot store attachment {name:?}: {e}"))
                })?;
                (hash, size)
            }
        };
        out.push(gantry_core::Attachment { name, sha256, size });
    }
    Ok(out)
}
