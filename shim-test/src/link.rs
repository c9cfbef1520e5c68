//! One direction of a simulated connection, in simulated time.
//!
//! A [`SimLink`] is a byte stream with a bandwidth and a latency: a send
//! occupies the link for `len / bandwidth` after the link is free, and its
//! bytes arrive `latency` after the last of them has left. Nothing moves
//! unless the harness calls [`SimLink::recv`] with a later `now`, so a whole
//! migration over a "1 GB/s, 50 us" link runs as fast as the memory copies.
//!
//! A link can have a send buffer (`send_buffer_bytes`), as a socket has: a
//! send then completes as soon as its last byte fits in the buffer, long
//! before it has crossed a slow link, and [`SimLink::unsent_at`] tells how
//! many bytes have not reached the receiver yet (what `SIOCOUTQ` reports on
//! a real socket). Without one, a send completes when its last byte has
//! left.
//!
//! Faults are part of the configuration, at exact stream offsets, so each
//! failure test is reproducible:
//! * `cut_after`: the connection breaks at that byte. Bytes before it are
//!   delivered; the send that crosses it delivers its prefix and fails with
//!   [`LinkError::Cut`]; every later send fails too. The receiver sees the
//!   break through [`SimLink::is_reset`] once it has drained what came
//!   before (a TCP reset after the data).
//! * `corrupt_at`: one byte of the stream is XORed with a value in transit
//!   (a bit flip the receiver's validation must catch).
//! * `stall_after`: bytes past that offset are accepted and paced but never
//!   delivered, and no end of stream follows: a destination that stopped
//!   answering, which only a timeout can detect.
//!
//! A migration uses two links, the main stream and the return path:
//! [`duplex`] builds the pair.

use std::collections::VecDeque;
use std::fmt;

/// Nanoseconds per second, for bandwidth arithmetic.
const NS_PER_SEC: u128 = 1_000_000_000;

/// Shape and faults of one direction of a link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LinkConfig {
    /// Bytes per simulated second; 0 means infinite (sends take no time).
    pub bandwidth_bytes_per_sec: u64,
    /// One-way delay from a byte leaving the sender to its arrival.
    pub latency_ns: u64,
    /// Stream offset at which the link is cut (see the module docs).
    pub cut_after: Option<u64>,
    /// Stream offset of a byte to corrupt, and the value XORed into it.
    pub corrupt_at: Option<(u64, u8)>,
    /// Stream offset after which bytes are swallowed (see the module docs).
    pub stall_after: Option<u64>,
    /// Bytes the sender's buffer holds beyond the one being transmitted
    /// (0: none; see the module docs).
    pub send_buffer_bytes: u64,
}

impl LinkConfig {
    /// A fault-free link with the given bandwidth (0 = infinite) and
    /// latency.
    pub const fn new(bandwidth_bytes_per_sec: u64, latency_ns: u64) -> Self {
        LinkConfig {
            bandwidth_bytes_per_sec,
            latency_ns,
            cut_after: None,
            corrupt_at: None,
            stall_after: None,
            send_buffer_bytes: 0,
        }
    }
}

impl LinkConfig {
    /// The same link without its faults (cut, corruption, stall): what a
    /// new connection over the same network gets.
    pub const fn healthy(&self) -> Self {
        LinkConfig {
            cut_after: None,
            corrupt_at: None,
            stall_after: None,
            ..*self
        }
    }
}

/// Why a send failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinkError {
    /// The link is cut: only the first `at_byte` bytes of the stream were
    /// accepted.
    Cut {
        /// Stream offset of the cut.
        at_byte: u64,
    },
    /// The sender already closed this direction.
    Closed,
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::Cut { at_byte } => write!(f, "link cut at stream byte {at_byte}"),
            LinkError::Closed => write!(f, "send on a link already closed by its sender"),
        }
    }
}

impl std::error::Error for LinkError {}

/// Bytes in flight that arrive together.
#[derive(Clone, Debug)]
struct Segment {
    arrival_ns: u64,
    bytes: Vec<u8>,
}

/// One direction of a simulated connection.
#[derive(Clone, Debug)]
pub struct SimLink {
    config: LinkConfig,
    segments: VecDeque<Segment>,
    /// Bytes of the front segment already received.
    front_read: usize,
    /// Time at which the last accepted byte has left the sender.
    free_at_ns: u64,
    /// Sub-nanosecond remainder of transmission time, in ns * bandwidth
    /// units, so many small sends add up to the same time as one big one.
    carry: u128,
    sent: u64,
    delivered: u64,
    /// Stream offset and sender-side time of a cut, once it happened.
    cut: Option<(u64, u64)>,
    /// Arrival time of the end of stream, once the sender closed.
    eof_at_ns: Option<u64>,
}

