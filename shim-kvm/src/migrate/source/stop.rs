//! Where a precopy stop goes, as the source sees it: the instants that
//! divide the downtime into its parts, and what was sent in them.
//!
//! The parts tile the source's downtime (vCPU stop requested to the
//! destination's confirmation): each starts where the one before it ends,
//! so they add up to it exactly.

/// One part of the stop, in the order they happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StopPart {
    /// The stop requested until every vCPU is paused and the devices are
    /// quiesced.
    VcpuStop,
    /// The last dirty-log sync, with the vCPUs paused (and, with
    /// `pause-before-switchover`, the pre-switchover pause before it).
    FinalSync,
    /// The pages still dirty, handed to the socket.
    FinalPages,
    /// Saving the device state (vCPUs, VM-wide devices, the VMM's) and
    /// handing it to the socket.
    DeviceState,
    /// The end-of-stream record written until the destination's
    /// confirmation of the whole stream (with the return path: its
    /// LOADED, the COMMIT and its final answer).
    EndOfStream,
}

impl StopPart {
    /// Every part, in order.
    pub const ALL: [StopPart; 5] = [
        StopPart::VcpuStop,
        StopPart::FinalSync,
        StopPart::FinalPages,
        StopPart::DeviceState,
        StopPart::EndOfStream,
    ];

    /// The part's name in reports (`downtime-breakdown` keys).
    pub const fn name(self) -> &'static str {
        match self {
            StopPart::VcpuStop => "vcpu-stop",
            StopPart::FinalSync => "final-sync",
            StopPart::FinalPages => "final-pages",
            StopPart::DeviceState => "device-state",
            StopPart::EndOfStream => "end-of-stream",
        }
    }
}

/// The instants of a stop (`CLOCK_MONOTONIC` ns, comparable with the
/// destination's on one host) and what the stop sent. An instant is
/// `None` when the stop did not get that far (a failure, or the postcopy
/// switchover, which has no final pages and no end-of-stream wait).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceStop {
    /// The vCPU stop was requested: the start of the downtime.
    pub requested_ns: Option<u64>,
    /// Every vCPU paused and the devices quiesced.
    pub paused_ns: Option<u64>,
    /// The last dirty-log sync done.
    pub synced_ns: Option<u64>,
    /// The last of the final pages handed to the socket (the device state
    /// is saved next).
    pub pages_sent_ns: Option<u64>,
    /// The device state handed to the socket.
    pub devices_sent_ns: Option<u64>,
    /// The destination confirmed the whole stream: the migration
    /// completed, the end of the source's downtime.
    pub confirmed_ns: Option<u64>,
    /// Pages (zero or normal) sent after the last sync.
    pub final_pages: u64,
    /// Stream bytes (records, headers and page data) sent after the last
    /// sync and before the device state.
    pub final_page_bytes: u64,
    /// Bytes of the device state, headers included.
    pub device_bytes: u64,
    /// The OS error (errno) with which raising the migration threads for
    /// the stop was refused (`SourceOptions::stop_priority`; without
    /// `CAP_SYS_NICE`, `EACCES` or `EPERM`): the stop then ran at the
    /// fallback nice value of [`StopPriority::Realtime`], or at their usual
    /// priority.
    ///
    /// [`StopPriority::Realtime`]: crate::priority::StopPriority::Realtime
    pub priority_refused: Option<i32>,
}

impl SourceStop {
    /// Nanoseconds `part` took, when both of its ends are known.
    pub fn part_ns(&self, part: StopPart) -> Option<u64> {
        let (from, to) = match part {
            StopPart::VcpuStop => (self.requested_ns, self.paused_ns),
            StopPart::FinalSync => (self.paused_ns, self.synced_ns),
            StopPart::FinalPages => (self.synced_ns, self.pages_sent_ns),
            StopPart::DeviceState => (self.pages_sent_ns, self.devices_sent_ns),
            StopPart::EndOfStream => (self.devices_sent_ns, self.confirmed_ns),
        };
        Some(to?.saturating_sub(from?))
    }

    /// The source's downtime: the stop requested to the confirmation.
    pub fn downtime_ns(&self) -> Option<u64> {
        Some(self.confirmed_ns?.saturating_sub(self.requested_ns?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parts_tile_the_downtime() {
        let stop = SourceStop {
            requested_ns: Some(1_000),
            paused_ns: Some(1_400),
            synced_ns: Some(2_000),
            pages_sent_ns: Some(5_000),
            devices_sent_ns: Some(5_300),
            confirmed_ns: Some(9_000),
            ..SourceStop::default()
        };
        let parts: Vec<u64> = StopPart::ALL
            .iter()
            .map(|&p| stop.part_ns(p).unwrap())
            .collect();
        assert_eq!(parts, [400, 600, 3_000, 300, 3_700]);
        assert_eq!(parts.iter().sum::<u64>(), stop.downtime_ns().unwrap());
    }

    #[test]
    fn a_stop_cut_short_has_only_the_parts_it_reached() {
        let stop = SourceStop {
            requested_ns: Some(10),
            paused_ns: Some(20),
            ..SourceStop::default()
        };
        assert_eq!(stop.part_ns(StopPart::VcpuStop), Some(10));
        assert_eq!(stop.part_ns(StopPart::FinalSync), None);
        assert_eq!(stop.downtime_ns(), None);
    }
}
