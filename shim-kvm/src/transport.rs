//! Migration transport: QEMU-style addresses and the stream sockets they name.
//!
//! The migration engines in `livemig-core` are sans-IO: they say which bytes
//! to send and consume the bytes that arrived. This module is where those
//! bytes meet the kernel. It offers
//!
//! - [`MigrationUri`]: `tcp:HOST:PORT` (IPv6 as `tcp:[::1]:4444`),
//!   `unix:PATH` and `fd:N`, parsed once into a validated value with a typed
//!   [`UriError`], and printed back in the same syntax;
//! - [`Connection`]: one connected stream socket carrying the main stream
//!   *and* the return path (as in QEMU), cloneable so one thread can read the
//!   return path while another writes pages, and shut down from any thread to
//!   cancel or pause a migration;
//! - [`Listener`]: the destination's side, binding the same addresses;
//! - [`Connection::write_page_iovecs`]: a record header plus guest pages
//!   (gathered by [`PageIovecs`]) in vectored writes (`sendmsg`), straight
//!   from guest RAM without an intermediate copy.
//!
//! Every error is a [`TransportError`] whose `Display` is one line naming
//! the address or descriptor involved, ready to be the CLI's error line.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, IoSlice, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crate::memory::{MemoryError, PageIovecs};

/// Longest Unix socket path the kernel accepts: `sun_path` is 108 bytes
/// including the terminating NUL.
pub const UNIX_PATH_MAX: usize = 107;

/// Socket buffer size asked for on migration sockets: large buffers keep a
/// single stream near line rate when the receiver briefly falls behind.
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// Most iovecs one `sendmsg` takes on Linux (`UIO_MAXIOV`); longer lists are
/// written in chunks of this many.
const IOV_MAX: usize = libc::UIO_MAXIOV as usize;

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
    /// hands the descriptor's ownership to the [`Connection`] or
    /// [`Listener`]; see [`Connection::connect`] for how that is checked.
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

/// Why a transport operation failed. Each variant names the address or
/// descriptor it concerns, so `Display` alone makes a complete error line.
#[derive(Debug)]
pub enum TransportError {
    /// The address is already taken (a busy port, or a Unix socket path
    /// with a live listener behind it); holds the address.
    AddrInUse(String),
    /// Nothing listens at the address; holds the address.
    ConnectionRefused(String),
    /// No route to the address (network or host unreachable, or the
    /// connection attempt timed out).
    Unreachable {
        /// Where the connection was going.
        to: String,
        /// The kernel's error.
        source: io::Error,
    },
    /// The host name did not resolve to any address.
    Resolve {
        /// The name as given.
        host: String,
        /// The resolver's error.
        source: io::Error,
    },
    /// `fd:N` names something other than a TCP or Unix stream socket.
    NotASocket {
        /// The descriptor.
        fd: RawFd,
        /// What it is instead, e.g. "a regular file", "a datagram socket".
        found: &'static str,
    },
    /// `fd:N` names a descriptor with close-on-exec set: it was opened by
    /// this process (or already claimed by an earlier `fd:N`), not
    /// inherited, so taking ownership of it would steal it from its owner.
    FdNotInherited(RawFd),
    /// A [`Listener`] over an already-connected `fd:N` has handed out its
    /// one connection; holds the descriptor.
    FdAlreadyAccepted(RawFd),
    /// A page to send is outside guest RAM.
    Memory(MemoryError),
    /// Any other I/O failure, with what was being done when it happened.
    Io {
        /// The operation and address, e.g. "writing to tcp:10.0.0.2:4444".
        what: String,
        /// The kernel's error.
        source: io::Error,
    },
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportError::AddrInUse(a) => write!(f, "address {a} is already in use"),
            TransportError::ConnectionRefused(a) => {
                write!(f, "connection to {a} refused (nothing is listening there)")
            }
            TransportError::Unreachable { to, source } => {
                write!(f, "cannot reach {to}: {source}")
            }
            TransportError::Resolve { host, source } => {
                write!(f, "cannot resolve host '{host}': {source}")
            }
            TransportError::NotASocket { fd, found } => {
                write!(
                    f,
                    "fd:{fd} is not a TCP or Unix stream socket: it is {found}"
                )
            }
            TransportError::FdNotInherited(fd) => write!(
                f,
                "fd:{fd} has close-on-exec set, so it was not inherited (or is already in use)"
            ),
            TransportError::FdAlreadyAccepted(fd) => write!(
                f,
                "fd:{fd} is a connected socket and its one connection was already accepted"
            ),
            TransportError::Memory(e) => write!(f, "page batch: {e}"),
            TransportError::Io { what, source } => write!(f, "{what}: {source}"),
        }
    }
}

impl std::error::Error for TransportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TransportError::Unreachable { source, .. }
            | TransportError::Resolve { source, .. }
            | TransportError::Io { source, .. } => Some(source),
            TransportError::Memory(e) => Some(e),
            _ => None,
        }
    }
}

impl From<MemoryError> for TransportError {
    fn from(e: MemoryError) -> Self {
        TransportError::Memory(e)
    }
}

fn io_err(what: impl Into<String>, source: io::Error) -> TransportError {
    TransportError::Io {
        what: what.into(),
        source,
    }
}

/// Classifies a failed `connect` to `to`.
fn connect_err(to: String, e: io::Error) -> TransportError {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => TransportError::ConnectionRefused(to),
        Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ETIMEDOUT) => {
            TransportError::Unreachable { to, source: e }
        }
        _ => io_err(format!("connecting to {to}"), e),
    }
}

/// Classifies a failed `bind` of `addr`.
fn bind_err(addr: String, e: io::Error) -> TransportError {
    if e.kind() == io::ErrorKind::AddrInUse {
        TransportError::AddrInUse(addr)
    } else {
        io_err(format!("listening on {addr}"), e)
    }
}

/// The socket behind a connection. Both kinds do the same reads, writes and
/// shutdowns; they differ in addresses and in TCP's Nagle setting.
#[derive(Debug)]
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }

    /// Per-connection options: no Nagle delay on TCP (the return path's small
    /// messages must not wait for a full segment) and large socket buffers.
    fn tune(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_nodelay(true)?;
                tune_buffers(s.as_raw_fd(), true)
            }
            Stream::Unix(s) => tune_buffers(s.as_raw_fd(), false),
        }
    }
}

