//! Comparing a replay with its capture, socket by socket: each prompt's frames, the status
//! frames, the frames at prompt boundaries and how the socket ended; mismatches are
//! collected in a `Report` with line diffs of the normalized sequences.

use super::answers::compare_exchange;
use super::normalize::{attribute, frame_type, Labels, NFrame, RawFrame};
use super::replay::Replayed;
use super::script::{is_post_prompt, Script};
use super::Rule;
use crate::support::{Event, SocketEnd, SocketLog};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::fmt::Write as _;

/// Collected mismatches of one scenario.
pub(super) struct Report {
    pub(super) scenario: String,
    pub(super) mismatches: Vec<String>,
    pub(super) rules: BTreeSet<String>,
    pub(super) diagnostics: Vec<String>,
}

impl Report {
    pub(super) fn new(scenario: &str) -> Report {
        Report {
            scenario: scenario.to_string(),
            mismatches: Vec::new(),
            rules: BTreeSet::new(),
            diagnostics: Vec::new(),
        }
    }

    pub(super) fn mismatch(&mut self, what: String) {
        self.mismatches.push(what);
    }

    pub(super) fn rule(&mut self, rule: Rule, context: &str) {
        self.rules.insert(format!("{rule:?}: {context}"));
    }

    pub(super) fn check_eq(&mut self, what: &str, captured: &Value, sim: &Value) {
        if captured != sim {
            self.mismatch(format!(
                "{what}\n    capture:   {}\n    simulator: {}\n{}",
                compact(captured),
                compact(sim),
                differences(captured, sim)
            ));
        }
    }

    pub(super) fn check_seq(&mut self, what: &str, captured: &[Value], sim: &[Value]) {
        if captured != sim {
            self.mismatch(format!("{what}\n{}", diff(captured, sim)));
        }
    }

    pub(super) fn finish(self) {
        let mut text = String::new();
        if !self.rules.is_empty() {
            let _ = writeln!(text, "named exceptions used:");
            for r in &self.rules {
                let _ = writeln!(text, "  - {r}");
            }
        }
        if !self.diagnostics.is_empty() {
            let _ = writeln!(text, "diagnostics:");
            for d in &self.diagnostics {
                let _ = writeln!(text, "  - {d}");
            }
        }
        if self.mismatches.is_empty() {
            println!(
                "{}: the simulator matches the capture\n{text}",
                self.scenario
            );
            return;
        }
        let mut head = format!(
            "{}: the simulator differs from the capture in {} place(s) (values normalized: \
             P<n> prompt ids, C<n> client ids, <F<n>> file names, queue numbers relative to the \
             scenario's first)\n",
            self.scenario,
            self.mismatches.len()
        );
        for (i, m) in self.mismatches.iter().enumerate() {
            let _ = writeln!(head, "\n{}) {m}", i + 1);
        }
        panic!("{head}\n{text}");
    }
}

pub(super) fn compact(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// A line diff of two normalized sequences (longest common subsequence), with runs of
/// more than `2 * DIFF_CONTEXT` equal frames collapsed.
pub(super) fn diff(captured: &[Value], sim: &[Value]) -> String {
    const DIFF_CONTEXT: usize = 3;
    let a: Vec<String> = captured.iter().map(compact).collect();
    let b: Vec<String> = sim.iter().map(compact).collect();
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    // (marker, line): ' ' both, '-' capture only, '+' simulator only.
    let mut lines: Vec<(char, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            lines.push((' ', &a[i]));
            i += 1;
            j += 1;
        } else if j >= b.len() || (i < a.len() && lcs[i + 1][j] >= lcs[i][j + 1]) {
            lines.push(('-', &a[i]));
            i += 1;
        } else {
            lines.push(('+', &b[j]));
            j += 1;
        }
    }
    let changed: Vec<usize> = (0..lines.len()).filter(|&k| lines[k].0 != ' ').collect();
    let near_change = |k: usize| changed.iter().any(|&c| c.abs_diff(k) <= DIFF_CONTEXT);
    let mut out = format!(
        "    (- only in the capture, + only in the simulator; {} frames vs {})\n",
        a.len(),
        b.len()
    );
    let mut skipped = 0;
    for (k, (marker, line)) in lines.iter().enumerate() {
        if *marker == ' ' && !near_change(k) {
            skipped += 1;
            continue;
        }
        if skipped > 0 {
            let _ = writeln!(out, "      ... {skipped} equal frame(s)");
            skipped = 0;
        }
        let _ = writeln!(out, "    {marker} {line}");
    }
    if skipped > 0 {
        let _ = writeln!(out, "      ... {skipped} equal frame(s)");
    }
    out
}

