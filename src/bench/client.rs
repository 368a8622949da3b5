//! A minimal HTTP/1.1 client for the benchmark: one keep-alive connection
//! per worker and instance, like `wrk`, so that the load is exactly C
//! requests in flight and the client costs as little CPU as possible.
//! Only plain HTTP to loopback addresses.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The longest one request may take before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A server instance the benchmark talks to.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    host: HeaderValue,
}

impl Endpoint {
    /// Parses `http://127.0.0.1:8080` (or `localhost`); anything that is not
    /// plain HTTP on a loopback address is refused: the benchmark sends
    /// traffic to this machine only.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("{url}: only http:// URLs are supported"))?;
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| anyhow!("{url}: the URL needs a port"))?;
        let port: u16 = port
            .parse()
            .with_context(|| format!("{url}: bad port {port:?}"))?;
        let ip: IpAddr = match host.trim_start_matches('[').trim_end_matches(']') {
            "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
            other => other
                .parse()
                .with_context(|| format!("{url}: the host must be an IP address or localhost"))?,
        };
        if !ip.is_loopback() {
            bail!("{url}: the benchmark only talks to loopback addresses");
        }
        Ok(Self::new(SocketAddr::new(ip, port)))
    }

    pub fn new(addr: SocketAddr) -> Self {
        let host = HeaderValue::from_str(&addr.to_string()).expect("an address is a valid header");
        Self { addr, host }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// One request, built by the caller for whichever instance it goes to.
/// Its path and headers are checked and encoded when it is built, so a
/// job that sends the same request again and again (every read figure)
/// builds it once, as `wrk` does, and the client's cost per request does
/// not grow with the size of what it sends.
#[derive(Debug, Clone)]
pub struct Call {
    method: Method,
    /// The path, or why it cannot be one.
    uri: Result<Uri, String>,
    authorization: Option<Result<HeaderValue, String>>,
    idempotency_key: Option<Result<HeaderValue, String>>,
    json: Option<Bytes>,
}

impl Call {
    pub fn get(path: impl Into<String>) -> Self {
        let path = path.into();
        Self {
            method: Method::GET,
            uri: Uri::try_from(path.as_str()).map_err(|error| format!("path {path:?}: {error}")),
            authorization: None,
            idempotency_key: None,
            json: None,
        }
    }

    pub fn post(path: impl Into<String>, json: &serde_json::Value) -> Self {
        Self {
            method: Method::POST,
            json: Some(Bytes::from(json.to_string())),
            ..Self::get(path)
        }
    }

    pub fn put(path: impl Into<String>, json: &serde_json::Value) -> Self {
        Self {
            method: Method::PUT,
            ..Self::post(path, json)
        }
    }

    pub fn bearer(mut self, token: &str) -> Self {
        self.authorization = Some(header_value("the token", format!("Bearer {token}")));
        self
    }

    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(header_value("the idempotency key", key.into()));
        self
    }
}

fn header_value(what: &str, value: String) -> Result<HeaderValue, String> {
    HeaderValue::try_from(value)
        .map_err(|error| format!("{what} cannot be sent in a header: {error}"))
}

/// A response: its status and whole body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "status {} with a body that is not JSON: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The problem `code` of an error answer, if it has one.
    pub fn problem_code(&self) -> Option<String> {
        let body: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        body.get("code")?.as_str().map(str::to_owned)
    }

    /// The JSON body of a successful answer with the expected status.
    pub fn expect(&self, status: u16, what: &str) -> anyhow::Result<serde_json::Value> {
        if self.status != status {
            bail!(
                "{what}: expected {status}, got {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            );
        }
        self.json().with_context(|| what.to_owned())
    }
}

/// A worker's connections, one per instance, opened on first use and
/// reopened when the server closed one.
pub struct Worker {
    endpoints: Arc<[Endpoint]>,
    connections: Vec<Option<SendRequest<Full<Bytes>>>>,
}

impl Worker {
    pub fn new(endpoints: Arc<[Endpoint]>) -> Self {
        let connections = endpoints.iter().map(|_| None).collect();
        Self {
            endpoints,
            connections,
        }
    }

