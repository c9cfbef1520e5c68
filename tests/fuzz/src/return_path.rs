//! The return-path decoder under fuzzing.

use livemig_core::return_path::{RP_MAX_MESSAGE, RpDecodeError, RpDecoder, RpMessage};

/// libFuzzer entry point for the return-path decoder; see
/// [`return_path_accepts`] for what it checks.
pub fn return_path(data: &[u8]) {
    return_path_accepts(data);
}

/// Decodes `data` as a return-path stream and checks the decoder's
/// invariants, returning whether the whole input was valid.
///
/// The first byte is a control byte so one input explores configurations:
/// its low five bits pick the page size (`1 << (bits % 22)`), its top three
/// bits the chunk size the stream is fed in (0 = whole). The rest is the
/// stream. Checked: the decoder never claims more bytes than it was given;
/// feeding the stream whole, in chunks and one byte at a time yields the
/// same messages and the same error; every decoded message re-encodes to
/// exactly the bytes it was decoded from (SHUT up to its error value) and
/// decodes again to itself.
pub fn return_path_accepts(data: &[u8]) -> bool {
    let (control, stream) = match data.split_first() {
        Some((&control, stream)) => (control, stream),
        None => return true,
    };
    let page_size = 1u32 << (u32::from(control & 0x1f) % 22);
    let chunk = usize::from(control >> 5);
    let whole = decode_all(page_size, stream, stream.len().max(1));
    let bytewise = decode_all(page_size, stream, 1);
    assert_eq!(
        whole, bytewise,
        "byte-at-a-time feeding changed the outcome"
    );
    if chunk > 1 {
        let chunked = decode_all(page_size, stream, chunk);
        assert_eq!(whole, chunked, "chunked feeding changed the outcome");
    }
    whole.1.is_ok()
}

/// Messages (re-encoded) and the final outcome of decoding `stream` fed in
/// pieces of `chunk` bytes.
#[allow(clippy::type_complexity)]
fn decode_all(
    page_size: u32,
    stream: &[u8],
    chunk: usize,
) -> (Vec<(bool, Vec<u8>)>, Result<(), RpDecodeError>) {
    let mut decoder = RpDecoder::new(page_size).expect("control byte gives a power of two");
    let mut messages: Vec<(bool, Vec<u8>)> = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    for piece in stream.chunks(chunk) {
        let mut rest = piece;
        while !rest.is_empty() {
            match decoder.decode(rest) {
                Ok((used, msg)) => {
                    assert!(used <= rest.len(), "decoder claimed bytes it was not given");
                    // `pending` collects the bytes of the message in progress.
                    pending.extend_from_slice(&rest[..used]);
                    match msg {
                        Some(msg) => {
                            let bytes = check_message(&msg, &pending, page_size);
                            // A bitmap's bytes come in as many parts as
                            // the feeding makes: compare them joined.
                            let joined = matches!(msg, RpMessage::RecvBitmapBytes { .. });
                            match messages.last_mut() {
                                Some((true, last)) if joined => last.extend(bytes),
                                _ => messages.push((joined, bytes)),
                            }
                            pending.clear();
                        }
                        None => assert_eq!(used, rest.len(), "no message but input left over"),
                    }
                    rest = &rest[used..];
                }
                Err(err) => {
                    assert_eq!(
                        decoder.decode(rest).err(),
                        Some(err),
                        "decoder recovered from an error"
                    );
                    assert_eq!(decoder.finish(), Err(err), "finish forgot the error");
                    return (messages, Err(err));
                }
            }
        }
    }
    let end = decoder.finish();
    (messages, end)
}

