//! Whose fault a backend's "no" was: the workflow's (fail the job now), the backend's
//! (retry elsewhere), or a backend lacking something another may have (exclude it for
//! this job and route elsewhere). Pure functions over the backend's answers.

use gantry_comfy::rest::{NodeError, PromptError};
use gantry_core::{Exclusion, ExclusionReason, Failure, FailureKind, JobError, Workflow};
use indexmap::IndexMap;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};

/// Classify a rejected `POST /prompt` (a 400, or a 200 with node_errors).
///
/// `uploaded` maps the job's attachments to the names this backend was given them under:
/// a file-input node that names one of those and is still refused means the backend lost
/// what it was just sent (its fault); naming any other file it lacks means the job did
/// not attach a file it needs (the workflow's fault, never a missing model).
pub fn rejection(
    workflow: &Workflow,
    uploaded: &HashMap<String, String>,
    backend: &str,
    classes: Option<&HashSet<String>>,
    error: Option<&PromptError>,
    node_errors: &IndexMap<String, NodeError>,
) -> Failure {
    let details = json!({
        "backend": backend,
        "error": error,
        "node_errors": node_errors,
    });
    // An unknown class is `invalid_prompt` with empty node_errors: find the class.
    if node_errors.is_empty() {
        if let Some(e) = error {
            let unknown = workflow.nodes().find(|(_, class)| {
                classes.is_some_and(|known| !known.contains(*class))
                    || e.message.contains(&format!("node {class} does not exist"))
            });
            if let Some((node, class)) = unknown {
                return Failure {
                    kind: FailureKind::Missing,
                    error: JobError::new(
                        "missing_class",
                        format!("{backend} does not have node class {class} (node {node})"),
                    )
                    .with_details(details),
                    exclude: Some(ExclusionReason::MissingClass {
                        node: node.to_owned(),
                        class_type: class.to_owned(),
                    }),
                };
            }
        }
    }
    if let Some(failure) = missing_input_files(uploaded, backend, node_errors, &details) {
        return failure;
    }
    // Only missing model files: another backend may have them.
    let mut missing = Vec::new();
    let mut other = false;
    for (node, ne) in node_errors {
        for ve in &ne.errors {
            let input = ve
                .extra_info
                .get("input_name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if ve.kind == "value_not_in_list" && workflow.is_model_input(node, input) {
                let value = ve
                    .extra_info
                    .get("received_value")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .or_else(|| {
                        workflow.graph()[node]["inputs"][input]
                            .as_str()
                            .map(str::to_owned)
                    })
                    .unwrap_or_default();
                missing.push(ExclusionReason::MissingModel {
                    node: node.clone(),
                    input: input.to_owned(),
                    value,
                });
            } else {
                other = true;
            }
        }
    }
    if !missing.is_empty() && !other {
        let list: Vec<String> = missing.iter().map(ToString::to_string).collect();
        return Failure {
            kind: FailureKind::Missing,
            error: JobError::new("missing_model", format!("{backend}: {}", list.join(", ")))
                .with_details(details),
            exclude: missing.into_iter().next(),
        };
    }
    let mut message = match error {
        Some(e) => format!("{backend} rejected the workflow: {}", e.message),
        None => format!("{backend} dropped outputs that failed validation"),
    };
    for (node, ne) in node_errors {
        for ve in &ne.errors {
            message.push_str(&format!(
                "; node {node} ({}): {}: {}",
                ne.class_type, ve.message, ve.details
            ));
        }
    }
    Failure {
        kind: FailureKind::Workflow,
        error: JobError::new("rejected", message).with_details(details),
        exclude: None,
    }
}

/// The input file a `custom_validation_failed` names, from ComfyUI's
/// `"image - Invalid image file: NAME"`: (input, file).
fn invalid_file(details: &str) -> Option<(&str, &str)> {
    let (input, rest) = details.split_once(" - Invalid ")?;
    let (_, file) = rest.split_once(" file: ")?;
    Some((input, file))
}