/// Where two JSON values differ, as `/path: capture vs simulator` lines (at most 12).
pub(super) fn differences(captured: &Value, sim: &Value) -> String {
    fn walk(path: String, a: &Value, b: &Value, out: &mut Vec<String>) {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    match (x.get(k), y.get(k)) {
                        (Some(p), Some(q)) => walk(format!("{path}/{k}"), p, q, out),
                        (p, q) => out.push(format!("{path}/{k}: {p:?} vs {q:?}")),
                    }
                }
            }
            (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
                for (n, (p, q)) in x.iter().zip(y).enumerate() {
                    walk(format!("{path}/{n}"), p, q, out);
                }
            }
            _ if a != b => out.push(format!(
                "{}: {} vs {}",
                if path.is_empty() { "/" } else { &path },
                compact(a),
                compact(b)
            )),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(String::new(), captured, sim, &mut out);
    let more = out.len().saturating_sub(12);
    out.truncate(12);
    let mut text: String = out.iter().map(|l| format!("    at {l}\n")).collect();
    if more > 0 {
        let _ = writeln!(text, "    ... and {more} more");
    }
    text
}

/// Builds both sides' labels and compares everything a replay recorded.
pub(super) fn compare(script: &Script, run: &Replayed) -> Report {
    let title = script
        .cap
        .meta
        .get("title")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut report = Report::new(&format!("{} ({title})", script.name()));
    report.mismatches.extend(run.problems.iter().cloned());
    report.diagnostics.extend(run.diagnostics.iter().cloned());
    let (cap, sim) = labels(script, run);
    if !run.earlier.is_empty() {
        let labels: Vec<Value> = run.earlier.iter().map(|id| cap.prompt(id)).collect();
        report.diagnostics.push(format!(
            "prompts {} of earlier scenarios were re-created before the replay",
            compact(&json!(labels))
        ));
    }
    compare_sockets(&mut report, script, run, &cap, &sim);
    for (index, outcome) in &run.exchanges {
        compare_exchange(&mut report, script, run, *index, outcome, &cap, &sim);
    }
    let used = cap
        .used
        .borrow()
        .union(&sim.used.borrow())
        .copied()
        .collect::<Vec<_>>();
    for rule in used {
        report.rule(rule, "in normalization");
    }
    report
}

/// Every socket of the capture against the simulator's socket of the same name.
pub(super) fn compare_sockets(
    report: &mut Report,
    script: &Script,
    run: &Replayed,
    cap: &Labels,
    sim: &Labels,
) {
    for ws in script.socket_names() {
        let captured: Vec<Value> = script
            .cap
            .events
            .iter()
            .filter(|e| e.is_received_frame() && e.ws.as_deref() == Some(ws.as_str()))
            .map(|e| RawFrame::of_capture(e).normalized(cap))
            .collect();
        let log = run.logs.get(&ws).cloned().unwrap_or_default();
        let simulated: Vec<Value> = log
            .frames
            .iter()
            .map(|f| RawFrame::of_sim(&f.body).normalized(sim))
            .collect();
        let late = script.joins_late(&ws);
        compare_socket(
            report,
            &ws,
            &attribute(captured),
            &attribute(simulated),
            late,
        );
        compare_socket_end(report, script, &ws, &log);
    }
}

