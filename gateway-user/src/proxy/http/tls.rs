//! The agent side of TLS: interception (terminate with a leaf from the
//! local CA for the SNI, or an IP SAN when there is none; ALPN chosen by
//! the caller: h2 and http/1.1 for HTTP, `postgresql` for the PostgreSQL
//! handler's `ssl = "on"`) and passthrough (read the ClientHello for its SNI without
//! answering it, so the bytes can be replayed to the upstream).
//!
//! Owns the handshake with the agent only. It must not decide anything.

use std::{io, net::IpAddr, sync::Arc, time::Duration};

use rustls::{
    server::{Acceptor, ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    ServerConfig,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio_rustls::{server::TlsStream, LazyConfigAcceptor};

use super::ca::LocalCa;

/// How long an agent may take to finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most ClientHello bytes read in passthrough mode.
pub const CLIENT_HELLO_MAX: usize = 32 * 1024;

#[derive(Debug)]
struct OneCert(Arc<CertifiedKey>);

impl ResolvesServerCert for OneCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

fn timeout_err() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
}

/// ALPN offered by HTTP interception, best first.
pub const ALPN_HTTP: &[&[u8]] = &[b"h2", b"http/1.1"];
/// ALPN of PostgreSQL over TLS (what PostgreSQL 17+ servers and clients use).
pub const ALPN_POSTGRES: &[&[u8]] = &[b"postgresql"];

/// Terminates the agent's TLS. Returns the stream and the SNI it sent.
/// `dst` names the leaf when the agent sent no SNI (it dialed an address);
/// `alpn` is what the daemon accepts (a client offering ALPN with none of
/// them is refused, as a real server would).
pub async fn intercept<IO>(
    ca: &LocalCa,
    io: IO,
    dst: IpAddr,
    alpn: &[&[u8]],
) -> io::Result<(TlsStream<IO>, Option<String>)>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let fut = async {
        let start = LazyConfigAcceptor::new(Acceptor::default(), io).await?;
        let sni = start.client_hello().server_name().map(str::to_string);
        let name = sni.clone().unwrap_or_else(|| dst.to_string());
        let leaf = ca
            .leaf(&name)
            .map_err(|e| io::Error::other(format!("minting a leaf for {name}: {e}")))?;
        let mut config = ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(OneCert(leaf)));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let stream = start.into_stream(Arc::new(config)).await?;
        Ok((stream, sni))
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
        .await
        .map_err(|_| timeout_err())?
}

/// What passthrough learned from the agent's first bytes.
#[derive(Debug)]
pub struct Hello {
    /// Every byte read so far (replayed to the upstream).
    pub bytes: Vec<u8>,
    /// The SNI, if the ClientHello carried one.
    pub sni: Option<String>,
}

/// Reads the agent's ClientHello (bounded by [`CLIENT_HELLO_MAX`] and
/// [`HANDSHAKE_TIMEOUT`]) without answering it.
pub async fn read_client_hello<IO: AsyncRead + Unpin>(io: &mut IO) -> io::Result<Hello> {
    let fut = async {
        let mut bytes = Vec::with_capacity(1024);
        let mut acceptor = Acceptor::default();
        let mut fed = 0usize;
        let mut buf = [0u8; 4096];
        loop {
            let n = io.read(&mut buf).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before a complete ClientHello",
                ));
            }
            bytes.extend_from_slice(buf.get(..n).unwrap_or_default());
            if bytes.len() > CLIENT_HELLO_MAX {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "ClientHello too large",
                ));
            }
            let mut rest = bytes.get(fed..).unwrap_or_default();
            while !rest.is_empty() {
                let before = rest.len();
                acceptor.read_tls(&mut rest)?;
                if rest.len() == before {
                    break;
                }
            }
            fed = bytes.len() - rest.len();
            match acceptor.accept() {
                Ok(None) => continue,
                Ok(Some(accepted)) => {
                    let sni = accepted.client_hello().server_name().map(str::to_string);
                    return Ok(Hello { bytes, sni });
                }
                Err((e, _alert)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("not a TLS ClientHello: {e}"),
                    ))
                }
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
        .await
        .map_err(|_| timeout_err())?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_hello(sni: &str) -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[tokio::test]
    async fn sni_is_read_from_a_client_hello_in_pieces() {
        let hello = client_hello("db.example.com");
        // Delivered a few bytes at a time: the reader must keep reading.
        let (mut a, mut b) = tokio::io::duplex(64);
        let h = hello.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for chunk in h.chunks(7) {
                let _ = a.write_all(chunk).await;
            }
            // Keep `a` open: the reader must not need EOF.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let got = read_client_hello(&mut b).await.unwrap();
        assert_eq!(got.sni.as_deref(), Some("db.example.com"));
        assert_eq!(got.bytes, hello);
    }

    #[tokio::test]
    async fn garbage_is_not_a_client_hello() {
        let mut r: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(read_client_hello(&mut r).await.is_err());
        let mut r: &[u8] = b"";
        assert!(read_client_hello(&mut r).await.is_err());
    }
}
