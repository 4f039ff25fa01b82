//! The state backend: where what instances learn is shared (`settings.state`).
//!
//! With the memory backend (the default) there is no [`Cluster`]: every book stays in this
//! process, exactly as before. With the Redis backend, a [`Cluster`] holds one multiplexed,
//! self-reconnecting connection (redis-rs's `ConnectionManager`, created lazily, so the balancer
//! starts and serves while Redis is unreachable) and a monitor task that pings it every second,
//! so that `/health`, `/providers` and `/metrics` say whether state is shared right now. A
//! transition (up to degraded and back) is logged once, never per request. Redis failing never
//! fails a request: whatever uses the cluster falls back to the local books.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::{StateBackend, StateSettings};
use crate::routing::health::{Change, HealthBook, SharedHealth, unix_ms};
use crate::secret::{Redactor, url_password};

/// How often the monitor pings Redis.
pub const PING_EVERY: Duration = Duration::from_secs(1);
/// A ping (and any command of the hot path) that takes longer than this counts as a failure.
pub const COMMAND_TIMEOUT: Duration = Duration::from_millis(500);
/// A shared affinity lookup that takes longer is abandoned: the request goes on without it.
pub const AFFINITY_LOOKUP_TIMEOUT: Duration = Duration::from_millis(5);
/// A shared cache lookup that takes longer is abandoned: the request goes on as a miss.
pub const CACHE_LOOKUP_TIMEOUT: Duration = Duration::from_millis(50);
/// The largest answer kept in the shared cache: one huge answer cannot fill Redis.
pub const MAX_SHARED_ENTRY_BYTES: usize = 1024 * 1024;
/// Reconnection attempts back off up to this delay.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(5);
/// Every instance re-reads the shared health this often (besides the published changes, which
/// arrive at once), so a missed message costs at most this long.
pub const RESYNC_EVERY: Duration = Duration::from_secs(5);
/// The longest probe lease: if the instance that took it dies, the others wait at most this long
/// before one of them probes. A probe's lease lasts as long as its attempt may take to reach a
/// verdict (connect and read timeouts), within this bound; a probe that ends without one (its
/// client left, or it could not be sent) gives the lease back at once.
pub const MAX_PROBE_LEASE: Duration = Duration::from_secs(300);
/// A probe lease that Redis does not grant within this long: the instance probes on its own.
pub const LEASE_TIMEOUT: Duration = Duration::from_millis(50);

/// Writes a provider's shared health only if the stored version is the one the writer started
/// from (`ARGV[2]`), and publishes it; otherwise returns the stored record (or an empty string) so
/// the writer can apply its verdict to it and try again. One round trip, atomic in Redis.
const HEALTH_CAS: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local version = 0
if cur then
  local ok, record = pcall(cjson.decode, cur)
  if ok and type(record) == 'table' and tonumber(record['version']) then
    version = tonumber(record['version'])
  end
end
if version ~= tonumber(ARGV[2]) then return cur or '' end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('PUBLISH', KEYS[2], ARGV[4])
return 1
";

/// Takes the probe lease (`SET NX PX`), or renews it for the instance that holds it: `-1` when
/// granted, else the milliseconds it still runs.
const PROBE_LEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return -1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return -1 end
return redis.call('PTTL', KEYS[1])
";

/// Admits a request of a named client under its windowed limits, across the cluster, in one step.
/// `ARGV[1]`: now (Unix ms); then per limit: its key base, bucket width (ms), maximum and whether
/// it counts requests (`1`: a request admitted is counted at once). Each limit sums its last 60
/// buckets (`base:index`, index = time / width). Returns `{0, 0}` when admitted, else the
/// 1-based number of the limit that refused and the milliseconds until it frees up.
const CLIENT_ADMIT: &str = r"
local now = tonumber(ARGV[1])
local n = (#ARGV - 1) / 4
for l = 0, n - 1 do
  local base, width, max = ARGV[2 + l * 4], tonumber(ARGV[3 + l * 4]), tonumber(ARGV[4 + l * 4])
  local current = math.floor(now / width)
  local values, sum = {}, 0
  for i = 0, 59 do
    local v = tonumber(redis.call('GET', base .. ':' .. (current - i))) or 0
    values[i] = v
    sum = sum + v
  end
  if sum >= max then
    for i = 59, 0, -1 do
      sum = sum - values[i]
      if sum < max then
        return {l + 1, (current - i + 60) * width - now}
      end
    end
    return {l + 1, 60 * width}
  end
end
for l = 0, n - 1 do
  if ARGV[5 + l * 4] == '1' then
    local width = tonumber(ARGV[3 + l * 4])
    local key = ARGV[2 + l * 4] .. ':' .. math.floor(now / width)
    redis.call('INCR', key)
    redis.call('PEXPIRE', key, 61 * width)
  end
end
return {0, 0}
";

/// Gives the probe lease back, if this instance (`ARGV[1]`) holds it.
const PROBE_RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Whether this instance may probe a provider whose cooldown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// Granted to this instance (or Redis is not there to ask): probe.
    Granted,
    /// Another instance probes; it holds the lease this much longer.
    Elsewhere(Duration),
}

