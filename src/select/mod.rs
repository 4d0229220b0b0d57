//! Choosing which layers to linearise: the criteria that rank layers from their statistics, the
//! selection rules (a count, named layers, a bound), the measured chooser ([`measured`]) and the
//! choice of units within a quality budget ([`budget`]). A chooser returns the layers or units in
//! the order chosen; it never fits a map or edits a graph.

pub mod budget;
pub mod measured;

use anyhow::Result;
use serde::Serialize;

use crate::invalid::{Setting, require};
use crate::nbl::LayerFit;

/// How the layers to linearise are chosen. Spelt the same on the command line, in the report
/// JSON and in the model's metadata (`weighted-cca`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Criterion {
    /// Lowest CCA bound first (NBL)
    Cca,
    /// Highest input/output cosine similarity first (LLM-Drop)
    Cosine,
    /// Lowest LMMSE residual relative to the block output's energy first (scale-aware)
    Residual,
    /// Lowest CCA bound weighted by the branch's share of the block output first (scale-aware)
    WeightedCca,
    /// Greedy by the KL divergence measured on probe text, among the 2k lowest-bound layers
    /// (rewrite only: runs the model)
    Measured,
}

impl Criterion {
    /// The statistic that orders the candidates: the criterion's own, or for `measured` the CCA
    /// bound, whose best `2k` layers are the candidates the measurement chooses among.
    pub fn ranking(self) -> Ranking {
        match self {
            Criterion::Cca | Criterion::Measured => Ranking::Cca,
            Criterion::Cosine => Ranking::Cosine,
            Criterion::Residual => Ranking::Residual,
            Criterion::WeightedCca => Ranking::WeightedCca,
        }
    }

    /// The spelling shared by the command line, the JSON and the metadata.
    pub fn name(self) -> &'static str {
        match self {
            Criterion::Cca => "cca",
            Criterion::Cosine => "cosine",
            Criterion::Residual => "residual",
            Criterion::WeightedCca => "weighted-cca",
            Criterion::Measured => "measured",
        }
    }

    /// What the criterion prefers, for people.
    pub fn describe(self) -> &'static str {
        match self {
            Criterion::Cca => "CCA bound (the most linear attention)",
            Criterion::Cosine => "input/output cosine (the attention that changes the stream least)",
            Criterion::Residual => "map error relative to the stream (the least wrong replacement)",
            Criterion::WeightedCca => "CCA bound weighted by the branch's share of the stream",
            Criterion::Measured => "measured KL divergence, greedily (the least harm together)",
        }
    }
}

impl std::fmt::Display for Criterion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A statistic that orders layers from their fits alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ranking {
    /// `bound`, ascending.
    Cca,
    /// `cosine`, descending.
    Cosine,
    /// `relative_residual`, ascending.
    Residual,
    /// `weighted_bound`, ascending.
    WeightedCca,
}

/// Layers in the order they should be linearised, best candidate first; ties by layer number.
pub fn ranking(fits: &[LayerFit], ranking: Ranking) -> Vec<usize> {
    let key = |f: &LayerFit| match ranking {
        Ranking::Cca => f.bound,
        Ranking::Cosine => -f.cosine,
        Ranking::Residual => f.relative_residual,
        Ranking::WeightedCca => f.weighted_bound,
    };
    let mut order: Vec<&LayerFit> = fits.iter().collect();
    order.sort_by(|a, b| key(a).total_cmp(&key(b)).then(a.layer.cmp(&b.layer)));
    order.iter().map(|f| f.layer).collect()
}

/// Which layers to linearise.
#[derive(Clone, Debug, PartialEq)]
pub enum Selection {
    /// The first `K` of the ranking.
    Count(usize),
    /// Exactly these layers (each once, whatever the repeats given).
    Layers(Vec<usize>),
    /// Every layer whose normalised bound (`bound/d`) is at most this, in ranking order.
    MaxBound(f64),
}

impl Selection {
    /// Fails unless the selection makes sense for `layers` layers; `what` names them in the
    /// message (`attention layers of model.onnx`).
    pub fn check(&self, layers: usize, what: &str) -> Result<()> {
        match self {
            Selection::Count(k) => {
                require(*k <= layers, Setting::LayerCount, || format!("{k} is more than the {layers} {what}"))
            }
            Selection::Layers(ids) => match ids.iter().find(|&&id| id >= layers) {
                Some(id) => require(false, Setting::LayerIds, || {
                    format!("layer {id} does not exist (the {what} are 0..{})", layers.saturating_sub(1))
                }),
                None => Ok(()),
            },
            Selection::MaxBound(b) => require(b.is_finite() && *b >= 0.0, Setting::MaxBound, || {
                format!("a bound must be a finite number ≥ 0, not {b}")
            }),
        }
    }
}

