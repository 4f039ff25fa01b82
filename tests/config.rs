//! The configuration file: the earlier program's files, expansion, errors with paths, the `check` command.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use std::process::Command;
use std::time::Duration;

use claude_balancer::config::{Auth, ModelMapping, ProviderKind, Strategy, load_file, load_str};

fn no_env(_: &str) -> Option<String> {
    None
}

#[test]
fn the_earlier_programs_file_loads_unchanged() {
    let loaded = load_str(include_str!("fixtures/earlier-config.yaml"), &no_env).unwrap();
    let c = &loaded.config;
    assert_eq!(c.providers.len(), 4);
    assert!(!c.providers[0].enabled);
    assert_eq!(c.providers[0].auth, Auth::Passthrough);
    assert!(c.providers[0].proxy.is_some());
    assert_eq!(c.providers[1].auth, Auth::None);
    assert!(matches!(&c.providers[2].auth, Auth::Bearer(k) if k.expose() == "sk-literal-token"));
    assert_eq!(c.providers[3].kind, ProviderKind::Openai);
    assert_eq!(c.routes.len(), 2);
    assert_eq!(c.routes[0].pattern, "*sonnet*");
    assert_eq!(
        c.routes[0].entries[3].model,
        ModelMapping::Name("google/gemini-2.5-pro".into())
    );
    let s = &c.settings;
    assert_eq!(s.failure_cooldown, Duration::from_secs(180));
    assert_eq!(s.unhealthy_threshold, 2);
    assert!(s.unhealthy_http_codes.contains(529) && !s.unhealthy_http_codes.contains(401));
    assert!(s.unhealthy_response_body_patterns.is_some());
    assert_eq!(s.max_cache_size, 1000);
    assert_eq!(s.port, 9090);
    assert!(s.reload);
    // The keys it had that mean nothing here are warnings, each named.
    let w = loaded.warnings.join("\n");
    for key in [
        "settings.oauth",
        "settings.testing",
        "settings.failover_error_types",
        "settings.failover_http_codes",
        "settings.idle_recovery_interval",
        "settings.client_disconnect_watchdog",
        "settings.timeouts.streaming.chunk_timeout",
        "settings.timeouts.health_check",
        "providers[1].streaming_mode",
        "providers[2].account_email",
    ] {
        assert!(w.contains(key), "no warning for {key}:\n{w}");
    }
    assert!(w.contains("OPENROUTER_API_KEY is not set"), "{w}");
}

#[test]
fn the_earlier_readme_example_loads() {
    let yaml = r#"
providers:
  - name: "GAC"
    type: "anthropic"
    base_url: "https://gaccode.com/claudecode"
    auth_type: "api_key"
    auth_value: "your-api-key-here"
    enabled: true
  - name: "Together"
    type: "openai"
    base_url: "https://api.together.xyz/v1"
    auth_type: "api_key"
    auth_value: "${TOGETHER_API_KEY}"
    enabled: true
model_routes:
  "*haiku*":
    - provider: "Together"
      model: "meta-llama/Meta-Llama-3.1-405B-Instruct-Turbo"
      priority: 1
    - provider: "GAC"
      model: "passthrough"
      priority: 2
settings:
  cooldown_seconds: 90
  timeout_seconds: 300
  log_level: "INFO"
  max_cache_size: 1000
"#;
    let loaded = load_str(yaml, &|n| {
        (n == "TOGETHER_API_KEY").then(|| "tg-key".to_owned())
    })
    .unwrap();
    let c = loaded.config;
    assert_eq!(c.settings.failure_cooldown, Duration::from_secs(90));
    assert!(matches!(&c.providers[1].auth, Auth::Bearer(k) if k.expose() == "tg-key"));
    assert_eq!(c.settings.selection_strategy, Strategy::Priority);
}

#[test]
fn the_shipped_example_loads_with_no_variables_set() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.yaml"))
        .unwrap();
    let loaded = load_str(&text, &no_env).unwrap();
    assert!(loaded.config.providers.len() >= 3);
    // Every key it sets is a known key.
    assert!(
        !loaded.warnings.iter().any(|w| w.contains("unknown key")),
        "{:?}",
        loaded.warnings
    );
}

