//! SVG plots of what `asp-bench bench` measured, written beside bench/RESULTS.md so
//! that it can show them: a latency CDF per scenario (one line per fsync mode or
//! system compared) and a throughput bar chart per scenario (one bar per fsync mode or
//! system). The SVG is written by hand (plain SVG 1.1 text, no plotting dependency);
//! every number drawn is one the run measured, and a plot with nothing to draw is an
//! error, not an empty file.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;

/// One line of a latency CDF: `points` are (latency in µs, fraction of the samples at
/// or under that latency), rising in both.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One bar of a throughput chart: the figure reported (the median run's) and the
/// lowest and highest of the runs, drawn as a whisker when they differ.
#[derive(Clone, Debug, PartialEq)]
pub struct Bar {
    pub name: String,
    pub value: f64,
    pub low: f64,
    pub high: f64,
}

impl Bar {
    /// A bar of `value` (the figure reported), its whisker over `runs` and `value`.
    pub fn of(name: String, value: f64, runs: impl Iterator<Item = f64>) -> Bar {
        let (low, high) = runs.fold((value, value), |(l, h), v| (l.min(v), h.max(v)));
        Bar {
            name,
            value,
            low,
            high,
        }
    }
}

/// The (latency, cumulative fraction) points of a histogram of microseconds, one per
/// recorded bucket, ending at fraction 1; empty for an empty histogram.
pub fn cdf_points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    let total = h.len();
    if total == 0 {
        return Vec::new();
    }
    let mut seen = 0u64;
    h.iter_recorded()
        .map(|v| {
            seen += v.count_since_last_iteration();
            (v.value_iterated_to() as f64, seen as f64 / total as f64)
        })
        .collect()
}

/// What one scenario of a run gives to plot.
#[derive(Debug, Default)]
struct Scenario {
    key: String,
    title: String,
    x_label: String,
    series: Vec<Series>,
    unit: String,
    bars: Vec<Bar>,
}

/// The figures of one bench run to plot, gathered scenario by scenario.
#[derive(Debug, Default)]
pub struct Plots {
    note: String,
    scenarios: Vec<Scenario>,
}

impl Plots {
    /// `note` is printed under every title (the machine the runs were taken on).
    pub fn new(note: impl Into<String>) -> Self {
        Plots {
            note: note.into(),
            scenarios: Vec::new(),
        }
    }

    /// Whether no scenario gave anything to plot.
    pub fn is_empty(&self) -> bool {
        self.scenarios.is_empty()
    }

    fn scenario(&mut self, key: &str, title: &str) -> &mut Scenario {
        let i = match self.scenarios.iter().position(|s| s.key == key) {
            Some(i) => i,
            None => {
                self.scenarios.push(Scenario {
                    key: key.to_owned(),
                    title: title.to_owned(),
                    ..Default::default()
                });
                self.scenarios.len() - 1
            }
        };
        &mut self.scenarios[i]
    }

    /// Adds a line to `key`'s latency CDF; `x_label` says what one sample is.
    pub fn latency(&mut self, key: &str, title: &str, x_label: &str, series: Series) {
        let s = self.scenario(key, title);
        s.x_label = x_label.to_owned();
        s.series.push(series);
    }

    /// Adds a bar to `key`'s throughput chart, in `unit`.
    pub fn throughput(&mut self, key: &str, title: &str, unit: &str, bar: Bar) {
        let s = self.scenario(key, title);
        s.unit = unit.to_owned();
        s.bars.push(bar);
    }

    /// Writes `dir/<key>-latency.svg` and `dir/<key>-throughput.svg` for each scenario
    /// that has lines or bars, and returns the paths written. Each file is rendered in
    /// full before it is written, so a figure that cannot be drawn leaves no file.
    pub fn write(&self, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
        if self.scenarios.is_empty() {
            bail!("nothing to plot: none of the scenarios run records latencies or rates");
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut written = Vec::new();
        for s in &self.scenarios {
            let mut files = Vec::new();
            if !s.series.is_empty() {
                let title = format!("{} — latency CDF", s.title);
                let note = format!(
                    "{}; each line: one run, the median one the table reports",
                    self.note
                );
                let svg = latency_cdf_svg(&title, &note, &s.x_label, &s.series)
                    .with_context(|| format!("{} latency plot", s.key))?;
                files.push((format!("{}-latency.svg", s.key), svg));
            }
            if !s.bars.is_empty() {
                let title = format!("{} — throughput", s.title);
                let svg = throughput_svg(&title, &self.note, &s.unit, &s.bars)
                    .with_context(|| format!("{} throughput plot", s.key))?;
                files.push((format!("{}-throughput.svg", s.key), svg));
            }
            for (name, svg) in files {
                let path = dir.join(name);
                std::fs::write(&path, svg)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                written.push(path);
            }
        }
        Ok(written)
    }
}

const WIDTH: f64 = 820.0;
/// Okabe–Ito colours, told apart with most colour blindness; past them lines are dashed.
const COLOURS: [&str; 7] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
];
const DASHES: [&str; 3] = ["", "6 3", "2 3"];

