//! Masking of a channel's output streams (stdout, stderr): one streaming
//! detector masker per stream, taken from the policy in force when the
//! command starts (a reload applies to the next command).
//!
//! Masking is for text meant for a reader; it must never rewrite a binary
//! stream (an `scp -O` download, an rsync or git protocol, a tarball),
//! where a replacement corrupts the data or changes its length. So:
//! - a pty channel's output is text for a terminal: always masked;
//! - a known file-transfer command ([`transfer_program`]) and the sftp
//!   subsystem are never masked (or, with `binary = "refuse"`, refused
//!   before they run: the caller decides that);
//! - any other stream is masked while it is text: at its first NUL byte or
//!   invalid UTF-8, if nothing on it has been masked yet, it becomes binary
//!   and is relayed intact (held-back bytes included) for the rest of the
//!   channel, or, with `binary = "refuse"`, the channel is stopped. Once a
//!   value has been masked on a stream it stays text to its end: the bytes
//!   already sent were rewritten, so the stream cannot be passed intact any
//!   more, and letting later bytes through unmasked would let a secret out.
//!
//! Owns the per-channel masker state and when held-back bytes are let go
//! (idle flush). It must not decide which values are sensitive (the `mask`
//! module does).

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

use super::{actions::Request, channel::Conn, words};
use crate::mask::{Counts, StreamMasker};

/// Output held back by a masker goes out after this much quiet on a pty
/// channel (an interactive prompt must show).
pub const IDLE_FLUSH_PTY: Duration = Duration::from_millis(30);
/// The same for channels without a pty (`tail -f` lines still arrive).
pub const IDLE_FLUSH: Duration = Duration::from_millis(300);

/// How a channel's output is masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Not at all (a protocol: sftp, a file transfer, a forward).
    Off,
    /// Always: output for a terminal.
    Pty,
    /// While each stream is text (see the module docs).
    Text,
}

/// A stream turned binary on a resource whose rules say
/// `binary = "refuse"`: the channel must be stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BinaryRefused {
    /// `stdout` or `stderr`.
    pub stream: &'static str,
}

/// One output stream.
struct Stream {
    /// `None`: relayed as it comes.
    masker: Option<StreamMasker>,
    /// Watching for binary (no pty, nothing masked yet).
    watch: bool,
    /// An incomplete UTF-8 character at the end of the last chunk.
    carry: Utf8Carry,
    name: &'static str,
}

/// The maskers of one channel's output.
pub struct OutputMask {
    out: Stream,
    err: Stream,
    refuse: bool,
    /// Streams that turned binary and went unmasked.
    binary: Vec<&'static str>,
}

impl OutputMask {
    /// Maskers for a channel of `conn` in `mode`.
    pub fn new(conn: &Conn, mode: Mode) -> Self {
        let masker = (mode != Mode::Off)
            .then(|| conn.shared.policy.load().masker(&conn.flow.info.resource))
            .flatten()
            .filter(|m| m.has_detectors());
        let refuse = masker.as_ref().is_some_and(|m| m.binary_refuse());
        let stream = |name| Stream {
            masker: masker.as_ref().map(|m| m.stream()),
            watch: mode == Mode::Text,
            carry: Utf8Carry::default(),
            name,
        };
        Self {
            out: stream("stdout"),
            err: stream("stderr"),
            refuse,
            binary: Vec::new(),
        }
    }

    /// Masks a chunk of stdout.
    pub fn stdout(&mut self, data: Bytes, buf: &mut Vec<u8>) -> Result<Bytes, BinaryRefused> {
        push(&mut self.out, self.refuse, &mut self.binary, data, buf)
    }

    /// Masks a chunk of stderr.
    pub fn stderr(&mut self, data: Bytes, buf: &mut Vec<u8>) -> Result<Bytes, BinaryRefused> {
        push(&mut self.err, self.refuse, &mut self.binary, data, buf)
    }

    /// Bytes held back (waiting to see whether a secret continues).
    pub fn held(&self) -> usize {
        self.out.masker.as_ref().map_or(0, StreamMasker::held)
            + self.err.masker.as_ref().map_or(0, StreamMasker::held)
    }

    /// The stream went quiet: what was held back, masked: (stdout, stderr).
    pub fn flush(&mut self, buf: &mut Vec<u8>) -> (Bytes, Bytes) {
        (
            take(self.out.masker.as_mut(), buf, StreamMasker::flush),
            take(self.err.masker.as_mut(), buf, StreamMasker::flush),
        )
    }

