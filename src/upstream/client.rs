//! The HTTP client that carries requests to providers.
//!
//! Direct connections go through hyper's pooled client (HTTP/1.1, or HTTP/2 where TLS offers it);
//! providers behind an outbound proxy (`http://`, `https://`, `socks5://`) go through reqwest,
//! which speaks CONNECT and SOCKS. Both answer with the same [`UpstreamResponse`] and fail with
//! the same [`TransportError`], so nothing above this module knows which one carried a request.

use std::error::Error as StdError;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::secret::{Secret, mask_url_credentials};

/// Idle pooled connections are closed after this long.
const POOL_IDLE: Duration = Duration::from_secs(90);
/// Idle pooled connections kept per provider host.
const POOL_MAX_IDLE_PER_HOST: usize = 256;
/// TCP keepalive probes: first after this much silence, then at this interval.
const TCP_KEEPALIVE: Duration = Duration::from_secs(15);
/// Unacknowledged data for this long ends the connection (Linux).
#[cfg(target_os = "linux")]
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// A pooled client for one (outbound proxy, connect timeout). Cloning shares the pool.
#[derive(Clone)]
pub struct Client(Inner);

#[derive(Clone)]
enum Inner {
    Direct(Arc<PerThread>),
    Proxied(reqwest::Client),
}

type Hyper = legacy::Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// One hyper pool per thread that sends requests. The binary runs one single-threaded runtime per
/// core (`server::serve_on`); a pooled connection's task lives on the runtime that opened it, so a
/// pool shared by every runtime had requests on one core use connections driven by another, and
/// every hop of every request crossed threads. With a pool per thread, a request, its connection
/// and its client stay on one core.
struct PerThread {
    connector: HttpsConnector<HttpConnector>,
    pools: Mutex<Vec<(ThreadId, Hyper)>>,
}

impl PerThread {
    fn pool(&self) -> Hyper {
        let me = std::thread::current().id();
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, pool)) = pools.iter().find(|(id, _)| *id == me) {
            return pool.clone();
        }
        let pool = legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(self.connector.clone());
        pools.push((me, pool.clone()));
        pool
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The proxy URL may hold credentials: only the kind is shown.
        f.write_str(match self.0 {
            Inner::Direct(_) => "Client(direct)",
            Inner::Proxied(_) => "Client(proxied)",
        })
    }
}

impl Client {
    /// A client that connects to providers itself.
    pub fn direct(connect_timeout: Duration) -> Result<Self, String> {
        super::install_crypto_provider();
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        // As reqwest sets them: a pooled connection that a NAT or a load balancer dropped silently
        // is found dead by the kernel instead of by a request's timeout.
        http.set_keepalive(Some(TCP_KEEPALIVE));
        http.set_keepalive_interval(Some(TCP_KEEPALIVE));
        http.set_keepalive_retries(Some(3));
        #[cfg(target_os = "linux")]
        http.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT));
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .try_with_platform_verifier()
            .map_err(|e| format!("cannot load the system's TLS roots: {e}"))?
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        Ok(Self(Inner::Direct(Arc::new(PerThread {
            connector: https,
            pools: Mutex::new(Vec::new()),
        }))))
    }

    /// A client that reaches providers through an outbound proxy.
    pub fn proxied(proxy: &Secret, connect_timeout: Duration) -> Result<Self, String> {
        super::install_crypto_provider();
        let masked = || mask_url_credentials(proxy.expose());
        let proxy =
            reqwest::Proxy::all(proxy.expose()).map_err(|e| format!("proxy {}: {e}", masked()))?;
        let client = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .redirect(reqwest::redirect::Policy::none())
            .proxy(proxy)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Self(Inner::Proxied(client)))
    }

    /// `POST`s `body` to `target`; resolves when the response headers arrive.
    pub async fn post(
        &self,
        target: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<UpstreamResponse, TransportError> {
        let mut request = Request::new(body);
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = target;
        *request.headers_mut() = headers;
        // reqwest's default, kept for providers that look at it.
        request
            .headers_mut()
            .entry(http::header::ACCEPT)
            .or_insert(http::HeaderValue::from_static("*/*"));
        match &self.0 {
            Inner::Direct(pools) => {
                let response = pools
                    .pool()
                    .request(request.map(Full::new))
                    .await
                    .map_err(|e| TransportError::from_error(&e))?;
                let (parts, body) = response.into_parts();
                Ok(UpstreamResponse {
                    status: parts.status,
                    headers: parts.headers,
                    body: Body::Direct(body),
                })
            }
            Inner::Proxied(client) => {
                let request = reqwest::Request::try_from(request)
                    .map_err(|e| TransportError::from_error(&e.without_url()))?;
                let mut response = client
                    .execute(request)
                    .await
                    .map_err(|e| TransportError::from_error(&e.without_url()))?;
                Ok(UpstreamResponse {
                    status: response.status(),
                    headers: std::mem::take(response.headers_mut()),
                    body: Body::Proxied(response),
                })
            }
        }
    }
}

/// A provider's answer: status and headers read, body still on the wire.
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: Body,
}

enum Body {
    Direct(Incoming),
    Proxied(reqwest::Response),
}