    pub fn instances(&self) -> usize {
        self.endpoints.len()
    }

    /// Opens a connection to every instance (before a timed phase).
    pub async fn connect_all(&mut self) -> anyhow::Result<()> {
        for instance in 0..self.endpoints.len() {
            self.ready(instance).await?;
        }
        Ok(())
    }

    /// Sends `call` to instance `instance` (modulo the number of instances)
    /// and reads the whole answer; at most `REQUEST_TIMEOUT`.
    /// Sends a call that is safe to repeat, again on a fresh connection when
    /// the transport failed (a keep-alive connection the server closed just
    /// as the request went out, say).
    pub async fn send_repeatable(
        &mut self,
        instance: usize,
        call: &Call,
    ) -> anyhow::Result<Answer> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.send(instance, call).await {
                Err(_) if attempts < 3 => continue,
                answer => return answer,
            }
        }
    }

    pub async fn send(&mut self, instance: usize, call: &Call) -> anyhow::Result<Answer> {
        let instance = instance % self.endpoints.len();
        match tokio::time::timeout(REQUEST_TIMEOUT, self.send_once(instance, call)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(error)) => {
                self.connections[instance] = None;
                Err(error)
            }
            Err(_) => {
                self.connections[instance] = None;
                Err(anyhow!("no answer within {REQUEST_TIMEOUT:?}"))
            }
        }
    }

    async fn send_once(&mut self, instance: usize, call: &Call) -> anyhow::Result<Answer> {
        let addr = self.endpoints[instance].addr;
        let uri = call.uri.clone().map_err(anyhow::Error::msg)?;
        let mut request = Request::builder()
            .method(call.method.clone())
            .uri(uri)
            .header(HOST, self.endpoints[instance].host.clone());
        if let Some(token) = &call.authorization {
            request = request.header(AUTHORIZATION, token.clone().map_err(anyhow::Error::msg)?);
        }
        if let Some(key) = &call.idempotency_key {
            request = request.header("idempotency-key", key.clone().map_err(anyhow::Error::msg)?);
        }
        let body = match &call.json {
            Some(json) => {
                request = request.header(CONTENT_TYPE, "application/json");
                json.clone()
            }
            None => Bytes::new(),
        };
        let request = request.body(Full::new(body))?;

        let sender = self.ready(instance).await?;
        let response = sender
            .send_request(request)
            .await
            .with_context(|| format!("request to {addr}"))?;
        let status = response.status().as_u16();
        let keep_alive = !response
            .headers()
            .get(hyper::header::CONNECTION)
            .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"close"));
        let body = response.into_body().collect().await?.to_bytes();
        if !keep_alive {
            self.connections[instance] = None;
        }
        Ok(Answer { status, body })
    }

    /// A connection to `instance` that can take a request now.
    async fn ready(&mut self, instance: usize) -> anyhow::Result<&mut SendRequest<Full<Bytes>>> {
        if let Some(sender) = &mut self.connections[instance] {
            if sender.ready().await.is_err() {
                self.connections[instance] = None;
            }
        }
        if self.connections[instance].is_none() {
            let addr = self.endpoints[instance].addr;
            let stream = TcpStream::connect(addr)
                .await
                .with_context(|| format!("connecting to {addr}"))?;
            stream.set_nodelay(true)?;
            let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                // Ends when the server or the worker closes the connection.
                let _ = connection.await;
            });
            self.connections[instance] = Some(sender);
        }
        let sender = self.connections[instance]
            .as_mut()
            .expect("a connection was just opened");
        sender.ready().await?;
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_http_urls_are_accepted() {
        assert_eq!(
            Endpoint::parse("http://127.0.0.1:8080").unwrap().addr,
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(
            Endpoint::parse("http://localhost:9000/").unwrap().addr,
            "127.0.0.1:9000".parse().unwrap()
        );
        assert!(Endpoint::parse("http://[::1]:8080").is_ok());
        for refused in [
            "https://127.0.0.1:8080",
            "http://10.0.0.1:8080",
            "http://example.com:80",
            "http://127.0.0.1",
        ] {
            assert!(Endpoint::parse(refused).is_err(), "{refused}");
        }
    }
}
