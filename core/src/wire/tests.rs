//! Tests of the whole codec: round trips under every chunking, each malformed
//! input's specific error, and a stable fuzz property.

use std::string::String;
use std::vec;
use std::vec::Vec;

use proptest::prelude::*;

use super::*;

/// An owned description of a record, from which a borrowed [`Record`] is built.
#[derive(Clone, Debug)]
enum Model {
    Command(CommandModel),
    Blocks(Vec<(String, u64, u32)>),
    Pages {
        block: u16,
        shift: u8,
        end: bool,
        entries: Vec<PageEntry>,
        data: Vec<u8>,
    },
    Device {
        id: String,
        instance: u32,
        version: u32,
        data: Vec<u8>,
    },
    Package(Vec<Model>),
    End,
}

#[derive(Clone, Debug)]
enum CommandModel {
    Simple(u16),
    Ping(u32),
    Advise(u64, u64),
    Discard(String, Vec<PageRange>),
    RecvBitmap(String),
}

/// Builds the record `m` describes and hands it to `f`.
fn with_record<R>(m: &Model, f: impl FnOnce(Record<'_>) -> R) -> R {
    match m {
        Model::Command(c) => {
            let cmd = match c {
                CommandModel::Simple(code) => match *code {
                    command_code::OPEN_RETURN_PATH => Command::OpenReturnPath,
                    command_code::POSTCOPY_LISTEN => Command::PostcopyListen,
                    command_code::POSTCOPY_RUN => Command::PostcopyRun,
                    command_code::POSTCOPY_RESUME => Command::PostcopyResume,
                    command_code::COMMIT => Command::Commit,
                    _ => Command::SwitchoverStart,
                },
                CommandModel::Ping(v) => Command::Ping(*v),
                CommandModel::Advise(h, t) => Command::PostcopyAdvise {
                    host_page_size: *h,
                    target_page_size: *t,
                },
                CommandModel::Discard(id, ranges) => Command::PostcopyRamDiscard {
                    block: BlockId::new(id).unwrap(),
                    ranges: DiscardRanges::from_slice(ranges),
                },
                CommandModel::RecvBitmap(id) => Command::RecvBitmap {
                    block: BlockId::new(id).unwrap(),
                },
            };
            f(Record::Command(cmd))
        }
        Model::Blocks(blocks) => {
            let infos: Vec<BlockInfo<'_>> = blocks
                .iter()
                .map(|(id, len, ps)| BlockInfo::new(BlockId::new(id).unwrap(), *len, *ps).unwrap())
                .collect();
            f(Record::RamBlocks(BlockList::from_slice(&infos)))
        }
        Model::Pages {
            block,
            shift,
            end,
            entries,
            data,
        } => {
            let flags = if *end {
                BatchFlags::END_OF_ITERATION
            } else {
                BatchFlags::empty()
            };
            f(Record::Pages(
                PageBatch::new(*block, *shift, flags, entries, data).unwrap(),
            ))
        }
        Model::Device {
            id,
            instance,
            version,
            data,
        } => f(Record::Device(DeviceState {
            id: BlockId::new(id).unwrap(),
            instance: *instance,
            version: *version,
            data,
        })),
        Model::Package(inner) => {
            let mut body = Vec::new();
            for m in inner {
                body.extend_from_slice(&encode_model(m));
            }
            f(Record::Package(Package::from_encoded(&body).unwrap()))
        }
        Model::End => f(Record::EndOfStream),
    }
}

/// Encodes one record, checking that `encoded_len` is what `encode` writes.
fn encode_record(r: &Record<'_>) -> Vec<u8> {
    let mut out = vec![0; r.encoded_len()];
    let n = r.encode(&mut out).unwrap();
    assert_eq!(n, r.encoded_len());
    out
}

fn encode_model(m: &Model) -> Vec<u8> {
    with_record(m, |r| encode_record(&r))
}

/// Stream header + the records.
fn encode_stream(models: &[Model]) -> Vec<u8> {
    let mut out = vec![0; STREAM_HEADER_LEN];
    assert_eq!(encode_stream_header(&mut out), Ok(STREAM_HEADER_LEN));
    for m in models {
        out.extend_from_slice(&encode_model(m));
    }
    out
}

/// Feeds `bytes` in chunks of the sizes in `chunks` (cycled) and returns
/// each decoded record re-encoded, or the first error. Checks the decoder's
/// contract along the way: `consumed` within the input, all input taken when
/// no record is returned, the error sticky.
fn decode_chunked(
    bytes: &[u8],
    chunks: &[usize],
    scratch_len: usize,
) -> Result<Vec<Vec<u8>>, DecodeError> {
    let mut scratch = vec![0; scratch_len];
    let mut dec = StreamDecoder::new(&mut scratch);
    let mut out = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    while pos < bytes.len() {
        let size = chunks[i % chunks.len()].max(1);
        i += 1;
        let end = bytes.len().min(pos.saturating_add(size));
        let mut chunk = &bytes[pos..end];
        pos = end;
        loop {
            match dec.decode(chunk) {
                Ok(d) => {
                    assert!(d.consumed <= chunk.len());
                    let Some(r) = d.record else {
                        assert_eq!(d.consumed, chunk.len());
                        break;
                    };
                    out.push(encode_record(&r));
                    chunk = &chunk[d.consumed..];
                    if chunk.is_empty() {
                        break;
                    }
                }
                Err(e) => {
                    assert_eq!(dec.decode(b"x").unwrap_err(), e, "errors are sticky");
                    assert_eq!(dec.finish(), Err(e));
                    return Err(e);
                }
            }
        }
    }
    dec.finish()?;
    Ok(out)
}

fn id_strategy() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z0-9.:/]{1,20}", "\\PC{1,8}", "[x]{255}"]
        .prop_filter("1..=255 bytes", |s| (1..=255).contains(&s.len()))
}

