//! Bounded output capture (the twin of atropos.sandbox.runner.capture): the head and the tail of
//! a stream, never the whole of it; a streamed call's pieces as they come, bounded the same way.

use std::sync::Arc;

/// Pieces of at most this many bytes, so a JSON line of one stays well under a line reader's
/// limit (64 KiB in aiohttp) whatever it escapes.
const STREAM_PIECE: usize = 8 * 1024;
pub const BACKGROUND_LOG: usize = 64 * 1024;

/// What a streamed call sends: (stream name, text).
pub type Emit = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// UTF-8 split across reads is joined, never replaced; invalid bytes become U+FFFD.
#[derive(Default)]
struct Utf8Decoder {
    pending: Vec<u8>,
}

impl Utf8Decoder {
    fn decode(&mut self, data: &[u8], last: bool) -> String {
        self.pending.extend_from_slice(data);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(text) => {
                    out.push_str(text);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..good]).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..good + bad);
                        }
                        None => {
                            self.pending.drain(..good);
                            if last {
                                out.push('\u{FFFD}');
                                self.pending.clear();
                            }
                            return out;
                        }
                    }
                }
            }
        }
    }
}

/// Forwards what a command writes on one stream, as text, up to `cap` bytes.
struct StreamTee {
    name: &'static str,
    left: usize,
    emit: Emit,
    decoder: Utf8Decoder,
}

impl StreamTee {
    fn send(&mut self, data: &[u8]) {
        if self.left == 0 {
            return;
        }
        let data = &data[..data.len().min(self.left)];
        self.left -= data.len();
        let mut start = 0;
        while start < data.len() {
            let end = (start + STREAM_PIECE).min(data.len());
            let text = self
                .decoder
                .decode(&data[start..end], end == data.len() && self.left == 0);
            if !text.is_empty() {
                (self.emit)(self.name, &text);
            }
            start = end;
        }
    }
}

/// Holds at most `cap` bytes: the first cap/2 and the last cap/2 of everything written. Agents
/// need both ends of a long output: the command that started, and the error at the end.
pub struct BoundedBuffer {
    cap: usize,
    tee: Option<StreamTee>,
    head: Vec<u8>,
    tail: std::collections::VecDeque<u8>,
    total: usize,
}

impl BoundedBuffer {
    pub fn new(cap: usize) -> Self {
        BoundedBuffer {
            cap,
            tee: None,
            head: Vec::new(),
            tail: Default::default(),
            total: 0,
        }
    }

    fn head_cap(&self) -> usize {
        self.cap - self.cap / 2
    }

    pub fn write(&mut self, mut data: &[u8]) {
        if let Some(tee) = self.tee.as_mut() {
            tee.send(data);
        }
        self.total += data.len();
        let room = self.head_cap().saturating_sub(self.head.len());
        if room > 0 {
            let take = room.min(data.len());
            self.head.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        let tail_cap = self.cap / 2;
        if data.is_empty() || tail_cap == 0 {
            return;
        }
        if data.len() >= tail_cap {
            self.tail.clear();
            self.tail.extend(&data[data.len() - tail_cap..]);
        } else {
            self.tail.extend(data);
            let excess = self.tail.len().saturating_sub(tail_cap);
            self.tail.drain(..excess);
        }
    }

    pub fn truncated(&self) -> bool {
        self.total > self.cap
    }

    pub fn text(&self) -> String {
        let tail: Vec<u8> = self.tail.iter().copied().collect();
        if !self.truncated() {
            let mut all = self.head.clone();
            all.extend_from_slice(&tail);
            return String::from_utf8_lossy(&all).into_owned();
        }
        let dropped = self.total - self.head.len() - tail.len();
        format!(
            "{}\n[... {dropped} bytes of output omitted ...]\n{}",
            String::from_utf8_lossy(&self.head),
            String::from_utf8_lossy(&tail)
        )
    }
}

/// stdout's and stderr's buffers of one call; with `emit`, they also stream what they get.
pub fn buffers(cap: usize, emit: Option<&Emit>) -> (BoundedBuffer, BoundedBuffer) {
    let mut out = BoundedBuffer::new(cap);
    let mut err = BoundedBuffer::new(cap);
    if let Some(emit) = emit {
        out.tee = Some(StreamTee {
            name: "stdout",
            left: cap,
            emit: emit.clone(),
            decoder: Utf8Decoder::default(),
        });
        err.tee = Some(StreamTee {
            name: "stderr",
            left: cap,
            emit: emit.clone(),
            decoder: Utf8Decoder::default(),
        });
    }
    (out, err)
}

/// The newest `cap` bytes written, and how many older ones were dropped; `take` empties it.
pub struct TailBuffer {
    cap: usize,
    data: std::collections::VecDeque<u8>,
    pub dropped: u64,
}

impl TailBuffer {
    pub fn new(cap: usize) -> Self {
        TailBuffer {
            cap,
            data: Default::default(),
            dropped: 0,
        }
    }

    pub fn write(&mut self, data: &[u8]) {
        self.data.extend(data);
        let excess = self.data.len().saturating_sub(self.cap);
        if excess > 0 {
            self.data.drain(..excess);
            self.dropped += excess as u64;
        }
    }

    pub fn held(&self) -> (Vec<u8>, u64) {
        (self.data.iter().copied().collect(), self.dropped)
    }

    pub fn restore(&mut self, data: &[u8], dropped: u64) {
        self.data = data.iter().copied().collect();
        self.dropped = dropped;
    }

    pub fn take(&mut self) -> String {
        let bytes: Vec<u8> = self.data.drain(..).collect();
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if self.dropped > 0 {
            text = format!("[... {} older bytes dropped ...]\n{text}", self.dropped);
        }
        self.dropped = 0;
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_head_and_tail() {
        let mut b = BoundedBuffer::new(10);
        b.write(b"0123456789abcdef");
        assert!(b.truncated());
        assert_eq!(b.text(), "01234\n[... 6 bytes of output omitted ...]\nbcdef");
    }

    #[test]
    fn joins_split_utf8() {
        let mut d = Utf8Decoder::default();
        let bytes = "é".as_bytes();
        assert_eq!(d.decode(&bytes[..1], false), "");
        assert_eq!(d.decode(&bytes[1..], false), "é");
    }
}
