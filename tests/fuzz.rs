//! Large property tests over the parsers and converters: no panic, no hang, and the stream
//! converter never emits an event sequence a client would mis-read.
//!
//! CI runs the default case count; for a long run:
//! `PROPTEST_CASES=200000 cargo test --release --test fuzz`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use claude_balancer::adapter::events::accumulate_sse;
use claude_balancer::adapter::openai::request::convert;
use claude_balancer::adapter::openai::stream::{Step, StreamState};
use claude_balancer::adapter::openai::{Options, ReplyContext};
use claude_balancer::config::Dialect;
use claude_balancer::upstream::sse::{Splitter, parse_all};
use proptest::prelude::*;
use serde_json::{Value, json};

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One upstream chunk, from a grammar that covers the dialects and their mistakes.
fn chunk() -> impl Strategy<Value = String> {
    let text = prop_oneof![
        Just(String::new()),
        Just(" ".to_owned()),
        Just("\n\n".to_owned()),
        "[a-z <>/{}\":,]{0,12}"
    ];
    let index = prop_oneof![Just(None), (0u64..3).prop_map(Some)];
    let id = prop_oneof![
        Just(None),
        Just(Some("")),
        Just(Some("call_a")),
        Just(Some("call_b")),
        Just(Some("functions.X:0"))
    ];
    let name = prop_oneof![Just(None), Just(Some("Bash")), Just(Some("Read"))];
    let args = prop_oneof![
        Just(None),
        Just(Some("")),
        Just(Some("{")),
        Just(Some("\"a\":1")),
        Just(Some("}")),
        Just(Some("{\"a\":1}"))
    ];
    let finish = prop_oneof![
        Just(None),
        Just(Some("stop")),
        Just(Some("tool_calls")),
        Just(Some("length")),
        Just(Some("content_filter")),
        Just(Some("error"))
    ];
    let tool = (index, id, name, args).prop_map(|(i, id, n, a)| {
        let mut t = json!({"function": {}});
        if let Some(i) = i {
            t["index"] = json!(i);
        }
        if let Some(id) = id {
            t["id"] = json!(id);
        }
        if let Some(n) = n {
            t["function"]["name"] = json!(n);
        }
        if let Some(a) = a {
            t["function"]["arguments"] = json!(a);
        }
        t
    });
    let delta = (
        prop::option::of(text.clone()),
        prop::option::of(text.clone()),
        prop::option::of(text),
        prop::collection::vec(tool, 0..3),
    )
        .prop_map(|(content, reasoning, reasoning_content, tools)| {
            let mut d = json!({});
            if let Some(c) = content {
                d["content"] = json!(c);
            }
            if let Some(r) = reasoning {
                d["reasoning"] = json!(r);
            }
            if let Some(r) = reasoning_content {
                d["reasoning_content"] = json!(r);
            }
            if !tools.is_empty() {
                d["tool_calls"] = json!(tools);
            }
            d
        });
    prop_oneof![
        8 => (delta, finish).prop_map(|(d, f)| json!({"choices": [{"index": 0, "delta": d, "finish_reason": f}]}).to_string()),
        1 => Just(json!({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 3}}).to_string()),
        1 => Just(json!({"error": {"message": "boom", "type": "server_error"}}).to_string()),
        1 => Just("not json {".to_owned()),
        1 => Just("[DONE]".to_owned()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(2000)))]

    /// Whatever the upstream sends, the client sees a valid Anthropic stream, or one that ends with
    /// exactly one error event after valid events.
    #[test]
    fn the_stream_converter_never_emits_an_invalid_sequence(chunks in prop::collection::vec(chunk(), 0..25), thinking: bool) {
        let ctx = ReplyContext { model: "claude-x".into(), thinking, stop_sequences: vec![], input_estimate: 10 };
        let mut s = StreamState::new(ctx);
        s.start();
        let mut ended = false;
        for c in &chunks {
            if s.push_data(c) != Step::Continue {
                ended = true;
                break;
            }
        }
        if !ended {
            s.finish();
        }
        let out = String::from_utf8(s.take()).unwrap();
        let events = parse_all(&out);
        let errors = events.iter().filter(|(n, _)| n.as_deref() == Some("error")).count();
        let ended_ok = out.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n") && errors == 0;
        let ended_err = errors == 1 && events.last().unwrap().0.as_deref() == Some("error") && !out.contains("message_stop");
        prop_assert!(ended_ok != ended_err, "a stream must end with message_stop or one error event:\n{}", out);
        match accumulate_sse(&out) {
            Ok(m) => {
                prop_assert!(ended_ok);
                let has_tool = m["content"].as_array().unwrap().iter().any(|b| b["type"] == "tool_use");
                prop_assert_eq!(has_tool, m["stop_reason"] == "tool_use");
            }
            // Unparseable tool arguments are let through as received (protocol.md C.12.6): the
            // client reports them to the model. Everything else must be a clean error ending.
            Err(e) if e.contains("tool input") => {}
            Err(e) => prop_assert!(e.starts_with("error event") && ended_err, "{} in\n{}", e, out),
        }
    }

    /// The SSE splitter keeps every byte, in order, whatever arrives.
    #[test]
    fn the_splitter_loses_nothing(pieces in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..20)) {
        let mut s = Splitter::new();
        let mut out = Vec::new();
        for p in &pieces {
            out.extend_from_slice(&s.push(bytes::Bytes::copy_from_slice(p)).bytes);
        }
        out.extend_from_slice(s.pending());
        prop_assert_eq!(out, pieces.concat());
    }

    /// The request parser and the config loader never panic on garbage.
    #[test]
    fn parsers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300), text in "\\PC{0,200}") {
        let _ = claude_balancer::inbound::body::parse(&bytes);
        let _ = claude_balancer::config::load_str(&text, &|_| None);
        let _ = claude_balancer::config::load_str(&String::from_utf8_lossy(&bytes), &|_| None);
    }
}