/// A latency CDF: x = latency (log scale when the values span a decade or more; values
/// under 1 µs are drawn at 1 µs there), y = fraction of samples at or under it.
pub fn latency_cdf_svg(
    title: &str,
    note: &str,
    x_label: &str,
    series: &[Series],
) -> anyhow::Result<String> {
    if series.is_empty() {
        bail!("no latency series to plot");
    }
    for s in series {
        check_cdf(s)?;
    }
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (min, max) = xs.fold((f64::INFINITY, 0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let axis = if max / min.max(1.0) >= 10.0 {
        Axis::log(min.max(1.0), max)
    } else {
        Axis::linear(min, max, false)
    };
    let (left, top, pw, ph) = (80.0, 62.0, WIDTH - 110.0, 360.0);
    let height = top + ph + 64.0 + 20.0 * series.len() as f64 + 8.0;
    let mut svg = header(height, title, note);
    // Grid, ticks and labels.
    for &t in &axis.ticks {
        let x = left + axis.frac(t) * pw;
        grid_line(&mut svg, x, top, x, top + ph);
        text(&mut svg, x, top + ph + 17.0, "middle", &fmt_latency(t));
    }
    for i in 0..=10 {
        let f = i as f64 / 10.0;
        let y = top + ph - f * ph;
        grid_line(&mut svg, left, y, left + pw, y);
        text(&mut svg, left - 6.0, y + 4.0, "end", &format!("{f:.1}"));
    }
    frame(&mut svg, left, top, pw, ph);
    let x_label = if axis.log {
        format!("{x_label}; log scale")
    } else {
        x_label.to_owned()
    };
    text(
        &mut svg,
        left + pw / 2.0,
        top + ph + 38.0,
        "middle",
        &x_label,
    );
    let _ = writeln!(
        svg,
        r#"<text transform="translate(20 {:.1}) rotate(-90)" text-anchor="middle">fraction of samples at or under</text>"#,
        top + ph / 2.0
    );
    // Lines, then the legend under the plot.
    for (i, s) in series.iter().enumerate() {
        let mut points = String::new();
        let mut last: Option<(f64, f64)> = None;
        let first_x = left + axis.frac(s.points[0].0) * pw;
        let _ = write!(points, "{first_x:.1},{:.1}", top + ph);
        for (j, &(v, f)) in s.points.iter().enumerate() {
            let p = (left + axis.frac(v) * pw, top + ph - f * ph);
            // Points closer than half a pixel to the last one drawn add nothing.
            let close = last.is_some_and(|l| (p.0 - l.0).abs() < 0.5 && (p.1 - l.1).abs() < 0.5);
            if close && j + 1 < s.points.len() {
                continue;
            }
            let _ = write!(points, " {:.1},{:.1}", p.0, p.1);
            last = Some(p);
        }
        let _ = writeln!(
            svg,
            r#"<g class="series"><title>{}</title><polyline fill="none" stroke-width="1.8" {} points="{points}"/></g>"#,
            escape(&s.name),
            stroke(i)
        );
        let y = top + ph + 62.0 + 20.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{left:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke-width="3" {}/>"#,
            left + 28.0,
            stroke(i)
        );
        text(&mut svg, left + 36.0, y + 4.0, "start", &s.name);
    }
    svg.push_str("</svg>\n");
    Ok(svg)
}

/// Horizontal bars, one per system or mode, the figure written at the end of each.
pub fn throughput_svg(title: &str, note: &str, unit: &str, bars: &[Bar]) -> anyhow::Result<String> {
    if bars.is_empty() {
        bail!("no throughput figures to plot");
    }
    for b in bars {
        let ok = [b.value, b.low, b.high]
            .iter()
            .all(|v| v.is_finite() && *v >= 0.0);
        if !ok || b.low > b.value || b.value > b.high {
            bail!(
                "bar {:?}: value {}, lowest {}, highest {} are not finite, non-negative and in order",
                b.name,
                b.value,
                b.low,
                b.high
            );
        }
    }
    let max = bars.iter().map(|b| b.high).fold(0f64, f64::max);
    let axis = Axis::linear(0.0, max, true);
    let label_chars = bars
        .iter()
        .map(|b| b.name.chars().count())
        .max()
        .unwrap_or(0);
    let left = (label_chars as f64 * 7.0 + 20.0).clamp(90.0, 380.0);
    let (top, pw) = (62.0, WIDTH - left - 80.0);
    let ph = 34.0 * bars.len() as f64 + 10.0;
    let height = top + ph + 50.0;
    let mut svg = header(height, title, note);
    for &t in &axis.ticks {
        let x = left + axis.frac(t) * pw;
        grid_line(&mut svg, x, top, x, top + ph);
        text(&mut svg, x, top + ph + 17.0, "middle", &fmt_si(t));
    }
    frame(&mut svg, left, top, pw, ph);
    text(&mut svg, left + pw / 2.0, top + ph + 38.0, "middle", unit);
    for (i, b) in bars.iter().enumerate() {
        let y = top + 10.0 + 34.0 * i as f64;
        let w = axis.frac(b.value) * pw;
        let _ = writeln!(
            svg,
            r#"<g class="bar"><title>{}: {}</title><rect x="{left:.1}" y="{y:.1}" width="{w:.1}" height="24" fill="{}"/></g>"#,
            escape(&b.name),
            fmt_si(b.value),
            COLOURS[i % COLOURS.len()]
        );
        let mut end = left + w;
        if b.high > b.low {
            let (x0, x1) = (left + axis.frac(b.low) * pw, left + axis.frac(b.high) * pw);
            let yc = y + 12.0;
            let _ = writeln!(
                svg,
                r##"<path d="M{x0:.1} {yc:.1}H{x1:.1}M{x0:.1} {:.1}V{:.1}M{x1:.1} {:.1}V{:.1}" stroke="#333" fill="none"/>"##,
                yc - 6.0,
                yc + 6.0,
                yc - 6.0,
                yc + 6.0
            );
            end = end.max(x1);
        }
        text(&mut svg, left - 8.0, y + 16.0, "end", &b.name);
        text(&mut svg, end + 6.0, y + 16.0, "start", &fmt_si(b.value));
    }
    svg.push_str("</svg>\n");
    Ok(svg)
}

fn check_cdf(s: &Series) -> anyhow::Result<()> {
    if s.points.is_empty() {
        bail!("latency series {:?} has no points", s.name);
    }
    let mut prev = (f64::NEG_INFINITY, 0.0);
    for &(v, f) in &s.points {
        if !v.is_finite() || v < 0.0 || !(0.0..=1.0).contains(&f) {
            bail!(
                "latency series {:?}: point ({v}, {f}) is out of range",
                s.name
            );
        }
        if v < prev.0 || f < prev.1 {
            bail!(
                "latency series {:?} is not a CDF: ({v}, {f}) comes after {prev:?}",
                s.name
            );
        }
        prev = (v, f);
    }
    Ok(())
}

/// A value axis: where each value falls (0 to 1 along the axis) and the ticks to label.
struct Axis {
    log: bool,
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Axis {
    /// Whole decades around `min..=max` (both > 0), with 2 and 5 between when there are
    /// no more than two decades.
    fn log(min: f64, max: f64) -> Axis {
        let lo = min.log10().floor() as i32;
        let hi = (max.log10().ceil() as i32).max(lo + 1);
        let mut ticks = Vec::new();
        for d in lo..=hi {
            let base = 10f64.powi(d);
            ticks.push(base);
            if hi - lo <= 2 && d < hi {
                ticks.extend([2.0 * base, 5.0 * base]);
            }
        }
        Axis {
            log: true,
            lo: 10f64.powi(lo),
            hi: 10f64.powi(hi),
            ticks,
        }
    }

    /// About five round steps covering `min..=max` (from 0 with `from_zero`).
    fn linear(min: f64, max: f64, from_zero: bool) -> Axis {
        let min = if from_zero { 0.0 } else { min };
        let span = if max > min {
            max - min
        } else {
            max.abs().max(1.0)
        };
        let raw = span / 5.0;
        let mag = 10f64.powf(raw.log10().floor());
        let step = mag
            * match raw / mag {
                r if r <= 1.0 => 1.0,
                r if r <= 2.0 => 2.0,
                r if r <= 5.0 => 5.0,
                _ => 10.0,
            };
        let first = (min / step).floor() as i64;
        let last = ((max / step).ceil() as i64).max(first + 1);
        Axis {
            log: false,
            lo: first as f64 * step,
            hi: last as f64 * step,
            ticks: (first..=last).map(|i| i as f64 * step).collect(),
        }
    }

    fn frac(&self, v: f64) -> f64 {
        if self.log {
            let v = v.max(self.lo);
            (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        }
    }
}

fn header(height: f64, title: &str, note: &str) -> String {
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r##"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0}" viewBox="0 0 {WIDTH} {height:.0}" font-family="DejaVu Sans, Arial, sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{:.1}" y="24" text-anchor="middle" font-size="15" font-weight="bold">{}</text>
<text x="{:.1}" y="42" text-anchor="middle" font-size="10" fill="#555">{}</text>"##,
        WIDTH / 2.0,
        escape(title),
        WIDTH / 2.0,
        escape(note)
    );
    svg
}

fn text(svg: &mut String, x: f64, y: f64, anchor: &str, s: &str) {
    let _ = writeln!(
        svg,
        r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}">{}</text>"#,
        escape(s)
    );
}

fn grid_line(svg: &mut String, x1: f64, y1: f64, x2: f64, y2: f64) {
    let _ = writeln!(
        svg,
        r##"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" stroke="#ddd"/>"##
    );
}

fn frame(svg: &mut String, x: f64, y: f64, w: f64, h: f64) {
    let _ = writeln!(
        svg,
        r##"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" fill="none" stroke="#333"/>"##
    );
}

fn stroke(i: usize) -> String {
    let colour = COLOURS[i % COLOURS.len()];
    match DASHES[(i / COLOURS.len()) % DASHES.len()] {
        "" => format!(r#"stroke="{colour}""#),
        dash => format!(r#"stroke="{colour}" stroke-dasharray="{dash}""#),
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A number with up to three decimals, trailing zeros dropped.
fn short(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn fmt_latency(us: f64) -> String {
    if us >= 1e6 {
        format!("{} s", short(us / 1e6))
    } else if us >= 1e3 {
        format!("{} ms", short(us / 1e3))
    } else {
        format!("{} µs", short(us))
    }
}

fn fmt_si(v: f64) -> String {
    if v >= 1e6 {
        format!("{} M", short((v / 1e4).round() / 1e2))
    } else if v >= 1e3 {
        format!("{} k", short((v / 1e2).round() / 10.0))
    } else {
        short(v.round())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(name: &str, points: &[(f64, f64)]) -> Series {
        Series {
            name: name.to_owned(),
            points: points.to_vec(),
        }
    }

    fn hist(values: &[u64]) -> Histogram<u64> {
        let mut h = Histogram::new_with_bounds(1, 60_000_000, 3).unwrap();
        for &v in values {
            h.record(v).unwrap();
        }
        h
    }

    /// The (x, y) pairs of every polyline, in document order.
    fn polylines(doc: &roxmltree::Document) -> Vec<Vec<(f64, f64)>> {
        doc.descendants()
            .filter(|n| n.has_tag_name("polyline"))
            .map(|n| {
                n.attribute("points")
                    .unwrap()
                    .split_whitespace()
                    .map(|p| {
                        let (x, y) = p.split_once(',').unwrap();
                        (x.parse().unwrap(), y.parse().unwrap())
                    })
                    .collect()
            })
            .collect()
    }

    fn texts(doc: &roxmltree::Document) -> Vec<String> {
        doc.descendants()
            .filter(|n| n.has_tag_name("text") || n.has_tag_name("title"))
            .filter_map(|n| n.text().map(str::to_owned))
            .collect()
    }

    #[test]
    fn cdf_of_a_histogram_rises_to_one() {
        let h = hist(&[100, 100, 200, 5_000, 90_000]);
        let points = cdf_points(&h);
        assert_eq!(points.len(), 4);
        assert_eq!(points[0], (100.0, 0.4));
        assert_eq!(points.last().unwrap().1, 1.0);
        assert!(
            points
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1)
        );
        assert!(cdf_points(&hist(&[])).is_empty());
    }

    #[test]
    fn latency_plot_is_xml_with_names_labels_and_rising_lines() {
        let a = series(
            "asp, fsync=always",
            &cdf_points(&hist(&[80, 90, 120, 400, 13_000])),
        );
        let b = series(
            "Redis <AOF> & co",
            &cdf_points(&hist(&[150, 160, 170, 900, 2_000])),
        );
        let svg = latency_cdf_svg("live: latency CDF", "2 cores", "ack → seen", &[a, b]).unwrap();
        let doc = roxmltree::Document::parse(&svg).expect("the SVG parses as XML");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        let texts = texts(&doc);
        for want in [
            "asp, fsync=always",
            "Redis <AOF> & co",
            "live: latency CDF",
            "ack → seen; log scale",
            "fraction of samples at or under",
            "100 µs",
            "10 ms",
        ] {
            assert!(texts.iter().any(|t| t == want), "{want:?} not in {texts:?}");
        }
        let lines = polylines(&doc);
        assert_eq!(lines.len(), 2);
        for line in lines {
            assert!(line.len() >= 3);
            // Right and up: x never falls, and SVG y (down the page) never rises.
            assert!(
                line.windows(2)
                    .all(|w| w[1].0 >= w[0].0 && w[1].1 <= w[0].1),
                "{line:?}"
            );
        }
    }

    #[test]
    fn narrow_latencies_get_a_linear_axis() {
        let a = series("fsync", &[(80.0, 0.5), (120.0, 0.9), (150.0, 1.0)]);
        let svg = latency_cdf_svg("t", "n", "latency", &[a]).unwrap();
        let doc = roxmltree::Document::parse(&svg).unwrap();
        let texts = texts(&doc);
        assert!(texts.iter().any(|t| t == "latency"), "{texts:?}");
        assert!(!texts.iter().any(|t| t.contains("log scale")));
    }

    #[test]
    fn throughput_plot_is_xml_with_every_bar() {
        let bars = [
            Bar {
                name: "fsync=always".into(),
                value: 817_000.0,
                low: 630_000.0,
                high: 1_050_000.0,
            },
            Bar {
                name: "fsync=never".into(),
                value: 837_000.0,
                low: 837_000.0,
                high: 837_000.0,
            },
        ];
        let svg = throughput_svg("batch: throughput", "note", "events/s", &bars).unwrap();
        let doc = roxmltree::Document::parse(&svg).expect("the SVG parses as XML");
        let texts = texts(&doc);
        for want in ["fsync=always", "fsync=never", "events/s", "817 k", "837 k"] {
            assert!(texts.iter().any(|t| t == want), "{want:?} not in {texts:?}");
        }
        let widths: Vec<f64> = doc
            .descendants()
            .filter(|n| n.has_tag_name("rect") && n.parent().unwrap().has_tag_name("g"))
            .map(|n| n.attribute("width").unwrap().parse().unwrap())
            .collect();
        assert_eq!(widths.len(), 2);
        assert!(widths[0] < widths[1] && widths[0] > 0.0);
    }

    #[test]
    fn nothing_to_draw_is_an_error() {
        let e = latency_cdf_svg("t", "n", "x", &[]).unwrap_err();
        assert!(e.to_string().contains("no latency series"), "{e}");
        let e = latency_cdf_svg("t", "n", "x", &[series("empty", &[])]).unwrap_err();
        assert!(e.to_string().contains("\"empty\" has no points"), "{e}");
        let e = throughput_svg("t", "n", "events/s", &[]).unwrap_err();
        assert!(e.to_string().contains("no throughput"), "{e}");
        let falling = series("falling", &[(10.0, 0.5), (20.0, 0.4)]);
        let e = latency_cdf_svg("t", "n", "x", &[falling]).unwrap_err();
        assert!(e.to_string().contains("not a CDF"), "{e}");
        let nan = Bar {
            name: "nan".into(),
            value: f64::NAN,
            low: 0.0,
            high: 1.0,
        };
        assert!(throughput_svg("t", "n", "u", &[nan]).is_err());
    }

    #[test]
    fn write_makes_files_only_for_what_was_measured() {
        let dir = std::env::temp_dir().join(format!("asp-bench-plot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut plots = Plots::new("machine");
        assert!(plots.is_empty());
        assert!(plots.write(&dir).is_err());
        assert!(!dir.exists(), "no directory for nothing");
        let cdf = cdf_points(&hist(&[10, 20, 30]));
        plots.latency("live", "live", "latency", series("asp", &cdf));
        let bar = Bar {
            name: "asp".into(),
            value: 5.0,
            low: 5.0,
            high: 5.0,
        };
        plots.throughput("catchup", "catch-up", "events/s", bar);
        let written = plots.write(&dir).unwrap();
        let names: Vec<_> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["live-latency.svg", "catchup-throughput.svg"]);
        for p in &written {
            roxmltree::Document::parse(&std::fs::read_to_string(p).unwrap()).unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