impl SimLink {
    /// An empty, open link.
    pub fn new(config: LinkConfig) -> Self {
        SimLink {
            config,
            segments: VecDeque::new(),
            front_read: 0,
            free_at_ns: 0,
            carry: 0,
            sent: 0,
            delivered: 0,
            cut: None,
            eof_at_ns: None,
        }
    }

    /// The link's configuration.
    pub fn config(&self) -> &LinkConfig {
        &self.config
    }

    /// Transmission time of `len` bytes, carrying the remainder.
    fn transmit_ns(&mut self, len: u64) -> u64 {
        let bw = u128::from(self.config.bandwidth_bytes_per_sec);
        if bw == 0 {
            return 0;
        }
        let total = u128::from(len) * NS_PER_SEC + self.carry;
        self.carry = total % bw;
        u64::try_from(total / bw).unwrap_or(u64::MAX)
    }

    /// Queues `bytes` at time `now_ns`. Returns the time at which the write
    /// completes: when the last byte has left the sender (`max(now, link
    /// free) + len / bandwidth`), or with a send buffer, as soon as what is
    /// still queued behind the link fits in the buffer.
    ///
    /// On a cut link, fails with [`LinkError::Cut`] after accepting the
    /// bytes before the cut; on a closed one, with [`LinkError::Closed`].
    pub fn send(&mut self, now_ns: u64, bytes: &[u8]) -> Result<u64, LinkError> {
        if let Some((at_byte, _)) = self.cut {
            return Err(LinkError::Cut { at_byte });
        }
        if self.eof_at_ns.is_some() {
            return Err(LinkError::Closed);
        }
        let len = bytes.len() as u64;
        let end = self.sent.saturating_add(len);
        let cut_here = self.config.cut_after.filter(|&c| end > c);
        let accepted = cut_here.map_or(len, |c| c.saturating_sub(self.sent)) as usize;
        let start = now_ns.max(self.free_at_ns);
        let done = start.saturating_add(self.transmit_ns(accepted as u64));
        self.free_at_ns = done;
        let buffered_ns = self.buffer_ns();
        let written = now_ns.max(done.saturating_sub(buffered_ns));
        let live = match self.config.stall_after {
            Some(s) => (s.saturating_sub(self.sent) as usize).min(accepted),
            None => accepted,
        };
        if live > 0 {
            let mut data = bytes[..live].to_vec();
            if let Some((at, x)) = self.config.corrupt_at
                && let Some(b) = at
                    .checked_sub(self.sent)
                    .and_then(|i| data.get_mut(i as usize))
            {
                *b ^= x;
            }
            self.segments.push_back(Segment {
                arrival_ns: done.saturating_add(self.config.latency_ns),
                bytes: data,
            });
        }
        self.sent += accepted as u64;
        match cut_here {
            Some(at_byte) => {
                self.cut = Some((at_byte, done));
                Err(LinkError::Cut { at_byte })
            }
            None => Ok(written),
        }
    }

    /// Time the link takes to carry a full send buffer.
    fn buffer_ns(&self) -> u64 {
        let bw = u128::from(self.config.bandwidth_bytes_per_sec);
        if bw == 0 {
            return 0;
        }
        u64::try_from(u128::from(self.config.send_buffer_bytes) * NS_PER_SEC / bw)
            .unwrap_or(u64::MAX)
    }

    /// Bytes accepted that have not reached the receiver by `now_ns`: in
    /// the send buffer, on the link or within its latency (a socket's
    /// `SIOCOUTQ`, unacknowledged bytes). Stalled bytes never arrive and
    /// are not counted.
    pub fn unsent_at(&self, now_ns: u64) -> u64 {
        let mut bytes = 0u64;
        for (i, s) in self.segments.iter().enumerate().rev() {
            if s.arrival_ns <= now_ns {
                break;
            }
            let read = if i == 0 { self.front_read } else { 0 };
            bytes += (s.bytes.len() - read) as u64;
        }
        bytes
    }

    /// Cuts the link now, at the current end of the stream (a cable pulled
    /// at a chosen moment rather than at a chosen byte). Bytes already sent
    /// are still delivered. Does nothing if it is already cut.
    pub fn cut_now(&mut self, now_ns: u64) {
        if self.cut.is_none() {
            self.cut = Some((self.sent, now_ns.max(self.free_at_ns)));
        }
    }

