//! The destination engine: parses and validates the incoming stream and
//! places what it carries, through a [`DestinationHost`] the VMM provides.
//!
//! Everything the source says is checked before it touches guest memory:
//! the block list must match the destination's own RAM layout (ids, sizes,
//! page sizes), every page index must lie inside its block, and every batch
//! is validated whole before its first page is placed. A malformed or
//! hostile stream gets a typed error and a failed migration, never a write
//! outside guest memory.
//!
//! ```text
//!  [none] ─first byte─► [active] ─block list─► pages, devices ... ─► end of stream ─► [completed]
//!                           └──────────── any error ──────────────► [failed]  (SHUT 1 on the return path)
//! ```

use core::fmt;
use core::time::Duration;

use crate::return_path::RpMessage;
use crate::state::MigrationStatus;
use crate::stats::MigrationStats;
use crate::time::Instant;
use crate::wire::{
    BatchFlags, BlockInfo, BlockList, Command, DecodeError, DeviceState, PageBatch, PageKind,
    Record, StreamDecoder,
};

/// Room for queued return-path messages: a SHUT and a few PONGs.
const RETURN_PATH_QUEUE: usize = 512;

/// Default for [`DestinationEngine::set_idle_timeout`]: how long an
/// unfinished stream may stay silent before the destination gives up.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 30_000;

/// What the VMM does with what arrives. Page ranges handed to it have been
/// checked against the block's size.
pub trait DestinationHost {
    /// Writes `data` (a whole number of pages) into block `block` starting
    /// at page `first_page`.
    fn place_pages(&mut self, block: u16, first_page: u64, data: &[u8]) -> Result<(), HostError>;
    /// Makes `count` pages of block `block` from `first_page` on read as
    /// zero (a fresh destination's memory already does; a page placed
    /// earlier in the migration must be zeroed).
    fn place_zero_pages(
        &mut self,
        block: u16,
        first_page: u64,
        count: u64,
    ) -> Result<(), HostError>;
    /// Loads one device's state.
    fn load_device(&mut self, device: &DeviceState<'_>) -> Result<(), HostError>;
}

/// A failure reported by the [`DestinationHost`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostError {
    /// What failed, for example "UFFDIO_COPY" or "vCPU register state".
    pub what: &'static str,
    /// An errno or device-specific code, zero when there is none.
    pub code: i32,
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.code == 0 {
            write!(f, "{}", self.what)
        } else {
            write!(f, "{} (code {})", self.what, self.code)
        }
    }
}

/// Why the destination refused the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestError {
    /// The bytes are not a valid livemig stream.
    Decode(DecodeError),
    /// The source's RAM has a different number of blocks.
    BlockCountMismatch {
        /// Blocks the source announced.
        source: usize,
        /// Blocks this destination has.
        destination: usize,
    },
    /// Block `index` has a different id on the source.
    BlockIdMismatch {
        /// Position in the block list.
        index: usize,
    },
    /// Block `index` has a different size on the source.
    BlockLengthMismatch {
        /// Position in the block list.
        index: usize,
        /// Bytes on the source.
        source: u64,
        /// Bytes on this destination.
        destination: u64,
    },
    /// Block `index` uses a different page size on the source.
    PageSizeMismatch {
        /// Position in the block list.
        index: usize,
        /// Page size on the source.
        source: u64,
        /// Page size on this destination.
        destination: u64,
    },
    /// A second block list arrived.
    DuplicateBlockList,
    /// Pages arrived before the block list that gives them meaning.
    PagesBeforeBlockList,
    /// A batch names a block index outside the block list.
    NoSuchBlock {
        /// The index in the batch.
        block: u16,
        /// Blocks in the list.
        blocks: usize,
    },
    /// A page index lies outside its block.
    PageOutOfBlock {
        /// The block.
        block: u16,
        /// The page index in the batch.
        page: u64,
        /// Pages in the block.
        pages: u64,
    },
    /// A command this destination cannot act on here.
    UnexpectedCommand(&'static str),
    /// The VMM failed to place a page or load a device.
    Host(HostError),
    /// The connection closed before the end of the stream.
    UnexpectedEof(DecodeError),
    /// The source sent nothing for longer than the idle timeout.
    SourceSilent {
        /// Milliseconds without input.
        idle_ms: u64,
    },
    /// The migration had already failed; no more input is taken.
    AlreadyFailed,
}

