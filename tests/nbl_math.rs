//! The NBL math against independent computations: analytic canonical correlations, an SVD of the
//! whitened cross-covariance, and direct least squares. Tolerances are stated with each test.

mod common;

use common::Gaussian;
use faer::linalg::solvers::{DenseSolveCore, Solve, SolveLstsq};
use faer::{Mat, MatRef, Side};
use nbl_onnx::nbl::{fit_layer, fit_measures};
use nbl_onnx::select::{Ranking, ranking};
use nbl_onnx::stats::Moments;

/// `a · b` for row-major slices viewed as faer matrices.
fn mat(rows: usize, cols: usize, v: &[f64]) -> Mat<f64> {
    Mat::from_fn(rows, cols, |i, j| v[i * cols + j])
}

/// Rows of `m` (n×d, faer) as a row-major f32 vector, the layout engines hand over.
fn rows_f32(m: MatRef<'_, f64>) -> Vec<f32> {
    let mut out = Vec::with_capacity(m.nrows() * m.ncols());
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            out.push(m[(i, j)] as f32);
        }
    }
    out
}

/// Moments whose covariances are exactly the given population ones (n large, zero means).
fn exact_moments(c_xx: &Mat<f64>, c_yx: &Mat<f64>, c_yy: &Mat<f64>) -> Moments {
    let d = c_xx.nrows();
    let n: u64 = 1_000_001;
    let s = (n - 1) as f64;
    let mut m = Moments::new(d);
    m.count = n;
    m.sxx = Mat::from_fn(d, d, |i, j| c_xx[(i, j)] * s);
    m.syx = Mat::from_fn(d, d, |i, j| c_yx[(i, j)] * s);
    m.syy = Mat::from_fn(d, d, |i, j| c_yy[(i, j)] * s);
    m
}

/// `x = A u`, `z = B v` with `Cov(u) = Cov(v) = I`, `Cov(v, u) = diag(ρ)`: the canonical
/// correlations of x and z are exactly `ρ`, whatever the invertible A and B.
#[test]
fn bound_equals_the_analytic_value_for_known_canonical_correlations() {
    let d = 12;
    let rho: Vec<f64> = (0..d).map(|i| 0.99 - 0.08 * i as f64).collect();
    let mut g = Gaussian::new(7);
    let a = mat(d, d, &g.matrix(d, d));
    let b = mat(d, d, &g.matrix(d, d));
    let r = Mat::from_fn(d, d, |i, j| if i == j { rho[i] } else { 0.0 });
    let c_xx = &a * a.transpose();
    let c_zz = &b * b.transpose();
    let c_zx = &b * &r * a.transpose();
    let c_yx = &c_zx - &c_xx;
    let c_yy = &c_zz - &c_zx - c_zx.transpose() + &c_xx;

    let fit = fit_layer(0, exact_moments(&c_xx, &c_yx, &c_yy), 1e-12, true).unwrap();
    let analytic: f64 = rho.iter().map(|r| 1.0 - r * r).sum();
    // Only the 1e-12 ridge and f64 rounding separate them.
    assert!((fit.bound - analytic).abs() < 1e-6, "bound {} vs analytic {analytic}", fit.bound);
    let spectrum = fit.rho.unwrap();
    for (got, want) in spectrum.iter().zip(&rho) {
        assert!((got - want).abs() < 1e-6, "rho {got} vs {want}");
    }
    assert!(!fit.rank_deficient);
}

