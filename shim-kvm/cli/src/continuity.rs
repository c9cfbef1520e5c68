//! Whether the demo guest went on after a migration, in the three ways
//! its state can be seen from outside: every vCPU's stamp counter, the
//! timer ticks vCPU 0 counts, and the serial sequence vCPU 0 writes.
//!
//! Each is read on the source at the stop and on the destination after it
//! ran the guest a while; the `"guest"` object of `demo`'s summary is made
//! of them. A vCPU whose counter did not move, a timer that stopped, or a
//! serial line lost or written twice across the switchover is something
//! the guest's memory, its vCPU state or the serial section failed to
//! carry.

use std::fmt;

use serde_json::{Value, json};

/// How many complete lines `out` holds, and whether they are `0, 1, 2,
/// ...` (an unfinished last line is not counted).
pub fn serial_sequence(out: &[u8]) -> (u64, bool) {
    let end = out.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    let mut n = 0u64;
    let mut in_sequence = true;
    for line in out[..end].split_inclusive(|&b| b == b'\n') {
        in_sequence &= line[..line.len() - 1] == *n.to_string().as_bytes();
        n += 1;
    }
    (n, in_sequence)
}

/// Whether the source's serial output up to the stop and the
/// destination's after it form one sequence `0, 1, 2, ...` with no gap
/// and no repeat, the destination adding at least one complete line. The
/// two are joined byte for byte: a line the source had begun at the stop
/// is finished by the destination (the guest's position in it travels in
/// its memory and registers, the port's state in the serial section).
pub fn serial_continued(source: &[u8], destination: &[u8]) -> bool {
    let (before, _) = serial_sequence(source);
    let joined = [source, destination].concat();
    let (total, in_sequence) = serial_sequence(&joined);
    in_sequence && total > before
}

/// Whether one vCPU went on: its stamp counter moved past its value at
/// the stop (`after > at_stop`); a vCPU that owns no page of the working
/// set (an idle guest, or more vCPUs than pages) stamps nothing, so its
/// progress exits since the start count instead.
pub fn vcpu_continued(at_stop: u64, after: u64, owns_pages: bool, progress_exits: u64) -> bool {
    if owns_pages {
        after > at_stop
    } else {
        progress_exits > 0
    }
}

/// The guest's continuity across one migration (`demo`'s `"guest"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestContinuity {
    /// vCPUs the guest runs on.
    pub vcpus: u32,
    /// vCPUs that went on on the destination ([`vcpu_continued`]: their
    /// stamp counter moved past its value at the stop).
    pub vcpus_continued: u32,
    /// vCPU 0's tick counter at the stop (source memory).
    pub ticks_at_stop: u64,
    /// The tick counter after the destination ran the guest.
    pub ticks_after: u64,
    /// The serial outputs of both hosts form one sequence
    /// ([`serial_continued`]).
    pub serial_continued: bool,
}

impl GuestContinuity {
    /// Every vCPU moved on, the timer ticked on the destination, and the
    /// serial sequence went on without a gap or repeat.
    pub fn ok(&self) -> bool {
        self.vcpus > 0
            && self.vcpus_continued == self.vcpus
            && self.ticks_after > self.ticks_at_stop
            && self.serial_continued
    }

    /// The `"guest"` object of the summary.
    pub fn to_json(&self) -> Value {
        json!({
            "vcpus": self.vcpus,
            "vcpus-continued": self.vcpus_continued,
            "ticks-at-stop": self.ticks_at_stop,
            "ticks-after": self.ticks_after,
            "serial-continued": self.serial_continued,
        })
    }
}

impl fmt::Display for GuestContinuity {
    /// One line for the text summary, saying the same as the JSON.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of {} vCPUs continued, timer {} -> {} ticks, serial sequence {}",
            self.vcpus_continued,
            self.vcpus,
            self.ticks_at_stop,
            self.ticks_after,
            if self.serial_continued {
                "continued"
            } else {
                "BROKEN (gap, repeat or no new line)"
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_sequence_counts_complete_lines_and_finds_gaps() {
        assert_eq!(serial_sequence(b""), (0, true));
        assert_eq!(serial_sequence(b"0\n1\n2\n1"), (3, true));
        assert_eq!(serial_sequence(b"0\n2\n"), (2, false));
        assert_eq!(serial_sequence(b"1\n"), (1, false));
        assert_eq!(serial_sequence(b"0\nx\n"), (2, false));
    }

    #[test]
    fn the_serial_sequence_must_go_on_across_the_hosts_without_gap_or_repeat() {
        assert!(serial_continued(b"0\n1\n", b"2\n3\n"));
        // A line begun on the source is finished on the destination.
        let all: String = (0..15).map(|n| format!("{n}\n")).collect();
        let split = all.find("12").unwrap() + 1;
        let (source, destination) = all.as_bytes().split_at(split);
        assert!(serial_continued(source, destination));
        assert!(!serial_continued(source, &destination[1..]));
        assert!(serial_continued(b"", b"0\n"));
        // Gap, repeat, nothing new, a restart.
        assert!(!serial_continued(b"0\n1\n", b"3\n"));
        assert!(!serial_continued(b"0\n1\n", b"1\n2\n"));
        assert!(!serial_continued(b"0\n1\n", b""));
        assert!(!serial_continued(b"0\n1\n", b"2"));
        assert!(!serial_continued(b"0\n1\n", b"0\n1\n2\n"));
    }

    #[test]
    fn a_vcpu_continued_only_when_its_counter_moved() {
        assert!(vcpu_continued(5, 6, true, 0));
        assert!(!vcpu_continued(5, 5, true, 100));
        assert!(!vcpu_continued(5, 4, true, 100));
        // An idle vCPU is judged by its progress exits.
        assert!(vcpu_continued(0, 0, false, 3));
        assert!(!vcpu_continued(0, 0, false, 0));
    }

    #[test]
    fn the_guest_continued_only_when_all_three_moved_on() {
        let good = GuestContinuity {
            vcpus: 4,
            vcpus_continued: 4,
            ticks_at_stop: 500,
            ticks_after: 900,
            serial_continued: true,
        };
        assert!(good.ok());
        let j = good.to_json();
        assert_eq!(j["vcpus"], 4);
        assert_eq!(j["vcpus-continued"], 4);
        assert_eq!(j["ticks-at-stop"], 500);
        assert_eq!(j["ticks-after"], 900);
        assert_eq!(j["serial-continued"], true);
        assert_eq!(
            good.to_string(),
            "4 of 4 vCPUs continued, timer 500 -> 900 ticks, serial sequence continued"
        );
        for bad in [
            GuestContinuity {
                vcpus_continued: 3,
                ..good.clone()
            },
            GuestContinuity {
                ticks_after: 500,
                ..good.clone()
            },
            GuestContinuity {
                serial_continued: false,
                ..good.clone()
            },
            GuestContinuity {
                vcpus: 0,
                vcpus_continued: 0,
                ..good.clone()
            },
        ] {
            assert!(!bad.ok(), "{bad:?}");
        }
    }
}
