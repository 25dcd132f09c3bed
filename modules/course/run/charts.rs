//! PNG charts with plotters: line charts (several series, optional log y axis), bar charts, and
//! heatmaps with a colour bar. Text uses the bundled DejaVu Sans (no system fonts needed), and
//! every file is written through a temporary file and renamed, so a chart is whole or absent.

use crate::sys::fsutil::write_via_temp;
use anyhow::{anyhow, bail, Result};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::ops::Range;
use std::path::Path;
use std::sync::Once;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const SIZE: (u32, u32) = (1000, 640);
/// Tableau 10: distinct, colour-blind-friendlier than plotters' default palette.
const TAB10: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// Registers the bundled font (once); every drawing function calls it.
pub fn ensure_fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            // The bytes are a valid TTF compiled in; failure would be a build defect.
            plotters::style::register_font("sans-serif", style, FONT)
                .unwrap_or_else(|_| panic!("bundled font is invalid"));
        }
    });
}

pub fn color(i: usize) -> RGBColor {
    let (r, g, b) = TAB10[i % TAB10.len()];
    RGBColor(r, g, b)
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing chart: {e:?}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Line,
    Points,
    Dashed,
}

#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub style: Style,
}

impl Series {
    pub fn line(name: &str, points: Vec<(f64, f64)>) -> Self {
        Self { name: name.into(), points, style: Style::Line }
    }
    pub fn points(name: &str, points: Vec<(f64, f64)>) -> Self {
        Self { name: name.into(), points, style: Style::Points }
    }
    pub fn dashed(name: &str, points: Vec<(f64, f64)>) -> Self {
        Self { name: name.into(), points, style: Style::Dashed }
    }
}

#[derive(Debug, Clone)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub log_y: bool,
}

impl LineChart {
    pub fn new(title: &str, x_label: &str, y_label: &str) -> Self {
        Self { title: title.into(), x_label: x_label.into(), y_label: y_label.into(), series: vec![], log_y: false }
    }
    pub fn log_y(mut self, on: bool) -> Self {
        self.log_y = on;
        self
    }
    pub fn series(mut self, s: Series) -> Self {
        self.series.push(s);
        self
    }

    /// Draws the chart to `path` (PNG).
    pub fn save(&self, path: &Path) -> Result<()> {
        ensure_fonts();
        let pts: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(|(x, y)| x.is_finite() && y.is_finite() && (!self.log_y || *y > 0.0))
            .collect();
        if pts.is_empty() {
            bail!(
                "chart '{}' has no finite points to draw{}",
                self.title,
                if self.log_y { " (log scale needs y > 0)" } else { "" }
            );
        }
        let x = padded(pts.iter().map(|p| p.0), 0.0);
        write_via_temp(path, |tmp| {
            let root = BitMapBackend::new(tmp, SIZE).into_drawing_area();
            root.fill(&WHITE).map_err(err)?;
            if self.log_y {
                let lo = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
                let hi = pts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
                let (lo, hi) = if hi > lo { (lo / 1.2, hi * 1.2) } else { (lo / 2.0, hi * 2.0) };
                self.draw(&root, x, (lo..hi).log_scale())?;
            } else {
                self.draw(&root, x, padded(pts.iter().map(|p| p.1), 0.05))?;
            }
            root.present().map_err(err)
        })
    }

    fn draw<Y>(&self, root: &DrawingArea<BitMapBackend, Shift>, x: Range<f64>, y: Y) -> Result<()>
    where
        Y: AsRangedCoord<Value = f64>,
        Y::CoordDescType: ValueFormatter<f64>,
    {
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 28))
            .margin(18)
            .x_label_area_size(55)
            .y_label_area_size(80)
            .build_cartesian_2d(x, y)
            .map_err(err)?;
        // Axes that count things (epochs, steps) get whole-number ticks; so does a y axis whose
        // values run into the tens or more (samples/s, tokens/s).
        let all = || {
            self.series.iter().flat_map(|s| s.points.iter().copied()).filter(|(x, y)| x.is_finite() && y.is_finite())
        };
        let (x_lo, x_hi) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (x, _)| (a.min(x), b.max(x)));
        let x_counts = all().all(|(x, _)| x.fract() == 0.0) && x_hi > x_lo;
        let (y_lo, y_hi) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (_, y)| (a.min(y), b.max(y)));
        let y_whole = !self.log_y && y_hi - y_lo >= 20.0;
        let x_fmt = |x: &f64| if x_counts { whole_tick(*x) } else { format!("{x}") };
        let y_fmt = |y: &f64| if y_whole { whole_tick(*y) } else { short_tick(*y) };
        chart
            .configure_mesh()
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .x_labels(if x_counts { ((x_hi - x_lo) as usize + 1).min(11) } else { 10 })
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .label_style(("sans-serif", 17))
            .axis_desc_style(("sans-serif", 20))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(err)?;
        for (i, s) in self.series.iter().enumerate() {
            let c = color(i);
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite() && (!self.log_y || *y > 0.0))
                .collect();
            let anno = match s.style {
                Style::Line => chart.draw_series(LineSeries::new(pts, c.stroke_width(3))).map_err(err)?,
                Style::Dashed => {
                    chart.draw_series(DashedLineSeries::new(pts, 10, 6, c.stroke_width(3))).map_err(err)?
                }
                Style::Points => {
                    chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, c.mix(0.6).filled()))).map_err(err)?
                }
            };
            let style = s.style;
            anno.label(&s.name).legend(move |(x, y)| match style {
                Style::Points => Circle::new((x + 10, y), 4, c.filled()).into_dyn(),
                _ => PathElement::new(vec![(x, y), (x + 22, y)], c.stroke_width(3)).into_dyn(),
            });
        }
        if self.series.iter().any(|s| !s.name.is_empty()) {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(160, 160, 160))
                .label_font(("sans-serif", 17))
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(err)?;
        }
        Ok(())
    }
}

