//! What `sweep` shows: speed against quality, one curve per way of choosing what to replace, each
//! point measured on held-out text, the fastest point within the budget chosen on every curve,
//! and those points timed side by side.

use std::fmt::Write;

use serde::Serialize;

use crate::cost::Optimize;
use crate::generate::GenerationAgreement;
use crate::probe::ProbeScore;
use crate::unit::Unit;

/// One point of a curve: a set of units replaced, and what it costs and saves.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    pub units: Vec<Unit>,
    /// Against the original on the held-out sequences.
    pub heldout: ProbeScore,
    /// The KL the budget search saw on its probe sequences (budget curves only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_kl: Option<f64>,
    pub predicted_decode_speedup: f64,
    pub predicted_prefill_speedup: f64,
    /// Where the point was timed: `bench`'s measured speed-ups, in the run of each budget it was
    /// chosen at, beside the original.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub measured: Vec<Measured>,
    /// Greedy continuations against the original's, where measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<GenerationAgreement>,
}

impl Point {
    /// The predicted speed-up of what the sweep optimises.
    pub fn predicted(&self, optimize: Optimize) -> f64 {
        match optimize {
            Optimize::Decode => self.predicted_decode_speedup,
            Optimize::Prefill => self.predicted_prefill_speedup,
        }
    }
}

/// A point's speed-ups measured in the timing run of one budget, after prompts of `prompt_len`
/// tokens.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Measured {
    pub max_kl: f64,
    pub prompt_len: usize,
    pub decode_speedup: f64,
    pub prefill_speedup: f64,
    /// What the bytes read per decode step predict at that context.
    pub predicted_decode_speedup: f64,
}

impl Measured {
    fn speedup(&self, optimize: Optimize) -> f64 {
        match optimize {
            Optimize::Decode => self.decode_speedup,
            Optimize::Prefill => self.prefill_speedup,
        }
    }
}

/// The points of one way of choosing, in the order it adds units.
#[derive(Clone, Debug, Serialize)]
pub struct Curve {
    /// `budget`, `nbl`, `cosine` or `drop`.
    pub method: String,
    pub describe: String,
    pub points: Vec<Point>,
    /// For each budget, the fastest point within it (held-out KL), where one is.
    pub chosen: Vec<Option<usize>>,
    /// A curve of one kind of unit besides attention, drawn to show that kind's own frontier:
    /// its points are neither timed nor recommended.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub shown_only: bool,
}

/// Whether the curve `method` is drawn for comparison only: the budget mode among one kind of
/// unit other than attention (`budget-mlp`, `budget-layer`, `budget-run`, `budget-fold`).
pub fn shown_only(method: &str) -> bool {
    method.strip_prefix("budget-").is_some_and(|kind| kind != "attention")
}

/// How the chosen points were timed (`bench`, alternating runs).
#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    pub engine: String,
    pub prompt_len: usize,
    /// The prompt length of the second, long-context timing, where one ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub long_context: Option<usize>,
    pub new_tokens: usize,
    pub runs: usize,
}

/// The frontier of one model.
#[derive(Clone, Debug, Serialize)]
pub struct SweepReport {
    pub model: String,
    /// The budgets: the held-out KL a point must stay within to be chosen, ascending.
    pub max_kl: Vec<f64>,
    pub optimize: Optimize,
    pub original_ppl: f64,
    pub heldout_sequences: usize,
    pub heldout_tokens: usize,
    pub probe_tokens: usize,
    pub curves: Vec<Curve>,
    /// How the chosen points and the original were timed, one run per budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bench: Option<Timing>,
    pub seconds: f64,
}

/// The fastest of `points` within `max_kl` held-out KL, by the predicted saving of `optimize`.
pub fn fastest_within(points: &[Point], max_kl: f64, optimize: Optimize) -> Option<usize> {
    points
        .iter()
        .enumerate()
        .filter(|(_, p)| p.heldout.kl <= max_kl)
        .max_by(|(_, a), (_, b)| a.predicted(optimize).total_cmp(&b.predicted(optimize)))
        .map(|(i, _)| i)
}

impl SweepReport {
    /// Where `point` was timed within budget number `b`, after the main prompt length (`long`:
    /// after the long-context one).
    fn measured(&self, point: &Point, b: usize, long: bool) -> Option<Measured> {
        let timing = self.bench.as_ref()?;
        let prompt_len = if long { timing.long_context? } else { timing.prompt_len };
        point.measured.iter().find(|m| m.max_kl == self.max_kl[b] && m.prompt_len == prompt_len).copied()
    }

