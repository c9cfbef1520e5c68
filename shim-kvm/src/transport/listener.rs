//! The destination's listening socket, for each address kind.

use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::connection::{Stream, stream_from_fd};
use super::error::io_err;
use super::inherited::{Family, claim_inherited};
use super::socket::{bind_err, resolve, tune_buffers};
use super::{Connection, MigrationUri, TransportError};

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

impl Listener {
    /// [`accept`](Listener::accept), waiting at most `timeout` for the
    /// connection (a multifd channel that never comes must not hang the
    /// destination); a timeout is an `Io` error of kind `TimedOut`.
    pub fn accept_within(&self, timeout: Duration) -> Result<Connection, TransportError> {
        let fd = match &self.kind {
            ListenerKind::Tcp(l) => l.as_raw_fd(),
            ListenerKind::Unix { listener, .. } => listener.as_raw_fd(),
            ListenerKind::Connected { .. } => return self.accept(),
        };
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
            // SAFETY: `pfd` is one live, initialised pollfd and the count says one.
            match unsafe { libc::poll(&mut pfd, 1, ms) } {
                0 => {
                    return Err(io_err(
                        format!("waiting {} ms for a connection", timeout.as_millis()),
                        io::ErrorKind::TimedOut.into(),
                    ));
                }
                n if n > 0 => return self.accept(),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(io_err("waiting for a connection", e));
                    }
                }
            }
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

fn accept_retrying<T>(mut accept: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match accept() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
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
