//! Usage accounting: what every request that reached a provider used (input, output, cache-write
//! and cache-read tokens) and cost, by client, route, provider, upstream model and hour, kept in an
//! embedded SQLite file (`settings.usage.path`, created on first use).
//!
//! A request adds its usage to an in-memory tally (one short lock); a writer thread folds the tally
//! into the file every second, in one transaction: the `hourly` table (kept 400 days) answers
//! `GET /usage` and `claude-balancer usage`, and the `minutely` table (per client, kept 31 days)
//! rebuilds the clients' token and budget windows when the balancer starts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, params};

use crate::dispatch::Usage;

/// How often the tally is written to the file.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// The `hourly` table keeps this many days.
const KEEP_HOURLY_DAYS: u64 = 400;
/// The `minutely` table keeps this many days (the longest limit window is 30 days).
const KEEP_MINUTELY_DAYS: u64 = 31;

const HOUR_MS: u64 = 3_600_000;
const MINUTE_MS: u64 = 60_000;

/// What one request used, as the accounting records it.
#[derive(Debug, Clone)]
pub struct Charge {
    /// A named client's name; empty for a request of no named client.
    pub client: Arc<str>,
    pub route: Arc<str>,
    pub provider: String,
    /// The upstream model (what the provider was asked for).
    pub model: String,
    pub usage: Usage,
    /// `None`: the model has no price.
    pub cost: Option<f64>,
    pub at: SystemTime,
}

/// Sums of usage (one row of the tally, of the file, or of an answer).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Totals {
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub cost_usd: f64,
    /// Requests whose model has no price (their cost counts as 0).
    pub unpriced_requests: u64,
}

impl Totals {
    fn add(&mut self, u: &Usage, cost: Option<f64>) {
        self.requests += 1;
        self.input_tokens += u.input_tokens;
        self.output_tokens += u.output_tokens;
        self.cache_creation_input_tokens += u.cache_creation_input_tokens;
        self.cache_read_input_tokens += u.cache_read_input_tokens;
        match cost {
            Some(c) => self.cost_usd += c,
            None => self.unpriced_requests += 1,
        }
    }

    pub fn tokens(&self) -> u64 {
        self.input_tokens
            + self.output_tokens
            + self.cache_creation_input_tokens
            + self.cache_read_input_tokens
    }

    fn merge(&mut self, o: &Totals) {
        self.requests += o.requests;
        self.input_tokens += o.input_tokens;
        self.output_tokens += o.output_tokens;
        self.cache_creation_input_tokens += o.cache_creation_input_tokens;
        self.cache_read_input_tokens += o.cache_read_input_tokens;
        self.cost_usd += o.cost_usd;
        self.unpriced_requests += o.unpriced_requests;
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct HourKey {
    hour_ms: u64,
    client: Arc<str>,
    route: Arc<str>,
    provider: String,
    model: String,
}

#[derive(Debug, Default)]
struct Tally {
    hourly: HashMap<HourKey, Totals>,
    /// (minute, client) for named clients.
    minutely: HashMap<(u64, Arc<str>), Totals>,
}

enum Message {
    /// Write the tally now, then answer.
    Flush(SyncSender<()>),
}

/// The usage file and the tally waiting to be written to it; `None` store when
/// `settings.usage.path` is empty.
pub struct UsageStore {
    path: PathBuf,
    tally: Arc<Mutex<Tally>>,
    writer: Mutex<Option<Sender<Message>>>,
    /// With the Redis backend: the hours not yet added to the cluster's usage.
    shared: Option<Mutex<HashMap<HourKey, Totals>>>,
}

impl std::fmt::Debug for UsageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    crate::routing::health::unix_ms(t)
}

/// Opens (creating it and its folder when needed) the usage file and its tables.
pub fn open(path: &Path) -> Result<Connection, String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let conn = Connection::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         CREATE TABLE IF NOT EXISTS hourly (
           hour_ms INTEGER NOT NULL, client TEXT NOT NULL, route TEXT NOT NULL,
           provider TEXT NOT NULL, model TEXT NOT NULL,
           requests INTEGER NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
           cache_write_tokens INTEGER NOT NULL, cache_read_tokens INTEGER NOT NULL,
           cost_usd REAL NOT NULL, unpriced_requests INTEGER NOT NULL,
           PRIMARY KEY (hour_ms, client, route, provider, model));
         CREATE TABLE IF NOT EXISTS minutely (
           minute_ms INTEGER NOT NULL, client TEXT NOT NULL,
           tokens INTEGER NOT NULL, cost_usd REAL NOT NULL,
           PRIMARY KEY (minute_ms, client));",
    )
    .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(conn)
}

