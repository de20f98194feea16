//! Bodies on their way through the proxy: byte counts, a capped copy for
//! the HAR recording, and for responses an optional rewrite pipeline
//! (decode gzip/deflate/br, then mask) applied frame by frame, never by
//! buffering the whole body. What a masker holds back (the tail that could
//! still grow into a match) is let go when the upstream goes quiet for
//! [`IDLE_FLUSH`], so a Server-Sent Events stream is never held.
//!
//! Owns the streaming mechanics. It must not decide what is masked (the
//! handler hands it a [`Rewrite`]) and must not write audit or recording
//! records itself (it reports to the `on_end` callback once).

use std::{
    collections::VecDeque,
    io::Write as _,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use std::future::Future as _;

use super::upstream::BoxError;

/// A rewrite of a body's bytes (a masker). Errors fail the body closed.
pub trait Rewrite: Send {
    /// Rewrites one chunk, appending output to `out`.
    fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), String>;
    /// Flushes what is held back at the end of the body.
    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), String>;
    /// Lets go of what is held back mid-body (the upstream went quiet).
    fn flush(&mut self, _out: &mut Vec<u8>) -> Result<(), String> {
        Ok(())
    }
    /// Bytes held back right now (0: nothing for [`Rewrite::flush`] to do).
    fn held(&self) -> usize {
        0
    }
    /// What was masked, for the audit record.
    fn counts(&self) -> serde_json::Value;
}

/// A content decoder (`Content-Encoding`), streaming.
pub enum Decoder {
    /// `gzip`, `x-gzip`.
    Gzip(flate2::write::GzDecoder<Vec<u8>>),
    /// `deflate` (zlib-wrapped, per RFC 9110).
    Deflate(flate2::write::ZlibDecoder<Vec<u8>>),
    /// `br` (RFC 7932). Its output goes through a capped sink: one command
    /// of a brotli stream can expand to megabytes, so the cap is enforced
    /// as it decodes, not after.
    Brotli(Box<brotli_decompressor::DecompressorWriter<Capped>>),
}

/// A decoder's output buffer that refuses to grow past `room` bytes.
#[derive(Debug, Default)]
pub struct Capped {
    buf: Vec<u8>,
    room: u64,
}

impl std::io::Write for Capped {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len() as u64;
        if n > self.room {
            return Err(std::io::Error::other(DECODED_TOO_LARGE));
        }
        self.room -= n;
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const DECODED_TOO_LARGE: &str = "the decoded body exceeds http_max_decoded_body";

impl Decoder {
    /// The decoder for a `Content-Encoding` value; `Ok(None)` for identity,
    /// `Err` for encodings that cannot be decoded here.
    pub fn for_encoding(enc: &str) -> Result<Option<Self>, String> {
        match enc.trim().to_ascii_lowercase().as_str() {
            "" | "identity" => Ok(None),
            "gzip" | "x-gzip" => Ok(Some(Self::Gzip(flate2::write::GzDecoder::new(Vec::new())))),
            "deflate" => Ok(Some(Self::Deflate(flate2::write::ZlibDecoder::new(
                Vec::new(),
            )))),
            "br" => Ok(Some(Self::Brotli(Box::new(
                brotli_decompressor::DecompressorWriter::new(Capped::default(), 4096),
            )))),
            other => Err(format!("content encoding {other:?} cannot be inspected")),
        }
    }

    /// Sets how many more bytes the decoder may produce (enforced while
    /// decoding by `br`; gzip/deflate are bounded per slice).
    fn limit(&mut self, room: u64) {
        if let Self::Brotli(d) = self {
            d.get_mut().room = room;
        }
    }

    fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        // Flushed after each slice: what a slice decodes to goes out now
        // (an event stream must not wait for the next chunk).
        let buf = match self {
            Self::Gzip(d) => {
                d.write_all(chunk)
                    .and_then(|()| d.flush())
                    .map_err(|e| format!("gzip: {e}"))?;
                d.get_mut()
            }
            Self::Deflate(d) => {
                d.write_all(chunk)
                    .and_then(|()| d.flush())
                    .map_err(|e| format!("deflate: {e}"))?;
                d.get_mut()
            }
            Self::Brotli(d) => {
                d.write_all(chunk).map_err(|e| format!("br: {e}"))?;
                &mut d.get_mut().buf
            }
        };
        out.append(buf);
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        let buf = match self {
            Self::Gzip(d) => {
                d.try_finish().map_err(|e| format!("gzip: {e}"))?;
                d.get_mut()
            }
            Self::Deflate(d) => {
                d.try_finish().map_err(|e| format!("deflate: {e}"))?;
                d.get_mut()
            }
            Self::Brotli(d) => {
                // A stream cut short is an error here, not a silent end.
                d.close().map_err(|e| format!("br: {e}"))?;
                &mut d.get_mut().buf
            }
        };
        out.append(buf);
        Ok(())
    }
}

