//! Group-wise integer quantisation of a linear map `y = W x` (`W` is `N×K`: `N` outputs, `K`
//! inputs) into the layout of `com.microsoft::MatMulNBits`: per output row, groups of
//! `group_size` inputs share one scale; values are unsigned `bits`-bit integers `q` with the
//! default zero point `2^(bits−1)`, so `w = (q − 2^(bits−1)) · scale`, packed low bits first.
//!
//! Two quantisers:
//! - round-to-nearest (RTN): each weight on its own;
//! - GPTQ (Frantar et al., 2022): the columns in order, each quantisation error spread over the
//!   columns not yet quantised through the Cholesky factor of `H⁻¹`, which minimises
//!   `E‖(W − Q) x‖²` for `H = E[x xᵀ] = C_xx + μ μᵀ`: exactly what the calibration statistics hold.

use anyhow::{Context, Result, ensure};
use faer::linalg::matmul::matmul;
use faer::linalg::triangular_inverse::invert_lower_triangular;
use faer::{Accum, Mat};

use crate::nbl::{cholesky_with_ridge, ridge_scale};

/// How weights are rounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Quantizer {
    /// GPTQ with the calibration second moments (error feedback through H⁻¹)
    Gptq,
    /// Round to nearest, each weight on its own
    Rtn,
}

/// A quantised `N×K` matrix in `MatMulNBits` layout.
#[derive(Clone, Debug)]
pub struct Quantized {
    pub bits: u32,
    pub group_size: usize,
    pub n: usize,
    pub k: usize,
    /// `[N, groups, group_size · bits / 8]` bytes.
    pub packed: Vec<u8>,
    /// `[N, groups]`.
    pub scales: Vec<f32>,
}

impl Quantized {
    pub fn groups(&self) -> usize {
        self.k.div_ceil(self.group_size)
    }

    fn offset(&self) -> i32 {
        1 << (self.bits - 1)
    }

    /// The integer at row `n`, input `k`.
    fn q(&self, n: usize, k: usize) -> u8 {
        let per_byte = 8 / self.bits as usize;
        let blob = self.group_size / per_byte;
        let (group, within) = (k / self.group_size, k % self.group_size);
        let byte = self.packed[(n * self.groups() + group) * blob + within / per_byte];
        let shift = (within % per_byte) * self.bits as usize;
        (byte >> shift) & ((1u16 << self.bits) - 1) as u8
    }

    /// The integer at row `n`, input `k`, as the signed value it stands for (`q − 2^(bits−1)`).
    pub fn signed(&self, n: usize, k: usize) -> i8 {
        (i32::from(self.q(n, k)) - self.offset()) as i8
    }

    /// The `N×K` matrix the integers and scales stand for.
    pub fn dequantize(&self) -> Mat<f64> {
        Mat::from_fn(self.n, self.k, |n, k| {
            let scale = f64::from(self.scales[n * self.groups() + k / self.group_size]);
            f64::from(i32::from(self.q(n, k)) - self.offset()) * scale
        })
    }
}