/// Re-encodes a decoded message, checks it against the bytes it came from
/// and that it decodes to itself, and returns the encoding.
fn check_message(msg: &RpMessage<'_>, wire: &[u8], page_size: u32) -> Vec<u8> {
    if let RpMessage::RecvBitmapBytes { bytes, .. } = msg {
        // Bitmap bytes travel as they are, borrowed from the input.
        assert_eq!(*bytes, wire, "bitmap bytes changed");
        assert_eq!(msg.encoded_len(), wire.len());
        return wire.to_vec();
    }
    let mut buf = [0u8; RP_MAX_MESSAGE];
    let len = msg.encode(&mut buf).expect("a decoded message encodes");
    let encoded = &buf[..len];
    assert_eq!(len, msg.encoded_len());
    assert_eq!(len, wire.len(), "re-encoding changed the message length");
    if matches!(msg, RpMessage::Shut { .. }) {
        // Any non-zero SHUT value means "error"; the encoder writes 1.
        assert_eq!(encoded[..4], wire[..4]);
    } else {
        assert_eq!(encoded, wire, "re-encoding changed the bytes");
    }
    // The bitmap's size and end mark are read only after a RECV_BITMAP.
    if !matches!(
        msg,
        RpMessage::RecvBitmapSize { .. } | RpMessage::RecvBitmapEnd
    ) {
        let mut again = RpDecoder::new(page_size).expect("page size already accepted");
        let (used, redecoded) = again.decode(encoded).expect("an encoded message decodes");
        assert_eq!((used, redecoded.as_ref()), (len, Some(msg)));
    }
    encoded.to_vec()
}

/// Valid return-path inputs for [`return_path`]: every message type alone
/// and in a sequence, under a few control bytes, for mutation-based drivers
/// to start from (random bytes alone rarely pass the header checks).
pub fn return_path_corpus() -> Vec<Vec<u8>> {
    let long_id = "r".repeat(255);
    let messages = [
        RpMessage::Shut { error: false },
        RpMessage::Shut { error: true },
        RpMessage::Pong(0x0102_0304),
        RpMessage::ReqPagesId {
            block: "pc.ram",
            start: 0x2000,
            len: 0x1000,
        },
        RpMessage::ReqPagesId {
            block: &long_id,
            start: 0x20_0000,
            len: 0x20_0000,
        },
        RpMessage::ReqPages {
            start: 0x7fff_f000,
            len: 0x3000,
        },
        RpMessage::ResumeAck,
        RpMessage::SwitchoverAck,
        RpMessage::Loaded,
        RpMessage::Interrupted { signal: 2 },
        RpMessage::DigestQuery {
            block: 0,
            first: 64,
            count: 4096,
        },
        RpMessage::DigestMismatch {
            block: 1,
            page: Some(77),
        },
        RpMessage::DigestMismatch {
            block: 0,
            page: None,
        },
        RpMessage::ResendPage {
            block: 0,
            page: 0x1000,
        },
    ];
    let encode = |msg: &RpMessage<'_>| {
        let mut buf = [0u8; RP_MAX_MESSAGE];
        let len = msg.encode(&mut buf).expect("corpus messages are valid");
        buf[..len].to_vec()
    };
    // RECV_BITMAP with the bitmap of a 70-page block behind it: two words,
    // the second with 6 bits used.
    let bitmap = [0xffu8, 0xff, 0, 0, 0, 0, 0, 0x80, 0x3f, 0, 0, 0, 0, 0, 0, 0];
    let recv_bitmap: Vec<u8> = [
        RpMessage::RecvBitmap { block: "pc.ram" },
        RpMessage::RecvBitmapSize { size: 16 },
        RpMessage::RecvBitmapBytes {
            offset: 0,
            bytes: &bitmap,
        },
        RpMessage::RecvBitmapEnd,
    ]
    .iter()
    .flat_map(encode)
    .collect();
    // Page size 4 KiB fed whole, 4 KiB in 3-byte chunks, 1 byte (no
    // alignment constraint) in 7-byte chunks.
    let controls = [12u8, 12 | (3 << 5), 7 << 5];
    let mut corpus = Vec::new();
    for control in controls {
        for msg in &messages {
            let mut input = vec![control];
            input.extend(encode(msg));
            corpus.push(input);
        }
        let mut input = vec![control];
        input.extend_from_slice(&recv_bitmap);
        corpus.push(input);
        let mut sequence = vec![control];
        sequence.extend_from_slice(&recv_bitmap);
        for msg in messages
            .iter()
            .filter(|m| !matches!(m, RpMessage::Shut { .. }))
        {
            sequence.extend(encode(msg));
        }
        corpus.push(sequence);
    }
    corpus
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_is_valid_and_garbage_is_not() {
        for input in return_path_corpus() {
            assert!(return_path_accepts(&input), "{input:02x?}");
        }
        assert!(!return_path_accepts(&[12, 0, 0, 0, 0]));
        assert!(!return_path_accepts(&[12, 0, 2, 0]));
    }
}
