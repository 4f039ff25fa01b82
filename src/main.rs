//! The `claude-balancer` command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use claude_balancer::config::{self, Config};
use claude_balancer::routing::health::HealthBook;
use claude_balancer::routing::{PlanContext, RouteTable};
use claude_balancer::state::AppState;
use claude_balancer::{server, upstream};
use tokio::net::TcpListener;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(
    name = "claude-balancer",
    version,
    about = "A gateway between Claude Code and many model providers"
)]
struct Cli {
    /// The configuration file.
    #[arg(long, short, default_value = "config.yaml", global = true)]
    config: PathBuf,
    /// Listen address (overrides settings.host).
    #[arg(long)]
    host: Option<String>,
    /// Listen port (overrides settings.port).
    #[arg(long)]
    port: Option<u16>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate the configuration and print each route with its ordered candidates, their
    /// capabilities and `when:` conditions.
    Check,
    /// For a saved request (its body, or `{"headers": {...}, "body": {...}}`), print the route it
    /// takes, every candidate and why it is kept, skipped or placed where it is.
    Explain {
        /// The saved request (JSON).
        request: PathBuf,
    },
    /// Print usage and cost from the usage file (`settings.usage.path`) as a table.
    Usage {
        /// Start: a date (2026-12-01), an RFC 3339 time or Unix seconds (default: 24 hours before `to`).
        #[arg(long)]
        from: Option<String>,
        /// End, exclusive (default: now).
        #[arg(long)]
        to: Option<String>,
        /// Comma-separated: client, provider, model, route.
        #[arg(long = "group-by")]
        group_by: Option<String>,
        /// hour or day (default: one row per group).
        #[arg(long)]
        bucket: Option<String>,
    },
}