/// One connected migration stream, carrying both directions: the main
/// stream from source to destination and the return path back.
///
/// Every operation takes `&self`, and [`Connection::try_clone`] gives a
/// second handle on the same socket, so the return-path reader and the page
/// writer run on different threads, and any thread can
/// [`shutdown`](Connection::shutdown) the connection to cancel or pause.
#[derive(Debug)]
pub struct Connection {
    stream: Stream,
    peer: String,
    /// How long a write may go without the socket accepting a byte, in
    /// nanoseconds; 0: forever. See [`Connection::set_write_timeout`].
    stall_limit_ns: AtomicU64,
}

impl Connection {
    /// Connects to `uri`.
    ///
    /// - `tcp:`: resolves the host and tries each address in turn; the error
    ///   reported is the last address's. Blocks for the kernel's connect
    ///   timeout at most.
    /// - `unix:`: connects to the socket at the path.
    /// - `fd:N`: takes ownership of inherited descriptor `N`, which must be a
    ///   connected TCP or Unix stream socket. Because ownership of a
    ///   descriptor cannot be checked in general, the descriptor must not
    ///   have close-on-exec set: every descriptor Rust's standard library,
    ///   kvm-ioctls and this crate open has it, whereas a descriptor that
    ///   survived `exec` does not. Claiming sets close-on-exec, so the same
    ///   number cannot be claimed twice.
    ///
    /// The socket gets `TCP_NODELAY` (TCP) and large buffers (see
    /// [`SOCKET_BUFFER_BYTES`]).
    pub fn connect(uri: &MigrationUri) -> Result<Connection, TransportError> {
        let stream = match uri {
            MigrationUri::Tcp { host, port } => {
                let target = if host.is_empty() { "localhost" } else { host };
                let addrs = resolve(target, *port)?;
                let mut last = None;
                let mut found = None;
                for addr in addrs {
                    match TcpStream::connect(addr) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = Some(connect_err(MigrationUri::from(addr).to_string(), e)),
                    }
                }
                match (found, last) {
                    (Some(s), _) => Stream::Tcp(s),
                    (None, Some(e)) => return Err(e),
                    (None, None) => {
                        return Err(TransportError::Resolve {
                            host: target.to_string(),
                            source: io::ErrorKind::NotFound.into(),
                        });
                    }
                }
            }
            MigrationUri::Unix(path) => UnixStream::connect(path)
                .map(Stream::Unix)
                .map_err(|e| connect_err(uri.to_string(), e))?,
            MigrationUri::Fd(fd) => {
                let (owned, info) = claim_inherited(*fd, false)?;
                stream_from_fd(owned, info.family)
            }
        };
        Connection::tuned(stream, uri.to_string())
    }

    fn tuned(stream: Stream, peer: String) -> Result<Connection, TransportError> {
        stream
            .tune()
            .map_err(|e| io_err(format!("setting socket options on {peer}"), e))?;
        Ok(Connection {
            stream,
            peer,
            stall_limit_ns: AtomicU64::new(0),
        })
    }

    /// The address of the other end as text, for log and error lines.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// A second handle on the same socket (a `dup` of its descriptor), so the
    /// return path can be read on one thread while another writes.
    pub fn try_clone(&self) -> Result<Connection, TransportError> {
        let stream = match &self.stream {
            Stream::Tcp(s) => s.try_clone().map(Stream::Tcp),
            Stream::Unix(s) => s.try_clone().map(Stream::Unix),
        }
        .map_err(|e| io_err(format!("duplicating the socket to {}", self.peer), e))?;
        Ok(Connection {
            stream,
            peer: self.peer.clone(),
            stall_limit_ns: AtomicU64::new(self.stall_limit_ns.load(Ordering::Relaxed)),
        })
    }

    /// Writes all of `buf`, retrying after partial writes and interrupts.
    pub fn write_all(&self, buf: &[u8]) -> Result<(), TransportError> {
        self.write_vectored_all(&mut [IoSlice::new(buf)])
    }

    /// Writes every byte of `bufs`, in order, with as few system calls as
    /// the socket allows.
    ///
    /// A write may stop anywhere, even inside a slice; the remainder is
    /// found by advancing across the slices already written, which is why
    /// `bufs` is mutable: on return its contents are unspecified. Lists
    /// longer than the kernel's iovec limit go out in chunks of that many.
    /// Writes use `sendmsg` with `MSG_NOSIGNAL`, so a peer that went away is
    /// an `EPIPE` error even in a host process that has not ignored
    /// `SIGPIPE`, and `MSG_DONTWAIT`, so that a full socket is waited on
    /// with `poll` against the write timeout
    /// ([`set_write_timeout`](Connection::set_write_timeout)), measured
    /// from the last byte the socket accepted.
    pub fn write_vectored_all(&self, bufs: &mut [IoSlice<'_>]) -> Result<(), TransportError> {
        let fd = self.stream.raw_fd();
        let limit = self.stall_limit();
        write_vectored_all_with(
            bufs,
            limit,
            |chunk| send_vectored(fd, chunk),
            |left| wait_writable(fd, left),
        )
        .map_err(|e| {
            io_err(
                format!("writing to {}", self.peer),
                explain_timeout(e, limit),
            )
        })
    }

    /// Sends a record header and its pages with
    /// [`write_vectored_all`](Connection::write_vectored_all), the pages
    /// copied by the kernel straight out of guest RAM.
    pub fn write_page_iovecs(&self, mut pages: PageIovecs<'_>) -> Result<(), TransportError> {
        self.write_vectored_all(pages.as_io_slices())
    }

    /// Reads what is available into `buf`, blocking until at least one byte
    /// is. Returns 0 at end of stream: the peer closed, or this connection
    /// was [`shutdown`](Connection::shutdown) from another thread.
    pub fn read(&self, buf: &mut [u8]) -> Result<usize, TransportError> {
        loop {
            let got = match &self.stream {
                Stream::Tcp(s) => (&*s).read(buf),
                Stream::Unix(s) => (&*s).read(buf),
            };
            match got {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => {
                    return other.map_err(|e| {
                        io_err(
                            format!("reading from {}", self.peer),
                            explain_timeout(e, self.stall_limit()),
                        )
                    });
                }
            }
        }
    }

    /// Fills `buf` exactly; an end of stream first is an `Io` error of kind
    /// `UnexpectedEof`.
    pub fn read_exact(&self, buf: &mut [u8]) -> Result<(), TransportError> {
        match &self.stream {
            Stream::Tcp(s) => (&*s).read_exact(buf),
            Stream::Unix(s) => (&*s).read_exact(buf),
        }
        .map_err(|e| io_err(format!("reading from {}", self.peer), e))
    }

    /// The bound set by [`set_write_timeout`](Connection::set_write_timeout).
    fn stall_limit(&self) -> Option<Duration> {
        match self.stall_limit_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }

    /// Bounds how long writes on this handle (and on clones made after
    /// this call) may go without the socket accepting a single byte
    /// (`None`: forever). A peer that stops reading, or a link that died,
    /// fills the socket buffers; with a bound the write fails with a
    /// timed-out error within `timeout` of the last byte accepted, however
    /// the writes were cut up, instead of hanging the sender with its
    /// guest perhaps stopped.
    ///
    /// On TCP the kernel is told too: `TCP_USER_TIMEOUT` aborts the
    /// connection when sent data stays unacknowledged (or the peer's window
    /// stays shut) for `timeout`, and keepalive probes an idle connection,
    /// so a blocked reader of the same socket also learns of a dead link.
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> Result<(), TransportError> {
        let ns = timeout.map_or(0, |t| {
            u64::try_from(t.as_nanos()).unwrap_or(u64::MAX).max(1)
        });
        self.stall_limit_ns.store(ns, Ordering::Relaxed);
        if let Stream::Tcp(s) = &self.stream {
            tcp_dead_peer_timeout(s.as_raw_fd(), timeout)
                .map_err(|e| io_err(format!("setting a write timeout on {}", self.peer), e))?;
        }
        Ok(())
    }

    /// Shuts the socket down in one or both directions, for every handle
    /// cloned from it: a thread blocked in [`read`](Connection::read) wakes
    /// with end of stream, and writes fail. This is how a migration is
    /// cancelled (or a postcopy migration paused) from another thread. A
    /// socket the peer already disconnected counts as shut down.
    pub fn shutdown(&self, how: Shutdown) -> Result<(), TransportError> {
        match &self.stream {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
        .or_else(|e| match e.kind() {
            io::ErrorKind::NotConnected => Ok(()),
            _ => Err(io_err(
                format!("shutting down the socket to {}", self.peer),
                e,
            )),
        })
    }
}

/// What the socket knows about the data in flight: the inputs of the
/// source's convergence decision.
impl Connection {
    /// Bytes written that the peer has not taken yet (`ioctl(SIOCOUTQ)`):
    /// on TCP, not yet acknowledged (in the send queue, in a qdisc, or on
    /// the wire); on a Unix socket, not yet read by the peer. A stop waits
    /// for all of them.
    pub fn unsent_bytes(&self) -> Result<u64, TransportError> {
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one c_int through the
        // pointer, which points at a live local of that type.
        let rc = unsafe {
            libc::ioctl(
                self.stream.raw_fd(),
                libc::TIOCOUTQ,
                &mut queued as *mut libc::c_int,
            )
        };
        if rc != 0 {
            return Err(io_err(
                format!("reading the send queue of {}", self.peer),
                io::Error::last_os_error(),
            ));
        }
        Ok(u64::try_from(queued).unwrap_or(0))
    }

    /// The kernel's smoothed round-trip time of a TCP connection
    /// (`TCP_INFO`); zero for a Unix socket, whose peer is on this host.
    pub fn round_trip(&self) -> Result<Duration, TransportError> {
        let Stream::Tcp(s) = &self.stream else {
            return Ok(Duration::ZERO);
        };
        // SAFETY: tcp_info is plain integers, for which all-zero is valid.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into `info` and the
        // length written into `len`; both are live locals.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io_err(
                format!("reading TCP_INFO of {}", self.peer),
                io::Error::last_os_error(),
            ));
        }
        Ok(Duration::from_micros(u64::from(info.tcpi_rtt)))
    }
}

