//! A hand-written SVG plot: median latency against payload size, log-log, one panel
//! per pass, one colour per system, with p99 drawn as a whisker above each point.

use std::fmt::Write as _;

use super::{Pass, Row, fmt_ns, fmt_size};
use crate::system::Kind;

const PANEL_W: f64 = 540.0;
const PANEL_H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 56.0;
const LEGEND_ROW: f64 = 22.0;
const LEGEND_COLS: usize = 3;
/// 0 B cannot sit on a log axis; it is drawn where 8 B would be, labelled "0 B".
const ZERO_AT: f64 = 8.0;
/// One per system of a full run (21), so that no two lines of the plot share a colour.
const COLORS: &[&str] = &[
    "#222222", "#7f7f7f", "#bcbd22", "#d62728", "#1f77b4", "#9467bd", "#2ca02c", "#ff7f0e",
    "#17becf", "#8c564b", "#e377c2", "#000080", "#808000", "#008080", "#800000", "#ff00ff",
    "#aec7e8", "#ffbb78", "#98df8a", "#c5b0d5", "#f7b6d2", "#9edae5",
];

/// The plot for `rows`, one panel per pass, shared axes.
pub fn svg(passes: &[Pass], rows: &[Row]) -> String {
    let systems = {
        let mut names: Vec<&str> = Vec::new();
        for r in rows {
            if !names.contains(&r.system) {
                names.push(r.system);
            }
        }
        names
    };
    let sizes = {
        let mut s: Vec<usize> = rows.iter().map(|r| r.size).collect();
        s.sort_unstable();
        s.dedup();
        s
    };
    let ns = rows
        .iter()
        .flat_map(|r| [r.stats.median, r.stats.p99])
        .filter(|&v| v > 0.0);
    let (lo, hi) = ns.fold((f64::MAX, 1.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let axes = Axes {
        x: (
            x_of(0).log10() - 0.2,
            x_of(*sizes.last().unwrap_or(&1)).log10() + 0.2,
        ),
        y: (lo.min(hi).log10().floor(), hi.log10().ceil()),
    };

    let legend_rows = systems.len().div_ceil(LEGEND_COLS) as f64;
    let width = PANEL_W * passes.len().max(1) as f64;
    let height = PANEL_H + 10.0 + legend_rows * LEGEND_ROW;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (index, pass) in passes.iter().enumerate() {
        let origin = index as f64 * PANEL_W;
        let panel = Panel {
            origin,
            axes: &axes,
        };
        panel.frame(&mut out, pass, &sizes);
        for (i, system) in systems.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            for kind in [Kind::Small, Kind::Bulk] {
                let series: Vec<&Row> = rows
                    .iter()
                    .filter(|r| r.pass == index && r.system == *system && r.kind == kind)
                    .collect();
                panel.series(&mut out, &series, color);
            }
        }
    }
    for (i, system) in systems.iter().enumerate() {
        let x = 20.0 + (i % LEGEND_COLS) as f64 * (width - 40.0) / LEGEND_COLS as f64;
        let y = PANEL_H + 10.0 + (i / LEGEND_COLS) as f64 * LEGEND_ROW;
        let color = COLORS[i % COLORS.len()];
        let _ = writeln!(
            out,
            r#"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="{color}" stroke-width="2"/><circle cx="{}" cy="{y}" r="3" fill="{color}"/><text x="{}" y="{}">{}</text>"#,
            x + 24.0,
            x + 12.0,
            x + 30.0,
            y + 4.0,
            escape(system)
        );
    }
    out.push_str("</svg>\n");
    out
}

/// Axis ranges in log10 units: bytes (0 mapped to [`ZERO_AT`]) and nanoseconds.
struct Axes {
    x: (f64, f64),
    y: (f64, f64),
}

/// One pass's panel, `origin` pixels from the left.
struct Panel<'a> {
    origin: f64,
    axes: &'a Axes,
}