    /// Copies into `out` the bytes that have arrived by `now_ns`, oldest
    /// first, and returns how many. Segments are split when `out` is
    /// short; the rest stays for the next call.
    pub fn recv(&mut self, now_ns: u64, out: &mut [u8]) -> usize {
        let mut n = 0;
        while n < out.len() {
            let Some(front) = self.segments.front().filter(|s| s.arrival_ns <= now_ns) else {
                break;
            };
            let rest = &front.bytes[self.front_read..];
            let take = rest.len().min(out.len() - n);
            out[n..n + take].copy_from_slice(&rest[..take]);
            n += take;
            self.front_read += take;
            if self.front_read == front.bytes.len() {
                self.segments.pop_front();
                self.front_read = 0;
            }
        }
        self.delivered += n as u64;
        n
    }

    /// Whether the stream swallows everything from here on (a stalled
    /// receiver), which also hides the end of stream.
    fn stalled(&self) -> bool {
        self.config.stall_after.is_some_and(|s| self.sent >= s)
    }

    /// Arrival time of the next bytes [`recv`](Self::recv) will return, if
    /// any are on their way: where a harness moves its clock when it has
    /// nothing else to do. Stalled bytes never arrive and are not counted.
    pub fn next_arrival_ns(&self) -> Option<u64> {
        self.segments.front().map(|s| s.arrival_ns)
    }

    /// When the receiver will see the stream end, once that is decided: the
    /// arrival of a clean close ([`is_eof`](Self::is_eof)) or of a cut
    /// ([`is_reset`](Self::is_reset)); `None` while the stream is open or if
    /// a stall swallows the close. Kept apart from
    /// [`next_arrival_ns`](Self::next_arrival_ns) because it stays the same
    /// after the end has been seen: a harness stops waiting on a link once
    /// it has handled its end, instead of spinning on a past deadline.
    pub fn end_at_ns(&self) -> Option<u64> {
        match self.cut {
            Some((_, at)) => Some(at.saturating_add(self.config.latency_ns)),
            None => self.eof_at_ns.filter(|_| !self.stalled()),
        }
    }

    /// Ends the stream cleanly at `now_ns` (a socket shutdown for writing).
    /// The receiver sees [`is_eof`](Self::is_eof) once it has drained every
    /// byte and the end has crossed the latency. Closing twice keeps the
    /// first close.
    pub fn close(&mut self, now_ns: u64) {
        if self.eof_at_ns.is_none() {
            let t = now_ns
                .max(self.free_at_ns)
                .saturating_add(self.config.latency_ns);
            self.eof_at_ns = Some(t);
        }
    }

    /// Whether the receiver, at `now_ns`, has reached a clean end of
    /// stream: closed, fully drained, not cut, not stalled.
    pub fn is_eof(&self, now_ns: u64) -> bool {
        self.segments.is_empty()
            && self.cut.is_none()
            && !self.stalled()
            && self.eof_at_ns.is_some_and(|t| t <= now_ns)
    }

    /// Whether the link has been cut (the sender's view: immediate).
    pub fn is_cut(&self) -> bool {
        self.cut.is_some()
    }

    /// Whether the receiver, at `now_ns`, sees the connection broken: the
    /// link is cut, every byte before the cut has been received, and the
    /// break has crossed the latency.
    pub fn is_reset(&self, now_ns: u64) -> bool {
        self.segments.is_empty()
            && self
                .cut
                .is_some_and(|(_, t)| t.saturating_add(self.config.latency_ns) <= now_ns)
    }

    /// Bytes accepted by [`send`](Self::send) so far (including stalled
    /// ones and the prefix of a cut send).
    pub fn bytes_sent(&self) -> u64 {
        self.sent
    }

    /// Bytes handed to the receiver by [`recv`](Self::recv) so far.
    pub fn bytes_delivered(&self) -> u64 {
        self.delivered
    }

    /// Bytes queued for delivery but not yet received (excludes stalled
    /// bytes, which will never arrive).
    pub fn bytes_in_flight(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.bytes.len() as u64)
            .sum::<u64>()
            - self.front_read as u64
    }

    /// Time at which the link has finished transmitting everything accepted
    /// so far; a send at or after it starts at once.
    pub fn free_at_ns(&self) -> u64 {
        self.free_at_ns
    }
}