/// The README's three instances on one machine: the shipped example becomes instance `gw-2` of a
/// Redis cluster with its own log file when `STATE_BACKEND` and `INSTANCE_NAME` are set, and is a
/// single memory-backed instance when they are not.
#[test]
fn the_shipped_example_becomes_a_cluster_instance_from_the_environment() {
    use claude_balancer::config::StateBackend;
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.yaml"))
        .unwrap();
    let alone = load_str(&text, &no_env).unwrap().config.settings;
    assert_eq!(alone.state.backend, StateBackend::Memory);
    assert_eq!(alone.state.instance_name, None);
    assert_eq!(alone.log_file_path, "logs/logs.jsonl");

    let env = |n: &str| match n {
        "STATE_BACKEND" => Some("redis".to_owned()),
        "INSTANCE_NAME" => Some("gw-2".to_owned()),
        _ => None,
    };
    let member = load_str(&text, &env).unwrap().config.settings;
    assert_eq!(member.state.backend, StateBackend::Redis);
    assert_eq!(member.state.instance_name.as_deref(), Some("gw-2"));
    assert_eq!(member.log_file_path, "logs/gw-2.jsonl");
    assert_eq!(
        member
            .state
            .redis_url
            .as_ref()
            .map(|u| u.expose().to_owned()),
        Some("redis://127.0.0.1:6379/0".to_owned())
    );
    assert_eq!(member.state.key_prefix, "claude-balancer:");
}

#[test]
fn variables_expand_in_any_string_value() {
    let yaml = r#"
providers:
  - name: "${NAME:-Main}"
    type: anthropic
    base_url: "${BASE}/relay"
    auth_type: api_key
    auth_value: "${KEY}"
model_routes:
  "*":
    - provider: Main
settings:
  port: "${PORT:-9191}"
  log_color: "${COLOR:-false}"
"#;
    let env = |n: &str| match n {
        "BASE" => Some("https://example.com".to_owned()),
        "KEY" => Some("k-1".to_owned()),
        _ => None,
    };
    let c = load_str(yaml, &env).unwrap().config;
    assert_eq!(c.providers[0].name, "Main");
    assert_eq!(c.providers[0].base_url, "https://example.com/relay");
    assert!(matches!(&c.providers[0].auth, Auth::ApiKey(k) if k.expose() == "k-1"));
    assert_eq!(c.settings.port, 9191);
    assert!(!c.settings.log_color);
    assert_eq!(c.routes[0].entries[0].model, ModelMapping::Passthrough);
}

#[test]
fn a_base_url_that_cannot_be_sent_as_it_is_written_is_refused_at_load() {
    let yaml = |url: &str| {
        format!(
            "providers:\n  - {{name: P, type: anthropic, base_url: \"{url}\", auth_type: api_key, auth_value: k}}\nmodel_routes:\n  \"*\":\n    - {{provider: P}}\n"
        )
    };
    for url in ["https://münchen.example/v1", "https://x.example/a path"] {
        let errors = load_str(&yaml(url), &no_env).unwrap_err().0;
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("providers[0].base_url: expected an absolute http(s) URL")),
            "{errors:?}"
        );
    }
    for url in [
        "https://xn--mnchen-3ya.example:8443/v1",
        // Credentials in the URL are sent as Basic authorization.
        "https://user:p%40ss@relay.example/v1",
    ] {
        assert!(load_str(&yaml(url), &no_env).is_ok(), "{url}");
    }
}

