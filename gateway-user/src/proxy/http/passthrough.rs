//! TLS passthrough for http resources: `http:connect` decided on the
//! ClientHello's SNI alone, then bytes relayed both ways, decrypting
//! nothing. Owns that path only.

use std::{
    io,
    sync::{atomic::Ordering, Arc},
};

use serde_json::Map;
use tokio::{io::AsyncWriteExt, net::TcpStream};

use super::{tls, Counted};
use crate::{
    daemon::Shared,
    proxy::{
        gate::{self, Command, Waited},
        tcp::RELAY_BUFFER,
        Flow,
    },
};

/// TLS passthrough: `http:connect` decided on the ClientHello's SNI, then
/// bytes relayed both ways. A denial answers a TLS `access_denied` alert.
pub(super) async fn serve(
    shared: &Arc<Shared>,
    flow: Flow,
    mut client: Counted<TcpStream>,
) -> io::Result<&'static str> {
    let hello = tls::read_client_hello(&mut client).await?;
    let sni = hello.sni.clone().unwrap_or_default();
    let dst = flow.info.original_dst;
    let text = match &hello.sni {
        Some(s) => format!("CONNECT {s} (tls passthrough to {dst})"),
        None => format!("CONNECT {dst} (tls passthrough, no SNI)"),
    };
    let cmd = Command::new(&flow, "http:connect", text)
        .context("method", "CONNECT")
        .context("host", sni.clone())
        .context("path", "")
        .context("query", "")
        .detail("sni", sni);
    let gone = hung_up(&client.inner);
    match gate::check_and_wait(shared, &flow, &cmd, gone).await {
        Waited::Allowed(allowed) => {
            let mut up = match flow.connect_upstream().await {
                Ok(u) => u,
                Err(e) => {
                    let _ = client.write_all(&TLS_ALERT_INTERNAL).await;
                    return Err(io::Error::new(e.kind(), format!("upstream: {e}")));
                }
            };
            up.write_all(&hello.bytes).await?;
            let res = tokio::select! {
                r = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut up, RELAY_BUFFER, RELAY_BUFFER) => r.map(|_| "closed"),
                _ = flow.cancel.cancelled() => Ok("ended by the daemon"),
            };
            let mut d = Map::new();
            d.insert(
                "bytes_from_client".into(),
                client.c.from_client.load(Ordering::Relaxed).into(),
            );
            d.insert(
                "bytes_to_client".into(),
                client.c.to_client.load(Ordering::Relaxed).into(),
            );
            gate::finished(shared, &flow, &cmd, &allowed, d).await;
            res
        }
        Waited::Denied(_) => {
            let _ = client.write_all(&TLS_ALERT_ACCESS_DENIED).await;
            let _ = client.shutdown().await;
            Ok("denied")
        }
        Waited::Abandoned => Ok("abandoned while held"),
    }
}

/// A fatal TLS 1.2-framed alert record: access_denied (49).
const TLS_ALERT_ACCESS_DENIED: [u8; 7] = [21, 3, 3, 0, 2, 2, 49];
/// A fatal TLS alert record: internal_error (80).
const TLS_ALERT_INTERNAL: [u8; 7] = [21, 3, 3, 0, 2, 2, 80];

/// Resolves when the agent hangs up while its ClientHello waits.
async fn hung_up(client: &TcpStream) {
    let mut byte = [0u8; 1];
    match client.peek(&mut byte).await {
        Ok(n) if n > 0 => std::future::pending().await,
        _ => {}
    }
}