/// Quantises `w` (`N×K`) to `bits` ∈ {4, 8} in groups of `group_size` inputs: a power of two of
/// at least 16 (`MatMulNBits`), or `K` itself, one scale per output row (per channel, as a
/// `DequantizeLinear` along the outputs reads it). GPTQ needs the second moment `h = E[x xᵀ]`
/// (`K×K`) of the inputs.
pub fn quantize(
    w: Mat<f64>,
    bits: u32,
    group_size: usize,
    quantizer: Quantizer,
    h: Option<Mat<f64>>,
) -> Result<Quantized> {
    let (n, k) = (w.nrows(), w.ncols());
    ensure!(bits == 4 || bits == 8, "MatMulNBits weights have 4 or 8 bits, not {bits}");
    ensure!(
        (group_size >= 16 && group_size.is_power_of_two()) || group_size == k,
        "group size {group_size} is neither a power of two ≥ 16 nor the whole input width {k}"
    );
    ensure!(
        k.is_multiple_of(group_size),
        "the input width {k} is not a multiple of the group size {group_size}"
    );
    let groups = k / group_size;
    let max_q = (1i32 << bits) - 1;
    let offset = 1i32 << (bits - 1);
    let mut q = vec![0u8; n * k];
    let mut scales = vec![0f32; n * groups];
    // The scale of one row's group, symmetric: the largest magnitude maps to the largest positive code.
    let group_scale = |values: &mut dyn Iterator<Item = f64>| -> f32 {
        let amax = values.fold(0f64, |m, v| m.max(v.abs()));
        if amax > 0.0 { (amax / f64::from(offset - 1)) as f32 } else { 1.0 }
    };
    let round =
        |v: f64, scale: f32| -> u8 { ((v / f64::from(scale)).round() as i32 + offset).clamp(0, max_q) as u8 };
    let value = |code: u8, scale: f32| f64::from(i32::from(code) - offset) * f64::from(scale);
    match quantizer {
        Quantizer::Rtn => {
            for r in 0..n {
                for b in 0..groups {
                    let cols = b * group_size..(b + 1) * group_size;
                    let scale = group_scale(&mut cols.clone().map(|c| w[(r, c)]));
                    scales[r * groups + b] = scale;
                    for c in cols {
                        q[r * k + c] = round(w[(r, c)], scale);
                    }
                }
            }
        }
        Quantizer::Gptq => {
            let h = h.context("GPTQ needs the inputs' second moments")?;
            ensure!(h.nrows() == k && h.ncols() == k, "the second moments are not {k}×{k}");
            let u = inverse_cholesky_upper(h)?;
            let mut w = w;
            // GPTQ's lazy batches: a column's error goes to the rest of its group at once, and a
            // group's errors to the columns after it in one product (the same arithmetic as
            // column by column, in an order that reads memory contiguously).
            let mut err = Mat::<f64>::zeros(n, group_size);
            for b in 0..groups {
                let (start, end) = (b * group_size, (b + 1) * group_size);
                // Scales from the weights as the earlier groups' errors left them.
                for r in 0..n {
                    scales[r * groups + b] = group_scale(&mut (start..end).map(|cc| w[(r, cc)]));
                }
                for c in start..end {
                    for r in 0..n {
                        let scale = scales[r * groups + b];
                        let code = round(w[(r, c)], scale);
                        q[r * k + c] = code;
                        err[(r, c - start)] = (w[(r, c)] - value(code, scale)) / u[(c, c)];
                    }
                    for cc in c + 1..end {
                        let factor = u[(c, cc)];
                        for r in 0..n {
                            w[(r, cc)] -= err[(r, c - start)] * factor;
                        }
                    }
                }
                if end < k {
                    matmul(
                        w.as_mut().subcols_mut(end, k - end),
                        Accum::Add,
                        err.as_ref(),
                        u.as_ref().submatrix(start, end, group_size, k - end),
                        -1.0,
                        faer::get_global_parallelism(),
                    );
                }
            }
        }
    }
    let per_byte = 8 / bits as usize;
    let mut packed = vec![0u8; n * k / per_byte];
    for (i, &code) in q.iter().enumerate() {
        packed[i / per_byte] |= code << ((i % per_byte) * bits as usize);
    }
    Ok(Quantized { bits, group_size, n, k, packed, scales })
}

/// The upper Cholesky factor `U` of `(H + δ I)⁻¹ = Uᵀ U`, with GPTQ's damping `δ = 1%` of the mean
/// diagonal (inputs that never vary make `H` singular).
///
/// With `J` the order-reversing permutation and `J (H + δ I) J = L Lᵀ`, `H + δ I = (J L J)(J L J)ᵀ`
/// where `J L J` is upper triangular, so `U = (J L J)⁻¹ = J L⁻¹ J`: one Cholesky factorisation and
/// one triangular inverse (`2k³/3` flops), and `H`'s buffer reused, instead of forming `(H + δ I)⁻¹`
/// and factoring it again.
fn inverse_cholesky_upper(mut h: Mat<f64>) -> Result<Mat<f64>> {
    let k = h.nrows();
    let damp = 0.01 * ridge_scale(h.as_ref());
    // J (H + δ I) J = J H J + δ I.
    reverse_in_place(h.as_mut());
    ensure!(cholesky_with_ridge(h.as_mut(), damp), "the inputs' second moments are not positive definite");
    let mut u = Mat::<f64>::zeros(k, k);
    invert_lower_triangular(u.as_mut(), h.as_ref(), faer::get_global_parallelism());
    drop(h);
    reverse_in_place(u.as_mut());
    Ok(u)
}

