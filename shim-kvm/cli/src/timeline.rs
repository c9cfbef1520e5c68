//! `--timeline FILE.svg`: the source's [`Timeline`] drawn as two panels
//! over the time since the migration started. The upper one has the
//! throughput (bytes written per slice of the timeline, 100 ms unless
//! `--timeline-slice-ms` says otherwise, as MiB/s) and the guest's
//! dirty rate, and on a right-hand axis the throttle (the share of each
//! vCPU's time held back, percent, a step at each change); the lower one, on a log scale, the bytes still to send and
//! the switchover threshold, which the remaining bytes must fall below for
//! the guest to be stopped. Every dirty-log sync is a thin grey line in
//! both panels, labelled with the passes completed at it (labels closer
//! than a few pixels to the previous one are left out); the stop is a red
//! line with the downtime shaded.

use std::fmt;
use std::path::{Path, PathBuf};

use livemig_kvm::migrate::source::{SourceStop, Timeline};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

const MIB: f64 = (1u64 << 20) as f64;
/// Pixels of the picture.
const SIZE: (u32, u32) = (1200, 760);
/// The floor of the log-scale panel, MiB: a threshold or remainder of zero
/// is drawn there.
const LOG_FLOOR_MIB: f64 = 0.01;
/// Colour of the sync lines (the CLI test finds them by it).
pub const SYNC_RGB: (u8, u8, u8) = (150, 150, 150);
/// Colour of the throttle line (the CLI test finds it by it).
pub const THROTTLE_RGB: (u8, u8, u8) = (230, 120, 0);
/// Fewest pixels between two sync labels.
const LABEL_GAP_PX: f64 = 14.0;

/// What `--timeline` draws: the source's timeline and its stop.
#[derive(Debug, Clone)]
pub struct Chart {
    /// The samples and syncs.
    pub timeline: Timeline,
    /// The stop's instants (the red line and the shaded downtime).
    pub stop: SourceStop,
}

/// Why a timeline could not be drawn.
#[derive(Debug)]
pub enum TimelineError {
    /// The migration ended before its first statistics publication.
    NoSamples,
    /// Drawing or writing the file failed.
    Draw {
        /// The file.
        path: PathBuf,
        /// What plotters said.
        reason: String,
    },
}

impl fmt::Display for TimelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TimelineError::NoSamples => {
                f.write_str("--timeline: the migration ended before any statistics were sampled")
            }
            TimelineError::Draw { path, reason } => {
                write!(f, "--timeline: drawing {}: {reason}", path.display())
            }
        }
    }
}

impl std::error::Error for TimelineError {}

/// Seconds after the timeline's start of `ns` (`CLOCK_MONOTONIC`).
fn secs_after(t: &Timeline, ns: u64) -> f64 {
    ns.saturating_sub(t.start_ns()) as f64 / 1e9
}

/// Draws `chart` into the SVG file `path`.
pub fn draw(chart: &Chart, path: &Path) -> Result<(), TimelineError> {
    let failed = |e: &dyn fmt::Display| TimelineError::Draw {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    if chart.timeline.slices().len() == 0 {
        return Err(TimelineError::NoSamples);
    }
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| failed(&e))?;
    let title = format!(
        "livemig migration per {} ms slice (source side); grey: dirty-log syncs, labelled with the passes done; red: the stop",
        chart.timeline.slice_ns() as f64 / 1e6
    );
    let root = root
        .titled(&title, ("sans-serif", 20))
        .map_err(|e| failed(&e))?;
    let (upper, lower) = root.split_vertically(SIZE.1 / 2 - 20);
    draw_rates(chart, &upper).map_err(|e| failed(&e))?;
    draw_bytes(chart, &lower).map_err(|e| failed(&e))?;
    root.present().map_err(|e| failed(&e))
}

type DrawResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;

/// The end of the x axis, seconds: the last slice, or the stop's end.
fn x_end(chart: &Chart) -> f64 {
    let t = &chart.timeline;
    let slices = t
        .slices()
        .last()
        .map_or(0.0, |s| (s.index + 1) as f64 * t.slice_ns() as f64 / 1e9);
    let stop = chart.stop.confirmed_ns.map_or(0.0, |ns| secs_after(t, ns));
    slices.max(stop).max(0.1)
}

/// Upper panel: throughput and dirty rate, MiB/s.
fn draw_rates(chart: &Chart, area: &DrawingArea<SVGBackend<'_>, Shift>) -> DrawResult {
    let t = &chart.timeline;
    let slice_s = t.slice_ns() as f64 / 1e9;
    let per_s = 1.0 / slice_s;
    let mid = |i: u64| (i as f64 + 0.5) * slice_s;
    let sent: Vec<(f64, f64)> = t
        .slices()
        .map(|s| (mid(s.index), s.sent_bytes as f64 * per_s / MIB))
        .collect();
    let dirty: Vec<(f64, f64)> = t
        .slices()
        .map(|s| (mid(s.index), s.dirty_bytes_per_s as f64 / MIB))
        .collect();
    let top = sent.iter().chain(&dirty).map(|p| p.1).fold(1.0, f64::max) * 1.15;
    let x_end = x_end(chart);
    let mut c = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .right_y_label_area_size(60)
        .build_cartesian_2d(0.0..x_end, 0.0..top)?
        .set_secondary_coord(0.0..x_end, 0.0..100.0);
    c.configure_mesh()
        .x_desc("seconds since the migration started")
        .y_desc("MiB/s")
        .light_line_style(WHITE)
        .draw()?;
    c.configure_secondary_axes()
        .y_desc("throttle, % of vCPU time")
        .draw()?;
    marks(chart, &mut c, 0.0, top, true)?;
    let orange = RGBColor(THROTTLE_RGB.0, THROTTLE_RGB.1, THROTTLE_RGB.2);
    c.draw_secondary_series(LineSeries::new(
        throttle_steps(t, x_end),
        orange.stroke_width(2),
    ))?
    .label("throttle (right axis)")
    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], orange.stroke_width(2)));
    c.draw_series(LineSeries::new(sent, BLUE.stroke_width(2)))?
        .label("throughput (bytes sent per slice)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    c.draw_series(LineSeries::new(dirty, RED.mix(0.7).stroke_width(2)))?
        .label("dirty rate")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.mix(0.7).stroke_width(2)));
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
}