/// The moving mean of `points`' y over the last `window` points (fewer at the start): what a
/// noisy per-step training loss is drawn as.
pub fn moving_mean(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let w = window.max(1);
    let mut sum = 0.0;
    points
        .iter()
        .enumerate()
        .map(|(j, &(x, y))| {
            sum += y;
            if j >= w {
                sum -= points[j - w].1;
            }
            (x, sum / (j + 1).min(w) as f64)
        })
        .collect()
}

/// A tick on an axis that counts: the whole number, or nothing between whole numbers.
fn whole_tick(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        String::new()
    }
}

/// A tick on a continuous axis: at most 4 significant digits, no trailing zeros.
fn short_tick(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e6).contains(&a) {
        return format!("{v:.1e}");
    }
    let decimals = (3 - a.log10().floor() as i32).clamp(0, 6) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// The range of `v` widened by `frac` on both sides (and made non-empty).
fn padded(v: impl Iterator<Item = f64>, frac: f64) -> Range<f64> {
    let (lo, hi) = v.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    if hi > lo {
        let pad = (hi - lo) * frac;
        (lo - pad)..(hi + pad)
    } else {
        (lo - 0.5)..(hi + 0.5)
    }
}

/// A bar chart: one bar per `(label, value)`, values printed above the bars.
pub fn bar_chart(path: &Path, title: &str, y_label: &str, bars: &[(String, f64)]) -> Result<()> {
    ensure_fonts();
    if bars.is_empty() || bars.iter().any(|b| !b.1.is_finite()) {
        bail!("bar chart '{title}' needs at least one bar and finite values");
    }
    let hi = bars.iter().map(|b| b.1).fold(0.0, f64::max);
    let lo = bars.iter().map(|b| b.1).fold(0.0, f64::min);
    let n = bars.len();
    let y_whole = hi - lo >= 20.0;
    write_via_temp(path, |tmp| {
        let root = BitMapBackend::new(tmp, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let span = (hi - lo).max(f64::MIN_POSITIVE);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 28))
            .margin(18)
            .x_label_area_size(55)
            .y_label_area_size(80)
            .build_cartesian_2d(-0.5..(n as f64 - 0.5), (lo - 0.02 * span)..(hi + 0.12 * span))
            .map_err(err)?;
        let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n + 1)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names.len() {
                    names[i as usize].clone()
                } else {
                    String::new()
                }
            })
            .y_desc(y_label)
            .y_label_formatter(&|y: &f64| if y_whole { whole_tick(*y) } else { short_tick(*y) })
            .label_style(("sans-serif", 17))
            .axis_desc_style(("sans-serif", 20))
            .draw()
            .map_err(err)?;
        chart
            .draw_series(
                bars.iter()
                    .enumerate()
                    .map(|(i, b)| Rectangle::new([(i as f64 - 0.35, 0.0), (i as f64 + 0.35, b.1)], color(i).filled())),
            )
            .map_err(err)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, b)| {
                Text::new(
                    format_value(b.1),
                    (i as f64 - 0.12, b.1 + 0.03 * span),
                    ("sans-serif", 17).into_font().color(&BLACK),
                )
            }))
            .map_err(err)?;
        root.present().map_err(err)
    })
}