impl Panel<'_> {
    fn px(&self, bytes: usize) -> f64 {
        let (a, b) = self.axes.x;
        self.origin + LEFT + (x_of(bytes).log10() - a) / (b - a) * (PANEL_W - LEFT - RIGHT)
    }

    fn py(&self, ns: f64) -> f64 {
        let (a, b) = self.axes.y;
        TOP + (b - ns.max(1e-3).log10()) / (b - a) * (PANEL_H - TOP - BOTTOM)
    }

    /// Title, plot box, decade grid, size ticks, and the calls | bulk divider.
    fn frame(&self, out: &mut String, pass: &Pass, sizes: &[usize]) {
        let (left, right) = (self.origin + LEFT, self.origin + PANEL_W - RIGHT);
        let (top, bottom) = (TOP, PANEL_H - BOTTOM);
        let _ = writeln!(
            out,
            r#"<text x="{}" y="22" text-anchor="middle" font-size="14" font-weight="bold">{} (client CPU {}, server CPU {})</text>"#,
            (left + right) / 2.0,
            escape(pass.label),
            pass.client_cpu,
            pass.server_cpu
        );
        let _ = writeln!(
            out,
            r##"<rect x="{left}" y="{top}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
            right - left,
            bottom - top
        );
        let (y0, y1) = self.axes.y;
        for decade in y0 as i32..=y1 as i32 {
            let y = self.py(10f64.powi(decade));
            let _ = writeln!(
                out,
                r##"<line x1="{left}" y1="{y}" x2="{right}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
                left - 6.0,
                y + 4.0,
                decade_label(decade)
            );
        }
        for &size in sizes {
            let x = self.px(size);
            let _ = writeln!(
                out,
                r##"<line x1="{x}" y1="{top}" x2="{x}" y2="{bottom}" stroke="#eee"/><text x="{x}" y="{}" text-anchor="middle">{}</text>"##,
                bottom + 16.0,
                fmt_size(size)
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">payload (log scale; median, whisker to p99)</text>"#,
            (left + right) / 2.0,
            bottom + 36.0
        );
        // Calls (echo) and bulk (one way) are different workloads: divide them.
        let mid = (self.px(4 << 10) + self.px(64 << 10)) / 2.0;
        let _ = writeln!(
            out,
            r##"<line x1="{mid}" y1="{top}" x2="{mid}" y2="{bottom}" stroke="#999" stroke-dasharray="4 4"/><text x="{}" y="{}" text-anchor="end" fill="#666">echo round trip</text><text x="{}" y="{}" fill="#666">one way + small reply</text>"##,
            mid - 4.0,
            top + 14.0,
            mid + 4.0,
            top + 14.0
        );
    }

    /// A polyline through one system's medians for one workload, with p99 whiskers.
    fn series(&self, out: &mut String, rows: &[&Row], color: &str) {
        if rows.is_empty() {
            return;
        }
        let points: Vec<String> = rows
            .iter()
            .map(|r| format!("{:.1},{:.1}", self.px(r.size), self.py(r.stats.median)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            points.join(" ")
        );
        for r in rows {
            let (x, y, y99) = (
                self.px(r.size),
                self.py(r.stats.median),
                self.py(r.stats.p99),
            );
            let _ = writeln!(
                out,
                r#"<line x1="{x:.1}" y1="{y:.1}" x2="{x:.1}" y2="{y99:.1}" stroke="{color}" stroke-opacity="0.5"/><circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{color}"><title>{}: {} median {}, p99 {}</title></circle>"#,
                escape(r.system),
                fmt_size(r.size),
                fmt_ns(r.stats.median),
                fmt_ns(r.stats.p99)
            );
        }
    }
}

/// "100 ns", "1 µs", "10 ms" for 10^decade nanoseconds.
fn decade_label(decade: i32) -> String {
    let units = ["ns", "µs", "ms", "s"];
    let unit = (decade.max(0) / 3).min(3);
    format!(
        "{} {}",
        10u64.pow((decade - unit * 3).max(0) as u32),
        units[unit as usize]
    )
}

/// Payload size as plotted: 0 moves to [`ZERO_AT`].
fn x_of(bytes: usize) -> f64 {
    if bytes == 0 { ZERO_AT } else { bytes as f64 }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::Stats;

    /// A full run's legend: every system of the registry (both passes, both workloads) gets a
    /// colour no other system has, so each line of the plot names one row of the tables.
    #[test]
    fn every_system_has_a_colour_of_its_own() {
        let stats = Stats {
            median: 1000.0,
            p99: 2000.0,
            mean: 1000.0,
            samples: 100,
            batch: 1,
            rep_medians: [1000.0; crate::harness::REPETITIONS],
            reps: crate::harness::REPETITIONS,
        };
        let rows: Vec<Row> = crate::SYSTEMS
            .iter()
            .map(|s| Row {
                pass: 0,
                system: s.name(),
                kind: s.kinds()[0],
                size: s.kinds()[0].sizes()[0],
                stats,
                cpu: None,
            })
            .collect();
        let pass = Pass {
            label: "same CPU",
            client_cpu: 0,
            server_cpu: 0,
        };
        let plot = svg(&[pass], &rows);
        let mut seen: Vec<(&str, &str)> = Vec::new();
        for line in plot
            .lines()
            .filter(|l| l.contains("<text") && l.contains("<circle"))
        {
            let color = line
                .split("stroke=\"")
                .nth(1)
                .and_then(|r| r.split('"').next());
            let name = line.rsplit("\">").next().and_then(|r| r.split('<').next());
            let (Some(color), Some(name)) = (color, name) else {
                panic!("unexpected legend entry {line}");
            };
            if let Some((other, _)) = seen.iter().find(|(_, c)| *c == color) {
                panic!("{name} and {other} are both drawn in {color}");
            }
            seen.push((name, color));
        }
        assert_eq!(seen.len(), crate::SYSTEMS.len());
    }
}