/// The throttle as a step line, percent over seconds: 0 from the start,
/// each change a vertical step, the last value held to `x_end`.
fn throttle_steps(t: &Timeline, x_end: f64) -> Vec<(f64, f64)> {
    let mut points = vec![(0.0, 0.0)];
    let mut level = 0.0;
    for m in t.throttle_changes() {
        let x = m.at_ns as f64 / 1e9;
        points.push((x, level));
        level = f64::from(m.percent);
        points.push((x, level));
    }
    points.push((x_end, level));
    points
}

/// Lower panel: remaining bytes and the switchover threshold, MiB on a log
/// scale.
fn draw_bytes(chart: &Chart, area: &DrawingArea<SVGBackend<'_>, Shift>) -> DrawResult {
    let t = &chart.timeline;
    let at = |i: u64| (i + 1) as f64 * t.slice_ns() as f64 / 1e9;
    let floor = |b: u64| (b as f64 / MIB).max(LOG_FLOOR_MIB);
    let remaining: Vec<(f64, f64)> = t
        .slices()
        .map(|s| (at(s.index), floor(s.remaining_bytes)))
        .collect();
    let threshold: Vec<(f64, f64)> = t
        .slices()
        .map(|s| (at(s.index), floor(s.threshold_bytes)))
        .collect();
    let top = remaining
        .iter()
        .chain(&threshold)
        .map(|p| p.1)
        .fold(1.0, f64::max)
        * 2.0;
    let x_end = x_end(chart);
    let mut c = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        // As wide as the upper panel's throttle axis, so that the two
        // time axes line up.
        .right_y_label_area_size(60)
        .build_cartesian_2d(0.0..x_end, (LOG_FLOOR_MIB..top).log_scale())?;
    c.configure_mesh()
        .x_desc("seconds since the migration started")
        .y_desc("MiB (log scale)")
        .light_line_style(WHITE)
        .draw()?;
    marks(chart, &mut c, LOG_FLOOR_MIB, top, false)?;
    c.draw_series(LineSeries::new(remaining, BLACK.stroke_width(2)))?
        .label("remaining (dirty, still to send)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    let green = RGBColor(0, 150, 60);
    c.draw_series(LineSeries::new(threshold, green.stroke_width(2)))?
        .label("switchover threshold (fits the downtime limit)")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], green.stroke_width(2)));
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
}

/// The sync lines and the stop, from `bottom` to `top` of a panel;
/// `labelled`: with the sync and stop labels.
fn marks<Y>(
    chart: &Chart,
    c: &mut ChartContext<
        '_,
        SVGBackend<'_>,
        Cartesian2d<plotters::coord::types::RangedCoordf64, Y>,
    >,
    bottom: f64,
    top: f64,
    labelled: bool,
) -> DrawResult
where
    Y: Ranged<ValueType = f64>,
{
    let t = &chart.timeline;
    let stop = &chart.stop;
    if let (Some(from), Some(to)) = (stop.requested_ns, stop.confirmed_ns) {
        let (a, b) = (secs_after(t, from), secs_after(t, to));
        c.draw_series(std::iter::once(Rectangle::new(
            [(a, bottom), (b, top)],
            RED.mix(0.15).filled(),
        )))?;
    }
    let grey = RGBColor(SYNC_RGB.0, SYNC_RGB.1, SYNC_RGB.2);
    let px_per_s = f64::from(SIZE.0 - 110) / x_end(chart);
    let mut last_label = f64::NEG_INFINITY;
    for m in t.syncs() {
        let x = m.at_ns as f64 / 1e9;
        c.draw_series(std::iter::once(PathElement::new(
            [(x, bottom), (x, top)],
            grey.stroke_width(1),
        )))?;
        if labelled && (x - last_label) * px_per_s >= LABEL_GAP_PX {
            last_label = x;
            c.draw_series(std::iter::once(Text::new(
                m.iteration.to_string(),
                (x, top),
                ("sans-serif", 11).into_font().color(&grey),
            )))?;
        }
    }
    if let Some(at) = stop.requested_ns {
        let x = secs_after(t, at);
        c.draw_series(std::iter::once(PathElement::new(
            [(x, bottom), (x, top)],
            RED.stroke_width(2),
        )))?;
        if labelled {
            let label = match stop.downtime_ns() {
                Some(ns) => format!("stop ({:.1} ms to confirmation)", ns as f64 / 1e6),
                None => "stop".to_string(),
            };
            // Right of the line, or left of it in the right half.
            let h = if x > x_end(chart) / 2.0 {
                HPos::Right
            } else {
                HPos::Left
            };
            let font = ("sans-serif", 13).into_font().color(&RED);
            c.draw_series(std::iter::once(Text::new(
                label,
                (x, top * 0.93),
                font.pos(Pos::new(h, VPos::Top)),
            )))?;
        }
    }
    Ok(())
}