impl UsageStore {
    /// The store for `path` (empty: `None`, usage is not recorded). The file is opened by the
    /// writer thread on its first write; an error there is logged, not fatal.
    pub fn start(path: &str, shared: bool) -> Option<Arc<Self>> {
        if path.trim().is_empty() {
            return None;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let store = Arc::new(Self {
            path: PathBuf::from(path),
            tally: Arc::default(),
            writer: Mutex::new(Some(tx)),
            shared: shared.then(Mutex::default),
        });
        let (tally, file) = (Arc::clone(&store.tally), store.path.clone());
        let spawned = std::thread::Builder::new()
            .name("usage-writer".into())
            .spawn(move || writer(&file, &tally, &rx));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "usage accounting is off: its writer thread did not start");
        }
        Some(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the hours waiting to be added to the cluster's usage: (hour, client, route,
    /// provider, model, totals).
    pub fn take_shared(&self) -> Vec<SharedHour> {
        let Some(shared) = &self.shared else {
            return Vec::new();
        };
        std::mem::take(&mut *shared.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .map(|(k, t)| SharedHour {
                hour_ms: k.hour_ms,
                group: [
                    k.client.to_string(),
                    k.route.to_string(),
                    k.provider,
                    k.model,
                ],
                totals: t,
            })
            .collect()
    }

    /// Puts back hours that could not be added to the cluster's usage (Redis did not answer).
    pub fn untake_shared(&self, hours: Vec<SharedHour>) {
        let Some(shared) = &self.shared else {
            return;
        };
        let mut map = shared.lock().unwrap_or_else(|e| e.into_inner());
        for h in hours {
            let [client, route, provider, model] = h.group;
            map.entry(HourKey {
                hour_ms: h.hour_ms,
                client: Arc::from(client),
                route: Arc::from(route),
                provider,
                model,
            })
            .or_default()
            .merge(&h.totals);
        }
    }

    /// Adds one request's usage to the tally (written within a second).
    pub fn record(&self, c: &Charge) {
        let at = unix_ms(c.at);
        let mut tally = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        let key = HourKey {
            hour_ms: at - at % HOUR_MS,
            client: Arc::clone(&c.client),
            route: Arc::clone(&c.route),
            provider: c.provider.clone(),
            model: c.model.clone(),
        };
        if let Some(shared) = &self.shared {
            shared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(key.clone())
                .or_default()
                .add(&c.usage, c.cost);
        }
        tally.hourly.entry(key).or_default().add(&c.usage, c.cost);
        if !c.client.is_empty() {
            tally
                .minutely
                .entry((at - at % MINUTE_MS, Arc::clone(&c.client)))
                .or_default()
                .add(&c.usage, c.cost);
        }
    }

    /// Writes the tally now and waits (at most 5 s) until it is in the file: at shutdown.
    pub fn flush(&self) {
        let Some(tx) = self
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return;
        };
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        if tx.send(Message::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(Duration::from_secs(5));
        }
    }

    /// What each named client used per minute since `since` (for rebuilding limit windows):
    /// (client, minute start, tokens, cost).
    pub fn recent_by_client(
        &self,
        since: SystemTime,
    ) -> Result<Vec<(String, u64, u64, f64)>, String> {
        if !self.path.exists() {
            return Ok(Vec::new());
        }
        let conn = open(&self.path)?;
        let mut stmt = conn
            .prepare(
                "SELECT client, minute_ms, tokens, cost_usd FROM minutely WHERE minute_ms >= ?1",
            )
            .map_err(|e| e.to_string())?;
        let rows = stmt
            .query_map(params![unix_ms(since) as i64], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? as u64,
                    r.get::<_, f64>(3)?,
                ))
            })
            .map_err(|e| e.to_string())?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())
    }
}

