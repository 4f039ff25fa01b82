//! Shared state: the current [`Runtime`] (a compiled configuration, swapped atomically on reload)
//! and the books that outlive reloads (health, affinity, HTTP clients).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use tokio::time::Instant;

use crate::config::{Auth, Config, ConfigErrors, Loaded, load_file};
use crate::dedup::Dedup;
use crate::dispatch::FaultPolicy;
use crate::observability::metrics::Metrics;
use crate::observability::recent::Recent;
use crate::routing::RouteTable;
use crate::routing::affinity::AffinityBook;
use crate::routing::health::{HealthBook, HealthPolicy};
use crate::secret::{Redactor, Secret, url_password};
use crate::upstream::{ClientPool, Provider};

/// One loaded configuration, compiled for use. Immutable: a reload builds a new one.
#[derive(Debug)]
pub struct Runtime {
    pub config: Config,
    pub providers: HashMap<String, Arc<Provider>>,
    pub routes: RouteTable,
    /// What counts as a provider fault on `/v1/messages`.
    pub faults: FaultPolicy,
    /// count_tokens: anything but an answer is a fault of that provider's count_tokens.
    pub count_faults: FaultPolicy,
    /// The main health book's policy.
    pub health_policy: HealthPolicy,
    /// The count_tokens book's policy.
    pub count_policy: HealthPolicy,
    /// Every configured secret (provider keys, proxy and `base_url` passwords, inbound and admin
    /// keys), to mask in whatever leaves the process.
    pub redactor: Arc<Redactor>,
    /// `max_concurrent_requests` as permits; a response body holds one until it ends.
    pub limit: Option<Arc<tokio::sync::Semaphore>>,
    /// The named clients (`clients:`).
    pub clients: crate::clients::ClientTable,
    /// What requests cost (`pricing:` and the defaults).
    pub pricing: crate::pricing::Pricing,
    pub loaded_at: SystemTime,
}

