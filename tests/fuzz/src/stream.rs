//! The main-stream decoder under fuzzing.

use livemig_core::wire::{
    BatchFlags, BlockId, BlockSums, Command, DecodeError, Decoded, DeviceState, Package, PageBatch,
    PageEntry, PageKind, PageRange, RangeSums, Record, STREAM_HEADER_LEN, StreamDecoder, ZeroRun,
    encode_stream_header,
};

/// Scratch for reassembling split records: large enough for every record the
/// fuzzer can build from a bounded input, small enough to allocate per run.
const STREAM_SCRATCH: usize = 1 << 20;

/// Drives the main-stream decoder over `data`, cut into chunks whose sizes
/// derive from the first byte, and checks the decoder's contract: no panic,
/// `consumed` within the chunk, all of a chunk taken when no record is
/// returned, sticky errors, and every decoded record internally consistent
/// (walked in full, and re-encoding then re-decoding to an equal record).
pub fn stream(data: &[u8]) {
    let _ = drive_stream(data);
}

/// The body of [`stream`]: returns how many records a complete stream held,
/// or the error that ended it (`None` for an empty input).
fn drive_stream(data: &[u8]) -> Option<Result<usize, DecodeError>> {
    let (&seed, rest) = data.split_first()?;
    let mut records = 0;
    let mut scratch = vec![0; STREAM_SCRATCH];
    let mut decoder = StreamDecoder::new(&mut scratch);
    let mut chunks = Chunks {
        seed,
        state: u32::from(seed) | 1,
    };
    let mut pos = 0;
    while pos < rest.len() {
        let end = rest.len().min(pos + chunks.next_len());
        let mut chunk = &rest[pos..end];
        pos = end;
        loop {
            let result = decoder.decode(chunk);
            match result {
                Ok(Decoded { consumed, record }) => {
                    assert!(
                        consumed <= chunk.len(),
                        "consumed {consumed} of {}",
                        chunk.len()
                    );
                    let Some(record) = record else {
                        assert_eq!(consumed, chunk.len(), "input left over without a record");
                        break;
                    };
                    check_record(&record);
                    records += 1;
                    chunk = &chunk[consumed..];
                    if chunk.is_empty() {
                        break;
                    }
                }
                Err(e) => {
                    assert_eq!(decoder.decode(chunk).err(), Some(e), "errors are sticky");
                    assert_eq!(decoder.finish(), Err(e));
                    return Some(Err(e));
                }
            }
        }
    }
    match decoder.finish() {
        Ok(()) => assert!(decoder.is_finished()),
        Err(e) => assert!(
            matches!(e, DecodeError::UnexpectedEof { .. }),
            "finish: {e}"
        ),
    }
    Some(decoder.finish().map(|()| records))
}

/// Chunk sizes from a seed: 0 feeds everything at once, otherwise sizes in
/// `1..=4 * seed` from a small xorshift sequence.
struct Chunks {
    seed: u8,
    state: u32,
}

impl Chunks {
    fn next_len(&mut self) -> usize {
        if self.seed == 0 {
            return usize::MAX;
        }
        self.state ^= self.state << 13;
        self.state ^= self.state >> 17;
        self.state ^= self.state << 5;
        1 + (self.state as usize) % (4 * usize::from(self.seed))
    }
}

/// Walks every part of a decoded record and checks that it re-encodes to a
/// stream that decodes to an equal record.
fn check_record(record: &Record<'_>) {
    match record {
        Record::Pages(batch) => {
            let mut normal = 0;
            let mut entries = 0;
            for (entry, page) in batch.pages() {
                entries += 1;
                assert!(entry.index < 1 << 56);
                if let Some(page) = page {
                    assert_eq!(page.len(), batch.page_size());
                    normal += 1;
                }
            }
            assert_eq!(entries, batch.len());
            assert_eq!(normal * batch.page_size(), batch.data().len());
        }
        Record::RamBlocks(blocks) => {
            let mut n = 0;
            for b in blocks.iter() {
                assert!(b.page_size.is_power_of_two() && b.length % u64::from(b.page_size) == 0);
                n += 1;
            }
            assert_eq!(n, blocks.len());
        }
        Record::Command(Command::PostcopyRamDiscard { ranges, .. }) => {
            assert_eq!(ranges.iter().filter(|r| r.count > 0).count(), ranges.len());
            assert!(!ranges.is_empty());
        }
        Record::Package(package) => {
            for inner in package.records() {
                let inner = inner.expect("a decoded package was validated");
                assert!(!matches!(inner, Record::Package(_) | Record::EndOfStream));
                check_record(&inner);
            }
        }
        Record::Digest(sums) => {
            assert_eq!(sums.iter().count(), sums.len());
            assert!(sums.len() <= usize::from(u16::MAX));
        }
        Record::DigestRanges(answer) => {
            let range = answer.range();
            assert!(range.count > 0 && range.first.checked_add(range.count).is_some());
            assert_eq!(
                answer.sums().count(),
                livemig_core::digest::locate_parts(range).count()
            );
        }
        Record::ZeroRun(run) => {
            assert!((9..=30).contains(&run.page_shift));
            let range = run.range;
            assert!(range.count > 0 && range.first.checked_add(range.count).is_some());
        }
        Record::Command(_) | Record::Device(_) | Record::EndOfStream => {}
    }

    let mut encoded = vec![0; STREAM_HEADER_LEN + record.encoded_len()];
    let header = encode_stream_header(&mut encoded).expect("stream header");
    let written = record
        .encode(&mut encoded[header..])
        .expect("a decoded record re-encodes");
    assert_eq!(written, record.encoded_len());
    let mut scratch = vec![0; record.encoded_len()];
    let mut again = StreamDecoder::new(&mut scratch);
    let decoded = again.decode(&encoded).expect("a re-encoded record decodes");
    assert_eq!(decoded.consumed, encoded.len());
    assert_eq!(decoded.record.as_ref(), Some(record));
}

