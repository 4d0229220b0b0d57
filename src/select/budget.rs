//! Choosing units within a quality budget (`rewrite --max-kl B`, `--max-ppl-increase P`), or the
//! least harmful way to a predicted speed-up (`--target-speedup S`): measured by running the model
//! rather than ranked by a statistic.
//!
//! The harm of a set of units is what the caller measures on the probe sequences: the mean
//! `KL(original ‖ model with them replaced)`, or the relative increase of the perplexity.
//!
//! 1. Every candidate is scored alone. A candidate over the budget alone is out.
//! 2. The rest are ranked once by saving per unit of harm.
//! 3. Each step re-measures only the front of that ranking (`front` candidates that do not
//!    overlap the units chosen so far) together with the chosen units, and takes the one that
//!    adds the most saving per harm it adds. A candidate that would take the set over the budget
//!    is dropped, and the next ones in the ranking move up: a large unit never overshoots while
//!    smaller ones still fit. A candidate that alone costs more than the budget has left is not
//!    measured (harms add up, roughly). It stops when no candidate is left, once the set saves what
//!    a target speed-up needs, or when `2 · front` candidates in a row overshoot (the budget is
//!    full: what is left of it is less than the next candidates cost together with the rest).
//!
//! Cost: `c` single scorings, then at most `front` per step plus one per dropped candidate.
//! Greedy by saving per harm alone jumps to the largest unit that fits, skipping every point in
//! between; the budget is what keeps it honest.

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use serde::Serialize;

use crate::unit::Unit;

/// A unit that may be replaced, with what replacing it alone saves (bytes or multiply-adds, as
/// the caller optimises).
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    pub unit: Unit,
    pub saving: f64,
}

/// A candidate's score alone.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Alone {
    pub unit: Unit,
    pub harm: f64,
    pub saving: f64,
}

/// One step: the unit added, the harm of the set with it, the saving so far, and the sets measured.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct BudgetStep {
    pub unit: Unit,
    pub harm: f64,
    pub saving: f64,
    pub measured: usize,
}

/// What the search aims for: the most saving within `max_harm`, or, with a `target`, the least
/// harm that saves it.
#[derive(Clone, Copy, Debug)]
pub struct Goal {
    /// What the harm is, for messages: `KL`, `perplexity increase`.
    pub measure: &'static str,
    pub max_harm: f64,
    pub target: Option<Target>,
}

/// A predicted speed-up to reach, over what the original spends.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Target {
    pub speedup: f64,
    pub spent: f64,
}

impl Target {
    /// The saving the speed-up needs: `spent · (1 − 1/S)`.
    fn saving(&self) -> f64 {
        self.spent * (1.0 - 1.0 / self.speedup)
    }

    fn speedup_of(&self, saving: f64) -> f64 {
        self.spent / (self.spent - saving).max(f64::MIN_POSITIVE)
    }
}

/// The choice: every candidate alone, each step, and what the search cost.
#[derive(Clone, Debug, Serialize)]
pub struct BudgetChoice {
    pub max_harm: f64,
    pub alone: Vec<Alone>,
    pub steps: Vec<BudgetStep>,
    /// Forward passes over the probe sequences, the original's included.
    pub passes: usize,
    pub probe_tokens: usize,
    /// Wall time of both stages, the scoring alone included (as in `passes`).
    pub seconds: f64,
}

impl BudgetChoice {
    pub fn units(&self) -> Vec<Unit> {
        self.steps.iter().map(|s| s.unit).collect()
    }

    /// The harm of the chosen set (0 without any).
    pub fn harm(&self) -> f64 {
        self.steps.last().map_or(0.0, |s| s.harm)
    }
}