impl Drop for UsageStore {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The writer thread: folds the tally into the file every [`FLUSH_EVERY`] and on request, until
/// the store is dropped.
fn writer(path: &Path, tally: &Mutex<Tally>, rx: &Receiver<Message>) {
    let mut conn: Option<Connection> = None;
    let mut last_prune: Option<SystemTime> = None;
    // A file that cannot be opened or written is reported once, not every second.
    let mut warned = false;
    loop {
        let (done, stop) = match rx.recv_timeout(FLUSH_EVERY) {
            Ok(Message::Flush(done)) => (Some(done), false),
            Err(RecvTimeoutError::Timeout) => (None, false),
            Err(RecvTimeoutError::Disconnected) => (None, true),
        };
        let taken = std::mem::take(&mut *tally.lock().unwrap_or_else(|e| e.into_inner()));
        if !taken.hourly.is_empty() || !taken.minutely.is_empty() {
            if conn.is_none() {
                match open(path) {
                    Ok(c) => conn = Some(c),
                    Err(e) if !warned => {
                        warned = true;
                        tracing::warn!(error = %e, "usage file cannot be opened: usage is not recorded until it can be");
                    }
                    Err(_) => {}
                }
            }
            if let Some(c) = conn.as_mut() {
                match write(c, &taken) {
                    Ok(()) => warned = false,
                    Err(e) if !warned => {
                        warned = true;
                        tracing::warn!(error = %e, "usage could not be written: usage is not recorded until it can be");
                    }
                    Err(_) => {}
                }
                let now = SystemTime::now();
                if last_prune.is_none_or(|t| {
                    now.duration_since(t).unwrap_or_default() > Duration::from_secs(3600)
                }) {
                    prune(c, now);
                    last_prune = Some(now);
                }
            }
        }
        if let Some(done) = done {
            let _ = done.send(());
        }
        if stop {
            return;
        }
    }
}

fn write(conn: &mut Connection, t: &Tally) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut hourly = tx.prepare_cached(
            "INSERT INTO hourly VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
             ON CONFLICT (hour_ms, client, route, provider, model) DO UPDATE SET
               requests = requests + excluded.requests,
               input_tokens = input_tokens + excluded.input_tokens,
               output_tokens = output_tokens + excluded.output_tokens,
               cache_write_tokens = cache_write_tokens + excluded.cache_write_tokens,
               cache_read_tokens = cache_read_tokens + excluded.cache_read_tokens,
               cost_usd = cost_usd + excluded.cost_usd,
               unpriced_requests = unpriced_requests + excluded.unpriced_requests",
        )?;
        for (k, v) in &t.hourly {
            hourly.execute(params![
                k.hour_ms as i64,
                &*k.client,
                &*k.route,
                k.provider,
                k.model,
                v.requests as i64,
                v.input_tokens as i64,
                v.output_tokens as i64,
                v.cache_creation_input_tokens as i64,
                v.cache_read_input_tokens as i64,
                v.cost_usd,
                v.unpriced_requests as i64,
            ])?;
        }
        let mut minutely = tx.prepare_cached(
            "INSERT INTO minutely VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (minute_ms, client) DO UPDATE SET
               tokens = tokens + excluded.tokens, cost_usd = cost_usd + excluded.cost_usd",
        )?;
        for ((minute, client), v) in &t.minutely {
            minutely.execute(params![
                *minute as i64,
                &**client,
                v.tokens() as i64,
                v.cost_usd
            ])?;
        }
    }
    tx.commit()
}

