//! A QMP client: QEMU's machine protocol, one JSON object a line over a
//! unix socket, enough to drive a migration between two QEMUs.
//!
//! The server greets with `{"QMP": ...}`; `qmp_capabilities` leaves
//! negotiation mode; each command then gets one `{"return": ...}` or
//! `{"error": {"class", "desc"}}` line, with asynchronous `{"event": ...}`
//! lines in between (skipped here). Every read has a deadline: a QEMU that
//! hangs is an error, not a hang of the bench.

use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

/// How long one command may take to be answered.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a QMP exchange failed.
#[derive(Debug)]
pub enum QmpError {
    /// The socket could not be connected, read or written.
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        error: io::Error,
    },
    /// No answer within [`REPLY_TIMEOUT`].
    Timeout {
        /// The command (or "greeting").
        command: String,
    },
    /// QEMU closed the socket.
    Closed {
        /// The command (or "greeting") that was waiting for an answer.
        command: String,
    },
    /// A line that is not a QMP message.
    Malformed {
        /// The line.
        line: String,
    },
    /// QEMU answered the command with an error.
    Command {
        /// The command.
        command: String,
        /// QEMU's error class (e.g. `GenericError`).
        class: String,
        /// QEMU's description.
        desc: String,
    },
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QmpError::Io { what, error } => write!(f, "QMP {what}: {error}"),
            QmpError::Timeout { command } => write!(
                f,
                "QMP {command}: no answer within {} s",
                REPLY_TIMEOUT.as_secs()
            ),
            QmpError::Closed { command } => write!(f, "QMP {command}: QEMU closed the socket"),
            QmpError::Malformed { line } => write!(f, "QMP: not a QMP message: {line:?}"),
            QmpError::Command {
                command,
                class,
                desc,
            } => write!(f, "QMP {command} failed: {class}: {desc}"),
        }
    }
}

impl std::error::Error for QmpError {}

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// `{"QMP": ...}`, the first line.
    Greeting,
    /// `{"return": VALUE}`: a command succeeded.
    Return(Value),
    /// `{"error": {"class", "desc"}}`: a command failed.
    Error {
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// `{"event": ...}`: asynchronous, not an answer.
    Event,
}

/// Decodes one line from QEMU; anything else than the four QMP messages
/// is [`QmpError::Malformed`].
pub fn decode(line: &str) -> Result<Message, QmpError> {
    let malformed = || QmpError::Malformed {
        line: line.trim_end().into(),
    };
    let v: Value = serde_json::from_str(line).map_err(|_| malformed())?;
    let obj = v.as_object().ok_or_else(malformed)?;
    if let Some(r) = obj.get("return") {
        return Ok(Message::Return(r.clone()));
    }
    if let Some(e) = obj.get("error") {
        let field = |k: &str| e.get(k).and_then(Value::as_str).map(String::from);
        return match (field("class"), field("desc")) {
            (Some(class), Some(desc)) => Ok(Message::Error { class, desc }),
            _ => Err(malformed()),
        };
    }
    if obj.contains_key("event") {
        return Ok(Message::Event);
    }
    if obj.contains_key("QMP") {
        return Ok(Message::Greeting);
    }
    Err(malformed())
}

/// A connected QMP session, out of negotiation mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to the QMP socket at `path`, reads the greeting and sends
    /// `qmp_capabilities`.
    pub fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path).map_err(|error| QmpError::Io {
            what: "connect",
            error,
        })?;
        Qmp::over(stream)
    }

    /// A session over an already connected `stream` (tests use a pair).
    pub fn over(stream: UnixStream) -> Result<Qmp, QmpError> {
        let writer = stream.try_clone().map_err(|error| QmpError::Io {
            what: "socket clone",
            error,
        })?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        match qmp.read_message("greeting", REPLY_TIMEOUT)? {
            Message::Greeting => {}
            other => {
                return Err(QmpError::Malformed {
                    line: format!("{other:?} instead of the greeting"),
                });
            }
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = Map::new();
        msg.insert("execute".into(), json!(command));
        if let Some(a) = arguments {
            msg.insert("arguments".into(), a);
        }
        let mut line = Value::Object(msg).to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|error| QmpError::Io {
                what: "write",
                error,
            })?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout {
                    command: command.into(),
                });
            }
            match self.read_message(command, left)? {
                Message::Return(r) => return Ok(r),
                Message::Error { class, desc } => {
                    return Err(QmpError::Command {
                        command: command.into(),
                        class,
                        desc,
                    });
                }
                Message::Event => {}
                Message::Greeting => {
                    return Err(QmpError::Malformed {
                        line: format!("a second greeting, answering {command}"),
                    });
                }
            }
        }
    }

    /// Runs a human monitor command (e.g. `xp`) and returns its output.
    pub fn human(&mut self, command_line: &str) -> Result<String, QmpError> {
        let out = self.execute(
            "human-monitor-command",
            Some(json!({ "command-line": command_line })),
        )?;
        out.as_str()
            .map(String::from)
            .ok_or_else(|| QmpError::Malformed {
                line: out.to_string(),
            })
    }

    /// Reads guest-physical `addr` as a little-endian u64 (HMP `xp`).
    pub fn read_u64(&mut self, addr: u64) -> Result<u64, QmpError> {
        let out = self.human(&format!("xp /1gx {addr:#x}"))?;
        parse_xp(&out).ok_or(QmpError::Malformed { line: out })
    }

    /// The next message, within `timeout` (not zero).
    fn read_message(&mut self, command: &str, timeout: Duration) -> Result<Message, QmpError> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .map_err(|error| QmpError::Io {
                what: "set timeout",
                error,
            })?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(QmpError::Closed {
                command: command.into(),
            }),
            Ok(_) => decode(&line),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(QmpError::Timeout {
                    command: command.into(),
                })
            }
            Err(error) => Err(QmpError::Io {
                what: "read",
                error,
            }),
        }
    }
}