/// Compressed input fed to a decoder at a time: deflate expands at most
/// ~1032:1, so one slice decodes to at most ~4 MiB, whatever the size of
/// the upstream's frames (a decompression bomb is handled slice by slice).
pub const DECODE_SLICE: usize = 4096;

/// Decode, then rewrite.
pub struct Pipeline {
    /// Content decoder, if the body is encoded.
    pub decoder: Option<Decoder>,
    /// The masker, if any.
    pub rewrite: Option<Box<dyn Rewrite>>,
    scratch: Vec<u8>,
    /// Bytes decoded so far.
    decoded: u64,
    /// Most bytes a body may decode to (`http_max_decoded_body`).
    max_decoded: u64,
}

impl Pipeline {
    /// A pipeline of `decoder` then `rewrite`.
    pub fn new(decoder: Option<Decoder>, rewrite: Option<Box<dyn Rewrite>>) -> Self {
        Self {
            decoder,
            rewrite,
            scratch: Vec::new(),
            decoded: 0,
            max_decoded: crate::limits::DEFAULT_HTTP_MAX_DECODED_BODY,
        }
    }

    /// Caps the decoded size: a body that decodes to more is cut off
    /// (fail closed) rather than inspected without end.
    pub fn max_decoded(mut self, max: u64) -> Self {
        self.max_decoded = max;
        self
    }

    /// Counts decoded bytes against the cap.
    fn count(&mut self, n: usize) -> Result<(), String> {
        self.decoded = self.decoded.saturating_add(n as u64);
        if self.decoded > self.max_decoded {
            return Err(format!(
                "the decoded body exceeds http_max_decoded_body ({} bytes): a decompression bomb?",
                self.max_decoded
            ));
        }
        Ok(())
    }

    fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        match (&mut self.decoder, &mut self.rewrite) {
            (None, None) => {
                out.extend_from_slice(chunk);
                Ok(())
            }
            (Some(d), None) => {
                d.limit(self.max_decoded.saturating_sub(self.decoded));
                let at = out.len();
                d.push(chunk, out).map_err(cap_message)?;
                self.count(out.len() - at)
            }
            (None, Some(r)) => r.push(chunk, out),
            (Some(d), Some(_)) => {
                d.limit(self.max_decoded.saturating_sub(self.decoded));
                self.scratch.clear();
                d.push(chunk, &mut self.scratch).map_err(cap_message)?;
                let n = self.scratch.len();
                self.count(n)?;
                if let Some(r) = &mut self.rewrite {
                    r.push(&self.scratch, out)?;
                }
                Ok(())
            }
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        if let Some(d) = &mut self.decoder {
            d.limit(self.max_decoded.saturating_sub(self.decoded));
            self.scratch.clear();
            d.finish(&mut self.scratch).map_err(cap_message)?;
            let n = self.scratch.len();
            self.count(n)?;
            match &mut self.rewrite {
                Some(r) => r.push(&self.scratch, out)?,
                None => out.extend_from_slice(&self.scratch),
            }
        }
        match &mut self.rewrite {
            Some(r) => r.finish(out),
            None => Ok(()),
        }
    }

    fn counts(&self) -> Option<serde_json::Value> {
        self.rewrite.as_ref().map(|r| r.counts())
    }

    /// Bytes the masker holds back.
    fn held(&self) -> usize {
        self.rewrite.as_ref().map_or(0, |r| r.held())
    }

    /// Lets go of what the masker holds back (the upstream went quiet).
    fn flush(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        match &mut self.rewrite {
            Some(r) => r.flush(out),
            None => Ok(()),
        }
    }
}

/// A decoder error caused by the decoded-size cap, said the way the cap
/// says it.
fn cap_message(e: String) -> String {
    if e.contains(DECODED_TOO_LARGE) {
        format!("{DECODED_TOO_LARGE}: a decompression bomb?")
    } else {
        e
    }
}

/// How long an upstream may be quiet before what the masker holds back
/// (a tail that could still become a match) is sent anyway.
pub const IDLE_FLUSH: std::time::Duration = std::time::Duration::from_millis(100);

