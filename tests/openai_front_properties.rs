//! Properties of the OpenAI front end's rendering: any Anthropic answer, streamed with its text
//! cut into any deltas and its events grouped into any batches, reassembles (as the official SDK's
//! accumulators do) into what the non-streaming rendering of the same answer says, for Chat
//! Completions and for the Responses API.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use claude_balancer::adapter::Render;
use claude_balancer::adapter::chat::ChatContext;
use claude_balancer::adapter::chat::response::completion;
use claude_balancer::adapter::chat::stream::{ChunkState, reassemble};
use claude_balancer::adapter::responses::stream::{EventState, accumulate};
use claude_balancer::adapter::responses::{ResponsesContext, ToolKind, response};
use proptest::prelude::*;
use serde_json::{Value, json};

fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 \"\\\\\n{}:,é漢🙂]{1,40}"
}

fn block() -> impl Strategy<Value = Value> {
    prop_oneof![
        text().prop_map(|t| json!({"type": "text", "text": t})),
        (text(), "[a-zA-Z0-9]{1,20}")
            .prop_map(|(t, s)| json!({"type": "thinking", "thinking": t, "signature": s})),
        (
            prop_oneof![Just("shell"), Just("read"), Just("apply_patch")],
            proptest::collection::btree_map("[a-z]{1,6}", text(), 0..4),
        )
            .prop_map(|(name, input)| {
                json!({"type": "tool_use", "id": format!("toolu_{}", name.len()), "name": name, "input": input})
            }),
    ]
}

fn message() -> impl Strategy<Value = Value> {
    (
        proptest::collection::vec(block(), 1..6),
        prop_oneof![
            Just("end_turn"),
            Just("tool_use"),
            Just("max_tokens"),
            Just("stop_sequence")
        ],
        (0u64..10_000, 0u64..10_000, 0u64..500, 1u64..5000),
    )
        .prop_map(|(mut content, stop, (input, read, write, output))| {
            // Tool ids unique within one answer.
            for (i, b) in content.iter_mut().enumerate() {
                if b["type"] == "tool_use" {
                    b["id"] = json!(format!("toolu_{i}"));
                }
            }
            json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "up", "content": content,
                "stop_reason": stop, "stop_sequence": null,
                "usage": {"input_tokens": input, "cache_read_input_tokens": read, "cache_creation_input_tokens": write, "output_tokens": output}})
        })
}

/// Cuts `s` at the given fractions (on character boundaries) into at least one piece.
fn pieces(s: &str, cuts: &[u16]) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    let mut at: Vec<usize> = cuts
        .iter()
        .map(|c| usize::from(*c) * chars.len() / 1000)
        .filter(|i| *i > 0 && *i < chars.len())
        .collect();
    at.sort_unstable();
    at.dedup();
    let mut out = Vec::new();
    let mut last = 0;
    for i in at.into_iter().chain([chars.len()]) {
        out.push(chars[last..i].iter().collect());
        last = i;
    }
    out
}

/// The Anthropic events of `message`, each block's text, thinking, signature or input JSON cut
/// into deltas at `cuts`.
fn events(message: &Value, cuts: &[u16]) -> Vec<String> {
    let mut out = Vec::new();
    let mut ev = |name: &str, data: Value| out.push(format!("event: {name}\ndata: {data}\n\n"));
    let mut start = message.clone();
    start["content"] = json!([]);
    start["stop_reason"] = Value::Null;
    start["usage"]["output_tokens"] = json!(1);
    ev(
        "message_start",
        json!({"type": "message_start", "message": start}),
    );
    for (i, b) in message["content"].as_array().unwrap().iter().enumerate() {
        let (empty, deltas): (Value, Vec<Value>) = match b["type"].as_str().unwrap() {
            "text" => (
                json!({"type": "text", "text": ""}),
                pieces(b["text"].as_str().unwrap(), cuts)
                    .into_iter()
                    .map(|p| json!({"type": "text_delta", "text": p}))
                    .collect(),
            ),
            "thinking" => {
                let mut d: Vec<Value> = pieces(b["thinking"].as_str().unwrap(), cuts)
                    .into_iter()
                    .map(|p| json!({"type": "thinking_delta", "thinking": p}))
                    .collect();
                d.extend(
                    pieces(b["signature"].as_str().unwrap(), cuts)
                        .into_iter()
                        .map(|p| json!({"type": "signature_delta", "signature": p})),
                );
                (
                    json!({"type": "thinking", "thinking": "", "signature": ""}),
                    d,
                )
            }
            _ => {
                let mut e = b.clone();
                e["input"] = json!({});
                (
                    e,
                    pieces(&b["input"].to_string(), cuts)
                        .into_iter()
                        .map(|p| json!({"type": "input_json_delta", "partial_json": p}))
                        .collect(),
                )
            }
        };
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": i, "content_block": empty}),
        );
        for d in deltas {
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": i, "delta": d}),
            );
        }
        ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": i}),
        );
    }
    ev(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": message["stop_reason"]}, "usage": {"output_tokens": message["usage"]["output_tokens"]}}),
    );
    ev("message_stop", json!({"type": "message_stop"}));
    out
}