fn pow2(max_shift: u32) -> impl Strategy<Value = u64> {
    (0..=max_shift).prop_map(|s| 1u64 << s)
}

fn command_strategy() -> impl Strategy<Value = CommandModel> {
    prop_oneof![
        prop::sample::select(vec![1u16, 4, 5, 8, 9, 10]).prop_map(CommandModel::Simple),
        any::<u32>().prop_map(CommandModel::Ping),
        (pow2(63), pow2(63)).prop_map(|(h, t)| CommandModel::Advise(h, t)),
        (
            id_strategy(),
            prop::collection::vec((any::<u64>(), 1..u64::MAX), 1..6)
        )
            .prop_map(|(id, r)| {
                let ranges = r
                    .into_iter()
                    .map(|(first, count)| PageRange {
                        first: first % (u64::MAX - count),
                        count,
                    })
                    .collect();
                CommandModel::Discard(id, ranges)
            }),
        id_strategy().prop_map(CommandModel::RecvBitmap),
    ]
}

fn pages_strategy() -> impl Strategy<Value = Model> {
    (
        any::<u16>(),
        9u8..=12,
        any::<bool>(),
        prop::collection::vec((0..1u64 << 56, any::<bool>()), 0..8),
        any::<u8>(),
    )
        .prop_map(|(block, shift, end, raw, seed)| {
            let entries: Vec<PageEntry> = raw
                .into_iter()
                .map(|(index, zero)| PageEntry {
                    index,
                    kind: if zero {
                        PageKind::Zero
                    } else {
                        PageKind::Normal
                    },
                })
                .collect();
            let normal = entries
                .iter()
                .filter(|e| e.kind == PageKind::Normal)
                .count();
            let data = (0..normal << shift)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect();
            Model::Pages {
                block,
                shift,
                end,
                entries,
                data,
            }
        })
}

fn leaf_strategy() -> impl Strategy<Value = Model> {
    prop_oneof![
        command_strategy().prop_map(Model::Command),
        prop::collection::vec((id_strategy(), 0..1u64 << 20, 9u32..=30), 0..5).prop_map(|b| {
            Model::Blocks(
                b.into_iter()
                    .map(|(id, pages, shift)| (id, pages << shift, 1u32 << shift))
                    .collect(),
            )
        }),
        pages_strategy(),
        (
            id_strategy(),
            any::<u32>(),
            any::<u32>(),
            prop::collection::vec(any::<u8>(), 0..300)
        )
            .prop_map(|(id, instance, version, data)| Model::Device {
                id,
                instance,
                version,
                data
            }),
    ]
}

fn record_strategy() -> impl Strategy<Value = Model> {
    prop_oneof![
        4 => leaf_strategy(),
        1 => prop::collection::vec(leaf_strategy(), 0..4).prop_map(Model::Package),
    ]
}

const SCRATCH: usize = 64 * 1024;

