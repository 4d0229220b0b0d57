//! Streaming moments of one attention site's input `x` and output `y`: means and centred
//! cross-products in f64, merged across batches and shards with the pairwise update of Chan et al.
//! Activations are never stored: each batch goes straight in.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use serde::Serialize;

/// The type each batch's centred cross-products are multiplied in. The means, the sums across
/// batches and their merge are f64 whatever it is: a batch is centred on its own mean first, so
/// its products are of small, well-scaled numbers, and the f32 error stays near
/// `ε_f32 · √(batch tokens)` relative, far below what the fit and the bounds resolve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MomentPrecision {
    /// f32: tensor cores on CUDA and TensorRT, and measured faster than f64 on the CPU too
    Auto,
    /// every product in f64
    F64,
    /// each batch's products in f32, merged in f64
    F32,
}

/// Moments of one layer over `count` tokens (all `d×d` matrices in f64):
/// `mean_x = Σx/n`, `sxx = Σ(x-μx)(x-μx)ᵀ`, `syx = Σ(y-μy)(x-μx)ᵀ`, `syy = Σ(y-μy)(y-μy)ᵀ`,
/// and `cos_sum = Σ cos(x, x+y)` (the LLM-Drop criterion).
#[derive(Clone, Debug)]
pub struct Moments {
    pub count: u64,
    pub mean_x: Vec<f64>,
    pub mean_y: Vec<f64>,
    pub sxx: Mat<f64>,
    pub syx: Mat<f64>,
    pub syy: Mat<f64>,
    pub cos_sum: f64,
}

impl Moments {
    pub fn new(d: usize) -> Moments {
        Moments {
            count: 0,
            mean_x: vec![0.0; d],
            mean_y: vec![0.0; d],
            sxx: Mat::zeros(d, d),
            syx: Mat::zeros(d, d),
            syy: Mat::zeros(d, d),
            cos_sum: 0.0,
        }
    }

    pub fn dim(&self) -> usize {
        self.mean_x.len()
    }

    /// Whether every mean, cross-product and the cosine sum is finite.
    pub fn is_finite(&self) -> bool {
        let finite = |m: &Mat<f64>| (0..m.ncols()).all(|j| m.col(j).iter().all(|v| v.is_finite()));
        self.mean_x.iter().chain(&self.mean_y).all(|v| v.is_finite())
            && finite(&self.sxx)
            && finite(&self.syx)
            && finite(&self.syy)
            && self.cos_sum.is_finite()
    }

    /// Adds a batch of tokens: `x` and `y` are `n×d`, row-major. The batch is centred on its own
    /// mean (in f64) before its cross-products are formed, then merged (Chan et al.), so that large
    /// common offsets (massive activations) do not cancel catastrophically.
    pub fn add_batch(&mut self, x: &[f32], y: &[f32]) {
        self.add_batch_in(MomentPrecision::F64, x, y);
    }