/// What the search could not reach, and the best point it found.
#[derive(Debug)]
pub enum Unreachable {
    /// No candidate stays within the budget alone: the one closest to it, and its harm.
    Budget { measure: &'static str, max_harm: f64, best: Unit, harm: f64 },
    /// Every candidate the budget allows, taken, still saves less than the target needs.
    Target { measure: &'static str, speedup: f64, reached: f64, harm: f64 },
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unreachable::Budget { measure, max_harm, best, harm } => write!(
                f,
                "no unit stays within {measure} {max_harm}: the cheapest point found is {best} alone, at {measure} {harm:.5}"
            ),
            Unreachable::Target { measure, speedup, reached, harm } => write!(
                f,
                "no choice reaches a predicted speed-up of {speedup}: the fastest point found is {reached:.3}x, at \
                 {measure} {harm:.5}"
            ),
        }
    }
}

impl std::error::Error for Unreachable {}

/// Candidates re-measured per step.
pub const FRONT: usize = 4;

/// Harm differences below this count as this (a unit that costs nothing is not infinitely good:
/// among free ones, the largest saving goes first).
const HARM_FLOOR: f64 = 1e-6;

/// Every candidate scored alone: the search's first stage and its dearest, which serves every
/// budget and every subset of the candidates.
#[derive(Clone, Debug)]
pub struct Scored {
    pub alone: Vec<Alone>,
    pub seconds: f64,
}

impl Scored {
    /// The candidates `keep` keeps, with their scores.
    pub fn only(&self, keep: impl Fn(&Unit) -> bool) -> Scored {
        Scored {
            alone: self.alone.iter().copied().filter(|a| keep(&a.unit)).collect(),
            seconds: self.seconds,
        }
    }
}

