//! The file operations of an sftp channel, read from the agent's requests
//! as they pass (SFTP v3 framing: `uint32 length, byte type, ...`), for the
//! command's audit record.
//!
//! Owns nothing but a small parser state: it never changes or holds back a
//! byte, keeps at most [`HEAD_MAX`] bytes of a packet and at most
//! [`MAX_OPS`] operations; a stream it cannot follow stops being logged
//! (`unparsed`), never relayed differently. It must not decide anything.

use serde_json::{json, Value};

/// Bytes of a packet's start kept for parsing (type, id, paths).
pub const HEAD_MAX: usize = 4096;
/// Operations kept per channel; later ones are only counted.
pub const MAX_OPS: usize = 200;
/// Packets longer than this mean the stream is not SFTP as understood.
const PACKET_MAX: usize = 1 << 20;

/// Logs file operations of one sftp channel.
#[derive(Debug, Default)]
pub struct SftpLog {
    /// The current packet's first bytes (length field included).
    head: Vec<u8>,
    /// The current packet's total length including the length field,
    /// once known.
    total: Option<usize>,
    /// Bytes of the current packet seen so far.
    seen: usize,
    ops: Vec<String>,
    more: u64,
    unparsed: bool,
}

impl SftpLog {
    /// Takes the next chunk of the agent's side of the channel.
    pub fn push(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.unparsed {
            if self.total.is_none() {
                let want = 4 - self.head.len().min(4);
                let n = want.min(data.len());
                self.head.extend_from_slice(&data[..n]);
                self.seen += n;
                data = &data[n..];
                if self.head.len() < 4 {
                    return;
                }
                let len =
                    u32::from_be_bytes([self.head[0], self.head[1], self.head[2], self.head[3]])
                        as usize;
                if len == 0 || len > PACKET_MAX {
                    self.unparsed = true;
                    return;
                }
                self.total = Some(len + 4);
            }
            let total = self.total.unwrap_or(0);
            let n = (total - self.seen).min(data.len());
            let keep = HEAD_MAX.saturating_sub(self.head.len()).min(n);
            self.head.extend_from_slice(&data[..keep]);
            self.seen += n;
            data = &data[n..];
            if self.seen == total {
                self.packet();
                self.head.clear();
                self.total = None;
                self.seen = 0;
            }
        }
    }

    fn packet(&mut self) {
        let Some(&kind) = self.head.get(4) else {
            return;
        };
        // After type: uint32 request id, then the fields.
        let mut r = Reader(self.head.get(9..).unwrap_or_default());
        let op = match kind {
            3 => r.string().map(|p| {
                let flags = r.u32().unwrap_or(0);
                let mode = match (flags & 1 != 0, flags & 2 != 0) {
                    (_, true) if flags & 0x10 != 0 => "write (truncate)",
                    (true, true) => "read-write",
                    (_, true) => "write",
                    _ => "read",
                };
                format!("open {p} {mode}")
            }),
            13 => r.string().map(|p| format!("remove {p}")),
            14 => r.string().map(|p| format!("mkdir {p}")),
            15 => r.string().map(|p| format!("rmdir {p}")),
            9 => r.string().map(|p| format!("setstat {p}")),
            11 => r.string().map(|p| format!("opendir {p}")),
            18 => r
                .string()
                .and_then(|a| r.string().map(|b| format!("rename {a} {b}"))),
            20 => r
                .string()
                .and_then(|a| r.string().map(|b| format!("symlink {a} {b}"))),
            _ => None,
        };
        if let Some(op) = op {
            if self.ops.len() < MAX_OPS {
                self.ops.push(op);
            } else {
                self.more += 1;
            }
        }
    }

    /// The audit detail: operations in order, how many more, whether the
    /// stream stopped being parsed.
    pub fn to_json(&self) -> Value {
        json!({ "ops": self.ops, "more": self.more, "unparsed": self.unparsed })
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u32(&mut self) -> Option<u32> {
        let (b, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_be_bytes(*b))
    }

    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        let b = self.0.get(..n)?;
        self.0 = self.0.get(n..)?;
        Some(String::from_utf8_lossy(b).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(kind: u8, fields: &[&[u8]]) -> Vec<u8> {
        let mut body = vec![kind, 0, 0, 0, 7];
        for f in fields {
            body.extend_from_slice(f);
        }
        let mut p = (body.len() as u32).to_be_bytes().to_vec();
        p.extend(body);
        p
    }

    fn s(x: &str) -> Vec<u8> {
        let mut v = (x.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(x.as_bytes());
        v
    }

    #[test]
    fn operations_across_any_chunking() {
        let mut stream = Vec::new();
        stream.extend(packet(
            3,
            &[&s("/etc/passwd"), &1u32.to_be_bytes(), &[0, 0, 0, 0]],
        ));
        let mut write = packet(6, &[&s("handle"), &[0; 8], &s(&"x".repeat(10_000))]);
        stream.append(&mut write);
        stream.extend(packet(18, &[&s("/a"), &s("/b")]));
        stream.extend(packet(13, &[&s("/tmp/gone")]));
        for chunk in [1usize, 3, 7, 1000, stream.len()] {
            let mut log = SftpLog::default();
            for c in stream.chunks(chunk) {
                log.push(c);
            }
            assert_eq!(
                log.to_json()["ops"],
                json!(["open /etc/passwd read", "rename /a /b", "remove /tmp/gone"]),
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn garbage_stops_logging() {
        let mut log = SftpLog::default();
        log.push(&[0xff; 64]);
        assert_eq!(log.to_json()["unparsed"], true);
        log.push(&packet(13, &[&s("/x")]));
        assert_eq!(log.to_json()["ops"], json!([]));
    }
}