fn prune(conn: &Connection, now: SystemTime) {
    let day = 86_400_000u64;
    let now = unix_ms(now);
    let _ = conn.execute(
        "DELETE FROM hourly WHERE hour_ms < ?1",
        params![now.saturating_sub(KEEP_HOURLY_DAYS * day) as i64],
    );
    let _ = conn.execute(
        "DELETE FROM minutely WHERE minute_ms < ?1",
        params![now.saturating_sub(KEEP_MINUTELY_DAYS * day) as i64],
    );
}

/// One hour of one group's usage on its way to the cluster's usage (Redis backend): the group is
/// client, route, provider and model.
#[derive(Debug, Clone)]
pub struct SharedHour {
    pub hour_ms: u64,
    pub group: [String; 4],
    pub totals: Totals,
}

impl Totals {
    /// The sums as (field, value) pairs, as the cluster's usage stores them.
    pub fn fields(&self) -> [(&'static str, f64); 7] {
        [
            ("requests", self.requests as f64),
            ("input_tokens", self.input_tokens as f64),
            ("output_tokens", self.output_tokens as f64),
            (
                "cache_creation_input_tokens",
                self.cache_creation_input_tokens as f64,
            ),
            (
                "cache_read_input_tokens",
                self.cache_read_input_tokens as f64,
            ),
            ("cost_usd", self.cost_usd),
            ("unpriced_requests", self.unpriced_requests as f64),
        ]
    }

    /// Sets one field read back from the cluster's usage.
    pub fn set(&mut self, field: &str, value: f64) {
        let whole = value.max(0.0).round() as u64;
        match field {
            "requests" => self.requests = whole,
            "input_tokens" => self.input_tokens = whole,
            "output_tokens" => self.output_tokens = whole,
            "cache_creation_input_tokens" => self.cache_creation_input_tokens = whole,
            "cache_read_input_tokens" => self.cache_read_input_tokens = whole,
            "cost_usd" => self.cost_usd = value,
            "unpriced_requests" => self.unpriced_requests = whole,
            _ => {}
        }
    }
}

impl Dimension {
    /// Its place in a [`SharedHour`]'s group.
    pub fn index(self) -> usize {
        match self {
            Dimension::Client => 0,
            Dimension::Route => 1,
            Dimension::Provider => 2,
            Dimension::Model => 3,
        }
    }
}

/// What `GET /usage` and `claude-balancer usage` group by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    Client,
    Provider,
    Model,
    Route,
}

impl Dimension {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "client" => Some(Self::Client),
            "provider" => Some(Self::Provider),
            "model" => Some(Self::Model),
            "route" => Some(Self::Route),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Provider => "provider",
            Self::Model => "model",
            Self::Route => "route",
        }
    }
}

/// Time buckets of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    Hour,
    Day,
}

impl Bucket {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "hour" => Some(Self::Hour),
            "day" => Some(Self::Day),
            _ => None,
        }
    }

    fn ms(self) -> u64 {
        match self {
            Self::Hour => HOUR_MS,
            Self::Day => 24 * HOUR_MS,
        }
    }
}

/// A question about usage: the hours from `from` (inclusive) to `to` (exclusive).
#[derive(Debug, Clone)]
pub struct Query {
    pub from: SystemTime,
    pub to: SystemTime,
    pub group_by: Vec<Dimension>,
    pub bucket: Option<Bucket>,
}

/// One row of an answer: its bucket's start (when bucketed), its group's values, and sums.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Row {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    #[serde(flatten)]
    pub group: serde_json::Map<String, serde_json::Value>,
    #[serde(flatten)]
    pub totals: Totals,
}

