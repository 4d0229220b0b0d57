//! The math of Neural Block Linearization, in f64: the CCA bound that ranks layers, the LMMSE map
//! that replaces a layer's attention, and the selection of layers.
//!
//! With `z = x + y` (the block's output with the residual), `C_zz = C_yy + C_yx + C_yxᵀ + C_xx` and
//! `C_zx = C_yx + C_xx`, the canonical correlations `ρ_i` of `x` and `z` are the singular values of
//! `C_zz^-½ C_zx C_xx^-½`, and `bound = Σ (1 − ρ_i²) = d − Σ ρ_i²`. With Cholesky factors
//! `L_x L_xᵀ = C_xx + ε_x I` and `L_z L_zᵀ = C_zz + ε_z I`, `M = L_z⁻¹ C_zx L_x⁻ᵀ` has the same
//! singular values, so `Σ ρ_i² = ‖M‖_F²` without an SVD.
//!
//! The bound is scale-free: it cannot see that a layer's error is large next to the stream it is
//! added to (layer 0's attention output is large next to the embeddings). Measures in the
//! attention output's units, from the same statistics:
//! - `residual_energy = tr(C_yy − W C_yxᵀ)`: the expected squared error of the map per token,
//!   `E‖y − (W x + b)‖²` (the LMMSE residual);
//! - `stream_energy = E‖x + y‖² = tr(C_zz) + ‖μ_x + μ_y‖²`: the block output it is added into;
//! - `relative_residual = residual_energy / stream_energy`: the share of the stream the
//!   replacement gets wrong (criterion `residual`);
//! - `weighted_bound = bound/d · tr(C_yy) / tr(C_zz)`: the CCA bound weighted by the branch's share
//!   of the block output's variance (criterion `weighted-cca`).

use anyhow::{Result, bail, ensure};
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{LltRegularization, cholesky_in_place, cholesky_in_place_scratch};
use faer::linalg::triangular_solve::{solve_lower_triangular_in_place, solve_upper_triangular_in_place};
use faer::{Mat, MatMut, MatRef, unzip, zip};
use serde::Serialize;

use crate::stats::{Moments, for_each_tiled, transposed};

/// Default ridge: `ε = λ · tr(C) / d`.
pub const DEFAULT_LAMBDA: f64 = 1e-6;

/// What the statistics say about replacing one layer's attention by `y ≈ W x + b`.
#[derive(Clone, Debug, Serialize)]
pub struct LayerFit {
    pub layer: usize,
    /// `d − Σ ρ_i²`: lower is more linear.
    pub bound: f64,
    /// `bound / d`, in [0, 1].
    pub bound_normalized: f64,
    /// `tr(C_yy − W C_yxᵀ) / tr(C_yy)`: the share of attention-output variance the map misses.
    pub fit_residual: f64,
    /// `tr(C_yy − W C_yxᵀ)`: the map's expected squared error per token, `E‖y − (W x + b)‖²`.
    pub residual_energy: f64,
    /// `E‖x + y‖² = tr(C_zz) + ‖μ_x + μ_y‖²`: the energy of the block's output.
    pub stream_energy: f64,
    /// `residual_energy / stream_energy`.
    pub relative_residual: f64,
    /// `bound/d · tr(C_yy) / tr(C_zz)`.
    pub weighted_bound: f64,
    /// Mean `cos(x, x + y)` over the calibration tokens (LLM-Drop's criterion).
    pub cosine: f64,
    /// The ridges added to `C_xx` and `C_zz`.
    pub ridge_x: f64,
    pub ridge_z: f64,
    /// Fewer tokens than dimensions, or a covariance that needed a larger ridge than asked for.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub rank_deficient: bool,
    /// The share of the attention output's variance the map misses on held-out blocks, when the
    /// statistics hold some: `E_h‖y − W x − b‖² / E_h‖y − ȳ_h‖²`, the in-sample `fit_residual`'s
    /// counterpart on text the map was not fitted to (see [`LayerFit::heldout_residual_on`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heldout_residual: Option<f64>,
    /// The canonical correlations, largest first, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rho: Option<Vec<f64>>,
    /// `W` (`d×d`, `y = W x + b`) and `b`.
    #[serde(skip)]
    pub w: Mat<f64>,
    #[serde(skip)]
    pub b: Vec<f64>,
}

/// The ridge used for `C + ε I`, and whether it had to be raised above `λ · tr(C)/d`.
struct Ridge {
    value: f64,
    escalated: bool,
}

