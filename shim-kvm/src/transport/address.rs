//! The migration address grammar: `tcp:HOST:PORT`, `unix:PATH`, `fd:N`.

use std::fmt;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::str::FromStr;

/// Longest Unix socket path the kernel accepts: `sun_path` is 108 bytes
/// including the terminating NUL.
pub const UNIX_PATH_MAX: usize = 107;

/// Where a migration stream goes (source) or comes from (destination), in
/// QEMU's `-incoming` / `migrate` syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    /// `tcp:HOST:PORT`. `host` is stored without IPv6 brackets; an empty
    /// host (`tcp::4444`) means "any address" when listening and the local
    /// host when connecting, as `getaddrinfo` treats a missing name.
    Tcp {
        /// Host name or IP address literal.
        host: String,
        /// Port number; 0 asks the kernel for a free one when listening.
        port: u16,
    },
    /// `unix:PATH`: a Unix stream socket at a filesystem path.
    Unix(PathBuf),
    /// `fd:N`: a stream socket this process inherited as descriptor `N`
    /// (from a management process that set the connection up). Using it
    /// hands the descriptor's ownership to the [`Connection`](super::Connection) or
    /// [`Listener`](super::Listener); see [`Connection::connect`](super::Connection::connect) for how that is checked.
    Fd(RawFd),
}

/// Why a migration address string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UriError {
    /// The text before the first `:` is not `tcp`, `unix` or `fd` (or there
    /// is no `:` at all); holds the scheme as written.
    UnknownScheme(String),
    /// `tcp:` address without a `:PORT` part; holds the text after `tcp:`.
    MissingPort(String),
    /// The port is not a decimal number in `0..=65535`; holds it as written.
    BadPort(String),
    /// The host is malformed: an IPv6 address without brackets, an unclosed
    /// bracket, or brackets around something that is not an IPv6 address.
    BadHost(String),
    /// `unix:` with nothing after it.
    EmptyPath,
    /// The Unix socket path is longer than [`UNIX_PATH_MAX`] bytes.
    PathTooLong(usize),
    /// `fd:` not followed by a non-negative decimal descriptor number; holds
    /// the text as written.
    BadFd(String),
}

impl fmt::Display for UriError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UriError::UnknownScheme(s) => write!(
                f,
                "unknown migration address scheme '{s}' (expected tcp:, unix: or fd:)"
            ),
            UriError::MissingPort(s) => write!(f, "tcp address '{s}' has no :PORT"),
            UriError::BadPort(p) => write!(f, "bad port '{p}' (expected 0-65535)"),
            UriError::BadHost(h) => write!(
                f,
                "bad host '{h}' (IPv6 addresses are written in brackets: tcp:[::1]:PORT)"
            ),
            UriError::EmptyPath => write!(f, "unix: address has an empty path"),
            UriError::PathTooLong(n) => write!(
                f,
                "unix socket path is {n} bytes, longer than the {UNIX_PATH_MAX} the kernel accepts"
            ),
            UriError::BadFd(s) => write!(
                f,
                "bad descriptor number '{s}' (expected fd:N with N a non-negative integer)"
            ),
        }
    }
}

impl std::error::Error for UriError {}

impl FromStr for MigrationUri {
    type Err = UriError;

    fn from_str(s: &str) -> Result<Self, UriError> {
        let Some((scheme, rest)) = s.split_once(':') else {
            return Err(UriError::UnknownScheme(s.to_string()));
        };
        match scheme {
            "tcp" => parse_tcp(rest),
            "unix" => {
                if rest.is_empty() {
                    Err(UriError::EmptyPath)
                } else if rest.len() > UNIX_PATH_MAX {
                    Err(UriError::PathTooLong(rest.len()))
                } else {
                    Ok(MigrationUri::Unix(PathBuf::from(rest)))
                }
            }
            "fd" => {
                // Digits only: `i32::from_str` would also take "+3".
                if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(UriError::BadFd(rest.to_string()));
                }
                rest.parse::<RawFd>()
                    .map(MigrationUri::Fd)
                    .map_err(|_| UriError::BadFd(rest.to_string()))
            }
            other => Err(UriError::UnknownScheme(other.to_string())),
        }
    }
}