    /// The output ended: what was held back, masked: (stdout, stderr).
    pub fn finish(&mut self, buf: &mut Vec<u8>) -> (Bytes, Bytes) {
        (
            take(self.out.masker.as_mut(), buf, StreamMasker::finish),
            take(self.err.masker.as_mut(), buf, StreamMasker::finish),
        )
    }

    /// Masked values by detector, if any were masked.
    pub fn counts(&self) -> Option<Value> {
        let mut all = Counts::default();
        for m in [&self.out.masker, &self.err.masker].into_iter().flatten() {
            all.merge(m.counts());
        }
        (!all.is_empty()).then(|| all.to_json())
    }

    /// The streams relayed unmasked because they turned binary.
    pub fn binary_streams(&self) -> &[&'static str] {
        &self.binary
    }
}

fn push(
    s: &mut Stream,
    refuse: bool,
    binary: &mut Vec<&'static str>,
    data: Bytes,
    buf: &mut Vec<u8>,
) -> Result<Bytes, BinaryRefused> {
    let Some(m) = s.masker.as_mut() else {
        return Ok(data);
    };
    if s.watch && !s.carry.text(&data) {
        if refuse {
            return Err(BinaryRefused { stream: s.name });
        }
        s.watch = false;
        if let Some(mut raw) = m.take_raw() {
            // Nothing was rewritten: the rest goes as it comes, so the
            // agent gets the stream byte for byte.
            s.masker = None;
            binary.push(s.name);
            if raw.is_empty() {
                return Ok(data);
            }
            raw.extend_from_slice(&data);
            return Ok(Bytes::from(raw));
        }
        // Already rewritten: stays text (module docs).
    }
    buf.clear();
    m.push(&data, buf);
    if s.watch && m.changed() {
        s.watch = false;
    }
    Ok(Bytes::copy_from_slice(buf))
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

/// Streaming text check: UTF-8 without NUL, a character may straddle
/// chunks.
#[derive(Debug, Default)]
struct Utf8Carry {
    bytes: [u8; 4],
    len: usize,
}

impl Utf8Carry {
    /// Whether `chunk` continues a text stream.
    fn text(&mut self, chunk: &[u8]) -> bool {
        if chunk.contains(&0) {
            return false;
        }
        let mut rest = chunk;
        if self.len > 0 {
            let want = match self.bytes[0] {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                _ => 4,
            };
            let need = want - self.len;
            let n = need.min(rest.len());
            self.bytes[self.len..self.len + n].copy_from_slice(&rest[..n]);
            self.len += n;
            rest = &rest[n..];
            if self.len < want {
                // Still incomplete: valid so far?
                return match std::str::from_utf8(&self.bytes[..self.len]) {
                    Err(e) => e.error_len().is_none(),
                    Ok(_) => true,
                };
            }
            if std::str::from_utf8(&self.bytes[..self.len]).is_err() {
                return false;
            }
            self.len = 0;
        }
        match std::str::from_utf8(rest) {
            Ok(_) => true,
            Err(e) if e.error_len().is_none() => {
                let tail = &rest[e.valid_up_to()..];
                self.bytes[..tail.len()].copy_from_slice(tail);
                self.len = tail.len();
                true
            }
            Err(_) => false,
        }
    }
}

/// The file-transfer program an exec string runs, if it is one: its output
/// is a binary protocol (or archive) that masking must not touch. Matched
/// on the plain command's first word (a path's last part).
pub fn transfer_program(req: &Request) -> Option<String> {
    let Request::Exec(c) = req else {
        return None;
    };
    let argv = words::split(c).ok()?;
    let prog = argv.first()?;
    let base = prog.rsplit('/').next().unwrap_or(prog);
    let args = &argv[1..];
    let hit = match base {
        // Not `tar`: `tar -xOf a.tar notes.txt` prints text, which must be
        // masked; an archive it writes is binary within its first header
        // and passes intact by its bytes.
        "scp" | "sftp-server" | "git-upload-pack" | "git-receive-pack" | "git-upload-archive" => {
            true
        }
        "rsync" => args.iter().any(|a| a == "--server"),
        "git" => args.first().is_some_and(|a| {
            matches!(
                a.as_str(),
                "upload-pack" | "receive-pack" | "upload-archive"
            )
        }),
        _ => false,
    };
    hit.then(|| base.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(chunks: &[&[u8]]) -> Vec<bool> {
        let mut c = Utf8Carry::default();
        chunks.iter().map(|ch| c.text(ch)).collect()
    }

    #[test]
    fn text_check_streams_utf8() {
        assert_eq!(feed(&[b"hello\n", "é😀".as_bytes()]), [true, true]);
        // A character split over three chunks.
        let e = "😀".as_bytes();
        assert_eq!(feed(&[&e[..1], &e[1..2], &e[2..], b"x"]), [true; 4]);
        assert_eq!(feed(&[b"ab\0c"]), [false]);
        assert_eq!(feed(&[b"ok", b"\xff"]), [true, false]);
        // A lead byte then a non-continuation byte across chunks.
        assert_eq!(feed(&[b"a\xc3", b"("]), [true, false]);
        // Latin-1 is not UTF-8.
        assert_eq!(feed(&[b"caf\xe9 au lait"]), [false]);
    }

    fn stream(refuse: bool) -> (Stream, bool) {
        let rule = crate::policy::MaskRule {
            resource: "box".into(),
            columns: Vec::new(),
            json_paths: Vec::new(),
            detectors: vec!["email".into()],
            style: "redact".into(),
            binary: if refuse { "refuse" } else { "pass" }.into(),
        };
        let m = crate::mask::Masker::compile("box", &[rule], [7; 32])
            .expect("compiles")
            .expect("has rules");
        let refuse = m.binary_refuse();
        (
            Stream {
                masker: Some(m.stream()),
                watch: true,
                carry: Utf8Carry::default(),
                name: "stdout",
            },
            refuse,
        )
    }

    /// Feeds chunks; the bytes out (flushed at the end) and whether a
    /// chunk was refused.
    fn run(refuse: bool, chunks: &[&[u8]], flush_each: bool) -> (Vec<u8>, bool, Vec<&'static str>) {
        let (mut s, refuse) = stream(refuse);
        let (mut out, mut bin, mut buf) = (Vec::new(), Vec::new(), Vec::new());
        for c in chunks {
            match push(
                &mut s,
                refuse,
                &mut bin,
                Bytes::copy_from_slice(c),
                &mut buf,
            ) {
                Ok(b) => out.extend_from_slice(&b),
                Err(_) => return (out, true, bin),
            }
            if flush_each {
                out.extend_from_slice(&take(s.masker.as_mut(), &mut buf, StreamMasker::flush));
            }
        }
        out.extend_from_slice(&take(s.masker.as_mut(), &mut buf, StreamMasker::finish));
        (out, false, bin)
    }

    #[test]
    fn binary_streams_pass_intact_and_masked_text_stays_masked() {
        // Text: masked.
        let (out, _, bin) = run(false, &[b"mail a@example.com now\n"], false);
        assert!(!out.windows(13).any(|w| w == b"a@example.com"), "{out:?}");
        assert!(bin.is_empty());
        // Text that looks like it, then a NUL, nothing masked yet: the
        // whole stream intact, held-back bytes included.
        let chunks: [&[u8]; 3] = [
            b"i@x.cGR hello ",
            b"b@example.com",
            b"\0\xff tail c@example.com",
        ];
        let (out, _, bin) = run(false, &chunks, false);
        assert_eq!(out, chunks.concat());
        assert_eq!(bin, ["stdout"]);
        // Masked (and sent), then binary: stays masked.
        let (out, _, bin) = run(false, &[b"x a@example.com\n", b"\0 b@example.com\n"], true);
        let text = String::from_utf8_lossy(&out);
        assert!(
            !text.contains("@example.com") && text.contains('\0'),
            "{text}"
        );
        assert!(bin.is_empty());
        // refuse: binary is an error, text is not.
        assert!(run(true, &[b"ok\n", b"\0"], false).1);
        assert!(!run(true, &[b"ok a@example.com\n"], false).1);
    }

    #[test]
    fn transfer_programs() {
        let t = |c: &str| transfer_program(&Request::Exec(c.into()));
        assert_eq!(t("scp -f /etc/x").as_deref(), Some("scp"));
        assert_eq!(t("/usr/bin/scp -t -- /tmp").as_deref(), Some("scp"));
        assert_eq!(
            t("rsync --server --sender -vlogDtpre.iLsfxCIvu . /srv/x").as_deref(),
            Some("rsync")
        );
        assert_eq!(t("rsync --version"), None);
        assert_eq!(
            t("git-upload-pack '/srv/repo.git'").as_deref(),
            Some("git-upload-pack")
        );
        assert_eq!(t("git upload-pack /srv/r").as_deref(), Some("git"));
        assert_eq!(t("git status"), None);
        assert_eq!(t("tar -xOf a.tar notes.txt"), None);
        assert_eq!(t("cat /etc/passwd"), None);
        assert_eq!(transfer_program(&Request::Shell), None);
    }
}
