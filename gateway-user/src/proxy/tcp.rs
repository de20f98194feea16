//! The `tcp` resource kind: the connection is the command. Relays bytes both
//! ways with bounded buffers, backpressure and half-close.

use std::io;

use tokio::net::TcpStream;

use super::{Flow, SessionSummary};

/// Per-direction relay buffer. Bounded: a slow side stalls the other
/// (backpressure) instead of growing memory.
pub const RELAY_BUFFER: usize = 64 * 1024;

/// Connects upstream and relays until both sides are done or the session is
/// cancelled. An upstream that cannot be reached closes the agent's
/// connection with a reset (TCP has no in-band error).
pub async fn serve(flow: Flow, mut client: TcpStream) -> io::Result<SessionSummary> {
    let _ = client.set_nodelay(true);
    let mut upstream = match flow.connect_upstream().await {
        Ok(u) => u,
        Err(e) => {
            super::refuse(client);
            return Err(io::Error::new(e.kind(), format!("upstream: {e}")));
        }
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, RELAY_BUFFER, RELAY_BUFFER) => {
            let (from_client, to_client) = r?;
            Ok(SessionSummary { bytes_from_client: from_client, bytes_to_client: to_client, end_reason: "closed" })
        }
        _ = flow.cancel.cancelled() => {
            super::refuse(client);
            Ok(SessionSummary { end_reason: "ended by the daemon", ..Default::default() })
        }
    }
}
