//! Per-layer statistics of a model: each attention site's moments ([`moments`]), what identifies
//! the model and the data they were measured on, merging files of disjoint data or layers, and
//! their safetensors file ([`file`]), read whole or layer by layer ([`MomentsSource`]).

mod file;
mod moments;

use std::path::Path;

use anyhow::{Result, ensure};
use serde::{Deserialize, Serialize};

use crate::unit::Unit;

pub use file::{StatsFile, write_synthetic};
pub use moments::{MomentPrecision, Moments};
pub(crate) use moments::{for_each_tiled, transposed};

/// Which tensors a unit's statistics were measured on: `x` the stream entering it, `y` what it
/// adds (for a layer or a run, a difference calibration computes, named `nbl.measure.<unit>.y`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerTensors {
    pub layer: usize,
    pub x: String,
    pub y: String,
    /// Absent for a layer's attention (files of every version hold only those).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<Unit>,
}

impl LayerTensors {
    /// The attention site of `layer`, measured on `x` and `y`.
    pub fn attention(layer: usize, x: &str, y: &str) -> LayerTensors {
        LayerTensors { layer, x: x.to_string(), y: y.to_string(), unit: None }
    }

    pub fn unit(&self) -> Unit {
        self.unit.unwrap_or(Unit::attention(self.layer))
    }

    /// How messages name it: `layer N` for an attention site, as everywhere, else the unit.
    pub fn describe(&self) -> String {
        match self.unit {
            None => format!("layer {}", self.layer),
            Some(unit) => unit.to_string(),
        }
    }

    /// Where the entry goes in a file: attention layers first, in layer order (as files without
    /// other units hold them), then the other units.
    fn order(&self) -> (usize, Unit) {
        match self.unit {
            None => (0, self.unit()),
            Some(unit) => (1, unit),
        }
    }
}

/// Where the statistics come from: the data and how it was cut, for reports and for merging.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataSummary {
    pub files: Vec<String>,
    pub seq_len: usize,
    /// Sequences measured (spelt `blocks` in files of every version).
    #[serde(rename = "blocks")]
    pub sequences: usize,
    /// `[index, count]` of the shard, `[0, 1]` for a whole run.
    pub shard: [usize; 2],
    pub engine: String,
}

/// All layers' moments of one model, with what identifies the model and the data.
pub struct Stats {
    pub fingerprint: String,
    pub hidden_size: usize,
    pub layers: Vec<LayerTensors>,
    pub moments: Vec<Moments>,
    /// Moments of held-out sequences, layer by layer, not used in any fit: where calibrate kept some
    /// (`--holdout-every`), the maps' error on text they were not fitted to.
    pub heldout: Option<Vec<Moments>>,
    /// One entry per shard merged in (a single run has one).
    pub data: Vec<DataSummary>,
}

impl Stats {
    pub fn tokens(&self) -> u64 {
        self.moments.first().map_or(0, |m| m.count)
    }

    /// The moments of `layers` measured in one pass, without a model fingerprint or data
    /// summary: what a stage of sequential fitting fits from, never written.
    pub fn measured(hidden_size: usize, layers: Vec<LayerTensors>, moments: Vec<Moments>) -> Stats {
        Stats { fingerprint: String::new(), hidden_size, layers, moments, heldout: None, data: Vec::new() }
    }

    /// Combines statistics of the same model into what one run gives: files of disjoint data
    /// (shards) of the same layers are merged token-wise; files of disjoint layer ranges over the
    /// same data are joined, layers in order.
    pub fn merge(mut parts: Vec<(std::path::PathBuf, Stats)>) -> Result<Stats> {
        ensure!(!parts.is_empty(), "no statistics to merge");
        let (first_path, mut merged) = parts.remove(0);
        for (path, part) in parts {
            ensure!(
                part.fingerprint == merged.fingerprint,
                "{} and {} were measured on different models (fingerprints {} and {})",
                first_path.display(),
                path.display(),
                merged.fingerprint,
                part.fingerprint
            );
            if part.layers != merged.layers {
                merged.join_layers(part, &path)?;
                continue;
            }
            for d in &part.data {
                // The same shard of the same data, or the same whole run: the same tokens twice.
                ensure!(
                    !merged
                        .data
                        .iter()
                        .any(|m| m == d || (m.shard == d.shard && d.shard[1] > 1 && m.files == d.files)),
                    "{}: shard {}/{} is already part of the merge",
                    path.display(),
                    d.shard[0],
                    d.shard[1]
                );
            }
            ensure_same_heldout(&merged, &part, &path)?;
            for (a, b) in merged.moments.iter_mut().zip(&part.moments) {
                a.merge(b);
            }
            for (a, b) in merged.heldout.iter_mut().flatten().zip(part.heldout.iter().flatten()) {
                a.merge(b);
            }
            merged.data.extend(part.data);
        }
        Ok(merged)
    }