#[test]
fn every_problem_is_reported_at_once_with_its_path() {
    let yaml = r#"
providers:
  - name: OpenRouter
    type: openai
    base_url: "https://openrouter.ai/api/v1"
    auth_type: api_key
    auth_value: k
  - name: OpenRouter
    type: anthropic
    base_url: "https://x.example"
    auth_type: api_key
    auth_value: k
  - name: Broken
    type: grpc
    base_url: "ftp://nowhere"
    auth_type: magic
    auth_value: k
    proxy: "gopher://proxy"
  - type: anthropic
model_routes:
  "*sonnet*":
    - provider: OpenRouter
    - provider: OpenRoutr
      priority: first
settings:
  selection_strategy: fastest
  port: 70000
  failure_cooldown: -1
  unhealthy_http_codes: [200, 999]
  unhealthy_response_body_patterns: ["(unclosed"]
  log_level: LOUD
"#;
    let errors = load_str(yaml, &no_env).unwrap_err().0;
    let expect = [
        "providers[1].name: duplicate provider name \"OpenRouter\"",
        "providers[2].type:",
        "providers[2].base_url:",
        "providers[2].auth_type:",
        "providers[2].proxy:",
        "providers[3].name: is required",
        "providers[3].base_url: is required",
        "model_routes.\"*sonnet*\"[1].provider: no provider named \"OpenRoutr\" (did you mean \"OpenRouter\"?)",
        "model_routes.\"*sonnet*\"[1].priority:",
        "settings.selection_strategy:",
        "settings.port:",
        "settings.failure_cooldown:",
        "settings.unhealthy_http_codes[1]:",
        "settings.unhealthy_response_body_patterns[0]: invalid regex",
        "settings.log_level:",
    ];
    for e in expect {
        assert!(
            errors.iter().any(|got| got.starts_with(e)),
            "missing {e:?} in\n{}",
            errors.join("\n")
        );
    }
}

#[test]
fn unknown_keys_are_warnings_with_suggestions() {
    let yaml = "providers:\n  - {name: P, type: anthropic, base_url: \"https://x.example\", auth_type: api_key, auth_value: k, enabeld: true}\nmodel_routes: {}\nsettings:\n  selection_stratgy: round_robin\n  future_feature: 1\nextra_top: 1\n";
    let loaded = load_str(yaml, &no_env).unwrap();
    let w = loaded.warnings.join("\n");
    assert!(
        w.contains("providers[0].enabeld: unknown key, ignored (did you mean \"enabled\"?)"),
        "{w}"
    );
    assert!(w.contains("settings.selection_stratgy: unknown key, ignored (did you mean \"selection_strategy\"?)"), "{w}");
    assert!(w.contains("settings.future_feature: unknown key"), "{w}");
    assert!(w.contains("extra_top: unknown key"), "{w}");
}

#[test]
fn oauth_disables_the_provider_without_stopping_the_balancer() {
    let yaml = "providers:\n  - {name: P, type: anthropic, base_url: \"https://x.example\", auth_type: auth_token, auth_value: oauth}\nmodel_routes: {}\n";
    let loaded = load_str(yaml, &no_env).unwrap();
    assert!(!loaded.config.providers[0].usable());
    assert!(loaded.warnings.join("\n").contains("oauth"));
}

#[test]
fn yaml_syntax_errors_are_reported() {
    let e = load_str("providers: [\n  - broken", &no_env).unwrap_err();
    assert!(e.0[0].starts_with("YAML syntax"), "{e}");
    let e = load_file(std::path::Path::new("/nonexistent/config.yaml")).unwrap_err();
    assert!(e.0[0].contains("cannot read"));
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_claude-balancer"))
}

#[test]
fn check_prints_routes_with_ordered_candidates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(
        &path,
        "providers:\n  - {name: A, type: anthropic, base_url: \"https://a.example\", auth_type: api_key, auth_value: \"${CB_CHECK_KEY}\"}\n  - {name: B, type: openai, base_url: \"https://b.example/v1\", auth_type: api_key, auth_value: k}\nmodel_routes:\n  \"*sonnet*\":\n    - {provider: B, model: vendor/x, priority: 2}\n    - {provider: A, model: passthrough, priority: 1}\n  \"*\":\n    - {provider: B, model: catch}\n",
    )
    .unwrap();
    let out = bin()
        .args(["check", "--config"])
        .arg(&path)
        .env("CB_CHECK_KEY", "sk-x")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = stdout
        .find("1. A -> model passthrough, priority 1")
        .unwrap_or_else(|| panic!("{stdout}"));
    let b = stdout
        .find("2. B -> model vendor/x, priority 2")
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(a < b);
    assert!(
        stdout.contains("A (anthropic) https://a.example [enabled]"),
        "{stdout}"
    );
    assert!(!stdout.contains("sk-x"));

    std::fs::write(&path, "providers:\n  - {name: A, type: nope}\n").unwrap();
    let out = bin()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("providers[0].type") && stderr.contains("providers[0].base_url"),
        "{stderr}"
    );
}

