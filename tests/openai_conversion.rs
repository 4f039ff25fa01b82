//! Table tests for the Anthropic ⇄ OpenAI conversion (protocol.md C.2-C.16), pure functions only.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use claude_balancer::adapter::events::accumulate_sse;
use claude_balancer::adapter::ids::is_gateway_signature;
use claude_balancer::adapter::openai::request::{Unsupported, convert};
use claude_balancer::adapter::openai::response::to_message;
use claude_balancer::adapter::openai::stream::{Step, StreamState};
use claude_balancer::adapter::openai::{Options, ReplyContext};
use claude_balancer::config::Dialect;
use claude_balancer::upstream::sse::Splitter;
use claude_balancer::upstream::sse::data_payloads;
use proptest::prelude::*;
use serde_json::{Value, json};

fn opts(dialect: Dialect) -> Options {
    Options {
        dialect,
        max_tokens_cap: None,
        sanitize_schemas: false,
    }
}

fn conv(body: Value) -> Value {
    convert(&body, "up-model", false, &opts(Dialect::Generic)).unwrap()
}

fn conv_with(body: Value, o: &Options, stream: bool) -> Result<Value, Unsupported> {
    convert(&body, "up-model", stream, o)
}

fn ctx(thinking: bool) -> ReplyContext {
    ReplyContext {
        model: "claude-sonnet-4-6".into(),
        thinking,
        stop_sequences: vec!["###".into()],
        input_estimate: 5070,
    }
}

