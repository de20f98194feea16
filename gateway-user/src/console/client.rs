//! The console's HTTP client for the OpenID provider: discovery and the
//! token endpoint. HTTPS with the system roots (or the issuer's `ca_file`);
//! plain HTTP only to a loopback address, for tests. One connection per
//! request, no redirects, bounded body and time.

use std::{path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{header, Request, Uri};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{pem::PemObject, CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};

/// Largest answer read from the provider.
pub const MAX_BODY: usize = 256 * 1024;
/// Longest a call to the provider may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed `http(s)://host[:port]/path` target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `https` (or `http` for loopback).
    pub https: bool,
    /// Host name or address (no brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// `host[:port]` as written.
    pub authority: String,
    /// Path and query.
    pub path: String,
}

/// Whether `host` is a loopback address or `localhost`.
pub fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Parses a URL the console may call: https, or http to loopback only.
pub fn target(url: &str) -> Result<Target, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("{url:?}: only https URLs are allowed")),
    };
    let authority = uri
        .authority()
        .ok_or_else(|| format!("{url:?} has no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!("{url:?}: user info is not allowed"));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if !https && !is_loopback(&host) {
        return Err(format!(
            "{url:?}: plain http is accepted for loopback addresses only"
        ));
    }
    Ok(Target {
        https,
        port: authority.port_u16().unwrap_or(if https { 443 } else { 80 }),
        authority: authority.as_str().to_string(),
        host,
        path: uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/".into()),
    })
}

/// The TLS client configuration: `ca_file`'s certificates, else the
/// system's roots.
pub fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("CA file {}: {e}", path.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("CA file {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("CA file {}: {e}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Sends one request; returns the status and body.
pub async fn call(
    tls: &Arc<rustls::ClientConfig>,
    method: &str,
    url: &str,
    headers: &[(&str, String)],
    body: Option<Vec<u8>>,
) -> Result<(u16, Vec<u8>), String> {
    let t = target(url)?;
    match tokio::time::timeout(TIMEOUT, call_inner(tls, &t, method, headers, body)).await {
        Ok(r) => r.map_err(|e| format!("{url}: {e}")),
        Err(_) => Err(format!("{url}: no complete answer within {TIMEOUT:?}")),
    }
}

async fn call_inner(
    tls: &Arc<rustls::ClientConfig>,
    t: &Target,
    method: &str,
    headers: &[(&str, String)],
    body: Option<Vec<u8>>,
) -> Result<(u16, Vec<u8>), String> {
    let tcp = tokio::net::TcpStream::connect((t.host.as_str(), t.port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    if t.https {
        let name = ServerName::try_from(t.host.clone()).map_err(|e| format!("host: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        exchange(stream, t, method, headers, body).await
    } else {
        exchange(tcp, t, method, headers, body).await
    }
}

async fn exchange<S>(
    stream: S,
    t: &Target,
    method: &str,
    headers: &[(&str, String)],
    body: Option<Vec<u8>>,
) -> Result<(u16, Vec<u8>), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let mut req = Request::builder()
        .method(method)
        .uri(t.path.as_str())
        .header(header::HOST, t.authority.as_str())
        .header(header::USER_AGENT, "portcullis-console")
        .header(header::ACCEPT, "application/json");
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| format!("request: {e}"))?;
    let exchange = async move {
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading body: {e}"))?;
        Ok((status, body.to_bytes().to_vec()))
    };
    // Driven here, not spawned: a timeout drops the whole connection.
    tokio::pin!(exchange);
    tokio::pin!(conn);
    let mut conn_done = false;
    loop {
        tokio::select! {
            result = &mut exchange => return result,
            _ = &mut conn, if !conn_done => conn_done = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_loopback_http() {
        assert!(target("https://idp.example/token").is_ok());
        assert!(target("http://127.0.0.1:8080/token").is_ok());
        assert!(target("http://[::1]:8080/token").is_ok());
        assert!(target("http://idp.example/token").is_err());
        assert!(target("http://10.0.0.1/token").is_err());
        assert!(target("ftp://idp.example/").is_err());
        assert!(target("https://user@idp.example/").is_err());
        let t = target("https://idp.example:8443/a/b?c=d").unwrap();
        assert_eq!((t.port, t.path.as_str()), (8443, "/a/b?c=d"));
    }
}
