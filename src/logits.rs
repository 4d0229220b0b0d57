//! Next-token distributions from a run's logits: the `logits` output, greedy choice, log-softmax,
//! and how far two models' distributions are apart (KL divergence, top-1 agreement). Shared by
//! `check`, `eval` and `bench`.

use anyhow::{Context, Result, ensure};
use ndarray::ArrayD;

use crate::onnx::Tensor;

/// The position of a run's `logits` among its `outputs` (named by `names`).
pub fn position(names: &[String]) -> Result<usize> {
    names.iter().position(|n| n == "logits").context("the model has no \"logits\" output")
}

/// The logits of a run as f32 `[batch, positions, vocab]`, refusing NaN and Inf.
pub fn logits(names: &[String], outputs: &[Tensor]) -> Result<ArrayD<f32>> {
    let logits = outputs[position(names)?].to_f32()?;
    ensure!(
        logits.ndim() == 3 && logits.shape()[2] > 0,
        "logits have shape {:?}, expected [batch, positions, vocab]",
        logits.shape()
    );
    ensure!(logits.iter().all(|v| v.is_finite()), "the logits hold NaN or Inf");
    Ok(logits)
}

/// The position of the largest value (the first on ties; 0 when empty).
pub fn argmax<T: PartialOrd + Copy>(values: impl IntoIterator<Item = T>) -> usize {
    let mut best: Option<(usize, T)> = None;
    for (i, v) in values.into_iter().enumerate() {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map_or(0, |(i, _)| i)
}

/// `log softmax` of logits, in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&v| (f64::from(v) - max).exp()).sum();
    let log_sum = sum.ln() + max;
    logits.iter().map(|&v| f64::from(v) - log_sum).collect()
}

/// `KL(p ‖ q) = Σ p (log p − log q)` from log-probabilities.
pub fn kl_divergence(log_p: &[f64], log_q: &[f64]) -> f64 {
    log_p.iter().zip(log_q).map(|(a, b)| a.exp() * (a - b)).sum()
}

/// Running agreement of a model's next-token distributions with a reference's, position by
/// position.
#[derive(Clone, Copy, Debug, Default)]
pub struct Divergence {
    kl_sum: f64,
    agree: u64,
    positions: u64,
}

impl Divergence {
    /// Adds one position, given both models' log-probabilities.
    pub fn add(&mut self, reference: &[f64], model: &[f64]) {
        self.kl_sum += kl_divergence(reference, model);
        self.agree += u64::from(argmax(reference.iter().copied()) == argmax(model.iter().copied()));
        self.positions += 1;
    }

    pub fn positions(&self) -> u64 {
        self.positions
    }

    /// Mean KL(reference ‖ model) over the positions.
    pub fn mean_kl(&self) -> f64 {
        self.kl_sum / self.positions as f64
    }

    /// Share of positions where both pick the same most likely token.
    pub fn top1_agreement(&self) -> f64 {
        self.agree as f64 / self.positions as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_matches_a_hand_computation_and_vanishes_for_identical_distributions() {
        let (a, b) = (log_softmax(&[1.0, 2.0, 3.0]), log_softmax(&[3.0, 2.0, 1.0]));
        assert_eq!(kl_divergence(&a, &a), 0.0);
        // KL(p‖q) for p = softmax(1,2,3), q = softmax(3,2,1): Σ p (log p − log q) = 2·(p3 − p1).
        let z: f64 = [1f64, 2.0, 3.0].iter().map(|v| v.exp()).sum();
        let expected = 2.0 * (3f64.exp() - 1f64.exp()) / z;
        assert!((kl_divergence(&a, &b) - expected).abs() < 1e-12);
        let mut d = Divergence::default();
        d.add(&a, &b);
        d.add(&a, &a);
        assert!((d.mean_kl() - expected / 2.0).abs() < 1e-12);
        assert_eq!((d.positions(), d.top1_agreement()), (2, 0.5));
    }

    #[test]
    fn argmax_takes_the_first_of_ties() {
        assert_eq!(argmax([1.0, 3.0, 3.0]), 1);
        assert_eq!(argmax(Vec::<f32>::new()), 0);
    }
}