    /// The curve and point recommended within budget number `b`: the fastest chosen point of any
    /// curve, by its measured speed-up where it was timed, else by the predicted one.
    pub fn recommendation(&self, b: usize) -> Option<(&Curve, &Point)> {
        let speed = |p: &Point| {
            let measured = self.measured(p, b, false).map(|m| m.speedup(self.optimize));
            measured.unwrap_or(p.predicted(self.optimize))
        };
        self.curves
            .iter()
            .filter(|c| !c.shown_only)
            .filter_map(|c| c.chosen[b].map(|i| (c, &c.points[i])))
            .max_by(|(_, a), (_, b)| speed(a).total_cmp(&speed(b)))
    }

    /// The closing lines, one per budget: the fastest point within it, or that there is none.
    pub fn closing_lines(&self) -> Vec<String> {
        let what = match self.optimize {
            Optimize::Decode => "decode",
            Optimize::Prefill => "prefill",
        };
        (0..self.max_kl.len())
            .map(|b| match self.recommendation(b) {
                None => format!(
                    "no point of any curve stays within held-out KL {}: the budget is below what one unit costs",
                    self.max_kl[b]
                ),
                Some((curve, point)) => {
                    let measured = self.measured(point, b, false).map(|m| m.speedup(self.optimize));
                    let predicted = point.predicted(self.optimize);
                    let mut speed = match measured {
                        Some(m) => format!("{m:.3}x {what} measured ({predicted:.3}x predicted)"),
                        None => format!("{predicted:.3}x {what} predicted"),
                    };
                    if let Some(long) = self.measured(point, b, true) {
                        let _ = write!(
                            speed,
                            "; {:.3}x decode measured after {} prompt tokens ({:.3}x predicted)",
                            long.decode_speedup, long.prompt_len, long.predicted_decode_speedup
                        );
                    }
                    format!(
                        "fastest within held-out KL {}: {} with {} units ({}), KL {:.4}, {speed}",
                        self.max_kl[b],
                        curve.method,
                        point.units.len(),
                        units_text(&point.units),
                        point.heldout.kl
                    )
                }
            })
            .collect()
    }