/// A random conversation in Anthropic form.
fn conversation() -> impl Strategy<Value = Value> {
    let block = prop_oneof![
        "[a-z ]{0,8}".prop_map(|t| json!({"type": "text", "text": t})),
        (0u8..4).prop_map(|i| json!({"type": "tool_use", "id": format!("t{i}"), "name": "Bash", "input": {"n": i}})),
        (0u8..4).prop_map(|i| json!({"type": "tool_result", "tool_use_id": format!("t{i}"), "content": "ok"})),
        Just(json!({"type": "thinking", "thinking": "hm", "signature": "gw1.x"})),
        Just(json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA"}})),
    ];
    let message = (
        prop_oneof![Just("user"), Just("assistant"), Just("system")],
        prop::collection::vec(block, 0..4),
    )
        .prop_map(|(role, blocks)| json!({"role": role, "content": blocks}));
    prop::collection::vec(message, 0..8)
        .prop_map(|m| json!({"model": "m", "max_tokens": 100, "messages": m}))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(2000)))]

    /// Whatever the history, every assistant `tool_calls` is followed directly by one tool message
    /// per call, and no tool message appears anywhere else.
    #[test]
    fn converted_history_keeps_the_tool_message_rule(body in conversation(), dialect in prop_oneof![Just(Dialect::Generic), Just(Dialect::Deepseek), Just(Dialect::Openai)]) {
        let out = convert(&body, "up", false, &Options { dialect, max_tokens_cap: None, sanitize_schemas: false }).unwrap();
        let msgs = out["messages"].as_array().unwrap();
        let mut i = 0;
        while i < msgs.len() {
            let m = &msgs[i];
            if m["role"] == "tool" {
                prop_assert!(false, "a tool message without a call before it: {}", out);
            }
            if let Some(calls) = m["tool_calls"].as_array() {
                for (k, c) in calls.iter().enumerate() {
                    let t = msgs.get(i + 1 + k);
                    prop_assert!(t.is_some_and(|t| t["role"] == "tool" && t["tool_call_id"] == c["id"]), "call {} unanswered in {}", c, out);
                    prop_assert!(c["function"]["arguments"].is_string());
                }
                i += calls.len();
            }
            i += 1;
        }
    }
}