/// What `/health`, `/providers` and `/metrics` show of the state backend.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendStatus {
    /// `memory` or `redis`.
    pub backend: &'static str,
    /// `local` (memory backend), `up` (Redis answers: state is shared) or `degraded` (Redis does
    /// not answer: this instance serves on its local state).
    pub status: &'static str,
    /// Whether the state shown is shared by the cluster right now.
    pub shared: bool,
    pub instance: String,
    /// Why Redis is degraded (credentials masked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl BackendStatus {
    /// The status of an instance without a cluster (the memory backend).
    pub fn local(instance: String) -> Self {
        Self {
            backend: StateBackend::Memory.as_str(),
            status: "local",
            shared: false,
            instance,
            error: None,
        }
    }
}

/// A connection to the shared state, and whether it works.
pub struct Cluster {
    prefix: String,
    instance: String,
    /// For the subscriber's own connection (a subscribed connection takes no other command).
    client: redis::Client,
    /// Replaced by the monitor when a ping fails in a way the manager does not recover from by
    /// itself (it reconnects only after I/O errors: a refused password would stick).
    redis: ArcSwap<ConnectionManager>,
    up: AtomicBool,
    last_error: Mutex<Option<String>>,
    redactor: Redactor,
    /// The provider health book this instance serves from: its changes are shared, and what other
    /// instances share is taken into it.
    health: Arc<HealthBook>,
    /// This instance's usage, added to the cluster's every second.
    usage: Option<Arc<crate::usage::UsageStore>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection's URL may hold a password: never shown.
        f.debug_struct("Cluster")
            .field("prefix", &self.prefix)
            .field("instance", &self.instance)
            .field("up", &self.up.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// This instance's name: the configured one, else host name and process id.
pub fn instance_name(settings: &StateSettings) -> String {
    if let Some(name) = &settings.instance_name {
        return name.clone();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}-{}", std::process::id())
}

/// The Redis client of `settings`, the redactor of its password and its URL; `None` for the
/// memory backend.
fn open(settings: &StateSettings) -> Result<Option<(redis::Client, Redactor, String)>, String> {
    if settings.backend != StateBackend::Redis {
        return Ok(None);
    }
    let url = settings
        .redis_url
        .as_ref()
        .ok_or("settings.state.redis.url is required with the redis backend")?;
    let redactor = Redactor::new(url_password(url.expose()));
    let client = redis::Client::open(url.expose()).map_err(|e| {
        format!(
            "settings.state.redis.url: {}",
            redactor.text(&e.to_string())
        )
    })?;
    Ok(Some((client, redactor, url.expose().to_owned())))
}

/// `claude-balancer check`: connects to the Redis of `settings` once and pings it. `Ok` with
/// nothing to report for the memory backend.
pub async fn probe(settings: &StateSettings) -> Result<Option<String>, String> {
    let Some((client, redactor, url)) = open(settings)? else {
        return Ok(None);
    };
    let masked = |e: &dyn std::fmt::Display| redactor.text(&e.to_string()).into_owned();
    let ping = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    match tokio::time::timeout(Duration::from_secs(3), ping).await {
        Ok(Ok(_)) => Ok(Some(crate::secret::mask_url_credentials(&url))),
        Ok(Err(e)) => Err(masked(&e)),
        Err(_) => Err("no answer within 3 s".to_owned()),
    }
}

/// `claude-balancer usage` with the Redis backend: the cluster's usage for `q`, read with a
/// connection of its own. `Ok(None)` for the memory backend.
pub async fn usage_of(
    settings: &StateSettings,
    q: &crate::usage::Query,
) -> Result<Option<(Vec<crate::usage::Row>, crate::usage::Totals)>, String> {
    let Some((client, redactor, _)) = open(settings)? else {
        return Ok(None);
    };
    let read = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        read_usage(&mut conn, &settings.key_prefix, q).await
    };
    match tokio::time::timeout(Duration::from_secs(10), read).await {
        Ok(Ok(answer)) => Ok(Some(answer)),
        Ok(Err(e)) => Err(redactor.text(&e.to_string()).into_owned()),
        Err(_) => Err("redis did not answer within 10 s".to_owned()),
    }
}

impl Cluster {
    /// The cluster for `settings`: `None` for the memory backend. Never waits for Redis; must be
    /// called inside a tokio runtime (the monitor and the connection's tasks run on it).
    pub fn start(
        settings: &StateSettings,
        health: &Arc<HealthBook>,
        usage: Option<Arc<crate::usage::UsageStore>>,
    ) -> Result<Option<Arc<Self>>, String> {
        let Some((client, redactor, _)) = open(settings)? else {
            return Ok(None);
        };
        let redis = ArcSwap::from_pointee(manager(&client, &redactor)?);
        let cluster = Arc::new(Self {
            prefix: settings.key_prefix.clone(),
            instance: instance_name(settings),
            client,
            redis,
            up: AtomicBool::new(false),
            last_error: Mutex::new(Some("not connected yet".to_owned())),
            redactor,
            health: Arc::clone(health),
            usage,
        });
        let (changes, rx) = tokio::sync::mpsc::unbounded_channel();
        health.share_changes(changes);
        tokio::spawn(share_health(Arc::downgrade(&cluster), rx));
        tokio::spawn(monitor(Arc::downgrade(&cluster)));
        if cluster.usage.is_some() {
            tokio::spawn(share_usage(Arc::downgrade(&cluster)));
        }
        Ok(Some(cluster))
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Whether Redis answered the last ping.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// A connection to run commands on (cheap: a handle on the shared multiplexed connection).
    pub fn connection(&self) -> ConnectionManager {
        ConnectionManager::clone(&self.redis.load())
    }

    pub fn status(&self) -> BackendStatus {
        let up = self.is_up();
        BackendStatus {
            backend: StateBackend::Redis.as_str(),
            status: if up { "up" } else { "degraded" },
            shared: up,
            instance: self.instance.clone(),
            error: if up {
                None
            } else {
                self.last_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
            },
        }
    }

    /// Runs `work` (commands on a connection of this cluster) without waiting for it, given up
    /// after `limit`. Outside a runtime (a drop at exit) it is not run: nothing is waiting for it.
    fn background<F>(&self, limit: Duration, work: F)
    where
        F: std::future::Future + Send + 'static,
    {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = tokio::time::timeout(limit, work).await;
            });
        }
    }

    /// Waits at most `limit` for `work`; its error masked of the connection's password.
    async fn answered<T>(
        &self,
        limit: Duration,
        work: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(limit, work).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(self.redactor.text(&e.to_string()).into_owned()),
            Err(_) => Err("redis did not answer".to_owned()),
        }
    }

    fn affinity_key(&self, key: u128) -> String {
        format!("{}affinity:{key:032x}", self.prefix)
    }

    /// The provider another instance last recorded for a session on a route (`key`: see
    /// `routing::affinity::key`). `None` when there is none, when Redis is down, or when it did
    /// not answer within [`AFFINITY_LOOKUP_TIMEOUT`].
    pub async fn affinity(&self, key: u128) -> Option<String> {
        if !self.is_up() {
            return None;
        }
        let mut conn = self.connection();
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.affinity_key(key));
        let get = cmd.query_async::<Option<String>>(&mut conn);
        tokio::time::timeout(AFFINITY_LOOKUP_TIMEOUT, get)
            .await
            .ok()?
            .ok()?
    }

    /// Records `provider` for a session on a route, expiring after `ttl`, without waiting;
    /// `moved`: the session left another provider, so instances that hold it are told.
    pub fn share_affinity(&self, key: u128, provider: &str, ttl: Duration, moved: bool) {
        if !self.is_up() {
            return;
        }
        let mut conn = self.connection();
        let (k, provider) = (self.affinity_key(key), provider.to_owned());
        let ms = expiry_ms(ttl);
        let event = moved.then(|| {
            (
                self.events_channel(),
                serde_json::json!({"kind": "affinity", "from": self.instance, "key": format!("{key:032x}"), "provider": provider})
                    .to_string(),
            )
        });
        self.background(COMMAND_TIMEOUT * 2, async move {
            if let Some((channel, payload)) = event {
                let mut publish = redis::cmd("PUBLISH");
                publish.arg(channel).arg(payload);
                let _ = tokio::time::timeout(COMMAND_TIMEOUT, publish.query_async::<()>(&mut conn))
                    .await;
            }
            let mut cmd = redis::cmd("SET");
            cmd.arg(k).arg(provider).arg("PX").arg(ms);
            let _ = tokio::time::timeout(COMMAND_TIMEOUT, cmd.query_async::<()>(&mut conn)).await;
        });
    }

    fn cache_key(&self, key: u128) -> String {
        format!("{}cache:{key:032x}", self.prefix)
    }

    fn cache_index(&self) -> String {
        format!("{}cache:index", self.prefix)
    }

    /// A cached answer stored by any instance (its JSON text), if Redis answers in time.
    pub async fn cached(&self, key: u128) -> Option<Vec<u8>> {
        let mut conn = self.connection();
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.cache_key(key));
        let get = cmd.query_async::<Option<Vec<u8>>>(&mut conn);
        tokio::time::timeout(CACHE_LOOKUP_TIMEOUT, get)
            .await
            .ok()?
            .ok()?
    }

    /// Stores an answer (its JSON text) for `ttl`, without waiting, and keeps the shared cache to
    /// `max_entries` (the oldest go first). Larger than [`MAX_SHARED_ENTRY_BYTES`]: not stored.
    pub fn cache(&self, key: u128, entry: Vec<u8>, ttl: Duration, max_entries: usize) {
        if entry.len() > MAX_SHARED_ENTRY_BYTES || max_entries == 0 {
            return;
        }
        let mut conn = self.connection();
        let (k, index) = (self.cache_key(key), self.cache_index());
        let ms = expiry_ms(ttl);
        let now_ms = unix_ms(std::time::SystemTime::now());
        self.background(COMMAND_TIMEOUT * 4, async move {
            let mut pipe = redis::pipe();
            pipe.cmd("SET")
                .arg(&k)
                .arg(entry)
                .arg("PX")
                .arg(ms)
                .ignore();
            pipe.cmd("ZADD").arg(&index).arg(now_ms).arg(&k).ignore();
            pipe.query_async::<()>(&mut conn).await?;
            let count: usize = redis::cmd("ZCARD")
                .arg(&index)
                .query_async(&mut conn)
                .await?;
            if count > max_entries {
                let oldest: Vec<String> = redis::cmd("ZPOPMIN")
                    .arg(&index)
                    .arg(count - max_entries)
                    .query_async::<Vec<(String, f64)>>(&mut conn)
                    .await?
                    .into_iter()
                    .map(|(k, _)| k)
                    .collect();
                if !oldest.is_empty() {
                    redis::cmd("DEL")
                        .arg(oldest)
                        .query_async::<()>(&mut conn)
                        .await?;
                }
            }
            Ok::<(), redis::RedisError>(())
        });
    }

    /// Empties the shared cache; the number of entries it held, or why it could not.
    pub async fn clear_cache(&self) -> Result<usize, String> {
        let mut conn = self.connection();
        let index = self.cache_index();
        let work = async {
            let keys: Vec<String> = redis::cmd("ZRANGE")
                .arg(&index)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await?;
            let mut existing = 0usize;
            if !keys.is_empty() {
                existing = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await?;
            }
            redis::cmd("DEL")
                .arg(&index)
                .query_async::<()>(&mut conn)
                .await?;
            Ok::<usize, redis::RedisError>(existing)
        };
        self.answered(COMMAND_TIMEOUT * 4, work).await
    }

    fn health_key(&self) -> String {
        format!("{}health", self.prefix)
    }

    /// Writes one change into the shared record of its provider (applied again to the stored
    /// record, so concurrent changes from several instances all count) and publishes the result.
    async fn share_change(&self, change: &Change) -> Result<(), redis::RedisError> {
        let mut conn = self.connection();
        let script = redis::Script::new(HEALTH_CAS);
        let mut base = self.health.shared(&change.provider);
        for _ in 0..8 {
            let next = self.health.next_shared(
                &base,
                &change.verdict,
                &change.policy,
                &self.instance,
                change.at,
            );
            let event = serde_json::json!({
                "kind": "health",
                "from": self.instance,
                "provider": change.provider,
                "record": next,
            });
            let answer: redis::Value = script
                .key(self.health_key())
                .key(self.events_channel())
                .arg(&change.provider)
                .arg(base.version)
                .arg(serde_json::to_string(&next).unwrap_or_default())
                .arg(event.to_string())
                .invoke_async(&mut conn)
                .await?;
            let stored = match answer {
                redis::Value::Int(_) => {
                    self.adopt(&change.provider, next);
                    return Ok(());
                }
                redis::Value::BulkString(b) => b,
                redis::Value::SimpleString(s) => s.into_bytes(),
                _ => Vec::new(),
            };
            // Another instance wrote first (or Redis lost the record): build on what is stored.
            base = serde_json::from_slice::<SharedHealth>(&stored).unwrap_or_default();
            if base.version != 0 {
                self.adopt(&change.provider, base.clone());
            }
        }
        Ok(())
    }

    /// Takes a shared record into the local book; a state change is logged.
    fn adopt(&self, provider: &str, record: SharedHealth) {
        let by = record.by.clone();
        if let Some((from, to)) = self
            .health
            .adopt(provider, record, tokio::time::Instant::now())
        {
            if by != self.instance {
                tracing::warn!(
                    provider,
                    from = from.as_str(),
                    to = to.as_str(),
                    by = %by,
                    "provider state changed on another instance"
                );
            }
        }
    }

    /// Reads every provider's shared health into the local book (at start, when Redis comes
    /// back, and every [`RESYNC_EVERY`]).
    async fn resync(&self) -> Result<(), redis::RedisError> {
        let mut conn = self.connection();
        let records: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
            .arg(self.health_key())
            .query_async(&mut conn)
            .await?;
        for (provider, json) in records {
            if let Ok(record) = serde_json::from_slice::<SharedHealth>(&json) {
                self.adopt(&provider, record);
            }
        }
        Ok(())
    }

    /// Asks for the probe of `provider` after the cooldown of shared record `version`: one
    /// instance of the cluster gets it; it runs out after `lease` (the probe's own deadline).
    /// If Redis is down or slow, the answer is `Granted`: each instance then probes on its own.
    pub async fn probe_lease(&self, provider: &str, version: u64, lease: Duration) -> Lease {
        if !self.is_up() {
            return Lease::Granted;
        }
        let mut conn = self.connection();
        let script = redis::Script::new(PROBE_LEASE);
        let mut invocation = script.key(self.probe_key(provider, version));
        invocation.arg(&self.instance).arg(expiry_ms(lease));
        let take = invocation.invoke_async::<i64>(&mut conn);
        match tokio::time::timeout(LEASE_TIMEOUT, take).await {
            Ok(Ok(ms)) if ms >= 0 => Lease::Elsewhere(Duration::from_millis(ms.unsigned_abs())),
            // -1: granted; -2 (the lease ran out between the two commands): nobody probes, so
            // this instance may.
            _ => Lease::Granted,
        }
    }

    fn probe_key(&self, provider: &str, version: u64) -> String {
        format!("{}probe:{provider}:{version}", self.prefix)
    }

    /// Gives back the probe lease of `provider` after shared record `version`, if this instance
    /// holds it, without waiting.
    pub fn release_probe_lease(&self, provider: &str, version: u64) {
        if !self.is_up() {
            return;
        }
        let mut conn = self.connection();
        let (key, me) = (self.probe_key(provider, version), self.instance.clone());
        // Called from a drop: at exit (no runtime) there is nothing to give back to.
        self.background(COMMAND_TIMEOUT, async move {
            let script = redis::Script::new(PROBE_RELEASE);
            let mut invocation = script.key(key);
            invocation.arg(me);
            invocation.invoke_async::<i64>(&mut conn).await
        });
    }

    fn limit_base(&self, client: &str, limit: &crate::clients::WindowedLimit) -> String {
        format!(
            "{}limit:{client}:{}:{}",
            self.prefix,
            limit.kind.limit(),
            limit.window.as_str()
        )
    }

    /// Admits a request of `client` under its windowed limits as the whole cluster counts them;
    /// `None` when Redis is down or does not answer within [`LEASE_TIMEOUT`] (the caller checks
    /// its own ledger instead).
    pub async fn admit_client(
        &self,
        client: &crate::clients::Client,
    ) -> Option<Result<(), crate::clients::Refusal>> {
        if !self.is_up() {
            return None;
        }
        let limits: Vec<crate::clients::WindowedLimit> =
            crate::clients::windowed(&client.limits).collect();
        if limits.is_empty() {
            return Some(Ok(()));
        }
        let now = unix_ms(std::time::SystemTime::now());
        let script = redis::Script::new(CLIENT_ADMIT);
        let mut invocation = script.prepare_invoke();
        invocation.arg(now);
        for l in &limits {
            invocation
                .arg(self.limit_base(&client.name, l))
                .arg(bucket_ms(l.window))
                .arg(l.max)
                .arg(u8::from(l.kind == crate::clients::Kind::Requests));
        }
        let mut conn = self.connection();
        let answer = tokio::time::timeout(
            LEASE_TIMEOUT,
            invocation.invoke_async::<(usize, u64)>(&mut conn),
        )
        .await
        .ok()?
        .ok()?;
        match answer {
            (0, _) => Some(Ok(())),
            (i, wait_ms) => {
                let limit = limits.get(i - 1)?;
                Some(Err(limit.refusal(
                    &client.name,
                    Duration::from_millis(wait_ms.max(1)),
                )))
            }
        }
    }

    /// Adds what a request of `client` used to its shared token and budget windows, without
    /// waiting.
    pub fn charge_client(&self, client: &crate::clients::Client, tokens: u64, cost: f64) {
        if !self.is_up() {
            return;
        }
        let now = unix_ms(std::time::SystemTime::now());
        let mut pipe = redis::pipe();
        let mut any = false;
        for l in crate::clients::windowed(&client.limits) {
            let Some(amount) = l.charge(tokens, cost) else {
                continue;
            };
            let width = bucket_ms(l.window);
            let key = format!("{}:{}", self.limit_base(&client.name, &l), now / width);
            pipe.cmd("INCRBYFLOAT").arg(&key).arg(amount).ignore();
            pipe.cmd("PEXPIRE").arg(&key).arg(61 * width).ignore();
            any = true;
        }
        if !any {
            return;
        }
        let mut conn = self.connection();
        // Called when a response ends, which may be at exit (no runtime).
        self.background(COMMAND_TIMEOUT, async move {
            pipe.query_async::<()>(&mut conn).await
        });
    }

    /// Adds the usage this instance recorded since the last call to the cluster's (the hours in
    /// `{prefix}usage:{hour}` hashes, kept 400 days). What Redis did not take is kept for the
    /// next call.
    pub async fn push_usage(&self) {
        let Some(store) = &self.usage else {
            return;
        };
        if !self.is_up() {
            return;
        }
        let hours = store.take_shared();
        if hours.is_empty() {
            return;
        }
        // One transaction: all of it is added, or none.
        let mut pipe = redis::pipe();
        pipe.atomic();
        for h in &hours {
            let key = format!("{}usage:{}", self.prefix, h.hour_ms);
            let group = h.group.join(USAGE_SEPARATOR);
            for (field, value) in h.totals.fields() {
                if value != 0.0 {
                    pipe.cmd("HINCRBYFLOAT")
                        .arg(&key)
                        .arg(format!("{group}{USAGE_SEPARATOR}{field}"))
                        .arg(value)
                        .ignore();
                }
            }
            pipe.cmd("PEXPIRE").arg(&key).arg(USAGE_KEEP_MS).ignore();
        }
        let mut conn = self.connection();
        let sent =
            tokio::time::timeout(COMMAND_TIMEOUT * 4, pipe.query_async::<()>(&mut conn)).await;
        // Refused: not added, kept for the next push. No answer in time: it may have been added,
        // so it is not sent again (the cluster's usage may miss it; this instance's file has it).
        if let Ok(Err(_)) = sent {
            store.untake_shared(hours);
        }
    }

    /// The cluster's usage for `q` (after adding this instance's latest).
    pub async fn usage(
        &self,
        q: &crate::usage::Query,
    ) -> Result<(Vec<crate::usage::Row>, crate::usage::Totals), String> {
        self.push_usage().await;
        let mut conn = self.connection();
        self.answered(COMMAND_TIMEOUT * 10, read_usage(&mut conn, &self.prefix, q))
            .await
    }

    fn events_channel(&self) -> String {
        format!("{}events", self.prefix)
    }

    /// Asks every other instance to reload its own configuration file; how many instances
    /// listened.
    pub async fn publish_reload(&self) -> Result<usize, String> {
        let payload = serde_json::json!({"kind": "reload", "from": self.instance}).to_string();
        let mut conn = self.connection();
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(self.events_channel()).arg(payload);
        self.answered(COMMAND_TIMEOUT, cmd.query_async::<usize>(&mut conn))
            .await
            .map(|listeners| listeners.saturating_sub(1))
    }

    /// Listens to the cluster's events for `state` until either is dropped, reconnecting with
    /// backoff: a reload asked by another instance reloads this one's own file.
    pub fn listen(self: &Arc<Self>, state: std::sync::Weak<crate::state::AppState>) {
        tokio::spawn(listen(Arc::downgrade(self), state));
    }

    /// Records the outcome of a ping; logs a transition once.
    fn observe(&self, result: Result<(), String>) {
        let was_up = self.up.swap(result.is_ok(), Ordering::Relaxed);
        match result {
            Ok(()) => {
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                if !was_up {
                    tracing::info!(instance = %self.instance, "state backend redis is up: state is shared");
                }
            }
            Err(e) => {
                let e = self.redactor.text(&e).into_owned();
                let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
                // Logged on the way down, and once at start-up if Redis never answered.
                if was_up || last.as_deref() == Some("not connected yet") {
                    tracing::warn!(instance = %self.instance, error = %e, "state backend redis is unreachable: serving on local state, retrying");
                }
                *last = Some(e);
            }
        }
    }
}

