//! Measured selection (`measured` criterion): the layers are chosen greedily by the harm their
//! replacement does, measured by running the model, instead of ranked by a statistic.
//!
//! Each step adds the candidate that, together with the layers already chosen, scores lowest:
//! the caller's score is the mean `KL(original ‖ rewritten)` over a few probe sequences
//! ([`crate::probe`]). A statistic scores each layer alone, on the original model; this sees how
//! the errors of the chosen layers add up and pass through the rest of the network.
//!
//! Cost: with `c` candidates, step `i` (1-based) scores `c − i + 1` sets, so choosing `k` of
//! `c = 2k` takes `k (3k + 1) / 2` scorings (k = 8: 100; k = 12: 222).

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use serde::Serialize;

/// One greedy step: the layer added and the score with it.
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    pub layer: usize,
    /// Mean KL(original ‖ model with the layers chosen so far) over the probe positions.
    pub kl: f64,
    /// Candidates tried at this step.
    pub candidates: usize,
}

/// The measured choice: the layers in the order chosen, each step, and the cost.
#[derive(Clone, Debug, Serialize)]
pub struct MeasuredChoice {
    pub steps: Vec<Step>,
    /// Forward passes over the probe sequences, the original's included.
    pub passes: usize,
    pub probe_tokens: usize,
    pub seconds: f64,
}

impl MeasuredChoice {
    pub fn layers(&self) -> Vec<usize> {
        self.steps.iter().map(|s| s.layer).collect()
    }
}

/// Chooses `k` of `candidates` greedily: each step adds the candidate whose set (the layers chosen
/// so far and it) `score`s lowest, the first of equals in candidate order. `probe_tokens` is what
/// one scoring reads, for the report; the original's own pass counts as one.
pub fn choose(
    candidates: &[usize],
    k: usize,
    probe_tokens: usize,
    mut score: impl FnMut(&[usize]) -> Result<f64>,
) -> Result<MeasuredChoice> {
    ensure!(k <= candidates.len(), "cannot choose {k} of {} candidate layers", candidates.len());
    let started = Instant::now();
    let total: usize = (0..k).map(|i| candidates.len() - i).sum();
    let progress = crate::progress::bar(
        total as u64,
        "measuring {bar:40} {pos}/{len} candidate models  ETA {eta}",
        "models",
    );
    let mut chosen: Vec<usize> = Vec::with_capacity(k);
    let mut steps: Vec<Step> = Vec::with_capacity(k);
    let mut passes = 1;
    for _ in 0..k {
        let untried: Vec<usize> = candidates.iter().copied().filter(|c| !chosen.contains(c)).collect();
        let mut best: Option<(usize, f64)> = None;
        for &candidate in &untried {
            crate::atomic::check_interrupt()?;
            chosen.push(candidate);
            let kl = score(&chosen).with_context(|| format!("scoring layers {chosen:?}"))?;
            chosen.pop();
            passes += 1;
            progress.inc(1);
            if best.is_none_or(|(_, b)| kl < b) {
                best = Some((candidate, kl));
            }
        }
        let (layer, kl) = best.context("no candidate layer left to choose")?;
        eprintln!("measured: layer {layer} added, KL {kl:.5} ({} candidates)", untried.len());
        chosen.push(layer);
        steps.push(Step { layer, kl, candidates: untried.len() });
    }
    progress.finish_and_clear();
    Ok(MeasuredChoice { steps, passes, probe_tokens, seconds: started.elapsed().as_secs_f64() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A score where layers interact: each layer costs its own harm, and 2 with 3 together cost
    /// far more than apart, so that the greedy path is not the order of the harms alone.
    fn interacting(set: &[usize]) -> Result<f64> {
        let harm = [0.5, 0.1, 0.2, 0.15, 0.4];
        let mut kl: f64 = set.iter().map(|&l| harm[l]).sum();
        if set.contains(&2) && set.contains(&3) {
            kl += 1.0;
        }
        Ok(kl)
    }

    #[test]
    fn each_step_adds_the_candidate_that_scores_lowest_with_the_chosen() {
        let choice = choose(&[0, 1, 2, 3, 4], 3, 64, interacting).unwrap();
        // 1 (0.1), then 3 (0.25), then not 2 (1.45) but 4 (0.65).
        assert_eq!(choice.layers(), [1, 3, 4]);
        let kls: Vec<f64> = choice.steps.iter().map(|s| s.kl).collect();
        assert!(
            (kls[0] - 0.1).abs() < 1e-12 && (kls[1] - 0.25).abs() < 1e-12 && (kls[2] - 0.65).abs() < 1e-12
        );
        assert_eq!(choice.steps.iter().map(|s| s.candidates).collect::<Vec<_>>(), [5, 4, 3]);
        // 5 + 4 + 3 scorings and the original's pass.
        assert_eq!(choice.passes, 13);
        assert_eq!(choice.probe_tokens, 64);
    }

    #[test]
    fn more_layers_than_candidates_are_refused() {
        assert!(choose(&[0, 1], 3, 0, interacting).is_err());
        assert!(choose(&[0, 1], 0, 0, interacting).unwrap().steps.is_empty());
    }
}