/// Answers `q` from the file at `path` (no file yet: no rows). A running balancer flushes its
/// tally first.
pub fn query(path: &Path, q: &Query) -> Result<(Vec<Row>, Totals), String> {
    let mut sums = Sums::default();
    if path.exists() {
        let conn = open(path)?;
        let columns: Vec<&str> = q.group_by.iter().map(|d| d.as_str()).collect();
        // Column names come from the enum above, never from the request.
        let select_group = if columns.is_empty() {
            String::new()
        } else {
            format!(", {}", columns.join(", "))
        };
        let sql = format!(
            "SELECT hour_ms{select_group}, requests, input_tokens, output_tokens, cache_write_tokens,
                    cache_read_tokens, cost_usd, unpriced_requests
             FROM hourly WHERE hour_ms >= ?1 AND hour_ms < ?2 ORDER BY hour_ms"
        );
        let mut stmt = conn.prepare(&sql).map_err(|e| e.to_string())?;
        let n = columns.len();
        let rows = stmt
            .query_map(params![unix_ms(q.from) as i64, unix_ms(q.to) as i64], |r| {
                let hour = r.get::<_, i64>(0)? as u64;
                let mut group = Vec::with_capacity(n);
                for i in 0..n {
                    group.push(r.get::<_, String>(1 + i)?);
                }
                let t = Totals {
                    requests: r.get::<_, i64>(n + 1)? as u64,
                    input_tokens: r.get::<_, i64>(n + 2)? as u64,
                    output_tokens: r.get::<_, i64>(n + 3)? as u64,
                    cache_creation_input_tokens: r.get::<_, i64>(n + 4)? as u64,
                    cache_read_input_tokens: r.get::<_, i64>(n + 5)? as u64,
                    cost_usd: r.get::<_, f64>(n + 6)?,
                    unpriced_requests: r.get::<_, i64>(n + 7)? as u64,
                };
                Ok((hour, group, t))
            })
            .map_err(|e| e.to_string())?;
        for row in rows {
            let (hour, group, t) = row.map_err(|e| e.to_string())?;
            sums.add(q, hour, group, &t);
        }
    }
    Ok(sums.answer(q))
}

/// The rows of an answer being gathered: (bucket start, group values, sums), in the order met.
#[derive(Debug, Default)]
pub struct Sums(Vec<(Option<u64>, Vec<String>, Totals)>);

impl Sums {
    /// Adds one hour's totals of one group.
    pub fn add(&mut self, q: &Query, hour_ms: u64, group: Vec<String>, t: &Totals) {
        let start = q.bucket.map(|b| hour_ms - hour_ms % b.ms());
        match self
            .0
            .iter_mut()
            .find(|(s, g, _)| *s == start && *g == group)
        {
            Some((_, _, sum)) => sum.merge(t),
            None => self.0.push((start, group, *t)),
        }
    }

    /// The rows, in time order, and their total.
    pub fn answer(mut self, q: &Query) -> (Vec<Row>, Totals) {
        self.0.sort_by_key(|(start, _, _)| *start);
        answer(q, self.0)
    }
}

fn answer(q: &Query, sums: Vec<(Option<u64>, Vec<String>, Totals)>) -> (Vec<Row>, Totals) {
    let mut total = Totals::default();
    let rows = sums
        .into_iter()
        .map(|(start, group, t)| {
            total.merge(&t);
            Row {
                start: start.map(|ms| {
                    humantime::format_rfc3339_seconds(
                        SystemTime::UNIX_EPOCH + Duration::from_millis(ms),
                    )
                    .to_string()
                }),
                group: q
                    .group_by
                    .iter()
                    .zip(group)
                    .map(|(d, v)| (d.as_str().to_owned(), serde_json::Value::String(v)))
                    .collect(),
                totals: t,
            }
        })
        .collect();
    (rows, total)
}

/// Reads a moment: RFC 3339 (`2026-12-01T08:00:00Z`), a date (`2026-12-01`, its midnight UTC)
/// or Unix seconds.
fn moment(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<u64>()
            .ok()
            .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
    }
    if s.len() == 10 {
        return humantime::parse_rfc3339(&format!("{s}T00:00:00Z")).ok();
    }
    humantime::parse_rfc3339_weak(s).ok()
}