/// Byte count and capped copy of a body, shared with whoever reports it.
#[derive(Debug, Default)]
pub struct Tap {
    /// Bytes passed.
    pub bytes: u64,
    /// The first bytes, up to the cap (only when capturing).
    pub captured: Option<Vec<u8>>,
    cap: usize,
}

impl Tap {
    /// A tap keeping up to `cap` bytes (`None`: count only).
    pub fn new(cap: Option<usize>) -> Self {
        Self {
            bytes: 0,
            captured: cap.map(|_| Vec::new()),
            cap: cap.unwrap_or(0),
        }
    }

    fn see(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        if let Some(c) = &mut self.captured {
            let room = self.cap.saturating_sub(c.len());
            c.extend_from_slice(data.get(..room.min(data.len())).unwrap_or_default());
        }
    }
}

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Sent in full.
    Complete,
    /// The upstream failed mid-body.
    UpstreamError,
    /// Masking or decoding failed: the body was cut off (fail closed).
    MaskError,
    /// The agent went away first.
    Aborted,
}

impl Outcome {
    /// Label for audit and HAR.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::UpstreamError => "upstream_error",
            Self::MaskError => "mask_error",
            Self::Aborted => "aborted",
        }
    }
}

/// What the response body reports when it ends.
#[derive(Debug)]
pub struct End {
    /// How.
    pub outcome: Outcome,
    /// Bytes given to the agent.
    pub bytes: u64,
    /// The captured copy, if capturing.
    pub captured: Option<Vec<u8>>,
    /// Masking counts, when masked.
    pub counts: Option<serde_json::Value>,
    /// The error, if it failed.
    pub error: Option<String>,
}

type OnEnd = Box<dyn FnOnce(End) + Send>;

/// A request body passing to the upstream through a [`Tap`].
pub struct Tapped<B> {
    inner: B,
    tap: Arc<Mutex<Tap>>,
}

impl<B> Tapped<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, tap: Arc<Mutex<Tap>>) -> Self {
        Self { inner, tap }
    }
}

impl<B> Body for Tapped<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.tap.lock().unwrap_or_else(|p| p.into_inner()).see(d);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How long the rest of an agent's upload is read and discarded after the
/// upstream stopped reading it (nginx's `lingering_time`).
pub const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(30);
/// Most bytes discarded that way.
pub const LINGER_BYTES: u64 = 256 << 20;

/// The agent's request body. When the upstream answers before reading all
/// of it (nginx `return 200`, a 413) and drops it, the rest is read and
/// discarded for a bounded time, as a server's lingering close does, so
/// the agent finishes its upload and reads the answer instead of a reset
/// (HTTP/1.1 `Broken pipe`, HTTP/2 stream error).
pub struct Lingering {
    inner: Option<hyper::body::Incoming>,
    ended: bool,
    /// Shared with the handler: set once the agent's body has ended.
    ended_flag: Arc<AtomicBool>,
}

impl Lingering {
    /// Wraps the agent's body.
    pub fn new(inner: hyper::body::Incoming) -> Self {
        let ended = inner.is_end_stream();
        Self {
            inner: Some(inner),
            ended,
            ended_flag: Arc::new(AtomicBool::new(ended)),
        }
    }

    /// A flag that turns true once the agent's body has ended (read to its
    /// end or failed), readable after the body moved into the upstream
    /// request.
    pub fn ended_flag(&self) -> Arc<AtomicBool> {
        self.ended_flag.clone()
    }
}

impl Body for Lingering {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let r = Pin::new(inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.ended = true;
            self.ended_flag.store(true, Ordering::Relaxed);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map(Body::size_hint).unwrap_or_default()
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(mut body) = self.inner.take() else {
            return;
        };
        if self.ended || body.is_end_stream() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            use http_body_util::BodyExt as _;
            let mut seen = 0u64;
            let _ = tokio::time::timeout(LINGER_TIME, async {
                while let Some(Ok(f)) = body.frame().await {
                    seen += f.data_ref().map_or(0, |d| d.len() as u64);
                    if seen > LINGER_BYTES {
                        break;
                    }
                }
            })
            .await;
        });
    }
}