/// The Cholesky route gives the same Σρ² as the SVD of `C_zz^-½ C_zx C_xx^-½` built with
/// eigendecompositions, on sampled data with correlated, unequally scaled features.
#[test]
fn cholesky_bound_matches_the_svd_of_the_whitened_cross_covariance() {
    let (d, n) = (16, 4000);
    let mut g = Gaussian::new(11);
    let mix = mat(d, d, &g.matrix(d, d));
    let x = &mat(n, d, &g.matrix(n, d)) * &mix;
    let w0 = mat(d, d, &g.matrix(d, d)) * 0.3;
    let noise = mat(n, d, &g.matrix(n, d));
    let y = &x * w0.transpose() + noise;
    let mut m = Moments::new(d);
    m.add_batch(&rows_f32(x.as_ref()), &rows_f32(y.as_ref()));
    let fit = fit_layer(0, m.clone(), 1e-12, false).unwrap();

    let (c_xx, c_yx, c_yy) = m.covariances();
    let c_zx = &c_yx + &c_xx;
    let c_zz = &c_yy + &c_yx + c_yx.transpose() + &c_xx;
    let inv_sqrt = |c: &Mat<f64>| {
        let eig = c.self_adjoint_eigen(Side::Lower).unwrap();
        let u = eig.U();
        let s = eig.S();
        let dinv = Mat::from_fn(d, d, |i, j| if i == j { 1.0 / s[i].sqrt() } else { 0.0 });
        u * dinv * u.transpose()
    };
    let k = inv_sqrt(&c_zz) * &c_zx * inv_sqrt(&c_xx);
    let rho_sq: f64 = k.singular_values().unwrap().iter().map(|s| s * s).sum();
    let svd_bound = d as f64 - rho_sq;
    // Both in f64 from the same covariances; the ridge is 1e-12 of the trace scale.
    assert!((fit.bound - svd_bound).abs() < 1e-7 * d as f64, "cholesky {} vs svd {svd_bound}", fit.bound);
}

/// W and b equal the ordinary least-squares fit of y on [x, 1], computed by QR from the raw data.
#[test]
fn lmmse_matches_a_direct_least_squares_fit() {
    let (d, n) = (10, 3000);
    let mut g = Gaussian::new(3);
    let x = mat(n, d, &g.matrix(n, d)) + Mat::from_fn(n, d, |_, j| 5.0 + j as f64);
    let w0 = mat(d, d, &g.matrix(d, d));
    let b0: Vec<f64> = (0..d).map(|i| i as f64 - 4.0).collect();
    let noise = mat(n, d, &g.matrix(n, d)) * 0.5;
    let y = &x * w0.transpose() + Mat::from_fn(n, d, |_, j| b0[j]) + noise;
    // Statistics see the data as f32, like activations: fit both on the same rounded values.
    let (xf, yf) = (rows_f32(x.as_ref()), rows_f32(y.as_ref()));
    let x = Mat::from_fn(n, d, |i, j| f64::from(xf[i * d + j]));
    let y = Mat::from_fn(n, d, |i, j| f64::from(yf[i * d + j]));
    let mut m = Moments::new(d);
    for (xc, yc) in xf.chunks(d * 700).zip(yf.chunks(d * 700)) {
        m.add_batch(xc, yc);
    }
    let fit = fit_layer(0, m.clone(), 1e-14, false).unwrap();

    let design = Mat::from_fn(n, d + 1, |i, j| if j < d { x[(i, j)] } else { 1.0 });
    let coef = design.col_piv_qr().solve_lstsq(&y); // (d+1)×d: rows are W's columns, then b
    let mut worst: f64 = 0.0;
    for i in 0..d {
        for j in 0..d {
            worst = worst.max((fit.w[(i, j)] - coef[(j, i)]).abs());
        }
        worst = worst.max((fit.b[i] - coef[(d, i)]).abs());
    }
    // Normal equations vs QR in f64 on well-conditioned data: agreement to ~1e-9 absolute.
    assert!(worst < 1e-8, "max |lmmse - lstsq| = {worst}");
    assert!(fit.fit_residual > 0.0 && fit.fit_residual < 0.1, "noise share {}", fit.fit_residual);
}

