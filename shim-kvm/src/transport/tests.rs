//! Tests of the transport over real sockets.

use super::connection::{IOV_MAX, write_vectored_all_with};
use super::*;
use std::fs;
use std::io::{self, IoSlice};
use std::net::{Shutdown, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Instant;

use crate::memory::{GuestMemory, MemoryError, PAGE_SIZE, PageIovecs, RegionLayout};
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
            if calls.is_multiple_of(97) {
                return Err(io::ErrorKind::Interrupted.into());
            }
            if calls.is_multiple_of(13) {
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
    let ram = GuestMemory::anonymous(&RegionLayout::contiguous("ram", 8 << 20, 4 << 20).unwrap())
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
