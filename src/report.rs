//! The analysis of calibration statistics: per-layer fits, the suggested order of linearisation and
//! the chosen layers, as a table for people, JSON for scripts and an SVG chart.

use std::fmt::Write;
use std::sync::OnceLock;

use anyhow::Result;
use serde::Serialize;

use crate::nbl::{LayerFit, fit_layer, fit_measures};
use crate::select::{Criterion, Selection, ranking, select};
use crate::stats::MomentsSource;

static COMMAND_LINE: OnceLock<String> = OnceLock::new();

/// Records the command line this process runs (the CLI does, first thing), for the reports that say
/// how to reproduce them.
pub fn record_command_line(args: impl IntoIterator<Item = String>) {
    let quoted: Vec<String> = args
        .into_iter()
        .enumerate()
        .map(|(i, a)| if i == 0 { "nbl-onnx".to_string() } else { shell_quoted(&a) })
        .collect();
    let _ = COMMAND_LINE.set(quoted.join(" "));
}

/// The command line recorded by [`record_command_line`], where one was.
pub fn command_line() -> Option<&'static str> {
    COMMAND_LINE.get().map(String::as_str)
}

/// `a` as a POSIX shell reads it back: bare where that is safe, else in single quotes.
fn shell_quoted(a: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./:=,+@%".contains(c);
    if !a.is_empty() && a.chars().all(safe) {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

/// One layer of the analysis: its fit (the map itself is not serialised) and whether it was chosen.
#[derive(Serialize)]
pub struct LayerRow {
    #[serde(flatten)]
    pub fit: LayerFit,
    pub linearized: bool,
}

/// The analyze JSON: `{"tokens","criterion","selected","order","lambda","layers":[...]}`.
#[derive(Serialize)]
pub struct Analysis {
    pub tokens: u64,
    pub criterion: Criterion,
    /// The layers to linearise, in the order they were chosen.
    pub selected: Vec<usize>,
    /// Every layer, best candidate first.
    pub order: Vec<usize>,
    pub lambda: f64,
    pub layers: Vec<LayerRow>,
}

/// Fits every layer, one after the other, each reading its moments when it starts (each fit is
/// parallel within: one layer's working set is held at a time, four d×d f64 matrices, 512 MiB at
/// d = 4096), ranks them by `criterion` and chooses by `selection`. The fits keep their measures,
/// not their maps: a rewrite fits the chosen layers' maps again.
pub fn analyze(
    stats: &dyn MomentsSource,
    criterion: Criterion,
    selection: &Selection,
    lambda: f64,
    spectrum: bool,
) -> Result<Analysis> {
    anyhow::ensure!(
        lambda >= 0.0 && lambda.is_finite(),
        "the ridge λ must be a finite number ≥ 0, not {lambda}"
    );
    // The attention sites; other units' moments are for the budget search.
    let sites: Vec<usize> = (0..stats.layers().len()).filter(|&i| stats.layers()[i].unit.is_none()).collect();
    let progress =
        crate::progress::bar(sites.len() as u64, "fitting {bar:40} {pos}/{len} layers  ETA {eta}", "layers");
    let fits: Vec<LayerFit> = sites
        .into_iter()
        .map(|i| {
            progress.inc(1);
            let layer = stats.layers()[i].layer;
            let context = |e: anyhow::Error| anyhow::anyhow!("layer {layer}: {e:#}");
            let moments = stats.moments(i)?.into_owned();
            // The map itself is needed only to measure it on held-out moments.
            let Some(heldout) = stats.heldout(i)? else {
                return fit_measures(layer, moments, lambda, spectrum).map_err(context);
            };
            let mut fit = fit_layer(layer, moments, lambda, spectrum).map_err(context)?;
            fit.heldout_residual = Some(fit.heldout_residual_on(&heldout));
            Ok(fit.without_map())
        })
        .collect::<Result<_>>()?;
    progress.finish_and_clear();
    let order = ranking(&fits, criterion.ranking());
    let selected = select(&fits, criterion.ranking(), selection)?;
    let layers =
        fits.into_iter().map(|fit| LayerRow { linearized: selected.contains(&fit.layer), fit }).collect();
    Ok(Analysis { tokens: stats.tokens(), criterion, selected, order, lambda, layers })
}

impl Analysis {
    /// Replaces the choice with `layers` (in the order chosen), as a selection that runs the model
    /// decided.
    pub fn select(&mut self, layers: Vec<usize>) {
        for row in &mut self.layers {
            row.linearized = layers.contains(&row.fit.layer);
        }
        self.selected = layers;
    }

    /// Which layers were chosen and why, in a line per layer: for people, before a rewrite.
    pub fn choice(&self) -> String {
        let mut out = format!(
            "chose {} of {} layers, best {} first:",
            self.selected.len(),
            self.layers.len(),
            self.criterion.describe()
        );
        for &l in &self.selected {
            if let Some(f) = self.fit(l) {
                let heldout =
                    f.heldout_residual.map_or(String::new(), |r| format!(" ({:.1}% held out)", 100.0 * r));
                let _ = write!(
                    out,
                    "\n  layer {l}: bound/d {:.4}, the linear map misses {:.1}%{heldout} of the attention output's \
                     variance, cos(x, x+y) {:.3}",
                    f.bound_normalized,
                    100.0 * f.fit_residual,
                    f.cosine
                );
            }
        }
        out
    }

    /// The fit of layer `layer`.
    pub fn fit(&self, layer: usize) -> Option<&LayerFit> {
        self.layers.iter().map(|row| &row.fit).find(|f| f.layer == layer)
    }
}

impl Analysis {
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} tokens, criterion {}, ridge λ = {:e}; suggested order: {}",
            self.tokens,
            self.criterion,
            self.lambda,
            self.order.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(", ")
        );
        let _ = writeln!(
            out,
            "{:>5}  {:>10}  {:>8}  {:>12}  {:>8}  {:>8}  {:>12}  {:>9}  {:>8}  chosen",
            "layer",
            "bound",
            "bound/d",
            "resid. energy",
            "residual",
            "held out",
            "resid/stream",
            "weighted",
            "cosine"
        );
        for row in &self.layers {
            let heldout = row.fit.heldout_residual.map_or("-".to_string(), |r| format!("{r:.5}"));
            let _ = writeln!(
                out,
                "{:>5}  {:>10.4}  {:>8.5}  {:>12.4e}  {:>8.5}  {:>8}  {:>12.4e}  {:>9.5}  {:>8.5}  {}{}",
                row.fit.layer,
                row.fit.bound,
                row.fit.bound_normalized,
                row.fit.residual_energy,
                row.fit.fit_residual,
                heldout,
                row.fit.relative_residual,
                row.fit.weighted_bound,
                row.fit.cosine,
                if row.linearized { "yes" } else { "" },
                if row.fit.rank_deficient { "  (rank-deficient statistics)" } else { "" }
            );
        }
        out
    }

    /// Bars of the normalised bound per layer (chosen layers highlighted) and the cosine as a line.
    pub fn svg(&self) -> String {
        let (width, height, margin) = (720.0, 320.0, 48.0);
        let n = self.layers.len().max(1) as f64;
        let step = (width - 2.0 * margin) / n;
        let plot_h = height - 2.0 * margin;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"##
        );
        let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="white"/>"##);
        let _ = writeln!(
            s,
            r##"<text x="{margin}" y="20" font-size="13">NBL: CCA bound / d per layer (bars; orange = chosen), mean cos(x, x+y) (line), {} tokens</text>"##,
            self.tokens
        );
        let y_of = |v: f64| margin + plot_h * (1.0 - v.clamp(0.0, 1.0));
        for tick in [0.0, 0.25, 0.5, 0.75, 1.0] {
            let y = y_of(tick);
            let _ = writeln!(
                s,
                r##"<line x1="{margin}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{tick}</text>"##,
                width - margin,
                margin - 6.0,
                y + 4.0
            );
        }
        let mut line = String::new();
        for (i, row) in self.layers.iter().enumerate() {
            let x = margin + step * i as f64;
            let top = y_of(row.fit.bound_normalized);
            let colour = if row.linearized { "#e8891d" } else { "#4878a8" };
            let _ = writeln!(
                s,
                r##"<rect x="{:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="{colour}"><title>layer {}: bound/d {:.4}, cosine {:.4}</title></rect>"##,
                x + step * 0.1,
                step * 0.8,
                height - margin - top,
                row.fit.layer,
                row.fit.bound_normalized,
                row.fit.cosine
            );
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                x + step / 2.0,
                height - margin + 14.0,
                row.fit.layer
            );
            let _ = write!(line, "{:.1},{:.1} ", x + step / 2.0, y_of(row.fit.cosine));
        }
        let _ = writeln!(s, r##"<polyline points="{line}" fill="none" stroke="#333" stroke-width="1.5"/>"##);
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle">layer</text>"##,
            width / 2.0,
            height - 10.0
        );
        s.push_str("</svg>\n");
        s
    }
}