impl fmt::Display for DestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DestError::Decode(e) => write!(f, "invalid migration stream: {e}"),
            DestError::BlockCountMismatch {
                source,
                destination,
            } => write!(
                f,
                "RAM layout mismatch: the source has {source} RAM blocks, this destination {destination}"
            ),
            DestError::BlockIdMismatch { index } => {
                write!(
                    f,
                    "RAM layout mismatch: block {index} has a different id on the source"
                )
            }
            DestError::BlockLengthMismatch {
                index,
                source,
                destination,
            } => write!(
                f,
                "RAM size mismatch: block {index} is {source} bytes on the source, {destination} bytes here"
            ),
            DestError::PageSizeMismatch {
                index,
                source,
                destination,
            } => write!(
                f,
                "page size mismatch: block {index} uses {source}-byte pages on the source, {destination} here"
            ),
            DestError::DuplicateBlockList => write!(f, "the source sent its block list twice"),
            DestError::PagesBeforeBlockList => {
                write!(f, "pages arrived before the RAM block list")
            }
            DestError::NoSuchBlock { block, blocks } => {
                write!(
                    f,
                    "pages for block {block}, but there are only {blocks} blocks"
                )
            }
            DestError::PageOutOfBlock { block, page, pages } => write!(
                f,
                "page {page} lies outside block {block}, which has {pages} pages"
            ),
            DestError::UnexpectedCommand(c) => write!(f, "unexpected command {c}"),
            DestError::Host(e) => write!(f, "the VMM failed: {e}"),
            DestError::UnexpectedEof(e) => write!(f, "connection closed early: {e}"),
            DestError::SourceSilent { idle_ms } => {
                write!(f, "the source sent nothing for {idle_ms} ms")
            }
            DestError::AlreadyFailed => write!(f, "the migration has already failed"),
        }
    }
}

impl core::error::Error for DestError {}

impl From<DecodeError> for DestError {
    fn from(e: DecodeError) -> Self {
        DestError::Decode(e)
    }
}

impl From<HostError> for DestError {
    fn from(e: HostError) -> Self {
        DestError::Host(e)
    }
}

/// The sans-IO destination side of a migration. See the [module docs](self).
pub struct DestinationEngine<'a> {
    layout: &'a [BlockInfo<'a>],
    decoder: StreamDecoder<'a>,
    state: MigrationStatus,
    blocks_received: bool,
    return_path: bool,
    rp_queue: heapless::Vec<u8, RETURN_PATH_QUEUE>,
    started_at: Option<Instant>,
    last_input_at: Instant,
    idle_timeout: Duration,
    stats: MigrationStats,
}