/// Most of an early error answer read ahead before its head is relayed.
pub const EARLY_ANSWER_AHEAD: usize = 64 << 10;
/// Longest wait for it (past this the answer is relayed as it comes).
pub const EARLY_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// An upstream response body whose first frames may have been read ahead.
///
/// Why: an error answer (status >= 300) that arrives while the agent is
/// still uploading makes curl and other clients stop the upload at once;
/// over HTTP/2 curl then ends its stream early, short of its own
/// content-length, and the agent-side HTTP/2 server must reset that
/// stream (PROTOCOL_ERROR). Directly, the upstream's head and body reach
/// the client together, so the answer is complete before the client
/// reacts; relayed frame by frame, the head may go out alone and the
/// reset cut the body. Reading a small answer to its end first restores
/// "head and body together".
pub struct Prefetched<B: Body> {
    ahead: VecDeque<Frame<Bytes>>,
    ahead_bytes: u64,
    error: Option<B::Error>,
    inner: B,
    inner_done: bool,
}

impl<B> Prefetched<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    /// Wraps `inner` with nothing read ahead.
    pub fn new(inner: B) -> Self {
        Self {
            ahead: VecDeque::new(),
            ahead_bytes: 0,
            error: None,
            inner,
            inner_done: false,
        }
    }

    /// Wraps `inner`, first reading it until it ends, `max` data bytes were
    /// read or `wait` passed, whichever comes first.
    pub async fn read_ahead(inner: B, max: usize, wait: std::time::Duration) -> Self {
        use http_body_util::BodyExt as _;
        let mut me = Self::new(inner);
        let deadline = tokio::time::Instant::now() + wait;
        while me.ahead_bytes < max as u64 && !me.inner_done && me.error.is_none() {
            // `frame()` holds nothing across Pending, so dropping it on the
            // deadline loses no data.
            match tokio::time::timeout_at(deadline, me.inner.frame()).await {
                Err(_) => break,
                Ok(None) => me.inner_done = true,
                Ok(Some(Err(e))) => me.error = Some(e),
                Ok(Some(Ok(f))) => {
                    me.ahead_bytes += f.data_ref().map_or(0, |d| d.len() as u64);
                    me.ahead.push_back(f);
                }
            }
        }
        me
    }
}

impl<B> Body for Prefetched<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        if let Some(f) = this.ahead.pop_front() {
            this.ahead_bytes -= f.data_ref().map_or(0, |d| d.len() as u64);
            return Poll::Ready(Some(Ok(f)));
        }
        if let Some(e) = this.error.take() {
            this.inner_done = true;
            return Poll::Ready(Some(Err(e)));
        }
        if this.inner_done {
            return Poll::Ready(None);
        }
        Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.ahead.is_empty()
            && self.error.is_none()
            && (self.inner_done || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.inner_done && self.error.is_none() {
            return SizeHint::with_exact(self.ahead_bytes);
        }
        let rest = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + self.ahead_bytes);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + self.ahead_bytes);
        }
        hint
    }
}

/// A response body on its way to the agent.
pub struct Outgoing<B> {
    inner: B,
    pipeline: Option<Pipeline>,
    tap: Tap,
    /// Output of the pipeline's `finish`, sent before the end.
    tail: Option<Bytes>,
    done: bool,
    on_end: Option<OnEnd>,
    out: Vec<u8>,
    /// Encoded input not yet fed to the decoder (fed [`DECODE_SLICE`] at a
    /// time, so what one poll holds stays bounded).
    pending: Bytes,
    /// Armed while the upstream is quiet and the masker holds bytes back.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The upstream's trailers, sent after what the pipeline still holds.
    trailers: Option<Frame<Bytes>>,
    /// Set when hyper was told the body is over before polling it.
    inner_ended: std::cell::Cell<bool>,
}

impl<B> Outgoing<B> {
    /// Wraps `inner`; `on_end` runs exactly once (also when dropped early).
    pub fn new(
        inner: B,
        pipeline: Option<Pipeline>,
        capture: Option<usize>,
        on_end: impl FnOnce(End) + Send + 'static,
    ) -> Self {
        Self {
            inner,
            pipeline,
            tap: Tap::new(capture),
            tail: None,
            done: false,
            on_end: Some(Box::new(on_end)),
            out: Vec::new(),
            pending: Bytes::new(),
            idle: None,
            trailers: None,
            inner_ended: std::cell::Cell::new(false),
        }
    }

