//! Training curves as SVG, drawn with plotters from a run's `log.jsonl`.
//!
//! SVG because it is text: it diffs, it renders in GitHub's file view next to `report.md`, and
//! drawing it needs no fonts or image codecs on the runner (plotters' SVG backend estimates text
//! size itself, so the output is the same on every machine and snapshot-stable). Long logs are
//! thinned to a fixed number of points so a 100k-step run still gives a small file.

use plotters::prelude::*;

use crate::run::outputs::{LogLine, keys, series};

/// Most points drawn per line; beyond it the log is thinned evenly (first and last kept).
pub const MAX_POINTS: usize = 500;

/// One chart, ready to be written beside the report.
#[derive(Debug, Clone, PartialEq)]
pub struct Plot {
    pub file_name: String,
    pub title: String,
    pub svg: String,
}

#[derive(Debug, thiserror::Error)]
#[error("drawing the `{title}` chart failed: {message}")]
pub struct PlotError {
    pub title: String,
    pub message: String,
}

/// Thins `points` to at most `max` by even stride, keeping the last point.
pub(crate) fn thin(points: &[(f64, f64)], max: usize) -> Vec<(f64, f64)> {
    if points.len() <= max || max < 2 {
        return points.to_vec();
    }
    let stride = points.len().div_ceil(max - 1);
    let mut out: Vec<_> = points.iter().step_by(stride).copied().collect();
    if out.last() != points.last() {
        out.extend(points.last().copied());
    }
    out
}

/// A range that plotters can draw even for a single point or a flat line.
fn padded(lo: f64, hi: f64) -> (f64, f64) {
    if (hi - lo).abs() < 1e-12 {
        let pad = if lo.abs() > 1e-12 {
            lo.abs() * 0.1
        } else {
            0.5
        };
        (lo - pad, hi + pad)
    } else {
        let pad = (hi - lo) * 0.05;
        (lo - pad, hi + pad)
    }
}

/// Draws one line chart (step on x) as an SVG string.
pub fn line_chart(title: &str, y_label: &str, points: &[(f64, f64)]) -> Result<String, PlotError> {
    let err = |e: &dyn std::fmt::Display| PlotError {
        title: title.to_string(),
        message: e.to_string(),
    };
    let points = thin(points, MAX_POINTS);
    if points.is_empty() {
        return Err(err(&"no finite points"));
    }
    let (x0, x1) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (x0, x1) = if x1 > x0 {
        (x0, x1)
    } else {
        (x0 - 1.0, x1 + 1.0)
    };
    let (y0, y1) = padded(y0, y1);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (640, 320)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(y_label)
            .x_labels(6)
            .y_labels(6)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format_tick(*y))
            .light_line_style(RGBColor(238, 238, 238))
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(
                points,
                RGBColor(31, 111, 235).stroke_width(2),
            ))
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

/// Tick labels short enough for the axis, whatever the metric's scale.
fn format_tick(y: f64) -> String {
    let a = y.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{y:.1e}")
    } else if a >= 100.0 {
        format!("{y:.0}")
    } else if a >= 1.0 {
        format!("{y:.2}")
    } else {
        format!("{y:.3}")
    }
}

/// The first key in `candidates` that has points in `log`.
fn first_series(log: &[LogLine], candidates: &[&str]) -> Option<(String, Vec<(f64, f64)>)> {
    candidates.iter().find_map(|k| {
        let s = series(log, k);
        (!s.is_empty()).then(|| (k.to_string(), s))
    })
}

/// The standard charts for a run: reward-model loss and accuracy; policy reward, KL and loss.
/// Charts whose metric was not logged are left out; names are stable so the report links them.
pub fn training_plots(
    reward_log: Option<&[LogLine]>,
    policy_log: Option<&[LogLine]>,
) -> Result<Vec<Plot>, PlotError> {
    let mut specs: Vec<(&str, &str, &[LogLine], &[&str])> = Vec::new();
    if let Some(log) = reward_log {
        specs.push((
            "reward-loss.svg",
            "Reward model: training loss",
            log,
            &[keys::LOSS],
        ));
        specs.push((
            "reward-accuracy.svg",
            "Reward model: pairwise accuracy",
            log,
            &[keys::ACCURACY],
        ));
    }
    if let Some(log) = policy_log {
        specs.push((
            "policy-reward.svg",
            "Policy: reward",
            log,
            &[
                keys::RLHF_REWARD,
                keys::SCORES,
                keys::REWARDS_MARGINS,
                keys::MEAN_REWARD,
            ],
        ));
        specs.push((
            "policy-kl.svg",
            "Policy: KL to reference",
            log,
            &[keys::KL, "kl"],
        ));
        specs.push((
            "policy-loss.svg",
            "Policy: loss",
            log,
            &[keys::POLICY_LOSS, keys::LOSS],
        ));
    }
    let mut plots = Vec::new();
    for (file, title, log, candidates) in specs {
        if let Some((key, points)) = first_series(log, candidates) {
            plots.push(Plot {
                file_name: file.to_string(),
                title: format!("{title} ({key})"),
                svg: line_chart(title, &key, &points)?,
            });
        }
    }
    Ok(plots)
}
