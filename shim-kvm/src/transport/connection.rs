//! One connected migration stream and the write loop behind it.

use std::io::{self, IoSlice, Read};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::error::io_err;
use super::inherited::{Family, claim_inherited};
use super::socket::{self, connect_err, resolve, tcp_dead_peer_timeout, tune_buffers};
use super::{MigrationUri, TransportError};
use crate::memory::PageIovecs;

/// Most iovecs one `sendmsg` takes on Linux (`UIO_MAXIOV`); longer lists are
/// written in chunks of this many.
pub(super) const IOV_MAX: usize = libc::UIO_MAXIOV as usize;

/// The socket behind a connection. Both kinds do the same reads, writes and
/// shutdowns; they differ in addresses and in TCP's Nagle setting.
#[derive(Debug)]
pub(super) enum Stream {
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
    /// [`SOCKET_BUFFER_BYTES`](super::SOCKET_BUFFER_BYTES)).
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

    pub(super) fn tuned(stream: Stream, peer: String) -> Result<Connection, TransportError> {
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

    /// Fills guest pages straight from the socket: `readv` into the
    /// iovecs of `pages` ([`PageIovecs`] built with an empty header), so
    /// the kernel writes guest memory with `copy_to_user` and no `&mut
    /// [u8]` is ever formed over it. An end of stream before the last byte
    /// is an `Io` error of kind `UnexpectedEof`.
    pub fn read_page_iovecs(&self, mut pages: PageIovecs<'_>) -> Result<(), TransportError> {
        let fd = self.stream.raw_fd();
        let mut bufs = pages.as_io_slices();
        let failed = |e: io::Error| io_err(format!("reading pages from {}", self.peer), e);
        while !bufs.is_empty() {
            let chunk = &bufs[..bufs.len().min(IOV_MAX)];
            // SAFETY: `IoSlice` is ABI compatible with `iovec`; each covers
            // whole pages inside a region of the guest memory `pages`
            // borrows (checked by `PageIovecs::new`), mapped writable for
            // the guest, so the kernel writes only there.
            let n = unsafe { libc::readv(fd, chunk.as_ptr().cast(), chunk.len() as libc::c_int) };
            match n {
                0 => return Err(failed(io::ErrorKind::UnexpectedEof.into())),
                n if n < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(failed(e));
                    }
                }
                n => IoSlice::advance_slices(&mut bufs, n as usize),
            }
        }
        Ok(())
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

    /// Bounds how long a read may wait for its first byte (`None`:
    /// forever); a read that times out is an `Io` error of kind
    /// `WouldBlock` or `TimedOut`.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), TransportError> {
        match &self.stream {
            Stream::Tcp(s) => s.set_read_timeout(timeout),
            Stream::Unix(s) => s.set_read_timeout(timeout),
        }
        .map_err(|e| io_err(format!("setting a read timeout on {}", self.peer), e))
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
        socket::unsent_bytes(self.stream.raw_fd())
            .map_err(|e| io_err(format!("reading the send queue of {}", self.peer), e))
    }

    /// The kernel's smoothed round-trip time of a TCP connection
    /// (`TCP_INFO`); zero for a Unix socket, whose peer is on this host.
    pub fn round_trip(&self) -> Result<Duration, TransportError> {
        let Stream::Tcp(s) = &self.stream else {
            return Ok(Duration::ZERO);
        };
        socket::tcp_round_trip(s.as_raw_fd())
            .map_err(|e| io_err(format!("reading TCP_INFO of {}", self.peer), e))
    }
}

impl AsRawFd for Connection {
    /// The socket descriptor, for `poll` and socket options this type does
    /// not wrap. The connection keeps ownership.
    fn as_raw_fd(&self) -> RawFd {
        self.stream.raw_fd()
    }
}

pub(super) fn stream_from_fd(fd: OwnedFd, family: Family) -> Stream {
    match family {
        Family::Inet => Stream::Tcp(TcpStream::from(fd)),
        Family::Unix => Stream::Unix(UnixStream::from(fd)),
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
pub(super) fn write_vectored_all_with(
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
