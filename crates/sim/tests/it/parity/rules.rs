//! Rule tests: graphs that no capture contains, checked against the ordering and scoping
//! rules of PROTOCOL.md sections 4-6 directly (node ids and extra nodes, two outputs, a
//! partly invalid graph, no client_id, `front: true`, deleting a pending prompt).

use super::bench::{
    empty_image, expect_frames, invert, preview, previewed, save, saved, sleep_node, Bench, Expect,
    FRAME_DEADLINE,
};
use super::normalize::norm;
use super::{SERVER_MADE_ID, STRING_LIST};
use crate::support::{wait_settled, FrameBody, SocketLog};
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// Node ids other than 1..4, an extra node, and a graph listed out of execution order:
/// the run follows the links, and every frame is shaped as in section 5.a.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_other_node_ids_and_an_extra_node() {
    let mut bench = Bench::start().await;
    let (x, _) = bench.connect(true).await;
    let client = bench.clients[0].clone();
    let graph = json!({
        "40": save("35"),
        "30": invert("20"),
        "10": empty_image(1234),
        "35": invert("30"),
        "20": sleep_node("10", 0.4, 2, 7),
    });
    bench
        .submit(json!({ "prompt": graph, "client_id": client }))
        .await;
    bench.until_end(&x, 0).await;

    let mut expect = Expect::new();
    expect.connected("C1").status(1).status(1);
    expect
        .begin("P1", true, &[])
        .plain("10")
        .sleep("20", 2, false)
        .plain("30")
        .plain("35");
    expect
        .output("40", saved("gantry_rules_<F1>_.png"))
        .success(0);
    expect_frames("other node ids", &expect.build(), &bench.frames(&x));

    let id = bench.prompts[0].clone();
    let entry = &bench.get(&format!("/history/{id}")).await[&id];
    assert_eq!(entry["prompt"][4], json!(["40"]), "outputs to execute");
    assert_eq!(
        entry["outputs"]
            .as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>()),
        Some(vec!["40".to_string()])
    );
    assert_eq!(
        entry["meta"],
        json!({ "40": { "node_id": "40", "display_node": "40", "parent_node": null, "real_node_id": "40" } })
    );
    let kinds: Vec<&Value> = entry["status"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m[0])
        .collect();
    assert_eq!(
        kinds,
        ["execution_start", "execution_cached", "execution_success"]
    );
    assert_eq!(entry["status"]["status_str"], "success");
    assert_eq!(entry["status"]["completed"], true);
    bench.stop().await;
}

/// Two output nodes, SaveImage and PreviewImage, on one upstream node. Which output runs
/// first is the order of a Python set in ComfyUI (Rule::PythonSetOrder), so both orders are
/// accepted; everything else is exact. PreviewImage reports a temp file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_two_output_nodes() {
    let mut bench = Bench::start().await;
    let (x, _) = bench.connect(true).await;
    let client = bench.clients[0].clone();
    let graph = json!({
        "10": empty_image(4321),
        "20": sleep_node("10", 0.2, 1, 11),
        "30": save("20"),
        "40": preview("20"),
    });
    bench
        .submit(json!({ "prompt": graph, "client_id": client }))
        .await;
    bench.until_end(&x, 0).await;

    let order = |first: &str| {
        let mut expect = Expect::new();
        expect.connected("C1").status(1).status(1);
        expect
            .begin("P1", true, &[])
            .plain("10")
            .sleep("20", 1, false);
        let (save_file, preview_file) = if first == "30" {
            ("gantry_rules_<F1>_.png", "ComfyUI_temp_<rand>_<F2>_.png")
        } else {
            ("gantry_rules_<F2>_.png", "ComfyUI_temp_<rand>_<F1>_.png")
        };
        if first == "30" {
            expect
                .output("30", saved(save_file))
                .output("40", previewed(preview_file));
        } else {
            expect
                .output("40", previewed(preview_file))
                .output("30", saved(save_file));
        }
        expect.success(0);
        expect.build()
    };
    let actual = bench.frames(&x);
    let executed_first = actual
        .iter()
        .find(|f| f.v["type"] == "executed")
        .map(|f| f.v["data"]["node"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    let first = if executed_first == "40" { "40" } else { "30" };
    expect_frames("two output nodes", &order(first), &actual);

    let id = bench.prompts[0].clone();
    let entry = &bench.get(&format!("/history/{id}")).await[&id];
    let mut outputs = entry["prompt"][4].as_array().cloned().unwrap_or_default();
    outputs.sort_by_key(|v| v.to_string());
    assert_eq!(
        outputs,
        [json!("30"), json!("40")],
        "outputs to execute (a set)"
    );
    assert_eq!(entry["outputs"]["30"]["images"][0]["type"], "output");
    assert_eq!(entry["outputs"]["40"]["images"][0]["type"], "temp");
    let meta: BTreeSet<&String> = entry["meta"]
        .as_object()
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    assert_eq!(meta.into_iter().collect::<Vec<_>>(), ["30", "40"]);
    bench.stop().await;
}

/// One valid and one invalid output (section 3): 200 with node_errors for the invalid
/// one, and only the valid output's branch runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_partly_invalid_graph_runs_only_the_valid_output() {
    let mut bench = Bench::start().await;
    let (x, _) = bench.connect(true).await;
    let client = bench.clients[0].clone();
    let graph = json!({
        "10": empty_image(99),
        "20": sleep_node("10", 0.2, 1, 12),
        "40": save("20"),
        "50": save("99"),
    });
    let reply = bench
        .submit(json!({ "prompt": graph, "client_id": client }))
        .await;
    let l = bench.labels();
    let mut normalized = norm(&l, &reply);
    normalized["number"] = l.number(&reply["number"], reply["prompt_id"].as_str());
    let expected = json!({
        "prompt_id": "P1",
        "number": 0,
        "node_errors": { "50": {
            "errors": [{
                "type": "exception_during_validation",
                "message": "Exception when validating node",
                "details": "'99'",
                "extra_info": { "exception_type": "KeyError", "traceback": STRING_LIST }
            }],
            "dependent_outputs": ["50"],
            "class_type": "SaveImage"
        }}
    });
    assert_eq!(normalized, expected, "POST /prompt answer");
    bench.until_end(&x, 0).await;

    let mut expect = Expect::new();
    expect.connected("C1").status(1).status(1);
    expect
        .begin("P1", true, &[])
        .plain("10")
        .sleep("20", 1, false);
    expect
        .output("40", saved("gantry_rules_<F1>_.png"))
        .success(0);
    expect_frames("partly invalid graph", &expect.build(), &bench.frames(&x));

    let id = bench.prompts[0].clone();
    let entry = &bench.get(&format!("/history/{id}")).await[&id];
    assert_eq!(
        entry["prompt"][4],
        json!(["40"]),
        "only the valid output is executed"
    );
    assert!(entry["outputs"].get("50").is_none());
    bench.stop().await;
}

