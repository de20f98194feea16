//! Masking of a channel's output streams (stdout, stderr): one streaming
//! masker per stream, taken from the policy in force when the command
//! starts.
//!
//! Owns nothing but the per-channel masker state. It must not decide
//! which values are sensitive (the `mask` module does).

use bytes::Bytes;
use serde_json::Value;

use super::channel::Conn;

/// The maskers of one channel's output.
pub struct OutputMask {
    _enabled: bool,
}

impl OutputMask {
    /// Maskers for a channel of `conn` (`enabled`: exec and shell output).
    pub fn new(_conn: &Conn, enabled: bool) -> Self {
        Self { _enabled: enabled }
    }

    /// Masks a chunk of stdout.
    pub fn stdout(&mut self, data: Bytes, _buf: &mut Vec<u8>) -> Bytes {
        data
    }

    /// Masks a chunk of stderr.
    pub fn stderr(&mut self, data: Bytes, _buf: &mut Vec<u8>) -> Bytes {
        data
    }

    /// What was held back, at the end of output: (stdout, stderr).
    pub fn finish(&mut self, _buf: &mut Vec<u8>) -> (Bytes, Bytes) {
        (Bytes::new(), Bytes::new())
    }

    /// Masked values by detector, if any were masked.
    pub fn counts(&self) -> Option<Value> {
        None
    }
}
