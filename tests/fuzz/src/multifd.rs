//! The multifd channel decoders under fuzzing: the hello, packet headers,
//! entry tables and the receiver's sequence check, fed a channel's bytes.

use livemig_core::destination::check_channel_pages;
use livemig_core::wire::{
    BlockId, BlockInfo, ChannelHello, ChannelReceiver, HELLO_LEN, PACKET_HEADER_LEN, PacketEntries,
    PacketHeader, PacketKind, PageEntry, PageKind,
};

/// The migration id the corpus's hellos carry.
const ID: u64 = 0x6c69_7665_6d69_6721;

/// libFuzzer entry point; see [`multifd_accepts`].
pub fn multifd(data: &[u8]) {
    multifd_accepts(data);
}

/// Reads `data` as one channel of a two-channel migration, the way a
/// receiver does: the hello, then packets (header, entries checked
/// against a block of 256 512-byte pages, page data skipped), released after each SYNC.
/// Checked: no decoder panics, every decoded value re-encodes to the
/// bytes it came from, and every entry of an accepted packet lies inside
/// the block. Returns whether the whole input was a valid channel.
pub fn multifd_accepts(data: &[u8]) -> bool {
    let id = BlockId::new("pc.ram").expect("valid id");
    let layout = [BlockInfo::new(id, 256 * 512, 512).expect("valid block")];
    let Some((hello_bytes, mut rest)) = data.split_at_checked(HELLO_LEN) else {
        return false;
    };
    let Ok(hello) = ChannelHello::decode(hello_bytes) else {
        return false;
    };
    let mut out = [0u8; HELLO_LEN];
    assert_eq!(hello.encode(&mut out), Ok(HELLO_LEN));
    assert_eq!(&out[..], hello_bytes, "hello re-encodes differently");
    let mut rx = ChannelReceiver::new(ID, 2);
    if rx.hello(&hello).is_err() {
        return false;
    }
    let mut table = vec![0u8; PACKET_HEADER_LEN + 8 * 1024];
    while !rest.is_empty() {
        let Some((head, tail)) = rest.split_at_checked(PACKET_HEADER_LEN) else {
            return false;
        };
        let Ok(header) = PacketHeader::decode(head) else {
            return false;
        };
        let Some((entry_bytes, tail)) = tail.split_at_checked(header.entries_len()) else {
            return false;
        };
        let Ok(entries) = PacketEntries::decode(&header, entry_bytes) else {
            return false;
        };
        let listed: Vec<PageEntry> = entries.iter().collect();
        let n = header
            .encode(&listed, &mut table)
            .expect("decoded header encodes");
        assert_eq!(
            &table[..PACKET_HEADER_LEN],
            head,
            "header re-encodes differently"
        );
        assert_eq!(&table[PACKET_HEADER_LEN..n], entry_bytes, "entries differ");
        if check_channel_pages(&layout, &header, &entries).is_err() {
            return false;
        }
        assert!(
            listed.iter().all(|e| e.index < 256),
            "accepted a page outside the block"
        );
        let shift = match header.kind {
            PacketKind::Pages { page_shift, .. } => page_shift,
            PacketKind::Sync => 9,
        };
        let normal = listed.iter().filter(|e| e.kind == PageKind::Normal).count();
        assert_eq!(entries.normal(), normal);
        let Some((_, tail)) = tail.split_at_checked(entries.data_len(shift)) else {
            return false;
        };
        if rx.packet(&header).is_err() {
            return false;
        }
        if rx.is_synced() {
            rx.release();
        }
        rest = tail;
    }
    true
}

/// Valid channels: a hello, a packet of a normal and a zero page, a SYNC,
/// and a packet of the next generation.
pub fn multifd_corpus() -> Vec<Vec<u8>> {
    let hello = ChannelHello {
        migration_id: ID,
        index: 1,
        count: 2,
    };
    let mut bytes = vec![0u8; HELLO_LEN];
    hello.encode(&mut bytes).expect("valid hello");
    let entries = [
        PageEntry {
            index: 3,
            kind: PageKind::Normal,
        },
        PageEntry {
            index: 255,
            kind: PageKind::Zero,
        },
    ];
    let mut buf = [0u8; 256];
    for (packet, generation, kind) in [
        (
            0,
            0,
            PacketKind::Pages {
                block: 0,
                page_shift: 9,
                count: 2,
            },
        ),
        (1, 0, PacketKind::Sync),
        (
            2,
            1,
            PacketKind::Pages {
                block: 0,
                page_shift: 9,
                count: 2,
            },
        ),
    ] {
        let header = PacketHeader {
            channel: 1,
            generation,
            packet,
            kind,
        };
        let list: &[PageEntry] = if kind == PacketKind::Sync {
            &[]
        } else {
            &entries
        };
        let n = header.encode(list, &mut buf).expect("valid packet");
        bytes.extend_from_slice(&buf[..n]);
        if kind != PacketKind::Sync {
            bytes.extend(std::iter::repeat_n(0xa5, 512));
        }
    }
    vec![bytes]
}