    /// Runs `piece` through the masking pipeline: the frame to send, `None`
    /// while the pipeline holds everything back, or the error (the end is
    /// recorded as a masking failure).
    fn mask_piece(&mut self, piece: &[u8]) -> Result<Option<Frame<Bytes>>, BoxError> {
        self.out.clear();
        let pushed = match self.pipeline.as_mut() {
            Some(p) => p.push(piece, &mut self.out),
            None => {
                self.out.extend_from_slice(piece);
                Ok(())
            }
        };
        if let Err(e) = pushed {
            self.end(Outcome::MaskError, Some(e.clone()));
            return Err(mask_failed(&e));
        }
        if self.out.is_empty() {
            return Ok(None);
        }
        let out = Bytes::copy_from_slice(&self.out);
        self.tap.see(&out);
        Ok(Some(Frame::data(out)))
    }

    fn end(&mut self, outcome: Outcome, error: Option<String>) {
        self.done = true;
        if let Some(f) = self.on_end.take() {
            f(End {
                outcome,
                bytes: self.tap.bytes,
                captured: self.tap.captured.take(),
                counts: self.pipeline.as_ref().and_then(Pipeline::counts),
                error,
            });
        }
    }
}

impl<B: Body> Outgoing<B> {
    /// Nothing is left to send: the upstream's body is known to be empty
    /// from here and nothing is held or queued.
    fn drained(&self) -> bool {
        if !(self.tail.is_none() && self.trailers.is_none() && self.pending.is_empty()) {
            return false;
        }
        if self.done {
            return true;
        }
        let ended = self.pipeline.is_none() && self.inner.is_end_stream();
        self.inner_ended.set(ended);
        ended
    }
}

impl<B> Drop for Outgoing<B> {
    fn drop(&mut self) {
        if self.on_end.is_some() {
            // An empty body hyper never polled (HTTP/2 headers with
            // END_STREAM, e.g. a gRPC trailers-only answer) was complete.
            let empty = self.tail.is_none()
                && self.trailers.is_none()
                && self.pending.is_empty()
                && self.pipeline.is_none()
                && self.tap.bytes == 0
                && self.inner_ended.get();
            let outcome = if empty {
                Outcome::Complete
            } else {
                Outcome::Aborted
            };
            self.end(outcome, None);
        }
    }
}

fn mask_failed(msg: &str) -> BoxError {
    format!("response cut off: the body could not be masked ({msg})").into()
}

