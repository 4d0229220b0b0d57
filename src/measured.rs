//! Measured selection (`--criterion measured`): the layers are chosen greedily by the divergence
//! their linearisation causes, measured by running the model, instead of ranked by a statistic.
//!
//! Each step adds the candidate whose map, together with the layers already chosen, gives the
//! lowest mean `KL(original ‖ rewritten)` over the next-token distributions of a few probe blocks.
//! A statistic scores each layer alone, on the original model; this sees how the errors of the
//! chosen layers add up and pass through the rest of the network.
//!
//! The candidates are the `2k` layers of lowest CCA bound, their maps the one-shot ones, fitted
//! once. Cost: step `i` (1-based) runs `2k − i + 1` candidate models, so choosing `k` layers takes
//! `k (3k + 1) / 2` forward passes over the probe blocks (k = 8: 100; k = 12: 222), plus one of the
//! original. Each model is built in memory, never written.

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use ndarray::Array2;
use serde::Serialize;

use crate::blocks::Blocks;
use crate::engine::Engine;
use crate::eval::next_token_log_probs;
use crate::nbl::{Criterion, LayerFit, ranking};
use crate::onnx::{Interface, Model};
use crate::rewrite::{LinearMap, MapStorage, fit_map, linearised_copy};
use crate::stats::MomentsSource;

/// Where the divergence is measured.
pub struct Probe<'a> {
    pub engine: &'a dyn Engine,
    /// Token blocks not used to fit the maps.
    pub blocks: &'a [Vec<i64>],
}

/// One greedy step: the layer added and the divergence with it.
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
    /// Forward passes over the probe blocks, the original's included.
    pub passes: usize,
    pub probe_tokens: usize,
    pub seconds: f64,
}

impl MeasuredChoice {
    pub fn layers(&self) -> Vec<usize> {
        self.steps.iter().map(|s| s.layer).collect()
    }
}

/// Chooses `k` layers of `model` greedily by measured divergence, among the `2k` lowest-bound
/// `fits`, with the maps `stats` gives, stored as `storage`.
#[allow(clippy::too_many_arguments)]
pub fn choose(
    model: &Model,
    blocks: &Blocks,
    fits: &[LayerFit],
    stats: &dyn MomentsSource,
    k: usize,
    lambda: f64,
    storage: MapStorage,
    probe: &Probe<'_>,
) -> Result<MeasuredChoice> {
    ensure!(!probe.blocks.is_empty(), "measured selection needs at least one probe block");
    let started = Instant::now();
    let gptq = storage.quantizer() == Some(crate::quantize::Quantizer::Gptq);
    let candidates: Vec<usize> = ranking(fits, Criterion::Cca).into_iter().take(2 * k).collect();
    let maps: Vec<(usize, LinearMap)> = candidates
        .iter()
        .map(|&l| Ok((l, fit_map(stats, l, lambda, gptq).with_context(|| format!("layer {l}"))?)))
        .collect::<Result<_>>()?;
    let interface = Interface::of(model, Some(blocks.hidden_size))?;
    let reference = reference_log_probs(model, &interface, probe)?;
    ensure!(k <= candidates.len(), "cannot choose {k} of {} candidate layers", candidates.len());
    let total: usize = (0..k).map(|i| candidates.len() - i).sum();
    let progress = crate::progress::bar(
        total as u64,
        "measuring {bar:40} {pos}/{len} candidate models  ETA {eta}",
        "models",
    );
    let mut steps: Vec<Step> = Vec::with_capacity(k);
    let mut passes = 1;
    for _ in 0..k {
        let mut best: Option<(usize, f64)> = None;
        let untried: Vec<usize> =
            candidates.iter().copied().filter(|c| !steps.iter().any(|s| s.layer == *c)).collect();
        for &candidate in &untried {
            crate::atomic::check_interrupt()?;
            let chosen: Vec<(usize, &LinearMap)> = maps
                .iter()
                .filter(|(l, _)| *l == candidate || steps.iter().any(|s| s.layer == *l))
                .map(|(l, m)| (*l, m))
                .collect();
            let staged = linearised_copy(model, blocks, &chosen, storage)?;
            let kl = mean_kl(&staged, &interface, probe, &reference)?;
            passes += 1;
            progress.inc(1);
            if best.is_none_or(|(_, b)| kl < b) {
                best = Some((candidate, kl));
            }
        }
        let (layer, kl) = best.context("no candidate layer left to choose")?;
        eprintln!("measured: layer {layer} added, KL {kl:.5} ({} candidates)", untried.len());
        steps.push(Step { layer, kl, candidates: untried.len() });
    }
    progress.finish_and_clear();
    let probe_tokens = probe.blocks.iter().map(Vec::len).sum();
    Ok(MeasuredChoice { steps, passes, probe_tokens, seconds: started.elapsed().as_secs_f64() })
}

/// Runs `model` on every probe block and hands `each` the block's next-token log-probabilities,
/// position by position.
fn for_each_block(
    model: &Model,
    interface: &Interface,
    probe: &Probe<'_>,
    mut each: impl FnMut(Vec<Vec<f64>>),
) -> Result<()> {
    let mut session = probe.engine.load(model, &[])?;
    for block in probe.blocks {
        let ids = Array2::from_shape_vec((1, block.len()), block.clone()).expect("one row");
        each(next_token_log_probs(interface, session.as_mut(), &ids)?.0);
    }
    Ok(())
}

/// The original's log-probabilities at every probe position, in f32: they are held for the whole
/// search (positions × vocabulary).
fn reference_log_probs(model: &Model, interface: &Interface, probe: &Probe<'_>) -> Result<Vec<Vec<f32>>> {
    let mut all = Vec::new();
    for_each_block(model, interface, probe, |block| {
        all.extend(block.into_iter().map(|lp| lp.into_iter().map(|v| v as f32).collect::<Vec<f32>>()))
    })?;
    Ok(all)
}

/// Mean over the probe positions of `KL(reference ‖ model)`, in f64, a block at a time.
fn mean_kl(model: &Model, interface: &Interface, probe: &Probe<'_>, reference: &[Vec<f32>]) -> Result<f64> {
    let mut positions = reference.iter();
    let mut total = 0.0;
    for_each_block(model, interface, probe, |block| {
        for (q, p) in block.iter().zip(positions.by_ref()) {
            total += p.iter().zip(q).map(|(&a, &b)| f64::from(a).exp() * (f64::from(a) - b)).sum::<f64>();
        }
    })?;
    Ok(total / reference.len().max(1) as f64)
}
