//! An Anthropic event-stream accumulator that enforces the rules clients rely on (the protocol
//! reference's streaming invariants): `message_start` first and once, dense indices, one block open at a time, deltas that
//! match their block, signed thinking, `message_delta` with usage, nothing after `message_stop`.
//!
//! It rebuilds the `Message` the way the SDKs do, so a stream can be compared with the
//! non-streaming answer, and it rejects any sequence a client would mis-read.

use serde_json::{Value, json};

/// Rebuilds the message from `(event name, data)` pairs; an `error` event or a broken rule is an `Err`.
pub fn accumulate<'a>(
    events: impl IntoIterator<Item = (&'a str, &'a Value)>,
) -> Result<Value, String> {
    let mut message: Option<Value> = None;
    let mut open: Option<usize> = None;
    let mut partial_json: Vec<String> = Vec::new();
    let mut saw_delta = false;
    let mut stopped = false;
    for (name, data) in events {
        if stopped {
            return Err(format!("`{name}` after message_stop"));
        }
        if name != "ping"
            && name != "error"
            && data.get("type").and_then(Value::as_str) != Some(name)
        {
            return Err(format!(
                "event `{name}` carries type {:?}",
                data.get("type")
            ));
        }
        match name {
            "ping" => {}
            "error" => {
                return Err(format!(
                    "error event: {}",
                    data.get("error").unwrap_or(data)
                ));
            }
            "message_start" => {
                if message.is_some() {
                    return Err("duplicate message_start".into());
                }
                let m = data
                    .get("message")
                    .cloned()
                    .ok_or("message_start without message")?;
                if m.pointer("/usage/input_tokens")
                    .and_then(Value::as_u64)
                    .is_none()
                {
                    return Err("message_start without usage.input_tokens".into());
                }
                message = Some(m);
            }
            _ if message.is_none() => return Err(format!("`{name}` before message_start")),
            "content_block_start" => {
                if let Some(i) = open {
                    return Err(format!("block {i} still open at content_block_start"));
                }
                let m = message.as_mut().ok_or("no message")?;
                let content = m
                    .get_mut("content")
                    .and_then(Value::as_array_mut)
                    .ok_or("message without content")?;
                let index = data
                    .get("index")
                    .and_then(Value::as_u64)
                    .ok_or("start without index")? as usize;
                if index != content.len() {
                    return Err(format!("block index {index}, expected {}", content.len()));
                }
                content.push(
                    data.get("content_block")
                        .cloned()
                        .ok_or("start without content_block")?,
                );
                partial_json.push(String::new());
                open = Some(index);
            }
            "content_block_delta" => {
                let index = data
                    .get("index")
                    .and_then(Value::as_u64)
                    .ok_or("delta without index")? as usize;
                if open != Some(index) {
                    return Err(format!("delta for block {index}, open is {open:?}"));
                }
                let m = message.as_mut().ok_or("no message")?;
                let block = m
                    .pointer_mut(&format!("/content/{index}"))
                    .ok_or("no block")?;
                let kind = block
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                let delta = data.get("delta").ok_or("delta without delta")?;
                let append = |block: &mut Value, key: &str, piece: &str| {
                    let s = block
                        .get(key)
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned()
                        + piece;
                    block[key] = json!(s);
                };
                match (delta.get("type").and_then(Value::as_str), kind.as_str()) {
                    (Some("text_delta"), "text") => {
                        append(block, "text", delta["text"].as_str().unwrap_or(""))
                    }
                    (Some("thinking_delta"), "thinking") => {
                        append(block, "thinking", delta["thinking"].as_str().unwrap_or(""))
                    }
                    (Some("signature_delta"), "thinking") => append(
                        block,
                        "signature",
                        delta["signature"].as_str().unwrap_or(""),
                    ),
                    (Some("input_json_delta"), "tool_use") => {
                        partial_json[index].push_str(delta["partial_json"].as_str().unwrap_or(""))
                    }
                    (Some("citations_delta"), "text") => {}
                    (t, k) => return Err(format!("delta {t:?} on a {k} block")),
                }
            }
            "content_block_stop" => {
                let index = data
                    .get("index")
                    .and_then(Value::as_u64)
                    .ok_or("stop without index")? as usize;
                if open != Some(index) {
                    return Err(format!("stop for block {index}, open is {open:?}"));
                }
                let m = message.as_mut().ok_or("no message")?;
                let block = m
                    .pointer_mut(&format!("/content/{index}"))
                    .ok_or("no block")?;
                match block.get("type").and_then(Value::as_str) {
                    Some("tool_use") => {
                        let raw = &partial_json[index];
                        let input: Value = if raw.trim().is_empty() {
                            json!({})
                        } else {
                            serde_json::from_str(raw).map_err(|e| {
                                format!("tool input of block {index} is not JSON: {e}")
                            })?
                        };
                        block["input"] = input;
                    }
                    Some("thinking")
                        if block
                            .get("signature")
                            .and_then(Value::as_str)
                            .is_none_or(str::is_empty) =>
                    {
                        return Err(format!("thinking block {index} closed without a signature"));
                    }
                    Some("text")
                        if block
                            .get("text")
                            .and_then(Value::as_str)
                            .is_none_or(|t| t.trim().is_empty()) =>
                    {
                        return Err(format!("text block {index} is empty or whitespace"));
                    }
                    _ => {}
                }
                open = None;
            }
            "message_delta" => {
                if let Some(i) = open {
                    return Err(format!("message_delta while block {i} is open"));
                }
                let usage = data
                    .get("usage")
                    .filter(|u| u.is_object())
                    .ok_or("message_delta without usage")?;
                if usage.get("output_tokens").and_then(Value::as_u64).is_none() {
                    return Err("message_delta usage without output_tokens".into());
                }
                let m = message.as_mut().ok_or("no message")?;
                if let Some(d) = data.get("delta") {
                    for key in ["stop_reason", "stop_sequence", "stop_details"] {
                        if let Some(v) = d.get(key) {
                            m[key] = v.clone();
                        }
                    }
                }
                if let Some(obj) = usage.as_object() {
                    for (k, v) in obj {
                        m["usage"][k] = v.clone();
                    }
                }
                saw_delta = true;
            }
            "message_stop" => {
                if !saw_delta {
                    return Err("message_stop without message_delta".into());
                }
                stopped = true;
            }
            other => return Err(format!("unknown event `{other}`")),
        }
    }
    if !stopped {
        return Err("stream ended without message_stop".into());
    }
    message.ok_or_else(|| "no message".into())
}

