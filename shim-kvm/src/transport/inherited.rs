//! Inherited descriptors (`fd:N`): checked to be a TCP or Unix stream
//! socket nothing in this process owns, then claimed once.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, PoisonError};

use super::TransportError;
use super::error::io_err;
use super::socket::sockopt_int;

/// Address family of an inherited socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Family {
    Inet,
    Unix,
}

/// What [`inspect_socket`] learned about a descriptor.
#[derive(Debug, Clone, Copy)]
pub(super) struct SocketInfo {
    pub(super) family: Family,
    pub(super) listening: bool,
}

/// Serialises claims so two threads cannot both see close-on-exec clear on
/// the same descriptor and both take ownership of it.
static CLAIM_LOCK: Mutex<()> = Mutex::new(());

/// Takes ownership of inherited descriptor `fd` after checking that it is a
/// TCP or Unix stream socket that nothing in this process owns yet, and
/// connected unless `may_listen`. A refused descriptor is left untouched.
pub(super) fn claim_inherited(
    fd: RawFd,
    may_listen: bool,
) -> Result<(OwnedFd, SocketInfo), TransportError> {
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