/// The layers to linearise, in the order they were chosen: the ranking's best first, or the
/// layers named, in the order named without repeats.
pub fn select(fits: &[LayerFit], ranked_by: Ranking, selection: &Selection) -> Result<Vec<usize>> {
    if !matches!(selection, Selection::Layers(_)) {
        selection.check(fits.len(), "layers")?;
    }
    let order = ranking(fits, ranked_by);
    Ok(match selection {
        Selection::Count(k) => order.into_iter().take(*k).collect(),
        Selection::Layers(ids) => {
            let mut chosen = Vec::with_capacity(ids.len());
            for &id in ids {
                require(fits.iter().any(|f| f.layer == id), Setting::LayerIds, || {
                    let held = order.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(", ");
                    format!("layer {id} does not exist (the statistics hold layers {held})")
                })?;
                if !chosen.contains(&id) {
                    chosen.push(id);
                }
            }
            chosen
        }
        Selection::MaxBound(max) => order
            .into_iter()
            .filter(|&l| fits.iter().any(|f| f.layer == l && f.bound_normalized <= *max))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fit(layer: usize, bound: f64, cosine: f64) -> LayerFit {
        LayerFit {
            layer,
            bound,
            bound_normalized: bound / 10.0,
            fit_residual: 0.0,
            residual_energy: 0.0,
            stream_energy: 0.0,
            relative_residual: bound * 2.0,
            weighted_bound: 10.0 - bound,
            cosine,
            ridge_x: 0.0,
            ridge_z: 0.0,
            rank_deficient: false,
            heldout_residual: None,
            rho: None,
            w: faer::Mat::zeros(0, 0),
            b: Vec::new(),
        }
    }

    fn fits() -> Vec<LayerFit> {
        [5.0, 1.0, 3.0, 2.0, 4.0].iter().enumerate().map(|(l, &b)| fit(l, b, 0.1 * l as f64)).collect()
    }

    #[test]
    fn named_layers_are_selected_exactly_once_each() {
        let select_ids =
            |ids: &[usize]| select(&fits(), Ranking::Cca, &Selection::Layers(ids.to_vec())).unwrap();
        assert_eq!(select_ids(&[3, 1, 3]), [3, 1]);
        assert_eq!(select_ids(&[1, 0]), [1, 0]);
        assert_eq!(select_ids(&[4, 4, 4]), [4]);
        let err = select(&fits(), Ranking::Cca, &Selection::Layers(vec![2, 5])).unwrap_err().to_string();
        assert!(err.contains("layer 5 does not exist"), "{err}");
    }

    #[test]
    fn counts_and_bounds_follow_the_ranking() {
        assert_eq!(select(&fits(), Ranking::Cca, &Selection::Count(3)).unwrap(), [1, 3, 2]);
        assert_eq!(select(&fits(), Ranking::Cca, &Selection::MaxBound(0.3)).unwrap(), [1, 3, 2]);
        assert!(select(&fits(), Ranking::Cca, &Selection::Count(6)).is_err());
        assert!(select(&fits(), Ranking::Cca, &Selection::MaxBound(f64::NAN)).is_err());
    }

    #[test]
    fn each_ranking_orders_by_its_own_statistic() {
        // bounds 5 1 3 2 4; cosines 0 .1 .2 .3 .4; residual = 2·bound; weighted = 10 − bound.
        assert_eq!(ranking(&fits(), Ranking::Cca), [1, 3, 2, 4, 0]);
        assert_eq!(ranking(&fits(), Ranking::Cosine), [4, 3, 2, 1, 0]);
        assert_eq!(ranking(&fits(), Ranking::Residual), [1, 3, 2, 4, 0]);
        assert_eq!(ranking(&fits(), Ranking::WeightedCca), [0, 4, 2, 3, 1]);
        assert_eq!(Criterion::Measured.ranking(), Ranking::Cca);
    }

    #[test]
    fn every_criterion_is_spelt_alike_by_the_cli_and_serde() {
        use clap::ValueEnum;
        for c in Criterion::value_variants() {
            let cli = c.to_possible_value().expect("visible").get_name().to_string();
            assert_eq!(cli, c.name());
            assert_eq!(serde_json::to_value(c).unwrap(), serde_json::Value::String(cli));
        }
    }
}
