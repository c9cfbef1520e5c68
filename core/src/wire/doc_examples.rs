//! Checks that every worked example in `docs/wire-format.md` is exactly what
//! the encoder produces and that the decoder reads it back.
//!
//! Each example in the document is a fenced block after an
//! `<!-- example: NAME -->` marker; each line is hex bytes, then two spaces
//! and a comment. A line starting with `(` stands for bytes not shown (page
//! data), which the test appends itself.

use std::vec::Vec;

use super::*;

const DOC: &str = include_str!("../../../docs/wire-format.md");

/// The bytes of example `name`, with elided lines reported as `true`.
fn example(name: &str) -> (Vec<u8>, bool) {
    let marker = std::format!("<!-- example: {name} -->");
    let start = DOC
        .find(&marker)
        .unwrap_or_else(|| panic!("no example {name}"));
    let mut lines = DOC[start..].lines().skip(1);
    assert_eq!(
        lines.next(),
        Some("```text"),
        "example {name} must open a text block"
    );
    let mut bytes = Vec::new();
    let mut elided = false;
    for line in lines.take_while(|l| *l != "```") {
        if line.starts_with('(') {
            elided = true;
            continue;
        }
        let hex = line.split("  ").next().unwrap_or_default();
        for token in hex.split_whitespace() {
            assert_eq!(token.len(), 2, "example {name}: bad byte {token:?}");
            bytes.push(u8::from_str_radix(token, 16).unwrap());
        }
    }
    (bytes, elided)
}

fn encoded(r: &Record<'_>) -> Vec<u8> {
    let mut out = std::vec![0; r.encoded_len()];
    assert_eq!(r.encode(&mut out), Ok(out.len()));
    out
}

/// Asserts the example is the encoding of `r` and decodes back to `r`.
fn check(name: &str, r: Record<'_>) {
    let (bytes, elided) = example(name);
    assert!(!elided);
    assert_eq!(bytes, encoded(&r), "example {name}");
    let mut stream = std::vec![0; STREAM_HEADER_LEN];
    encode_stream_header(&mut stream).unwrap();
    stream.extend_from_slice(&bytes);
    let mut scratch = [0; 64];
    let mut dec = StreamDecoder::new(&mut scratch);
    let d = dec.decode(&stream).unwrap();
    assert_eq!(d.consumed, stream.len());
    assert_eq!(d.record, Some(r), "example {name}");
}

#[test]
fn stream_header() {
    let mut out = [0; STREAM_HEADER_LEN];
    assert_eq!(encode_stream_header(&mut out), Ok(8));
    assert_eq!(example("stream-header"), (out.to_vec(), false));
}

#[test]
fn zero_run() {
    check(
        "zero-run",
        Record::ZeroRun(ZeroRun {
            block: 0,
            page_shift: 12,
            range: PageRange {
                first: 4096,
                count: 4096,
            },
        }),
    );
}

#[test]
fn commands() {
    let ram = BlockId::new("pc.ram").unwrap();
    check("open-return-path", Record::Command(Command::OpenReturnPath));
    check("ping", Record::Command(Command::Ping(0x0102_0304)));
    check(
        "postcopy-advise",
        Record::Command(Command::PostcopyAdvise {
            host_page_size: 4096,
            target_page_size: 2 << 20,
        }),
    );
    check("postcopy-listen", Record::Command(Command::PostcopyListen));
    check("postcopy-run", Record::Command(Command::PostcopyRun));
    let ranges = [
        PageRange {
            first: 16,
            count: 4,
        },
        PageRange {
            first: 256,
            count: 1,
        },
    ];
    check(
        "postcopy-ram-discard",
        Record::Command(Command::PostcopyRamDiscard {
            block: ram,
            ranges: DiscardRanges::from_slice(&ranges),
        }),
    );
    check(
        "recv-bitmap",
        Record::Command(Command::RecvBitmap { block: ram }),
    );
    check("postcopy-resume", Record::Command(Command::PostcopyResume));
    check(
        "switchover-start",
        Record::Command(Command::SwitchoverStart),
    );
    check("commit", Record::Command(Command::Commit));
    check(
        "multifd-setup",
        Record::Command(Command::MultifdSetup {
            channels: 2,
            migration_id: 0x6c69_7665_6d69_6721,
        }),
    );
    check(
        "multifd-flush",
        Record::Command(Command::MultifdFlush { generation: 3 }),
    );
    check(
        "postcopy-preempt",
        Record::Command(Command::PostcopyPreempt {
            migration_id: 0x7072_6565_6d70_7421,
        }),
    );
}