impl AsRawFd for Connection {
    /// The socket descriptor, for `poll` and socket options this type does
    /// not wrap. The connection keeps ownership.
    fn as_raw_fd(&self) -> RawFd {
        self.stream.raw_fd()
    }
}

/// The listening side of a migration: the destination binds the address
/// given to `-incoming` and accepts the source's connection(s).
#[derive(Debug)]
pub struct Listener {
    kind: ListenerKind,
}

#[derive(Debug)]
enum ListenerKind {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        /// The socket file this listener created, removed again on drop.
        bound: Option<BoundPath>,
        uri: MigrationUri,
    },
    /// `fd:N` that was already connected: accepted once.
    Connected {
        fd: RawFd,
        conn: Mutex<Option<Connection>>,
    },
}

/// A socket file created by [`Listener::bind`], identified by inode so that
/// drop never removes a file someone else put at the same path.
#[derive(Debug)]
struct BoundPath {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Listener {
    /// Starts listening on `uri`.
    ///
    /// - `tcp:`: binds the first resolved address that works; an empty host
    ///   binds every IPv4 address, and port 0 picks a free port (read it back
    ///   with [`local_uri`](Listener::local_uri)).
    /// - `unix:`: a leftover socket file at the path is removed only if it is
    ///   a socket nobody listens on; a live listener gives
    ///   [`TransportError::AddrInUse`], and a non-socket file is left alone
    ///   and refused. The socket file is removed when the listener drops.
    /// - `fd:N` (ownership rules as in [`Connection::connect`]): a listening
    ///   TCP or Unix socket is accepted on as many times as asked; an
    ///   already-connected one is handed out by the first
    ///   [`accept`](Listener::accept) and later calls fail with
    ///   [`TransportError::FdAlreadyAccepted`] (QEMU's `-incoming fd:N`
    ///   case, where the management layer connected the socket).
    pub fn bind(uri: &MigrationUri) -> Result<Listener, TransportError> {
        let kind = match uri {
            MigrationUri::Tcp { host, port } => {
                let target = if host.is_empty() { "0.0.0.0" } else { host };
                let mut last = None;
                let mut found = None;
                for addr in resolve(target, *port)? {
                    match TcpListener::bind(addr) {
                        Ok(l) => {
                            found = Some(l);
                            break;
                        }
                        Err(e) => last = Some(bind_err(MigrationUri::from(addr).to_string(), e)),
                    }
                }
                let listener = match (found, last) {
                    (Some(l), _) => l,
                    (None, Some(e)) => return Err(e),
                    (None, None) => {
                        return Err(TransportError::Resolve {
                            host: target.to_string(),
                            source: io::ErrorKind::NotFound.into(),
                        });
                    }
                };
                // Accepted sockets inherit the listener's buffer sizes, and
                // the receive window scale is fixed when the SYN is answered.
                tune_buffers(listener.as_raw_fd(), true)
                    .map_err(|e| io_err(format!("setting socket options on {uri}"), e))?;
                ListenerKind::Tcp(listener)
            }
            MigrationUri::Unix(path) => {
                remove_stale_socket(path, uri)?;
                let listener =
                    UnixListener::bind(path).map_err(|e| bind_err(uri.to_string(), e))?;
                let meta = fs::symlink_metadata(path)
                    .map_err(|e| io_err(format!("inspecting {uri} after binding"), e))?;
                ListenerKind::Unix {
                    listener,
                    bound: Some(BoundPath {
                        path: path.clone(),
                        dev: meta.dev(),
                        ino: meta.ino(),
                    }),
                    uri: uri.clone(),
                }
            }
            MigrationUri::Fd(fd) => {
                let (owned, info) = claim_inherited(*fd, true)?;
                match (info.listening, info.family) {
                    (true, Family::Inet) => ListenerKind::Tcp(TcpListener::from(owned)),
                    (true, Family::Unix) => ListenerKind::Unix {
                        listener: UnixListener::from(owned),
                        bound: None,
                        uri: uri.clone(),
                    },
                    (false, family) => ListenerKind::Connected {
                        fd: *fd,
                        conn: Mutex::new(Some(Connection::tuned(
                            stream_from_fd(owned, family),
                            uri.to_string(),
                        )?)),
                    },
                }
            }
        };
        Ok(Listener { kind })
    }