impl<B> Body for Outgoing<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if let Some(tail) = this.tail.take() {
                this.tap.see(&tail);
                return Poll::Ready(Some(Ok(Frame::data(tail))));
            }
            if let Some(t) = this.trailers.take() {
                return Poll::Ready(Some(Ok(t)));
            }
            if !this.pending.is_empty() {
                if this.pipeline.is_some() {
                    let n = this.pending.len().min(DECODE_SLICE);
                    let piece = this.pending.split_to(n);
                    match this.mask_piece(&piece) {
                        Err(e) => {
                            this.pending = Bytes::new();
                            return Poll::Ready(Some(Err(e)));
                        }
                        Ok(None) => continue,
                        Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                    }
                }
                this.pending = Bytes::new();
            }
            if this.done {
                if this.on_end.is_some() {
                    this.end(Outcome::Complete, None);
                }
                return Poll::Ready(None);
            }
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => {
                    // Quiet upstream: after IDLE_FLUSH let go of what the
                    // masker holds back, masked.
                    let Some(p) = &mut this.pipeline else {
                        return Poll::Pending;
                    };
                    if p.held() == 0 {
                        this.idle = None;
                        return Poll::Pending;
                    }
                    let timer = this
                        .idle
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(IDLE_FLUSH)));
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    this.idle = None;
                    this.out.clear();
                    if let Err(e) = p.flush(&mut this.out) {
                        this.end(Outcome::MaskError, Some(e.clone()));
                        return Poll::Ready(Some(Err(mask_failed(&e))));
                    }
                    if this.out.is_empty() {
                        return Poll::Pending;
                    }
                    let out = Bytes::copy_from_slice(&this.out);
                    this.tap.see(&out);
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Poll::Ready(f) => {
                    this.idle = None;
                    f
                }
            };
            match frame {
                Some(Ok(frame)) => {
                    let data = match frame.into_data() {
                        Ok(d) => d,
                        Err(other) => {
                            // Trailers pass unchanged, after whatever the
                            // pipeline still holds (they end the body).
                            let Some(p) = &mut this.pipeline else {
                                return Poll::Ready(Some(Ok(other)));
                            };
                            this.done = true;
                            this.trailers = Some(other);
                            this.out.clear();
                            if let Err(e) = p.finish(&mut this.out) {
                                this.trailers = None;
                                this.end(Outcome::MaskError, Some(e.clone()));
                                return Poll::Ready(Some(Err(mask_failed(&e))));
                            }
                            if !this.out.is_empty() {
                                this.tail = Some(Bytes::copy_from_slice(&this.out));
                            }
                            continue;
                        }
                    };
                    let Some(p) = &mut this.pipeline else {
                        this.tap.see(&data);
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    };
                    if p.decoder.is_some() {
                        // Decoded a slice at a time, above.
                        this.pending = data;
                        continue;
                    }
                    match this.mask_piece(&data) {
                        Err(e) => return Poll::Ready(Some(Err(e))),
                        Ok(None) => continue,
                        Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                    }
                }
                Some(Err(e)) => {
                    let e: BoxError = e.into();
                    this.end(Outcome::UpstreamError, Some(e.to_string()));
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    this.done = true;
                    if let Some(p) = &mut this.pipeline {
                        this.out.clear();
                        if let Err(e) = p.finish(&mut this.out) {
                            this.end(Outcome::MaskError, Some(e.clone()));
                            return Poll::Ready(Some(Err(mask_failed(&e))));
                        }
                        if !this.out.is_empty() {
                            this.tail = Some(Bytes::copy_from_slice(&this.out));
                        }
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // An upstream body known to be empty stays so for the agent (a gRPC
        // trailers-only answer must reach it as HEADERS with END_STREAM).
        self.drained()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.pipeline {
            None => self.inner.size_hint(),
            Some(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::collections::VecDeque;

    struct Upper;
    impl Rewrite for Upper {
        fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
            if chunk.contains(&b'!') {
                return Err("bang".into());
            }
            out.extend(chunk.iter().map(u8::to_ascii_uppercase));
            Ok(())
        }
        fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
            out.extend_from_slice(b".");
            Ok(())
        }
        fn counts(&self) -> serde_json::Value {
            serde_json::json!({"upper": 1})
        }
    }

    /// A body of fixed chunks.
    struct Chunks(VecDeque<Bytes>);
    impl Body for Chunks {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    fn chunks(v: &[&[u8]]) -> Chunks {
        Chunks(v.iter().map(|c| Bytes::copy_from_slice(c)).collect())
    }

    fn ended() -> (Arc<Mutex<Option<End>>>, impl FnOnce(End) + Send + 'static) {
        let slot = Arc::new(Mutex::new(None));
        let s = slot.clone();
        (slot, move |e| *s.lock().unwrap() = Some(e))
    }

    #[tokio::test]
    async fn gzip_is_decoded_then_rewritten_chunk_by_chunk() {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(b"hello world").unwrap();
        let gz = enc.finish().unwrap();
        let (a, b) = gz.split_at(gz.len() / 2);
        let p = Pipeline::new(
            Decoder::for_encoding("gzip").unwrap(),
            Some(Box::new(Upper)),
        );
        let (slot, on_end) = ended();
        let body = Outgoing::new(chunks(&[a, b]), Some(p), Some(4), on_end);
        let out = body.collect().await.unwrap().to_bytes();
        assert_eq!(&out[..], b"HELLO WORLD.");
        let end = slot.lock().unwrap().take().unwrap();
        assert_eq!(end.outcome, Outcome::Complete);
        assert_eq!(end.bytes, 12);
        assert_eq!(end.captured.as_deref(), Some(&b"HELL"[..]));
        assert_eq!(end.counts.unwrap()["upper"], 1);
        assert!(Decoder::for_encoding("zstd").is_err());
    }

    /// A rewrite that passes bytes through, for size checks.
    struct Same;
    impl Rewrite for Same {
        fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
            out.extend_from_slice(chunk);
            Ok(())
        }
        fn finish(&mut self, _out: &mut Vec<u8>) -> Result<(), String> {
            Ok(())
        }
        fn counts(&self) -> serde_json::Value {
            serde_json::json!({})
        }
    }

    #[tokio::test]
    async fn a_decompression_bomb_is_decoded_in_slices_and_cut_off_at_the_cap() {
        // 64 MiB of zeros gzip to ~64 KiB, sent as one upstream frame.
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![b'0'; 1 << 20];
        for _ in 0..64 {
            enc.write_all(&zeros).unwrap();
        }
        let gz = enc.finish().unwrap();
        assert!(gz.len() < 1 << 20, "{}", gz.len());
        let p = Pipeline::new(Decoder::for_encoding("gzip").unwrap(), Some(Box::new(Same)))
            .max_decoded(8 << 20);
        let (slot, on_end) = ended();
        let mut body = Outgoing::new(chunks(&[&gz]), Some(p), None, on_end);
        let mut total = 0usize;
        let mut failed = None;
        for _ in 0..100_000 {
            match body.frame().await {
                Some(Ok(f)) => {
                    let d = f.into_data().unwrap();
                    // One slice of input never decodes to more than ~4 MiB.
                    assert!(d.len() <= DECODE_SLICE * 1100, "{}", d.len());
                    total += d.len();
                }
                Some(Err(e)) => {
                    failed = Some(e.to_string());
                    break;
                }
                None => break,
            }
        }
        let failed = failed.expect("the bomb is cut off");
        assert!(failed.contains("http_max_decoded_body"), "{failed}");
        assert!(total <= 8 << 20, "{total}");
        drop(body);
        assert_eq!(
            slot.lock().unwrap().take().unwrap().outcome,
            Outcome::MaskError
        );

        // Under the cap the same body decodes whole.
        let p = Pipeline::new(Decoder::for_encoding("gzip").unwrap(), Some(Box::new(Same)))
            .max_decoded(64 << 20);
        let (_slot, on_end) = ended();
        let body = Outgoing::new(chunks(&[&gz]), Some(p), None, on_end);
        let out = body.collect().await.unwrap().to_bytes();
        assert_eq!(out.len(), 64 << 20);
    }

    #[tokio::test]
    async fn a_rewrite_error_cuts_the_body_off() {
        let p = Pipeline::new(None, Some(Box::new(Upper)));
        let (slot, on_end) = ended();
        let mut body = Outgoing::new(chunks(&[b"ok", b"bad!", b"never"]), Some(p), None, on_end);
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"OK");
        assert!(body.frame().await.unwrap().is_err());
        drop(body);
        let end = slot.lock().unwrap().take().unwrap();
        assert_eq!(end.outcome, Outcome::MaskError);
        assert_eq!(end.bytes, 2);
    }

    #[tokio::test]
    async fn dropping_early_reports_aborted_and_passthrough_is_untouched() {
        let (slot, on_end) = ended();
        let mut body = Outgoing::new(chunks(&[b"a", b"b"]), None, None, on_end);
        let f = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&f[..], b"a");
        drop(body);
        assert_eq!(
            slot.lock().unwrap().take().unwrap().outcome,
            Outcome::Aborted
        );
    }

    /// `{"email": "dave@example.com", "ok": true}` compressed by Node's
    /// `zlib.brotliCompressSync`.
    const BR_JSON: &str = "0b14807b22656d61696c223a202264617665406578616d706c652e636f6d222c20226f6b223a20747275657d03";

    #[tokio::test]
    async fn br_is_decoded_at_any_split_and_a_truncated_stream_fails() {
        let br = hex::decode(BR_JSON).unwrap();
        for cut in 1..br.len() {
            let p = Pipeline::new(Decoder::for_encoding("br").unwrap(), Some(Box::new(Same)));
            let (_slot, on_end) = ended();
            let body = Outgoing::new(chunks(&[&br[..cut], &br[cut..]]), Some(p), None, on_end);
            let out = body.collect().await.unwrap().to_bytes();
            assert_eq!(
                &out[..],
                br#"{"email": "dave@example.com", "ok": true}"#,
                "cut {cut}"
            );
        }
        let p = Pipeline::new(Decoder::for_encoding("br").unwrap(), Some(Box::new(Same)));
        let (slot, on_end) = ended();
        let body = Outgoing::new(chunks(&[&br[..br.len() - 2]]), Some(p), None, on_end);
        assert!(body.collect().await.is_err());
        assert_eq!(
            slot.lock().unwrap().take().unwrap().outcome,
            Outcome::MaskError
        );
        // Over the cap: cut off while decoding.
        let p = Pipeline::new(Decoder::for_encoding("br").unwrap(), Some(Box::new(Same)))
            .max_decoded(10);
        let (_slot, on_end) = ended();
        let body = Outgoing::new(chunks(&[&br]), Some(p), None, on_end);
        let Err(e) = body.collect().await else {
            panic!("not cut off at the cap");
        };
        let e = e.to_string();
        assert!(e.contains("http_max_decoded_body"), "{e}");
    }

    /// A rewrite that holds everything back until flushed.
    struct Holding(Vec<u8>);
    impl Rewrite for Holding {
        fn push(&mut self, chunk: &[u8], _out: &mut Vec<u8>) -> Result<(), String> {
            self.0.extend_from_slice(chunk);
            Ok(())
        }
        fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
            out.append(&mut self.0);
            Ok(())
        }
        fn flush(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
            out.append(&mut self.0);
            Ok(())
        }
        fn held(&self) -> usize {
            self.0.len()
        }
        fn counts(&self) -> serde_json::Value {
            serde_json::json!({})
        }
    }

    /// One chunk, then silence.
    struct ThenQuiet(Option<Bytes>);
    impl Body for ThenQuiet {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            match self.0.take() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => Poll::Pending,
            }
        }
    }

    #[tokio::test]
    async fn what_the_masker_holds_goes_out_when_the_upstream_is_quiet() {
        let p = Pipeline::new(None, Some(Box::new(Holding(Vec::new()))));
        let (_slot, on_end) = ended();
        let mut body = Outgoing::new(
            ThenQuiet(Some(Bytes::from_static(b"data: partial"))),
            Some(p),
            None,
            on_end,
        );
        let t = std::time::Instant::now();
        let f = tokio::time::timeout(std::time::Duration::from_secs(5), body.frame())
            .await
            .expect("flushed on idle")
            .unwrap()
            .unwrap();
        assert_eq!(&f.into_data().unwrap()[..], b"data: partial");
        assert!(t.elapsed() >= IDLE_FLUSH, "{:?}", t.elapsed());
        // Nothing held: the body just waits.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(300), body.frame())
                .await
                .is_err()
        );
    }

    /// Data, then trailers.
    struct WithTrailers(VecDeque<Frame<Bytes>>);
    impl Body for WithTrailers {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    #[tokio::test]
    async fn trailers_follow_what_the_pipeline_still_holds() {
        let mut t = hyper::HeaderMap::new();
        t.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
        let frames = VecDeque::from([Frame::data(Bytes::from_static(b"ab")), Frame::trailers(t)]);
        let p = Pipeline::new(None, Some(Box::new(Upper)));
        let (slot, on_end) = ended();
        let mut body = Outgoing::new(WithTrailers(frames), Some(p), None, on_end);
        let mut seen = Vec::new();
        while let Some(f) = body.frame().await {
            let f = f.unwrap();
            if f.is_trailers() {
                seen.push("trailers".to_string());
            } else {
                seen.push(String::from_utf8_lossy(&f.into_data().unwrap()).into_owned());
            }
        }
        assert_eq!(seen, ["AB", ".", "trailers"]);
        drop(body);
        assert_eq!(
            slot.lock().unwrap().take().unwrap().outcome,
            Outcome::Complete
        );
    }

    #[tokio::test]
    async fn a_small_answer_is_read_to_its_end_before_it_is_relayed() {
        let mut body = Prefetched::read_ahead(
            chunks(&[b"<html>413", b" too large</html>"]),
            EARLY_ANSWER_AHEAD,
            EARLY_ANSWER_WAIT,
        )
        .await;
        // Read to its end up front: the agent-side server knows the whole
        // length and sends the last frame with END_STREAM.
        assert!(body.inner_done);
        assert_eq!(body.size_hint().exact(), Some(26));
        assert!(!body.is_end_stream());
        let mut seen = Vec::new();
        while let Some(f) = body.frame().await {
            seen.extend_from_slice(&f.unwrap().into_data().unwrap());
        }
        assert_eq!(seen, b"<html>413 too large</html>");
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn reading_ahead_stops_at_its_cap_and_at_its_wait() {
        let big = vec![b'x'; 40 << 10];
        let mut body =
            Prefetched::read_ahead(chunks(&[&big, &big, &big]), 64 << 10, EARLY_ANSWER_WAIT).await;
        assert_eq!(body.ahead.len(), 2, "stopped once the cap was reached");
        assert!(!body.inner_done);
        let mut n = 0;
        while let Some(f) = body.frame().await {
            n += f.unwrap().into_data().unwrap().len();
        }
        assert_eq!(n, 3 * big.len(), "the rest still comes");

        // An answer that goes quiet is relayed after the wait, as it comes.
        let mut quiet = Prefetched::read_ahead(
            ThenQuiet(Some(Bytes::from_static(b"first"))),
            EARLY_ANSWER_AHEAD,
            std::time::Duration::from_millis(20),
        )
        .await;
        assert_eq!(quiet.ahead.len(), 1);
        let first = quiet.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"first");
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut quiet).poll_frame(&mut cx).is_pending());
    }
}