    /// Every point as a Markdown table, the chosen ones marked.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Held-out: {} sequences, {} tokens; original perplexity {:.3}. `≤ B` marks each curve's fastest \
             point within held-out KL B; measured speed-ups are from one bench run per budget{}; † marks \
             the budget mode among one kind of unit alone, drawn for comparison (not timed).\n",
            self.heldout_sequences,
            self.heldout_tokens,
            self.original_ppl,
            match &self.bench {
                Some(Timing { prompt_len, long_context: Some(n), .. }) =>
                    format!(" after {prompt_len} prompt tokens, and one after {n} (`@{n}`)"),
                Some(t) => format!(" after {} prompt tokens", t.prompt_len),
                None => String::new(),
            }
        );
        let _ = writeln!(
            out,
            "| method | units | held-out KL | perplexity | top-1 | predicted decode | predicted prefill | measured decode | measured prefill | replaced |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
        // Each budget's timing, the long-context one marked with its prompt length.
        let long = self.bench.as_ref().and_then(|t| t.long_context);
        let measured = |p: &Point, f: fn(&Measured) -> f64| {
            p.measured
                .iter()
                .map(|m| match long {
                    Some(n) if m.prompt_len == n => format!("{:.3}x @{n}", f(m)),
                    _ => format!("{:.3}x", f(m)),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        for curve in &self.curves {
            for (i, p) in curve.points.iter().enumerate() {
                let within: Vec<String> = curve
                    .chosen
                    .iter()
                    .zip(&self.max_kl)
                    .filter(|(c, _)| **c == Some(i))
                    .map(|(_, b)| format!("≤ {b}"))
                    .collect();
                let mut mark = if curve.shown_only { " †".to_string() } else { String::new() };
                if !within.is_empty() {
                    let _ = write!(mark, " ({})", within.join(", "));
                }
                let _ = writeln!(
                    out,
                    "| {}{mark} | {} | {:.4} | {:.3} | {:.3} | {:.3}x | {:.3}x | {} | {} | {} |",
                    curve.method,
                    p.units.len(),
                    p.heldout.kl,
                    p.heldout.ppl,
                    p.heldout.top1,
                    p.predicted_decode_speedup,
                    p.predicted_prefill_speedup,
                    measured(p, |m| m.decode_speedup),
                    measured(p, |m| m.prefill_speedup),
                    units_text(&p.units)
                );
            }
        }
        out
    }

    /// Predicted speed-up (of what the sweep optimises) against held-out KL, one curve per method,
    /// the chosen points ringed, the budget as a vertical line.
    pub fn svg(&self) -> String {
        let (width, height, margin) = (720.0, 420.0, 56.0);
        let max_x = self
            .curves
            .iter()
            .flat_map(|c| c.points.iter().map(|p| p.heldout.kl))
            .fold(self.largest_budget() * 1.25, f64::max)
            .min(self.largest_budget() * 4.0);
        let max_y = self
            .curves
            .iter()
            .flat_map(|c| {
                c.points.iter().filter(|p| p.heldout.kl <= max_x).map(|p| p.predicted(self.optimize))
            })
            .fold(1.05, f64::max);
        let plot_w = width - 2.0 * margin;
        let plot_h = height - 2.0 * margin;
        let x_of = |v: f64| margin + plot_w * (v / max_x).clamp(0.0, 1.0);
        let y_of = |v: f64| margin + plot_h * (1.0 - ((v - 1.0) / (max_y - 1.0)).clamp(0.0, 1.0));
        let mut s = String::new();
        let _ = writeln!(
            s,
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"##
        );
        let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="white"/>"##);
        let what = match self.optimize {
            Optimize::Decode => "decode (bytes per step)",
            Optimize::Prefill => "prefill (multiply-adds)",
        };
        let _ = writeln!(
            s,
            r##"<text x="{margin}" y="22" font-size="13">Predicted {what} speed-up against held-out KL; ringed: fastest within each budget (dashed)</text>"##
        );
        for i in 0..=4 {
            let (vx, vy) = (max_x * i as f64 / 4.0, 1.0 + (max_y - 1.0) * i as f64 / 4.0);
            let (x, y) = (x_of(vx), y_of(vy));
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" x2="{x:.1}" y1="{margin}" y2="{:.1}" stroke="#eee"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{vx:.2}</text>"##,
                height - margin,
                height - margin + 14.0
            );
            let _ = writeln!(
                s,
                r##"<line x1="{margin}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{vy:.3}x</text>"##,
                width - margin,
                margin - 6.0,
                y + 4.0
            );
        }
        for &budget in &self.max_kl {
            let x = x_of(budget);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" x2="{x:.1}" y1="{margin}" y2="{:.1}" stroke="#c33" stroke-dasharray="4 3"/>"##,
                height - margin
            );
        }
        const COLOURS: [&str; 10] = [
            "#e8891d", "#4878a8", "#59a14f", "#b07aa1", "#9c755f", "#e15759", "#76b7b2", "#edc948",
            "#ff9da7", "#bab0ac",
        ];
        for (c, curve) in self.curves.iter().enumerate() {
            let colour = COLOURS[c % COLOURS.len()];
            let mut line = format!("{:.1},{:.1} ", x_of(0.0), y_of(1.0));
            for p in curve.points.iter().filter(|p| p.heldout.kl <= max_x) {
                let _ = write!(line, "{:.1},{:.1} ", x_of(p.heldout.kl), y_of(p.predicted(self.optimize)));
            }
            // One kind alone, for comparison: a thin dashed line.
            let style = if curve.shown_only {
                r#"stroke-width="1" stroke-dasharray="5 3""#
            } else {
                r#"stroke-width="1.8""#
            };
            let _ = writeln!(s, r##"<polyline points="{line}" fill="none" stroke="{colour}" {style}/>"##);
            for (i, p) in curve.points.iter().enumerate().filter(|(_, p)| p.heldout.kl <= max_x) {
                let (x, y) = (x_of(p.heldout.kl), y_of(p.predicted(self.optimize)));
                let chosen = curve.chosen.contains(&Some(i));
                let r = if chosen { 6.0 } else { 2.5 };
                let fill = if chosen { "none" } else { colour };
                let _ = writeln!(
                    s,
                    r##"<circle cx="{x:.1}" cy="{y:.1}" r="{r}" fill="{fill}" stroke="{colour}" stroke-width="1.5"><title>{}: {} units, KL {:.4}, {:.3}x</title></circle>"##,
                    curve.method,
                    p.units.len(),
                    p.heldout.kl,
                    p.predicted(self.optimize)
                );
            }
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" fill="{colour}">{}</text>"##,
                margin + 10.0,
                margin + 16.0 + 15.0 * c as f64,
                curve.describe
            );
        }
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">held-out KL(original ‖ rewrite)</text>"##,
            width / 2.0,
            height - 12.0
        );
        s.push_str("</svg>\n");
        s
    }
}

