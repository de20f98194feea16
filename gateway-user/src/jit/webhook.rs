//! Webhooks: POST each JIT event as JSON to configured URLs, so chat or
//! paging tools can ask a human. Off the data path: events go through a
//! bounded queue to a sender task; a slow or dead receiver only delays (and
//! at worst drops) notifications, never a command.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, sync::mpsc};
use tracing::warn;

use super::JitEvent;

/// Queue depth before notifications are dropped.
const QUEUE: usize = 1024;
/// Per-attempt timeout (connect + request + response).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts per notification.
const ATTEMPTS: u32 = 3;

/// A parsed webhook URL.
#[derive(Debug, Clone)]
struct Target {
    url: String,
    tls: bool,
    host: String,
    port: u16,
    path: String,
}

/// The webhook sender.
#[derive(Clone)]
pub struct Webhooks {
    tx: Option<mpsc::Sender<JitEvent>>,
}

impl Webhooks {
    /// Starts a sender for `urls` (none: a no-op). Invalid URLs are errors.
    pub fn start(urls: &[String]) -> Result<Self, String> {
        if urls.is_empty() {
            return Ok(Self { tx: None });
        }
        let targets = urls
            .iter()
            .map(|u| parse(u))
            .collect::<Result<Vec<_>, _>>()?;
        let tls = if targets.iter().any(|t| t.tls) {
            Some(tls_connector()?)
        } else {
            None
        };
        let (tx, mut rx) = mpsc::channel::<JitEvent>(QUEUE);
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                let body = match serde_json::to_vec(&ev) {
                    Ok(b) => Bytes::from(b),
                    Err(_) => continue,
                };
                for t in &targets {
                    let mut delay = Duration::from_millis(200);
                    for attempt in 1..=ATTEMPTS {
                        match tokio::time::timeout(
                            ATTEMPT_TIMEOUT,
                            post(t, tls.as_ref(), body.clone()),
                        )
                        .await
                        {
                            Ok(Ok(())) => break,
                            Ok(Err(e)) => warn!(url = %t.url, attempt, "webhook failed: {e}"),
                            Err(_) => warn!(url = %t.url, attempt, "webhook timed out"),
                        }
                        if attempt < ATTEMPTS {
                            tokio::time::sleep(delay).await;
                            delay *= 4;
                        }
                    }
                }
            }
        });
        Ok(Self { tx: Some(tx) })
    }

    /// Queues an event; never waits. A full queue drops it (and says so).
    pub fn notify(&self, ev: JitEvent) {
        if let Some(tx) = &self.tx {
            if tx.try_send(ev).is_err() {
                warn!("webhook queue full: notification dropped");
            }
        }
    }
}

fn parse(url: &str) -> Result<Target, String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("webhook URL {url:?}: {e}"))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("webhook URL {url:?} must be http:// or https://")),
    };
    let host = uri
        .host()
        .ok_or_else(|| format!("webhook URL {url:?} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    Ok(Target {
        url: url.to_string(),
        tls,
        host,
        port,
        path,
    })
}

fn tls_connector() -> Result<tokio_rustls::TlsConnector, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

async fn post(
    t: &Target,
    tls: Option<&tokio_rustls::TlsConnector>,
    body: Bytes,
) -> Result<(), String> {
    let tcp = TcpStream::connect((t.host.as_str(), t.port))
        .await
        .map_err(|e| e.to_string())?;
    let req = hyper::Request::post(t.path.as_str())
        .header(hyper::header::HOST, &t.host)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("portcullis/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let status = if t.tls {
        let connector = tls.ok_or("no TLS connector")?;
        let name =
            rustls::pki_types::ServerName::try_from(t.host.clone()).map_err(|e| e.to_string())?;
        let stream = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        send(TokioIo::new(stream), req).await?
    } else {
        send(TokioIo::new(tcp), req).await?
    };
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {status}"))
    }
}

async fn send<T>(io: T, req: hyper::Request<Full<Bytes>>) -> Result<hyper::StatusCode, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(resp.status())
}