/// Overwrites `a` (holding `C`) with the lower Cholesky factor of `C + ε I`, `ε = λ · tr(C)/d`,
/// raising `ε` tenfold until the factorisation succeeds (rank-deficient or dead-dimension
/// statistics): results stay finite and are flagged. A failed attempt leaves `a` spoilt, so
/// `restore` writes `C` into it again before the next.
fn factor_in_place(mut a: MatMut<'_, f64>, lambda: f64, restore: impl Fn(MatMut<'_, f64>)) -> Result<Ridge> {
    let d = a.nrows();
    let trace = trace(a.as_ref());
    if !trace.is_finite() {
        bail!("the covariance has non-finite entries (NaN or Inf in the activations?)");
    }
    let par = faer::get_global_parallelism();
    let scale = if trace > 0.0 { trace / d as f64 } else { 1.0 };
    let mut ridge = lambda * scale;
    let mut scratch = MemBuffer::new(cholesky_in_place_scratch::<f64>(d, par, Default::default()));
    for attempt in 0..16 {
        if attempt > 0 {
            restore(a.as_mut());
        }
        for i in 0..d {
            a[(i, i)] += ridge;
        }
        let factored = cholesky_in_place(
            a.as_mut(),
            LltRegularization::default(),
            par,
            MemStack::new(&mut scratch),
            Default::default(),
        );
        if factored.is_ok() {
            return Ok(Ridge { value: ridge, escalated: attempt > 0 });
        }
        ridge = if ridge > 0.0 { ridge * 10.0 } else { f64::MIN_POSITIVE.sqrt() };
    }
    bail!("the covariance is not positive definite even with a ridge of {ridge:e}")
}

fn trace(m: MatRef<'_, f64>) -> f64 {
    (0..m.nrows()).map(|i| m[(i, i)]).sum()
}

/// Fits one layer from its moments: the CCA bound (and the full spectrum when `spectrum`), the
/// LMMSE map `W = C_yx (C_xx + ε_x I)⁻¹`, `b = μ_y − W μ_x`, and the derived measures.
///
/// The moments' matrices are worked on in place: at d = 4096 each is 128 MiB, and the fit holds
/// four at its peak. Two Cholesky factorisations and four triangular solves cost `4.7 d³` flops,
/// run on faer's global parallelism.
pub fn fit_layer(layer: usize, m: Moments, lambda: f64, spectrum: bool) -> Result<LayerFit> {
    fit(layer, m, lambda, spectrum, true)
}

/// As [`fit_layer`], without the map (`w` and `b` left empty): every measure, one triangular
/// solve fewer (`3.7 d³` flops). What an analysis needs of each layer.
pub fn fit_measures(layer: usize, m: Moments, lambda: f64, spectrum: bool) -> Result<LayerFit> {
    fit(layer, m, lambda, spectrum, false)
}

