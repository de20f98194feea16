//! The benchmark's load generator (`cargo xtask bench-client`, hidden): one
//! measurement against the bench server, JSON result on stdout. The bench
//! task runs it once outside and once inside the tagged cgroup.
//!
//! Wire protocol with the bench server (see `bench.rs`): the first byte picks
//! the mode. `e`: echo everything. `s`: sink; frames of a big-endian u32
//! length and that many bytes, a zero length ends and the server answers the
//! big-endian u64 byte count. `i`: the server writes the peer address it sees.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};

/// Mode byte: echo.
pub const MODE_ECHO: u8 = b'e';
/// Mode byte: counting sink.
pub const MODE_SINK: u8 = b's';
/// Mode byte: report the peer address.
pub const MODE_IDENTIFY: u8 = b'i';
/// The largest sink frame.
pub const MAX_FRAME: usize = 256 * 1024;
/// Size of one latency ping.
const PING_SIZE: usize = 64;
/// Socket timeouts: nothing in the benchmark may hang.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What to measure.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Mode {
    /// Sequential connect + 1-byte echo + close.
    Connect,
    /// Bulk upload to the counting sink.
    Bulk,
    /// Ping-pongs of 64 bytes on one connection.
    Latency,
}

/// Arguments of `bench-client`.
#[derive(Args, Debug)]
pub struct ClientArgs {
    /// The bench server's address.
    #[arg(long)]
    pub addr: SocketAddr,
    /// What to measure.
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// Connections (connect) or ping-pongs (latency).
    #[arg(long, default_value_t = 2000)]
    pub count: u64,
    /// Bytes to send (bulk).
    #[arg(long, default_value_t = 1 << 30)]
    pub bytes: u64,
    /// Stop after this many seconds even when `count`/`bytes` is not reached.
    #[arg(long, default_value_t = 20.0)]
    pub time_limit: f64,
}

/// Runs one measurement and prints its JSON result.
pub fn run(args: &ClientArgs) -> Result<()> {
    if !args.addr.ip().is_loopback() {
        bail!(
            "the benchmark only talks to loopback addresses, not {}",
            args.addr
        );
    }
    let limit = Duration::try_from_secs_f64(args.time_limit)
        .context("--time-limit must be a non-negative number of seconds")?;
    let intercepted = identify(args.addr)?;
    let mut result = match args.mode {
        Mode::Connect => connect_rate(args.addr, args.count, limit)?,
        Mode::Bulk => bulk(args.addr, args.bytes, limit)?,
        Mode::Latency => latency(args.addr, args.count, limit)?,
    };
    if let Value::Object(map) = &mut result {
        map.insert("intercepted".into(), Value::Bool(intercepted));
    }
    println!("{result}");
    Ok(())
}

/// Connects with the socket timeouts set.
fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Whether the connection went through a proxy: the server then sees a
/// peer address other than this socket's local address.
pub(crate) fn identify(addr: SocketAddr) -> Result<bool> {
    let mut stream = connect(addr)?;
    let local = stream.local_addr()?;
    stream.write_all(&[MODE_IDENTIFY])?;
    let mut seen = String::new();
    (&mut stream)
        .take(256)
        .read_to_string(&mut seen)
        .context("no answer to the identify request")?;
    let seen: SocketAddr = seen
        .trim()
        .parse()
        .with_context(|| format!("the server answered {seen:?}, not an address"))?;
    Ok(seen != local)
}

/// Sequential connect + 1-byte echo + close, up to `count` or `limit`.
pub(crate) fn connect_rate(addr: SocketAddr, count: u64, limit: Duration) -> Result<Value> {
    let start = Instant::now();
    let mut done = 0u64;
    while done < count && start.elapsed() < limit {
        let mut stream = connect(addr)?;
        stream.write_all(&[MODE_ECHO, b'x'])?;
        let mut byte = [0u8; 1];
        stream
            .read_exact(&mut byte)
            .with_context(|| format!("no echo on connection {done}"))?;
        done += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(json!({
        "mode": "connect",
        "connections": done,
        "seconds": secs,
        "per_second": rate(done as f64, secs),
    }))
}

/// Sends up to `bytes` to the sink (or until `limit`), then waits for its
/// count.
pub(crate) fn bulk(addr: SocketAddr, bytes: u64, limit: Duration) -> Result<Value> {
    let mut stream = connect(addr)?;
    stream.write_all(&[MODE_SINK])?;
    let mut frame = vec![0u8; 4 + MAX_FRAME];
    for (i, b) in frame[4..].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < bytes && start.elapsed() < limit {
        let len = usize::try_from(bytes - sent).map_or(MAX_FRAME, |left| left.min(MAX_FRAME));
        let header = u32::try_from(len).context("frame too large")?.to_be_bytes();
        frame[..4].copy_from_slice(&header);
        stream.write_all(&frame[..4 + len])?;
        sent += len as u64;
    }
    stream.write_all(&0u32.to_be_bytes())?;
    let mut count = [0u8; 8];
    stream
        .read_exact(&mut count)
        .context("the sink did not answer with its count")?;
    let secs = start.elapsed().as_secs_f64();
    let received = u64::from_be_bytes(count);
    if received != sent {
        bail!("sent {sent} bytes but the sink counted {received}");
    }
    Ok(json!({
        "mode": "bulk",
        "bytes": received,
        "seconds": secs,
        "bytes_per_second": rate(received as f64, secs),
    }))
}

/// Up to `count` 64-byte ping-pongs on one connection (or until `limit`).
pub(crate) fn latency(addr: SocketAddr, count: u64, limit: Duration) -> Result<Value> {
    let mut stream = connect(addr)?;
    stream.write_all(&[MODE_ECHO])?;
    let ping = [0x5au8; PING_SIZE];
    let mut pong = [0u8; PING_SIZE];
    let mut samples = Vec::new();
    let start = Instant::now();
    while (samples.len() as u64) < count && start.elapsed() < limit {
        let t = Instant::now();
        stream.write_all(&ping)?;
        stream.read_exact(&mut pong).context("echo lost")?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
        if pong != ping {
            bail!("echo differs from the ping");
        }
    }
    if samples.is_empty() {
        bail!("no ping-pong completed");
    }
    samples.sort_by(f64::total_cmp);
    Ok(json!({
        "mode": "latency",
        "round_trips": samples.len(),
        "p50_us": percentile(&samples, 50),
        "p99_us": percentile(&samples, 99),
        "mean_us": samples.iter().sum::<f64>() / samples.len() as f64,
    }))
}

/// `amount / secs`, or 0 for no time.
fn rate(amount: f64, secs: f64) -> f64 {
    if secs > 0.0 {
        amount / secs
    } else {
        0.0
    }
}

/// The `pct`th percentile of sorted, non-empty `samples` (nearest rank).
fn percentile(samples: &[f64], pct: usize) -> f64 {
    let rank = (samples.len() * pct).div_ceil(100).max(1);
    samples[rank.min(samples.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&samples, 50), 50.0);
        assert_eq!(percentile(&samples, 99), 99.0);
        assert_eq!(percentile(&[7.0], 99), 7.0);
    }
}