impl Runtime {
    pub fn build(config: Config, clients: &ClientPool) -> Result<Self, ConfigErrors> {
        let mut providers = HashMap::with_capacity(config.providers.len());
        let mut errors = Vec::new();
        let t = &config.settings.timeouts;
        let connect = t.streaming.connect.max(t.non_streaming.connect);
        for (i, pc) in config.providers.iter().enumerate() {
            match clients.get(pc.proxy.as_ref(), connect) {
                Ok(client) => {
                    providers.insert(pc.name.clone(), Arc::new(Provider::new(pc.clone(), client)));
                }
                Err(e) => errors.push(format!("providers[{i}].proxy: {e}")),
            }
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let routes = RouteTable::new(&config.routes, &config.models);
        let settings = &config.settings;
        let limit = usize::try_from(settings.max_concurrent_requests)
            .ok()
            .filter(|n| *n > 0)
            .map(|n| {
                Arc::new(tokio::sync::Semaphore::new(
                    n.min(tokio::sync::Semaphore::MAX_PERMITS),
                ))
            });
        let redactor = Arc::new(configured_secrets(&config));
        Ok(Self {
            clients: crate::clients::ClientTable::new(&config.clients),
            pricing: crate::pricing::Pricing::new(&config.pricing),
            redactor,
            faults: FaultPolicy::new(settings),
            count_faults: FaultPolicy::every_status(),
            health_policy: HealthPolicy::for_messages(settings),
            count_policy: HealthPolicy::for_count_tokens(&settings.token_counting),
            limit,
            config,
            providers,
            routes,
            loaded_at: SystemTime::now(),
        })
    }
}

/// The redactor of every secret a configuration holds.
fn configured_secrets(config: &Config) -> Redactor {
    let mut secrets: Vec<&str> = Vec::new();
    for p in &config.providers {
        if let Auth::ApiKey(k) | Auth::Bearer(k) = &p.auth {
            secrets.push(k.expose());
        }
        for key in &p.keys {
            if let Auth::ApiKey(k) | Auth::Bearer(k) = &key.auth {
                secrets.push(k.expose());
            }
        }
        if let Some(proxy) = &p.proxy {
            secrets.push(proxy.expose());
            secrets.extend(url_password(proxy.expose()));
        }
        secrets.extend(url_password(&p.base_url));
    }
    let auth = &config.settings.auth;
    secrets.extend(
        auth.api_keys
            .iter()
            .chain(&auth.admin_keys)
            .map(Secret::expose),
    );
    for c in &config.clients {
        if let crate::config::ClientKey::Plain(k) = &c.key {
            secrets.push(k.expose());
        }
    }
    Redactor::new(secrets)
}

#[derive(Debug)]
pub struct AppState {
    pub runtime: ArcSwap<Runtime>,
    pub health: Arc<HealthBook>,
    /// count_tokens failures, kept apart: a relay without count_tokens keeps its chat traffic.
    pub count_tokens: Arc<HealthBook>,
    pub dedup: Dedup,
    /// Local token counts run on the blocking pool, this many at a time (one per core), so a
    /// burst of large bodies neither blocks the request threads nor takes every core.
    pub counting: Arc<tokio::sync::Semaphore>,
    /// The last local token count of each session's requests (text bytes, tokens): the next
    /// request's size is bounded from it, so a long conversation is not counted on every turn.
    token_counts: std::sync::Mutex<HashMap<String, (u64, u64)>>,
    pub metrics: Metrics,
    pub recent: Recent,
    pub affinity: AffinityBook,
    pub clients: ClientPool,
    /// What each named client used, against its limits; kept across reloads.
    pub ledger: Arc<crate::clients::Ledger>,
    /// The state of each key of the providers' key pools; kept across reloads.
    pub keys: crate::routing::keys::KeyBook,
    /// The usage file (`settings.usage.path`, fixed at start); `None` when the path is empty.
    pub usage: Option<Arc<crate::usage::UsageStore>>,
    /// The file `POST /providers/reload` re-reads; `None` for a configuration given in memory.
    pub config_path: Option<PathBuf>,
    reload_lock: tokio::sync::Mutex<()>,
    /// Set when the shutdown grace period is over: open streams end with an error event.
    closing: tokio::sync::watch::Sender<bool>,
    pub started_at: Instant,
    /// The shared state of the Redis backend; `None` with the memory backend. Fixed at start:
    /// a reload that changes `settings.state` is refused.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// This instance's name (`settings.state.instance_name`, or host name and process id).
    pub instance: String,
}

/// What a successful reload changed.
#[derive(Debug, Clone)]
pub struct ReloadSummary {
    pub providers: usize,
    pub routes: usize,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub warnings: Vec<String>,
}

impl AppState {
    /// Keeps a session's last token count (at most 10,000 sessions: the table starts over when
    /// full, which only means a recount).
    pub fn remember_count(&self, session: &str, text_bytes: u64, tokens: u64) {
        let mut counts = self.token_counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.len() >= 10_000 && !counts.contains_key(session) {
            counts.clear();
        }
        counts.insert(session.to_owned(), (text_bytes, tokens));
    }

    /// A session's last token count, if one was made.
    pub fn prior_count(&self, session: &str) -> Option<(u64, u64)> {
        self.token_counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(session)
            .copied()
    }