/// Keys the earlier program had that this balancer reads but has no use for are named as ignored,
/// like every other such key, instead of being silently dropped.
#[test]
fn keys_without_a_use_here_are_reported_as_ignored() {
    let yaml = "providers: []\nmodel_routes: {}\nsettings:\n  timeouts:\n    non_streaming: {pool_timeout: 5}\n    streaming: {pool_timeout: 5}\n  deduplication: {sse_error_cleanup_delay: 3}\n  reload_includes: [\"*.py\"]\n";
    let loaded = load_str(yaml, &no_env).unwrap();
    let w = loaded.warnings.join("\n");
    for path in [
        "settings.timeouts.non_streaming.pool_timeout",
        "settings.timeouts.streaming.pool_timeout",
        "settings.deduplication.sse_error_cleanup_delay",
        "settings.reload_includes",
    ] {
        assert!(
            w.contains(&format!("{path}: accepted for compatibility and ignored")),
            "{path} not reported: {w}"
        );
    }
}

/// A YAML syntax error names the line and column and never quotes the file: the lines around it
/// may hold keys, and the error reaches the console, the log file and the reload endpoint.
#[test]
fn yaml_syntax_errors_never_quote_the_file() {
    let yaml = "providers:\n  - name: A\n    type: anthropic\n    base_url: \"http://x\"\n    auth_type: api_key\n    auth_value: \"sk-secret-value-123456\"\n  bad: [unclosed\nsettings:\n  auth:\n    admin_keys: [\"adm-secret-999999\"]\n";
    let err = load_str(yaml, &no_env).unwrap_err().to_string();
    assert!(err.contains("line 7"), "{err}");
    assert!(!err.contains("sk-secret-value-123456"), "{err}");
    assert!(!err.contains("adm-secret-999999"), "{err}");
    assert!(!err.contains("auth_type"), "no neighbouring line: {err}");
}

#[test]
fn the_state_backend_keys_load_and_are_checked() {
    let yaml = |state: &str| {
        format!(
            "providers:\n  - {{name: P, type: anthropic, base_url: \"https://x.example\", auth_type: api_key, auth_value: k}}\nmodel_routes:\n  \"*\":\n    - {{provider: P}}\nsettings:\n  state:\n{state}"
        )
    };
    // The default: memory, the documented prefix, no URL needed.
    let c = load_str(&yaml("    backend: memory\n"), &no_env)
        .unwrap()
        .config;
    let s = &c.settings.state;
    assert_eq!(s.backend, claude_balancer::config::StateBackend::Memory);
    assert_eq!(s.key_prefix, "claude-balancer:");
    assert!(s.redis_url.is_none() && s.instance_name.is_none());

    // Redis, with a password from the environment, a prefix and a name.
    let env = |v: &str| (v == "REDIS_PASSWORD").then(|| "hunter2-long".to_owned());
    let c = load_str(
        &yaml("    backend: redis\n    redis:\n      url: \"redis://:${REDIS_PASSWORD}@127.0.0.1:6379/0\"\n      key_prefix: \"cb:\"\n    instance_name: gw-1\n"),
        &env,
    )
    .unwrap()
    .config;
    let s = &c.settings.state;
    assert_eq!(s.backend, claude_balancer::config::StateBackend::Redis);
    assert_eq!(
        s.redis_url.as_ref().unwrap().expose(),
        "redis://:hunter2-long@127.0.0.1:6379/0"
    );
    assert_eq!(
        (s.key_prefix.as_str(), s.instance_name.as_deref()),
        ("cb:", Some("gw-1"))
    );
    assert!(
        !format!("{c:?}").contains("hunter2-long"),
        "the URL is a secret"
    );

    // Redis without a URL, a URL of another scheme, an unknown backend, an unset variable.
    let errors = |state: &str| load_str(&yaml(state), &no_env).unwrap_err().0;
    let e = errors("    backend: redis\n");
    assert!(
        e.iter()
            .any(|e| e.starts_with("settings.state.redis.url: required")),
        "{e:?}"
    );
    let e = errors("    backend: redis\n    redis:\n      url: \"http://u:topsecret99@h:1\"\n");
    assert!(
        e.iter()
            .any(|e| e.starts_with("settings.state.redis.url: expected a redis://")),
        "{e:?}"
    );
    assert!(!e.join(" ").contains("topsecret99"), "{e:?}");
    let e = errors("    backend: etcd\n");
    assert!(
        e.iter()
            .any(|e| e.starts_with("settings.state.backend: expected memory or redis")),
        "{e:?}"
    );
    let e = errors("    backend: redis\n    redis:\n      url: \"redis://:${NOPE}@h:1\"\n");
    assert!(e.iter().any(|e| e.contains("${NOPE}")), "{e:?}");
}