#[test]
fn preempt_channel() {
    let hello = PreemptHello {
        migration_id: 0x7072_6565_6d70_7421,
    };
    let mut out = [0; 64];
    let n = hello.encode(&mut out).unwrap();
    assert_eq!(example("preempt-hello"), (out[..n].to_vec(), false));
    assert_eq!(PreemptHello::decode(&out[..n]), Ok(hello));

    // The channel after its hello: a Pages record, no stream header.
    let entries = [PageEntry {
        index: 300,
        kind: PageKind::Normal,
    }];
    let (head, elided) = example("preempt-pages");
    assert!(elided);
    let n = encode_page_batch_header(&mut out, 0, 12, BatchFlags::empty(), &entries).unwrap();
    assert_eq!(head, &out[..n]);
    let mut channel = head.clone();
    channel.extend_from_slice(&[0x5a; 4096]);
    // The limit check needs room for the body, though it is not copied.
    let mut scratch = std::vec![0; 8192];
    let mut dec = StreamDecoder::records(&mut scratch);
    let d = dec.decode(&channel).unwrap();
    assert_eq!(d.consumed, channel.len());
    let Some(Record::Pages(batch)) = d.record else {
        panic!("a Pages record");
    };
    assert_eq!(batch.block(), 0);
    let pages: Vec<_> = batch
        .pages()
        .map(|(e, data)| (e, data.map(<[u8]>::len)))
        .collect();
    assert_eq!(pages, [(entries[0], Some(4096))]);
}

#[test]
fn multifd_channel() {
    let hello = ChannelHello {
        migration_id: 0x6c69_7665_6d69_6721,
        index: 1,
        count: 2,
    };
    let mut out = [0; 64];
    let n = hello.encode(&mut out).unwrap();
    assert_eq!(example("channel-hello"), (out[..n].to_vec(), false));
    assert_eq!(ChannelHello::decode(&out[..n]), Ok(hello));

    let entries = [
        PageEntry {
            index: 5,
            kind: PageKind::Normal,
        },
        PageEntry {
            index: 6,
            kind: PageKind::Zero,
        },
    ];
    let pages = PacketHeader {
        channel: 1,
        generation: 0,
        packet: 7,
        kind: PacketKind::Pages {
            block: 0,
            page_shift: 12,
            count: 2,
        },
    };
    let (head, elided) = example("channel-pages");
    assert!(elided);
    let n = pages.encode(&entries, &mut out).unwrap();
    assert_eq!(head, &out[..n]);
    assert_eq!(PacketHeader::decode(&head[..PACKET_HEADER_LEN]), Ok(pages));
    let table = PacketEntries::decode(&pages, &head[PACKET_HEADER_LEN..]).unwrap();
    assert!(table.iter().eq(entries));
    assert_eq!(table.data_len(12), 4096);

    let sync = PacketHeader {
        packet: 8,
        kind: PacketKind::Sync,
        ..pages
    };
    let n = sync.encode(&[], &mut out).unwrap();
    assert_eq!(example("channel-sync"), (out[..n].to_vec(), false));
    assert_eq!(PacketHeader::decode(&out[..n]), Ok(sync));
}

#[test]
fn ram_blocks() {
    let blocks = [
        BlockInfo::new(BlockId::new("pc.ram").unwrap(), 1 << 30, 4096).unwrap(),
        BlockInfo::new(BlockId::new("vga").unwrap(), 16 << 20, 2 << 20).unwrap(),
    ];
    check(
        "ram-blocks",
        Record::RamBlocks(BlockList::from_slice(&blocks)),
    );
}

