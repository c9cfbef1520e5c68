//! The incremental main-stream decoder.
//!
//! Bytes arrive in whatever pieces the transport delivers. The decoder takes
//! each piece, validates the stream header, checks every record header before
//! buffering any of its body, and yields records one at a time. A record that
//! lies wholly inside the piece handed in borrows it (zero copy); one split
//! across pieces is reassembled in a scratch buffer the caller provides, which
//! is also what bounds the largest record accepted.

use super::header::{RecordHeader, StreamHeader, check_record_header, check_stream_header, kind};
use super::{
    DecodeError, EofAt, MAGIC, MAX_RECORD_BODY, RECORD_HEADER_LEN, Record, STREAM_HEADER_LEN,
};
use zerocopy::FromBytes;

/// What the decoder expects next.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// The stream header; `head_fill` bytes of it are in `head`.
    StreamHeader,
    /// A record header; `head_fill` bytes of it are in `head`.
    RecordHeader,
    /// The body of a record; `body_fill` bytes of it are in `scratch`.
    Body { kind: u16, len: usize },
    /// EndOfStream was decoded; nothing may follow but the one Commit of
    /// the end-of-migration handshake, matched byte for byte against
    /// [`COMMIT_RECORD`] (`head_fill` bytes of it have arrived), so that
    /// anything else is refused at its first byte without being buffered,
    /// or DigestRanges records (a destination locating a mismatching page
    /// asked for them), recognised by their kind's two bytes.
    Ended,
    /// The Commit after EndOfStream was decoded; nothing may follow.
    Committed,
    /// A malformed stream was seen; this error is returned from now on.
    Failed(DecodeError),
}

/// The result of one [`StreamDecoder::decode`] call.
#[derive(Debug)]
pub struct Decoded<'a> {
    /// Bytes of the input used. When `record` is `None` this is the whole
    /// input (it was buffered); otherwise the caller passes the rest again.
    pub consumed: usize,
    /// The record completed by this call, if any.
    pub record: Option<Record<'a>>,
}

/// Where a completed body is.
enum BodyAt {
    /// `input[start..end]`.
    Input { start: usize, end: usize },
    /// `scratch[..len]`.
    Scratch { len: usize },
    /// The body of [`COMMIT_RECORD`], matched byte for byte.
    Commit,
}

/// The one record allowed after EndOfStream, whole: a Command record
/// header (body_len 2) and the Commit code.
pub(crate) const COMMIT_RECORD: [u8; RECORD_HEADER_LEN + 2] = [0, 1, 0, 0, 0, 0, 0, 2, 0, 10];

/// Outcome of feeding bytes to the framing state machine.
enum Step {
    /// All input was buffered; no record is complete.
    NeedMore,
    /// A record of `kind` is complete after `consumed` bytes of input.
    Record {
        kind: u16,
        at: BodyAt,
        consumed: usize,
    },
}

/// Decodes the main stream from arbitrarily chunked input.
///
/// Feed bytes with [`decode`](Self::decode) as they arrive, and call
/// [`finish`](Self::finish) when the peer closes the connection. The decoder
/// never panics and never allocates; after an error it stays failed.
#[derive(Debug)]
pub struct StreamDecoder<'s> {
    scratch: &'s mut [u8],
    head: [u8; 8],
    head_fill: usize,
    body_fill: usize,
    phase: Phase,
    /// EndOfStream has been decoded: a record after it (DigestRanges)
    /// returns the decoder to [`Phase::Ended`].
    ended: bool,
}

impl<'s> StreamDecoder<'s> {
    /// A decoder expecting the stream header. `scratch` reassembles records
    /// split across `decode` calls; a record body longer than
    /// `min(MAX_RECORD_BODY, scratch.len())` is rejected as `Oversized`, so
    /// the scratch must hold the largest record the sender uses.
    pub fn new(scratch: &'s mut [u8]) -> Self {
        Self {
            scratch,
            head: [0; 8],
            head_fill: 0,
            body_fill: 0,
            phase: Phase::StreamHeader,
            ended: false,
        }
    }

    /// A decoder of records without the stream header in front: the
    /// preempt channel after its hello (see [`PreemptHello`](super::PreemptHello)).
    pub fn records(scratch: &'s mut [u8]) -> Self {
        Self {
            phase: Phase::RecordHeader,
            ..Self::new(scratch)
        }
    }

    /// Starts over at a new stream header, as on a new connection (a
    /// postcopy recovery): whatever was buffered of the old one is
    /// dropped, and an earlier error is forgotten with it.
    pub fn restart(&mut self) {
        self.head_fill = 0;
        self.body_fill = 0;
        self.phase = Phase::StreamHeader;
        self.ended = false;
    }