/// `claude-balancer usage`: the same query as `GET /usage`, read from the file, as a table.
fn print_usage(
    state: &config::StateSettings,
    path: &str,
    from: Option<String>,
    to: Option<String>,
    group_by: Option<String>,
    bucket: Option<String>,
) -> ExitCode {
    use claude_balancer::usage;
    if path.trim().is_empty() {
        eprintln!("usage is not recorded: settings.usage.path is empty");
        return ExitCode::from(2);
    }
    let get = |key: &str| match key {
        "from" => from.clone(),
        "to" => to.clone(),
        "group_by" => group_by.clone(),
        "bucket" => bucket.clone(),
        _ => None,
    };
    let query = match usage::Query::from_params(get, std::time::SystemTime::now()) {
        Ok(q) => q,
        Err(e) => {
            eprintln!("{}", e.replacen("group_by", "--group-by", 1));
            return ExitCode::from(2);
        }
    };
    // With the Redis backend, the cluster's usage (as GET /usage); else, or if Redis does not
    // answer, this instance's file.
    let mut source = path.to_owned();
    let mut answer = None;
    if state.backend == config::StateBackend::Redis {
        let shared = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| rt.block_on(claude_balancer::cluster::usage_of(state, &query)));
        match shared {
            Ok(Some(a)) => {
                source = "the cluster's usage in redis".to_owned();
                answer = Some(a);
            }
            Ok(None) => {}
            Err(e) => eprintln!("redis: {e}; showing this instance's file"),
        }
    }
    let answer = match answer {
        Some(a) => Ok(a),
        None => usage::query(std::path::Path::new(path), &query),
    };
    match answer {
        Ok((rows, totals)) => {
            println!(
                "usage from {} to {} ({source})",
                humantime::format_rfc3339_seconds(query.from),
                humantime::format_rfc3339_seconds(query.to)
            );
            print!("{}", usage::table(&query, &rows, &totals));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{path}: {e}");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // TLS (providers, proxies, `rediss://`) for the server and for `check` alike.
    upstream::install_crypto_provider();
    let loaded = match config::load_file(&cli.config) {
        Ok(l) => l,
        Err(errors) => {
            eprintln!(
                "{}: the configuration has {} error(s):",
                cli.config.display(),
                errors.0.len()
            );
            for e in &errors.0 {
                eprintln!("  error: {e}");
            }
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Usage {
        from,
        to,
        group_by,
        bucket,
    }) = &cli.command
    {
        return print_usage(
            &loaded.config.settings.state,
            &loaded.config.settings.usage.path,
            from.clone(),
            to.clone(),
            group_by.clone(),
            bucket.clone(),
        );
    }
    if let Some(Command::Explain { request }) = &cli.command {
        let file = match std::fs::read(request) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("{}: {e}", request.display());
                return ExitCode::from(2);
            }
        };
        return match claude_balancer::explain::explain(loaded.config, &file) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", request.display());
                ExitCode::from(2)
            }
        };
    }
    if let Some(Command::Check) = cli.command {
        for w in &loaded.warnings {
            println!("warning: {w}");
        }
        print_routes(&loaded.config);
        print_state_backend(&loaded.config.settings.state);
        println!("{}: OK", cli.config.display());
        return ExitCode::SUCCESS;
    }
    // Log lines are buffered: the guard writes out the last of them when dropped.
    let log_guard = match claude_balancer::observability::logging::init(&loaded.config.settings) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    for w in &loaded.warnings {
        tracing::warn!("config: {w}");
    }
    // One single-threaded runtime per core (see `server::serve_on`): this one accepts and serves,
    // the others serve the connections it hands them.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            drop(log_guard);
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let workers = match Workers::start(worker_count().saturating_sub(1)) {
        Ok(w) => w,
        Err(e) => {
            drop(log_guard);
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut handles = vec![runtime.handle().clone()];
    handles.extend(workers.handles.iter().cloned());
    let result = runtime.block_on(run(cli, loaded.config, handles));
    workers.stop();
    // A blocking task stuck (a DNS lookup) must not hold the exit or the last log lines back.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    drop(log_guard);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// How many runtimes serve connections: `TOKIO_WORKER_THREADS` if set, else one per core.
fn worker_count() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The single-threaded runtimes beside the main one, each on its own thread, driven until
/// [`Workers::stop`].
struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    threads: Vec<(
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<()>,
    )>,
}

impl Workers {
    fn start(count: usize) -> std::io::Result<Self> {
        let mut workers = Self {
            handles: Vec::new(),
            threads: Vec::new(),
        };
        for n in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            workers.handles.push(runtime.handle().clone());
            let thread = std::thread::Builder::new()
                .name(format!("worker-{}", n + 1))
                .spawn(move || {
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
                })?;
            workers.threads.push((stop, thread));
        }
        Ok(workers)
    }

    fn stop(self) {
        for (stop, thread) in self.threads {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

async fn run(cli: Cli, config: Config, workers: Vec<tokio::runtime::Handle>) -> Result<(), String> {
    let host = cli.host.unwrap_or_else(|| config.settings.host.clone());
    let port = cli.port.unwrap_or(config.settings.port);
    // Every client connection holds a descriptor: the soft limit (often 1,024) is raised to the
    // hard one, so many Claude Code sessions and their streams fit.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open file limit"),
        Err(e) => tracing::warn!("cannot raise the open file limit: {e}"),
    }
    let state = AppState::new(config, Some(cli.config.clone()))
        .map_err(|e| format!("configuration: {e}"))?;
    let listener = TcpListener::bind((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot listen on {host}:{port}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let runtime = state.runtime();
    tracing::info!(
        address = %addr,
        providers = runtime.providers.len(),
        routes = runtime.config.routes.len(),
        strategy = runtime.config.settings.selection_strategy.as_str(),
        "claude-balancer listening; set ANTHROPIC_BASE_URL=http://{addr}"
    );
    for r in &runtime.config.routes {
        let names: Vec<&str> = r.entries.iter().map(|e| e.provider.as_str()).collect();
        tracing::info!(route = %r.pattern, providers = ?names, "route");
    }
    let loopback = addr.ip().is_loopback();
    if !loopback && !runtime.config.settings.auth.enabled {
        tracing::warn!(address = %addr, "listening beyond loopback without inbound keys: anyone who can reach this address can use your providers (set settings.auth)");
    }
    #[cfg(unix)]
    claude_balancer::reload::on_sighup(Arc::clone(&state));
    let _watcher = if runtime.config.settings.reload {
        match claude_balancer::reload::watch(Arc::clone(&state), cli.config.clone()) {
            Ok(w) => {
                tracing::info!(file = %cli.config.display(), "watching the configuration file for changes");
                Some(w)
            }
            Err(e) => {
                tracing::warn!("{e}");
                None
            }
        }
    } else {
        None
    };
    drop(runtime);
    let usage = state.usage.clone();
    let cluster = state.cluster.clone();
    server::serve_on(listener, state, shutdown_signal(), &workers)
        .await
        .map_err(|e| format!("server error: {e}"))?;
    if let Some(cluster) = cluster {
        // The last second of usage, to the cluster's.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), cluster.push_usage()).await;
    }
    if let Some(usage) = usage {
        // The last second of usage, before the process ends.
        tokio::task::spawn_blocking(move || usage.flush())
            .await
            .ok();
    }
    tracing::info!("shut down");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutdown requested");
}

/// `check`: the state backend, and for Redis whether it answers now (the balancer starts and
/// serves either way, on local state while Redis is down).
fn print_state_backend(state: &config::StateSettings) {
    print!("state backend: {}", state.backend.as_str());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let probe = match runtime {
        Ok(rt) => rt.block_on(claude_balancer::cluster::probe(state)),
        Err(e) => Err(e.to_string()),
    };
    match probe {
        Ok(None) => println!(" (this instance only)"),
        Ok(Some(url)) => println!(" at {url}: reachable"),
        Err(e) => println!(
            ": unreachable ({e}); the balancer would serve on local state until it answers"
        ),
    }
}

/// `check`: each route and its candidates in the order a request would try them (all healthy).
fn print_routes(config: &Config) {
    println!("providers:");
    for p in &config.providers {
        let state = if !p.enabled {
            "disabled".to_owned()
        } else if let Some(r) = &p.disabled_reason {
            format!("disabled: {r}")
        } else if matches!(p.auth, config::Auth::None) {
            "enabled, no credentials".to_owned()
        } else {
            "enabled".to_owned()
        };
        println!(
            "  {} ({}) {} [{state}]",
            p.name,
            p.kind.as_str(),
            p.base_url
        );
    }
    println!("routes (exact names first, then patterns in file order):");
    let table = RouteTable::new(&config.routes, &config.models);
    let clients = upstream::ClientPool::default();
    let providers = match claude_balancer::state::Runtime::build(config.clone(), &clients) {
        Ok(rt) => rt.providers,
        Err(e) => {
            println!("  (cannot build providers: {e})");
            return;
        }
    };
    let health = HealthBook::new();
    for r in &config.routes {
        let headers = http::HeaderMap::new();
        // No request: every entry is shown, its conditions beside it.
        let ctx = PlanContext {
            providers: &providers,
            health: &health,
            strategy: config::Strategy::Priority,
            now: tokio::time::Instant::now(),
            needs: None,
            headers: &headers,
            explain: true,
        };
        // The route's own pattern as a model name shows its candidates including fallbacks.
        let sample = r.pattern.replace(['*', '?'], "");
        println!("  {:?}", r.pattern);
        match table
            .plan(&sample, &ctx)
            .filter(|p| &*p.route == r.pattern.as_str())
        {
            Some(plan) => {
                // The route's own entries, in the order a request considers them (entries with
                // `when:` first, then by priority), each with its conditions and capabilities;
                // then the fallbacks later routes add.
                let mut order: Vec<usize> = (0..r.entries.len())
                    .filter(|&i| {
                        let e = &r.entries[i];
                        e.enabled
                            && providers
                                .get(&e.provider)
                                .is_some_and(|p| p.config.usable())
                    })
                    .collect();
                order.sort_by_key(|&i| (r.entries[i].when.is_empty(), r.entries[i].priority));
                let mut n = 0;
                for i in order {
                    let e = &r.entries[i];
                    let (model, caps) = match &e.model {
                        config::ModelMapping::Passthrough => {
                            ("passthrough".to_owned(), e.capabilities)
                        }
                        config::ModelMapping::Name(m) => {
                            (m.clone(), e.capabilities.or(table.capabilities(m)))
                        }
                    };
                    let when = claude_balancer::explain::conditions(&e.when);
                    let when = if when.is_empty() {
                        String::new()
                    } else {
                        format!(", when {{{when}}}")
                    };
                    let caps = match (&e.model, caps.is_empty()) {
                        (config::ModelMapping::Passthrough, true) => {
                            "capabilities of the model asked for".to_owned()
                        }
                        (config::ModelMapping::Passthrough, false) => format!(
                            "{}; the rest from the model asked for",
                            claude_balancer::explain::capabilities(&caps)
                        ),
                        _ => claude_balancer::explain::capabilities(&caps),
                    };
                    n += 1;
                    println!(
                        "    {n}. {} -> model {model}, priority {}{when} [{caps}]",
                        e.provider, e.priority
                    );
                }
                for c in plan.candidates.iter().filter(|c| *c.route != *r.pattern) {
                    let model = if c.passthrough {
                        "passthrough".to_owned()
                    } else {
                        c.upstream_model.clone()
                    };
                    let caps = claude_balancer::explain::capabilities(&table.capabilities_of(c));
                    n += 1;
                    println!(
                        "    {n}. {} -> model {model}, priority {} (fallback from route {:?}) [{caps}]",
                        c.provider.config.name, c.priority, &*c.route
                    );
                }
                if plan.candidates.is_empty() {
                    println!("    (no enabled provider)");
                }
            }
            None => println!("    (shadowed by an earlier route for the name {sample:?})"),
        }
    }
}