    /// Adds the layers of `part` (from `path`), measured on the same data as these.
    fn join_layers(&mut self, part: Stats, path: &Path) -> Result<()> {
        let overlap: Vec<String> = part
            .layers
            .iter()
            .filter(|l| self.layers.iter().any(|m| m.unit() == l.unit()))
            .map(|l| l.unit().to_string())
            .collect();
        ensure!(
            overlap.is_empty(),
            "{}: {} already part of the merge; files of different layers must not overlap, files of the \
             same layers must hold the same ones",
            path.display(),
            overlap.join(", ")
        );
        ensure!(
            part.data == self.data && part.tokens() == self.tokens(),
            "{}: its layers were measured on other data ({} tokens) than the rest ({} tokens): layer \
             ranges join only when calibrated on the same sequences",
            path.display(),
            part.tokens(),
            self.tokens()
        );
        ensure_same_heldout(self, &part, path)?;
        let mut heldout: Vec<((usize, Unit), Moments)> = self
            .layers
            .iter()
            .chain(&part.layers)
            .map(LayerTensors::order)
            .zip(self.heldout.take().into_iter().flatten().chain(part.heldout.into_iter().flatten()))
            .collect();
        heldout.sort_by_key(|(order, _)| *order);
        if !heldout.is_empty() {
            self.heldout = Some(heldout.into_iter().map(|(_, m)| m).collect());
        }
        let mut layers: Vec<(LayerTensors, Moments)> = self
            .layers
            .drain(..)
            .zip(self.moments.drain(..))
            .chain(part.layers.into_iter().zip(part.moments))
            .collect();
        layers.sort_by_key(|(info, _)| info.order());
        (self.layers, self.moments) = layers.into_iter().unzip();
        Ok(())
    }
}

/// Files merge only when both hold held-out moments or neither does.
fn ensure_same_heldout(merged: &Stats, part: &Stats, path: &Path) -> Result<()> {
    ensure!(
        merged.heldout.is_some() == part.heldout.is_some(),
        "{}: {} held-out moments and the rest {}: calibrate every part holding out the same share",
        path.display(),
        if part.heldout.is_some() { "it holds" } else { "it holds no" },
        if merged.heldout.is_some() { "do" } else { "do not" }
    );
    Ok(())
}

/// Per-layer moments, from memory ([`Stats`]) or read from a file as needed ([`StatsFile`]).
pub trait MomentsSource: Sync {
    fn fingerprint(&self) -> &str;
    fn hidden_size(&self) -> usize;
    fn layers(&self) -> &[LayerTensors];
    fn data(&self) -> &[DataSummary];
    fn tokens(&self) -> u64;
    /// The `index`-th layer's moments.
    fn moments(&self, index: usize) -> Result<std::borrow::Cow<'_, Moments>>;
    /// The `index`-th layer's held-out moments, where there are some.
    fn heldout(&self, index: usize) -> Result<Option<std::borrow::Cow<'_, Moments>>>;
}

impl MomentsSource for Stats {
    fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
    fn hidden_size(&self) -> usize {
        self.hidden_size
    }
    fn layers(&self) -> &[LayerTensors] {
        &self.layers
    }
    fn data(&self) -> &[DataSummary] {
        &self.data
    }
    fn tokens(&self) -> u64 {
        Stats::tokens(self)
    }
    fn moments(&self, index: usize) -> Result<std::borrow::Cow<'_, Moments>> {
        Ok(std::borrow::Cow::Borrowed(&self.moments[index]))
    }
    fn heldout(&self, index: usize) -> Result<Option<std::borrow::Cow<'_, Moments>>> {
        Ok(self.heldout.as_ref().map(|h| std::borrow::Cow::Borrowed(&h[index])))
    }
}