fn fit(layer: usize, m: Moments, lambda: f64, spectrum: bool, with_map: bool) -> Result<LayerFit> {
    let d = m.dim();
    let par = faer::get_global_parallelism();
    let cosine = m.mean_cosine();
    let rank_deficient = m.count <= d as u64;
    let Moments { count, mean_x, mean_y, sxx: mut c_xx, syx: mut c_yx, syy: mut c_zz, .. } = m;
    // Sample covariances, S / (n − 1); C_zz = C_yy + C_yx + C_yxᵀ + C_xx in the buffer of C_yy.
    let scale = 1.0 / (count.max(2) - 1) as f64;
    for c in [&mut c_xx, &mut c_yx, &mut c_zz] {
        zip!(c.as_mut()).for_each(|unzip!(v)| *v *= scale);
    }
    let var_y = trace(c_zz.as_ref());
    for_each_tiled(d, d, |i, j| c_zz[(i, j)] += c_yx[(i, j)] + c_yx[(j, i)] + c_xx[(i, j)]);
    let var_z = trace(c_zz.as_ref());

    // L_z, factored in a copy of C_zz (kept to start again from if the ridge must grow).
    let mut l_z = c_zz.clone();
    let ridge_z = factor_in_place(l_z.as_mut(), lambda, |mut a| a.copy_from(&c_zz))?;
    // C_zx = C_yx + C_xx, in the buffer of C_zz.
    let mut c_zx = c_zz;
    zip!(c_zx.as_mut(), c_yx.as_ref(), c_xx.as_ref()).for_each(|unzip!(zx, yx, xx)| *zx = *yx + *xx);
    // L_x in place; C_xx = C_zx − C_yx if the ridge must grow.
    let ridge_x = factor_in_place(c_xx.as_mut(), lambda, |mut a| {
        zip!(a.as_mut(), c_zx.as_ref(), c_yx.as_ref()).for_each(|unzip!(xx, zx, yx)| *xx = *zx - *yx)
    })?;
    let l_x = c_xx;

    // M = L_z⁻¹ C_zx L_x⁻ᵀ, whose singular values are the ρ_i, as Mᵀ = L_x⁻¹ (L_z⁻¹ C_zx)ᵀ:
    // triangular solves run 1.6× faster on a column-major right-hand side than on a transposed
    // view, so the transpose is copied (into the memory L_z leaves).
    let mut a = c_zx;
    solve_lower_triangular_in_place(l_z.as_ref(), a.as_mut(), par);
    drop(l_z);
    let mut m_cca = transposed(a.as_ref());
    drop(a);
    solve_lower_triangular_in_place(l_x.as_ref(), m_cca.as_mut(), par);
    let rho_sq_sum = m_cca.norm_l2().powi(2);
    let bound = (d as f64 - rho_sq_sum).max(0.0);
    let rho = if spectrum {
        let mut s = m_cca.singular_values().map_err(|e| anyhow::anyhow!("SVD failed: {e:?}"))?;
        s.sort_by(|a, b| b.total_cmp(a));
        Some(s)
    } else {
        None
    };
    drop(m_cca);

    // (C_xx + ε I) Wᵀ = C_yxᵀ by the two triangular solves. Half-way the right-hand side holds
    // L_x⁻¹ C_yxᵀ, whose squared norm is tr(C_yx (C_xx + ε I)⁻¹ C_yxᵀ) = tr(W C_yxᵀ), the
    // variance the map explains.
    let mut w_t = transposed(c_yx.as_ref());
    drop(c_yx);
    solve_lower_triangular_in_place(l_x.as_ref(), w_t.as_mut(), par);
    let explained = w_t.norm_l2().powi(2);
    let (w, b) = if with_map {
        solve_upper_triangular_in_place(l_x.transpose(), w_t.as_mut(), par);
        drop(l_x);
        let w = transposed(w_t.as_ref());
        drop(w_t);
        let mut b = mean_y.clone();
        for (j, &mx) in mean_x.iter().enumerate() {
            for (bi, &wij) in b.iter_mut().zip(w.col(j).iter()) {
                *bi -= wij * mx;
            }
        }
        (w, b)
    } else {
        (Mat::zeros(0, 0), Vec::new())
    };

    let residual_energy = (var_y - explained).max(0.0);
    let fit_residual = if var_y > 0.0 { residual_energy / var_y } else { 0.0 };
    let mean_z_sq: f64 = mean_x.iter().zip(&mean_y).map(|(a, b)| (a + b) * (a + b)).sum();
    let stream_energy = var_z + mean_z_sq;
    let relative_residual = if stream_energy > 0.0 { residual_energy / stream_energy } else { 0.0 };
    let weighted_bound = if var_z > 0.0 { bound / d as f64 * var_y / var_z } else { 0.0 };

    Ok(LayerFit {
        layer,
        bound,
        bound_normalized: bound / d as f64,
        fit_residual,
        residual_energy,
        stream_energy,
        relative_residual,
        weighted_bound,
        cosine,
        ridge_x: ridge_x.value,
        ridge_z: ridge_z.value,
        rank_deficient: rank_deficient || ridge_x.escalated || ridge_z.escalated,
        heldout_residual: None,
        rho,
        w,
        b,
    })
}

impl LayerFit {
    /// The fit without `W` and `b` (`d² + d` values), for an analysis that keeps every layer's.
    pub fn without_map(mut self) -> LayerFit {
        self.w = Mat::zeros(0, 0);
        self.b = Vec::new();
        self
    }

    /// This map's error on the tokens of `h` (moments it was not fitted to), as a share of their
    /// attention output's variance. With `e = y − W x − b`, over those tokens:
    /// `E‖e‖² = tr(C_yy) − 2 tr(W C_yxᵀ) + tr(W C_xx Wᵀ) + ‖μ_y − W μ_x − b‖²`, over `tr(C_yy)`,
    /// the covariances normalised by the token count.
    pub fn heldout_residual_on(&self, h: &Moments) -> f64 {
        let d = h.dim();
        let n = h.count.max(1) as f64;
        let w = self.w.as_ref();
        let w_sxx = w * &h.sxx;
        let mut energy = 0.0;
        for j in 0..d {
            for i in 0..d {
                energy += h.syy[(i, j)] * f64::from(u8::from(i == j)) - 2.0 * w[(i, j)] * h.syx[(i, j)]
                    + w_sxx[(i, j)] * w[(i, j)];
            }
        }
        let var_y: f64 = (0..d).map(|i| h.syy[(i, i)]).sum::<f64>() / n;
        let bias: f64 = (0..d)
            .map(|i| {
                let e = h.mean_y[i] - (0..d).map(|j| w[(i, j)] * h.mean_x[j]).sum::<f64>() - self.b[i];
                e * e
            })
            .sum();
        let error = (energy / n).max(0.0) + bias;
        if var_y > 0.0 { error / var_y } else { 0.0 }
    }
}

/// How layers are ranked for linearisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
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