    /// [`Moments::add_batch`], the batch's products formed in `precision` (`Auto` counts as f64).
    pub fn add_batch_in(&mut self, precision: MomentPrecision, x: &[f32], y: &[f32]) {
        let d = self.dim();
        assert!(x.len() == y.len() && x.len().is_multiple_of(d), "x and y must both be n×{d}");
        let n = x.len() / d;
        if n == 0 {
            return;
        }
        let column_mean = |v: &[f32]| {
            let mut mean = vec![0.0f64; d];
            for row in v.chunks_exact(d) {
                for (m, &e) in mean.iter_mut().zip(row) {
                    *m += f64::from(e);
                }
            }
            mean.iter_mut().for_each(|m| *m /= n as f64);
            mean
        };
        let mean_x = column_mean(x);
        let mean_y = column_mean(y);
        let cos_sum: f64 =
            x.chunks_exact(d).zip(y.chunks_exact(d)).map(|(xt, yt)| cosine_with_sum(xt, yt)).sum();
        match precision {
            MomentPrecision::F64 | MomentPrecision::Auto => {
                let xc = Mat::from_fn(n, d, |t, j| f64::from(x[t * d + j]) - mean_x[j]);
                let yc = Mat::from_fn(n, d, |t, j| f64::from(y[t * d + j]) - mean_y[j]);
                add_gram(self.sxx.as_mut(), xc.as_ref());
                matmul(self.syx.as_mut(), Accum::Add, yc.transpose(), xc.as_ref(), 1.0, Par::Seq);
                add_gram(self.syy.as_mut(), yc.as_ref());
            }
            MomentPrecision::F32 => {
                let xc = Mat::from_fn(n, d, |t, j| (f64::from(x[t * d + j]) - mean_x[j]) as f32);
                let yc = Mat::from_fn(n, d, |t, j| (f64::from(y[t * d + j]) - mean_y[j]) as f32);
                let mut batch = Mat::<f32>::zeros(d, d);
                add_gram(batch.as_mut(), xc.as_ref());
                add_widened(&mut self.sxx, &batch);
                batch.fill(0.0);
                matmul(batch.as_mut(), Accum::Add, yc.transpose(), xc.as_ref(), 1.0, Par::Seq);
                add_widened(&mut self.syx, &batch);
                batch.fill(0.0);
                add_gram(batch.as_mut(), yc.as_ref());
                add_widened(&mut self.syy, &batch);
            }
        }
        self.absorb(n as u64, &mean_x, &mean_y, cos_sum);
    }

    /// Merges the moments of a disjoint set of tokens:
    /// `S = S_a + S_b + δ δᵀ · n_a n_b / n` with `δ = μ_b − μ_a`.
    pub fn merge(&mut self, other: &Moments) {
        assert_eq!(self.dim(), other.dim());
        if other.count == 0 {
            return;
        }
        self.sxx += &other.sxx;
        self.syx += &other.syx;
        self.syy += &other.syy;
        self.absorb(other.count, &other.mean_x, &other.mean_y, other.cos_sum);
    }

    /// Counts in `n` more tokens with means `mean_x`, `mean_y`, whose own centred cross-products
    /// were just added: corrects the cross-products for the shift of the mean
    /// (`δ δᵀ · n_a n_b / n`), then updates the means, the count and the cosine sum.
    fn absorb(&mut self, n: u64, mean_x: &[f64], mean_y: &[f64], cos_sum: f64) {
        let (na, nb) = (self.count as f64, n as f64);
        let total = na + nb;
        let delta_x: Vec<f64> = mean_x.iter().zip(&self.mean_x).map(|(b, a)| b - a).collect();
        let delta_y: Vec<f64> = mean_y.iter().zip(&self.mean_y).map(|(b, a)| b - a).collect();
        self.add_mean_correction(&delta_x, &delta_y, na * nb / total);
        for (m, dlt) in self.mean_x.iter_mut().zip(&delta_x) {
            *m += dlt * nb / total;
        }
        for (m, dlt) in self.mean_y.iter_mut().zip(&delta_y) {
            *m += dlt * nb / total;
        }
        self.count += n;
        self.cos_sum += cos_sum;
    }

    fn add_mean_correction(&mut self, delta_x: &[f64], delta_y: &[f64], weight: f64) {
        if weight == 0.0 {
            return;
        }
        let d = self.dim();
        for j in 0..d {
            let wx = delta_x[j] * weight;
            for (i, dy) in delta_y.iter().enumerate() {
                self.syx[(i, j)] += dy * wx;
            }
            // The symmetric ones get one value per pair, so that they stay exactly symmetric (the
            // file stores their upper triangles).
            for i in 0..=j {
                let (xx, yy) = (delta_x[i] * wx, delta_y[i] * delta_y[j] * weight);
                self.sxx[(i, j)] += xx;
                self.syy[(i, j)] += yy;
                if i != j {
                    self.sxx[(j, i)] += xx;
                    self.syy[(j, i)] += yy;
                }
            }
        }
    }