#[test]
fn lmmse_recovers_an_exact_affine_map() {
    let (d, n) = (8, 500);
    let mut g = Gaussian::new(5);
    let x = mat(n, d, &g.matrix(n, d));
    let w0 = mat(d, d, &g.matrix(d, d));
    let xs: Vec<f32> = rows_f32(x.as_ref());
    let x32 = Mat::from_fn(n, d, |i, j| f64::from(xs[i * d + j]));
    let y = &x32 * w0.transpose() + Mat::from_fn(n, d, |_, j| j as f64);
    let mut m = Moments::new(d);
    m.add_batch(&xs, &rows_f32(y.as_ref()));
    let fit = fit_layer(0, m.clone(), 1e-14, false).unwrap();
    for i in 0..d {
        for j in 0..d {
            // y was rounded to f32: relative 6e-8 of |y| ~ 3 gives ~1e-6 in W.
            assert!((fit.w[(i, j)] - w0[(i, j)]).abs() < 1e-5, "W[{i},{j}]");
        }
        assert!((fit.b[i] - i as f64).abs() < 1e-5, "b[{i}] = {}", fit.b[i]);
    }
    assert!(fit.fit_residual < 1e-9, "{}", fit.fit_residual);
}

#[test]
fn rank_deficient_statistics_give_finite_flagged_results() {
    let d = 16;
    let mut g = Gaussian::new(9);
    // Fewer tokens than dimensions, and one dead dimension.
    let mut x = g.matrix(5, d);
    for t in 0..5 {
        x[t * d + 3] = 0.0;
    }
    let y = g.matrix(5, d);
    let to32 = |v: &[f64]| v.iter().map(|&e| e as f32).collect::<Vec<f32>>();
    let mut m = Moments::new(d);
    m.add_batch(&to32(&x), &to32(&y));
    let fit = fit_layer(0, m.clone(), 1e-6, true).unwrap();
    assert!(fit.rank_deficient);
    assert!(fit.bound.is_finite() && fit.fit_residual.is_finite() && fit.cosine.is_finite());
    assert!(fit.w.norm_l2().is_finite() && fit.b.iter().all(|b| b.is_finite()));
    assert!(fit.bound >= 0.0 && fit.bound <= d as f64);
}

/// With no ridge asked for, a dead input dimension makes the factorisation of `C_xx` fail, and the
/// ridge is raised until it succeeds; each attempt must start again from the covariance, not from
/// what the failed one left. The fit is then the textbook one at the ridges it reports:
/// `W = C_yx (C_xx + λ_x D)⁻¹` by faer's own Cholesky solve, `Σρ² = ‖L_z⁻¹ C_zx L_x⁻ᵀ‖²`, with
/// `D = diag(max(C_ii, 10⁻⁶ tr(C)/d))` as documented.
#[test]
fn a_raised_ridge_fits_the_statistics_not_a_failed_attempt() {
    let (d, n) = (40, 400);
    let mut g = Gaussian::new(21);
    let mut x = g.matrix(n, d);
    for t in 0..n {
        x[t * d + 3] = 0.0;
    }
    let y = g.matrix(n, d);
    let to32 = |v: &[f64]| v.iter().map(|&e| e as f32).collect::<Vec<f32>>();
    let mut m = Moments::new(d);
    m.add_batch(&to32(&x), &to32(&y));
    let fit = fit_layer(0, m.clone(), 0.0, false).unwrap();
    assert!(
        fit.rank_deficient && fit.ridge_x > 0.0 && fit.ridge_z == 0.0,
        "{:e} {:e}",
        fit.ridge_x,
        fit.ridge_z
    );

    let (c_xx, c_yx, c_yy) = m.covariances();
    let ridged = |c: &Mat<f64>, lambda: f64| {
        let floor = 1e-6 * (0..d).map(|i| c[(i, i)]).sum::<f64>() / d as f64;
        Mat::from_fn(d, d, |i, j| c[(i, j)] + if i == j { lambda * c[(i, i)].max(floor) } else { 0.0 })
    };
    let llt_x = ridged(&c_xx, fit.ridge_x).llt(Side::Lower).unwrap();
    let w = llt_x.solve(c_yx.transpose()).transpose().to_owned();
    let c_zz = &c_yy + &c_yx + c_yx.transpose() + &c_xx;
    let l_z = c_zz.llt(Side::Lower).unwrap().L().to_owned();
    let c_zx = &c_yx + &c_xx;
    // L_x⁻ᵀ on the dead dimension is 1/√ε_x: its column of C_zx is exactly zero, so M's is too.
    let mut l_x_t_inv = llt_x.L().transpose().to_owned().partial_piv_lu().inverse();
    for i in 0..d {
        l_x_t_inv[(i, 3)] = 0.0;
        l_x_t_inv[(3, i)] = 0.0;
    }
    let m_cca = l_z.partial_piv_lu().solve(&c_zx) * &l_x_t_inv;
    let bound = d as f64 - m_cca.norm_l2().powi(2);
    let rel = (&fit.w - &w).norm_l2() / w.norm_l2();
    assert!(rel < 1e-10, "W differs by {rel:e}");
    assert!((fit.bound - bound).abs() < 1e-10 * d as f64, "bound {} vs {bound}", fit.bound);
}