/// A prompt without client_id (section 4 scope, 5.h): every socket, whatever its clientId,
/// gets status, progress_state, progress and the previews, and no lifecycle frame at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_prompt_without_client_id_broadcasts_progress_only() {
    let mut bench = Bench::start().await;
    let (x, _) = bench.connect(true).await;
    let (y, _) = bench.connect(false).await;
    let mut graph = json!({
        "10": empty_image(555),
        "20": sleep_node("10", 0.4, 2, 13),
        "40": save("20"),
    });
    graph["20"]["inputs"]["preview"] = json!(true);
    bench.submit(json!({ "prompt": graph })).await;
    let id = bench.prompts[0].clone();
    // No end marker comes: the end is the history entry plus the status(0) on each socket.
    wait_settled(&bench.http, &bench.sim.url(), &id, FRAME_DEADLINE)
        .await
        .expect("the prompt finishes");
    for socket in [&x, &y] {
        let idle = |log: &SocketLog| {
            log.frames.iter().rev().find_map(|f| match &f.body {
                FrameBody::Text(v) if v["type"] == "status" => {
                    Some(v["data"]["status"]["exec_info"]["queue_remaining"] == 0)
                }
                _ => None,
            }) == Some(true)
                && log.frames.len() > 3
        };
        assert!(
            socket.wait_until(FRAME_DEADLINE, idle).await,
            "no final status(0)"
        );
    }

    for (name, socket, sid) in [
        ("with clientId", &x, "C1"),
        ("without clientId", &y, SERVER_MADE_ID),
    ] {
        let mut expect = Expect::new();
        expect.connected(sid).status(1).status(1);
        expect
            .begin("P1", false, &[])
            .plain("10")
            .sleep("20", 2, true);
        expect.output("40", Value::Null).success(0);
        expect_frames(
            &format!("prompt without client_id, socket {name}"),
            &expect.build(),
            &bench.frames(socket),
        );
    }
    let entry = &bench.get(&format!("/history/{id}")).await[&id];
    assert_eq!(
        entry["prompt"][3],
        json!({}),
        "extra_data without client_id"
    );
    assert!(entry["outputs"].get("40").is_some());
    bench.stop().await;
}