impl UpstreamResponse {
    /// The next piece of the body; `None` at its end.
    pub async fn chunk(&mut self) -> Option<Result<Bytes, TransportError>> {
        match &mut self.body {
            Body::Direct(body) => loop {
                match body.frame().await? {
                    Err(e) => return Some(Err(TransportError::from_error(&e))),
                    Ok(frame) => {
                        // Trailers carry nothing a client gets.
                        if let Ok(data) = frame.into_data() {
                            return Some(Ok(data));
                        }
                    }
                }
            },
            Body::Proxied(response) => match response.chunk().await {
                Ok(Some(data)) => Some(Ok(data)),
                Ok(None) => None,
                Err(e) => Some(Err(TransportError::from_error(&e.without_url()))),
            },
        }
    }

    /// The body as a stream of pieces.
    pub fn into_stream(self) -> BoxStream<'static, Result<Bytes, TransportError>> {
        futures_util::stream::unfold(self, |mut response| async move {
            let next = response.chunk().await?;
            Some((next, response))
        })
        .boxed()
    }
}

/// A failure to reach a provider or to read its answer: the error and its causes in one line.
#[derive(Debug, Clone)]
pub struct TransportError {
    message: String,
    timeout: bool,
}

impl TransportError {
    pub fn new(message: String) -> Self {
        Self {
            message,
            timeout: false,
        }
    }

    fn from_error(e: &(dyn StdError + 'static)) -> Self {
        let mut parts: Vec<String> = Vec::new();
        let mut timeout = false;
        let mut source = Some(e);
        while let Some(s) = source {
            if let Some(io) = s.downcast_ref::<std::io::Error>() {
                timeout |= io.kind() == std::io::ErrorKind::TimedOut;
            }
            if let Some(r) = s.downcast_ref::<reqwest::Error>() {
                timeout |= r.is_timeout();
            }
            let text = s.to_string();
            if !parts.iter().any(|p| p.contains(&text)) {
                parts.push(text);
            }
            source = s.source();
        }
        Self {
            message: parts.join(": "),
            timeout,
        }
    }

    pub fn is_timeout(&self) -> bool {
        self.timeout
    }
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl StdError for TransportError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thread_gets_its_own_pool_and_keeps_it() {
        let client = Client::direct(Duration::from_secs(1)).unwrap();
        let Inner::Direct(per_thread) = &client.0 else {
            panic!("a direct client");
        };
        let count = || per_thread.pools.lock().unwrap().len();
        per_thread.pool();
        per_thread.pool();
        assert_eq!(count(), 1, "one thread, one pool");
        std::thread::scope(|s| {
            s.spawn(|| {
                per_thread.pool();
                per_thread.pool();
            });
        });
        assert_eq!(count(), 2, "another thread, another pool");
        per_thread.pool();
        assert_eq!(count(), 2);
    }

    fn headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        h
    }

    async fn echo_server() -> (std::net::SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            // Head and the 5-byte body.
            while !seen.ends_with(b"hello") {
                let n = tcp.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
                seen.extend_from_slice(&buf[..n]);
            }
            tcp.write_all(b"HTTP/1.1 201 Created\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
                .await
                .unwrap();
            seen
        });
        (addr, task)
    }

    #[tokio::test]
    async fn a_direct_post_carries_method_path_host_length_and_body_and_reads_the_answer() {
        let (addr, server) = echo_server().await;
        let client = Client::direct(Duration::from_secs(5)).unwrap();
        let uri: Uri = format!("http://{addr}/v1/messages?beta=true")
            .parse()
            .unwrap();
        let mut resp = client
            .post(uri, headers(), Bytes::from_static(b"hello"))
            .await
            .unwrap();
        assert_eq!(resp.status, StatusCode::CREATED);
        assert_eq!(resp.headers["content-type"], "text/plain");
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await {
            body.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(body, b"abcde");
        let seen = String::from_utf8(server.await.unwrap())
            .unwrap()
            .to_lowercase();
        assert!(
            seen.starts_with("post /v1/messages?beta=true http/1.1\r\n"),
            "{seen}"
        );
        assert!(seen.contains(&format!("host: {addr}\r\n")), "{seen}");
        assert!(seen.contains("content-length: 5\r\n"), "{seen}");
        assert!(
            seen.contains("content-type: application/json\r\n"),
            "{seen}"
        );
        // reqwest's default `accept`, kept.
        assert!(seen.contains("accept: */*\r\n"), "{seen}");
    }

    #[tokio::test]
    async fn https_is_spoken_to_https_urls() {
        // A plain-HTTP listener behind an https:// URL: the client must start a TLS handshake,
        // which the listener cannot finish.
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut first = [0u8; 1];
            tcp.read_exact(&mut first).await.unwrap();
            first[0]
        });
        let client = Client::direct(Duration::from_secs(5)).unwrap();
        let uri: Uri = format!("https://{addr}/v1/messages").parse().unwrap();
        let err = client
            .post(uri, headers(), Bytes::from_static(b"{}"))
            .await
            .err()
            .unwrap();
        // 0x16: a TLS handshake record, not "POST".
        assert_eq!(server.await.unwrap(), 0x16);
        assert!(!err.is_timeout(), "{err}");
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_transport_error_with_its_cause() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let client = Client::direct(Duration::from_secs(5)).unwrap();
        let err = client
            .post(
                format!("http://{addr}/").parse().unwrap(),
                headers(),
                Bytes::new(),
            )
            .await
            .err()
            .unwrap();
        assert!(err.to_string().to_lowercase().contains("refused"), "{err}");
        assert!(!err.is_timeout());
    }

    #[test]
    fn debug_never_shows_the_proxy() {
        let proxy = Secret::new("http://user:hunter2@proxy.example:3128");
        let client = Client::proxied(&proxy, Duration::from_secs(1)).unwrap();
        let shown = format!("{client:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("proxied"),
            "{shown}"
        );
    }
}