/// When every validation error is a file input naming a file the backend lacks.
fn missing_input_files(
    uploaded: &HashMap<String, String>,
    backend: &str,
    node_errors: &IndexMap<String, NodeError>,
    details: &Value,
) -> Option<Failure> {
    let mut files = Vec::new();
    for (node, ne) in node_errors {
        for ve in &ne.errors {
            match invalid_file(&ve.details) {
                Some((input, file)) if ve.kind == "custom_validation_failed" => {
                    files.push((node.as_str(), ne.class_type.as_str(), input, file));
                }
                _ => return None,
            }
        }
    }
    if files.is_empty() {
        return None;
    }
    let sent: HashSet<&str> = uploaded.values().map(String::as_str).collect();
    let list = |fs: &[(&str, &str, &str, &str)]| {
        fs.iter()
            .map(|(node, class, input, file)| {
                format!("node {node} ({class}) input {input}: {file}")
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let (lost, missing): (Vec<_>, Vec<_>) = files
        .into_iter()
        .partition(|(_, _, _, file)| sent.contains(file));
    if missing.is_empty() {
        return Some(Failure::lost(
            JobError::new(
                "attachment_lost",
                format!(
                    "{backend} refused attachments it had just been sent: {}",
                    list(&lost)
                ),
            )
            .with_details(details.clone()),
        ));
    }
    let hint = missing
        .first()
        .map(|(node, _, input, _)| format!("{node}.{input}"))
        .unwrap_or_default();
    Some(Failure {
        kind: FailureKind::Workflow,
        error: JobError::new(
            "missing_attachment",
            format!(
                "the workflow names input files the job does not attach and {backend} does not have: {}; \
                 attach them (\"attachments\" in the request, or gantry submit --attach {hint}=PATH)",
                list(&missing)
            ),
        )
        .with_details(details.clone()),
        exclude: None,
    })
}

/// Classify a node's exception during execution. Out of memory is the backend's fault; an
/// exception is retried once on another backend, and fails the job when it repeats there.
pub fn node_exception(
    excluded: &[Exclusion],
    backend: &str,
    node: &str,
    node_type: &str,
    exception_type: &str,
    exception_message: &str,
    details: Value,
) -> Failure {
    let message = format!(
        "node {node} ({node_type}) raised {exception_type} on {backend}: {exception_message}"
    );
    let oom = exception_type.contains("OutOfMemory")
        || exception_message
            .to_ascii_lowercase()
            .contains("out of memory");
    if oom {
        return Failure {
            kind: FailureKind::Backend,
            error: JobError::new("out_of_memory", message).with_details(details),
            exclude: None,
        };
    }
    let repeated = excluded.iter().any(|e| {
        e.backend != backend
            && matches!(&e.reason, ExclusionReason::NodeFailed { exception_type: t, .. } if t == exception_type)
    });
    Failure {
        kind: if repeated {
            FailureKind::Workflow
        } else {
            FailureKind::Backend
        },
        error: JobError::new("node_error", message).with_details(details),
        exclude: Some(ExclusionReason::NodeFailed {
            node: node.to_owned(),
            exception_type: exception_type.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workflow() -> Workflow {
        Workflow::parse(&json!({
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "m.safetensors"}},
            "9": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "x"}}
        }))
        .unwrap()
    }

    fn node_errors(v: Value) -> IndexMap<String, NodeError> {
        serde_json::from_value(v).unwrap()
    }

    fn error(kind: &str, message: &str) -> PromptError {
        serde_json::from_value(
            json!({"type": kind, "message": message, "details": "", "extra_info": {}}),
        )
        .unwrap()
    }

    #[test]
    fn a_missing_model_excludes_the_backend() {
        let ne = node_errors(
            json!({"4": {"errors": [{"type": "value_not_in_list", "message": "Value not in list", "details": "ckpt_name: 'm.safetensors' not in []", "extra_info": {"input_name": "ckpt_name", "received_value": "m.safetensors", "input_config": [[]]}}], "dependent_outputs": ["9"], "class_type": "CheckpointLoaderSimple"}}),
        );
        let f = rejection(
            &workflow(),
            &HashMap::new(),
            "gpu-1",
            None,
            Some(&error(
                "prompt_outputs_failed_validation",
                "Prompt outputs failed validation",
            )),
            &ne,
        );
        assert_eq!(f.kind, FailureKind::Missing);
        assert_eq!(
            f.error.message,
            "gpu-1: model \"m.safetensors\" (node 4 input ckpt_name) not installed"
        );
        assert!(matches!(
            f.exclude,
            Some(ExclusionReason::MissingModel { .. })
        ));
    }

    #[test]
    fn other_validation_errors_fail_the_workflow() {
        let ne = node_errors(
            json!({"9": {"errors": [{"type": "required_input_missing", "message": "Required input is missing", "details": "images", "extra_info": {"input_name": "images"}}], "dependent_outputs": ["9"], "class_type": "SaveImage"}}),
        );
        let f = rejection(
            &workflow(),
            &HashMap::new(),
            "gpu-1",
            None,
            Some(&error(
                "prompt_outputs_failed_validation",
                "Prompt outputs failed validation",
            )),
            &ne,
        );
        assert_eq!(f.kind, FailureKind::Workflow);
        assert_eq!(f.error.message, "gpu-1 rejected the workflow: Prompt outputs failed validation; node 9 (SaveImage): Required input is missing: images");
        assert_eq!(
            f.error.details["node_errors"]["9"]["class_type"],
            "SaveImage"
        );
    }

    #[test]
    fn a_missing_input_file_is_a_missing_attachment_and_a_lost_upload_the_backends_fault() {
        let ne = |file: &str| {
            node_errors(
                json!({"1": {"errors": [{"type": "custom_validation_failed", "message": "Custom validation failed for node", "details": format!("image - Invalid image file: {file}"), "extra_info": {"input_name": "image"}}], "dependent_outputs": ["9"], "class_type": "LoadImage"}}),
            )
        };
        let e = error(
            "prompt_outputs_failed_validation",
            "Prompt outputs failed validation",
        );
        let f = rejection(
            &workflow(),
            &HashMap::new(),
            "gpu-1",
            None,
            Some(&e),
            &ne("face.png"),
        );
        assert_eq!(
            (f.kind, &f.error.code[..]),
            (FailureKind::Workflow, "missing_attachment")
        );
        assert!(
            f.error
                .message
                .contains("node 1 (LoadImage) input image: face.png"),
            "{}",
            f.error.message
        );
        assert!(
            f.error.message.contains("--attach 1.image=PATH"),
            "{}",
            f.error.message
        );
        assert!(
            f.exclude.is_none(),
            "not a missing model: no backend is excluded"
        );
        let sent: HashMap<String, String> =
            [("face.png".to_owned(), "gantry/0123-face.png".to_owned())].into();
        let f = rejection(
            &workflow(),
            &sent,
            "gpu-1",
            None,
            Some(&e),
            &ne("gantry/0123-face.png"),
        );
        assert_eq!(
            (f.kind, &f.error.code[..]),
            (FailureKind::Lost, "attachment_lost")
        );
    }

    #[test]
    fn an_unknown_class_is_named() {
        let known: HashSet<String> = ["SaveImage".to_owned()].into();
        let f = rejection(
            &workflow(),
            &HashMap::new(),
            "gpu-1",
            Some(&known),
            Some(&error(
                "invalid_prompt",
                "Cannot execute because node CheckpointLoaderSimple does not exist.",
            )),
            &IndexMap::new(),
        );
        assert_eq!(f.kind, FailureKind::Missing);
        assert_eq!(
            f.error.message,
            "gpu-1 does not have node class CheckpointLoaderSimple (node 4)"
        );
    }

    #[test]
    fn an_exception_is_retried_once_elsewhere() {
        let first = node_exception(
            &[],
            "a",
            "3",
            "KSampler",
            "RuntimeError",
            "boom",
            Value::Null,
        );
        assert_eq!(first.kind, FailureKind::Backend);
        let excluded = [Exclusion {
            backend: "a".into(),
            reason: first.exclude.unwrap(),
        }];
        let second = node_exception(
            &excluded,
            "b",
            "3",
            "KSampler",
            "RuntimeError",
            "boom",
            Value::Null,
        );
        assert_eq!(second.kind, FailureKind::Workflow);
        let oom = node_exception(
            &excluded,
            "b",
            "3",
            "KSampler",
            "torch.OutOfMemoryError",
            "CUDA out of memory",
            Value::Null,
        );
        assert_eq!((oom.kind, oom.exclude), (FailureKind::Backend, None));
    }
}
