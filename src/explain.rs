//! `claude-balancer explain --config FILE REQUEST.json`: for a saved request, the route it takes,
//! every candidate, and why each is kept, skipped or placed where it is. It plans exactly as a
//! request does (the same route table, conditions and fit check), with every provider healthy
//! and nothing sent anywhere.

use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use crate::config::{Capabilities, Conditions, Config};
use crate::dispatch::{ChatFront, Front, Inbound};
use crate::routing::PlanContext;
use crate::routing::fit::{self, thousands};
use crate::routing::health::HealthBook;
use crate::state::Runtime;
use crate::upstream::ClientPool;

/// A saved request: `{"headers": {...}, "body": {...}, "path": "/v1/messages"}`, or a body alone.
struct Saved {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

fn saved(file: &[u8]) -> Result<Saved, String> {
    let value: Value =
        serde_json::from_slice(file).map_err(|e| format!("the request file is not JSON: {e}"))?;
    let wrapped = value.get("body").is_some() && value.get("messages").is_none();
    if !wrapped {
        return Ok(Saved {
            path: "/v1/messages".into(),
            headers: HeaderMap::new(),
            body: Bytes::copy_from_slice(file),
        });
    }
    let mut headers = HeaderMap::new();
    if let Some(h) = value.get("headers").and_then(Value::as_object) {
        for (name, v) in h {
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&text),
            ) else {
                return Err(format!("headers.{name}: not a valid header"));
            };
            headers.append(n, v);
        }
    }
    let body = match value.get("body") {
        Some(Value::String(s)) => Bytes::from(s.clone()),
        Some(b) => Bytes::from(serde_json::to_vec(b).unwrap_or_default()),
        None => Bytes::new(),
    };
    let path = value
        .get("path")
        .and_then(Value::as_str)
        .unwrap_or("/v1/messages")
        .to_owned();
    Ok(Saved {
        path,
        headers,
        body,
    })
}

/// A request's `when:` conditions as written (`background: true, header x-route: cheap`).
pub fn conditions(c: &Conditions) -> String {
    let mut parts = Vec::new();
    let flags = [
        ("thinking", c.thinking),
        ("images", c.images),
        ("tools", c.tools),
        ("background", c.background),
        ("subagent", c.subagent),
    ];
    for (name, v) in flags {
        if let Some(v) = v {
            parts.push(format!("{name}: {v}"));
        }
    }
    if let Some(n) = c.min_input_tokens {
        parts.push(format!("min_input_tokens: {n}"));
    }
    for (name, glob) in &c.header {
        parts.push(format!("header {name}: {glob:?}"));
    }
    parts.join(", ")
}

/// Capabilities in a few words (`window 128k, output 8192, no images`); what is unknown is left out.
pub fn capabilities(c: &Capabilities) -> String {
    let mut parts = Vec::new();
    if let Some(w) = c.context_window {
        parts.push(format!("window {}", thousands(w)));
    }
    if let Some(o) = c.max_output_tokens {
        parts.push(format!("output {}", thousands(o)));
    }
    for (name, v) in [
        ("images", c.images),
        ("tools", c.tools),
        ("thinking", c.thinking),
    ] {
        if v == Some(false) {
            parts.push(format!("no {name}"));
        }
    }
    if parts.is_empty() {
        "capabilities unknown: assumed able".into()
    } else {
        parts.join(", ")
    }
}

