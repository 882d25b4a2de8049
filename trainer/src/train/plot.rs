//! `loss.png`: the training loss per step (and evaluation loss, when there is one).
//! Text is drawn with a system TrueType font (DejaVu, Liberation, Helvetica…); without one the
//! curves are still drawn, unlabeled.

use super::metrics::{EvalRecord, StepRecord};
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
];

/// Registers the first font found as "sans-serif"; returns whether one was.
fn register_font() -> bool {
    static FOUND: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FOUND.get_or_init(|| {
        for p in FONT_PATHS {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// Draws the curves into `path` (PNG, 900×500).
pub fn plot_loss(path: &Path, steps: &[StepRecord], evals: &[EvalRecord]) -> Result<()> {
    if steps.is_empty() {
        return Ok(());
    }
    let labels = register_font();
    let err = |e: &dyn std::fmt::Display| anyhow!("cannot draw {}: {e}", path.display());
    let root = BitMapBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let max_step = steps.last().map_or(1, |s| s.step).max(1) as f64;
    let all = steps
        .iter()
        .map(|s| s.loss)
        .chain(evals.iter().map(|e| e.eval_loss));
    let (lo, hi) = all.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let mut builder = ChartBuilder::on(&root);
    builder
        .margin(15)
        .x_label_area_size(if labels { 40 } else { 5 })
        .y_label_area_size(if labels { 60 } else { 5 });
    if labels {
        builder.caption("fuselora — loss", ("sans-serif", 22));
    }
    let mut chart = builder
        .build_cartesian_2d(0f64..max_step, (lo - pad)..(hi + pad))
        .map_err(|e| err(&e))?;
    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(WHITE.mix(0.0));
    if labels {
        mesh.x_desc("step").y_desc("loss");
    } else {
        mesh.disable_x_axis().disable_y_axis();
    }
    mesh.draw().map_err(|e| err(&e))?;
    let train = chart
        .draw_series(LineSeries::new(
            steps.iter().map(|s| (s.step as f64, s.loss)),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| err(&e))?;
    if labels {
        train
            .label("train loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    }
    if !evals.is_empty() {
        let ev = chart
            .draw_series(
                LineSeries::new(
                    evals.iter().map(|e| (e.step as f64, e.eval_loss)),
                    RED.stroke_width(2),
                )
                .point_size(4),
            )
            .map_err(|e| err(&e))?;
        if labels {
            ev.label("eval loss")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        }
    }
    if labels {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