/// The value of an `xp /1gx ADDR` line: `0000000000005100: 0x00000000047ddc00`.
pub fn parse_xp(out: &str) -> Option<u64> {
    let (_, value) = out.lines().next()?.split_once(':')?;
    let hex = value.split_whitespace().next()?.strip_prefix("0x")?;
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};

    /// A fake QMP server on one end of a socket pair: greets, then answers
    /// each request line with the next of `replies` (several lines each),
    /// then reads one more request and closes without an answer.
    fn server(replies: Vec<&'static str>) -> (UnixStream, std::thread::JoinHandle<Vec<Value>>) {
        let (client, server) = UnixStream::pair().unwrap();
        let handle = std::thread::spawn(move || {
            let mut w = server.try_clone().unwrap();
            let mut r = BufReader::new(server);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            let mut seen = Vec::new();
            let mut line = String::new();
            for reply in replies {
                line.clear();
                if r.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                seen.push(serde_json::from_str(&line).unwrap());
                w.write_all(reply.as_bytes()).unwrap();
            }
            // Take the next request, if any, then close without answering.
            line.clear();
            let _ = r.read_line(&mut line);
            seen
        });
        (client, handle)
    }

    #[test]
    fn commands_get_their_return_past_events() {
        let (c, s) = server(vec![
            "{\"return\": {}}\n",
            "{\"event\": \"STOP\"}\n{\"return\": {\"status\": \"completed\"}}\n",
            "{\"return\": \"0000000000005100: 0x00000000047ddc00 0x0\\r\\n\"}\n",
        ]);
        let mut q = Qmp::over(c).unwrap();
        let r = q.execute("query-migrate", Some(json!({ "x": 1 }))).unwrap();
        assert_eq!(r["status"], "completed");
        assert_eq!(q.read_u64(0x5100).unwrap(), 0x47d_dc00);
        drop(q);
        let seen = s.join().unwrap();
        assert_eq!(seen[0]["execute"], "qmp_capabilities");
        assert_eq!(seen[1]["arguments"]["x"], 1);
        assert_eq!(seen[2]["arguments"]["command-line"], "xp /1gx 0x5100");
    }

    #[test]
    fn errors_and_garbage_are_typed() {
        let (c, _s) = server(vec![
            "{\"return\": {}}\n",
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}}\n",
            "not json\n",
            "{\"neither\": 1}\n",
        ]);
        let mut q = Qmp::over(c).unwrap();
        let e = q.execute("migrate", None).unwrap_err();
        assert_eq!(e.to_string(), "QMP migrate failed: GenericError: no");
        assert!(matches!(
            q.execute("a", None),
            Err(QmpError::Malformed { .. })
        ));
        assert!(matches!(
            q.execute("b", None),
            Err(QmpError::Malformed { .. })
        ));
        assert!(matches!(q.execute("c", None), Err(QmpError::Closed { .. })));
    }

    #[test]
    fn messages_are_decoded_or_refused() {
        assert_eq!(decode("{\"QMP\": {}}\n").unwrap(), Message::Greeting);
        assert_eq!(
            decode("{\"return\": 3}").unwrap(),
            Message::Return(json!(3))
        );
        assert_eq!(decode("{\"event\": \"STOP\"}").unwrap(), Message::Event);
        assert_eq!(
            decode("{\"error\": {\"class\": \"C\", \"desc\": \"d\"}}").unwrap(),
            Message::Error {
                class: "C".into(),
                desc: "d".into()
            }
        );
        for bad in [
            "",
            "[1]",
            "{\"error\": {\"class\": 1}}",
            "{}",
            "{\"return\"",
        ] {
            assert!(
                matches!(decode(bad), Err(QmpError::Malformed { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn xp_output_is_parsed_or_refused() {
        assert_eq!(
            parse_xp("0000000000005140: 0x0000000000000010\r\n"),
            Some(16)
        );
        assert_eq!(parse_xp("Cannot access memory\r\n"), None);
        assert_eq!(parse_xp(""), None);
        assert_eq!(parse_xp("5100: 0xzz"), None);
    }
}
