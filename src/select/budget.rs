//! Choosing units within a quality budget (`rewrite --max-kl B`): as much predicted saving as the
//! budget allows, measured by running the model rather than ranked by a statistic.
//!
//! 1. Every candidate is scored alone: the mean `KL(original ‖ model with it replaced)` on the
//!    probe sequences. A candidate over the budget alone is out.
//! 2. The rest are ranked once by saving per unit of KL.
//! 3. Each step re-measures only the front of that ranking (`front` candidates that do not
//!    overlap the units chosen so far) together with the chosen units, and takes the one that
//!    adds the most saving per KL it adds. A candidate that would take the set over the budget is
//!    dropped, and the next ones in the ranking move up: a large unit never overshoots while
//!    smaller ones still fit. It stops when no candidate is left.
//!
//! Cost: `c` single scorings, then at most `front` per step plus one per dropped candidate.
//! Greedy by saving per KL alone jumps to the largest unit that fits, skipping every point in
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
    pub kl: f64,
    pub saving: f64,
}

/// One step: the unit added, the KL of the set with it, the saving so far, and the sets measured.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct BudgetStep {
    pub unit: Unit,
    pub kl: f64,
    pub saving: f64,
    pub measured: usize,
}

/// The choice within a budget: every candidate alone, each step, and what the search cost.
#[derive(Clone, Debug, Serialize)]
pub struct BudgetChoice {
    pub max_kl: f64,
    pub alone: Vec<Alone>,
    pub steps: Vec<BudgetStep>,
    /// Forward passes over the probe sequences, the original's included.
    pub passes: usize,
    pub probe_tokens: usize,
    pub seconds: f64,
}

impl BudgetChoice {
    pub fn units(&self) -> Vec<Unit> {
        self.steps.iter().map(|s| s.unit).collect()
    }

    /// The probe KL of the chosen set (0 without any).
    pub fn kl(&self) -> f64 {
        self.steps.last().map_or(0.0, |s| s.kl)
    }
}

/// No candidate stays within the budget alone.
#[derive(Debug)]
pub struct Unreachable {
    pub max_kl: f64,
    /// The candidate closest to it, and its KL.
    pub best: Unit,
    pub kl: f64,
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no unit stays within KL {}: the cheapest point found is {} alone, at probe KL {:.5}",
            self.max_kl, self.best, self.kl
        )
    }
}

impl std::error::Error for Unreachable {}

/// Candidates re-measured per step.
pub const FRONT: usize = 4;

/// KL differences below this count as this (a unit that costs nothing is not infinitely good:
/// among free ones, the largest saving goes first).
const KL_FLOOR: f64 = 1e-6;