/// The two directions of a connection: `(forward, back)`, e.g. the main
/// migration stream (source to destination) and the return path. Each has
/// its own bandwidth, latency and faults, as the two directions of a real
/// connection can fail differently.
pub fn duplex(forward: LinkConfig, back: LinkConfig) -> (SimLink, SimLink) {
    (SimLink::new(forward), SimLink::new(back))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GBPS: u64 = 1_000_000_000;

    fn recv_all(l: &mut SimLink, now: u64) -> Vec<u8> {
        let mut out = vec![0; 1 << 16];
        let n = l.recv(now, &mut out);
        out.truncate(n);
        out
    }

    #[test]
    fn bandwidth_and_latency_timing() {
        let mut l = SimLink::new(LinkConfig::new(GBPS, 50_000));
        assert_eq!(l.send(1_000, &[7; 4096]).unwrap(), 5_096);
        // The link is busy: the next send queues behind the first.
        assert_eq!(l.send(2_000, &[8; 1000]).unwrap(), 6_096);
        // Idle link: starts at now.
        assert_eq!(l.send(100_000, &[9; 10]).unwrap(), 100_010);
        assert_eq!(l.next_arrival_ns(), Some(55_096));
        assert_eq!(recv_all(&mut l, 55_095), Vec::<u8>::new());
        assert_eq!(recv_all(&mut l, 56_096).len(), 5096);
        assert_eq!(l.next_arrival_ns(), Some(150_010));
        assert_eq!(recv_all(&mut l, 200_000), vec![9; 10]);
        assert_eq!((l.bytes_sent(), l.bytes_delivered()), (5106, 5106));
        assert_eq!(l.next_arrival_ns(), None);
    }

    #[test]
    fn a_send_buffer_completes_writes_early_and_counts_unsent_bytes() {
        // 1 MB/s, 10 us latency, 100 kB of buffer: 1 us per byte.
        let mut l = SimLink::new(LinkConfig {
            send_buffer_bytes: 100_000,
            ..LinkConfig::new(1_000_000, 10_000)
        });
        // Fits in the buffer: the write completes at once.
        assert_eq!(l.send(0, &[1; 50_000]).unwrap(), 0);
        assert_eq!(l.unsent_at(0), 50_000);
        // 150 kB queued in all: the write waits until 100 kB are left.
        assert_eq!(l.send(0, &[2; 100_000]).unwrap(), 50_000_000);
        assert_eq!(l.free_at_ns(), 150_000_000);
        assert_eq!(l.unsent_at(50_000_000), 150_000, "nothing arrived yet");
        // The first segment arrives after its last byte left, plus latency.
        assert_eq!(l.unsent_at(50_010_000), 100_000);
        assert_eq!(recv_all(&mut l, 50_010_000).len(), 50_000);
        assert_eq!(l.unsent_at(150_010_000), 0);
        // Without a buffer the same write completes when its bytes left.
        let mut plain = SimLink::new(LinkConfig::new(1_000_000, 10_000));
        assert_eq!(plain.send(0, &[1; 50_000]).unwrap(), 50_000_000);
    }

    #[test]
    fn fractional_transmission_time_is_carried() {
        // 3 bytes/s: each byte takes 333_333_333.3 ns.
        let mut l = SimLink::new(LinkConfig::new(3, 0));
        let mut t = 0;
        for _ in 0..3 {
            t = l.send(t, &[1]).unwrap();
        }
        assert_eq!(t, NS_PER_SEC as u64);
    }

    #[test]
    fn infinite_bandwidth_zero_latency_is_immediate() {
        let mut l = SimLink::new(LinkConfig::default());
        assert_eq!(l.send(42, &[1, 2, 3]).unwrap(), 42);
        assert_eq!(l.send(42, &[]).unwrap(), 42);
        assert_eq!(recv_all(&mut l, 42), vec![1, 2, 3]);
    }

    #[test]
    fn partial_receives_split_segments() {
        let mut l = SimLink::new(LinkConfig::default());
        l.send(0, &[1, 2, 3, 4, 5]).unwrap();
        l.send(0, &[6, 7]).unwrap();
        let mut out = [0u8; 3];
        assert_eq!(l.recv(0, &mut out), 3);
        assert_eq!(out, [1, 2, 3]);
        assert_eq!(l.bytes_in_flight(), 4);
        assert_eq!(l.recv(0, &mut out), 3);
        assert_eq!(out, [4, 5, 6]);
        assert_eq!(l.recv(0, &mut out), 1);
        assert_eq!(out[0], 7);
        assert_eq!(l.recv(0, &mut out), 0);
        assert_eq!(l.recv(0, &mut []), 0);
    }

    #[test]
    fn cut_delivers_prefix_then_errors() {
        let cfg = LinkConfig {
            cut_after: Some(10),
            ..LinkConfig::new(GBPS, 100)
        };
        let mut l = SimLink::new(cfg);
        assert!(l.send(0, &[1; 6]).is_ok());
        assert!(!l.is_cut());
        assert_eq!(l.send(0, &[2; 6]), Err(LinkError::Cut { at_byte: 10 }));
        assert!(l.is_cut());
        assert_eq!(l.send(0, &[3]), Err(LinkError::Cut { at_byte: 10 }));
        assert_eq!(l.bytes_sent(), 10);
        assert!(!l.is_reset(1_000), "data before the cut comes first");
        assert_eq!(
            recv_all(&mut l, 1_000),
            [[1; 6].as_slice(), &[2; 4]].concat()
        );
        assert!(l.is_reset(1_000));
        assert!(!l.is_eof(1_000));
    }

    #[test]
    fn cut_exactly_at_a_send_boundary() {
        let cfg = LinkConfig {
            cut_after: Some(4),
            ..LinkConfig::default()
        };
        let mut l = SimLink::new(cfg);
        assert!(
            l.send(0, &[1; 4]).is_ok(),
            "reaching the cut is not crossing it"
        );
        assert!(l.send(0, &[]).is_ok());
        assert_eq!(l.send(0, &[1]), Err(LinkError::Cut { at_byte: 4 }));
        let mut l = SimLink::new(LinkConfig {
            cut_after: Some(0),
            ..LinkConfig::default()
        });
        assert_eq!(l.send(0, &[1]), Err(LinkError::Cut { at_byte: 0 }));
        assert_eq!(l.next_arrival_ns(), None);
        assert_eq!(l.end_at_ns(), Some(0));
        assert!(l.is_reset(0));
    }

    #[test]
    fn cut_now_at_a_chosen_time() {
        let mut l = SimLink::new(LinkConfig::new(GBPS, 10));
        l.send(0, &[1; 100]).unwrap();
        assert_eq!(l.end_at_ns(), None);
        l.cut_now(50);
        assert_eq!(l.end_at_ns(), Some(110));
        assert_eq!(l.send(60, &[1]), Err(LinkError::Cut { at_byte: 100 }));
        assert!(!l.is_reset(109));
        assert_eq!(recv_all(&mut l, 110).len(), 100);
        assert!(l.is_reset(110));
    }

    #[test]
    fn corrupt_flips_exactly_one_byte() {
        let cfg = LinkConfig {
            corrupt_at: Some((5, 0xff)),
            ..LinkConfig::default()
        };
        let mut l = SimLink::new(cfg);
        l.send(0, &[0; 4]).unwrap();
        l.send(0, &[0; 4]).unwrap();
        assert_eq!(recv_all(&mut l, 0), vec![0, 0, 0, 0, 0, 0xff, 0, 0]);
    }

    #[test]
    fn stall_swallows_bytes_and_end_of_stream() {
        let cfg = LinkConfig {
            stall_after: Some(3),
            ..LinkConfig::new(1000, 0)
        };
        let mut l = SimLink::new(cfg);
        assert_eq!(
            l.send(0, &[1, 2, 3, 4, 5]).unwrap(),
            5_000_000,
            "still paced"
        );
        l.close(0);
        assert_eq!(recv_all(&mut l, u64::MAX), vec![1, 2, 3]);
        assert_eq!(l.bytes_sent(), 5);
        assert_eq!(l.bytes_in_flight(), 0);
        assert_eq!(l.next_arrival_ns(), None);
        assert_eq!(l.end_at_ns(), None, "the close is swallowed too");
        assert!(!l.is_eof(u64::MAX) && !l.is_reset(u64::MAX));
    }

    #[test]
    fn close_gives_eof_after_data_and_latency() {
        let mut l = SimLink::new(LinkConfig::new(GBPS, 1_000));
        l.send(0, &[1; 100]).unwrap();
        l.close(10);
        l.close(5_000);
        assert_eq!(l.send(20, &[1]), Err(LinkError::Closed));
        assert!(!l.is_eof(2_000), "data not drained yet");
        assert_eq!(l.end_at_ns(), Some(1_100));
        assert_eq!(recv_all(&mut l, 1_100).len(), 100);
        assert_eq!(l.next_arrival_ns(), None);
        assert!(l.is_eof(1_100));
        assert!(!l.is_reset(u64::MAX));
        assert!(LinkError::Closed.to_string().contains("closed"));
    }

    #[test]
    fn a_healthy_copy_keeps_the_shape_and_drops_the_faults() {
        let faulty = LinkConfig {
            cut_after: Some(10),
            corrupt_at: Some((3, 1)),
            stall_after: Some(7),
            send_buffer_bytes: 64,
            ..LinkConfig::new(GBPS, 50)
        };
        let healthy = faulty.healthy();
        assert_eq!(
            healthy,
            LinkConfig {
                send_buffer_bytes: 64,
                ..LinkConfig::new(GBPS, 50)
            }
        );
        let mut link = SimLink::new(healthy);
        assert!(link.send(0, &[0; 100]).is_ok());
    }

    #[test]
    fn duplex_directions_are_independent() {
        let (mut fwd, mut back) = duplex(
            LinkConfig::new(GBPS, 0),
            LinkConfig {
                cut_after: Some(0),
                ..LinkConfig::default()
            },
        );
        assert!(fwd.send(0, b"ram").is_ok());
        assert!(back.send(0, b"pong").is_err());
        assert_eq!(recv_all(&mut fwd, 3), b"ram");
        assert_eq!(fwd.config().bandwidth_bytes_per_sec, GBPS);
        assert_eq!(back.free_at_ns(), 0);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn config() -> impl Strategy<Value = LinkConfig> {
            (
                prop_oneof![Just(0u64), 1..2_000_000_000u64],
                0..100_000u64,
                proptest::option::of(0..3000u64),
                proptest::option::of((0..3000u64, 1..=255u8)),
                proptest::option::of(0..3000u64),
            )
                .prop_map(|(bw, lat, cut_after, corrupt_at, stall_after)| LinkConfig {
                    bandwidth_bytes_per_sec: bw,
                    latency_ns: lat,
                    cut_after,
                    corrupt_at,
                    stall_after,
                    send_buffer_bytes: 0,
                })
        }

        proptest! {
            /// Whatever the send sizes, receive sizes and times, the
            /// receiver gets exactly the stream sent, cut at `cut_after`,
            /// stopped at `stall_after`, with one byte flipped at
            /// `corrupt_at`; send completion times never go backwards.
            #[test]
            fn delivers_the_stream_with_exactly_its_faults(
                cfg in config(),
                sends in proptest::collection::vec((0..500usize, 0..10_000u64), 0..20),
                reads in proptest::collection::vec(1..700usize, 1..20),
            ) {
                let mut l = SimLink::new(cfg);
                let mut stream = Vec::new();
                let (mut now, mut last_done) = (0u64, 0u64);
                for (i, (len, gap)) in sends.into_iter().enumerate() {
                    now += gap;
                    let bytes: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
                    match l.send(now, &bytes) {
                        Ok(done) => {
                            prop_assert!(done >= now && done >= last_done);
                            last_done = done;
                            stream.extend_from_slice(&bytes);
                        }
                        Err(LinkError::Cut { at_byte }) => {
                            prop_assert_eq!(Some(at_byte), cfg.cut_after);
                            let keep = (at_byte as usize).saturating_sub(stream.len());
                            stream.extend_from_slice(&bytes[..keep.min(len)]);
                        }
                        Err(LinkError::Closed) => prop_assert!(false, "never closed"),
                    }
                }
                prop_assert_eq!(l.bytes_sent(), stream.len() as u64);
                if let Some(s) = cfg.stall_after {
                    stream.truncate(s as usize);
                }
                if let Some((at, x)) = cfg.corrupt_at
                    && let Some(b) = stream.get_mut(at as usize) {
                        *b ^= x;
                    }
                let mut got = Vec::new();
                let mut t = 0;
                for (k, n) in reads.iter().cycle().take(10_000).enumerate() {
                    if got.len() == stream.len() {
                        break;
                    }
                    t = if k % 2 == 0 { t } else { l.next_arrival_ns().unwrap_or(t) };
                    let mut buf = vec![0; *n];
                    let r = l.recv(t, &mut buf);
                    got.extend_from_slice(&buf[..r]);
                }
                prop_assert_eq!(&got, &stream);
                prop_assert_eq!(l.bytes_delivered(), stream.len() as u64);
                prop_assert_eq!(l.bytes_in_flight(), 0);
            }
        }
    }
}
