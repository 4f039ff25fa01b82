//! Request hygiene for OpenAI-compatible providers: the Anthropic request fields and
//! `anthropic-beta` values such a provider cannot take, each translated where Chat Completions
//! has an equivalent and dropped otherwise, from one table ([`RULES`]). The conversion
//! ([`super::request::convert`]) builds its body from the fields it knows, so whatever this table
//! lists as dropped never reaches the provider; [`review`] names what one request lost, for the
//! debug log. Anthropic-native providers get the body byte for byte and are not concerned.

use serde_json::Value;

/// What happens to a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Sent in another form (the form named).
    Translated(&'static str),
    /// Not sent.
    Dropped,
}

/// One line of the table: a top-level field (or `field.member`, `tools[].member`, a header).
#[derive(Debug)]
pub struct Rule {
    pub field: &'static str,
    pub action: Action,
    pub why: &'static str,
}

pub const RULES: &[Rule] = &[
    Rule {
        field: "context_management",
        action: Action::Dropped,
        why: "no equivalent: the provider keeps old tool results and thinking in the context",
    },
    Rule {
        field: "output_config.effort",
        action: Action::Translated("reasoning_effort (or the dialect's reasoning field)"),
        why: "the same knob under OpenAI's name",
    },
    Rule {
        field: "output_config.format",
        action: Action::Translated("response_format"),
        why: "structured output under OpenAI's name",
    },
    Rule {
        field: "output_config",
        action: Action::Dropped,
        why: "its other members have no Chat Completions equivalent",
    },
    Rule {
        field: "tools[].defer_loading",
        action: Action::Dropped,
        why: "a deferred tool is loaded by Anthropic's tool search: the tool is left out",
    },
    Rule {
        field: "cache_control",
        action: Action::Dropped,
        why: "OpenAI-compatible providers cache prompts by themselves",
    },
    Rule {
        field: "metadata",
        action: Action::Dropped,
        why: "holds Claude Code's device and session ids, which are not the provider's business",
    },
    Rule {
        field: "container",
        action: Action::Dropped,
        why: "code execution containers exist only on Anthropic",
    },
    Rule {
        field: "mcp_servers",
        action: Action::Dropped,
        why: "the MCP connector runs only on Anthropic",
    },
    Rule {
        field: "service_tier",
        action: Action::Dropped,
        why: "Anthropic's priority tier",
    },
    Rule {
        field: "anthropic-beta",
        action: Action::Dropped,
        why: "Anthropic's beta flags mean nothing to an OpenAI-compatible API",
    },
];

/// A tool the client marked `defer_loading: true` (Anthropic's tool search loads it on demand).
pub fn deferred(tool: &Value) -> bool {
    tool.get("defer_loading").and_then(Value::as_bool) == Some(true)
}

fn rule(field: &str) -> Option<&'static Rule> {
    RULES.iter().find(|r| r.field == field)
}

fn describe(field: &str, detail: &str) -> Option<String> {
    let r = rule(field)?;
    Some(match r.action {
        Action::Translated(to) => format!("{field}{detail} translated to {to}"),
        Action::Dropped => format!("{field}{detail} dropped ({})", r.why),
    })
}

/// What converting this request for an OpenAI-compatible provider translates or drops, one line
/// each (`betas`: the client's `anthropic-beta` values).
pub fn review(body: &Value, betas: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for field in [
        "context_management",
        "metadata",
        "container",
        "mcp_servers",
        "service_tier",
    ] {
        if body.get(field).is_some() {
            out.extend(describe(field, ""));
        }
    }
    if let Some(oc) = body.get("output_config").and_then(Value::as_object) {
        for key in oc.keys() {
            let known = format!("output_config.{key}");
            match rule(&known) {
                Some(_) => out.extend(describe(&known, "")),
                None => out.extend(describe("output_config", &format!(".{key}"))),
            }
        }
    }
    if let Some(tools) = body.get("tools").and_then(Value::as_array) {
        for t in tools.iter().filter(|t| deferred(t)) {
            let name = t.get("name").and_then(Value::as_str).unwrap_or("?");
            out.extend(describe(
                "tools[].defer_loading",
                &format!(" (tool {name})"),
            ));
        }
    }
    for b in betas.iter().map(|b| b.trim()).filter(|b| !b.is_empty()) {
        out.extend(describe("anthropic-beta", &format!(" {b}")));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_field_claude_code_sends_that_chat_completions_lacks_is_named_once() {
        let body = json!({
            "model": "m", "max_tokens": 10, "messages": [],
            "context_management": {"edits": []},
            "output_config": {"effort": "high", "format": {"type": "json_schema", "schema": {}}, "task_budget": 5},
            "metadata": {"user_id": "u"},
            "tools": [{"name": "Bash", "input_schema": {}}, {"name": "Later", "input_schema": {}, "defer_loading": true}],
        });
        let got = review(&body, &["claude-code-20250219", " context-1m-2025-08-07"]);
        let starts: Vec<&str> = got
            .iter()
            .map(|l| {
                l.split(" (")
                    .next()
                    .unwrap()
                    .split(" translated")
                    .next()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            starts,
            [
                "context_management dropped",
                "metadata dropped",
                "output_config.effort",
                "output_config.format",
                "output_config.task_budget dropped",
                "tools[].defer_loading",
                "anthropic-beta claude-code-20250219 dropped",
                "anthropic-beta context-1m-2025-08-07 dropped",
            ]
        );
        assert!(got[2].contains("translated to reasoning_effort"), "{got:?}");
        assert!(got[5].contains("tool Later"), "{got:?}");
        assert!(review(&json!({"model": "m", "messages": []}), &[]).is_empty());
    }
}