    /// The address actually listened on: for TCP the bound IP and port
    /// (the real port when 0 was asked for), for Unix the path, and `fd:N`
    /// for an inherited socket that has no better name.
    pub fn local_uri(&self) -> Result<MigrationUri, TransportError> {
        match &self.kind {
            ListenerKind::Tcp(l) => l
                .local_addr()
                .map(MigrationUri::from)
                .map_err(|e| io_err("reading the listening address", e)),
            ListenerKind::Unix { listener, uri, .. } => {
                let addr = listener
                    .local_addr()
                    .map_err(|e| io_err(format!("reading the address of {uri}"), e))?;
                Ok(match addr.as_pathname() {
                    Some(p) => MigrationUri::Unix(p.to_path_buf()),
                    None => uri.clone(),
                })
            }
            ListenerKind::Connected { fd, .. } => Ok(MigrationUri::Fd(*fd)),
        }
    }

    /// Waits for the next incoming connection and returns it tuned like
    /// [`Connection::connect`]'s.
    pub fn accept(&self) -> Result<Connection, TransportError> {
        match &self.kind {
            ListenerKind::Tcp(l) => {
                let (s, addr) = accept_retrying(|| l.accept())
                    .map_err(|e| io_err("accepting a tcp connection", e))?;
                Connection::tuned(Stream::Tcp(s), MigrationUri::from(addr).to_string())
            }
            ListenerKind::Unix { listener, uri, .. } => {
                let (s, _) = accept_retrying(|| listener.accept())
                    .map_err(|e| io_err(format!("accepting a connection on {uri}"), e))?;
                Connection::tuned(Stream::Unix(s), uri.to_string())
            }
            ListenerKind::Connected { fd, conn } => conn
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
                .ok_or(TransportError::FdAlreadyAccepted(*fd)),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let ListenerKind::Unix { bound: Some(b), .. } = &self.kind {
            // Only our own socket file: another listener may have replaced it.
            let ours = fs::symlink_metadata(&b.path)
                .is_ok_and(|meta| meta.dev() == b.dev && meta.ino() == b.ino);
            if ours {
                // Nothing useful can be done if this fails; the next bind
                // treats the leftover file as stale.
                let _ = fs::remove_file(&b.path);
            }
        }
    }
}

/// The loop behind [`Connection::write_vectored_all`], over any
/// non-blocking vectored `write`: calls it with at most [`IOV_MAX`] slices
/// at a time, skips what each call wrote (which may end inside a slice),
/// retries interrupts, and when the socket is full calls `wait` with the
/// time left before `stall_limit` runs out, counted from the last call that
/// took a byte (`wait` returns `false` when that time passed with the
/// socket still full). Only progress resets the clock: a peer that takes a
/// byte now and then keeps the write alive, one that takes nothing for
/// `stall_limit` fails it, whatever the sizes of the writes.
fn write_vectored_all_with(
    mut bufs: &mut [IoSlice<'_>],
    stall_limit: Option<Duration>,
    mut write: impl FnMut(&[IoSlice<'_>]) -> io::Result<usize>,
    mut wait: impl FnMut(Option<Duration>) -> io::Result<bool>,
) -> io::Result<()> {
    // Drop leading empty slices, so a chunk is never all empty and a write
    // of 0 bytes always means the socket took nothing.
    IoSlice::advance_slices(&mut bufs, 0);
    let mut progress_at = Instant::now();
    while !bufs.is_empty() {
        match write(&bufs[..bufs.len().min(IOV_MAX)]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                IoSlice::advance_slices(&mut bufs, n);
                progress_at = Instant::now();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = stall_limit.map(|l| l.saturating_sub(progress_at.elapsed()));
                if left.is_some_and(|l| l.is_zero()) || !wait(left)? {
                    return Err(io::ErrorKind::TimedOut.into());
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Waits until socket `fd` can take more bytes, or reports an error for
/// the next write to see; `false` when `limit` passed first (`None`: no
/// limit). An interrupted wait returns `true`: the caller's loop retries.
fn wait_writable(fd: RawFd, limit: Option<Duration>) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // Rounded up, so a wait never ends just before the limit.
    let ms = limit.map_or(-1, |l| {
        libc::c_int::try_from(l.as_nanos().div_ceil(1_000_000)).unwrap_or(libc::c_int::MAX)
    });
    // SAFETY: `pfd` is one live, initialised pollfd and the count says one.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    match n {
        0 => Ok(false),
        1.. => Ok(true),
        _ => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(true)
            } else {
                Err(e)
            }
        }
    }
}

/// A write that failed for lack of progress, in words: the stall found by
/// the write loop, or the kernel's `TCP_USER_TIMEOUT` abort (`ETIMEDOUT`,
/// which a read of the same socket may be the one to see).
fn explain_timeout(e: io::Error, limit: Option<Duration>) -> io::Error {
    if e.kind() != io::ErrorKind::TimedOut || limit.is_none() {
        return e;
    }
    let ms = limit.map_or(0, |l| l.as_millis());
    let why = if e.raw_os_error() == Some(libc::ETIMEDOUT) {
        "the connection timed out: sent data went unacknowledged"
    } else {
        "no byte was accepted"
    };
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "the peer stopped reading or the link is down: {why} for {ms} ms (the write timeout)"
        ),
    )
}

/// `TCP_USER_TIMEOUT` and keepalive on TCP socket `fd` for a write timeout
/// (`None`: the kernel's defaults). Keepalive starts probing after half the
/// timeout of silence, every second; the user timeout then decides when
/// the probes have gone unanswered for too long.
fn tcp_dead_peer_timeout(fd: RawFd, timeout: Option<Duration>) -> io::Result<()> {
    let ms = timeout.map_or(0, |t| {
        libc::c_int::try_from(t.as_millis().max(1)).unwrap_or(libc::c_int::MAX)
    });
    set_opt_int(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms)?;
    let Some(t) = timeout else {
        return set_sockopt_int(fd, libc::SO_KEEPALIVE, 0);
    };
    let idle_s = libc::c_int::try_from(t.as_secs() / 2)
        .unwrap_or(libc::c_int::MAX)
        .max(1);
    set_sockopt_int(fd, libc::SO_KEEPALIVE, 1)?;
    set_opt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, idle_s)?;
    set_opt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1)
}

/// One `sendmsg` of `chunk` on socket `fd`, without raising `SIGPIPE` and
/// without blocking (a full socket is `WouldBlock`).
fn send_vectored(fd: RawFd, chunk: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid: no address, no iovecs, no control
    // data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = chunk.as_ptr().cast_mut().cast::<libc::iovec>();
    msg.msg_iovlen = chunk.len() as _;
    // SAFETY: `IoSlice` is guaranteed ABI-compatible with `iovec` on Unix, so
    // `msg_iov` points to `chunk.len()` valid iovecs over buffers that live
    // for this call; sendmsg only reads them (and reads nothing else: no
    // address or control data is set).
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn accept_retrying<T>(mut accept: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match accept() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn resolve(host: &str, port: u16) -> Result<std::vec::IntoIter<SocketAddr>, TransportError> {
    (host, port)
        .to_socket_addrs()
        .map_err(|source| TransportError::Resolve {
            host: host.to_string(),
            source,
        })
}

/// Clears the way for binding a Unix socket at `path`: removes a socket file
/// nobody listens on (left by a crashed destination), and refuses a live
/// socket or any other kind of file.
fn remove_stale_socket(path: &Path, uri: &MigrationUri) -> Result<(), TransportError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(format!("inspecting {uri}"), e)),
    };
    if !meta.file_type().is_socket() {
        return Err(io_err(
            format!("listening on {uri}: the path exists and is not a socket"),
            io::ErrorKind::AlreadyExists.into(),
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(TransportError::AddrInUse(uri.to_string())),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            fs::remove_file(path).map_err(|e| io_err(format!("removing the stale socket {uri}"), e))
        }
        Err(e) => Err(io_err(format!("probing the existing socket {uri}"), e)),
    }
}

/// Address family of an inherited socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Inet,
    Unix,
}

