//! Sequential fitting: the chosen layers are fitted in stages, each stage's maps on the activations
//! of the model in which the layers of the stages before it are already linearised.
//!
//! One-shot NBL fits every map on the original model, so a later layer's map is fitted to inputs
//! that the earlier replacements no longer produce. Here stage 1 fits its layers from the
//! statistics of the original model; every later stage first has the caller measure the chosen
//! layers not yet fitted, on the model with the maps fitted so far (stored as the output will
//! store them: int4 maps with their rounding), then fits the next stage from those moments.
//!
//! Cost: with `k` chosen layers in stages of `s`, `⌈k/s⌉ − 1` calibration passes over the data, each
//! measuring fewer layers than the last, on top of the pass (or statistics file) of stage 1. A
//! pass costs what `calibrate` does on the same data; the fits are the one-shot ones.

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use serde::Serialize;

use crate::fit::storage::MapStorage;
use crate::fit::{LinearMap, fit_map};
use crate::stats::MomentsSource;
use crate::unit::Unit;

/// What one stage did and cost.
#[derive(Clone, Debug, Serialize)]
pub struct Stage {
    /// The layers fitted in this stage.
    pub layers: Vec<usize>,
    /// Layers measured by this stage's calibration pass (0 for stage 1: the given statistics).
    pub measured_layers: usize,
    /// Wall time of the stage: its calibration pass and its fits.
    pub seconds: f64,
}

/// The maps of the chosen layers, in the order chosen, and the stages that fitted them.
pub struct SequentialFit {
    pub maps: Vec<(usize, LinearMap)>,
    pub stages: Vec<Stage>,
}

/// Fits `chosen` (in that order) in stages of `stage_size` layers: stage 1 from `first`, the
/// statistics of the original model; each later stage from `measure(fitted, rest)`, the moments of
/// the layers `rest` on the model with the `fitted` maps in place (stored as `storage`).
pub fn fit_sequentially(
    chosen: &[usize],
    stage_size: usize,
    first: &dyn MomentsSource,
    lambda: f64,
    storage: MapStorage,
    mut measure: impl FnMut(&[(usize, &LinearMap)], &[usize]) -> Result<Box<dyn MomentsSource>>,
) -> Result<SequentialFit> {
    ensure!(stage_size > 0, "a stage must fit at least one layer");
    let mut maps: Vec<(usize, LinearMap)> = Vec::with_capacity(chosen.len());
    let mut report = Vec::new();
    let mut measured: Option<Box<dyn MomentsSource>> = None;
    for (index, stage) in chosen.chunks(stage_size).enumerate() {
        let started = Instant::now();
        let mut measured_layers = 0;
        if index > 0 {
            let rest = &chosen[maps.len()..];
            let fitted: Vec<(usize, &LinearMap)> = maps.iter().map(|(l, m)| (*l, m)).collect();
            eprintln!(
                "stage {}: measuring layers {rest:?} with layers {:?} linearised",
                index + 1,
                fitted.iter().map(|(l, _)| *l).collect::<Vec<_>>()
            );
            let stats = measure(&fitted, rest).with_context(|| format!("calibrating stage {}", index + 1))?;
            measured_layers = stats.layers().len();
            measured = Some(stats);
        }
        let source: &dyn MomentsSource = measured.as_deref().unwrap_or(first);
        for &layer in stage {
            let map = fit_map(source, Unit::attention(layer), lambda, storage)
                .with_context(|| format!("layer {layer}"))?;
            maps.push((layer, map));
        }
        report.push(Stage {
            layers: stage.to_vec(),
            measured_layers,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    Ok(SequentialFit { maps, stages: report })
}