/// Feeds chunks (JSON values or raw strings) and finishes at EOF; returns the SSE text.
fn run_stream(chunks: &[Value], thinking: bool, eof_without_done: bool) -> String {
    let mut s = StreamState::new(ctx(thinking));
    s.start();
    let mut done = false;
    for c in chunks {
        let data = match c {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if s.push_data(&data) != Step::Continue {
            done = true;
            break;
        }
    }
    if !done {
        if eof_without_done {
            s.finish();
        } else {
            s.push_data("[DONE]");
        }
    }
    String::from_utf8(s.take()).unwrap()
}

fn chunk(delta: Value) -> Value {
    json!({"id":"c1","object":"chat.completion.chunk","model":"up","choices":[{"index":0,"delta":delta,"finish_reason":null}]})
}

fn finish(reason: &str) -> Value {
    json!({"id":"c1","choices":[{"index":0,"delta":{},"finish_reason":reason}]})
}

fn usage_chunk(p: u64, c: u64, cached: u64) -> Value {
    json!({"id":"c1","choices":[],"usage":{"prompt_tokens":p,"completion_tokens":c,"total_tokens":p+c,"prompt_tokens_details":{"cached_tokens":cached}}})
}

fn msg(sse: &str) -> Value {
    accumulate_sse(sse).unwrap_or_else(|e| panic!("{e}\n{sse}"))
}

// ---------------------------------------------------------------- request

#[test]
fn system_blocks_attribution_and_mid_conversation_system_are_folded() {
    let out = conv(json!({"model":"m","max_tokens":10,
        "system":[{"type":"text","text":"x-anthropic-billing-header: cc_version=2.1; cch=1;"},
                  {"type":"text","text":"You are Claude Code.","cache_control":{"type":"ephemeral"}},
                  {"type":"text","text":"Be brief."}],
        "messages":[{"role":"user","content":"hi"},
                    {"role":"system","content":[{"type":"text","text":"Mode changed."}]},
                    {"role":"user","content":"go"}]}));
    let m = out["messages"].as_array().unwrap();
    assert_eq!(
        m[0],
        json!({"role":"system","content":"You are Claude Code.\n\nBe brief.\n\nMode changed."})
    );
    assert_eq!(m[1], json!({"role":"user","content":"hi"}));
    assert_eq!(m[2], json!({"role":"user","content":"go"}));
    assert!(
        !out.to_string().contains("cache_control") && !out.to_string().contains("billing-header")
    );
    let s = conv(json!({"model":"m","system":"plain","messages":[{"role":"user","content":"x"}]}));
    assert_eq!(s["messages"][0]["content"], "plain");
}

#[test]
fn tool_results_come_first_and_images_move_to_a_user_message() {
    let out = conv(json!({"model":"m","messages":[
        {"role":"user","content":"list files"},
        {"role":"assistant","content":[{"type":"text","text":"Checking."},
            {"type":"tool_use","id":"call_a1","name":"Bash","input":{"command":"ls"}},
            {"type":"tool_use","id":"call_b2","name":"Read","input":{}}]},
        {"role":"user","content":[
            {"type":"text","text":"<system-reminder>Todo list changed</system-reminder>"},
            {"type":"tool_result","tool_use_id":"call_b2","is_error":true,"content":[{"type":"text","text":"File not found"}]},
            {"type":"tool_result","tool_use_id":"call_a1","content":[{"type":"text","text":"total 8"},
                {"type":"image","source":{"type":"base64","media_type":"image/png","data":"iVBOR"}}]},
            {"type":"image","source":{"type":"url","url":"https://example.com/x.png"}}]}]}));
    let m = out["messages"].as_array().unwrap();
    assert_eq!(m[1]["role"], "assistant");
    assert_eq!(m[1]["content"], "Checking.");
    assert_eq!(
        m[1]["tool_calls"][0],
        json!({"id":"call_a1","type":"function","function":{"name":"Bash","arguments":"{\"command\":\"ls\"}"}})
    );
    assert_eq!(m[1]["tool_calls"][1]["function"]["arguments"], "{}");
    // Tool messages directly after the calls, in call order.
    assert_eq!(
        m[2],
        json!({"role":"tool","tool_call_id":"call_a1","content":"total 8\n[image 1 attached below]"})
    );
    assert_eq!(
        m[3],
        json!({"role":"tool","tool_call_id":"call_b2","content":"[tool error] File not found"})
    );
    assert_eq!(m[4]["role"], "user");
    let parts = m[4]["content"].as_array().unwrap();
    assert_eq!(
        parts[0],
        json!({"type":"text","text":"<system-reminder>Todo list changed</system-reminder>"})
    );
    assert_eq!(
        parts[1],
        json!({"type":"image_url","image_url":{"url":"https://example.com/x.png"}})
    );
    assert_eq!(
        parts[2],
        json!({"type":"image_url","image_url":{"url":"data:image/png;base64,iVBOR"}})
    );
    assert_eq!(m.len(), 5);
}

#[test]
fn history_is_repaired_for_missing_and_orphan_results() {
    let out = conv(json!({"model":"m","messages":[
        {"role":"user","content":"a"},
        {"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"Bash","input":{"command":"x"}}]},
        {"role":"user","content":[{"type":"text","text":"never mind"},{"type":"tool_result","tool_use_id":"zzz","content":"stale"}]},
        {"role":"assistant","content":[{"type":"tool_use","id":"t2","name":"Bash","input":{}}]}]}));
    let m = out["messages"].as_array().unwrap();
    assert_eq!(
        m[2],
        json!({"role":"tool","tool_call_id":"t1","content":"[no result: tool call was interrupted]"})
    );
    assert_eq!(m[3]["content"][0]["text"], "[tool result for zzz]: stale");
    // The final assistant's open call is closed too.
    assert_eq!(m[5]["role"], "tool");
    assert_eq!(m[5]["tool_call_id"], "t2");
    let empty = conv(json!({"model":"m","messages":[
        {"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"Bash","input":{}}]},
        {"role":"user","content":[{"type":"tool_result","tool_use_id":"t1"}]}]}));
    assert_eq!(empty["messages"][1]["content"], "(no output)");
}

#[test]
fn encoded_tool_ids_are_decoded_for_the_upstream() {
    let id = claude_balancer::adapter::ids::tool_id_from_upstream(Some("functions.Bash:0"));
    let out = conv(json!({"model":"m","messages":[
        {"role":"assistant","content":[{"type":"tool_use","id":id,"name":"Bash","input":{}}]},
        {"role":"user","content":[{"type":"tool_result","tool_use_id":id,"content":"ok"}]}]}));
    assert_eq!(
        out["messages"][0]["tool_calls"][0]["id"],
        "functions.Bash:0"
    );
    assert_eq!(out["messages"][1]["tool_call_id"], "functions.Bash:0");
}

#[test]
fn thinking_history_goes_to_the_dialects_reasoning_field() {
    let body = json!({"model":"m","messages":[
        {"role":"user","content":"q"},
        {"role":"assistant","content":[{"type":"thinking","thinking":"Need the list.","signature":"gw1.x"},
            {"type":"redacted_thinking","data":"abc"},
            {"type":"tool_use","id":"c1","name":"Bash","input":{"command":"ls"}}]},
        {"role":"user","content":[{"type":"tool_result","tool_use_id":"c1","content":"a"}]},
        {"role":"assistant","content":[{"type":"tool_use","id":"c2","name":"Bash","input":{}}]},
        {"role":"user","content":[{"type":"tool_result","tool_use_id":"c2","content":"b"}]}]});
    let ds = conv_with(body.clone(), &opts(Dialect::Deepseek), false).unwrap();
    assert_eq!(ds["messages"][1]["reasoning_content"], "Need the list.");
    // DeepSeek needs the field on every tool-call turn, even empty.
    assert_eq!(ds["messages"][3]["reasoning_content"], "");
    let vllm = conv_with(body.clone(), &opts(Dialect::Vllm), false).unwrap();
    assert_eq!(vllm["messages"][1]["reasoning"], "Need the list.");
    assert!(vllm["messages"][3].get("reasoning").is_none());
    let openai = conv_with(body, &opts(Dialect::Openai), false).unwrap();
    assert!(!openai.to_string().contains("Need the list"));
}

#[test]
fn tools_schemas_and_tool_choice() {
    let body = json!({"model":"m","messages":[{"role":"user","content":"x"}],
        "tools":[{"name":"Read","description":"Read a file","cache_control":{"type":"ephemeral"},"defer_loading":false,
            "input_schema":{"$schema":"http://json-schema.org/draft-07/schema#","type":"object","additionalProperties":false,
                "properties":{"path":{"type":["string","null"],"format":"uri","propertyNames":{}},"n":{"type":"integer","exclusiveMinimum":0}},
                "required":["path"]}}],
        "tool_choice":{"type":"any","disable_parallel_tool_use":true}});
    let out = conv(body.clone());
    let f = &out["tools"][0];
    assert_eq!(f["type"], "function");
    assert_eq!(f["function"]["name"], "Read");
    assert_eq!(
        f["function"]["parameters"]["additionalProperties"], false,
        "kept unless sanitising"
    );
    assert!(f.get("cache_control").is_none() && !out.to_string().contains("defer_loading"));
    assert_eq!(out["tool_choice"], "required");
    assert_eq!(out["parallel_tool_calls"], false);
    let sanitized = conv_with(
        body,
        &Options {
            sanitize_schemas: true,
            ..opts(Dialect::Generic)
        },
        false,
    )
    .unwrap();
    let p = &sanitized["tools"][0]["function"]["parameters"];
    assert_eq!(
        p,
        &json!({"type":"object","properties":{"path":{"type":"string"},"n":{"type":"integer"}},"required":["path"]})
    );
    for (choice, want) in [
        (json!({"type":"auto"}), json!("auto")),
        (json!({"type":"none"}), json!("none")),
        (
            json!({"type":"tool","name":"Read"}),
            json!({"type":"function","function":{"name":"Read"}}),
        ),
    ] {
        let out = conv(
            json!({"model":"m","messages":[],"tools":[{"name":"Read","input_schema":{"type":"object"}}],"tool_choice":choice}),
        );
        assert_eq!(out["tool_choice"], want);
        assert!(out.get("parallel_tool_calls").is_none());
        assert!(out.get("tools").is_some(), "tools kept even for none");
    }
}

#[test]
fn server_tools_are_refused_with_the_field_named() {
    let err = conv_with(
        json!({"model":"m","messages":[{"role":"user","content":"search"}],
            "tools":[{"name":"Bash","input_schema":{"type":"object"}},{"type":"web_search_20250305","name":"web_search","max_uses":5}],
            "tool_choice":{"type":"tool","name":"web_search"}}),
        &opts(Dialect::Generic),
        false,
    )
    .unwrap_err();
    assert_eq!(err.field, "tools[1]");
    assert!(err.reason.contains("web_search"));
}

#[test]
fn sampling_limits_stream_and_dropped_fields() {
    let body = json!({"model":"claude-x","max_tokens":64000,"temperature":0.3,"top_p":0.9,"top_k":40,
        "stop_sequences":["a","b","c","d","e"],"metadata":{"user_id":"u"},"context_management":{"edits":[]},
        "cache_control":{"type":"ephemeral"},"service_tier":"auto","output_config":{"effort":"high"},
        "messages":[{"role":"user","content":"x"}]});
    let capped = Options {
        max_tokens_cap: Some(8192),
        ..opts(Dialect::Generic)
    };
    let out = conv_with(body.clone(), &capped, true).unwrap();
    assert_eq!(out["model"], "up-model");
    assert_eq!(out["max_tokens"], 8192);
    assert_eq!(out["temperature"], 0.3);
    assert_eq!(out["top_p"], 0.9);
    assert_eq!(out["top_k"], 40);
    assert_eq!(out["stop"], json!(["a", "b", "c", "d"]));
    assert_eq!(out["stream"], true);
    assert_eq!(out["stream_options"], json!({"include_usage": true}));
    for dropped in [
        "metadata",
        "context_management",
        "cache_control",
        "service_tier",
        "output_config",
        "thinking",
        "reasoning_effort",
        "user",
    ] {
        assert!(out.get(dropped).is_none(), "{dropped} leaked");
    }
    let openai = conv_with(body.clone(), &opts(Dialect::Openai), false).unwrap();
    assert_eq!(openai["max_completion_tokens"], 64000);
    assert!(
        openai.get("max_tokens").is_none()
            && openai.get("top_k").is_none()
            && openai.get("stream_options").is_none()
    );
}

#[test]
fn thinking_maps_per_dialect() {
    let enabled =
        json!({"model":"m","messages":[],"thinking":{"type":"enabled","budget_tokens":10000}});
    let adaptive = json!({"model":"m","messages":[],"thinking":{"type":"adaptive"},"output_config":{"effort":"max"}});
    let off = json!({"model":"m","messages":[],"thinking":{"type":"disabled"}});
    let o = |b: &Value, d| conv_with(b.clone(), &opts(d), false).unwrap();
    assert_eq!(
        o(&enabled, Dialect::Openrouter)["reasoning"],
        json!({"max_tokens":10000})
    );
    assert_eq!(
        o(&adaptive, Dialect::Openrouter)["reasoning"],
        json!({"effort":"xhigh"})
    );
    assert!(o(&off, Dialect::Openrouter).get("reasoning").is_none());
    assert_eq!(
        o(&enabled, Dialect::Deepseek)["thinking"],
        json!({"type":"enabled"})
    );
    assert_eq!(o(&enabled, Dialect::Deepseek)["reasoning_effort"], "medium");
    assert_eq!(
        o(&off, Dialect::Deepseek)["thinking"],
        json!({"type":"disabled"})
    );
    assert_eq!(o(&adaptive, Dialect::Openai)["reasoning_effort"], "high");
    assert_eq!(o(&enabled, Dialect::Generic)["reasoning_effort"], "medium");
    assert!(
        o(&adaptive, Dialect::Generic)
            .get("reasoning_effort")
            .is_none()
    );
    let fmt = conv(
        json!({"model":"m","messages":[],"output_config":{"format":{"type":"json_schema","schema":{"type":"object"}}}}),
    );
    assert_eq!(fmt["response_format"]["type"], "json_schema");
    assert_eq!(
        fmt["response_format"]["json_schema"]["schema"],
        json!({"type":"object"})
    );
}

#[test]
fn documents_become_files_or_text() {
    let out = conv(json!({"model":"m","messages":[{"role":"user","content":[
        {"type":"document","title":"spec.pdf","source":{"type":"base64","media_type":"application/pdf","data":"JVBER"}},
        {"type":"document","title":"notes","source":{"type":"text","media_type":"text/plain","data":"hello"}},
        {"type":"text","text":"   "}]}]}));
    let parts = out["messages"][0]["content"].as_array().unwrap();
    assert_eq!(
        parts[0],
        json!({"type":"file","file":{"filename":"spec.pdf","file_data":"data:application/pdf;base64,JVBER"}})
    );
    assert_eq!(parts[1], json!({"type":"text","text":"notes\n\nhello"}));
    assert_eq!(parts.len(), 2, "whitespace-only text is skipped");
}

// ---------------------------------------------------------------- non-streaming response

#[test]
fn a_complete_answer_becomes_a_message() {
    let answer = json!({"id":"chatcmpl-1","model":"deepseek-v4-pro","choices":[{"index":0,"finish_reason":"stop",
        "message":{"role":"assistant","content":"I'll read it.","reasoning_content":"User wants the file.",
            "tool_calls":[{"id":"call_0","type":"function","function":{"name":"Read","arguments":"{\"file_path\":\"a.py\"}"}},
                          {"id":"functions.Bash:1","type":"function","function":{"name":"Bash","arguments":""}},
                          {"id":"x","type":"function","function":{"name":"","arguments":"{}"}}]}}],
        "usage":{"prompt_tokens":5120,"completion_tokens":61,"prompt_tokens_details":{"cached_tokens":4096}}});
    let m = to_message(&answer, &ctx(true)).unwrap();
    assert_eq!(m["model"], "claude-sonnet-4-6");
    assert!(m["id"].as_str().unwrap().starts_with("msg_"));
    let c = m["content"].as_array().unwrap();
    assert_eq!(c[0]["type"], "thinking");
    assert!(is_gateway_signature(c[0]["signature"].as_str().unwrap()));
    assert_eq!(c[1], json!({"type":"text","text":"I'll read it."}));
    assert_eq!(
        c[2],
        json!({"type":"tool_use","id":"call_0","name":"Read","input":{"file_path":"a.py"}})
    );
    assert_eq!(c[3]["input"], json!({}));
    assert!(c[3]["id"].as_str().unwrap().starts_with("toolu_gw_"));
    assert_eq!(c.len(), 4, "a call without a name is dropped");
    assert_eq!(
        m["stop_reason"], "tool_use",
        "decided by what was emitted, not the label"
    );
    assert_eq!(
        m["usage"],
        json!({"input_tokens":1024,"cache_creation_input_tokens":0,"cache_read_input_tokens":4096,"output_tokens":61})
    );
    let other = to_message(&answer, &ctx(true)).unwrap();
    assert_ne!(m["id"], other["id"]);
}

#[test]
fn stop_reasons_follow_what_was_produced() {
    let mk = |finish: &str, message: Value| {
        to_message(
            &json!({"choices":[{"index":0,"finish_reason":finish,"message":message}]}),
            &ctx(true),
        )
        .unwrap()
    };
    assert_eq!(
        mk("length", json!({"content":"abc"}))["stop_reason"],
        "max_tokens"
    );
    assert_eq!(
        mk("tool_calls", json!({"content":"abc","tool_calls":[]}))["stop_reason"],
        "end_turn"
    );
    let refusal = mk("content_filter", json!({"content":""}));
    assert_eq!(refusal["stop_reason"], "refusal");
    assert_eq!(refusal["stop_details"]["type"], "refusal");
    let seq = mk("stop", json!({"content":"done ###"}));
    assert_eq!(
        (seq["stop_reason"].as_str(), seq["stop_sequence"].as_str()),
        (Some("stop_sequence"), Some("###"))
    );
    let empty = mk("stop", json!({"content":"  "}));
    assert_eq!(empty["content"], json!([]));
    assert_eq!(empty["stop_reason"], "end_turn");
    let tags = mk(
        "stop",
        json!({"content":"<think>plan it</think>\n\nAnswer."}),
    );
    assert_eq!(tags["content"][0]["thinking"], "plan it");
    assert_eq!(tags["content"][1]["text"], "\n\nAnswer.");
    let double = mk(
        "tool_calls",
        json!({"tool_calls":[{"id":"c","function":{"name":"Bash","arguments":"\"{\\\"command\\\":\\\"ls\\\"}\""}}]}),
    );
    assert_eq!(double["content"][0]["input"], json!({"command":"ls"}));
    let reasoning_only = mk("length", json!({"content":"","reasoning":"long thoughts"}));
    assert_eq!(reasoning_only["content"].as_array().unwrap().len(), 1);
    assert_eq!(reasoning_only["stop_reason"], "max_tokens");
    let not_asked = to_message(&json!({"choices":[{"finish_reason":"stop","message":{"content":"x","reasoning_content":"hidden"}}]}), &ctx(false)).unwrap();
    assert_eq!(not_asked["content"], json!([{"type":"text","text":"x"}]));
}

// ---------------------------------------------------------------- streaming

#[test]
fn the_worked_example_of_c_12_7() {
    let chunks = vec![
        chunk(json!({"role":"assistant","reasoning_content":"Need to list"})),
        chunk(json!({"reasoning_content":" the files."})),
        chunk(json!({"content":"\n\n"})),
        chunk(json!({"content":"I'll check the directory."})),
        chunk(
            json!({"tool_calls":[{"index":0,"id":"call_a1","type":"function","function":{"name":"Bash","arguments":""}}]}),
        ),
        chunk(json!({"tool_calls":[{"index":0,"function":{"arguments":"{\"command\":"}}]})),
        chunk(
            json!({"tool_calls":[{"index":0,"function":{"arguments":"\"ls -la\"}"}},{"index":1,"id":"call_b2","type":"function","function":{"name":"Read","arguments":"{\"file_path\":\"README.md\"}"}}]}),
        ),
        finish("tool_calls"),
        usage_chunk(5120, 88, 4096),
    ];
    let sse = run_stream(&chunks, true, false);
    let names: Vec<String> = claude_balancer::upstream::sse::parse_all(&sse)
        .into_iter()
        .map(|(n, _)| n.unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert!(
        sse.contains(r#""partial_json":"{\"command\":"}"#)
            && sse.contains(r#""partial_json":"\"ls -la\"}"}"#),
        "fragments as received"
    );
    let m = msg(&sse);
    assert_eq!(m["model"], "claude-sonnet-4-6");
    assert_eq!(m["usage"]["input_tokens"], 1024);
    assert_eq!(m["usage"]["cache_read_input_tokens"], 4096);
    assert_eq!(m["usage"]["output_tokens"], 88);
    let c = m["content"].as_array().unwrap();
    assert_eq!(c[0]["thinking"], "Need to list the files.");
    assert_eq!(c[1]["text"], "\n\nI'll check the directory.");
    assert_eq!(c[2]["input"], json!({"command":"ls -la"}));
    assert_eq!(c[3]["input"], json!({"file_path":"README.md"}));
    assert_eq!(m["stop_reason"], "tool_use");
    let start: Value =
        serde_json::from_str(&claude_balancer::upstream::sse::parse_all(&sse)[0].1).unwrap();
    assert_eq!(
        start["message"]["usage"]["input_tokens"], 5070,
        "the local estimate, never 0"
    );
}

#[test]
fn whitespace_before_a_tool_call_opens_no_text_block() {
    let sse = run_stream(
        &[
            chunk(json!({"content":"\n\n"})),
            chunk(
                json!({"tool_calls":[{"index":0,"id":"c","function":{"name":"Bash","arguments":"{}"}}]}),
            ),
            finish("tool_calls"),
        ],
        true,
        false,
    );
    let m = msg(&sse);
    assert_eq!(m["content"].as_array().unwrap().len(), 1);
    assert_eq!(m["content"][0]["type"], "tool_use");
}

#[test]
fn tool_calls_without_index_or_with_a_shared_index_stay_apart() {
    // No index at all, told apart by id.
    let sse = run_stream(
        &[
            chunk(
                json!({"tool_calls":[{"id":"a","function":{"name":"Bash","arguments":"{\"command\":"}}]}),
            ),
            chunk(json!({"tool_calls":[{"function":{"arguments":"\"pwd\"}"}}]})),
            chunk(
                json!({"tool_calls":[{"id":"b","function":{"name":"Read","arguments":"{\"file_path\":\"x\"}"}}]}),
            ),
            finish("tool_calls"),
        ],
        true,
        false,
    );
    let m = msg(&sse);
    assert_eq!(m["content"][0]["input"], json!({"command":"pwd"}));
    assert_eq!(m["content"][1]["input"], json!({"file_path":"x"}));
    // Ollama: index 0 for every parallel call.
    let sse = run_stream(
        &[
            chunk(
                json!({"tool_calls":[{"index":0,"id":"a","function":{"name":"Bash","arguments":"{\"command\":\"ls\"}"}},
                                     {"index":0,"id":"b","function":{"name":"Bash","arguments":"{\"command\":\"pwd\"}"}}]}),
            ),
            finish("stop"),
        ],
        true,
        false,
    );
    let m = msg(&sse);
    assert_eq!(m["content"].as_array().unwrap().len(), 2);
    assert_eq!(m["content"][1]["input"], json!({"command":"pwd"}));
    assert_eq!(
        m["stop_reason"], "tool_use",
        "finish_reason stop with tool calls"
    );
}

#[test]
fn a_name_after_the_arguments_opens_the_block_late() {
    let sse = run_stream(
        &[
            chunk(json!({"tool_calls":[{"index":0,"id":"c","function":{"arguments":"{\"a\":"}}]})),
            chunk(json!({"tool_calls":[{"index":0,"function":{"name":"Bash","arguments":"1}"}}]})),
            finish("tool_calls"),
        ],
        true,
        false,
    );
    assert_eq!(msg(&sse)["content"][0]["input"], json!({"a":1}));
    // A call that never gets a name is dropped, and the stop reason follows.
    let sse = run_stream(
        &[
            chunk(json!({"tool_calls":[{"index":0,"id":"c","function":{"arguments":"{}"}}]})),
            finish("tool_calls"),
        ],
        true,
        false,
    );
    let m = msg(&sse);
    assert_eq!(m["content"], json!([]));
    assert_eq!(m["stop_reason"], "end_turn");
}

#[test]
fn usage_on_every_chunk_and_finish_with_the_last_fragment() {
    let with_usage = |mut c: Value| {
        c["usage"] = json!({"prompt_tokens":10,"completion_tokens":1});
        c
    };
    let mut last = chunk(json!({"tool_calls":[{"index":0,"function":{"arguments":"\"x\"}"}}]}));
    last["choices"][0]["finish_reason"] = json!("tool_calls");
    let sse = run_stream(
        &[
            with_usage(chunk(
                json!({"tool_calls":[{"index":0,"id":"c","function":{"name":"Bash","arguments":""}}]}),
            )),
            with_usage(chunk(
                json!({"tool_calls":[{"index":0,"function":{"arguments":"{\"command\":"}}]}),
            )),
            with_usage(last),
            usage_chunk(10, 7, 0),
        ],
        true,
        false,
    );
    let m = msg(&sse);
    assert_eq!(m["content"][0]["input"], json!({"command":"x"}));
    assert_eq!(
        m["usage"]["output_tokens"], 7,
        "the trailing usage chunk wins"
    );
}

#[test]
fn repeated_full_arguments_at_finish_are_ignored() {
    let mut last = chunk(json!({"tool_calls":[{"index":0,"function":{"arguments":"{\"a\": 1}"}}]}));
    last["choices"][0]["finish_reason"] = json!("tool_calls");
    let sse = run_stream(
        &[
            chunk(
                json!({"tool_calls":[{"index":0,"id":"c","function":{"name":"T","arguments":"{\"a\":1}"}}]}),
            ),
            last,
        ],
        true,
        false,
    );
    assert_eq!(msg(&sse)["content"][0]["input"], json!({"a":1}));
}

#[test]
fn endings_missing_done_truncation_and_errors() {
    // finish_reason then EOF without [DONE]: a normal end.
    let sse = run_stream(
        &[chunk(json!({"content":"hi"})), finish("stop")],
        true,
        true,
    );
    assert_eq!(msg(&sse)["stop_reason"], "end_turn");
    // EOF without finish_reason: truncated, an error event and nothing else.
    let sse = run_stream(&[chunk(json!({"content":"hi"}))], true, true);
    assert!(
        sse.contains("event: error")
            && !sse.contains("message_stop")
            && !sse.contains("message_delta")
    );
    assert!(accumulate_sse(&sse).unwrap_err().contains("error event"));
    // An error chunk mid-tool-call: the half tool block is not closed, no fake end.
    let sse = run_stream(
        &[
            chunk(
                json!({"tool_calls":[{"index":0,"id":"c","function":{"name":"Bash","arguments":"{\"comm"}}]}),
            ),
            json!({"error":{"message":"Provider overloaded","type":"server_error"}}),
        ],
        true,
        false,
    );
    let events = claude_balancer::upstream::sse::parse_all(&sse);
    let last = events.last().unwrap();
    assert_eq!(last.0.as_deref(), Some("error"));
    assert!(last.1.contains("overloaded_error"));
    assert!(
        !events
            .iter()
            .any(|(n, _)| n.as_deref() == Some("content_block_stop"))
    );
    // OpenRouter's finish_reason "error".
    let sse = run_stream(
        &[chunk(json!({"content":"a"})), finish("error")],
        true,
        false,
    );
    assert!(sse.contains("event: error") && !sse.contains("message_stop"));
}

#[test]
fn reasoning_only_and_reasoning_fields() {
    let sse = run_stream(
        &[
            chunk(json!({"reasoning":"thinking hard"})),
            finish("length"),
        ],
        true,
        false,
    );
    let m = msg(&sse);
    assert_eq!(m["content"].as_array().unwrap().len(), 1);
    assert_eq!(m["content"][0]["thinking"], "thinking hard");
    assert_eq!(m["stop_reason"], "max_tokens");
    // Both fields filled with the same text: not doubled.
    let sse = run_stream(
        &[
            chunk(json!({"reasoning":"same","reasoning_content":"same"})),
            chunk(json!({"content":"ok"})),
            finish("stop"),
        ],
        true,
        false,
    );
    assert_eq!(msg(&sse)["content"][0]["thinking"], "same");
    // Not asked for: dropped, never turned into text.
    let sse = run_stream(
        &[
            chunk(json!({"reasoning_content":"secret"})),
            chunk(json!({"content":"ok"})),
            finish("stop"),
        ],
        false,
        false,
    );
    let m = msg(&sse);
    assert_eq!(m["content"], json!([{"type":"text","text":"ok"}]));
    // Interleaved reasoning after text opens a new thinking block.
    let sse = run_stream(
        &[
            chunk(json!({"reasoning":"a"})),
            chunk(json!({"content":"b"})),
            chunk(json!({"reasoning":"c"})),
            chunk(json!({"content":"d"})),
            finish("stop"),
        ],
        true,
        false,
    );
    let kinds: Vec<String> = msg(&sse)["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, ["thinking", "text", "thinking", "text"]);
}

#[test]
fn think_tags_split_across_chunks() {
    let pieces = ["<thi", "nk>plan", " it</th", "ink>\n\nThe answer", "."];
    let mut chunks: Vec<Value> = pieces.iter().map(|p| chunk(json!({"content":p}))).collect();
    chunks.push(finish("stop"));
    let m = msg(&run_stream(&chunks, true, false));
    assert_eq!(m["content"][0]["thinking"], "plan it");
    assert_eq!(m["content"][1]["text"], "\n\nThe answer.");
    // A tag later in the text is just text.
    let m = msg(&run_stream(
        &[chunk(json!({"content":"Use <think> tags"})), finish("stop")],
        true,
        false,
    ));
    assert_eq!(m["content"][0]["text"], "Use <think> tags");
}

#[test]
fn stop_sequences_invalid_chunks_and_roles() {
    let mut f = finish("stop");
    f["choices"][0]["stop_reason"] = json!("###");
    let sse = run_stream(
        &[
            json!("not json at all"),
            chunk(json!({"role":"assistant","content":"x"})),
            chunk(json!({"role":"assistant","content":"y"})),
            f,
        ],
        true,
        false,
    );
    let m = msg(&sse);
    assert_eq!(m["content"][0]["text"], "xy");
    assert_eq!(m["stop_reason"], "stop_sequence");
    assert_eq!(m["stop_sequence"], "###");
    let sse = run_stream(
        &[chunk(json!({"content":"x"})), finish("content_filter")],
        true,
        false,
    );
    assert_eq!(msg(&sse)["stop_reason"], "refusal");
}

#[test]
fn without_upstream_usage_the_estimate_is_reported() {
    let m = msg(&run_stream(
        &[chunk(json!({"content":"abcdefgh"})), finish("stop")],
        true,
        false,
    ));
    assert_eq!(m["usage"]["input_tokens"], 5070);
    assert_eq!(m["usage"]["cache_read_input_tokens"], 0);
    assert_eq!(m["usage"]["cache_creation_input_tokens"], 0);
    assert!(m["usage"]["output_tokens"].as_u64().unwrap() >= 1);
}

/// The upstream bytes of the worked example, as an OpenAI server writes them.
fn upstream_bytes() -> String {
    let chunks = [
        chunk(json!({"role":"assistant","reasoning_content":"Need to list"})),
        chunk(json!({"content":"\n\n"})),
        chunk(json!({"content":"I'll check — the directory ✓."})),
        chunk(
            json!({"tool_calls":[{"index":0,"id":"call_a1","type":"function","function":{"name":"Bash","arguments":"{\"command\":"}}]}),
        ),
        chunk(
            json!({"tool_calls":[{"index":0,"function":{"arguments":"\"ls -la\"}"}},{"index":1,"id":"call_b2","type":"function","function":{"name":"Read","arguments":"{\"file_path\":\"README.md\"}"}}]}),
        ),
        finish("tool_calls"),
        usage_chunk(5120, 88, 4096),
    ];
    let mut s = String::from(": OPENROUTER PROCESSING\n\n");
    for c in chunks {
        s.push_str(&format!("data: {c}\n\n"));
    }
    s.push_str("data: [DONE]\n\n");
    s
}

fn convert_bytes(pieces: &[&[u8]]) -> Value {
    let mut splitter = Splitter::new();
    let mut state = StreamState::new(ctx(true));
    state.start();
    for p in pieces {
        let events = splitter.push(bytes::Bytes::copy_from_slice(p));
        for d in data_payloads(&events.bytes) {
            state.push_data(&d);
        }
    }
    state.finish();
    let sse = String::from_utf8(state.take()).unwrap();
    let mut m = msg(&sse);
    m["id"] = json!("msg_fixed");
    m
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// The Anthropic events do not depend on how the upstream bytes are split into chunks.
    #[test]
    fn conversion_does_not_depend_on_chunking(cuts in proptest::collection::vec(0usize..2000, 0..24)) {
        let text = upstream_bytes();
        let bytes = text.as_bytes();
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % bytes.len()).collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut pieces: Vec<&[u8]> = Vec::new();
        let mut last = 0;
        for c in cuts {
            pieces.push(&bytes[last..c]);
            last = c;
        }
        pieces.push(&bytes[last..]);
        let whole = convert_bytes(&[bytes]);
        prop_assert_eq!(convert_bytes(&pieces), whole);
    }
}

#[test]
fn a_deferred_tool_and_the_fields_chat_completions_lacks_never_reach_the_provider() {
    // Claude Code 2.1.332 sends a placeholder tool with `defer_loading: true` (Anthropic's tool
    // search loads it), and `context_management` with every request.
    let body = json!({"model":"m","max_tokens":100,"messages":[{"role":"user","content":"x"}],
        "context_management":{"edits":[{"type":"clear_tool_uses_20250919"}]},
        "metadata":{"user_id":"{\"session_id\":\"s\"}"},
        "output_config":{"effort":"high"},
        "thinking":{"type":"adaptive"},
        "tools":[{"name":"Bash","input_schema":{"type":"object"}},
                 {"name":"Deferred","input_schema":{"type":"object"},"defer_loading":true}]});
    let out = conv_with(body, &opts(Dialect::Openai), false).unwrap();
    let names: Vec<&str> = out["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Bash"]);
    for dropped in [
        "context_management",
        "metadata",
        "output_config",
        "defer_loading",
    ] {
        assert!(!out.to_string().contains(dropped), "{dropped}: {out}");
    }
    assert_eq!(out["reasoning_effort"], "high", "translated");
}