    /// Sample covariances `C = S / (n − 1)`: (`C_xx`, `C_yx`, `C_yy`).
    pub fn covariances(&self) -> (Mat<f64>, Mat<f64>, Mat<f64>) {
        let scale = 1.0 / (self.count.max(2) - 1) as f64;
        (scaled(self.sxx.as_ref(), scale), scaled(self.syx.as_ref(), scale), scaled(self.syy.as_ref(), scale))
    }

    /// The input's second moment `E[x xᵀ] = C_xx + μ_x μ_xᵀ` (what GPTQ weighs errors by).
    pub fn second_moment_x(&self) -> Mat<f64> {
        let scale = 1.0 / (self.count.max(2) - 1) as f64;
        let d = self.dim();
        Mat::from_fn(d, d, |i, j| self.sxx[(i, j)] * scale + self.mean_x[i] * self.mean_x[j])
    }

    /// Mean cosine similarity of a layer's attention input and output, `cos(x, x + y)`.
    pub fn mean_cosine(&self) -> f64 {
        if self.count == 0 { f64::NAN } else { self.cos_sum / self.count as f64 }
    }
}

/// `total += batch`, the f32 batch widened to f64.
fn add_widened(total: &mut Mat<f64>, batch: &Mat<f32>) {
    for j in 0..total.ncols() {
        for (t, &b) in total.col_mut(j).iter_mut().zip(batch.col(j).iter()) {
            *t += f64::from(b);
        }
    }
}

/// `S += AᵀA` for symmetric `S`: only the lower triangle is multiplied (half a GEMM's work, the
/// bulk of calibration's own cost), then mirrored to the upper.
fn add_gram<T: faer::traits::ComplexField + Copy>(mut s: faer::MatMut<'_, T>, a: MatRef<'_, T>) {
    use faer::linalg::matmul::triangular::{BlockStructure, matmul as triangular_matmul};
    let rect = BlockStructure::Rectangular;
    triangular_matmul(
        s.as_mut(),
        BlockStructure::TriangularLower,
        Accum::Add,
        a.transpose(),
        rect,
        a,
        rect,
        T::one_impl(),
        Par::Seq,
    );
    for j in 0..s.ncols() {
        for i in 0..j {
            s[(i, j)] = s[(j, i)];
        }
    }
}

fn scaled(m: MatRef<'_, f64>, s: f64) -> Mat<f64> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] * s)
}

/// `cos(x, x + y)` in f64; 0 for a zero vector.
fn cosine_with_sum(x: &[f32], y: &[f32]) -> f64 {
    let (mut xz, mut xx, mut zz) = (0.0f64, 0.0f64, 0.0f64);
    for (&a, &b) in x.iter().zip(y) {
        let (a, z) = (f64::from(a), f64::from(a) + f64::from(b));
        xz += a * z;
        xx += a * a;
        zz += z * z;
    }
    let norms = (xx * zz).sqrt();
    if norms > 0.0 { xz / norms } else { 0.0 }
}

/// Calls `f(i, j)` for every cell of an `rows×cols` matrix, in square tiles, so that a loop that
/// reads a matrix and its transpose together touches few cache lines at a time (at d = 4096 a
/// plain loop over a transpose is five times slower).
pub(crate) fn for_each_tiled(rows: usize, cols: usize, mut f: impl FnMut(usize, usize)) {
    const TILE: usize = 32;
    for j0 in (0..cols).step_by(TILE) {
        for i0 in (0..rows).step_by(TILE) {
            for j in j0..(j0 + TILE).min(cols) {
                for i in i0..(i0 + TILE).min(rows) {
                    f(i, j);
                }
            }
        }
    }
}

/// `m` transposed, in a new column-major matrix.
pub(crate) fn transposed(m: MatRef<'_, f64>) -> Mat<f64> {
    let mut t = Mat::zeros(m.ncols(), m.nrows());
    for_each_tiled(m.nrows(), m.ncols(), |i, j| t[(j, i)] = m[(i, j)]);
    t
}