/// A random JSON value (strings with escapes and non-ASCII text, numbers of every form).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e6f64..1e6).prop_map(|f| json!(f)),
        "[a-z\"\\\\/\u{e9}\u{2713}\n\t ]{0,10}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 40, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,3}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(4000)))]

    /// The request scanner accepts exactly what serde_json accepts, on valid JSON and on JSON with
    /// one byte changed (no edit adds a raw control character inside a string: the scanner leaves
    /// those to the provider), and a body's signature does not depend on whitespace.
    #[test]
    fn the_request_scanner_agrees_with_serde_json(
        v in json_value(),
        at in any::<prop::sample::Index>(),
        edit in 0u8..3,
        byte in prop::sample::select(b"{}[]\",:\\ 0-.eEtfnu".to_vec()),
    ) {
        use claude_balancer::inbound::canonical::scan;
        let body = json!({"model": "m", "messages": [v]});
        let compact = serde_json::to_vec(&body).unwrap();
        let pretty = serde_json::to_vec_pretty(&body).unwrap();
        let a = scan(&compact, true).unwrap();
        prop_assert_eq!(a.signature, scan(&pretty, true).unwrap().signature);
        let mut bad = compact.clone();
        let i = at.index(bad.len());
        match edit {
            0 => { bad.remove(i); }
            1 => bad.insert(i, byte),
            _ => bad[i] = byte,
        }
        let ours = scan(&bad, false).is_ok();
        let theirs = serde_json::from_slice::<Value>(&bad).is_ok_and(|v| v.is_object());
        // serde_json also refuses numbers beyond f64's range, which are valid JSON.
        let exempt = serde_json::from_slice::<Value>(&bad)
            .is_err_and(|e| e.to_string().contains("number out of range"));
        if !exempt {
            prop_assert_eq!(ours, theirs, "{}", String::from_utf8_lossy(&bad));
        }
    }
}

/// `text` with every generated id (messages, tool calls without an upstream id) masked.
fn without_ids(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("\"id\":\"") {
        let (head, tail) = rest.split_at(at + "\"id\":\"".len());
        out.push_str(head);
        if tail.starts_with("msg_") || tail.starts_with("toolu_") {
            out.push('X');
            rest = tail.find('"').map_or("", |end| &tail[end..]);
        } else {
            rest = tail;
        }
    }
    out.push_str(rest);
    // Generated tool ids also appear inside error messages.
    let mut masked = String::new();
    let mut rest = out.as_str();
    while let Some(at) = rest.find("toolu_") {
        masked.push_str(&rest[..at]);
        masked.push_str("toolu_X");
        let tail = &rest[at + "toolu_".len()..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
            .unwrap_or(tail.len());
        rest = &tail[end..];
    }
    masked.push_str(rest);
    masked
}

/// Feeds `chunks` to a fresh converter and returns what it wrote, ids masked.
fn convert_chunks(chunks: &[String], thinking: bool) -> String {
    let ctx = ReplyContext {
        model: "claude-x".into(),
        thinking,
        stop_sequences: vec![],
        input_estimate: 10,
    };
    let mut s = StreamState::new(ctx);
    s.start();
    let mut ended = false;
    for c in chunks {
        if s.push_data(c) != Step::Continue {
            ended = true;
            break;
        }
    }
    if !ended {
        s.finish();
    }
    without_ids(&String::from_utf8(s.take()).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(2000)))]

    /// The converter's fast path for plain text chunks writes exactly what its general path writes:
    /// the same chunks, each given an extra `"x_groq":{}` member (which sends them down the general
    /// path and means nothing), produce the same events.
    #[test]
    fn the_text_fast_path_matches_the_general_path(chunks in prop::collection::vec(chunk(), 0..25), thinking: bool) {
        let general: Vec<String> = chunks
            .iter()
            .map(|c| match serde_json::from_str::<Value>(c) {
                Ok(Value::Object(mut m)) => {
                    m.insert("x_groq".into(), json!({}));
                    Value::Object(m).to_string()
                }
                _ => c.clone(),
            })
            .collect();
        prop_assert_eq!(convert_chunks(&chunks, thinking), convert_chunks(&general, thinking));
    }
}