/// Whether `data` (control byte, then a stream) decodes as a complete,
/// valid stream.
pub fn stream_accepts(data: &[u8]) -> bool {
    matches!(drive_stream(data), Some(Ok(_)))
}

/// Valid streams, one per chunking seed class, for mutation-based drivers.
pub fn stream_corpus() -> Vec<Vec<u8>> {
    [0u8, 1, 7, 64, 200].into_iter().map(valid_stream).collect()
}

fn record_bytes(r: Record<'_>) -> Vec<u8> {
    let mut out = vec![0; r.encoded_len()];
    r.encode(&mut out).unwrap();
    out
}

/// A valid stream exercising every record kind and the Commit that may
/// follow the end, with its chunking seed.
fn valid_stream(seed: u8) -> Vec<u8> {
    let id = BlockId::new("dev").unwrap();
    let device = record_bytes(Record::Device(DeviceState {
        id,
        instance: 1,
        version: 2,
        data: &[9; 40],
    }));
    let entries = [
        PageEntry {
            index: 3,
            kind: PageKind::Normal,
        },
        PageEntry {
            index: 4,
            kind: PageKind::Zero,
        },
    ];
    let page = [0x5a; 512];
    let batch = PageBatch::new(0, 9, BatchFlags::END_OF_ITERATION, &entries, &page).unwrap();
    let mut s = vec![seed, 0, 0, 0, 0, 0, 0, 0, 0];
    encode_stream_header(&mut s[1..]).unwrap();
    s.extend(record_bytes(Record::Command(Command::Ping(7))));
    s.extend(record_bytes(Record::Command(Command::DigestKey(0x5eed))));
    s.extend(record_bytes(Record::Pages(batch)));
    s.extend(record_bytes(Record::ZeroRun(ZeroRun {
        block: 0,
        page_shift: 9,
        range: PageRange {
            first: 8,
            count: 4096,
        },
    })));
    s.extend(record_bytes(Record::Package(
        Package::from_encoded(&device).unwrap(),
    )));
    s.extend(record_bytes(Record::Digest(BlockSums::from_slice(&[
        1,
        0,
        u64::MAX,
    ]))));
    s.extend(record_bytes(Record::EndOfStream));
    // A locating destination's answer, allowed after the end.
    let range = PageRange {
        first: 2,
        count: 70,
    };
    s.extend(record_bytes(Record::DigestRanges(RangeSums::from_slice(
        0, range, &[7; 35],
    ))));
    s.extend(record_bytes(Record::Command(Command::Commit)));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_stream_under_every_seed() {
        for seed in 0..=255 {
            assert_eq!(
                drive_stream(&valid_stream(seed)),
                Some(Ok(9)),
                "seed {seed}"
            );
        }
    }

    #[test]
    fn mutated_streams() {
        // Deterministic bit flips and cuts of a valid stream, and pure noise.
        let base = valid_stream(3);
        let mut x = 0x9e37_79b9u32;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as usize
        };
        for _ in 0..2000 {
            let mut s = base.clone();
            for _ in 0..next() % 4 {
                let i = next() % s.len();
                s[i] ^= 1 << (next() % 8);
            }
            s.truncate(next() % (s.len() + 1));
            stream(&s);
            let noise: Vec<u8> = (0..next() % 64).map(|_| next() as u8).collect();
            stream(&noise);
        }
    }
}
