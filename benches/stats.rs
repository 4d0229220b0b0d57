//! Throughput of the NBL hot paths, written as JSON (`cargo bench --bench stats`):
//! - statistics accumulation (tokens/s) at d = 576 (SmolLM2) and d = 4096 (8B models), against the
//!   machine's f64 GEMM rate measured side by side on the same shapes;
//! - the CCA bound + LMMSE solve of one layer at d = 4096.
//!
//! `NBL_BENCH_OUT` sets the output file (default `bench/stats.json`); `NBL_BENCH_QUICK=1` shrinks
//! the runs for a smoke test.

use std::time::Instant;

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par};
use nbl_onnx::nbl::fit_layer;
use nbl_onnx::stats::Moments;
use serde_json::json;

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds of `f`, median of `runs`.
fn time(runs: usize, mut f: impl FnMut()) -> f64 {
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn accumulation(d: usize, tokens: usize, runs: usize) -> serde_json::Value {
    let x = values(tokens * d, 1);
    let y = values(tokens * d, 2);
    let a = Mat::from_fn(tokens, d, |i, j| f64::from(x[i * d + j]));
    let mut c = Mat::<f64>::zeros(d, d);
    // One Xᵀ X of the batch's shape: the GEMM the accumulation is made of.
    let gemm = time(runs, || matmul(c.as_mut(), Accum::Add, a.transpose(), a.as_ref(), 1.0, Par::Seq));
    let gemm_flops = 2.0 * tokens as f64 * (d * d) as f64 / gemm;
    let mut m = Moments::new(d);
    let accumulate = time(runs, || m.add_batch(&x, &y));
    let tokens_per_s = tokens as f64 / accumulate;
    // The work done per token: y xᵀ in full (d² multiply-adds), x xᵀ and y yᵀ as lower triangles
    // (d²/2 each, being symmetric).
    let flops = 4.0 * (d * d) as f64 * tokens_per_s;
    // What three full GEMMs per batch would allow: the rate the symmetry is measured against.
    let three_gemms_tokens_per_s = gemm_flops / (6.0 * (d * d) as f64);
    println!(
        "d={d}: {tokens_per_s:.0} tokens/s ({:.1} GFLOP/s, {:.0}% of the GEMM rate); three full GEMMs: {three_gemms_tokens_per_s:.0} tokens/s",
        flops / 1e9,
        100.0 * flops / gemm_flops
    );
    json!({"d": d, "batch_tokens": tokens, "tokens_per_s": tokens_per_s, "gflops": flops / 1e9,
           "gemm_gflops": gemm_flops / 1e9, "fraction_of_gemm": flops / gemm_flops,
           "three_gemms_tokens_per_s": three_gemms_tokens_per_s})
}

fn solve(d: usize) -> serde_json::Value {
    // Statistics of a random well-conditioned layer: C_xx = A Aᵀ/d + I, y = W x + noise.
    let a = Mat::from_fn(d, d, |i, j| f64::from(values(1, (i * d + j) as u64 + 7)[0]));
    let mut m = Moments::new(d);
    m.count = 1_000_000;
    let n1 = (m.count - 1) as f64;
    let mut sxx = Mat::<f64>::zeros(d, d);
    matmul(sxx.as_mut(), Accum::Replace, a.as_ref(), a.transpose(), n1 / d as f64, Par::Seq);
    for i in 0..d {
        sxx[(i, i)] += n1;
    }
    let w = Mat::from_fn(d, d, |i, j| if i == j { 0.5 } else { 0.0 });
    m.syx = &w * &sxx;
    m.syy = &w * &sxx * w.transpose() + Mat::from_fn(d, d, |i, j| if i == j { n1 } else { 0.0 });
    m.sxx = sxx;
    let t = Instant::now();
    let fit = fit_layer(0, m.clone(), 1e-6, false).unwrap();
    let seconds = t.elapsed().as_secs_f64();
    println!("d={d}: bound + LMMSE in {seconds:.2} s (bound {:.2})", fit.bound);
    json!({"d": d, "bound_and_lmmse_s": seconds, "bound": fit.bound})
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` probes with --list
    }
    let quick = std::env::var("NBL_BENCH_QUICK").is_ok();
    let (runs, big_tokens, big_d) = if quick { (1, 256, 1024) } else { (3, 2048, 4096) };
    let results = json!({
        "threads": 1,
        "accumulation": [accumulation(576, 2048, runs), accumulation(big_d, big_tokens, runs)],
        "solve": solve(big_d),
    });
    let out = std::env::var("NBL_BENCH_OUT").unwrap_or_else(|_| "bench/stats.json".into());
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&out, serde_json::to_string_pretty(&results).unwrap()).unwrap();
    println!("wrote {out}");
}