/// `A ← J A J`: rows and columns in reverse order (a half turn of the square). Cell `p` in
/// column-major order trades places with cell `k² − 1 − p`.
fn reverse_in_place(mut a: faer::MatMut<'_, f64>) {
    let k = a.nrows();
    for p in 0..k * k / 2 {
        let (i, j) = (p % k, p / k);
        let v = a[(i, j)];
        a[(i, j)] = a[(k - 1 - i, k - 1 - j)];
        a[(k - 1 - i, k - 1 - j)] = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A seeded standard-normal sequence (SplitMix64 + Box–Muller).
    fn normals(seed: u64, count: usize) -> Vec<f64> {
        let mut state = seed;
        let mut uniform = move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64 + 1e-12
        };
        (0..count)
            .map(|_| (-2.0 * uniform().ln()).sqrt() * (2.0 * std::f64::consts::PI * uniform()).cos())
            .collect()
    }

    /// Inputs with correlated, unequal dimensions (the case GPTQ exists for), their second moment,
    /// and a weight matrix.
    fn problem(n: usize, k: usize, tokens: usize) -> (Mat<f64>, Mat<f64>) {
        let z = normals(1, tokens * k);
        let mix = normals(2, k * k);
        let x = Mat::from_fn(tokens, k, |t, i| {
            (0..k).map(|j| z[t * k + j] * mix[j * k + i] * if j < 4 { 3.0 } else { 0.3 }).sum::<f64>()
        });
        let h = Mat::from_fn(k, k, |i, j| {
            (0..tokens).map(|t| x[(t, i)] * x[(t, j)]).sum::<f64>() / tokens as f64
        });
        let w_values = normals(3, n * k);
        (Mat::from_fn(n, k, |r, c| w_values[r * k + c]), h)
    }

    /// `E‖(W − Q) x‖² = tr((W − Q) H (W − Q)ᵀ)`.
    fn output_error(w: &Mat<f64>, q: &Mat<f64>, h: &Mat<f64>) -> f64 {
        let e = w - q;
        let eh = &e * h;
        (0..e.nrows()).map(|r| (0..e.ncols()).map(|c| eh[(r, c)] * e[(r, c)]).sum::<f64>()).sum()
    }

    #[test]
    fn round_to_nearest_is_within_half_a_step_of_every_weight() {
        let (w, _) = problem(8, 64, 16);
        for bits in [4, 8] {
            let q = quantize(w.clone(), bits, 32, Quantizer::Rtn, None).unwrap();
            assert_eq!(q.packed.len(), 8 * 64 * bits as usize / 8);
            let back = q.dequantize();
            for r in 0..8 {
                for c in 0..64 {
                    let step = f64::from(q.scales[r * 2 + c / 32]);
                    assert!((w[(r, c)] - back[(r, c)]).abs() <= step / 2.0 + 1e-6, "bits {bits} ({r}, {c})");
                }
            }
        }
    }

    #[test]
    fn gptq_errs_less_than_round_to_nearest_on_the_outputs() {
        let (w, h) = problem(16, 64, 512);
        let rtn = quantize(w.clone(), 4, 32, Quantizer::Rtn, None).unwrap().dequantize();
        let gptq = quantize(w.clone(), 4, 32, Quantizer::Gptq, Some(h.clone())).unwrap().dequantize();
        let (e_rtn, e_gptq) = (output_error(&w, &rtn, &h), output_error(&w, &gptq, &h));
        assert!(e_gptq < 0.8 * e_rtn, "GPTQ {e_gptq} vs RTN {e_rtn}");
    }

    /// GPTQ as the paper states it, column by column, each error sent to every later column at
    /// once: the lazy batches must give the same codes.
    #[test]
    fn lazy_batches_give_the_codes_of_column_by_column_gptq() {
        let (w, h) = problem(24, 128, 512);
        let (n, k, group) = (24, 128, 32);
        let fast = quantize(w.clone(), 4, group, Quantizer::Gptq, Some(h.clone())).unwrap();
        let u = inverse_cholesky_upper(h).unwrap();
        let mut w = w.clone();
        let mut scales = vec![0f64; n];
        let mut same = 0;
        for c in 0..k {
            if c % group == 0 {
                for (r, scale) in scales.iter_mut().enumerate() {
                    let amax = (c..c + group).map(|cc| w[(r, cc)].abs()).fold(0.0, f64::max);
                    *scale = f64::from((amax / 7.0) as f32);
                }
            }
            for r in 0..n {
                let code = ((w[(r, c)] / scales[r]).round() as i32 + 8).clamp(0, 15);
                same += usize::from(code == i32::from(fast.q(r, c)));
                let err = (w[(r, c)] - f64::from(code - 8) * scales[r]) / u[(c, c)];
                for cc in c + 1..k {
                    w[(r, cc)] -= err * u[(c, cc)];
                }
            }
        }
        // Summation order differs; a code may flip where a value sits on a rounding boundary.
        assert!(same as f64 >= 0.999 * (n * k) as f64, "{same} of {} codes agree", n * k);
    }

    #[test]
    fn widths_that_do_not_fill_blocks_are_refused() {
        let (w, _) = problem(4, 48, 4);
        let err = quantize(w, 4, 32, Quantizer::Rtn, None).unwrap_err().to_string();
        assert!(err.contains("not a multiple of the group size 32"), "{err}");
    }

    /// `Uᵀ U (H + δ I) = I`, and `U` is upper triangular with a positive diagonal (so it is the
    /// Cholesky factor, which is unique), for sizes on both sides of faer's blocking.
    #[test]
    fn the_inverse_factor_inverts_the_damped_second_moment() {
        for k in [5, 64, 200] {
            let (_, h) = problem(1, k, 2 * k);
            let damp = 0.01 * (0..k).map(|i| h[(i, i)]).sum::<f64>() / k as f64;
            let u = inverse_cholesky_upper(h.clone()).unwrap();
            let damped = Mat::from_fn(k, k, |i, j| h[(i, j)] + if i == j { damp } else { 0.0 });
            let product = u.transpose() * &u * &damped;
            for j in 0..k {
                assert!(u[(j, j)] > 0.0, "k = {k}: U[{j},{j}] = {}", u[(j, j)]);
                for i in 0..k {
                    let expected = if i == j { 1.0 } else { 0.0 };
                    assert!(
                        (product[(i, j)] - expected).abs() < 1e-9,
                        "k = {k}: ({i}, {j}) = {}",
                        product[(i, j)]
                    );
                    if i > j {
                        assert_eq!(u[(i, j)], 0.0, "k = {k}: U is not upper triangular at ({i}, {j})");
                    }
                }
            }
        }
    }
}