/// The explanation of how `config` routes the saved request in `file`.
pub fn explain(config: Config, file: &[u8]) -> Result<String, String> {
    let saved = saved(file)?;
    let strategy = config.settings.selection_strategy;
    let runtime = Runtime::build(config, &ClientPool::default()).map_err(|e| e.to_string())?;
    let envelope = crate::inbound::body::parse_with(&saved.body, false)
        .map_err(|e| format!("the request is refused before routing: {}", e.message))?;
    let session = crate::inbound::session_id(&saved.headers, envelope.metadata_session.as_deref());
    let model = envelope.model.clone();
    let stream = envelope.stream;
    let mut inbound = Inbound::new(
        envelope,
        saved.body.clone(),
        saved.headers.clone(),
        None,
        session,
    );
    if saved.path.ends_with("/chat/completions") {
        inbound.front = Front::Chat(Arc::new(ChatFront::new(
            saved.body.clone(),
            model.clone(),
            stream,
        )));
    }
    let needs = inbound.needs();
    let health = HealthBook::new();
    let ctx = PlanContext {
        providers: &runtime.providers,
        health: &health,
        strategy,
        now: tokio::time::Instant::now(),
        needs: Some(needs),
        headers: &saved.headers,
        explain: true,
    };
    let mut out = String::new();
    let s = &needs.shape;
    let yes = |b: bool| if b { "yes" } else { "no" };
    let _ = writeln!(
        out,
        "request: {} model {model:?}, {}, kind {}",
        saved.path,
        if stream { "streaming" } else { "not streaming" },
        needs.kind().as_str(),
    );
    let _ = writeln!(
        out,
        "  needs: about {} input tokens (estimated from {} bytes), max_tokens {}, images {}, tools {}, thinking {}",
        needs.estimated(),
        saved.body.len(),
        s.max_tokens.map_or("not set".into(), |m| m.to_string()),
        s.images,
        yes(s.tools),
        yes(s.thinking),
    );
    let Some(plan) = runtime.routes.plan(&model, &ctx) else {
        let _ = writeln!(
            out,
            "route: none matches {model:?}: the client would get 404 not_found_error"
        );
        return Ok(out);
    };
    let _ = writeln!(
        out,
        "route: {:?} (selection: {}; entries whose `when:` holds come first, then by priority; later matching routes are fallbacks)",
        &*plan.route,
        strategy.as_str()
    );
    let _ = writeln!(
        out,
        "candidates, in the order they would be tried (every provider healthy):"
    );
    let mut tried = 0;

    let mut too_long: Option<(u64, u64, u64)> = None;
    for (i, c) in plan.candidates.iter().enumerate() {
        let caps = crate::dispatch::fit_capabilities(&runtime, c, needs);

        let model_note = if c.passthrough { " (passthrough)" } else { "" };
        let from = if *c.route == *plan.route {
            String::new()
        } else {
            format!(", fallback from route {:?}", &*c.route)
        };
        let when = runtime
            .config
            .routes
            .iter()
            .find(|r| r.pattern == *c.route)
            .and_then(|r| r.entries.get(c.entry))
            .map(|e| conditions(&e.when))
            .filter(|w| !w.is_empty())
            .map_or(String::new(), |w| format!(", when {{{w}}} holds"));
        let judged =
            crate::dispatch::judge(&runtime, &caps, needs, plan.candidates[i + 1..].iter());
        let verdict = match judged {
            crate::dispatch::Judgement::Later => {
                tried += 1;
                "kept, tried after the candidates that can think: the request asks for a thinking \
                 budget and this model cannot think"
                    .into()
            }
            crate::dispatch::Judgement::Try => {
                tried += 1;
                let reserve = fit::output_reserve(&caps, needs);
                match caps.context_window {
                    Some(w) => format!(
                        "kept: needs about {} tokens with its output ({reserve}), window {}",
                        thousands(needs.input_tokens().saturating_add(reserve)),
                        thousands(w)
                    ),
                    None => "kept: no window known, assumed large enough".into(),
                }
            }
            crate::dispatch::Judgement::Skip(m) => {
                fit::keep_largest(&mut too_long, &m);
                m.to_string()
            }
        };
        let _ = writeln!(
            out,
            "  {}. {} ({}) -> {}{model_note}, priority {}{when}{from} [{}]\n     {verdict}",
            i + 1,
            c.provider.config.name,
            c.provider.config.kind.as_str(),
            c.upstream_model,
            c.priority,
            capabilities(&caps),
        );
    }
    if plan.candidates.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    if !plan.passed_over.is_empty() {
        let _ = writeln!(out, "left out:");
        for (provider, route, why) in &plan.passed_over {
            let _ = writeln!(out, "  - {provider} (route {:?}): {why}", &**route);
        }
    }
    let outcome = if tried > 0 {
        format!(
            "{tried} candidate{} would be tried",
            if tried == 1 { "" } else { "s" }
        )
    } else if let Some((input, output, window)) = too_long {
        format!(
            "no candidate can hold it: the client would get 400 \"{}\"",
            fit::too_long_words(input, output, window)
        )
    } else if plan.candidates.is_empty() {
        "no candidate: the client would get 503".into()
    } else {
        "no candidate can serve it: the client would get 400 invalid_request_error".into()
    };
    let _ = writeln!(
        out,
        "outcome: {outcome}{}",
        if needs.was_counted() {
            format!(
                " (the local tokenizer counted {} input tokens)",
                needs.counted()
            )
        } else {
            String::new()
        }
    );
    Ok(out)
}