/// Parses the part of a `tcp:` address after the scheme.
fn parse_tcp(rest: &str) -> Result<MigrationUri, UriError> {
    let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
        let Some((inner, after)) = bracketed.split_once(']') else {
            return Err(UriError::BadHost(rest.to_string()));
        };
        if inner.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(UriError::BadHost(inner.to_string()));
        }
        match after.strip_prefix(':') {
            Some(port) => (inner, port),
            None if after.is_empty() => return Err(UriError::MissingPort(rest.to_string())),
            None => return Err(UriError::BadHost(rest.to_string())),
        }
    } else {
        let Some((host, port)) = rest.rsplit_once(':') else {
            return Err(UriError::MissingPort(rest.to_string()));
        };
        if host.contains(':') {
            return Err(UriError::BadHost(host.to_string()));
        }
        (host, port)
    };
    if port.is_empty() {
        return Err(UriError::MissingPort(rest.to_string()));
    }
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(UriError::BadPort(port.to_string()));
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| UriError::BadPort(port.to_string()))?;
    Ok(MigrationUri::Tcp {
        host: host.to_string(),
        port,
    })
}

impl fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationUri::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            MigrationUri::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            MigrationUri::Unix(path) => write!(f, "unix:{}", path.display()),
            MigrationUri::Fd(fd) => write!(f, "fd:{fd}"),
        }
    }
}

impl From<SocketAddr> for MigrationUri {
    /// The `tcp:` address of a resolved socket address.
    fn from(addr: SocketAddr) -> Self {
        MigrationUri::Tcp {
            host: addr.ip().to_string(),
            port: addr.port(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> MigrationUri {
        s.parse().unwrap()
    }

    #[test]
    fn parse_round_trips() {
        for s in [
            "tcp:localhost:4444",
            "tcp:10.0.0.2:0",
            "tcp:[::1]:4444",
            "tcp:[fe80::1]:65535",
            "tcp::4444",
            "unix:/tmp/mig.sock",
            "unix:relative/x.sock",
            "fd:0",
            "fd:42",
        ] {
            assert_eq!(uri(s).to_string(), s);
        }
        assert_eq!(
            uri("tcp:[::1]:4444"),
            MigrationUri::Tcp {
                host: "::1".into(),
                port: 4444
            }
        );
        assert_eq!(uri("unix:/a b"), MigrationUri::Unix("/a b".into()));
        assert_eq!(uri("fd:7"), MigrationUri::Fd(7));
    }

    #[test]
    fn parse_errors() {
        let err = |s: &str| s.parse::<MigrationUri>().unwrap_err();
        assert_eq!(err("udp:x:1"), UriError::UnknownScheme("udp".into()));
        assert_eq!(
            err("localhost"),
            UriError::UnknownScheme("localhost".into())
        );
        assert_eq!(
            err("tcp:localhost"),
            UriError::MissingPort("localhost".into())
        );
        assert_eq!(
            err("tcp:localhost:"),
            UriError::MissingPort("localhost:".into())
        );
        assert_eq!(err("tcp:[::1]"), UriError::MissingPort("[::1]".into()));
        assert_eq!(err("tcp:h:65536"), UriError::BadPort("65536".into()));
        assert_eq!(err("tcp:h:+1"), UriError::BadPort("+1".into()));
        assert_eq!(err("tcp:h:http"), UriError::BadPort("http".into()));
        assert_eq!(err("tcp:::1:4444"), UriError::BadHost("::1".into()));
        assert_eq!(err("tcp:[::1:4444"), UriError::BadHost("[::1:4444".into()));
        assert_eq!(err("tcp:[host]:1"), UriError::BadHost("host".into()));
        assert_eq!(err("tcp:[::1]x:1"), UriError::BadHost("[::1]x:1".into()));
        assert_eq!(err("unix:"), UriError::EmptyPath);
        let long = format!("unix:/{}", "x".repeat(UNIX_PATH_MAX));
        assert_eq!(err(&long), UriError::PathTooLong(UNIX_PATH_MAX + 1));
        assert_eq!(err("fd:"), UriError::BadFd("".into()));
        assert_eq!(err("fd:-1"), UriError::BadFd("-1".into()));
        assert_eq!(err("fd:sock"), UriError::BadFd("sock".into()));
        assert_eq!(err("fd:99999999999"), UriError::BadFd("99999999999".into()));
        // Every message names the offending text.
        assert!(err("tcp:h:70000").to_string().contains("70000"));
        assert!(err("sctp:h:1").to_string().contains("sctp"));
    }
}
