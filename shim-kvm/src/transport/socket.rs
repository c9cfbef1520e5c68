//! Socket set-up: buffer sizes, the kernel's dead-peer deadline, name
//! resolution, and what the socket knows about the data in flight.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::RawFd;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use super::TransportError;
use super::error::io_err;

/// Socket buffer size asked for on migration sockets: large buffers keep a
/// single stream near line rate when the receiver briefly falls behind.
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// Classifies a failed `connect` to `to`.
pub(super) fn connect_err(to: String, e: io::Error) -> TransportError {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => TransportError::ConnectionRefused(to),
        Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ETIMEDOUT) => {
            TransportError::Unreachable { to, source: e }
        }
        _ => io_err(format!("connecting to {to}"), e),
    }
}

/// Classifies a failed `bind` of `addr`.
pub(super) fn bind_err(addr: String, e: io::Error) -> TransportError {
    if e.kind() == io::ErrorKind::AddrInUse {
        TransportError::AddrInUse(addr)
    } else {
        io_err(format!("listening on {addr}"), e)
    }
}

/// `TCP_USER_TIMEOUT` and keepalive on TCP socket `fd` for a write timeout
/// (`None`: the kernel's defaults). Keepalive starts probing after half the
/// timeout of silence, every second; the user timeout then decides when
/// the probes have gone unanswered for too long.
pub(super) fn tcp_dead_peer_timeout(fd: RawFd, timeout: Option<Duration>) -> io::Result<()> {
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

pub(super) fn resolve(
    host: &str,
    port: u16,
) -> Result<std::vec::IntoIter<SocketAddr>, TransportError> {
    (host, port)
        .to_socket_addrs()
        .map_err(|source| TransportError::Resolve {
            host: host.to_string(),
            source,
        })
}

pub(super) fn sockopt_int(fd: RawFd, name: libc::c_int) -> io::Result<libc::c_int> {
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
pub(super) fn tune_buffers(fd: RawFd, tcp: bool) -> io::Result<()> {
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

/// Bytes written on socket `fd` that the peer has not taken yet
/// (`ioctl(SIOCOUTQ)`).
pub(super) fn unsent_bytes(fd: RawFd) -> io::Result<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one c_int through the
    // pointer, which points at a live local of that type.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued as *mut libc::c_int) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(queued).unwrap_or(0))
}

/// The kernel's smoothed round-trip time of TCP socket `fd` (`TCP_INFO`).
pub(super) fn tcp_round_trip(fd: RawFd) -> io::Result<Duration> {
    // SAFETY: tcp_info is plain integers, for which all-zero is valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info` and the
    // length written into `len`; both are live locals.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Duration::from_micros(u64::from(info.tcpi_rtt)))
}