/// The analysis's fit without the map measures exactly what the full fit does.
#[test]
fn measures_without_the_map_are_those_of_the_full_fit() {
    let d = 50;
    let mut g = Gaussian::new(5);
    let to32 = |v: &[f64]| v.iter().map(|&e| e as f32).collect::<Vec<f32>>();
    let mut m = Moments::new(d);
    m.add_batch(&to32(&g.matrix(300, d)), &to32(&g.matrix(300, d)));
    let full = fit_layer(3, m.clone(), 1e-6, true).unwrap();
    let measures = fit_measures(3, m, 1e-6, true).unwrap();
    assert_eq!(serde_json::to_value(&full).unwrap(), serde_json::to_value(&measures).unwrap());
    assert_eq!((measures.w.nrows(), measures.b.len(), full.w.nrows()), (0, 0, d));
}

#[test]
fn ranking_orders_by_bound_or_by_cosine() {
    let d = 4;
    let mut g = Gaussian::new(1);
    let mut fits = Vec::new();
    for (layer, noise) in [(0, 2.0), (1, 0.01), (2, 0.5)] {
        let x = g.matrix(400, d);
        let y: Vec<f64> = x.iter().zip(g.matrix(400, d)).map(|(a, e)| 0.5 * a + noise * e).collect();
        let to32 = |v: &[f64]| v.iter().map(|&e| e as f32).collect::<Vec<f32>>();
        let mut m = Moments::new(d);
        m.add_batch(&to32(&x), &to32(&y));
        fits.push(fit_layer(layer, m.clone(), 1e-6, false).unwrap());
    }
    assert_eq!(ranking(&fits, Ranking::Cca), vec![1, 2, 0]);
    assert_eq!(ranking(&fits, Ranking::Cosine), vec![1, 2, 0]);
}

/// `y = A x + e` with `Cov(x) = I`, noise `Cov(e) = σ² I` independent of x, means `μ_x`, `μ_y`:
/// the map's residual is exactly the noise, `tr = σ² d`; the block output's energy is
/// `tr(C_zz) + ‖μ_x + μ_y‖²`; so each scale-aware measure has a closed form.
#[test]
fn residual_measures_equal_their_closed_forms() {
    let d = 8;
    let sigma2 = 0.25;
    let mut g = Gaussian::new(11);
    let a = Mat::from_fn(d, d, |i, j| 0.3 * g.sample() + if i == j { 0.5 } else { 0.0 });
    let c_xx = Mat::<f64>::identity(d, d);
    let c_yx = a.clone();
    let c_yy = &a * a.transpose() + Mat::from_fn(d, d, |i, j| if i == j { sigma2 } else { 0.0 });
    let mut m = exact_moments(&c_xx, &c_yx, &c_yy);
    m.mean_x = (0..d).map(|i| 0.1 * i as f64).collect();
    m.mean_y = (0..d).map(|i| 1.0 - 0.2 * i as f64).collect();
    let fit = fit_layer(0, m.clone(), 1e-12, false).unwrap();

    let trace = |m: &Mat<f64>| (0..d).map(|i| m[(i, i)]).sum::<f64>();
    let c_zz = &c_yy + &c_yx + c_yx.transpose() + &c_xx;
    let mean_z: f64 = (0..d).map(|i| (m.mean_x[i] + m.mean_y[i]).powi(2)).sum();
    let stream = trace(&c_zz) + mean_z;
    let residual = sigma2 * d as f64;
    // The 1e-12 ridge and f64 rounding: relative 1e-9.
    let close = |got: f64, want: f64| (got - want).abs() <= 1e-9 * want.abs().max(1.0);
    assert!(close(fit.residual_energy, residual), "{} vs {residual}", fit.residual_energy);
    assert!(close(fit.stream_energy, stream), "{} vs {stream}", fit.stream_energy);
    assert!(close(fit.relative_residual, residual / stream));
    assert!(close(fit.fit_residual, residual / trace(&c_yy)));
    assert!(close(fit.weighted_bound, fit.bound_normalized * trace(&c_yy) / trace(&c_zz)));
}