/// Labels for the capture's side and the simulator's.
pub(super) fn labels(script: &Script, run: &Replayed) -> (Labels, Labels) {
    let mut cap = Labels::default();
    let mut sim = Labels::default();
    for (i, id) in script.client_ids().into_iter().enumerate() {
        let label = format!("C{}", i + 1);
        cap.clients.insert(id.clone(), label.clone());
        sim.clients.insert(id, label);
    }
    // Prompts: the re-created earlier ones first, then the scenario's in submission order.
    let captured_ids = run
        .earlier
        .iter()
        .cloned()
        .chain(script.accepted_prompts().into_iter().map(|(_, id)| id));
    for id in captured_ids {
        let n = cap.prompts.len() + 1;
        cap.prompts.entry(id).or_insert_with(|| format!("P{n}"));
    }
    for (captured, simulated) in &run.prompt_map {
        if let Some(label) = cap.prompts.get(captured) {
            sim.prompts
                .entry(simulated.clone())
                .or_insert_with(|| label.clone());
        }
    }
    cap.earlier = run.earlier.iter().cloned().collect();
    sim.earlier = run
        .prompt_map
        .iter()
        .filter(|(c, _)| cap.earlier.contains(c))
        .map(|(_, s)| s.clone())
        .collect();
    cap.number_base = script
        .accepted_prompts()
        .first()
        .and_then(|(request, _)| script.response_to(*request))
        .and_then(|resp| resp.body["json"]["number"].as_i64());
    sim.number_base = run
        .exchanges
        .iter()
        .filter(|(i, _)| is_post_prompt(&script.cap.events[*i].body))
        .filter_map(|(_, o)| o.result.as_ref().ok()?.json()?["number"].as_i64())
        .next();
    (cap, sim)
}

/// Compares one socket's frames: (a) each prompt's frames, exactly and in order; (b) the
/// `status` frames (queue_remaining, and sid on the first); (c) other frames that belong
/// to no prompt (feature_flags); (d) the frames at prompt boundaries, which fix where
/// `status` goes: the frame before each `execution_start`, and the frames from each
/// terminal `execution_*` through the prompt's next frame (its end marker), or the single
/// next frame when the prompt has no more.
pub(super) fn compare_socket(
    report: &mut Report,
    ws: &str,
    captured: &[NFrame],
    sim: &[NFrame],
    joins_late: bool,
) {
    let late_prompt = joins_late
        .then(|| {
            captured
                .iter()
                .find(|f| f.v["type"] == "executing" && f.v["data"].get("prompt_id").is_none())
        })
        .flatten()
        .and_then(|f| f.prompt.clone());
    let mut prompts: Vec<String> = Vec::new();
    for f in captured.iter().chain(sim) {
        if let Some(p) = &f.prompt {
            if !prompts.contains(p) {
                prompts.push(p.clone());
            }
        }
    }
    let of = |frames: &[NFrame], p: &str| -> Vec<Value> {
        frames
            .iter()
            .filter(|f| f.prompt.as_deref() == Some(p))
            .map(|f| f.v.clone())
            .collect()
    };
    for p in &prompts {
        let (c, s) = (of(captured, p), of(sim, p));
        if c == s {
            continue;
        }
        if late_prompt.as_deref() == Some(p.as_str()) && late_join_step_race(&c, &s) {
            report.rule(
                Rule::LateJoinStepRace,
                &format!(
                    "socket {ws}, prompt {p}: {} frames in the capture, {} here",
                    c.len(),
                    s.len()
                ),
            );
            continue;
        }
        report.check_seq(
            &format!("socket {ws}: the frames of prompt {p} differ"),
            &c,
            &s,
        );
    }
    let unattributed = |frames: &[NFrame], status: bool| -> Vec<Value> {
        frames
            .iter()
            .filter(|f| f.prompt.is_none() && (frame_type(&f.v) == "status") == status)
            .map(|f| f.v.clone())
            .collect()
    };
    report.check_seq(
        &format!("socket {ws}: the status frames differ"),
        &unattributed(captured, true),
        &unattributed(sim, true),
    );
    report.check_seq(
        &format!("socket {ws}: frames outside any prompt differ"),
        &unattributed(captured, false),
        &unattributed(sim, false),
    );
    // The n-th boundary of a kind against the simulator's n-th of the same kind (a prompt
    // id can run twice: k). A boundary the simulator lacks altogether shows up in (a).
    let (cw, sw) = (boundaries(captured), boundaries(sim));
    for (i, (what, c)) in cw.iter().enumerate() {
        let nth = cw[..i].iter().filter(|(w, _)| w == what).count();
        if let Some((_, s)) = sw.iter().filter(|(w, _)| w == what).nth(nth) {
            report.check_seq(&format!("socket {ws}: {what} differ"), c, s);
        }
    }
}