/// `front: true` (section 2): the prompt gets -counter and runs before an earlier-submitted
/// pending one; GET /queue lists pending prompts in run order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_front_true_jumps_the_queue() {
    let mut bench = Bench::start().await;
    let (x, _) = bench.connect(true).await;
    let client = bench.clients[0].clone();
    let graph = |seconds: f64, steps: u64, seed: u64| json!({ "10": empty_image(777), "20": sleep_node("10", seconds, steps, seed), "40": save("20") });
    bench
        .submit(json!({ "prompt": graph(2.0, 2, 1), "client_id": client }))
        .await;
    let long = bench.prompts[0].clone();
    bench
        .until(&x, "executing 20 of the long prompt", |v| {
            v["type"] == "executing" && v["data"]["node"] == "20" && v["data"]["prompt_id"] == *long
        })
        .await;
    let normal = bench
        .submit(json!({ "prompt": graph(0.2, 1, 2), "client_id": client }))
        .await;
    let front = bench
        .submit(json!({ "prompt": graph(0.2, 1, 3), "client_id": client, "front": true }))
        .await;
    let l = bench.labels();
    assert_eq!(l.number(&normal["number"], None), json!(1));
    assert_eq!(
        l.number(&front["number"], None),
        json!(-2),
        "front:true gives -counter"
    );

    let queue = bench.get("/queue").await;
    let heads = |key: &str| -> Vec<Value> {
        queue[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| {
                json!([
                    l.number(&item[0], None),
                    l.prompt(item[1].as_str().unwrap())
                ])
            })
            .collect()
    };
    assert_eq!(heads("queue_running"), [json!([0, "P1"])]);
    assert_eq!(
        heads("queue_pending"),
        [json!([-2, "P3"]), json!([1, "P2"])]
    );
    bench.until_end(&x, 1).await;

    // P1 runs, then P3 (front), then P2; P2 and P3 find EmptyImage 10 cached.
    let mut expect = Expect::new();
    expect.connected("C1").status(1).status(1);
    expect.begin("P1", true, &[]).plain("10").start_node("20");
    // The two POSTs during P1 (where they land among P1's frames is timing; only the
    // sequence of status values and the prompt boundaries are compared).
    expect.status(2).status(3);
    expect
        .step("20", 1, 2, false)
        .step("20", 2, 2, false)
        .finish_node("20");
    expect
        .output("40", saved("gantry_rules_<F1>_.png"))
        .success(2);
    expect
        .status(2)
        .begin("P3", true, &["10"])
        .sleep("20", 1, false);
    expect
        .output("40", saved("gantry_rules_<F2>_.png"))
        .success(1);
    expect
        .status(1)
        .begin("P2", true, &["10"])
        .sleep("20", 1, false);
    expect
        .output("40", saved("gantry_rules_<F3>_.png"))
        .success(0);
    expect_frames("front:true", &expect.build(), &bench.frames(&x));
    bench.stop().await;
}

/// POST /queue {delete: [pending id]} (section 5.e): 200 with an empty body, then status
/// twice, and nothing else ever mentions the deleted prompt, not even the history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_deleting_a_pending_prompt_is_silent() {
    let mut bench = Bench::start().await;
    let (x, _) = bench.connect(true).await;
    let client = bench.clients[0].clone();
    let graph = |seed: u64| json!({ "10": empty_image(888), "20": sleep_node("10", 2.0, 2, seed), "40": save("20") });
    bench
        .submit(json!({ "prompt": graph(1), "client_id": client }))
        .await;
    let long = bench.prompts[0].clone();
    bench
        .until(&x, "executing 20 of the long prompt", |v| {
            v["type"] == "executing" && v["data"]["node"] == "20" && v["data"]["prompt_id"] == *long
        })
        .await;
    bench
        .submit(json!({ "prompt": graph(2), "client_id": client }))
        .await;
    let doomed = bench.prompts[1].clone();
    let reply = bench
        .request(
            reqwest::Method::POST,
            "/queue",
            Some(&json!({ "delete": [doomed] })),
        )
        .await;
    assert_eq!(reply.status, 200);
    assert!(reply.body.is_empty(), "POST /queue answers an empty body");
    let queue = bench.get("/queue").await;
    assert_eq!(
        queue["queue_pending"],
        json!([]),
        "the deleted prompt left the queue"
    );
    bench.until_end(&x, 0).await;

    let mut expect = Expect::new();
    expect.connected("C1").status(1).status(1);
    expect.begin("P1", true, &[]).plain("10").start_node("20");
    // Enqueue of P2, then the delete's two status frames.
    expect.status(2).status(1).status(1);
    expect
        .step("20", 1, 2, false)
        .step("20", 2, 2, false)
        .finish_node("20");
    expect
        .output("40", saved("gantry_rules_<F1>_.png"))
        .success(0);
    expect_frames("queue delete", &expect.build(), &bench.frames(&x));

    assert_eq!(bench.get(&format!("/history/{doomed}")).await, json!({}));
    let history = bench.get("/history").await;
    let ids: Vec<&String> = history.as_object().unwrap().keys().collect();
    assert_eq!(ids, [&long], "only the run prompt is in the history");
    bench.stop().await;
}