    /// [`restart`](Self::restart) for a [`records`](Self::records)
    /// decoder: starts over at a record header, as on a new preempt
    /// channel after a postcopy recovery.
    pub fn restart_records(&mut self) {
        self.restart();
        self.phase = Phase::RecordHeader;
    }

    /// The largest record body this decoder accepts.
    pub fn limit(&self) -> usize {
        self.scratch.len().min(MAX_RECORD_BODY)
    }

    /// Consumes a prefix of `input` and yields at most one record.
    ///
    /// Call it again with `&input[consumed..]` while it returns a record; when
    /// it returns `record: None`, all of `input` has been taken and more bytes
    /// are needed. Records lying wholly inside `input` borrow it (zero copy);
    /// a record split across calls is reassembled in the scratch buffer.
    pub fn decode<'a>(&'a mut self, input: &'a [u8]) -> Result<Decoded<'a>, DecodeError> {
        let (kind, at, consumed) = match self.frame(input) {
            Ok(Step::NeedMore) => {
                return Ok(Decoded {
                    consumed: input.len(),
                    record: None,
                });
            }
            Ok(Step::Record { kind, at, consumed }) => (kind, at, consumed),
            Err(e) => return Err(self.fail(e)),
        };
        // Borrow the scratch and the phase separately, so that a record
        // borrowing the scratch can be returned while an error is recorded.
        let Self { scratch, phase, .. } = self;
        let body = match at {
            BodyAt::Input { start, end } => input.get(start..end),
            BodyAt::Scratch { len } => scratch.get(..len),
            BodyAt::Commit => COMMIT_RECORD.get(RECORD_HEADER_LEN..),
        };
        let result = match body {
            Some(body) => Record::decode_body(kind, body),
            // `frame` only reports ranges it has checked; keep the decoder
            // total rather than trusting that.
            None => Err(DecodeError::Truncated {
                what: "record body",
            }),
        };
        match result {
            Ok(record) => Ok(Decoded {
                consumed,
                record: Some(record),
            }),
            Err(e) => {
                *phase = Phase::Failed(e);
                Err(e)
            }
        }
    }

    /// The peer closed the connection. `Ok` right after EndOfStream or
    /// after the Commit that may follow it (whether a Commit was due is the
    /// destination engine's business); otherwise `UnexpectedEof` says
    /// where the stream was cut (or the earlier error, if the stream had
    /// already failed).
    pub fn finish(&self) -> Result<(), DecodeError> {
        let at = match self.phase {
            Phase::Ended if self.head_fill == 0 => return Ok(()),
            Phase::Committed => return Ok(()),
            Phase::Ended if self.head_fill < RECORD_HEADER_LEN => EofAt::RecordHeader {
                have: self.head_fill,
            },
            Phase::Ended => EofAt::Body {
                kind: kind::COMMAND,
                have: self.head_fill - RECORD_HEADER_LEN,
                len: COMMIT_RECORD.len() - RECORD_HEADER_LEN,
            },
            Phase::Failed(e) => return Err(e),
            Phase::StreamHeader => EofAt::StreamHeader {
                have: self.head_fill,
            },
            Phase::RecordHeader if self.head_fill == 0 => EofAt::BetweenRecords,
            Phase::RecordHeader => EofAt::RecordHeader {
                have: self.head_fill,
            },
            Phase::Body { kind, len } => EofAt::Body {
                kind,
                have: self.body_fill,
                len,
            },
        };
        Err(DecodeError::UnexpectedEof { at })
    }

    /// True once EndOfStream has been decoded.
    pub fn is_finished(&self) -> bool {
        self.ended
    }

    /// True once the Commit after EndOfStream has been decoded.
    pub fn is_committed(&self) -> bool {
        matches!(self.phase, Phase::Committed)
    }

    /// Records `e` as the decoder's final state and returns it.
    fn fail(&mut self, e: DecodeError) -> DecodeError {
        self.phase = Phase::Failed(e);
        e
    }

    /// Copies input into `head` until it holds `want` bytes; returns the bytes taken.
    fn fill_head(&mut self, input: &[u8], want: usize) -> usize {
        let need = want.saturating_sub(self.head_fill);
        let take = need.min(input.len());
        if let (Some(dst), Some(src)) = (
            self.head.get_mut(self.head_fill..self.head_fill + take),
            input.get(..take),
        ) {
            dst.copy_from_slice(src);
            self.head_fill += take;
            take
        } else {
            0
        }
    }