/// Scores every candidate alone; `score` measures the harm of a set of units.
pub fn score_alone(
    candidates: &[Candidate],
    mut score: impl FnMut(&[Unit]) -> Result<f64>,
) -> Result<Scored> {
    ensure!(!candidates.is_empty(), "no candidate units to choose from");
    let started = Instant::now();
    let progress = crate::progress::bar(
        candidates.len() as u64,
        "measuring {bar:40} {pos}/{len} units alone  ETA {eta}",
        "units",
    );
    let mut alone = Vec::with_capacity(candidates.len());
    // In a log, where the bar is not drawn, a line at every tenth of the candidates.
    let every = if progress.is_hidden() { candidates.len().div_ceil(10) } else { usize::MAX };
    for (i, c) in candidates.iter().enumerate() {
        crate::atomic::check_interrupt()?;
        let harm = score(&[c.unit]).with_context(|| format!("scoring {}", c.unit))?;
        progress.inc(1);
        alone.push(Alone { unit: c.unit, harm, saving: c.saving });
        if (i + 1) % every == 0 {
            eprintln!(
                "budget: {} of {} units scored alone ({:.0} s)",
                i + 1,
                candidates.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    progress.finish_and_clear();
    Ok(Scored { alone, seconds: started.elapsed().as_secs_f64() })
}

/// Chooses units from `candidates` as above; `score` measures the harm of a set of units.
pub fn choose_within(
    candidates: &[Candidate],
    goal: Goal,
    front: usize,
    probe_tokens: usize,
    mut score: impl FnMut(&[Unit]) -> Result<f64>,
) -> Result<BudgetChoice> {
    let scored = score_alone(candidates, &mut score)?;
    choose_from(&scored, goal, front, probe_tokens, score)
}

/// The second stage: from candidates scored alone, the greedy choice within `goal`.
pub fn choose_from(
    scored: &Scored,
    goal: Goal,
    front: usize,
    probe_tokens: usize,
    mut score: impl FnMut(&[Unit]) -> Result<f64>,
) -> Result<BudgetChoice> {
    let max_harm = goal.max_harm;
    ensure!(max_harm > 0.0 && !max_harm.is_nan(), "a budget must be a positive number, not {max_harm}");
    ensure!(!scored.alone.is_empty(), "no candidate units to choose from");
    let started = Instant::now();
    let alone = scored.alone.clone();
    let mut passes = 1 + alone.len();
    let within: Vec<&Alone> = alone.iter().filter(|a| a.harm <= max_harm).collect();
    if within.is_empty() {
        let best = alone.iter().min_by(|a, b| a.harm.total_cmp(&b.harm)).expect("candidates are not empty");
        let measure = goal.measure;
        return Err(Unreachable::Budget { measure, max_harm, best: best.unit, harm: best.harm }.into());
    }
    let mut ranked: Vec<Alone> = within.into_iter().copied().filter(|a| a.saving > 0.0).collect();
    let efficiency = |a: &Alone| a.saving / a.harm.max(HARM_FLOOR);
    ranked.sort_by(|a, b| efficiency(b).total_cmp(&efficiency(a)));

    let enough = goal.target.map(|t| t.saving());
    let mut chosen: Vec<Unit> = Vec::new();
    let mut steps: Vec<BudgetStep> = Vec::new();
    let (mut harm_now, mut saving_now) = (0.0, 0.0);
    let mut overshoots = 0;
    loop {
        // Harms add up, roughly: a candidate that alone costs more than the budget has left is not
        // measured.
        let left = max_harm - harm_now;
        ranked.retain(|a| !chosen.iter().any(|u| u.overlaps(&a.unit)) && a.harm <= left);
        if ranked.is_empty() || enough.is_some_and(|e| saving_now >= e) || overshoots >= 2 * front.max(1) {
            break;
        }
        let mut best: Option<(usize, f64, f64)> = None;
        let mut over = Vec::new();
        let mut measured = 0;
        for (i, a) in ranked.iter().enumerate().take(front.max(1)) {
            crate::atomic::check_interrupt()?;
            chosen.push(a.unit);
            let harm = score(&chosen).with_context(|| format!("scoring {}", a.unit))?;
            chosen.pop();
            passes += 1;
            measured += 1;
            if harm > max_harm {
                over.push(i);
                overshoots += 1;
                continue;
            }
            overshoots = 0;
            let gain = a.saving / (harm - harm_now).max(HARM_FLOOR);
            if best.is_none_or(|(_, _, g)| gain > g) {
                best = Some((i, harm, gain));
            }
        }
        if let Some((i, harm, _)) = best {
            let unit = ranked[i].unit;
            saving_now += ranked[i].saving;
            harm_now = harm;
            eprintln!("budget: {unit} added, probe harm {harm:.5} ({measured} sets measured)");
            chosen.push(unit);
            steps.push(BudgetStep { unit, harm, saving: saving_now, measured });
        }
        // Over the budget with the units chosen so far: it stays over with more of them.
        for &i in over.iter().rev() {
            ranked.remove(i);
        }
    }
    if let Some(target) = goal.target
        && saving_now < target.saving()
    {
        let reached = target.speedup_of(saving_now);
        let measure = goal.measure;
        return Err(Unreachable::Target { measure, speedup: target.speedup, reached, harm: harm_now }.into());
    }
    Ok(BudgetChoice {
        max_harm,
        alone,
        steps,
        passes,
        probe_tokens,
        seconds: scored.seconds + started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// KL adds up over units, but for two that interact.
    fn additive(harm: &[(Unit, f64)]) -> impl FnMut(&[Unit]) -> Result<f64> + '_ {
        move |set: &[Unit]| {
            let mut kl: f64 = set.iter().map(|u| harm.iter().find(|(h, _)| h == u).unwrap().1).sum();
            if set.contains(&Unit::attention(0)) && set.contains(&Unit::mlp(2)) {
                kl += 1.0;
            }
            Ok(kl)
        }
    }

    #[test]
    fn a_large_unit_does_not_overshoot_while_smaller_ones_fit() {
        let harm = [
            (Unit::attention(0), 0.02),
            (Unit::attention(1), 0.05),
            (Unit::mlp(2), 0.03),
            (Unit::run(1, 3), 0.25),
            (Unit::layer(3), 0.5),
        ];
        let savings = [1.0, 1.0, 3.0, 20.0, 8.0];
        let candidates: Vec<Candidate> =
            harm.iter().zip(savings).map(|(&(unit, _), saving)| Candidate { unit, saving }).collect();
        let choice = choose_within(&candidates, within(0.1), FRONT, 10, additive(&harm)).unwrap();
        // The run (20 per 0.25 KL = 80) ranks first but is over the budget with anything; layer 3
        // is over alone. Then mlp 2 (100 per KL), attention 1 (20) since attention 0 with mlp 2 costs 1.0.
        assert_eq!(choice.units(), [Unit::mlp(2), Unit::attention(1)]);
        assert!((choice.harm() - 0.08).abs() < 1e-12);
        assert_eq!(choice.steps[1].saving, 4.0);
        assert!(choice.steps.iter().all(|s| s.harm <= 0.1));
        assert_eq!(choice.alone.len(), 5);
    }

    #[test]
    fn units_over_the_budget_alone_make_it_unreachable() {
        let harm = [(Unit::attention(0), 0.4), (Unit::mlp(1), 0.3)];
        let candidates: Vec<Candidate> =
            harm.iter().map(|&(unit, _)| Candidate { unit, saving: 1.0 }).collect();
        let e = choose_within(&candidates, within(0.1), FRONT, 10, additive(&harm)).unwrap_err();
        let Some(Unreachable::Budget { best, harm, .. }) = e.downcast_ref::<Unreachable>() else {
            panic!("{e}")
        };
        assert_eq!((*best, *harm), (Unit::mlp(1), 0.3));
        assert!(e.to_string().contains("mlp 1 alone, at KL 0.30000"), "{e}");
    }

    #[test]
    fn overlapping_units_are_never_both_taken() {
        let harm = [(Unit::attention(1), 0.01), (Unit::layer(1), 0.02), (Unit::mlp(1), 0.01)];
        let candidates: Vec<Candidate> =
            harm.iter().map(|&(unit, _)| Candidate { unit, saving: 1.0 + unit.kind as u8 as f64 }).collect();
        let choice = choose_within(&candidates, within(1.0), FRONT, 10, additive(&harm)).unwrap();
        let units = choice.units();
        for (i, a) in units.iter().enumerate() {
            assert!(units[i + 1..].iter().all(|b| !a.overlaps(b)), "{units:?}");
        }
    }

    fn within(max_harm: f64) -> Goal {
        Goal { measure: "KL", max_harm, target: None }
    }

    /// With a target speed-up and no budget, the search stops as soon as the set saves enough,
    /// and says how far it got where it cannot.
    #[test]
    fn a_target_speedup_stops_at_the_least_harm_that_reaches_it() {
        let harm = [(Unit::attention(0), 0.02), (Unit::attention(1), 0.05), (Unit::mlp(2), 0.03)];
        let candidates: Vec<Candidate> =
            harm.iter().map(|&(unit, _)| Candidate { unit, saving: 10.0 }).collect();
        // 100 spent: 1.25x needs a saving of 20, two units.
        let goal = Goal {
            measure: "KL",
            max_harm: f64::INFINITY,
            target: Some(Target { speedup: 1.25, spent: 100.0 }),
        };
        let choice = choose_within(&candidates, goal, FRONT, 10, additive(&harm)).unwrap();
        assert_eq!(choice.units(), [Unit::attention(0), Unit::attention(1)], "the least harmful two apart");
        let goal = Goal {
            measure: "KL",
            max_harm: f64::INFINITY,
            target: Some(Target { speedup: 2.0, spent: 100.0 }),
        };
        let e = choose_within(&candidates, goal, FRONT, 10, additive(&harm)).unwrap_err();
        let Some(Unreachable::Target { reached, .. }) = e.downcast_ref::<Unreachable>() else {
            panic!("{e}")
        };
        assert!((reached - 100.0 / 70.0).abs() < 1e-12, "all three save 30: {reached}");
    }

    #[test]
    fn a_budget_must_be_positive() {
        let candidates = [Candidate { unit: Unit::attention(0), saving: 1.0 }];
        for bad in [0.0, -0.1, f64::NAN] {
            assert!(choose_within(&candidates, within(bad), FRONT, 1, |_| Ok(0.0)).is_err());
        }
    }
}