    pub fn new(config: Config, config_path: Option<PathBuf>) -> Result<Arc<Self>, ConfigErrors> {
        let clients = ClientPool::default();
        let state_settings = config.settings.state.clone();
        let runtime = Runtime::build(config, &clients)?;
        let usage = crate::usage::UsageStore::start(
            &runtime.config.settings.usage.path,
            state_settings.backend == crate::config::StateBackend::Redis,
        );
        let health = HealthBook::new();
        let cluster = crate::cluster::Cluster::start(&state_settings, &health, usage.clone())
            .map_err(|e| ConfigErrors(vec![e]))?;
        let instance = match &cluster {
            Some(c) => c.instance().to_owned(),
            None => crate::cluster::instance_name(&state_settings),
        };
        let state = Arc::new(Self {
            runtime: ArcSwap::from_pointee(runtime),
            health,
            count_tokens: HealthBook::new(),
            dedup: Dedup::default(),
            counting: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
            token_counts: std::sync::Mutex::new(HashMap::new()),
            metrics: Metrics::default(),
            recent: Recent::default(),
            affinity: AffinityBook::default(),
            clients,
            ledger: Arc::default(),
            keys: crate::routing::keys::KeyBook::default(),
            usage,
            config_path,
            reload_lock: tokio::sync::Mutex::new(()),
            closing: tokio::sync::watch::channel(false).0,
            started_at: Instant::now(),
            cluster,
            instance,
        });
        if let Some(cluster) = &state.cluster {
            cluster.listen(Arc::downgrade(&state));
        }
        state.rebuild_limits();
        Ok(state)
    }

    /// Charges the named clients' token and budget windows with what the usage file holds for
    /// them (after a restart, a client over its budget stays over it).
    fn rebuild_limits(&self) {
        let (Some(usage), runtime) = (&self.usage, self.runtime()) else {
            return;
        };
        let longest = runtime
            .clients
            .iter()
            .flat_map(|c| [c.limits.tokens, c.limits.budget_usd])
            .flatten()
            .map(|l| l.window.duration())
            .max();
        let Some(longest) = longest else {
            return;
        };
        let since = SystemTime::now() - longest;
        match usage.recent_by_client(since) {
            Ok(rows) => {
                let (now, wall) = (Instant::now(), SystemTime::now());
                for (name, minute_ms, tokens, cost) in rows {
                    let Some(client) = runtime.clients.iter().find(|c| *c.name == *name) else {
                        continue;
                    };
                    let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(minute_ms);
                    let ago = wall.duration_since(at).unwrap_or_default();
                    let at = now.checked_sub(ago).unwrap_or(now);
                    self.ledger.charge(client, tokens, cost, now, at);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, file = %usage.path().display(), "the usage file could not be read: limits start empty")
            }
        }
    }

    /// What the state backend is and whether it is shared right now.
    pub fn backend_status(&self) -> crate::cluster::BackendStatus {
        match &self.cluster {
            Some(c) => c.status(),
            None => crate::cluster::BackendStatus::local(self.instance.clone()),
        }
    }

    /// Ends every open stream (after the shutdown grace period).
    pub fn close_streams(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves when [`AppState::close_streams`] has been called.
    pub fn closing(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closing.subscribe()
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// Re-reads the configuration file. A file with any error changes nothing.
    pub async fn reload(&self) -> Result<ReloadSummary, ConfigErrors> {
        let Some(path) = self.config_path.clone() else {
            return Err(ConfigErrors(vec![
                "no configuration file to reload (started from memory)".into(),
            ]));
        };
        let _guard = self.reload_lock.lock().await;
        // The file is small: reading it inline is cheaper than a trip to the blocking pool.
        let loaded = load_file(&path)?;
        self.swap(loaded)
    }

    /// Installs an already loaded configuration (what `reload` does after reading the file).
    pub fn swap(&self, loaded: Loaded) -> Result<ReloadSummary, ConfigErrors> {
        let Loaded { config, warnings } = loaded;
        let old = self.runtime.load();
        if !config.settings.state.same_as(&old.config.settings.state) {
            return Err(ConfigErrors(vec![
                "settings.state: the state backend is chosen at start; restart the balancer to change it"
                    .into(),
            ]));
        }
        let new = Runtime::build(config, &self.clients)?;
        let added = new
            .providers
            .keys()
            .filter(|k| !old.providers.contains_key(*k))
            .cloned()
            .collect();
        let removed = old
            .providers
            .keys()
            .filter(|k| !new.providers.contains_key(*k))
            .cloned()
            .collect();
        let summary = ReloadSummary {
            providers: new.providers.len(),
            routes: new.config.routes.len(),
            added,
            removed,
            warnings,
        };
        self.runtime.store(Arc::new(new));
        Ok(summary)
    }
}