/// Calls `f` with each Anthropic event (its name, else its `type`, and its data) in whole SSE
/// events.
pub fn for_each_event(bytes: &[u8], mut f: impl FnMut(&str, &Value)) {
    for (name, data) in crate::upstream::sse::parse_all(&String::from_utf8_lossy(bytes)) {
        let v: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
        let name = name.unwrap_or_else(|| v["type"].as_str().unwrap_or("").to_owned());
        f(&name, &v);
    }
}

/// Takes the fields of an event's `usage` (from `message_start`'s message or `message_delta`)
/// into the usage so far: later figures replace earlier ones, nulls change nothing.
pub fn merge_usage(total: &mut Value, usage: Option<&Value>) {
    if let Some(u) = usage.and_then(Value::as_object) {
        for (k, v) in u {
            if !v.is_null() {
                total[k] = v.clone();
            }
        }
    }
}

/// [`accumulate`] over an SSE text.
pub fn accumulate_sse(text: &str) -> Result<Value, String> {
    let events: Vec<(String, Value)> = crate::upstream::sse::parse_all(text)
        .into_iter()
        .map(|(n, d)| {
            let v = serde_json::from_str(&d).unwrap_or(Value::Null);
            (n.unwrap_or_default(), v)
        })
        .collect();
    if let Some((_, _)) = events.iter().find(|(n, _)| n.is_empty()) {
        return Err("an event without an `event:` line".into());
    }
    accumulate(events.iter().map(|(n, v)| (n.as_str(), v)))
}

/// The event stream of a complete message: what a client would have received had it streamed.
/// Each block arrives whole in one delta.
pub fn message_to_sse(message: &Value) -> String {
    let mut out = String::new();
    let mut event = |name: &str, data: Value| {
        out.push_str("event: ");
        out.push_str(name);
        out.push_str("\ndata: ");
        out.push_str(&data.to_string());
        out.push_str("\n\n");
    };
    let usage = message.get("usage").cloned().unwrap_or_else(|| json!({}));
    let mut start = message.clone();
    start["content"] = json!([]);
    start["stop_reason"] = Value::Null;
    start["stop_sequence"] = Value::Null;
    if let Some(obj) = start.as_object_mut() {
        obj.remove("stop_details");
    }
    start["usage"]["output_tokens"] = json!(1);
    event(
        "message_start",
        json!({"type": "message_start", "message": start}),
    );
    let blocks = message
        .get("content")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for (i, block) in blocks.iter().enumerate() {
        let kind = block.get("type").and_then(Value::as_str).unwrap_or("");
        let (empty, deltas) = match kind {
            "text" => (
                json!({"type": "text", "text": ""}),
                vec![
                    json!({"type": "text_delta", "text": block.get("text").cloned().unwrap_or(json!(""))}),
                ],
            ),
            "thinking" => (
                json!({"type": "thinking", "thinking": "", "signature": ""}),
                vec![
                    json!({"type": "thinking_delta", "thinking": block.get("thinking").cloned().unwrap_or(json!(""))}),
                    json!({"type": "signature_delta", "signature": block.get("signature").cloned().unwrap_or(json!(""))}),
                ],
            ),
            "tool_use" => {
                let mut empty = block.clone();
                empty["input"] = json!({});
                let input = block
                    .get("input")
                    .map(Value::to_string)
                    .unwrap_or_else(|| "{}".to_owned());
                (
                    empty,
                    vec![json!({"type": "input_json_delta", "partial_json": input})],
                )
            }
            // Blocks that arrive whole in their start event (redacted thinking, server tool results).
            _ => (block.clone(), vec![]),
        };
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": i, "content_block": empty}),
        );
        for d in deltas {
            event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": i, "delta": d}),
            );
        }
        event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": i}),
        );
    }
    let mut delta = json!({"stop_reason": message.get("stop_reason").cloned().unwrap_or(json!("end_turn")),
        "stop_sequence": message.get("stop_sequence").cloned().unwrap_or(Value::Null)});
    if let Some(d) = message.get("stop_details") {
        delta["stop_details"] = d.clone();
    }
    event(
        "message_delta",
        json!({"type": "message_delta", "delta": delta, "usage": usage}),
    );
    event("message_stop", json!({"type": "message_stop"}));
    out
}
