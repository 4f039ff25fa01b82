//! Test harness: the balancer in-process on 127.0.0.1:0, with its configuration in a temp file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use claude_balancer::config::load_file;
use claude_balancer::state::AppState;
use claude_balancer::{server, upstream};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

#[allow(unused_imports)]
pub use mock_provider::{End, MockProvider, Reply};

pub struct Balancer {
    pub addr: SocketAddr,
    pub url: String,
    pub state: Arc<AppState>,
    pub config_file: tempfile::NamedTempFile,
    /// Holds the usage file.
    pub data: tempfile::TempDir,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Balancer {
    pub async fn start(yaml: &str) -> Self {
        upstream::install_crypto_provider();
        let config_file = tempfile::NamedTempFile::new().unwrap();
        let data = tempfile::tempdir().unwrap();
        // The usage file goes into a folder of its own, not into the working folder, unless the
        // test chose its own.
        let yaml = if yaml.contains("\n  usage:") {
            yaml.to_owned()
        } else if !yaml.starts_with("settings:\n") && !yaml.contains("\nsettings:\n") {
            format!(
                "{yaml}{}settings:\n  usage:\n    path: \"{}/usage.db\"\n",
                if yaml.ends_with('\n') { "" } else { "\n" },
                data.path().display()
            )
        } else {
            yaml.replacen(
                "\nsettings:\n",
                &format!(
                    "\nsettings:\n  usage:\n    path: \"{}/usage.db\"\n",
                    data.path().display()
                ),
                1,
            )
        };
        std::fs::write(config_file.path(), &yaml).unwrap();
        let loaded =
            load_file(config_file.path()).unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
        let state = AppState::new(loaded.config, Some(config_file.path().to_path_buf())).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let s = Arc::clone(&state);
        let server = tokio::spawn(async move {
            let _ = server::serve(listener, s, async {
                let _ = rx.await;
            })
            .await;
        });
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        Self {
            addr,
            url: format!("http://{addr}"),
            state,
            config_file,
            data,
            client,
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    /// Starts a graceful shutdown; the handle resolves when the server has stopped.
    pub fn shutdown(&mut self) -> tokio::task::JoinHandle<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.server.take().expect("shut down twice")
    }

    pub fn write_config(&self, yaml: &str) {
        std::fs::write(self.config_file.path(), yaml).unwrap();
    }

    /// Sends a POST; the future borrows nothing, so many can run at once.
    pub fn post(
        &self,
        path: &str,
        body: &Value,
    ) -> impl std::future::Future<Output = reqwest::Response> + 'static {
        self.post_with(path, body, &[])
    }

    pub fn post_with(
        &self,
        path: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> impl std::future::Future<Output = reqwest::Response> + 'static {
        let mut req = self.client.post(format!("{}{path}", self.url)).json(body);
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        async move { req.send().await.unwrap() }
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let resp = self
            .client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }

    /// The body of a `GET`, as text.
    pub async fn get_text(&self, path: &str) -> String {
        self.client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `POST /cache/clear`, and its answer.
    pub async fn clear_cache(&self) -> Value {
        self.client
            .post(format!("{}/cache/clear", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The `GET /providers` entry of one provider.
    /// A GET of `path` with `key` as `x-api-key`.
    pub async fn get_with_key(&self, path: &str, key: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.url))
            .header("x-api-key", key)
            .send()
            .await
            .unwrap()
    }

    pub async fn provider(&self, name: &str) -> Value {
        provider_in(&self.get_json("/providers").await.1, name)
    }
}

/// The entry of provider `name` in a `GET /providers` answer.
pub fn provider_in(providers: &Value, name: &str) -> Value {
    providers["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .cloned()
        .unwrap()
}

/// A provider entry of type anthropic with a key.
pub fn provider_yaml(name: &str, url: &str) -> String {
    format!(
        "  - name: \"{name}\"\n    type: anthropic\n    base_url: \"{url}\"\n    auth_type: api_key\n    auth_value: \"key-{name}\"\n"
    )
}

/// A config with the given providers, all in one route `*` at the given priorities, and extra settings.
pub fn config_yaml(providers: &[(&str, &str, i64)], settings: &str) -> String {
    let mut y = String::from("providers:\n");
    for (name, url, _) in providers {
        y.push_str(&provider_yaml(name, url));
    }
    y.push_str("model_routes:\n  \"*\":\n");
    for (name, _, prio) in providers {
        y.push_str(&format!(
            "    - provider: \"{name}\"\n      model: passthrough\n      priority: {prio}\n"
        ));
    }
    y.push_str("settings:\n");
    y.push_str(settings);
    y
}

/// Two anthropic providers A (priority 1) and B (priority 2) in the route `*`.
pub async fn two_providers(
    a: Reply,
    b: Reply,
    settings: &str,
) -> (MockProvider, MockProvider, Balancer) {
    let pa = MockProvider::start(a).await.unwrap();
    let pb = MockProvider::start(b).await.unwrap();
    let bal = Balancer::start(&config_yaml(
        &[("A", &pa.url(), 1), ("B", &pb.url(), 2)],
        settings,
    ))
    .await;
    (pa, pb, bal)
}

pub fn request(stream: bool) -> Value {
    json!({
        "model": "claude-sonnet-4-6",
        "max_tokens": 100,
        "stream": stream,
        "messages": [{"role": "user", "content": "hello"}]
    })
}

/// Reads an SSE body into (event name, data JSON) pairs.
pub fn events(text: &str) -> Vec<(String, Value)> {
    claude_balancer::upstream::sse::parse_all(text)
        .into_iter()
        .map(|(n, d)| {
            (
                n.unwrap_or_default(),
                serde_json::from_str(&d).unwrap_or(Value::Null),
            )
        })
        .collect()
}

pub fn names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(n, _)| n.as_str()).collect()
}

/// A real `redis-server` on a free loopback port, with its own temporary folder; killed when
/// dropped. `None` (the test is skipped, loudly) when `redis-server` is not installed, unless
/// `CB_REQUIRE_REDIS` is set, as `.ci/run` does after installing it.
pub struct RedisServer {
    pub port: u16,
    password: Option<String>,
    /// A folder with `ca.pem`, `server.pem` and `server.key`: the server speaks only TLS.
    tls: Option<std::path::PathBuf>,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

// A real process on a real clock: std's Instant and sleep are the right tools here.
#[allow(clippy::disallowed_types, clippy::disallowed_methods)]
impl RedisServer {
    pub fn start(password: Option<&str>) -> Option<Self> {
        Self::start_on(free_port(), password)
    }

    pub fn start_on(port: u16, password: Option<&str>) -> Option<Self> {
        Self::start_with(port, password, None)
    }

    /// A server that accepts only TLS connections, with the certificates in `tls` (see the field).
    pub fn start_tls(tls: &std::path::Path) -> Option<Self> {
        Self::start_with(free_port(), None, Some(tls.to_path_buf()))
    }

    fn start_with(
        port: u16,
        password: Option<&str>,
        tls: Option<std::path::PathBuf>,
    ) -> Option<Self> {
        if std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var_os("CB_REQUIRE_REDIS").is_none(),
                "redis-server is required (CB_REQUIRE_REDIS is set) but not installed"
            );
            eprintln!(
                "redis-server is not installed: this test is skipped (apt-get install redis-server)"
            );
            return None;
        }
        let mut server = Self {
            port,
            password: password.map(str::to_owned),
            tls,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        server.restart();
        Some(server)
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        match &self.password {
            Some(p) => format!("{scheme}://:{p}@127.0.0.1:{}/0", self.port),
            None => format!("{scheme}://127.0.0.1:{}/0", self.port),
        }
    }

    /// Starts it again on the same port (after `kill`), and waits until it accepts connections.
    pub fn restart(&mut self) {
        let mut cmd = std::process::Command::new("redis-server");
        match &self.tls {
            Some(dir) => {
                cmd.args(["--port", "0", "--tls-port", &self.port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(dir.join("server.pem"))
                    .arg("--tls-key-file")
                    .arg(dir.join("server.key"))
                    .arg("--tls-ca-cert-file")
                    .arg(dir.join("ca.pem"))
                    .args(["--tls-auth-clients", "no"]);
            }
            None => {
                cmd.args(["--port", &self.port.to_string()]);
            }
        }
        cmd.args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        self.child = Some(cmd.spawn().unwrap());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback port nothing listens on (at the moment of asking).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` (real time) until it holds, at most `within`; false if it never did.
#[allow(clippy::disallowed_types)]
pub async fn eventually<F, Fut>(within: std::time::Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Two anthropic providers answering "from A" and "from B".
pub async fn providers_a_and_b() -> (MockProvider, MockProvider) {
    (
        MockProvider::start(Reply::message("m", "from A"))
            .await
            .unwrap(),
        MockProvider::start(Reply::message("m", "from B"))
            .await
            .unwrap(),
    )
}