/// A lazy, self-reconnecting connection to `client`: made without waiting for Redis. No retries
/// inside a command: a command fails at once while Redis is away (the callers fall back to local
/// state) and the monitor's next ping shows why.
fn manager(client: &redis::Client, redactor: &Redactor) -> Result<ConnectionManager, String> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(COMMAND_TIMEOUT))
        .set_response_timeout(Some(COMMAND_TIMEOUT))
        .set_max_delay(MAX_RECONNECT_DELAY)
        .set_number_of_retries(0);
    ConnectionManager::new_lazy_with_config(client.clone(), config)
        .map_err(|e| format!("redis: {}", redactor.text(&e.to_string())))
}

/// Separates a usage field's parts (client, route, provider, model, sum) in Redis.
const USAGE_SEPARATOR: &str = "\u{1f}";
/// The cluster's usage keeps hours this long (as the usage file does).
const USAGE_KEEP_MS: u64 = 400 * 86_400_000;
/// At most this many hours are read for one answer.
const MAX_USAGE_HOURS: u64 = 400 * 24;

/// Reads the cluster's usage for `q` from the hourly hashes under `prefix`.
pub async fn read_usage(
    conn: &mut impl redis::aio::ConnectionLike,
    prefix: &str,
    q: &crate::usage::Query,
) -> redis::RedisResult<(Vec<crate::usage::Row>, crate::usage::Totals)> {
    let hour = 3_600_000u64;
    let from = unix_ms(q.from);
    let to = unix_ms(q.to);
    // The last MAX_USAGE_HOURS before `to` at most (older hours have expired anyway).
    let first = from
        .max(to.saturating_sub(MAX_USAGE_HOURS * hour))
        .div_ceil(hour)
        * hour;
    let hours: Vec<u64> = (0..MAX_USAGE_HOURS)
        .map(|i| first + i * hour)
        .take_while(|h| *h < to)
        .collect();
    let mut pipe = redis::pipe();
    for h in &hours {
        pipe.cmd("HGETALL").arg(format!("{prefix}usage:{h}"));
    }
    let answers: Vec<Vec<(String, f64)>> = if hours.is_empty() {
        Vec::new()
    } else {
        pipe.query_async(conn).await?
    };
    let mut sums = crate::usage::Sums::default();
    for (h, fields) in hours.iter().zip(answers) {
        // One hour: the groups' sums, then added to the answer by the query's grouping.
        let mut groups: std::collections::HashMap<[String; 4], crate::usage::Totals> =
            std::collections::HashMap::new();
        for (field, value) in fields {
            let parts: Vec<&str> = field.split(USAGE_SEPARATOR).collect();
            let [client, route, provider, model, sum] = parts[..] else {
                continue;
            };
            groups
                .entry([client.into(), route.into(), provider.into(), model.into()])
                .or_default()
                .set(sum, value);
        }
        let mut ordered: Vec<_> = groups.into_iter().collect();
        ordered.sort_by(|a, b| a.0.cmp(&b.0));
        for (group, totals) in ordered {
            let picked = q
                .group_by
                .iter()
                .map(|d| group[d.index()].clone())
                .collect();
            sums.add(q, *h, picked, &totals);
        }
    }
    Ok(sums.answer(q))
}