/// The frames around prompt boundaries (see [`compare_socket`]), labelled.
pub(super) fn boundaries(frames: &[NFrame]) -> Vec<(String, Vec<Value>)> {
    let mut out = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let p = f.prompt.clone().unwrap_or_default();
        match frame_type(&f.v) {
            "execution_start" => {
                let before = i.checked_sub(1).map(|j| frames[j].v.clone());
                out.push((
                    format!("the frame before execution_start of {p}"),
                    before.into_iter().collect(),
                ));
            }
            t @ ("execution_success" | "execution_error" | "execution_interrupted") => {
                let rest = &frames[i + 1..];
                let end = rest
                    .iter()
                    .position(|g| g.prompt.as_deref() == Some(p.as_str()))
                    .unwrap_or(0);
                let window = rest.iter().take(end + 1).map(|g| g.v.clone()).collect();
                out.push((format!("the frames after {t} of {p}"), window));
            }
            _ => {}
        }
    }
    out
}

/// Rule::LateJoinStepRace: equal except that the simulator's late socket saw one
/// progress_state/progress pair more (the step before the capture's first) or one less.
pub(super) fn late_join_step_race(captured: &[Value], sim: &[Value]) -> bool {
    let pair_at = |s: &[Value], i: usize| {
        s.get(i).is_some_and(|v| frame_type(v) == "progress_state")
            && s.get(i + 1).is_some_and(|v| frame_type(v) == "progress")
    };
    let value = |v: &Value| v["data"]["value"].as_i64();
    if captured.first() != sim.first() || captured.is_empty() {
        return false;
    }
    let one_more = pair_at(sim, 1)
        && sim.len() >= 3
        && sim[3..] == captured[1..]
        && pair_at(captured, 1)
        && value(&sim[2])
            .zip(value(&captured[2]))
            .is_some_and(|(s, c)| s + 1 == c);
    let one_less = pair_at(captured, 1) && captured.len() >= 3 && captured[3..] == sim[1..];
    one_more || one_less
}

/// How the capture's socket ended: 1006 without a close frame when the server died, or
/// the server's answer to the client's close frame.
pub(super) fn compare_socket_end(report: &mut Report, script: &Script, ws: &str, log: &SocketLog) {
    let on_ws = |e: &&Event| e.ws.as_deref() == Some(ws);
    let died = script
        .cap
        .events
        .iter()
        .filter(on_ws)
        .any(|e| e.is("in", "ws_closed") && e.body["close_code"] == 1006);
    let answered = script
        .cap
        .events
        .iter()
        .filter(on_ws)
        .find(|e| e.kind == "ws_close_done")
        .and_then(|e| e.body["close_code"].as_u64());
    let ok = match (&log.end, died, answered) {
        (Some(SocketEnd::Abnormal(_)), true, _) => true,
        (Some(SocketEnd::CloseFrame(code)), false, Some(want)) => code.map(u64::from) == Some(want),
        (_, false, None) => true, // the capture did not record an end
        _ => false,
    };
    if !ok {
        let want = if died {
            "a drop without a close frame (1006)".to_string()
        } else {
            format!("a close frame with code {answered:?} answering the client's")
        };
        report.mismatch(format!(
            "socket {ws}: the connection ended with {:?}; the capture's ended with {want}",
            log.end
        ));
    }
}