fn format_value(v: f64) -> String {
    let a = v.abs();
    if v == v.trunc() && a < 1e6 {
        format!("{v:.0}") // counts (confusion matrices) print as integers
    } else if a >= 1e4 || a < 1e-3 {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// Viridis, by linear interpolation between five of its stops.
pub fn viridis(t: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 5] =
        [(68.0, 1.0, 84.0), (59.0, 82.0, 139.0), (33.0, 145.0, 140.0), (94.0, 201.0, 98.0), (253.0, 231.0, 37.0)];
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 } * 4.0;
    let i = (t.floor() as usize).min(3);
    let f = t - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |x: f64, y: f64| (x + (y - x) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

#[derive(Debug, Clone)]
pub struct Heatmap {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Row-major values: `values[row][col]`; row 0 is drawn at the top.
    pub values: Vec<Vec<f64>>,
    pub x_ticks: Vec<String>,
    pub y_ticks: Vec<String>,
    /// Print each value in its cell (small matrices such as confusion matrices).
    pub annotate: bool,
}

impl Heatmap {
    /// One sequence's attention weights `(H, T, T)` (or `(T, T)`) averaged over heads, queries as
    /// rows and keys as columns, each axis labelled with the tokens.
    pub fn attention(title: &str, weights: &tch::Tensor, tokens: Vec<String>) -> Result<Heatmap> {
        let w = if weights.dim() == 3 {
            weights.mean_dim(0, false, tch::Kind::Double)
        } else {
            weights.to_kind(tch::Kind::Double)
        };
        let w = w.to_device(tch::Device::Cpu);
        let t = w.size()[0];
        if w.size() != [t, t] || t as usize != tokens.len() {
            bail!("attention heatmap '{title}': weights of shape {:?} for {} tokens", weights.size(), tokens.len());
        }
        let values = (0..t).map(|i| Vec::<f64>::try_from(w.get(i))).collect::<Result<Vec<_>, _>>()?;
        Ok(Heatmap {
            title: title.into(),
            x_label: "key token".into(),
            y_label: "query token".into(),
            values,
            x_ticks: tokens.clone(),
            y_ticks: tokens,
            annotate: false,
        })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        ensure_fonts();
        let rows = self.values.len();
        let cols = self.values.first().map_or(0, |r| r.len());
        if rows == 0 || cols == 0 || self.values.iter().any(|r| r.len() != cols) {
            bail!("heatmap '{}' needs a non-empty rectangular matrix", self.title);
        }
        let finite = self.values.iter().flatten().copied().filter(|v| v.is_finite());
        let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
        if !lo.is_finite() {
            bail!("heatmap '{}' has no finite values", self.title);
        }
        let span = if hi > lo { hi - lo } else { 1.0 };
        write_via_temp(path, |tmp| {
            let root = BitMapBackend::new(tmp, (1000, 800)).into_drawing_area();
            root.fill(&WHITE).map_err(err)?;
            let (main, bar) = root.split_horizontally(860);
            let mut chart = ChartBuilder::on(&main)
                .caption(&self.title, ("sans-serif", 28))
                .margin(18)
                .x_label_area_size(70)
                .y_label_area_size(110)
                .build_cartesian_2d(0f64..cols as f64, 0f64..rows as f64)
                .map_err(err)?;
            chart
                .configure_mesh()
                .disable_mesh()
                .x_labels(0)
                .y_labels(0)
                .x_desc(&self.x_label)
                .y_desc(&self.y_label)
                .axis_desc_style(("sans-serif", 20))
                .draw()
                .map_err(err)?;
            let y_of = |r: usize| (rows - 1 - r) as f64; // row 0 at the top
            chart
                .draw_series(self.values.iter().enumerate().flat_map(|(r, row)| {
                    row.iter().enumerate().map(move |(c, v)| {
                        Rectangle::new(
                            [(c as f64, y_of(r)), (c as f64 + 1.0, y_of(r) + 1.0)],
                            viridis((v - lo) / span).filled(),
                        )
                    })
                }))
                .map_err(err)?;
            let font_px = if rows.max(cols) <= 12 { 18 } else { 12 };
            if self.annotate && rows.max(cols) <= 30 {
                for (r, row) in self.values.iter().enumerate() {
                    for (c, v) in row.iter().enumerate() {
                        let (px, py) = chart.backend_coord(&(c as f64 + 0.5, y_of(r) + 0.5));
                        let text_color = if (v - lo) / span > 0.6 { BLACK } else { WHITE };
                        let style = ("sans-serif", font_px).into_font().color(&text_color).pos(
                            plotters::style::text_anchor::Pos::new(
                                plotters::style::text_anchor::HPos::Center,
                                plotters::style::text_anchor::VPos::Center,
                            ),
                        );
                        main.draw(&Text::new(format_value(*v), (px, py), style)).map_err(err)?;
                    }
                }
            }
            // Tick labels at cell centres, drawn on the parent area (outside the plot).
            let every = |n: usize| (n / 25).max(1);
            for (c, name) in self.x_ticks.iter().enumerate().take(cols).step_by(every(cols)) {
                let (px, py) = chart.backend_coord(&(c as f64 + 0.5, 0.0));
                let style =
                    ("sans-serif", font_px).into_font().color(&BLACK).pos(plotters::style::text_anchor::Pos::new(
                        plotters::style::text_anchor::HPos::Center,
                        plotters::style::text_anchor::VPos::Top,
                    ));
                main.draw(&Text::new(name.clone(), (px, py + 6), style)).map_err(err)?;
            }
            for (r, name) in self.y_ticks.iter().enumerate().take(rows).step_by(every(rows)) {
                let (px, py) = chart.backend_coord(&(0.0, y_of(r) + 0.5));
                let style =
                    ("sans-serif", font_px).into_font().color(&BLACK).pos(plotters::style::text_anchor::Pos::new(
                        plotters::style::text_anchor::HPos::Right,
                        plotters::style::text_anchor::VPos::Center,
                    ));
                main.draw(&Text::new(name.clone(), (px - 6, py), style)).map_err(err)?;
            }
            // Colour bar.
            let mut cb = ChartBuilder::on(&bar)
                .margin_top(60)
                .margin_bottom(88)
                .margin_right(14)
                .y_label_area_size(96)
                .build_cartesian_2d(0f64..1f64, lo..(lo + span))
                .map_err(err)?;
            cb.configure_mesh()
                .disable_mesh()
                .disable_x_axis()
                .y_labels(6)
                .y_label_formatter(&|v: &f64| short_tick(*v))
                .label_style(("sans-serif", 15))
                .draw()
                .map_err(err)?;
            let steps = 100;
            cb.draw_series((0..steps).map(|i| {
                let a = lo + span * i as f64 / steps as f64;
                let b = lo + span * (i + 1) as f64 / steps as f64;
                Rectangle::new([(0.0, a), (1.0, b)], viridis(i as f64 / (steps - 1) as f64).filled())
            }))
            .map_err(err)?;
            root.present().map_err(err)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_size(p: &Path) -> (u32, u32) {
        let b = std::fs::read(p).unwrap();
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{} is not a PNG", p.display());
        (u32::from_be_bytes(b[16..20].try_into().unwrap()), u32::from_be_bytes(b[20..24].try_into().unwrap()))
    }

    #[test]
    fn draws_every_chart_kind_and_rejects_empty_input() {
        // COURSE_CHART_DIR keeps the PNGs for a look; otherwise a temporary folder.
        let keep = std::env::var_os("COURSE_CHART_DIR");
        let dir = keep
            .clone()
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join(format!("course-charts-{}", std::process::id())));
        let pts: Vec<(f64, f64)> = (1..50).map(|i| (i as f64, 1.0 / i as f64)).collect();
        let c = LineChart::new("loss", "step", "loss")
            .series(Series::line("train", pts.clone()))
            .series(Series::points("val", pts))
            .log_y(true);
        c.save(&dir.join("l.png")).unwrap();
        assert_eq!(png_size(&dir.join("l.png")), SIZE);
        bar_chart(&dir.join("b.png"), "tokens/s", "tokens/s", &[("fp32".into(), 100.0), ("bf16".into(), 140.0)])
            .unwrap();
        let h = Heatmap {
            title: "cm".into(),
            x_label: "pred".into(),
            y_label: "true".into(),
            values: vec![vec![5.0, 1.0], vec![0.0, 7.0]],
            x_ticks: vec!["a".into(), "b".into()],
            y_ticks: vec!["a".into(), "b".into()],
            annotate: true,
        };
        h.save(&dir.join("h.png")).unwrap();
        assert_eq!(png_size(&dir.join("h.png")), (1000, 800));
        assert!(LineChart::new("empty", "x", "y").save(&dir.join("e.png")).is_err());
        assert!(!dir.join("e.png").exists());
        if keep.is_none() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn viridis_ends() {
        assert_eq!(viridis(0.0), RGBColor(68, 1, 84));
        assert_eq!(viridis(1.0), RGBColor(253, 231, 37));
        assert_eq!(viridis(f64::NAN), RGBColor(68, 1, 84));
    }

    #[test]
    fn moving_mean_averages_the_last_window() {
        let p: Vec<(f64, f64)> = (0..5).map(|i| (i as f64, (i * i) as f64)).collect();
        let m = moving_mean(&p, 2);
        assert_eq!(m, vec![(0.0, 0.0), (1.0, 0.5), (2.0, 2.5), (3.0, 6.5), (4.0, 12.5)]);
    }

    #[test]
    fn ticks_are_whole_on_counting_axes_and_short_elsewhere() {
        assert_eq!((whole_tick(3.0), whole_tick(2.5), whole_tick(-0.0)), ("3".into(), String::new(), "0".into()));
        assert_eq!(short_tick(1.66254), "1.663");
        assert_eq!(short_tick(2500.0), "2500");
        assert_eq!(short_tick(0.25), "0.25");
        assert_eq!(short_tick(1.5e-5), "1.5e-5");
    }
}