#[test]
fn clients_pricing_and_usage_load_and_each_mistake_is_named() {
    let good = r#"
providers:
  - {name: A, type: anthropic, base_url: "https://a.example", auth_type: api_key, auth_value: k}
model_routes:
  "*":
    - provider: A
clients:
  - name: alice
    key: "${ALICE_KEY}"
    models: ["*sonnet*", "*haiku*"]
    limits:
      requests_per_minute: 30
      concurrent_requests: 4
      tokens: { window: "5h", max: 2000000 }
      budget_usd: { window: "30d", max: 50 }
  - name: bob
    key_sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
pricing:
  "deepseek/*": { input: 0.27, output: 1.10 }
settings:
  usage:
    path: "/var/lib/cb/usage.db"
"#;
    let env = |n: &str| (n == "ALICE_KEY").then(|| "sk-alice".to_owned());
    let c = load_str(good, &env).unwrap().config;
    assert_eq!(c.clients.len(), 2);
    let alice = &c.clients[0];
    assert_eq!(alice.models, vec!["*sonnet*", "*haiku*"]);
    assert_eq!(alice.limits.requests_per_minute, Some(30));
    assert_eq!(alice.limits.concurrent_requests, Some(4));
    let tokens = alice.limits.tokens.unwrap();
    assert_eq!((tokens.window.as_str(), tokens.max), ("5h", 2_000_000.0));
    assert_eq!(alice.limits.budget_usd.unwrap().window.as_str(), "30d");
    assert!(c.clients[1].limits.is_empty());
    // Cache prices default to Anthropic's rule: writes 1.25 times input, reads a tenth.
    let p = &c.pricing[0];
    assert_eq!(p.pattern, "deepseek/*");
    assert!((p.cache_write - 0.3375).abs() < 1e-12 && (p.cache_read - 0.027).abs() < 1e-12);
    assert_eq!(c.settings.usage.path, "/var/lib/cb/usage.db");
    assert_eq!(
        load_str(
            &good.replace("  usage:\n    path: \"/var/lib/cb/usage.db\"\n", ""),
            &env
        )
        .unwrap()
        .config
        .settings
        .usage
        .path,
        "data/usage.db"
    );

    let bad = r#"
providers:
  - {name: A, type: anthropic, base_url: "https://a.example", auth_type: api_key, auth_value: k}
model_routes:
  "*":
    - provider: A
clients:
  - name: alice
    key: "${UNSET_KEY}"
  - name: bob
    key: k1
    key_sha256: "00"
  - name: carol
    key_sha256: "not-hex"
  - name: dave
    key: same
    limits:
      tokens: { window: "2h", max: 10 }
      budget_usd: { window: "1d", max: 0 }
  - name: dave
    key: same
  - name: erin
    key: admin-key-1
  - name: frank
    key_sha256: "+f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
pricing:
  "gpt-*": { input: 1 }
settings:
  auth:
    admin_keys: ["admin-key-1"]
"#;
    let errors = load_str(bad, &no_env).unwrap_err().0.join("\n");
    for expected in [
        "clients[0].key: uses ${UNSET_KEY} which is not set",
        "clients[1]: give either key or key_sha256, not both",
        "clients[2].key_sha256: expected 64 hexadecimal digits",
        "clients[3].limits.tokens.window: expected one of 1m, 1h, 5h, 1d, 7d, 30d, found \"2h\"",
        "clients[3].limits.budget_usd.max: must be above 0",
        "clients[4].name: \"dave\" is used by another client",
        "clients: \"dave\" and \"dave\" have the same key",
        "pricing.\"gpt-*\": input and output prices are required",
        "clients: \"erin\" has a key of settings.auth.api_keys or admin_keys",
        "clients[6].key_sha256: expected 64 hexadecimal digits",
    ] {
        assert!(
            errors.contains(expected),
            "missing {expected:?} in:\n{errors}"
        );
    }
    assert!(
        !errors.contains("sk-") && !errors.contains("same\""),
        "{errors}"
    );
}
