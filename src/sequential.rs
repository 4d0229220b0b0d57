//! Sequential fitting: the chosen layers are fitted in stages, each stage's maps on the activations
//! of the model in which the layers of the stages before it are already linearised.
//!
//! One-shot NBL fits every map on the original model, so a later layer's map is fitted to inputs
//! that the earlier replacements no longer produce. Here stage 1 fits its layers from the
//! statistics of the original model; every later stage first runs the model with the maps fitted so
//! far (stored as the output will store them: int4 maps with their rounding), measuring only the
//! chosen layers not yet fitted, then fits the next stage from those moments.
//!
//! Cost: with `k` chosen layers in stages of `s`, `⌈k/s⌉ − 1` calibration passes over the data, each
//! measuring fewer layers than the last, on top of the pass (or statistics file) of stage 1. A
//! pass costs what `calibrate` does on the same data; the fits are the one-shot ones.

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use serde::Serialize;

use crate::blocks::Blocks;
use crate::calibrate::{MomentsOn, calibrate, layer_tensors};
use crate::engine::Engine;
use crate::onnx::Model;
use crate::rewrite::{LinearMap, MapStorage, fit_map, linearised_copy};
use crate::stats::{MomentsSource, Stats};

/// How the later stages are measured.
pub struct Stages<'a> {
    pub engine: &'a dyn Engine,
    /// Packed calibration blocks (the data stage 1's statistics were measured on).
    pub data: &'a [Vec<i64>],
    /// Blocks per engine run.
    pub batch: usize,
    pub moments: MomentsOn,
    /// Layers fitted per stage.
    pub size: usize,
}

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

/// Fits `chosen` (in that order) in stages of `stages.size`: stage 1 from `first`, the statistics
/// of the original model; each later stage from a calibration pass over the model with every
/// earlier stage's layers linearised, their maps stored as `storage`.
pub fn fit_sequentially(
    model: &Model,
    blocks: &Blocks,
    chosen: &[usize],
    first: &dyn MomentsSource,
    lambda: f64,
    storage: MapStorage,
    stages: &Stages<'_>,
) -> Result<SequentialFit> {
    ensure!(stages.size > 0, "--stage-size must be at least 1");
    let gptq = storage.quantizer() == Some(crate::quantize::Quantizer::Gptq);
    let mut maps: Vec<(usize, LinearMap)> = Vec::with_capacity(chosen.len());
    let mut report = Vec::new();
    let mut measured: Option<Stats> = None;
    for (index, stage) in chosen.chunks(stages.size).enumerate() {
        let started = Instant::now();
        let mut measured_layers = 0;
        if index > 0 {
            let rest = &chosen[maps.len()..];
            let done: Vec<(usize, &LinearMap)> = maps.iter().map(|(l, m)| (*l, m)).collect();
            let staged = linearised_copy(model, blocks, &done, storage)?;
            let mut to_measure = blocks.clone();
            to_measure.layers.retain(|b| rest.contains(&b.layer));
            measured_layers = to_measure.layers.len();
            eprintln!(
                "stage {}: measuring layers {rest:?} with layers {:?} linearised",
                index + 1,
                maps.iter().map(|(l, _)| *l).collect::<Vec<_>>()
            );
            let moments =
                calibrate(&staged, &to_measure, stages.engine, stages.data, stages.batch, stages.moments)
                    .with_context(|| format!("calibrating stage {}", index + 1))?;
            measured = Some(Stats {
                fingerprint: String::new(),
                hidden_size: blocks.hidden_size,
                layers: layer_tensors(&to_measure),
                moments,
                heldout: None,
                data: Vec::new(),
            });
        }
        let source: &dyn MomentsSource = match &measured {
            Some(stats) => stats,
            None => first,
        };
        for &layer in stage {
            let map = fit_map(source, layer, lambda, gptq).with_context(|| format!("layer {layer}"))?;
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
