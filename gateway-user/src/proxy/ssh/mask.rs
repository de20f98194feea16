//! Masking of a channel's output streams (stdout, stderr): one streaming
//! detector masker per stream, taken from the policy in force when the
//! command starts (a reload applies to the next command).
//!
//! Owns the per-channel masker state and when held-back bytes are let go
//! (idle flush). It must not decide which values are sensitive (the `mask`
//! module does).

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

use super::channel::Conn;
use crate::mask::{Counts, StreamMasker};

/// Output held back by a masker goes out after this much quiet on a pty
/// channel (an interactive prompt must show).
pub const IDLE_FLUSH_PTY: Duration = Duration::from_millis(30);
/// The same for channels without a pty (`tail -f` lines still arrive).
pub const IDLE_FLUSH: Duration = Duration::from_millis(300);

/// The maskers of one channel's output.
pub struct OutputMask {
    out: Option<StreamMasker>,
    err: Option<StreamMasker>,
}

impl OutputMask {
    /// Maskers for a channel of `conn`; `enabled` is false for channels
    /// whose bytes are a protocol (sftp), which a rewrite would corrupt.
    pub fn new(conn: &Conn, enabled: bool) -> Self {
        let masker = enabled
            .then(|| conn.shared.policy.load().masker(&conn.flow.info.resource))
            .flatten()
            .filter(|m| m.has_detectors());
        match masker {
            Some(m) => Self {
                out: Some(m.stream()),
                err: Some(m.stream()),
            },
            None => Self {
                out: None,
                err: None,
            },
        }
    }

    /// Masks a chunk of stdout.
    pub fn stdout(&mut self, data: Bytes, buf: &mut Vec<u8>) -> Bytes {
        push(self.out.as_mut(), data, buf)
    }

    /// Masks a chunk of stderr.
    pub fn stderr(&mut self, data: Bytes, buf: &mut Vec<u8>) -> Bytes {
        push(self.err.as_mut(), data, buf)
    }

    /// Bytes held back (waiting to see whether a secret continues).
    pub fn held(&self) -> usize {
        self.out.as_ref().map_or(0, StreamMasker::held)
            + self.err.as_ref().map_or(0, StreamMasker::held)
    }

    /// The stream went quiet: what was held back, masked: (stdout, stderr).
    pub fn flush(&mut self, buf: &mut Vec<u8>) -> (Bytes, Bytes) {
        (
            take(self.out.as_mut(), buf, StreamMasker::flush),
            take(self.err.as_mut(), buf, StreamMasker::flush),
        )
    }

    /// The output ended: what was held back, masked: (stdout, stderr).
    pub fn finish(&mut self, buf: &mut Vec<u8>) -> (Bytes, Bytes) {
        (
            take(self.out.as_mut(), buf, StreamMasker::finish),
            take(self.err.as_mut(), buf, StreamMasker::finish),
        )
    }

    /// Masked values by detector, if any were masked.
    pub fn counts(&self) -> Option<Value> {
        let mut all = Counts::default();
        for m in [&self.out, &self.err].into_iter().flatten() {
            all.merge(m.counts());
        }
        (!all.is_empty()).then(|| all.to_json())
    }
}

fn push(m: Option<&mut StreamMasker>, data: Bytes, buf: &mut Vec<u8>) -> Bytes {
    match m {
        None => data,
        Some(m) => {
            buf.clear();
            m.push(&data, buf);
            Bytes::copy_from_slice(buf)
        }
    }
}

fn take(
    m: Option<&mut StreamMasker>,
    buf: &mut Vec<u8>,
    f: fn(&mut StreamMasker, &mut Vec<u8>),
) -> Bytes {
    match m {
        None => Bytes::new(),
        Some(m) => {
            buf.clear();
            f(m, buf);
            Bytes::copy_from_slice(buf)
        }
    }
}