/// What [`inspect_socket`] learned about a descriptor.
#[derive(Debug, Clone, Copy)]
struct SocketInfo {
    family: Family,
    listening: bool,
}

fn stream_from_fd(fd: OwnedFd, family: Family) -> Stream {
    match family {
        Family::Inet => Stream::Tcp(TcpStream::from(fd)),
        Family::Unix => Stream::Unix(UnixStream::from(fd)),
    }
}

/// Serialises claims so two threads cannot both see close-on-exec clear on
/// the same descriptor and both take ownership of it.
static CLAIM_LOCK: Mutex<()> = Mutex::new(());

/// Takes ownership of inherited descriptor `fd` after checking that it is a
/// TCP or Unix stream socket that nothing in this process owns yet, and
/// connected unless `may_listen`. A refused descriptor is left untouched.
fn claim_inherited(fd: RawFd, may_listen: bool) -> Result<(OwnedFd, SocketInfo), TransportError> {
    let _guard = CLAIM_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    let info = inspect_socket(fd)?;
    if info.listening && !may_listen {
        return Err(TransportError::NotASocket {
            fd,
            found: "a listening socket (it can receive a migration, not send one)",
        });
    }
    // SAFETY: F_GETFD reads the descriptor flags of `fd` (checked open by
    // inspect_socket); it touches no memory of ours.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io_err(
            format!("reading the flags of fd:{fd}"),
            io::Error::last_os_error(),
        ));
    }
    if flags & libc::FD_CLOEXEC != 0 {
        return Err(TransportError::FdNotInherited(fd));
    }
    // SAFETY: F_SETFD only changes the descriptor flags of `fd`.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io_err(
            format!("setting close-on-exec on fd:{fd}"),
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` is open (fstat succeeded) and is a stream socket. Nothing
    // else in this process owns it: it lacked close-on-exec, which every
    // descriptor opened in-process by std, kvm-ioctls and this crate has, so
    // it was inherited across exec for us (the `fd:N` contract); and setting
    // close-on-exec above, under CLAIM_LOCK, makes any later claim of the
    // same number fail.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok((owned, info))
}

/// Checks that `fd` is an open TCP (IPv4/IPv6) or Unix stream socket and
/// whether it is listening; otherwise says what it is.
fn inspect_socket(fd: RawFd) -> Result<SocketInfo, TransportError> {
    // SAFETY: all-zero bytes are a valid `struct stat` (plain integers).
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one `struct stat` into `st`, which is exactly that
    // size; a number that is not an open descriptor just gives EBADF.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io_err(
            format!("inspecting fd:{fd}"),
            io::Error::last_os_error(),
        ));
    }
    let not = |found| Err(TransportError::NotASocket { fd, found });
    match st.st_mode & libc::S_IFMT {
        libc::S_IFSOCK => {}
        libc::S_IFREG => return not("a regular file"),
        libc::S_IFDIR => return not("a directory"),
        libc::S_IFIFO => return not("a pipe"),
        libc::S_IFCHR => return not("a character device"),
        libc::S_IFBLK => return not("a block device"),
        _ => return not("not a socket"),
    }
    let opt = |name, what: &str| {
        sockopt_int(fd, name).map_err(|e| io_err(format!("reading {what} of fd:{fd}"), e))
    };
    match opt(libc::SO_TYPE, "the socket type")? {
        libc::SOCK_STREAM => {}
        libc::SOCK_DGRAM => return not("a datagram socket"),
        libc::SOCK_SEQPACKET => return not("a seqpacket socket"),
        _ => return not("a socket of another type than stream"),
    }
    let family = match opt(libc::SO_DOMAIN, "the socket family")? {
        libc::AF_INET | libc::AF_INET6 => Family::Inet,
        libc::AF_UNIX => Family::Unix,
        _ => return not("a stream socket of another family than TCP or Unix"),
    };
    let listening = opt(libc::SO_ACCEPTCONN, "the listening state")? != 0;
    Ok(SocketInfo { family, listening })
}

fn sockopt_int(fd: RawFd, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes (one c_int) into `value`
    // and the actual length into `len`; both are live locals.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_sockopt_int(fd: RawFd, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    set_opt_int(fd, libc::SOL_SOCKET, name, value)
}

/// `setsockopt` of one `int` option `name` at `level`.
fn set_opt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the kernel reads one c_int from `value`, a live local of the
    // length passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets large send and receive buffers where that helps.
///
/// Unix sockets have no autotuning, so they always ask for
/// [`SOCKET_BUFFER_BYTES`] (the kernel caps it at `net.core.[wr]mem_max`).
/// TCP autotunes up to `net.ipv4.tcp_[wr]mem`'s maximum, and setting a size
/// turns autotuning off and is capped at `net.core.[wr]mem_max`; so a TCP
/// buffer is only pinned when the pinned size (the kernel doubles the value
/// for bookkeeping) beats the autotuning ceiling.
fn tune_buffers(fd: RawFd, tcp: bool) -> io::Result<()> {
    for (opt, core_max, tcp_mem) in [
        (libc::SO_SNDBUF, "wmem_max", "tcp_wmem"),
        (libc::SO_RCVBUF, "rmem_max", "tcp_rmem"),
    ] {
        if !tcp || tcp_pin_beats_autotuning(core_max, tcp_mem) {
            set_sockopt_int(fd, opt, SOCKET_BUFFER_BYTES as libc::c_int)?;
        }
    }
    Ok(())
}

/// Whether pinning a TCP buffer at [`SOCKET_BUFFER_BYTES`] gives more than
/// autotuning would, from the sysctls (read once per process). Unreadable
/// sysctls leave TCP to autotuning.
fn tcp_pin_beats_autotuning(core_max: &'static str, tcp_mem: &'static str) -> bool {
    static CACHE: OnceLock<Mutex<BTreeMap<&'static str, bool>>> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    *cache.entry(core_max).or_insert_with(|| {
        let last_number = |path: String| -> Option<u64> {
            fs::read_to_string(path)
                .ok()?
                .split_whitespace()
                .last()?
                .parse()
                .ok()
        };
        match (
            last_number(format!("/proc/sys/net/core/{core_max}")),
            last_number(format!("/proc/sys/net/ipv4/{tcp_mem}")),
        ) {
            (Some(cap), Some(auto)) => 2 * cap.min(SOCKET_BUFFER_BYTES as u64) > auto,
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestMemory, PAGE_SIZE, RegionLayout};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::thread;
    use std::time::Duration;

    fn uri(s: &str) -> MigrationUri {
        s.parse().unwrap()
    }

    /// A socket path unique to this process and call.
    fn temp_sock(tag: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        std::env::temp_dir().join(format!(
            "livemig-{tag}-{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Pseudo-random bytes, different for each seed.
    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Reads `len` bytes on a thread, in reads of at most 60 KiB.
    fn reader(conn: Connection, len: usize) -> thread::JoinHandle<Vec<u8>> {
        thread::spawn(move || {
            let mut out = vec![0u8; len];
            let mut at = 0;
            while at < len {
                let want = (len - at).min(61_440);
                let n = conn.read(&mut out[at..at + want]).unwrap();
                assert!(n > 0, "early end of stream at {at}");
                at += n;
            }
            out
        })
    }

    /// `data` cut into slices of uneven sizes, some empty: ~2,600 slices for
    /// 8 MiB, more than two IOV_MAX chunks.
    fn uneven_slices(data: &[u8]) -> Vec<IoSlice<'_>> {
        let mut slices = Vec::new();
        let mut at = 0;
        let mut i = 0usize;
        while at < data.len() {
            let len = ((i * 7919) % 6000).min(data.len() - at);
            slices.push(IoSlice::new(&data[at..at + len]));
            at += len;
            i += 1;
        }
        slices
    }

    /// Sends 8 MiB with `write_vectored_all` and checks the reader got
    /// exactly those bytes.
    fn vectored_8mib(listener: &Listener, target: &MigrationUri) {
        let total = 8 << 20;
        let data = pattern(total, 7);
        let sender = Connection::connect(target).unwrap();
        let receiver = listener.accept().unwrap();
        let reader = reader(receiver, total);
        let mut slices = uneven_slices(&data);
        assert!(slices.len() > 2 * IOV_MAX);
        sender.write_vectored_all(&mut slices).unwrap();
        let got = reader.join().unwrap();
        assert!(got == data, "received bytes differ");
    }

    #[test]
    fn unsent_bytes_count_what_the_peer_has_not_taken() {
        let path = temp_sock("outq");
        let target = MigrationUri::Unix(path.clone());
        let listener = Listener::bind(&target).unwrap();
        let sender = Connection::connect(&target).unwrap();
        let receiver = listener.accept().unwrap();
        assert_eq!(sender.unsent_bytes().unwrap(), 0);
        assert_eq!(sender.round_trip().unwrap(), Duration::ZERO);
        sender.write_all(&pattern(65_536, 1)).unwrap();
        // Unix sockets count the queued buffers with their bookkeeping.
        assert!(sender.unsent_bytes().unwrap() >= 65_536);
        let got = reader(receiver, 65_536).join().unwrap();
        assert_eq!(got.len(), 65_536);
        assert_eq!(sender.unsent_bytes().unwrap(), 0, "all read");
        let _ = std::fs::remove_file(path);

        let listener = Listener::bind(&uri("tcp:127.0.0.1:0")).unwrap();
        let sender = Connection::connect(&listener.local_uri().unwrap()).unwrap();
        let receiver = listener.accept().unwrap();
        let data = pattern(1 << 20, 2);
        let reading = reader(receiver, data.len());
        sender.write_all(&data).unwrap();
        assert!(reading.join().unwrap() == data);
        // Everything was read, so everything was acknowledged; the ack may
        // still be on its way for a moment.
        let mut unsent = sender.unsent_bytes().unwrap();
        for _ in 0..100 {
            if unsent == 0 {
                break;
            }
            thread::sleep(Duration::from_millis(1));
            unsent = sender.unsent_bytes().unwrap();
        }
        assert_eq!(unsent, 0);
        assert!(sender.round_trip().unwrap() > Duration::ZERO);
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

    /// Blocking stream sockets rarely return short, so partial writes are
    /// driven by a writer that takes an awkward number of bytes per call
    /// (often ending inside a slice) and is sometimes interrupted.
    #[test]
    fn vectored_loop_handles_partial_writes_and_chunks() {
        let data = pattern(8 << 20, 3);
        let mut slices = uneven_slices(&data);
        let mut out = Vec::with_capacity(data.len());
        let mut calls = 0usize;
        let mut waits = 0usize;
        let waited = |_| {
            waits += 1;
            Ok(true)
        };
        write_vectored_all_with(
            &mut slices,
            None,
            |chunk| {
                calls += 1;
                assert!(chunk.len() <= IOV_MAX && !chunk.is_empty());
                if calls % 97 == 0 {
                    return Err(io::ErrorKind::Interrupted.into());
                }
                if calls % 13 == 0 {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                let mut cap = [1, 4095, 12_289, 1 << 20][calls % 4];
                for s in chunk {
                    let take = cap.min(s.len());
                    out.extend_from_slice(&s[..take]);
                    cap -= take;
                    if cap == 0 {
                        break;
                    }
                }
                Ok([1, 4095, 12_289, 1 << 20][calls % 4] - cap)
            },
            waited,
        )
        .unwrap();
        assert!(calls > 20, "{calls} calls");
        assert!(waits > 0, "a full socket was waited on");
        assert!(out == data, "bytes differ");

        // A write that takes nothing is an error, not a spin.
        let mut slices = [IoSlice::new(&[]), IoSlice::new(b"x")];
        let e = write_vectored_all_with(&mut slices, None, |_| Ok(0), |_| Ok(true)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WriteZero);
        // Only empty slices: nothing to write, no call made.
        let mut slices = [IoSlice::new(&[]), IoSlice::new(&[])];
        write_vectored_all_with(&mut slices, None, |_| unreachable!(), |_| unreachable!()).unwrap();
    }

    /// Issue 8 item 4: the write timeout is a deadline on progress. A
    /// socket that wakes its writer without taking anything does not extend
    /// it; one that takes a byte now and then does.
    #[test]
    fn the_write_timeout_counts_from_the_last_byte_accepted() {
        let limit = Duration::from_millis(300);
        let data = [7u8; 64];
        // One byte per 100 ms wait: 2 s in all, never 300 ms without progress.
        let mut slices = [IoSlice::new(&data[..20])];
        let started = Instant::now();
        write_vectored_all_with(
            &mut slices,
            Some(limit),
            {
                let mut ready = false;
                move |_| {
                    if std::mem::take(&mut ready) {
                        Ok(1)
                    } else {
                        ready = true;
                        Err(io::ErrorKind::WouldBlock.into())
                    }
                }
            },
            |left| {
                assert!(left.is_some_and(|l| l <= limit));
                thread::sleep(Duration::from_millis(100));
                Ok(true)
            },
        )
        .unwrap();
        assert!(started.elapsed() >= Duration::from_secs(2));

        // Ten bytes, then a full socket that keeps waking the writer.
        let mut slices = [IoSlice::new(&data)];
        let mut last_progress = Instant::now();
        let mut taken = 0;
        let e = write_vectored_all_with(
            &mut slices,
            Some(limit),
            |_| {
                if taken < 10 {
                    taken += 1;
                    last_progress = Instant::now();
                    Ok(1)
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                }
            },
            |left| {
                thread::sleep(left.unwrap().min(Duration::from_millis(20)));
                Ok(true)
            },
        )
        .unwrap_err();
        let stalled = last_progress.elapsed();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(stalled >= limit && stalled < limit * 2, "{stalled:?}");
    }

    /// The same over a real socket whose reader takes a little at a time
    /// (so writes go partial) and then stops: the write fails within the
    /// timeout of the stall, in words.
    #[test]
    fn a_reader_that_stops_fails_the_write_within_the_timeout() {
        let path = temp_sock("stall");
        let target = MigrationUri::Unix(path);
        let listener = Listener::bind(&target).unwrap();
        let writer = Connection::connect(&target).unwrap();
        let peer = listener.accept().unwrap();
        let limit = Duration::from_millis(400);
        writer.set_write_timeout(Some(limit)).unwrap();
        let stopped = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let until = Instant::now() + Duration::from_millis(500);
            while Instant::now() < until {
                peer.read(&mut buf).unwrap();
                thread::sleep(Duration::from_millis(1));
            }
            (Instant::now(), peer)
        });
        let data = vec![1u8; 256 << 20];
        let e = writer.write_all(&data).unwrap_err();
        let failed = Instant::now();
        let (stopped_at, _peer) = stopped.join().unwrap();
        let after = failed - stopped_at;
        assert!(after < limit + Duration::from_millis(500), "{after:?}");
        let text = e.to_string();
        assert!(text.contains("stopped reading"), "{text}");
        assert!(text.contains("400 ms"), "{text}");
    }

    #[test]
    fn tcp_vectored_8mib() {
        let listener = Listener::bind(&uri("tcp:127.0.0.1:0")).unwrap();
        let bound = listener.local_uri().unwrap();
        let MigrationUri::Tcp { ref host, port } = bound else {
            panic!("not tcp: {bound}");
        };
        assert_eq!(host, "127.0.0.1");
        assert_ne!(port, 0);
        vectored_8mib(&listener, &bound);
    }

    #[test]
    fn unix_vectored_8mib_and_socket_file_lifecycle() {
        let path = temp_sock("vec");
        let target = MigrationUri::Unix(path.clone());
        let listener = Listener::bind(&target).unwrap();
        assert_eq!(listener.local_uri().unwrap(), target);
        vectored_8mib(&listener, &target);
        // A live listener is not displaced.
        assert!(matches!(
            Listener::bind(&target),
            Err(TransportError::AddrInUse(a)) if a == target.to_string()
        ));
        drop(listener);
        assert!(!path.exists(), "socket file left behind");

        // A stale socket (its listener gone without cleaning up) is replaced.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let listener = Listener::bind(&target).unwrap();
        let c = Connection::connect(&target).unwrap();
        let s = listener.accept().unwrap();
        c.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        drop(listener);

        // A regular file in the way is neither removed nor bound over.
        fs::write(&path, b"keep").unwrap();
        let e = Listener::bind(&target).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(fs::read(&path).unwrap(), b"keep");
        fs::remove_file(&path).unwrap();
    }

    #[test]
    fn busy_port_and_refused_connection_are_named() {
        let first = Listener::bind(&uri("tcp:127.0.0.1:0")).unwrap();
        let bound = first.local_uri().unwrap();
        let MigrationUri::Tcp { port, .. } = bound else {
            panic!("not tcp: {bound}");
        };
        let e = Listener::bind(&bound).unwrap_err();
        assert!(
            matches!(&e, TransportError::AddrInUse(a) if a == &format!("tcp:127.0.0.1:{port}")),
            "{e:?}"
        );
        assert!(e.to_string().contains(&port.to_string()));

        drop(first);
        let e = Connection::connect(&bound).unwrap_err();
        assert!(
            matches!(&e, TransportError::ConnectionRefused(a) if a == &format!("tcp:127.0.0.1:{port}")),
            "{e:?}"
        );
        assert!(e.to_string().contains(&format!("127.0.0.1:{port}")));

        let missing = MigrationUri::Unix(temp_sock("none"));
        let e = Connection::connect(&missing).unwrap_err();
        assert!(e.to_string().contains(&missing.to_string()), "{e}");
    }

    #[test]
    fn shutdown_unblocks_a_blocked_reader_and_return_path_works() {
        let listener = Listener::bind(&uri("tcp:127.0.0.1:0")).unwrap();
        let src = Connection::connect(&listener.local_uri().unwrap()).unwrap();
        let dst = listener.accept().unwrap();
        // The return path runs on a clone of the source's connection.
        let ret = src.try_clone().unwrap();
        dst.write_all(b"ack").unwrap();
        let mut buf = [0u8; 3];
        ret.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ack");

        let (tx, rx) = mpsc::channel();
        let reader = thread::spawn(move || {
            let mut buf = [0u8; 16];
            tx.send(ret.read(&mut buf)).unwrap();
        });
        thread::sleep(Duration::from_millis(50));
        src.shutdown(Shutdown::Both).unwrap();
        let got = rx
            .recv_timeout(Duration::from_secs(1))
            .expect("reader still blocked");
        assert!(matches!(got, Ok(0) | Err(_)), "{got:?}");
        reader.join().unwrap();
        assert!(src.write_all(b"x").is_err());
        // The peer sees the end of the stream too, and a second shutdown is fine.
        assert_eq!(dst.read(&mut buf).unwrap(), 0);
        src.shutdown(Shutdown::Both).unwrap();
    }

    /// A socket pair whose descriptors lack close-on-exec, as inherited ones do.
    fn inheritable_pair() -> (RawFd, RawFd) {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: socketpair writes two descriptors into the 2-element array.
        let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) };
        assert_eq!(rc, 0);
        (fds[0], fds[1])
    }

    #[test]
    fn fd_connections_are_checked_and_claimed_once() {
        let (a, b) = inheritable_pair();
        let ca = Connection::connect(&MigrationUri::Fd(a)).unwrap();
        let listener = Listener::bind(&MigrationUri::Fd(b)).unwrap();
        assert_eq!(listener.local_uri().unwrap(), MigrationUri::Fd(b));
        let cb = listener.accept().unwrap();
        assert!(matches!(
            listener.accept(),
            Err(TransportError::FdAlreadyAccepted(fd)) if fd == b
        ));
        ca.write_all(b"over fd").unwrap();
        let mut buf = [0u8; 7];
        cb.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"over fd");
        // Already owned by `ca`: a second claim is refused.
        assert!(matches!(
            Connection::connect(&MigrationUri::Fd(a)),
            Err(TransportError::FdNotInherited(fd)) if fd == a
        ));

        let path = temp_sock("file");
        let file = fs::File::create(&path).unwrap();
        let e = Connection::connect(&MigrationUri::Fd(file.as_raw_fd())).unwrap_err();
        assert!(
            matches!(
                e,
                TransportError::NotASocket {
                    found: "a regular file",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains(&format!("fd:{}", file.as_raw_fd())));
        drop(file);
        fs::remove_file(&path).unwrap();

        // A descriptor this process opened itself (close-on-exec) is refused.
        let own = UnixStream::pair().unwrap().0;
        assert!(matches!(
            Connection::connect(&MigrationUri::Fd(own.as_raw_fd())),
            Err(TransportError::FdNotInherited(_))
        ));
    }

    #[test]
    fn fd_listening_socket_accepts() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(tcp);
        // SAFETY: `fd` is the listener's descriptor, released above; clearing
        // close-on-exec makes it look inherited.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
        let listener = Listener::bind(&MigrationUri::Fd(fd)).unwrap();
        assert_eq!(listener.local_uri().unwrap(), MigrationUri::from(addr));
        let c = Connection::connect(&MigrationUri::from(addr)).unwrap();
        let s = listener.accept().unwrap();
        s.write_all(b"ok").unwrap();
        let mut buf = [0u8; 2];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ok");
        // Sending on a listening socket makes no sense and is refused.
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(tcp);
        // SAFETY: as above.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
        assert!(matches!(
            Connection::connect(&MigrationUri::Fd(fd)),
            Err(TransportError::NotASocket { .. })
        ));
        // SAFETY: the refused claim left `fd` untouched and unowned.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }

    #[test]
    fn page_iovecs_from_guest_ram() {
        // Two 4 MiB regions: pages 1023 and 1024 are adjacent in guest memory
        // but in different mappings.
        let ram =
            GuestMemory::anonymous(&RegionLayout::contiguous("ram", 8 << 20, 4 << 20).unwrap())
                .unwrap();
        let pages = [3u64, 4, 5, 10, 1023, 1024, 1025, 7, 2047];
        for &p in &pages {
            ram.write(p * PAGE_SIZE as u64, &pattern(PAGE_SIZE, p))
                .unwrap();
        }
        let header = b"HEADER-v1".to_vec();
        let iovecs = PageIovecs::new(&ram, &header, &pages).unwrap();
        // header, 3-5, 10, 1023, 1024-1025, 7, 2047
        assert_eq!(iovecs.iovec_count(), 7);
        assert_eq!(iovecs.bytes(), header.len() + pages.len() * PAGE_SIZE);

        let path = temp_sock("pages");
        let listener = Listener::bind(&MigrationUri::Unix(path)).unwrap();
        let src = Connection::connect(&listener.local_uri().unwrap()).unwrap();
        let reader = reader(listener.accept().unwrap(), iovecs.bytes());
        src.write_page_iovecs(iovecs).unwrap();
        let got = reader.join().unwrap();
        assert_eq!(&got[..header.len()], &header[..]);
        for (i, chunk) in got[header.len()..].chunks(PAGE_SIZE).enumerate() {
            assert!(chunk == pattern(PAGE_SIZE, pages[i]), "page {}", pages[i]);
        }

        assert!(matches!(
            PageIovecs::new(&ram, &header, &[2048]),
            Err(MemoryError::RangeOutOfRam { .. })
        ));
        assert!(PageIovecs::new(&ram, &header, &[u64::MAX]).is_err());
        // No header: pages only.
        assert_eq!(
            PageIovecs::new(&ram, &[], &[0, 1]).unwrap().iovec_count(),
            1
        );
    }
}
