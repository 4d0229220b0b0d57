//! Fitting the linear maps that replace attention: the LMMSE map of one layer from its moments
//! (one-shot, on the original model), stage by stage on the partly linearised model
//! ([`sequential`]), and how the maps are stored ([`storage`], [`quantize`]).

pub mod quantize;
pub mod sequential;
pub mod storage;

use anyhow::{Context, Result};
use faer::Mat;
use serde::Serialize;

use crate::stats::MomentsSource;
use crate::unit::{Unit, UnitKind};
use storage::MapStorage;

/// `y = W x + b` (`W` is `d×d`), with what GPTQ weighs `W`'s rounding errors by.
#[derive(Clone)]
pub struct LinearMap {
    pub w: Mat<f64>,
    pub b: Vec<f64>,
    /// `E[x xᵀ]` of the layer's input, for GPTQ.
    pub second_moment: Option<Mat<f64>>,
}

/// Which activations the maps were fitted on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fitting {
    /// Every map from the original model's statistics.
    OneShot,
    /// Stage by stage, each on the model with the earlier stages' layers linearised.
    Sequential,
}

/// `unit`'s LMMSE map from `stats`, with the input's second moment when `storage` rounds it by
/// GPTQ (which weighs each input by the unit's `E[x xᵀ]`).
pub fn fit_map(stats: &dyn MomentsSource, unit: Unit, lambda: f64, storage: MapStorage) -> Result<LinearMap> {
    let i = stats.layers().iter().position(|t| t.unit() == unit).with_context(|| {
        let hint = match unit.kind {
            UnitKind::Attention => String::new(),
            kind => format!(": calibrate with --units {} to measure it", kind.name()),
        };
        format!("the statistics hold no moments of {unit}{hint}")
    })?;
    let moments = stats.moments(i)?.into_owned();
    let second_moment = storage.needs_second_moment().then(|| moments.second_moment_x());
    let fit = crate::nbl::fit_layer(unit.layer, moments, lambda, false)?;
    Ok(LinearMap { w: fit.w, b: fit.b, second_moment })
}