impl<'a> DestinationEngine<'a> {
    /// A destination whose guest RAM is `layout`, decoding with `scratch`
    /// as its reassembly buffer (records larger than it are refused; give
    /// it at least [`crate::wire::MAX_RECORD_BODY`] plus a record header to
    /// accept everything a livemig source sends).
    pub fn new(layout: &'a [BlockInfo<'a>], scratch: &'a mut [u8]) -> Self {
        let mut stats = MigrationStats::default();
        stats.ram.total = layout.iter().map(|b| b.length).sum();
        stats.ram.page_size = layout
            .iter()
            .map(|b| u64::from(b.page_size))
            .max()
            .unwrap_or(0);
        DestinationEngine {
            layout,
            decoder: StreamDecoder::new(scratch),
            state: MigrationStatus::None,
            blocks_received: false,
            return_path: false,
            rp_queue: heapless::Vec::new(),
            started_at: None,
            last_input_at: Instant::ZERO,
            idle_timeout: Duration::from_millis(DEFAULT_IDLE_TIMEOUT_MS),
            stats,
        }
    }

    /// How long an unfinished stream may stay silent before the
    /// destination fails it (a source that vanished without closing the
    /// connection must not leave the destination waiting forever).
    pub fn set_idle_timeout(&mut self, timeout: Duration) {
        self.idle_timeout = timeout;
    }

    /// When [`DestinationEngine::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (self.state == MigrationStatus::Active).then(|| self.last_input_at + self.idle_timeout)
    }

    /// Time passed: fails the migration if the source has been silent for
    /// longer than the idle timeout.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), DestError> {
        let idle = now - self.last_input_at;
        if self.state == MigrationStatus::Active && idle >= self.idle_timeout {
            let e = DestError::SourceSilent {
                idle_ms: idle.as_millis() as u64,
            };
            return Err(self.fail(now, e));
        }
        Ok(())
    }

    /// The current state.
    pub fn state(&self) -> MigrationStatus {
        self.state
    }

    /// Statistics so far.
    pub fn stats(&self) -> &MigrationStats {
        &self.stats
    }

    /// True once the end of the stream has been loaded: the VMM may start
    /// the vCPUs.
    pub fn is_completed(&self) -> bool {
        self.state == MigrationStatus::Completed
    }

    /// True when the source opened the return path.
    pub fn has_return_path(&self) -> bool {
        self.return_path
    }

    /// Takes bytes from the main stream. Returns how many were consumed: all
    /// of them, unless the stream ended (trailing bytes are then an error).
    pub fn handle_input(
        &mut self,
        now: Instant,
        input: &[u8],
        host: &mut impl DestinationHost,
    ) -> Result<usize, DestError> {
        if self.state == MigrationStatus::Failed {
            return Err(DestError::AlreadyFailed);
        }
        if self.state == MigrationStatus::None {
            self.started_at = Some(now);
            self.set_state(MigrationStatus::Active);
        }
        self.stats.ram.transferred += input.len() as u64;
        self.last_input_at = now;
        let mut offset = 0;
        while offset < input.len() {
            let rest = input.get(offset..).unwrap_or(&[]);
            let result = match self.decoder.decode(rest) {
                Ok(decoded) => {
                    offset += decoded.consumed;
                    match decoded.record {
                        Some(record) => Self::apply(
                            self.layout,
                            &mut self.blocks_received,
                            &mut self.return_path,
                            &mut self.rp_queue,
                            &mut self.stats,
                            record,
                            host,
                        ),
                        None => Ok(false),
                    }
                }
                Err(e) => Err(DestError::Decode(e)),
            };
            match result {
                Ok(true) => {
                    self.complete(now);
                    return Ok(offset);
                }
                Ok(false) => {}
                Err(e) => return Err(self.fail(now, e)),
            }
        }
        self.update_time(now);
        Ok(offset)
    }

    /// The source closed the connection.
    pub fn handle_eof(&mut self, now: Instant) -> Result<(), DestError> {
        match self.state {
            MigrationStatus::Completed => Ok(()),
            MigrationStatus::Failed => Err(DestError::AlreadyFailed),
            _ => {
                let e = match self.decoder.finish() {
                    Err(e) => DestError::UnexpectedEof(e),
                    Ok(()) => DestError::UnexpectedCommand("end of connection"),
                };
                Err(self.fail(now, e))
            }
        }
    }

    /// Copies queued return-path bytes into `out`, returning how many; the
    /// rest stays queued.
    pub fn poll_return_path(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.rp_queue.len());
        out[..n].copy_from_slice(&self.rp_queue[..n]);
        let rest = self.rp_queue.len() - n;
        self.rp_queue.copy_within(n.., 0);
        self.rp_queue.truncate(rest);
        n
    }

    fn set_state(&mut self, to: MigrationStatus) {
        if let Ok(next) = self.state.transition(to) {
            self.state = next;
            self.stats.status = next;
        }
    }

    fn update_time(&mut self, now: Instant) {
        if let Some(start) = self.started_at {
            self.stats.total_time_ms = (now - start).as_millis() as u64;
        }
    }

    fn complete(&mut self, now: Instant) {
        self.update_time(now);
        self.set_state(MigrationStatus::Completed);
        if self.return_path {
            queue(&mut self.rp_queue, &RpMessage::Shut { error: false });
        }
    }

    fn fail(&mut self, now: Instant, e: DestError) -> DestError {
        self.update_time(now);
        self.stats.error_desc.set(format_args!("{e}"));
        self.set_state(MigrationStatus::Failed);
        if self.return_path {
            queue(&mut self.rp_queue, &RpMessage::Shut { error: true });
        }
        e
    }

    /// Acts on one record; `Ok(true)` at the end of the stream.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        layout: &[BlockInfo<'_>],
        blocks_received: &mut bool,
        return_path: &mut bool,
        rp_queue: &mut heapless::Vec<u8, RETURN_PATH_QUEUE>,
        stats: &mut MigrationStats,
        record: Record<'_>,
        host: &mut impl DestinationHost,
    ) -> Result<bool, DestError> {
        match record {
            Record::RamBlocks(list) => {
                if *blocks_received {
                    return Err(DestError::DuplicateBlockList);
                }
                check_layout(layout, &list)?;
                *blocks_received = true;
            }
            Record::Pages(batch) => {
                if !*blocks_received {
                    return Err(DestError::PagesBeforeBlockList);
                }
                place_batch(layout, &batch, host, stats)?;
                if batch.flags().contains(BatchFlags::END_OF_ITERATION) {
                    stats.iterations += 1;
                }
            }
            Record::Device(device) => host.load_device(&device)?,
            Record::Command(command) => match command {
                Command::OpenReturnPath => *return_path = true,
                Command::Ping(value) => {
                    if *return_path {
                        queue(rp_queue, &RpMessage::Pong(value));
                    }
                }
                Command::PostcopyAdvise { .. } => {
                    return Err(DestError::UnexpectedCommand("postcopy-advise"));
                }
                Command::PostcopyListen => {
                    return Err(DestError::UnexpectedCommand("postcopy-listen"));
                }
                Command::PostcopyRun => return Err(DestError::UnexpectedCommand("postcopy-run")),
                Command::PostcopyRamDiscard { .. } => {
                    return Err(DestError::UnexpectedCommand("postcopy-ram-discard"));
                }
                Command::RecvBitmap { .. } => {
                    return Err(DestError::UnexpectedCommand("recv-bitmap"));
                }
                Command::PostcopyResume => {
                    return Err(DestError::UnexpectedCommand("postcopy-resume"));
                }
                Command::SwitchoverStart => {}
            },
            Record::Package(package) => {
                for inner in package.records() {
                    let inner = inner?;
                    if Self::apply(
                        layout,
                        blocks_received,
                        return_path,
                        rp_queue,
                        stats,
                        inner,
                        host,
                    )? {
                        return Err(DestError::Decode(DecodeError::NestedPackage));
                    }
                }
            }
            Record::EndOfStream => return Ok(true),
        }
        Ok(false)
    }
}

