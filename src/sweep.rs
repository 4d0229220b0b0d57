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
    /// Where the point was timed: `bench`'s measured speed-ups, in the same run as the original.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured_decode_speedup: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured_prefill_speedup: Option<f64>,
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

/// The points of one way of choosing, in the order it adds units.
#[derive(Clone, Debug, Serialize)]
pub struct Curve {
    /// `budget`, `nbl`, `cosine` or `drop`.
    pub method: String,
    pub describe: String,
    pub points: Vec<Point>,
    /// The fastest point within the budget (held-out KL), where one is.
    pub chosen: Option<usize>,
}

impl Curve {
    pub fn chosen_point(&self) -> Option<&Point> {
        self.chosen.map(|i| &self.points[i])
    }
}

/// How the chosen points were timed (`bench`, alternating runs).
#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    pub engine: String,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub runs: usize,
}

/// The frontier of one model.
#[derive(Clone, Debug, Serialize)]
pub struct SweepReport {
    pub model: String,
    /// The held-out KL a point must stay within to be chosen.
    pub max_kl: f64,
    pub optimize: Optimize,
    pub original_ppl: f64,
    pub heldout_sequences: usize,
    pub heldout_tokens: usize,
    pub probe_tokens: usize,
    pub curves: Vec<Curve>,
    /// How the chosen points and the original were timed, in one run.
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
    /// The curve and point recommended: the fastest chosen point of any curve, by its measured
    /// speed-up where it was timed, else by the predicted one.
    pub fn recommendation(&self) -> Option<(&Curve, &Point)> {
        let speed = |p: &Point| match self.optimize {
            Optimize::Decode => p.measured_decode_speedup.unwrap_or(p.predicted_decode_speedup),
            Optimize::Prefill => p.measured_prefill_speedup.unwrap_or(p.predicted_prefill_speedup),
        };
        self.curves
            .iter()
            .filter_map(|c| c.chosen_point().map(|p| (c, p)))
            .max_by(|(_, a), (_, b)| speed(a).total_cmp(&speed(b)))
    }

    /// The closing line: the fastest point within the budget, or that there is none.
    pub fn closing_line(&self) -> String {
        let what = match self.optimize {
            Optimize::Decode => "decode",
            Optimize::Prefill => "prefill",
        };
        match self.recommendation() {
            None => format!(
                "no point of any curve stays within held-out KL {}: the budget is below what one unit costs",
                self.max_kl
            ),
            Some((curve, point)) => {
                let measured = match self.optimize {
                    Optimize::Decode => point.measured_decode_speedup,
                    Optimize::Prefill => point.measured_prefill_speedup,
                };
                let speed = match measured {
                    Some(m) => {
                        format!("{m:.3}x {what} measured ({:.3}x predicted)", point.predicted(self.optimize))
                    }
                    None => format!("{:.3}x {what} predicted", point.predicted(self.optimize)),
                };
                format!(
                    "fastest within held-out KL {}: {} with {} units ({}), KL {:.4}, {speed}",
                    self.max_kl,
                    curve.method,
                    point.units.len(),
                    units_text(&point.units),
                    point.heldout.kl
                )
            }
        }
    }

    /// Every point as a Markdown table, the chosen ones marked.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Held-out: {} sequences, {} tokens; original perplexity {:.3}. Budget: held-out KL ≤ {}; `*` marks \
             each curve's fastest point within it.\n",
            self.heldout_sequences, self.heldout_tokens, self.original_ppl, self.max_kl
        );
        let _ = writeln!(
            out,
            "| method | units | held-out KL | perplexity | top-1 | predicted decode | predicted prefill | measured decode | measured prefill | replaced |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
        let measured = |v: Option<f64>| v.map_or("".to_string(), |v| format!("{v:.3}x"));
        for curve in &self.curves {
            for (i, p) in curve.points.iter().enumerate() {
                let mark = if curve.chosen == Some(i) { " *" } else { "" };
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
                    measured(p.measured_decode_speedup),
                    measured(p.measured_prefill_speedup),
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
            .fold(self.max_kl * 1.25, f64::max)
            .min(self.max_kl * 4.0);
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
            r##"<text x="{margin}" y="22" font-size="13">Predicted {what} speed-up against held-out KL; ringed: fastest within KL {}</text>"##,
            self.max_kl
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
        let budget_x = x_of(self.max_kl);
        let _ = writeln!(
            s,
            r##"<line x1="{budget_x:.1}" x2="{budget_x:.1}" y1="{margin}" y2="{:.1}" stroke="#c33" stroke-dasharray="4 3"/>"##,
            height - margin
        );
        const COLOURS: [&str; 6] = ["#e8891d", "#4878a8", "#59a14f", "#b07aa1", "#9c755f", "#e15759"];
        for (c, curve) in self.curves.iter().enumerate() {
            let colour = COLOURS[c % COLOURS.len()];
            let mut line = format!("{:.1},{:.1} ", x_of(0.0), y_of(1.0));
            for p in curve.points.iter().filter(|p| p.heldout.kl <= max_x) {
                let _ = write!(line, "{:.1},{:.1} ", x_of(p.heldout.kl), y_of(p.predicted(self.optimize)));
            }
            let _ = writeln!(
                s,
                r##"<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="1.8"/>"##
            );
            for (i, p) in curve.points.iter().enumerate().filter(|(_, p)| p.heldout.kl <= max_x) {
                let (x, y) = (x_of(p.heldout.kl), y_of(p.predicted(self.optimize)));
                let r = if curve.chosen == Some(i) { 6.0 } else { 2.5 };
                let fill = if curve.chosen == Some(i) { "none" } else { colour };
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
            measured_decode_speedup: None,
            measured_prefill_speedup: None,
            generation: None,
        }
    }

    #[test]
    fn the_fastest_point_within_the_budget_is_chosen_and_recommended() {
        let points = vec![point(1, 0.05, 1.02), point(2, 0.12, 1.05), point(3, 0.4, 1.2)];
        assert_eq!(fastest_within(&points, 0.2, Optimize::Decode), Some(1));
        assert_eq!(fastest_within(&points, 0.01, Optimize::Decode), None);
        let other = vec![point(1, 0.1, 1.08)];
        let curve = |method: &str, points: Vec<Point>| Curve {
            method: method.into(),
            describe: method.into(),
            chosen: fastest_within(&points, 0.2, Optimize::Decode),
            points,
        };
        let report = SweepReport {
            model: "m.onnx".into(),
            max_kl: 0.2,
            optimize: Optimize::Decode,
            original_ppl: 10.0,
            heldout_sequences: 4,
            heldout_tokens: 2048,
            probe_tokens: 1024,
            curves: vec![curve("nbl", points), curve("budget", other)],
            bench: None,
            seconds: 1.0,
        };
        let line = report.closing_line();
        // The budget curve's one point (1.08x) beats the fastest of nbl's within the budget (1.05x).
        assert!(
            line.starts_with("fastest within held-out KL 0.2: budget with 1 units (attention 0)"),
            "{line}"
        );
        assert!(report.table().contains("| nbl * | 2 | 0.1200 |"), "{}", report.table());
        assert!(report.svg().contains("<circle"));
    }
}