proptest! {
    #[test]
    fn record_round_trips(m in record_strategy(), chunks in prop::collection::vec(1usize..64, 1..8)) {
        let expected = encode_model(&m);
        let stream = encode_stream(&[m.clone(), Model::End]);
        let want = vec![expected.clone(), encode_model(&Model::End)];
        prop_assert_eq!(&decode_chunked(&stream, &[usize::MAX], SCRATCH).unwrap(), &want);
        prop_assert_eq!(&decode_chunked(&stream, &[1], SCRATCH).unwrap(), &want);
        prop_assert_eq!(&decode_chunked(&stream, &chunks, SCRATCH).unwrap(), &want);

        // Zero-copy path: the decoded record equals the one encoded.
        let mut scratch = vec![0u8; SCRATCH];
        let mut dec = StreamDecoder::new(&mut scratch);
        let d = dec.decode(&stream).unwrap();
        prop_assert_eq!(d.consumed, STREAM_HEADER_LEN + expected.len());
        let got = d.record.unwrap();
        with_record(&m, |r| assert_eq!(got, r));
    }

    #[test]
    fn stream_round_trips(models in prop::collection::vec(record_strategy(), 0..6), chunks in prop::collection::vec(1usize..200, 1..8)) {
        let mut all = models.clone();
        all.push(Model::End);
        let stream = encode_stream(&all);
        let want: Vec<Vec<u8>> = all.iter().map(encode_model).collect();
        prop_assert_eq!(&decode_chunked(&stream, &[usize::MAX], SCRATCH).unwrap(), &want);
        prop_assert_eq!(&decode_chunked(&stream, &[1], SCRATCH).unwrap(), &want);
        prop_assert_eq!(&decode_chunked(&stream, &chunks, SCRATCH).unwrap(), &want);
    }

    #[test]
    fn batch_pages_match_entries(m in pages_strategy()) {
        let Model::Pages { entries, data, shift, .. } = &m else { unreachable!() };
        let bytes = encode_model(&m);
        let mut stream = encode_stream(&[]);
        stream.extend_from_slice(&bytes);
        let mut scratch = vec![0u8; SCRATCH];
        let mut dec = StreamDecoder::new(&mut scratch);
        let Some(Record::Pages(batch)) = dec.decode(&stream).unwrap().record else { panic!("not a batch") };
        let mut data = data.chunks(1 << shift);
        prop_assert_eq!(batch.len(), entries.len());
        for ((entry, page), want) in batch.pages().zip(entries) {
            prop_assert_eq!(entry, *want);
            match entry.kind {
                PageKind::Zero => prop_assert!(page.is_none()),
                PageKind::Normal => prop_assert_eq!(page, data.next()),
            }
        }
        // The header-only encoder writes exactly the record's prefix.
        let flags = batch.flags();
        let mut head = vec![0; 8 + 8 + 8 * entries.len()];
        let n = encode_page_batch_header(&mut head, batch.block(), *shift, flags, entries).unwrap();
        prop_assert_eq!(&head[..n], &bytes[..n]);
        prop_assert_eq!(n + batch.data().len(), bytes.len());
    }

    /// Arbitrary bytes, behind a valid header or not, in random chunks:
    /// never a panic, and the decoder's contract holds.
    #[test]
    fn arbitrary_bytes_never_panic(
        header in any::<bool>(),
        body in prop::collection::vec(any::<u8>(), 0..600),
        chunks in prop::collection::vec(1usize..50, 1..5),
        scratch_len in 0usize..1024,
    ) {
        let mut bytes = if header { encode_stream(&[]) } else { Vec::new() };
        bytes.extend_from_slice(&body);
        let _ = decode_chunked(&bytes, &chunks, scratch_len);
    }

    /// Valid streams with bit flips and truncations: never a panic; a
    /// truncated stream is never accepted.
    #[test]
    fn corrupted_streams_never_panic(
        models in prop::collection::vec(record_strategy(), 1..4),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 0u8..8), 0..4),
        cut in any::<prop::sample::Index>(),
        chunks in prop::collection::vec(1usize..100, 1..5),
    ) {
        let mut all = models;
        all.push(Model::End);
        let mut stream = encode_stream(&all);
        for (at, bit) in flips {
            let i = at.index(stream.len());
            stream[i] ^= 1 << bit;
        }
        let _ = decode_chunked(&stream, &chunks, SCRATCH);
        let cut = cut.index(stream.len());
        prop_assert!(decode_chunked(&stream[..cut], &chunks, SCRATCH).is_err());
    }
}

/// Decodes a stream that is the stream header followed by `records`, whole.
fn decode_bytes(records: &[u8]) -> Result<Vec<Vec<u8>>, DecodeError> {
    let mut stream = encode_stream(&[]);
    stream.extend_from_slice(records);
    decode_chunked(&stream, &[usize::MAX], SCRATCH)
}

/// The first error a record body of `kind` produces.
fn body_error(kind: u16, body: &[u8]) -> DecodeError {
    let mut rec = Vec::new();
    rec.extend_from_slice(&kind.to_be_bytes());
    rec.extend_from_slice(&[0, 0]);
    rec.extend_from_slice(&(body.len() as u32).to_be_bytes());
    rec.extend_from_slice(body);
    decode_bytes(&rec).unwrap_err()
}

#[test]
fn bad_magic_reported_after_four_bytes() {
    let mut scratch = [0; 16];
    let mut dec = StreamDecoder::new(&mut scratch);
    assert_eq!(dec.decode(b"HTT").unwrap().consumed, 3);
    assert_eq!(
        dec.decode(b"P").unwrap_err(),
        DecodeError::BadMagic { found: *b"HTTP" }
    );
    assert_eq!(dec.finish(), Err(DecodeError::BadMagic { found: *b"HTTP" }));
}

#[test]
fn unsupported_version() {
    let e = decode_chunked(b"LMIG\0\0\0\x02", &[1], 16).unwrap_err();
    assert_eq!(
        e,
        DecodeError::UnsupportedVersion {
            found: 2,
            supported: 1
        }
    );
}

#[test]
fn record_header_errors() {
    for kind in [0u16, 10, 0xffff] {
        assert_eq!(body_error(kind, &[]), DecodeError::UnknownRecord { kind });
    }
    let flagged = [0, 1, 0, 1, 0, 0, 0, 2, 0, 1];
    assert_eq!(
        decode_bytes(&flagged).unwrap_err(),
        DecodeError::ReservedFlags {
            what: "record flags",
            value: 1
        }
    );
    assert_eq!(
        body_error(kind::END_OF_STREAM, &[0]),
        DecodeError::BadLength {
            what: "EndOfStream body",
            expected: 0,
            found: 1
        }
    );
}

#[test]
fn digest_errors() {
    let d = kind::DIGEST;
    assert_eq!(
        body_error(d, &[0]),
        DecodeError::Truncated {
            what: "digest block count"
        }
    );
    assert_eq!(
        body_error(d, &[0, 1, 0, 0, 0]),
        DecodeError::BadLength {
            what: "digest body",
            expected: 10,
            found: 5
        }
    );
    let c = kind::COMMAND;
    assert_eq!(
        body_error(c, &[0, 13, 0]),
        DecodeError::BadLength {
            what: "command body",
            expected: 10,
            found: 3
        }
    );
    let mut out = [0u8; 64];
    assert_eq!(
        encode_digest(&mut out, 70_000, core::iter::empty()),
        Err(EncodeError::TooManyBlocks { count: 70_000 })
    );
}