impl Query {
    /// The query of `GET /usage` and `claude-balancer usage`: `from` and `to` (default: the last
    /// 24 hours), `group_by` (a comma-separated list of client, provider, model, route) and
    /// `bucket` (hour or day; default: none, one row per group).
    pub fn from_params(
        get: impl Fn(&str) -> Option<String>,
        now: SystemTime,
    ) -> Result<Self, String> {
        let time = |key: &str| -> Result<Option<SystemTime>, String> {
            match get(key) {
                None => Ok(None),
                Some(v) => moment(&v).map(Some).ok_or_else(|| {
                    format!("{key}: expected a date (2026-12-01), an RFC 3339 time or Unix seconds, found {v:?}")
                }),
            }
        };
        // The hour under way counts: `to` is exclusive and compared with the start of hours.
        let to = time("to")?.unwrap_or(now);
        let from = time("from")?.unwrap_or(to - Duration::from_secs(86_400));
        if from > to {
            return Err("from: must not be after to".to_owned());
        }
        let mut group_by = Vec::new();
        if let Some(list) = get("group_by") {
            for part in list.split(',').filter(|p| !p.trim().is_empty()) {
                match Dimension::parse(part) {
                    Some(d) if !group_by.contains(&d) => group_by.push(d),
                    Some(_) => {}
                    None => {
                        return Err(format!(
                            "group_by: expected client, provider, model or route, found {:?}",
                            part.trim()
                        ));
                    }
                }
            }
        }
        let bucket = match get("bucket") {
            None => None,
            Some(b) if b.trim().is_empty() => None,
            Some(b) => Some(
                Bucket::parse(&b)
                    .ok_or_else(|| format!("bucket: expected hour or day, found {b:?}"))?,
            ),
        };
        Ok(Self {
            from,
            to,
            group_by,
            bucket,
        })
    }
}