/// The events grouped into batches of the given sizes (what one relayed item may hold).
fn batches(events: &[String], sizes: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    let mut k = 0;
    while i < events.len() {
        let n = usize::from(sizes.get(k).copied().unwrap_or(1)).max(1);
        out.push(events[i..(i + n).min(events.len())].concat());
        i += n;
        k += 1;
    }
    out
}

fn responses_ctx() -> ResponsesContext {
    ResponsesContext {
        model: "asked".into(),
        echo: json!({}),
        tools: vec![("apply_patch".into(), ToolKind::Custom)],
    }
}

fn without_ids(items: &[Value]) -> Vec<Value> {
    items
        .iter()
        .map(|i| {
            let mut i = i.clone();
            i.as_object_mut().map(|o| o.remove("id"));
            i
        })
        .collect()
}

/// `null` and `""` say the same of a message's text (OpenAI streams `""` first either way).
fn text_of(v: &Value) -> String {
    v.as_str().unwrap_or("").to_owned()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn chat_chunks_reassemble_to_the_non_streaming_completion(
        m in message(),
        cuts in proptest::collection::vec(0u16..1000, 0..6),
        sizes in proptest::collection::vec(1u8..6, 0..40),
    ) {
        let ctx = ChatContext { model: "asked".into(), include_usage: true };
        let mut state = ChunkState::new(ctx.clone(), "chatcmpl-1".into(), 3);
        for batch in batches(&events(&m, &cuts), &sizes) {
            state.push_sse(batch.as_bytes());
        }
        state.end();
        let r = reassemble(&state.take()).map_err(TestCaseError::fail)?;
        let whole = completion(&m, &ctx, "chatcmpl-1", 3);
        let want = &whole["choices"][0]["message"];
        prop_assert_eq!(text_of(&r["message"]["content"]), text_of(&want["content"]));
        prop_assert_eq!(&r["message"]["reasoning_content"], &want["reasoning_content"]);
        prop_assert_eq!(&r["message"]["tool_calls"], &want["tool_calls"]);
        prop_assert_eq!(&r["finish_reason"], &whole["choices"][0]["finish_reason"]);
        prop_assert_eq!(&r["usage"], &whole["usage"]);
    }

    #[test]
    fn responses_events_accumulate_to_the_non_streaming_response(
        m in message(),
        cuts in proptest::collection::vec(0u16..1000, 0..6),
        sizes in proptest::collection::vec(1u8..6, 0..40),
    ) {
        let ctx = responses_ctx();
        let mut state = EventState::new(ctx.clone(), "resp_1".into(), 3);
        for batch in batches(&events(&m, &cuts), &sizes) {
            state.push_sse(batch.as_bytes());
        }
        state.end();
        let (r, _) = accumulate(&state.take()).map_err(TestCaseError::fail)?;
        let whole = response(&m, &ctx, "resp_1", 3);
        prop_assert_eq!(without_ids(r["output"].as_array().unwrap()), without_ids(whole["output"].as_array().unwrap()));
        prop_assert_eq!(&r["usage"], &whole["usage"]);
        prop_assert_eq!(&r["status"], &whole["status"]);
        prop_assert_eq!(&r["incomplete_details"], &whole["incomplete_details"]);
    }
}