/// Adds each instance's usage to the cluster's every second, until the cluster is dropped.
async fn share_usage(cluster: std::sync::Weak<Cluster>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        cluster.push_usage().await;
    }
}

/// The width of one of a window's 60 buckets, in milliseconds.
fn bucket_ms(window: crate::config::Window) -> u64 {
    (u64::try_from(window.duration().as_millis()).unwrap_or(u64::MAX) / 60).max(1)
}

/// A time to live as Redis's `PX` takes it: whole milliseconds, at least one.
fn expiry_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// An event another instance published.
#[derive(serde::Deserialize)]
struct Event {
    kind: String,
    from: String,
    /// `affinity`: the session's key (hex) and its new provider.
    #[serde(default)]
    key: String,
    #[serde(default)]
    provider: String,
    /// `health`: the provider's new shared record.
    #[serde(default)]
    record: Option<SharedHealth>,
}

async fn listen(cluster: std::sync::Weak<Cluster>, state: std::sync::Weak<crate::state::AppState>) {
    use futures_util::StreamExt;
    let mut delay = Duration::from_millis(100);
    loop {
        let Some(c) = cluster.upgrade() else {
            return;
        };
        let (channel, me) = (c.events_channel(), c.instance.clone());
        let subscribed = async {
            let mut pubsub = c.client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let subscribed = tokio::time::timeout(COMMAND_TIMEOUT * 4, subscribed).await;
        drop(c);
        if let Ok(Ok(pubsub)) = subscribed {
            delay = Duration::from_millis(100);
            let mut messages = pubsub.into_on_message();
            while let Some(msg) = messages.next().await {
                let Ok(event) = serde_json::from_slice::<Event>(msg.get_payload_bytes()) else {
                    continue;
                };
                let Some(state) = state.upgrade() else {
                    return;
                };
                if event.from == me {
                    continue;
                }
                match event.kind.as_str() {
                    "reload" => {
                        let why = format!("a cluster reload asked by {}", event.from);
                        let _ = crate::reload::reload_and_log(&state, &why).await;
                    }
                    "health" => {
                        if let (Some(record), Some(c)) = (event.record, cluster.upgrade()) {
                            c.adopt(&event.provider, record);
                        }
                    }
                    "affinity" => {
                        let runtime = state.runtime();
                        if let (Ok(key), Some(p)) = (
                            u128::from_str_radix(&event.key, 16),
                            runtime.providers.get(&event.provider),
                        ) {
                            state.affinity.moved(key, &p.name);
                        }
                    }
                    _ => {}
                }
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_RECONNECT_DELAY);
    }
}

/// Pings Redis every [`PING_EVERY`] until the cluster is dropped.
async fn monitor(cluster: std::sync::Weak<Cluster>) {
    let mut tick = tokio::time::interval(PING_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_resync: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        let mut conn = cluster.connection();
        let ping = tokio::time::timeout(
            COMMAND_TIMEOUT,
            redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await;
        let result = match ping {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                if !e.is_io_error() {
                    // Refused credentials, a failed TLS handshake...: the manager would keep
                    // answering with the same error. A new one connects afresh on the next ping.
                    if let Ok(fresh) = manager(&cluster.client, &cluster.redactor) {
                        cluster.redis.store(Arc::new(fresh));
                    }
                }
                Err(e.to_string())
            }
            Err(_) => Err(format!(
                "no answer within {} ms",
                COMMAND_TIMEOUT.as_millis()
            )),
        };
        cluster.observe(result);
        // Right after (re)connecting, then every RESYNC_EVERY; a failed resync is tried at the
        // next tick.
        let now = tokio::time::Instant::now();
        let due = last_resync.is_none_or(|t| now.duration_since(t) >= RESYNC_EVERY);
        if !cluster.is_up() {
            last_resync = None;
        } else if due {
            let resync = tokio::time::timeout(COMMAND_TIMEOUT * 4, cluster.resync()).await;
            if let Ok(Ok(())) = resync {
                last_resync = Some(now);
            }
        }
    }
}

/// Shares each change of the local health book, in order, while Redis is up (while it is down,
/// changes stay local).
async fn share_health(
    cluster: std::sync::Weak<Cluster>,
    mut changes: tokio::sync::mpsc::UnboundedReceiver<Change>,
) {
    while let Some(change) = changes.recv().await {
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        if cluster.is_up() {
            let _ = tokio::time::timeout(COMMAND_TIMEOUT * 4, cluster.share_change(&change)).await;
        }
    }
}