fn queue(rp_queue: &mut heapless::Vec<u8, RETURN_PATH_QUEUE>, msg: &RpMessage<'_>) {
    let mut buf = [0u8; 16];
    if let Ok(n) = msg.encode(&mut buf) {
        // A full queue means the caller stopped draining the return path;
        // the message that does not fit is dropped, and the source notices
        // the silence through its own timeout.
        let _ = rp_queue.extend_from_slice(&buf[..n]);
    }
}

fn check_layout(layout: &[BlockInfo<'_>], list: &BlockList<'_>) -> Result<(), DestError> {
    if list.len() != layout.len() {
        return Err(DestError::BlockCountMismatch {
            source: list.len(),
            destination: layout.len(),
        });
    }
    for (index, (theirs, ours)) in list.iter().zip(layout.iter()).enumerate() {
        if theirs.id.as_str() != ours.id.as_str() {
            return Err(DestError::BlockIdMismatch { index });
        }
        if theirs.length != ours.length {
            return Err(DestError::BlockLengthMismatch {
                index,
                source: theirs.length,
                destination: ours.length,
            });
        }
        if theirs.page_size != ours.page_size {
            return Err(DestError::PageSizeMismatch {
                index,
                source: u64::from(theirs.page_size),
                destination: u64::from(ours.page_size),
            });
        }
    }
    Ok(())
}

/// Validates a whole batch, then places it: runs of zero pages in one call.
fn place_batch(
    layout: &[BlockInfo<'_>],
    batch: &PageBatch<'_>,
    host: &mut impl DestinationHost,
    stats: &mut MigrationStats,
) -> Result<(), DestError> {
    let block = batch.block();
    let info = layout
        .get(usize::from(block))
        .ok_or(DestError::NoSuchBlock {
            block,
            blocks: layout.len(),
        })?;
    if batch.page_size() as u64 != u64::from(info.page_size) {
        return Err(DestError::PageSizeMismatch {
            index: usize::from(block),
            source: batch.page_size() as u64,
            destination: u64::from(info.page_size),
        });
    }
    let pages = info.length / u64::from(info.page_size);
    if let Some((entry, _)) = batch.pages().find(|(e, _)| e.index >= pages) {
        return Err(DestError::PageOutOfBlock {
            block,
            page: entry.index,
            pages,
        });
    }
    let mut zero_run: Option<(u64, u64)> = None;
    for (entry, data) in batch.pages() {
        match (entry.kind, data) {
            (PageKind::Zero, _) => {
                stats.ram.duplicate += 1;
                zero_run = match zero_run {
                    Some((first, count)) if first + count == entry.index => {
                        Some((first, count + 1))
                    }
                    Some((first, count)) => {
                        host.place_zero_pages(block, first, count)?;
                        Some((entry.index, 1))
                    }
                    None => Some((entry.index, 1)),
                };
            }
            (PageKind::Normal, Some(data)) => {
                // Keep the stream's order: zero pages before this one land first.
                if let Some((first, count)) = zero_run.take() {
                    host.place_zero_pages(block, first, count)?;
                }
                stats.ram.normal += 1;
                stats.ram.normal_bytes += data.len() as u64;
                host.place_pages(block, entry.index, data)?;
            }
            (PageKind::Normal, None) => {}
        }
    }
    if let Some((first, count)) = zero_run {
        host.place_zero_pages(block, first, count)?;
    }
    Ok(())
}