    /// Runs the framing state machine over `input` up to the next complete
    /// record, buffering what it cannot complete.
    fn frame(&mut self, input: &[u8]) -> Result<Step, DecodeError> {
        let mut pos = 0;
        loop {
            let rest = input.get(pos..).unwrap_or_default();
            match self.phase {
                Phase::Failed(e) => return Err(e),
                Phase::Committed if rest.is_empty() => return Ok(Step::NeedMore),
                Phase::Committed => {
                    return Err(DecodeError::TrailingData {
                        what: "after Commit",
                        len: rest.len(),
                    });
                }
                Phase::Ended if rest.is_empty() => return Ok(Step::NeedMore),
                Phase::Ended => {
                    let expect = COMMIT_RECORD.get(self.head_fill..).unwrap_or_default();
                    let take = expect.len().min(rest.len());
                    if rest.get(..take) != expect.get(..take) {
                        // DigestRanges' kind is 00 08 where Commit's is 00 01.
                        let ranges = kind::DIGEST_RANGES.to_be_bytes();
                        let (seen, next) = match self.head_fill {
                            0 => (rest.first(), rest.get(1)),
                            1 => (Some(&0), rest.first()),
                            _ => (None, None),
                        };
                        if seen == Some(&ranges[0]) && next == Some(&ranges[1]) {
                            pos += 2 - self.head_fill;
                            self.head[..2].copy_from_slice(&ranges);
                            self.head_fill = 2;
                            self.phase = Phase::RecordHeader;
                            continue;
                        }
                        return Err(DecodeError::TrailingData {
                            what: "after EndOfStream",
                            len: self.head_fill + rest.len(),
                        });
                    }
                    self.head_fill += take;
                    pos += take;
                    if self.head_fill < COMMIT_RECORD.len() {
                        return Ok(Step::NeedMore);
                    }
                    self.head_fill = 0;
                    self.phase = Phase::Committed;
                    return Ok(Step::Record {
                        kind: kind::COMMAND,
                        at: BodyAt::Commit,
                        consumed: pos,
                    });
                }
                Phase::StreamHeader => {
                    pos += self.fill_head(rest, STREAM_HEADER_LEN);
                    // Report a foreign peer as soon as its first four bytes are in.
                    if let Some(magic) = self
                        .head
                        .first_chunk::<4>()
                        .filter(|_| self.head_fill >= MAGIC.len())
                        && *magic != MAGIC
                    {
                        return Err(DecodeError::BadMagic { found: *magic });
                    }
                    if self.head_fill < STREAM_HEADER_LEN {
                        return Ok(Step::NeedMore);
                    }
                    let (header, _) = StreamHeader::read_from_prefix(&self.head).map_err(|_| {
                        DecodeError::Truncated {
                            what: "stream header",
                        }
                    })?;
                    check_stream_header(&header)?;
                    self.head_fill = 0;
                    self.phase = Phase::RecordHeader;
                }
                Phase::RecordHeader => {
                    pos += self.fill_head(rest, RECORD_HEADER_LEN);
                    if self.head_fill < RECORD_HEADER_LEN {
                        return Ok(Step::NeedMore);
                    }
                    let (header, _) = RecordHeader::read_from_prefix(&self.head).map_err(|_| {
                        DecodeError::Truncated {
                            what: "record header",
                        }
                    })?;
                    let (kind, len) = check_record_header(&header, self.limit())?;
                    self.head_fill = 0;
                    self.body_fill = 0;
                    let avail = input.len().saturating_sub(pos);
                    if avail >= len {
                        // The whole body is in this input: no copy.
                        self.phase = self.after(kind);
                        let end = pos + len;
                        return Ok(Step::Record {
                            kind,
                            at: BodyAt::Input { start: pos, end },
                            consumed: end,
                        });
                    }
                    self.phase = Phase::Body { kind, len };
                }
                Phase::Body { kind, len } => {
                    let take = len.saturating_sub(self.body_fill).min(rest.len());
                    // `len` passed the limit check, which includes the scratch length.
                    let limit = self.scratch.len();
                    match (
                        self.scratch.get_mut(self.body_fill..self.body_fill + take),
                        rest.get(..take),
                    ) {
                        (Some(dst), Some(src)) => dst.copy_from_slice(src),
                        _ => return Err(DecodeError::Oversized { len, limit }),
                    }
                    self.body_fill += take;
                    pos += take;
                    if self.body_fill < len {
                        return Ok(Step::NeedMore);
                    }
                    self.phase = self.after(kind);
                    return Ok(Step::Record {
                        kind,
                        at: BodyAt::Scratch { len },
                        consumed: pos,
                    });
                }
            }
        }
    }
}

impl StreamDecoder<'_> {
    /// The phase after a complete record of `kind`.
    fn after(&mut self, kind: u16) -> Phase {
        if kind == kind::END_OF_STREAM {
            self.ended = true;
        }
        if self.ended {
            Phase::Ended
        } else {
            Phase::RecordHeader
        }
    }
}