/// A stream with one massive direction (as real ones have): the map fits it perfectly and misses
/// noise in the others. The scale-free CCA bound counts every direction alike and ranks the layer
/// last; its error relative to the stream is tiny, and the residual criterion ranks it first.
#[test]
fn the_residual_criterion_sees_how_large_the_error_is_next_to_the_stream() {
    let d = 6;
    let diag = |v: &dyn Fn(usize) -> f64| Mat::from_fn(d, d, |i, j| if i == j { v(i) } else { 0.0 });
    // y = 0.5 x + e: C_yx = 0.5 C_xx, C_yy = 0.25 C_xx + Cov(e).
    let layer = |c_xx: Mat<f64>, noise: f64| {
        let c_yx = &c_xx * 0.5;
        let c_yy = &c_xx * 0.25 + diag(&|_| noise);
        fit_layer(0, exact_moments(&c_xx, &c_yx, &c_yy), 1e-12, false).unwrap()
    };
    let mut massive = layer(diag(&|i| if i == 0 { 1000.0 } else { 1.0 }), 0.5);
    let plain = layer(diag(&|_| 1.0), 0.05);
    massive.layer = 0;
    let mut plain = plain;
    plain.layer = 1;
    let fits = [massive, plain];
    eprintln!(
        "bound/d {:.4} vs {:.4}; residual/stream {:.2e} vs {:.2e}",
        fits[0].bound_normalized,
        fits[1].bound_normalized,
        fits[0].relative_residual,
        fits[1].relative_residual
    );
    assert_eq!(ranking(&fits, Ranking::Cca), [1, 0], "the scale-free bound prefers the plain layer");
    assert_eq!(
        ranking(&fits, Ranking::Residual),
        [0, 1],
        "relative to the stream, the massive one errs least"
    );
}

/// The held-out residual from moments equals the mean squared error of the fitted map over the
/// held-out tokens themselves, over their output variance (computed here token by token).
#[test]
fn heldout_residual_equals_the_error_measured_token_by_token() {
    let (d, fit_tokens, heldout_tokens) = (6, 40, 30);
    let mut g = Gaussian::new(21);
    let a = Mat::from_fn(d, d, |_, _| g.sample() * 0.5);
    let mut sample = |n: usize| {
        let x = Mat::from_fn(n, d, |_, _| g.sample() + 0.3);
        let noise = Mat::from_fn(n, d, |_, _| g.sample() * 0.4);
        let y = &x * a.transpose() + noise;
        (x, y)
    };
    let (xf, yf) = sample(fit_tokens);
    let (xh, yh) = sample(heldout_tokens);
    let moments = |x: &Mat<f64>, y: &Mat<f64>| {
        let mut m = Moments::new(d);
        m.add_batch(&rows_f32(x.as_ref()), &rows_f32(y.as_ref()));
        m
    };
    let fit = fit_layer(0, moments(&xf, &yf), 1e-9, false).unwrap();
    let got = fit.heldout_residual_on(&moments(&xh, &yh));
    // The same from the f32-rounded tokens the moments saw.
    let round = |m: &Mat<f64>| Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f32 as f64);
    let (xh, yh) = (round(&xh), round(&yh));
    let mean_y: Vec<f64> = (0..d)
        .map(|j| (0..heldout_tokens).map(|t| yh[(t, j)]).sum::<f64>() / heldout_tokens as f64)
        .collect();
    let (mut error, mut variance) = (0.0, 0.0);
    for t in 0..heldout_tokens {
        for i in 0..d {
            let predicted = fit.b[i] + (0..d).map(|j| fit.w[(i, j)] * xh[(t, j)]).sum::<f64>();
            error += (yh[(t, i)] - predicted).powi(2);
            variance += (yh[(t, i)] - mean_y[i]).powi(2);
        }
    }
    let want = error / variance;
    assert!((got - want).abs() <= 1e-9 * want, "from moments {got}, token by token {want}");
    // Fitted on 40 tokens, the map errs more on new ones than on its own.
    assert!(got > fit.fit_residual, "held out {got} vs in sample {}", fit.fit_residual);
}