/// Layers in the order they should be linearised, best candidate first.
pub fn ranking(fits: &[LayerFit], criterion: Criterion) -> Vec<usize> {
    let mut order: Vec<&LayerFit> = fits.iter().collect();
    match criterion {
        // Measured selection starts from the CCA order (its candidates); the choice is made by
        // running the model (`crate::measured`).
        Criterion::Cca | Criterion::Measured => {
            order.sort_by(|a, b| a.bound.total_cmp(&b.bound).then(a.layer.cmp(&b.layer)))
        }
        Criterion::Cosine => order.sort_by(|a, b| b.cosine.total_cmp(&a.cosine).then(a.layer.cmp(&b.layer))),
        Criterion::Residual => order
            .sort_by(|a, b| a.relative_residual.total_cmp(&b.relative_residual).then(a.layer.cmp(&b.layer))),
        Criterion::WeightedCca => {
            order.sort_by(|a, b| a.weighted_bound.total_cmp(&b.weighted_bound).then(a.layer.cmp(&b.layer)))
        }
    }
    order.iter().map(|f| f.layer).collect()
}

/// The fits of `layers`, in that order.
fn fits_in<'f>(layers: &[usize], fits: &'f [LayerFit]) -> impl Iterator<Item = &'f LayerFit> {
    layers.iter().filter_map(|&l| fits.iter().find(|f| f.layer == l))
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
            Selection::Count(k) if *k > layers => bail!("--layers {k} is more than the {layers} {what}"),
            Selection::Layers(ids) => {
                if let Some(id) = ids.iter().find(|&&id| id >= layers) {
                    bail!(
                        "--layer-ids: layer {id} does not exist (the {what} are 0..{})",
                        layers.saturating_sub(1)
                    );
                }
            }
            Selection::MaxBound(b) if !b.is_finite() || *b < 0.0 => {
                bail!("--max-bound must be a finite number ≥ 0, not {b}")
            }
            _ => {}
        }
        Ok(())
    }
}

/// The layers to linearise, in the order they were chosen: the ranking's best first, or the
/// layers named, in the order named without repeats.
pub fn select(fits: &[LayerFit], criterion: Criterion, selection: &Selection) -> Result<Vec<usize>> {
    if !matches!(selection, Selection::Layers(_)) {
        selection.check(fits.len(), "layers")?;
    }
    let order = ranking(fits, criterion);
    Ok(match selection {
        Selection::Count(k) => order.into_iter().take(*k).collect(),
        Selection::Layers(ids) => {
            let mut chosen = Vec::with_capacity(ids.len());
            for &id in ids {
                ensure!(
                    fits.iter().any(|f| f.layer == id),
                    "--layer-ids: layer {id} does not exist (the statistics hold layers {})",
                    order.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(", ")
                );
                if !chosen.contains(&id) {
                    chosen.push(id);
                }
            }
            chosen
        }
        Selection::MaxBound(max) => {
            fits_in(&order, fits).filter(|f| f.bound_normalized <= *max).map(|f| f.layer).collect()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fit(layer: usize, bound: f64) -> LayerFit {
        LayerFit {
            layer,
            bound,
            bound_normalized: bound / 10.0,
            fit_residual: 0.0,
            residual_energy: 0.0,
            stream_energy: 0.0,
            relative_residual: 0.0,
            weighted_bound: 0.0,
            cosine: 0.0,
            ridge_x: 0.0,
            ridge_z: 0.0,
            rank_deficient: false,
            heldout_residual: None,
            rho: None,
            w: Mat::zeros(0, 0),
            b: Vec::new(),
        }
    }

    fn fits() -> Vec<LayerFit> {
        [5.0, 1.0, 3.0, 2.0, 4.0].iter().enumerate().map(|(l, &b)| fit(l, b)).collect()
    }

    #[test]
    fn named_layers_are_selected_exactly_once_each() {
        let select_ids =
            |ids: &[usize]| select(&fits(), Criterion::Cca, &Selection::Layers(ids.to_vec())).unwrap();
        assert_eq!(select_ids(&[3, 1, 3]), [3, 1]);
        assert_eq!(select_ids(&[1, 0]), [1, 0]);
        assert_eq!(select_ids(&[4, 4, 4]), [4]);
        let err = select(&fits(), Criterion::Cca, &Selection::Layers(vec![2, 5])).unwrap_err().to_string();
        assert!(err.contains("layer 5 does not exist"), "{err}");
    }

    #[test]
    fn counts_and_bounds_follow_the_ranking() {
        assert_eq!(select(&fits(), Criterion::Cca, &Selection::Count(3)).unwrap(), [1, 3, 2]);
        assert_eq!(select(&fits(), Criterion::Cca, &Selection::MaxBound(0.3)).unwrap(), [1, 3, 2]);
        assert!(select(&fits(), Criterion::Cca, &Selection::Count(6)).is_err());
        assert!(select(&fits(), Criterion::Cca, &Selection::MaxBound(f64::NAN)).is_err());
    }
}
