//! Server-sent events (text/event-stream) read incrementally, as the
//! WHATWG parser reads them, so each event can be decided and relayed the
//! moment it is complete.
//!
//! Owns event framing only; it must not look inside `data`.

/// One event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    /// `event:` (empty: the default `message`).
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// `id:`, when given.
    pub id: Option<String>,
    /// `retry:`, when given.
    pub retry: Option<String>,
    /// Whether any data line was seen (an event without one is not
    /// dispatched as a message).
    pub has_data: bool,
}

impl Event {
    /// The event in wire form, ending with the blank line.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Some(id) = &self.id {
            out.push_str(&format!("id: {id}\n"));
        }
        if let Some(r) = &self.retry {
            out.push_str(&format!("retry: {r}\n"));
        }
        if !self.event.is_empty() {
            out.push_str(&format!("event: {}\n", self.event));
        }
        if self.has_data {
            for line in self.data.split('\n') {
                out.push_str(&format!("data: {line}\n"));
            }
        }
        out.push('\n');
        out
    }
}

/// Why a stream cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// One event grew over the cap.
    #[error("an event is over {0} bytes")]
    TooLarge(usize),
    /// Not UTF-8.
    #[error("the event stream is not UTF-8")]
    Utf8,
}

/// An incremental parser.
#[derive(Debug)]
pub struct Parser {
    buf: Vec<u8>,
    cur: Event,
    max: usize,
    pending: usize,
}

impl Parser {
    /// A parser refusing events over `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            cur: Event::default(),
            max,
            pending: 0,
        }
    }

    /// Feeds bytes; returns the events completed by them.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<Event>, SseError> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        // A line ends at \n, \r\n or a lone \r (a \r at the very end may be
        // the start of \r\n: wait for more).
        while let Some(pos) = self.buf.iter().position(|b| *b == b'\n' || *b == b'\r') {
            let skip = if self.buf[pos] == b'\r' {
                match self.buf.get(pos + 1) {
                    Some(b'\n') => 2,
                    Some(_) => 1,
                    None => break,
                }
            } else {
                1
            };
            let line: Vec<u8> = self.buf.drain(..pos + skip).take(pos).collect();
            self.pending += line.len() + skip;
            if self.pending > self.max {
                return Err(SseError::TooLarge(self.max));
            }
            let line = String::from_utf8(line).map_err(|_| SseError::Utf8)?;
            if line.is_empty() {
                let ev = std::mem::take(&mut self.cur);
                self.pending = 0;
                if ev.has_data || ev.id.is_some() || ev.retry.is_some() || !ev.event.is_empty() {
                    out.push(ev);
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f.to_string(), v.strip_prefix(' ').unwrap_or(v).to_string()),
                None => (line.clone(), String::new()),
            };
            match field.as_str() {
                "event" => self.cur.event = value,
                "data" => {
                    if self.cur.has_data {
                        self.cur.data.push('\n');
                    }
                    self.cur.data.push_str(&value);
                    self.cur.has_data = true;
                }
                "id" => self.cur.id = Some(value),
                "retry" => self.cur.retry = Some(value),
                _ => {}
            }
        }
        if self.buf.len() + self.pending > self.max {
            return Err(SseError::TooLarge(self.max));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_framed_across_chunks_and_line_endings() {
        let mut p = Parser::new(1 << 20);
        assert!(p
            .feed(b"event: message\r\ndata: {\"a\"")
            .unwrap()
            .is_empty());
        let evs = p
            .feed(b":1}\r\n\r\n: comment\nid: 7\ndata: x\ndata: y\n\n")
            .unwrap();
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].event, "message");
        assert_eq!(evs[0].data, "{\"a\":1}");
        assert_eq!(evs[1].id.as_deref(), Some("7"));
        assert_eq!(evs[1].data, "x\ny");
        assert_eq!(evs[1].encode(), "id: 7\ndata: x\ndata: y\n\n");
        // A lone \r ends a line too; a trailing \r waits for a possible \n.
        assert!(p.feed(b"data: z\r").unwrap().is_empty());
        let evs = p.feed(b"\r\n").unwrap();
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].data, "z");
    }

    #[test]
    fn oversize_events_are_refused() {
        let mut p = Parser::new(16);
        assert_eq!(
            p.feed(b"data: 0123456789abcdef\n"),
            Err(SseError::TooLarge(16))
        );
        let mut p = Parser::new(16);
        assert!(p.feed(&[b'x'; 32]).is_err());
    }
}