#[test]
fn pages() {
    let entries = [
        PageEntry {
            index: 5,
            kind: PageKind::Zero,
        },
        PageEntry {
            index: 6,
            kind: PageKind::Normal,
        },
    ];
    let flags = BatchFlags::END_OF_ITERATION;
    let (head, elided) = example("pages");
    assert!(elided);
    let mut out = [0; 64];
    let n = encode_page_batch_header(&mut out, 0, 12, flags, &entries).unwrap();
    assert_eq!(head, &out[..n]);
    // With the elided page appended it is the whole record.
    let page: Vec<u8> = (0..4096).map(|i| i as u8).collect();
    let batch = PageBatch::new(0, 12, flags, &entries, &page).unwrap();
    assert_eq!([&head[..], &page].concat(), encoded(&Record::Pages(batch)));

    let marker = PageBatch::new(1, 21, flags, &[], &[]).unwrap();
    check("end-of-iteration", Record::Pages(marker));
}

#[test]
fn device_and_package() {
    let device = Record::Device(DeviceState {
        id: BlockId::new("cpu0").unwrap(),
        instance: 0,
        version: 1,
        data: &[0xde, 0xad, 0xbe, 0xef],
    });
    check("device", device);
    let inner = encoded(&device);
    check(
        "package",
        Record::Package(Package::from_encoded(&inner).unwrap()),
    );
    check("end-of-stream", Record::EndOfStream);
}

/// The term as `docs/wire-format.md` ("Digest") writes it, line by line,
/// apart from `crate::digest`'s own code: an implementation from the
/// document alone must get the crate's terms.
fn term_as_documented(seed: u64, block: u16, page: u64, data: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    fn mix(mut x: u64) -> u64 {
        x ^= x >> 30;
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x ^= x >> 27;
        x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }
    fn nh(w: u64, k: u64) -> u64 {
        let a = (w & 0xffff_ffff).wrapping_add(k & 0xffff_ffff) & 0xffff_ffff;
        let b = (w >> 32).wrapping_add(k >> 32) & 0xffff_ffff;
        (a * b).wrapping_add(a + (b << 32))
    }
    let mut lane = [0u64; 8];
    for (j, l) in (0u64..).zip(lane.iter_mut()) {
        *l = mix(seed.wrapping_add(K.wrapping_mul(j + 1)));
    }
    let mut key = [0u64; 128];
    for (i, k) in (0u64..).zip(key.iter_mut()) {
        *k = mix(seed.wrapping_add(K.wrapping_mul(i + 9)));
    }
    let word = |c: &[u8]| u64::from_le_bytes(c.try_into().unwrap());
    if data.chunks_exact(8).all(|c| word(c) == 0) {
        return 0;
    }
    for stripe in data.chunks(8 * 128) {
        let mut sum = [0u64; 8];
        for (i, w) in stripe.chunks_exact(8).enumerate() {
            sum[i % 8] = sum[i % 8].wrapping_add(nh(word(w), key[i]));
        }
        for (l, s) in lane.iter_mut().zip(sum) {
            *l = (*l ^ s).wrapping_mul(K).rotate_left(29);
        }
    }
    let mut merged = 0u64;
    for (j, l) in (0u64..).zip(lane) {
        let m = mix(seed.wrapping_add(K.wrapping_mul(j + 137))) | 1;
        merged = merged.wrapping_add(l.wrapping_mul(m));
    }
    let place = mix(seed ^ (u64::from(block) << 48) ^ page);
    mix(place ^ merged).max(1)
}