/// The rows and totals as a text table (for `claude-balancer usage`).
pub fn table(q: &Query, rows: &[Row], total: &Totals) -> String {
    let mut header: Vec<String> = Vec::new();
    if q.bucket.is_some() {
        header.push("start".into());
    }
    header.extend(q.group_by.iter().map(|d| d.as_str().to_owned()));
    for h in [
        "requests",
        "input",
        "output",
        "cache_write",
        "cache_read",
        "cost_usd",
    ] {
        header.push(h.into());
    }
    let numbers = |t: &Totals| {
        vec![
            t.requests.to_string(),
            t.input_tokens.to_string(),
            t.output_tokens.to_string(),
            t.cache_creation_input_tokens.to_string(),
            t.cache_read_input_tokens.to_string(),
            format!("{:.4}", t.cost_usd),
        ]
    };
    let mut lines: Vec<Vec<String>> = vec![header];
    for r in rows {
        let mut line = Vec::new();
        if let Some(s) = &r.start {
            line.push(s.clone());
        }
        for d in &q.group_by {
            let v = r
                .group
                .get(d.as_str())
                .and_then(|v| v.as_str())
                .unwrap_or("");
            line.push(if v.is_empty() {
                "-".to_owned()
            } else {
                v.to_owned()
            });
        }
        line.extend(numbers(&r.totals));
        lines.push(line);
    }
    let mut last = vec![String::new(); lines[0].len() - 6];
    if let Some(first) = last.first_mut() {
        *first = "total".into();
    }
    last.extend(numbers(total));
    lines.push(last);
    let widths: Vec<usize> = (0..lines[0].len())
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for l in &lines {
        let cells: Vec<String> = l
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i + 6 >= l.len() {
                    format!("{c:>w$}")
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    if total.unpriced_requests > 0 {
        out.push_str(&format!(
            "{} request(s) used models with no price (counted as 0 USD): add them under pricing:\n",
            total.unpriced_requests
        ));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn params<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn a_query_reads_dates_times_and_seconds_and_names_what_it_cannot() {
        let now = humantime::parse_rfc3339("2026-12-02T13:00:00Z").unwrap();
        let q = Query::from_params(params(&[]), now).unwrap();
        assert_eq!(q.to, now);
        assert_eq!(
            now.duration_since(q.from).unwrap(),
            Duration::from_secs(86_400)
        );
        assert!(q.group_by.is_empty() && q.bucket.is_none());

        let q = Query::from_params(
            params(&[
                ("from", "2026-11-01"),
                ("to", "1796169600"),
                ("group_by", "client, model,client"),
                ("bucket", "day"),
            ]),
            now,
        )
        .unwrap();
        assert_eq!(
            q.from,
            humantime::parse_rfc3339("2026-11-01T00:00:00Z").unwrap()
        );
        assert_eq!(
            q.to,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_169_600)
        );
        assert_eq!(q.group_by, vec![Dimension::Client, Dimension::Model]);
        assert_eq!(q.bucket, Some(Bucket::Day));

        for (pairs, expected) in [
            (vec![("from", "yesterday")], "from: expected a date"),
            (
                vec![("group_by", "team")],
                "group_by: expected client, provider, model or route, found \"team\"",
            ),
            (vec![("bucket", "week")], "bucket: expected hour or day"),
            (
                vec![("from", "2026-12-02"), ("to", "2026-12-01")],
                "from: must not be after to",
            ),
        ] {
            let e = Query::from_params(params(&pairs), now).unwrap_err();
            assert!(e.starts_with(expected), "{e}");
        }
    }

    #[test]
    fn the_tally_is_folded_into_hours_and_read_back_by_bucket_and_group() {
        let dir = tempfile_dir();
        let path = dir.join("usage.db");
        let store = UsageStore::start(path.to_str().unwrap(), false).unwrap();
        let at = |s: &str| humantime::parse_rfc3339(s).unwrap();
        let usage = Usage {
            input_tokens: 10,
            output_tokens: 2,
            cache_creation_input_tokens: 100,
            cache_read_input_tokens: 1000,
        };
        for (client, model, time, cost) in [
            ("alice", "m1", "2026-12-01T08:10:00Z", Some(1.0)),
            ("alice", "m1", "2026-12-01T08:50:00Z", Some(1.0)),
            ("alice", "m2", "2026-12-01T09:05:00Z", None),
            ("bob", "m1", "2026-12-02T01:00:00Z", Some(0.5)),
        ] {
            store.record(&Charge {
                client: Arc::from(client),
                route: Arc::from("*"),
                provider: "P".into(),
                model: model.into(),
                usage,
                cost,
                at: at(time),
            });
        }
        store.flush();
        let q = Query {
            from: at("2026-12-01T00:00:00Z"),
            to: at("2026-12-03T00:00:00Z"),
            group_by: vec![Dimension::Client],
            bucket: Some(Bucket::Day),
        };
        let (rows, total) = query(&path, &q).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].start.as_deref(), Some("2026-12-01T00:00:00Z"));
        assert_eq!(rows[0].group["client"], "alice");
        assert_eq!(rows[0].totals.requests, 3);
        assert_eq!(rows[0].totals.cache_read_input_tokens, 3000);
        assert_eq!(rows[0].totals.cost_usd, 2.0);
        assert_eq!(rows[0].totals.unpriced_requests, 1);
        assert_eq!(rows[1].group["client"], "bob");
        assert_eq!(total.requests, 4);
        // By hour, one client's window: 08:00 holds two requests, 09:00 one.
        let q = Query {
            from: at("2026-12-01T08:00:00Z"),
            to: at("2026-12-01T10:00:00Z"),
            group_by: vec![],
            bucket: Some(Bucket::Hour),
        };
        let (rows, _) = query(&path, &q).unwrap();
        let counts: Vec<(Option<String>, u64)> = rows
            .iter()
            .map(|r| (r.start.clone(), r.totals.requests))
            .collect();
        assert_eq!(
            counts,
            vec![
                (Some("2026-12-01T08:00:00Z".to_owned()), 2),
                (Some("2026-12-01T09:00:00Z".to_owned()), 1)
            ]
        );
        // Per client and minute, for the limit windows.
        let recent = store.recent_by_client(at("2026-12-01T08:30:00Z")).unwrap();
        let alice: u64 = recent.iter().filter(|r| r.0 == "alice").map(|r| r.2).sum();
        assert_eq!(alice, 2 * 1112);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "cb-usage-test-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