/// Chooses units from `candidates` as above; `score` measures a set of units.
pub fn choose_within(
    candidates: &[Candidate],
    max_kl: f64,
    front: usize,
    probe_tokens: usize,
    mut score: impl FnMut(&[Unit]) -> Result<f64>,
) -> Result<BudgetChoice> {
    ensure!(max_kl.is_finite() && max_kl > 0.0, "a KL budget must be a positive number, not {max_kl}");
    ensure!(!candidates.is_empty(), "no candidate units to choose from");
    let started = Instant::now();
    let progress = crate::progress::bar(
        candidates.len() as u64,
        "measuring {bar:40} {pos}/{len} units alone  ETA {eta}",
        "units",
    );
    let mut passes = 1;
    let mut alone = Vec::with_capacity(candidates.len());
    for c in candidates {
        crate::atomic::check_interrupt()?;
        let kl = score(&[c.unit]).with_context(|| format!("scoring {}", c.unit))?;
        passes += 1;
        progress.inc(1);
        alone.push(Alone { unit: c.unit, kl, saving: c.saving });
    }
    progress.finish_and_clear();
    let within: Vec<&Alone> = alone.iter().filter(|a| a.kl <= max_kl).collect();
    if within.is_empty() {
        let best = alone.iter().min_by(|a, b| a.kl.total_cmp(&b.kl)).expect("candidates are not empty");
        return Err(Unreachable { max_kl, best: best.unit, kl: best.kl }.into());
    }
    let mut ranked: Vec<Alone> = within.into_iter().copied().filter(|a| a.saving > 0.0).collect();
    ranked.sort_by(|a, b| (b.saving / a.kl.max(KL_FLOOR)).total_cmp(&(a.saving / b.kl.max(KL_FLOOR))));

    let mut chosen: Vec<Unit> = Vec::new();
    let mut steps: Vec<BudgetStep> = Vec::new();
    let (mut kl_now, mut saving_now) = (0.0, 0.0);
    loop {
        ranked.retain(|a| !chosen.iter().any(|u| u.overlaps(&a.unit)));
        if ranked.is_empty() {
            break;
        }
        let mut best: Option<(usize, f64, f64)> = None;
        let mut over = Vec::new();
        let mut measured = 0;
        for (i, a) in ranked.iter().enumerate().take(front.max(1)) {
            crate::atomic::check_interrupt()?;
            chosen.push(a.unit);
            let kl = score(&chosen).with_context(|| format!("scoring {}", a.unit))?;
            chosen.pop();
            passes += 1;
            measured += 1;
            if kl > max_kl {
                over.push(i);
                continue;
            }
            let gain = a.saving / (kl - kl_now).max(KL_FLOOR);
            if best.is_none_or(|(_, _, g)| gain > g) {
                best = Some((i, kl, gain));
            }
        }
        if let Some((i, kl, _)) = best {
            let unit = ranked[i].unit;
            saving_now += ranked[i].saving;
            kl_now = kl;
            eprintln!("budget: {unit} added, probe KL {kl:.5} ({measured} sets measured)");
            chosen.push(unit);
            steps.push(BudgetStep { unit, kl, saving: saving_now, measured });
        }
        // Over the budget with the units chosen so far: it stays over with more of them.
        for &i in over.iter().rev() {
            ranked.remove(i);
        }
    }
    Ok(BudgetChoice { max_kl, alone, steps, passes, probe_tokens, seconds: started.elapsed().as_secs_f64() })
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
        let choice = choose_within(&candidates, 0.1, FRONT, 10, additive(&harm)).unwrap();
        // The run (20 per 0.25 KL = 80) ranks first but is over the budget with anything; layer 3
        // is over alone. Then mlp 2 (100 per KL), attention 1 (20) since attention 0 with mlp 2 costs 1.0.
        assert_eq!(choice.units(), [Unit::mlp(2), Unit::attention(1)]);
        assert!((choice.kl() - 0.08).abs() < 1e-12);
        assert_eq!(choice.steps[1].saving, 4.0);
        assert!(choice.steps.iter().all(|s| s.kl <= 0.1));
        assert_eq!(choice.alone.len(), 5);
    }

    #[test]
    fn units_over_the_budget_alone_make_it_unreachable() {
        let harm = [(Unit::attention(0), 0.4), (Unit::mlp(1), 0.3)];
        let candidates: Vec<Candidate> =
            harm.iter().map(|&(unit, _)| Candidate { unit, saving: 1.0 }).collect();
        let e = choose_within(&candidates, 0.1, FRONT, 10, additive(&harm)).unwrap_err();
        let unreachable = e.downcast_ref::<Unreachable>().expect("an Unreachable error");
        assert_eq!((unreachable.best, unreachable.kl), (Unit::mlp(1), 0.3));
        assert!(e.to_string().contains("mlp 1 alone, at probe KL 0.30000"), "{e}");
    }

    #[test]
    fn overlapping_units_are_never_both_taken() {
        let harm = [(Unit::attention(1), 0.01), (Unit::layer(1), 0.02), (Unit::mlp(1), 0.01)];
        let candidates: Vec<Candidate> =
            harm.iter().map(|&(unit, _)| Candidate { unit, saving: 1.0 + unit.kind as u8 as f64 }).collect();
        let choice = choose_within(&candidates, 1.0, FRONT, 10, additive(&harm)).unwrap();
        let units = choice.units();
        for (i, a) in units.iter().enumerate() {
            assert!(units[i + 1..].iter().all(|b| !a.overlaps(b)), "{units:?}");
        }
    }

    #[test]
    fn a_budget_must_be_positive() {
        let candidates = [Candidate { unit: Unit::attention(0), saving: 1.0 }];
        for bad in [0.0, -0.1, f64::NAN] {
            assert!(choose_within(&candidates, bad, FRONT, 1, |_| Ok(0.0)).is_err());
        }
    }
}