#[test]
fn command_errors() {
    let c = kind::COMMAND;
    assert_eq!(
        body_error(c, &[0, 15]),
        DecodeError::UnknownCommand { code: 15 }
    );
    // PostcopyPreempt: exactly a migration id.
    assert_eq!(
        body_error(c, &[0, 14, 0, 0, 0, 0, 0, 0, 0]),
        DecodeError::BadLength {
            what: "command body",
            expected: 10,
            found: 9
        }
    );
    // MultifdSetup: a channel count of 0 or above 255, a short body.
    assert_eq!(
        body_error(c, &[0, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
        DecodeError::BadChannel { index: 0, count: 0 }
    );
    assert_eq!(
        body_error(c, &[0, 11, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
        DecodeError::BadChannel {
            index: 0,
            count: 256
        }
    );
    assert_eq!(
        body_error(c, &[0, 12, 0, 0, 0]),
        DecodeError::BadLength {
            what: "command body",
            expected: 6,
            found: 5
        }
    );
    assert_eq!(
        body_error(c, &[0, 0]),
        DecodeError::UnknownCommand { code: 0 }
    );
    assert_eq!(
        body_error(c, &[0]),
        DecodeError::Truncated {
            what: "command code"
        }
    );
    let bad = |expected, found| DecodeError::BadLength {
        what: "command body",
        expected,
        found,
    };
    for code in [1u8, 4, 5, 8, 9] {
        assert_eq!(body_error(c, &[0, code, 0]), bad(2, 3));
    }
    assert_eq!(body_error(c, &[0, 2, 1, 2, 3]), bad(6, 5));
    assert_eq!(body_error(c, &[0, 2, 1, 2, 3, 4, 5]), bad(6, 7));
    assert_eq!(body_error(c, &[0, 3, 0, 0, 0, 0, 0, 0, 16, 0]), bad(18, 10));
    let mut advise = vec![0, 3];
    advise.extend_from_slice(&4096u64.to_be_bytes());
    advise.extend_from_slice(&3000u64.to_be_bytes());
    assert_eq!(
        body_error(c, &advise),
        DecodeError::BadPageSize {
            what: "target page size",
            value: 3000
        }
    );
    // RecvBitmap: id truncated, empty, not UTF-8, followed by junk.
    assert_eq!(
        body_error(c, &[0, 7, 4, b'a']),
        DecodeError::Truncated {
            what: "bitmap block"
        }
    );
    assert_eq!(
        body_error(c, &[0, 7, 0]),
        DecodeError::EmptyId {
            what: "bitmap block"
        }
    );
    assert_eq!(
        body_error(c, &[0, 7, 1, 0xff]),
        DecodeError::IdNotUtf8 {
            what: "bitmap block"
        }
    );
    assert_eq!(body_error(c, &[0, 7, 1, b'a', 0]), bad(4, 5));
}

#[test]
fn discard_errors() {
    let c = kind::COMMAND;
    let discard = |ranges: &[(u64, u64)], extra: &[u8]| {
        let mut b = vec![0, 6, 1, b'm'];
        for (first, count) in ranges {
            b.extend_from_slice(&first.to_be_bytes());
            b.extend_from_slice(&count.to_be_bytes());
        }
        b.extend_from_slice(extra);
        body_error(c, &b)
    };
    assert_eq!(discard(&[], &[]), DecodeError::DiscardListLength { len: 0 });
    assert_eq!(
        discard(&[(1, 1)], &[0]),
        DecodeError::DiscardListLength { len: 17 }
    );
    assert_eq!(
        discard(&[(1, 1), (5, 0)], &[]),
        DecodeError::BadDiscardRange { first: 5, count: 0 }
    );
    assert_eq!(
        discard(&[(u64::MAX, 1)], &[]),
        DecodeError::BadDiscardRange {
            first: u64::MAX,
            count: 1
        }
    );
}

#[test]
fn ram_block_errors() {
    let r = kind::RAM_BLOCKS;
    let block = |len: u64, ps: u32| {
        let mut b = vec![0, 1, 3, b'r', b'a', b'm'];
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&ps.to_be_bytes());
        b
    };
    assert_eq!(
        body_error(r, &[0]),
        DecodeError::Truncated {
            what: "RAM block count"
        }
    );
    for ps in [256u32, 3000, 1 << 31, 0] {
        assert_eq!(
            body_error(r, &block(0, ps)),
            DecodeError::BadPageSize {
                what: "RAM block page size",
                value: u64::from(ps)
            }
        );
    }
    assert_eq!(
        body_error(r, &block(4097, 4096)),
        DecodeError::BlockLengthNotMultiple {
            length: 4097,
            page_size: 4096
        }
    );
    let mut trailing = block(8192, 4096);
    trailing.push(0);
    assert_eq!(
        body_error(r, &trailing),
        DecodeError::TrailingData {
            what: "after the last RAM block",
            len: 1
        }
    );
    let mut short = block(8192, 4096);
    short.pop();
    assert_eq!(
        body_error(r, &short),
        DecodeError::Truncated {
            what: "RAM block length and page size"
        }
    );
    let long_id = [0, 1, 200, b'x'];
    assert_eq!(
        body_error(r, &long_id),
        DecodeError::Truncated { what: "RAM block" }
    );
}

/// A Pages body: batch header, raw entries, `data_len` bytes of data.
fn batch(shift: u8, flags: u8, count: u32, entries: &[u64], data_len: usize) -> Vec<u8> {
    let mut b = vec![0, 0, shift, flags];
    b.extend_from_slice(&count.to_be_bytes());
    for e in entries {
        b.extend_from_slice(&e.to_be_bytes());
    }
    b.resize(b.len() + data_len, 0xaa);
    b
}

#[test]
fn page_batch_errors() {
    let p = kind::PAGES;
    for shift in [0u8, 8, 31, 255] {
        assert_eq!(
            body_error(p, &batch(shift, 0, 0, &[], 0)),
            DecodeError::BadPageShift { shift }
        );
    }
    assert_eq!(
        body_error(p, &batch(12, 4, 0, &[], 0)),
        DecodeError::ReservedFlags {
            what: "page batch flags",
            value: 4
        }
    );
    assert_eq!(
        body_error(p, &batch(12, 0, 1025, &[], 0)),
        DecodeError::TooManyPages { count: 1025 }
    );
    assert_eq!(
        body_error(p, &batch(12, 0, 2, &[1], 0)),
        DecodeError::Truncated {
            what: "page entries"
        }
    );
    assert_eq!(
        body_error(p, &batch(12, 0, 1, &[1 << 56], 4096)),
        DecodeError::ReservedFlags {
            what: "page entry",
            value: 1 << 56
        }
    );
    let mismatch = |found| DecodeError::BadLength {
        what: "page batch body",
        expected: 16 + 4096,
        found,
    };
    assert_eq!(
        body_error(p, &batch(12, 0, 1, &[7], 4095)),
        mismatch(16 + 4095)
    );
    assert_eq!(
        body_error(p, &batch(12, 0, 1, &[7], 4097)),
        mismatch(16 + 4097)
    );
    // A zero page carries no data, so any data is a mismatch.
    assert_eq!(
        body_error(p, &batch(12, 0, 1, &[1 << 63], 1)),
        DecodeError::BadLength {
            what: "page batch body",
            expected: 16,
            found: 17
        }
    );
    // With TERMS a normal page takes 8 more bytes (its term), a zero page
    // none: a batch without them is short by as much.
    let terms = BatchFlags::TERMS.bits();
    assert_eq!(
        body_error(p, &batch(12, terms, 1, &[7], 4096)),
        DecodeError::BadLength {
            what: "page batch body",
            expected: 16 + 8 + 4096,
            found: 16 + 4096
        }
    );
    assert_eq!(
        body_error(p, &batch(12, terms, 1, &[1 << 63], 8)),
        DecodeError::BadLength {
            what: "page batch body",
            expected: 16,
            found: 24
        }
    );
    assert_eq!(
        body_error(p, &[0, 0, 12]),
        DecodeError::Truncated {
            what: "page batch header"
        }
    );
}

#[test]
fn page_terms_must_match_the_normal_pages() {
    let entries = [
        PageEntry {
            index: 4,
            kind: PageKind::Normal,
        },
        PageEntry {
            index: 5,
            kind: PageKind::Zero,
        },
    ];
    let data = [3u8; 4096];
    let batch = PageBatch::new(0, 12, BatchFlags::empty(), &entries, &data).unwrap();
    assert_eq!(
        batch.with_terms(&[1, 2]).unwrap_err(),
        EncodeError::TermCount {
            expected: 1,
            found: 2
        }
    );
    assert_eq!(
        PageBatch::new(0, 12, BatchFlags::TERMS, &entries, &data).unwrap_err(),
        EncodeError::TermCount {
            expected: 1,
            found: 0
        },
        "TERMS without terms"
    );
    let mut out = [0u8; 64];
    assert_eq!(
        encode_page_batch_header_with_terms(
            &mut out,
            0,
            12,
            BatchFlags::TERMS,
            &entries,
            core::iter::empty()
        ),
        Err(EncodeError::TermCount {
            expected: 1,
            found: 0
        })
    );
    let with = batch.with_terms(&[9]).unwrap();
    assert!(with.terms().eq([9]));
    assert_ne!(with, batch, "the terms are part of the batch");
}

#[test]
fn device_errors() {
    let d = kind::DEVICE;
    assert_eq!(
        body_error(d, &[]),
        DecodeError::Truncated { what: "device" }
    );
    assert_eq!(
        body_error(d, &[10, b'a', b'b', b'c']),
        DecodeError::Truncated { what: "device" }
    );
    assert_eq!(
        body_error(d, &[0, 0, 0, 0, 0, 0, 0, 0, 0]),
        DecodeError::EmptyId { what: "device" }
    );
    assert_eq!(
        body_error(d, &[1, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0]),
        DecodeError::IdNotUtf8 { what: "device" }
    );
    assert_eq!(
        body_error(d, &[1, b'a', 0, 0, 0]),
        DecodeError::Truncated {
            what: "device instance and version"
        }
    );
}

#[test]
fn package_errors() {
    let pk = kind::PACKAGE;
    let end = encode_model(&Model::End);
    assert_eq!(body_error(pk, &end), DecodeError::EndOfStreamInPackage);
    let inner = encode_model(&Model::Package(vec![]));
    assert_eq!(body_error(pk, &inner), DecodeError::NestedPackage);
    let mut ping = encode_model(&Model::Command(CommandModel::Ping(5)));
    ping.pop();
    assert_eq!(
        body_error(pk, &ping),
        DecodeError::Truncated {
            what: "packaged record body"
        }
    );
    assert_eq!(
        body_error(pk, &ping[..5]),
        DecodeError::Truncated {
            what: "packaged record header"
        }
    );
    // An inner record's own errors surface too.
    assert_eq!(
        body_error(pk, &[0, 1, 0, 0, 0, 0, 0, 2, 0, 99]),
        DecodeError::UnknownCommand { code: 99 }
    );
    assert_eq!(
        Package::from_encoded(&end).unwrap_err(),
        DecodeError::EndOfStreamInPackage
    );
}

#[test]
fn oversized_decided_from_header() {
    // The same error whether the body is present, absent or dribbling in.
    let limit = 100;
    let mut rec = vec![0, 4, 0, 0, 0, 0, 0, 101];
    let want = DecodeError::Oversized { len: 101, limit };
    let with_header = |rec: &[u8]| {
        let mut s = encode_stream(&[]);
        s.extend_from_slice(rec);
        s
    };
    assert_eq!(
        decode_chunked(&with_header(&rec), &[usize::MAX], limit),
        Err(want)
    );
    rec.resize(8 + 101, 1);
    assert_eq!(
        decode_chunked(&with_header(&rec), &[usize::MAX], limit),
        Err(want)
    );
    assert_eq!(decode_chunked(&with_header(&rec), &[1], limit), Err(want));
    // The limit never exceeds MAX_RECORD_BODY, whatever the scratch.
    let huge = (MAX_RECORD_BODY as u32 + 1).to_be_bytes();
    let rec = [&[0u8, 4, 0, 0][..], &huge].concat();
    assert_eq!(
        decode_chunked(&with_header(&rec), &[usize::MAX], MAX_RECORD_BODY + 10),
        Err(DecodeError::Oversized {
            len: MAX_RECORD_BODY + 1,
            limit: MAX_RECORD_BODY
        })
    );
    // A body exactly at the limit is fine when split.
    let m = Model::Device {
        id: "d".into(),
        instance: 0,
        version: 0,
        data: vec![7; limit - 10],
    };
    let s = encode_stream(&[m.clone(), Model::End]);
    assert_eq!(
        decode_chunked(&s, &[3], limit).unwrap()[0],
        encode_model(&m)
    );
}

#[test]
fn trailing_data_after_end() {
    let mut s = encode_stream(&[Model::End]);
    s.push(0xff);
    assert_eq!(
        decode_chunked(&s, &[usize::MAX], 16),
        Err(DecodeError::TrailingData {
            what: "after EndOfStream",
            len: 1
        })
    );
    assert_eq!(
        decode_chunked(&s, &[1], 16),
        Err(DecodeError::TrailingData {
            what: "after EndOfStream",
            len: 1
        })
    );
}

/// The end-of-migration handshake: one Commit may follow EndOfStream and
/// nothing may follow the Commit, however the bytes are split.
#[test]
fn one_commit_may_follow_the_end_and_nothing_after_it() {
    let commit = Record::Command(Command::Commit);
    assert_eq!(encode_record(&commit), super::decoder::COMMIT_RECORD);
    let mut s = encode_stream(&[Model::End]);
    s.extend_from_slice(&encode_record(&commit));
    for chunk in [1, 3, 9, usize::MAX] {
        let records = decode_chunked(&s, &[chunk], 16).unwrap();
        assert_eq!(records.last(), Some(&encode_record(&commit)));
        let mut more = s.clone();
        more.push(0);
        assert_eq!(
            decode_chunked(&more, &[chunk], 16),
            Err(DecodeError::TrailingData {
                what: "after Commit",
                len: 1
            }),
            "chunk {chunk}"
        );
    }
    // Any other record after EndOfStream is refused at its first differing
    // byte: here a Ping, whose code differs in the last byte of the body.
    let mut ping = encode_stream(&[Model::End]);
    ping.extend_from_slice(&encode_record(&Record::Command(Command::Ping(1))));
    let err = decode_chunked(&ping, &[usize::MAX], 16).unwrap_err();
    assert!(matches!(
        err,
        DecodeError::TrailingData {
            what: "after EndOfStream",
            ..
        }
    ));
    // A second Commit, or one cut short at the close, is not a Commit.
    let mut twice = s.clone();
    twice.extend_from_slice(&encode_record(&commit));
    assert_eq!(
        decode_chunked(&twice, &[4], 16),
        // The chunk that ends the first Commit carries two bytes of the
        // second.
        Err(DecodeError::TrailingData {
            what: "after Commit",
            len: 2
        })
    );
    let end = s.len() - 10;
    assert_eq!(
        decode_chunked(&s[..end + 5], &[1], 16),
        Err(DecodeError::UnexpectedEof {
            at: EofAt::RecordHeader { have: 5 }
        })
    );
    assert_eq!(
        decode_chunked(&s[..end + 9], &[usize::MAX], 16),
        Err(DecodeError::UnexpectedEof {
            at: EofAt::Body {
                kind: kind::COMMAND,
                have: 1,
                len: 2
            }
        })
    );
}

/// A destination locating a mismatching page asks for range sums after
/// the end of the stream: DigestRanges records may follow EndOfStream (any
/// number, then the Commit or nothing), however the bytes are split; any
/// other record there is still refused.
#[test]
fn digest_ranges_may_follow_the_end() {
    let range = PageRange {
        first: 64,
        count: 130,
    };
    // 130 pages in parts of 3: 44 sums.
    let sums: Vec<u64> = (0..44).collect();
    let answer = Record::DigestRanges(RangeSums::from_slice(0, range, &sums));
    let mut s = encode_stream(&[Model::End]);
    s.extend_from_slice(&encode_record(&answer));
    s.extend_from_slice(&encode_record(&answer));
    for chunk in [1, 2, 7, usize::MAX] {
        let records = decode_chunked(&s, &[chunk], 512).unwrap();
        assert_eq!(records.len(), 3, "chunk {chunk}");
        assert_eq!(records[2], encode_record(&answer));
        let mut then_commit = s.clone();
        then_commit.extend_from_slice(&encode_record(&Record::Command(Command::Commit)));
        assert_eq!(
            decode_chunked(&then_commit, &[chunk], 512).unwrap().len(),
            4
        );
        let mut then_ping = s.clone();
        then_ping.extend_from_slice(&encode_record(&Record::Command(Command::Ping(1))));
        assert!(matches!(
            decode_chunked(&then_ping, &[chunk], 512),
            Err(DecodeError::TrailingData {
                what: "after EndOfStream",
                ..
            })
        ));
    }
    // Cut inside the answer's header.
    let end = s.len() - answer.encoded_len();
    assert_eq!(
        decode_chunked(&s[..end + 5], &[1], 512),
        Err(DecodeError::UnexpectedEof {
            at: EofAt::RecordHeader { have: 5 }
        })
    );
}

#[test]
fn digest_ranges_bodies_are_checked() {
    let d = kind::DIGEST_RANGES;
    let fixed = |first: u64, count: u64| {
        let mut b = vec![0, 1];
        b.extend_from_slice(&first.to_be_bytes());
        b.extend_from_slice(&count.to_be_bytes());
        b
    };
    assert_eq!(
        body_error(d, &fixed(5, 0)),
        DecodeError::BadDigestRange { first: 5, count: 0 }
    );
    assert_eq!(
        body_error(d, &fixed(u64::MAX, 2)),
        DecodeError::BadDigestRange {
            first: u64::MAX,
            count: 2
        }
    );
    // Two pages, two parts: 16 bytes of sums, not 8.
    let mut short = fixed(0, 2);
    short.extend_from_slice(&[0; 8]);
    assert_eq!(
        body_error(d, &short),
        DecodeError::BadLength {
            what: "digest ranges body",
            expected: 34,
            found: 26
        }
    );
    assert!(matches!(
        body_error(d, &[0; 3]),
        DecodeError::Truncated { .. } | DecodeError::BadLength { .. }
    ));
    let range = PageRange { first: 0, count: 0 };
    assert_eq!(
        Record::DigestRanges(RangeSums::from_slice(0, range, &[])).encode(&mut [0; 64]),
        Err(EncodeError::BadDigestRange { first: 0, count: 0 })
    );
}

#[test]
fn zero_run_bodies_are_checked() {
    let z = kind::ZERO_RUN;
    let body = |shift: u8, reserved: u8, first: u64, count: u64| {
        let mut b = vec![0, 1, shift, reserved];
        b.extend_from_slice(&first.to_be_bytes());
        b.extend_from_slice(&count.to_be_bytes());
        b
    };
    assert_eq!(
        body_error(z, &body(12, 0, 5, 0)),
        DecodeError::BadZeroRun { first: 5, count: 0 }
    );
    assert_eq!(
        body_error(z, &body(12, 0, u64::MAX, 2)),
        DecodeError::BadZeroRun {
            first: u64::MAX,
            count: 2
        }
    );
    assert_eq!(
        body_error(z, &body(8, 0, 0, 1)),
        DecodeError::BadPageShift { shift: 8 }
    );
    assert_eq!(
        body_error(z, &body(31, 0, 0, 1)),
        DecodeError::BadPageShift { shift: 31 }
    );
    assert_eq!(
        body_error(z, &body(12, 1, 0, 1)),
        DecodeError::ReservedFlags {
            what: "zero run reserved byte",
            value: 1
        }
    );
    let mut long = body(12, 0, 0, 1);
    long.push(0);
    assert_eq!(
        body_error(z, &long),
        DecodeError::BadLength {
            what: "zero run body",
            expected: 20,
            found: 21
        }
    );
    let run = |page_shift, first, count| {
        Record::ZeroRun(ZeroRun {
            block: 0,
            page_shift,
            range: PageRange { first, count },
        })
        .encode(&mut [0; 64])
    };
    assert_eq!(
        run(12, 0, 0),
        Err(EncodeError::BadZeroRun { first: 0, count: 0 })
    );
    assert_eq!(run(7, 0, 1), Err(EncodeError::BadPageShift { shift: 7 }));
    assert_eq!(run(12, 3, 1), Ok(28));
}

#[test]
fn finish_reports_where_the_stream_was_cut() {
    let eof = |at| Err(DecodeError::UnexpectedEof { at });
    let s = encode_stream(&[Model::Command(CommandModel::Ping(1)), Model::End]);
    assert_eq!(
        decode_chunked(&[], &[1], 16),
        eof(EofAt::StreamHeader { have: 0 })
    );
    assert_eq!(
        decode_chunked(&s[..5], &[1], 16),
        eof(EofAt::StreamHeader { have: 5 })
    );
    assert_eq!(
        decode_chunked(&s[..8], &[1], 16),
        eof(EofAt::BetweenRecords)
    );
    assert_eq!(
        decode_chunked(&s[..11], &[1], 16),
        eof(EofAt::RecordHeader { have: 3 })
    );
    assert_eq!(
        decode_chunked(&s[..18], &[1], 16),
        eof(EofAt::Body {
            kind: kind::COMMAND,
            have: 2,
            len: 6
        })
    );
    assert_eq!(
        decode_chunked(&s[..22], &[usize::MAX], 16),
        eof(EofAt::BetweenRecords)
    );
    assert_eq!(decode_chunked(&s, &[1], 16).map(|r| r.len()), Ok(2));
}

#[test]
fn is_finished_after_end() {
    let s = encode_stream(&[Model::End]);
    let mut scratch = [];
    let mut dec = StreamDecoder::new(&mut scratch);
    let d = dec.decode(&s).unwrap();
    assert_eq!(d.record, Some(Record::EndOfStream));
    assert!(dec.is_finished());
    assert_eq!(dec.decode(&[]).unwrap().consumed, 0);
    assert_eq!(dec.finish(), Ok(()));
}

#[test]
fn encode_errors() {
    let id = BlockId::new("ram").unwrap();
    assert_eq!(
        BlockId::new(&"z".repeat(256)),
        Err(IdError::TooLong { len: 256 })
    );
    assert_eq!(
        BlockInfo::new(id, 4096, 1000),
        Err(EncodeError::BadPageSize {
            what: "RAM block page size",
            value: 1000
        })
    );
    assert_eq!(
        BlockInfo::new(id, 100, 4096),
        Err(EncodeError::BlockLengthNotMultiple {
            length: 100,
            page_size: 4096
        })
    );
    // Public fields can be set to anything: encoding checks again.
    let bad = [BlockInfo {
        id,
        length: 1,
        page_size: 4096,
    }];
    let mut out = [0; 64];
    assert_eq!(
        Record::RamBlocks(BlockList::from_slice(&bad)).encode(&mut out),
        Err(EncodeError::BlockLengthNotMultiple {
            length: 1,
            page_size: 4096
        })
    );
    let ping = Record::Command(Command::Ping(1));
    assert_eq!(
        ping.encode(&mut out[..13]),
        Err(EncodeError::BufferTooSmall {
            needed: 14,
            available: 13
        })
    );
    assert_eq!(
        encode_stream_header(&mut out[..7]),
        Err(EncodeError::BufferTooSmall {
            needed: 8,
            available: 7
        })
    );
    let advise = Command::PostcopyAdvise {
        host_page_size: 4096,
        target_page_size: 0,
    };
    assert_eq!(
        Record::Command(advise).encode(&mut out),
        Err(EncodeError::BadPageSize {
            what: "target page size",
            value: 0
        })
    );
    let no_ranges = Command::PostcopyRamDiscard {
        block: id,
        ranges: DiscardRanges::from_slice(&[]),
    };
    assert_eq!(
        Record::Command(no_ranges).encode(&mut out),
        Err(EncodeError::NoDiscardRanges)
    );
    let empty = [PageRange { first: 3, count: 0 }];
    let empty_range = Command::PostcopyRamDiscard {
        block: id,
        ranges: DiscardRanges::from_slice(&empty),
    };
    assert_eq!(
        Record::Command(empty_range).encode(&mut out),
        Err(EncodeError::BadDiscardRange { first: 3, count: 0 })
    );

    let normal = PageEntry {
        index: 1,
        kind: PageKind::Normal,
    };
    let flags = BatchFlags::empty();
    assert_eq!(
        PageBatch::new(0, 8, flags, &[], &[]).unwrap_err(),
        EncodeError::BadPageShift { shift: 8 }
    );
    assert_eq!(
        PageBatch::new(0, 9, flags, &[normal], &[0; 511]).unwrap_err(),
        EncodeError::DataLength {
            expected: 512,
            found: 511
        }
    );
    let far = PageEntry {
        index: 1 << 56,
        kind: PageKind::Zero,
    };
    assert_eq!(
        PageBatch::new(0, 9, flags, &[far], &[]).unwrap_err(),
        EncodeError::PageIndexTooLarge { index: 1 << 56 }
    );
    let many = vec![
        PageEntry {
            index: 0,
            kind: PageKind::Zero
        };
        MAX_BATCH_PAGES + 1
    ];
    assert_eq!(
        encode_page_batch_header(&mut out, 0, 12, flags, &many),
        Err(EncodeError::TooManyPages {
            count: MAX_BATCH_PAGES + 1
        })
    );
    // A full batch of 4 KiB pages fits MAX_RECORD_BODY; 2 MiB pages do not.
    let full = vec![normal; MAX_BATCH_PAGES];
    let mut head = vec![0; 8 + 8 + 8 * MAX_BATCH_PAGES];
    assert_eq!(
        encode_page_batch_header(&mut head, 0, 12, flags, &full),
        Ok(head.len())
    );
    assert_eq!(
        encode_page_batch_header(&mut head, 0, 21, flags, &full),
        Err(EncodeError::Oversized {
            len: 8 + 8 * 1024 + (1024 << 21),
            limit: MAX_RECORD_BODY
        })
    );
    assert_eq!(
        encode_device_header(&mut out, id, 0, 0, MAX_RECORD_BODY),
        Err(EncodeError::Oversized {
            len: MAX_RECORD_BODY + 12,
            limit: MAX_RECORD_BODY
        })
    );
}

#[test]
fn device_header_matches_record() {
    let id = BlockId::new("cpu0").unwrap();
    let data = [1, 2, 3, 4, 5];
    let whole = encode_record(&Record::Device(DeviceState {
        id,
        instance: 2,
        version: 3,
        data: &data,
    }));
    let mut head = [0; 64];
    let n = encode_device_header(&mut head, id, 2, 3, data.len()).unwrap();
    assert_eq!([&head[..n], &data[..]].concat(), whole);
}