#[test]
fn the_page_term_is_what_this_document_says() {
    let seed = 0x0123_4567_89ab_cdef;
    let key = crate::digest::DigestKey::new(seed);
    assert_eq!(
        term_as_documented(seed, 0, 0, &[1u8; 4096]),
        0x9223_a3f5_8602_c666,
        "the Digest example's term"
    );
    let mut state = 0x5eedu64;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let z = (state ^ (state >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z ^ (z >> 27)
    };
    // 4 KiB and 8 KiB pages and a 2 MiB one, of random words and of a few
    // set among zeros.
    let mut data = std::vec![0u8; 2 << 20];
    for len in [4096usize, 8192, 2 << 20] {
        for sparse in [false, true] {
            for w in data[..len].chunks_exact_mut(8) {
                let v = next();
                let v = if sparse && v % 97 != 0 { 0 } else { v };
                w.copy_from_slice(&v.to_le_bytes());
            }
            let (block, page) = ((next() % 4) as u16, next() % 1000);
            assert_eq!(
                key.page_term(block, page, &data[..len]),
                term_as_documented(seed, block, page, &data[..len]),
                "{len}-byte page, sparse {sparse}"
            );
        }
    }
}

#[test]
fn digest_key_and_digest() {
    check(
        "digest-key",
        Record::Command(Command::DigestKey(0x0123_4567_89ab_cdef)),
    );
    // The worked example: key 0x0123456789abcdef, block 0 of two 4 KiB
    // pages, page 0 all 0x01 bytes and page 1 zero; block 1 never sent.
    let key = crate::digest::DigestKey::new(0x0123_4567_89ab_cdef);
    let term = key.page_term(0, 0, &[1u8; 4096]);
    assert_eq!(term, 0x9223_a3f5_8602_c666, "the term the document states");
    assert_eq!(key.page_term(0, 1, &[0u8; 4096]), 0);
    check("digest", Record::Digest(BlockSums::from_slice(&[term, 0])));
}

#[test]
fn pages_with_terms() {
    let key = crate::digest::DigestKey::new(0x0123_4567_89ab_cdef);
    let data = [1u8; 4096];
    let term = key.page_term(0, 0, &data);
    assert_eq!(term, 0x9223_a3f5_8602_c666, "the term the document states");
    let entries = [
        PageEntry {
            index: 0,
            kind: PageKind::Normal,
        },
        PageEntry {
            index: 1,
            kind: PageKind::Zero,
        },
    ];
    let (head, elided) = example("pages-terms");
    assert!(elided);
    let mut out = [0; 64];
    let n = encode_page_batch_header_with_terms(
        &mut out,
        0,
        12,
        BatchFlags::TERMS,
        &entries,
        [term].into_iter(),
    )
    .unwrap();
    assert_eq!(head, &out[..n]);
    let terms = [term];
    let batch = PageBatch::new(0, 12, BatchFlags::empty(), &entries, &data)
        .and_then(|b| b.with_terms(&terms))
        .unwrap();
    let mut whole = head.clone();
    whole.extend_from_slice(&data);
    assert_eq!(encoded(&Record::Pages(batch)), whole);
    let mut stream = std::vec![0; STREAM_HEADER_LEN];
    encode_stream_header(&mut stream).unwrap();
    stream.extend_from_slice(&whole);
    let mut scratch = std::vec![0; 8192];
    let mut dec = StreamDecoder::new(&mut scratch);
    let d = dec.decode(&stream).unwrap();
    assert_eq!(d.consumed, stream.len());
    let Some(Record::Pages(read)) = d.record else {
        panic!("a Pages record");
    };
    assert_eq!(read, batch);
    assert!(read.terms().eq([term]));
    assert_eq!(read.data(), &data[..]);
}

#[test]
fn digest_ranges() {
    // The worked example: block 0 of three pages, page 0 all 0x01 bytes
    // (the Digest example's term), pages 1 and 2 zero.
    let term = crate::digest::DigestKey::new(0x0123_4567_89ab_cdef).page_term(0, 0, &[1u8; 4096]);
    let range = PageRange { first: 0, count: 3 };
    let sums = [term, 0, 0];
    let answer = Record::DigestRanges(RangeSums::from_slice(0, range, &sums));
    check("digest-ranges", answer);
    let mut out = [0u8; 64];
    let n = encode_digest_ranges(&mut out, 0, range, sums.into_iter()).unwrap();
    assert_eq!(&out[..n], encoded(&answer));
}
