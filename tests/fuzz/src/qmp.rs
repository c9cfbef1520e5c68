//! The QMP message decoder and the HMP `xp` reader of `livemig bench
//! --vs-qemu` under fuzzing.

use livemig_cli::qmp::{self, Message};

/// libFuzzer entry point; see [`qmp_accepts`].
pub fn qmp(data: &[u8]) {
    qmp_accepts(data);
}

/// Decodes `data` (lossily as UTF-8) as one QMP line and as `xp` output.
/// Checked: neither panics; an accepted error message carries its class
/// and description as given; an `xp` value re-read from its own
/// formatting is the same value. Returns whether the line was a QMP
/// message.
pub fn qmp_accepts(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    if let Some(v) = qmp::parse_xp(&text) {
        assert_eq!(
            qmp::parse_xp(&format!("0000000000005100: {v:#018x}")),
            Some(v)
        );
    }
    match qmp::decode(&text) {
        Ok(Message::Error { class, desc }) => {
            assert!(text.contains("error"), "an error message from {text:?}");
            let again = serde_json::json!({ "error": { "class": class, "desc": desc } });
            assert_eq!(
                qmp::decode(&again.to_string()).ok(),
                Some(Message::Error { class, desc })
            );
            true
        }
        Ok(_) => true,
        Err(_) => false,
    }
}

/// Valid lines: each kind of message, and `xp` output.
pub fn qmp_corpus() -> Vec<Vec<u8>> {
    [
        "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}}, \"capabilities\": [\"oob\"]}}\n",
        "{\"return\": {}}\n",
        "{\"return\": {\"status\": \"completed\", \"total-time\": 42, \"downtime\": 9, \"ram\": {\"transferred\": 9191221}}}\n",
        "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}}\n",
        "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"STOP\"}\n",
        "{\"return\": \"0000000000005100: 0x00000000047ddc00\\r\\n\"}\n",
        "0000000000005100: 0x00000000047ddc00\r\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}