/// A ridge in the standardised basis leaves a well-conditioned layer's bound where no ridge puts
/// it, even when a few dimensions carry massive activations (variance 10⁸ against 1, as in
/// SmolLM2's stream); a scalar ridge of the same λ, set by the mean variance, moves it by orders
/// of magnitude more.
#[test]
fn the_ridge_is_scale_aware_with_massive_activations() {
    let (d, n) = (24, 20_000);
    let mut g = Gaussian::new(5);
    let mut x = Mat::from_fn(n, d, |_, _| g.sample());
    for t in 0..n {
        x[(t, 0)] *= 1e4;
        x[(t, 1)] *= 3e3;
    }
    let w = Mat::from_fn(d, d, |_, _| 0.1 * g.sample());
    let noise = Mat::from_fn(n, d, |_, _| 0.3 * g.sample());
    // y depends on the small dimensions only, so that they matter to the bound.
    let mut x_small = x.clone();
    for t in 0..n {
        x_small[(t, 0)] = 0.0;
        x_small[(t, 1)] = 0.0;
    }
    let y = &x_small * w.transpose() + &noise;
    let mut m = Moments::new(d);
    m.add_batch(&rows_f32(x.as_ref()), &rows_f32(y.as_ref()));
    let bound = |lambda: f64| fit_measures(0, m.clone(), lambda, false).unwrap().bound;
    let (exact, ridged) = (bound(0.0), bound(1e-6));
    let moved = ((ridged - exact) / exact).abs();
    // The scalar ridge λ · tr(C)/d the tool used to apply: the same bound from covariances with
    // that added to every diagonal entry, by an independent SVD.
    let (c_xx, c_yx, c_yy) = m.covariances();
    let scalar = 1e-6 * (0..d).map(|i| c_xx[(i, i)]).sum::<f64>() / d as f64;
    let c_xx_r = Mat::from_fn(d, d, |i, j| c_xx[(i, j)] + if i == j { scalar } else { 0.0 });
    let c_zz = &c_yy + &c_yx + c_yx.transpose() + &c_xx;
    let c_zx = &c_yx + &c_xx;
    let l_x = c_xx_r.llt(Side::Lower).unwrap().L().to_owned();
    let l_z = c_zz.llt(Side::Lower).unwrap().L().to_owned();
    let whitened = l_z.partial_piv_lu().solve(&c_zx) * l_x.transpose().partial_piv_lu().inverse();
    let scalar_bound = d as f64 - whitened.norm_l2().powi(2);
    let scalar_moved = ((scalar_bound - exact) / exact).abs();
    eprintln!(
        "bound {exact:.6}: diagonal ridge moves it by {moved:.2e}, a scalar ridge by {scalar_moved:.2e}"
    );
    assert!(moved < 1e-4, "{moved:e}");
    assert!(scalar_moved > 10.0 * moved, "{scalar_moved:e} vs {moved:e}");
}
