//! The math of Neural Block Linearization, in f64: the CCA bound that ranks layers, the LMMSE map
//! that replaces a layer's attention, and the ridged Cholesky factorisation both rest on.
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

use anyhow::{Result, bail};
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{LltRegularization, cholesky_in_place, cholesky_in_place_scratch};
use faer::linalg::triangular_solve::{solve_lower_triangular_in_place, solve_upper_triangular_in_place};
use faer::{Mat, MatMut, MatRef, unzip, zip};
use serde::Serialize;

use crate::stats::{Moments, for_each_tiled, transposed};

/// Default ridge: `C + λ · diag(C)` (see [`ridge_diagonal`]).
pub const DEFAULT_LAMBDA: f64 = 1e-6;

/// Dimensions with less variance than this share of the mean are ridged as if they had this much:
/// a dead dimension (variance 0) still gets a ridge.
const RIDGE_FLOOR: f64 = 1e-6;

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
    /// The ridges `λ` applied to `C_xx` and `C_zz` (`C + λ · diag(C)`): the one asked for, or
    /// larger where the factorisation needed it.
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

/// The ridge `λ` used for `C + λ · diag(C)`, and whether it had to be raised above the one asked for.
struct Ridge {
    lambda: f64,
    escalated: bool,
}

/// The diagonal of `C` a ridge `λ` is a share of: `max(C_ii, 10⁻⁶ · tr(C)/d)`.
///
/// A ridge in the standardised basis (`C + λ diag(C)`, the correlation matrix's `R + λ I`) moves
/// every dimension by the same share of its own variance. A scalar ridge `λ · tr(C)/d` is set by
/// the largest dimensions: where a few carry massive activations (10⁴ times the rest), it swamps
/// the others and moves a well-conditioned layer's bound (by up to 1.3% on SmolLM2's middle
/// layers at λ = 10⁻⁶); this one leaves it where λ = 0 puts it.
pub fn ridge_diagonal(c: MatRef<'_, f64>) -> Vec<f64> {
    let floor = RIDGE_FLOOR * ridge_scale(c);
    (0..c.nrows()).map(|i| c[(i, i)].max(floor)).collect()
}

/// Overwrites `a` (holding `C`) with the lower Cholesky factor of `C + λ · diag(C)` (see
/// [`ridge_diagonal`]), raising `λ` tenfold until the factorisation succeeds (rank-deficient or
/// dead-dimension statistics): results stay finite and are flagged. A failed attempt leaves `a`
/// spoilt, so `restore` writes `C` into it again before the next.
fn factor_in_place(mut a: MatMut<'_, f64>, lambda: f64, restore: impl Fn(MatMut<'_, f64>)) -> Result<Ridge> {
    if !trace(a.as_ref()).is_finite() {
        bail!("the covariance has non-finite entries (NaN or Inf in the activations?)");
    }
    let diagonal = ridge_diagonal(a.as_ref());
    let mut lambda = lambda;
    for attempt in 0..16 {
        if attempt > 0 {
            restore(a.as_mut());
        }
        for (i, c) in diagonal.iter().enumerate() {
            a[(i, i)] += lambda * c;
        }
        if cholesky_with_ridge(a.as_mut(), 0.0) {
            return Ok(Ridge { lambda, escalated: attempt > 0 });
        }
        lambda = if lambda > 0.0 { lambda * 10.0 } else { 1e-12 };
    }
    bail!("the covariance is not positive definite even with a ridge of λ = {lambda:e}")
}

/// The scale a ridge is given in: the mean diagonal `tr(C)/d`, or 1 where that is not positive.
pub fn ridge_scale(c: MatRef<'_, f64>) -> f64 {
    let mean = trace(c) / c.nrows().max(1) as f64;
    if mean > 0.0 { mean } else { 1.0 }
}

/// Overwrites `a` (holding a symmetric `C`) with the lower Cholesky factor `L` of
/// `C + ridge · I = L Lᵀ`, on faer's global parallelism. `false` when `C + ridge · I` is not
/// positive definite; `a` is then spoilt.
pub fn cholesky_with_ridge(mut a: MatMut<'_, f64>, ridge: f64) -> bool {
    let d = a.nrows();
    for i in 0..d {
        a[(i, i)] += ridge;
    }
    let par = faer::get_global_parallelism();
    let mut scratch = MemBuffer::new(cholesky_in_place_scratch::<f64>(d, par, Default::default()));
    cholesky_in_place(a, LltRegularization::default(), par, MemStack::new(&mut scratch), Default::default())
        .is_ok()
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
        ridge_x: ridge_x.lambda,
        ridge_z: ridge_z.lambda,
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