impl SweepReport {
    fn largest_budget(&self) -> f64 {
        self.max_kl.iter().copied().fold(0.0, f64::max)
    }
}

/// `attention 3, mlp 12, run 4-6`.
pub fn units_text(units: &[Unit]) -> String {
    units.iter().map(Unit::to_string).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(units: usize, kl: f64, speedup: f64) -> Point {
        Point {
            units: (0..units).map(Unit::attention).collect(),
            heldout: ProbeScore { kl, top1: 1.0, ppl: 10.0 },
            probe_kl: None,
            predicted_decode_speedup: speedup,
            predicted_prefill_speedup: speedup,
            measured: Vec::new(),
            generation: None,
        }
    }

    #[test]
    fn the_fastest_point_within_the_budget_is_chosen_and_recommended() {
        let points = vec![point(1, 0.05, 1.02), point(2, 0.12, 1.05), point(3, 0.4, 1.2)];
        assert_eq!(fastest_within(&points, 0.2, Optimize::Decode), Some(1));
        assert_eq!(fastest_within(&points, 0.01, Optimize::Decode), None);
        let mut other = vec![point(1, 0.1, 1.08)];
        // Timed after 512 and after 4096 prompt tokens: the first is what recommends it.
        let timed = |prompt_len, speedup, predicted| Measured {
            max_kl: 0.2,
            prompt_len,
            decode_speedup: speedup,
            prefill_speedup: 1.0,
            predicted_decode_speedup: predicted,
        };
        other[0].measured = vec![timed(512, 1.04, 1.08), timed(4096, 1.3, 1.25)];
        let curve = |method: &str, points: Vec<Point>| Curve {
            method: method.into(),
            describe: method.into(),
            chosen: [0.01, 0.2].iter().map(|&b| fastest_within(&points, b, Optimize::Decode)).collect(),
            points,
            shown_only: shown_only(method),
        };
        let mut report = SweepReport {
            model: "m.onnx".into(),
            max_kl: vec![0.01, 0.2],
            optimize: Optimize::Decode,
            original_ppl: 10.0,
            heldout_sequences: 4,
            heldout_tokens: 2048,
            probe_tokens: 1024,
            // A faster point of one kind alone is drawn, not recommended.
            curves: vec![
                curve("nbl", points),
                curve("budget", other),
                curve("budget-mlp", vec![point(1, 0.1, 1.3)]),
            ],
            bench: Some(Timing {
                engine: "cpu".into(),
                prompt_len: 512,
                long_context: Some(4096),
                new_tokens: 128,
                runs: 1,
            }),
            seconds: 1.0,
        };
        let lines = report.closing_lines();
        assert!(lines[0].starts_with("no point of any curve stays within held-out KL 0.01"), "{lines:?}");
        let line = &lines[1];
        // nbl's fastest point within the budget (1.05x predicted) beats the budget curve's one,
        // measured at 1.04x after the main prompt length; its long-context 1.3x does not count.
        assert!(line.starts_with("fastest within held-out KL 0.2: nbl with 2 units"), "{line}");
        let budget_curve = &report.curves[1];
        assert_eq!(report.measured(&budget_curve.points[0], 1, false).unwrap().decode_speedup, 1.04);
        assert!(
            report.table().contains(
                "| budget (≤ 0.2) | 1 | 0.1000 | 10.000 | 1.000 | 1.080x | 1.080x | 1.040x, 1.300x @4096 |"
            ),
            "{}",
            report.table()
        );
        assert!(report.table().contains("| nbl (≤ 0.2) | 2 | 0.1200 |"), "{}", report.table());
        assert!(report.table().contains("| budget-mlp † (≤ 0.2) | 1 |"), "{}", report.table());
        assert!(shown_only("budget-fold") && !shown_only("budget-attention") && !shown_only("budget"));
        assert!(report.svg().contains("<circle"));
        report.curves[0].points.clear();
        report.curves[0].chosen = vec![None, None];
        let line = &report.closing_lines()[1];
        assert!(
            line.ends_with(
                "budget with 1 units (attention 0), KL 0.1000, 1.040x decode measured (1.080x predicted); \
                 1.300x decode measured after 4096 prompt tokens (1.250x predicted)"
            ),
            "{line}"
        );
    }
}
