//! Streaming moments against a two-pass f64 reference, the pairwise merge, and the file format.

mod common;

use common::Gaussian;
use nbl_onnx::stats::{DataSummary, LayerTensors, Moments, Stats};

/// Row-major `d×d` sums and the means, computed the textbook way.
struct Reference {
    sxx: Vec<f64>,
    syx: Vec<f64>,
    syy: Vec<f64>,
    mean_x: Vec<f64>,
    mean_y: Vec<f64>,
}

/// Two-pass reference: means, then centred sums, in f64 over all tokens at once.
fn two_pass(x: &[f32], y: &[f32], d: usize) -> Reference {
    let n = x.len() / d;
    let mean = |v: &[f32]| {
        (0..d).map(|j| (0..n).map(|t| f64::from(v[t * d + j])).sum::<f64>() / n as f64).collect::<Vec<_>>()
    };
    let (mx, my) = (mean(x), mean(y));
    let cross = |a: &[f32], ma: &[f64], b: &[f32], mb: &[f64]| {
        let mut s = vec![0.0; d * d];
        for t in 0..n {
            for i in 0..d {
                for j in 0..d {
                    s[i * d + j] += (f64::from(a[t * d + i]) - ma[i]) * (f64::from(b[t * d + j]) - mb[j]);
                }
            }
        }
        s
    };
    Reference {
        sxx: cross(x, &mx, x, &mx),
        syx: cross(y, &my, x, &mx),
        syy: cross(y, &my, y, &my),
        mean_x: mx,
        mean_y: my,
    }
}

fn max_rel(got: &faer::Mat<f64>, want: &[f64]) -> f64 {
    let d = got.nrows();
    let scale = want.iter().map(|v| v.abs()).fold(0.0, f64::max);
    (0..d * d).map(|k| (got[(k / d, k % d)] - want[k]).abs()).fold(0.0, f64::max) / scale
}

/// Activations like SmolLM2's: a massive common offset (|x| ≈ 2.4e4) with O(1) variation.
fn massive_activations(n: usize, d: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut g = Gaussian::new(seed);
    let x: Vec<f32> =
        (0..n * d).map(|k| (if k % d == 5 { 2.4e4 } else { 0.0 } + g.sample()) as f32).collect();
    let y: Vec<f32> = (0..n * d).map(|k| (0.3 * f64::from(x[k]) + g.sample()) as f32).collect();
    (x, y)
}

#[test]
fn batched_accumulation_matches_a_two_pass_reference_despite_massive_activations() {
    let (n, d) = (3000, 12);
    let (x, y) = massive_activations(n, d, 1);
    let mut m = Moments::new(d);
    for (xc, yc) in x.chunks(d * 256).zip(y.chunks(d * 256)) {
        m.add_batch(xc, yc);
    }
    let Reference { sxx, syx, syy, mean_x: mx, mean_y: my } = two_pass(&x, &y, d);
    assert_eq!(m.count, n as u64);
    // Centred f64 accumulation: agreement to ~1e-12 of the largest entry.
    for (got, want) in [(&m.sxx, &sxx), (&m.syx, &syx), (&m.syy, &syy)] {
        assert!(max_rel(got, want) < 1e-10, "relative error {}", max_rel(got, want));
    }
    for j in 0..d {
        assert!((m.mean_x[j] - mx[j]).abs() <= 1e-9 * mx[j].abs().max(1.0));
        assert!((m.mean_y[j] - my[j]).abs() <= 1e-9 * my[j].abs().max(1.0));
    }
}

/// Each batch's products in f32 (centred in f64 first, merged in f64): within a few
/// `ε_f32 · √(batch tokens)` of the two-pass f64 reference, massive activations included, and
/// really formed in f32 (further from it than the f64 products).
#[test]
fn f32_batch_products_stay_within_their_rounding_of_the_two_pass_reference() {
    use nbl_onnx::stats::MomentPrecision;
    let (n, d, batch) = (3000, 12, 256);
    let (x, y) = massive_activations(n, d, 3);
    let (mut narrow, mut wide) = (Moments::new(d), Moments::new(d));
    for (xc, yc) in x.chunks(d * batch).zip(y.chunks(d * batch)) {
        narrow.add_batch_in(MomentPrecision::F32, xc, yc);
        wide.add_batch_in(MomentPrecision::F64, xc, yc);
    }
    let Reference { sxx, syx, syy, mean_x, .. } = two_pass(&x, &y, d);
    let bound = 4.0 * f64::from(f32::EPSILON) * (batch as f64).sqrt();
    for (name, got, exact, want) in [
        ("sxx", &narrow.sxx, &wide.sxx, &sxx),
        ("syx", &narrow.syx, &wide.syx, &syx),
        ("syy", &narrow.syy, &wide.syy, &syy),
    ] {
        let (error, f64_error) = (max_rel(got, want), max_rel(exact, want));
        eprintln!("{name}: f32 products {error:.2e}, f64 products {f64_error:.2e} (bound {bound:.2e})");
        assert!(error < bound, "{name}: {error:.2e} ≥ {bound:.2e}");
        assert!(error > 10.0 * f64_error, "{name}: the products were not formed in f32");
    }
    // The means never leave f64.
    assert_eq!(narrow.mean_x, wide.mean_x);
    assert!((narrow.mean_x[5] - mean_x[5]).abs() < 1e-9 * mean_x[5].abs());
}

#[test]
fn merging_shards_equals_one_pass_over_all_tokens() {
    let (n, d) = (2000, 10);
    let (x, y) = massive_activations(n, d, 2);
    let mut whole = Moments::new(d);
    whole.add_batch(&x, &y);
    let mut merged = Moments::new(d);
    for (xc, yc) in x.chunks(d * 333).zip(y.chunks(d * 333)) {
        let mut shard = Moments::new(d);
        shard.add_batch(xc, yc);
        merged.merge(&shard);
    }
    assert_eq!(merged.count, whole.count);
    for (a, b) in [(&merged.sxx, &whole.sxx), (&merged.syx, &whole.syx), (&merged.syy, &whole.syy)] {
        let flat: Vec<f64> = (0..d * d).map(|k| b[(k / d, k % d)]).collect();
        assert!(max_rel(a, &flat) < 1e-12, "{}", max_rel(a, &flat));
    }
    assert!((merged.cos_sum - whole.cos_sum).abs() < 1e-9 * whole.cos_sum.abs());
}

/// Read from the file (tensor by tensor, as `analyze` and `rewrite` do) and from its bytes in
/// memory, the statistics are the ones saved, bit for bit. At d = 400 a matrix spans several read
/// chunks and ends in a partial tile.
#[test]
fn statistics_survive_a_file_round_trip_exactly() {
    let d = 400;
    let mut g = Gaussian::new(4);
    let moments: Vec<Moments> = (0..3)
        .map(|_| {
            let mut m = Moments::new(d);
            let x: Vec<f32> = g.matrix(50, d).iter().map(|&v| v as f32).collect();
            let y: Vec<f32> = g.matrix(50, d).iter().map(|&v| v as f32).collect();
            m.add_batch(&x, &y);
            m
        })
        .collect();
    let stats = Stats {
        fingerprint: "abc123".into(),
        hidden_size: d,
        layers: (0..3).map(|l| LayerTensors::attention(l, &format!("x{l}"), &format!("y{l}"))).collect(),
        heldout: Some(moments.iter().rev().cloned().collect()),
        moments,
        data: vec![DataSummary {
            files: vec!["data.json".into()],
            seq_len: 16,
            sequences: 3,
            shard: [0, 1],
            engine: "test".into(),
        }],
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stats.safetensors");
    stats.save(&path).unwrap();
    let from_bytes = Stats::from_bytes(&std::fs::read(&path).unwrap(), &path).unwrap();
    let back = Stats::load(&path).unwrap();
    for (a, b) in back.moments.iter().zip(&from_bytes.moments) {
        assert_eq!((&a.sxx, &a.syx, &a.syy), (&b.sxx, &b.syx, &b.syy));
    }
    assert_eq!(back.fingerprint, "abc123");
    assert_eq!(back.layers, stats.layers);
    assert_eq!(back.data, stats.data);
    let (back_heldout, heldout) = (back.heldout.as_ref().unwrap(), stats.heldout.as_ref().unwrap());
    assert_eq!(back_heldout.len(), 3);
    for (a, b) in back.moments.iter().zip(&stats.moments).chain(back_heldout.iter().zip(heldout)) {
        assert_eq!(a.count, b.count);
        assert_eq!(a.mean_x, b.mean_x);
        assert_eq!(a.sxx, b.sxx);
        assert_eq!(a.syx, b.syx);
        assert_eq!(a.syy, b.syy);
        assert_eq!(a.cos_sum, b.cos_sum);
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
}

/// Version 1 files (full `sxx` and `syy`) still load, to the same moments as the version 2 file
/// (packed upper triangles) written from them, which is a third smaller.
#[test]
fn version_1_statistics_still_load() {
    use safetensors::{Dtype, SafeTensors, tensor::TensorView};
    let d = 5;
    let mut g = Gaussian::new(9);
    let (mut a, mut b) = (Moments::new(d), Moments::new(d));
    let sample = |g: &mut Gaussian| -> Vec<f32> { g.matrix(40, d).iter().map(|&v| v as f32).collect() };
    a.add_batch(&sample(&mut g), &sample(&mut g));
    b.add_batch(&sample(&mut g), &sample(&mut g));
    a.merge(&b); // the mean correction: still exactly symmetric
    let stats = Stats {
        fingerprint: "f".into(),
        hidden_size: d,
        layers: vec![LayerTensors::attention(0, "x", "y")],
        moments: vec![a],
        heldout: None,
        data: vec![],
    };
    let dir = tempfile::tempdir().unwrap();
    let v2 = dir.path().join("v2.safetensors");
    stats.save(&v2).unwrap();
    // The same statistics as version 1 wrote them: full matrices.
    let bytes = std::fs::read(&v2).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let full = |m: &faer::Mat<f64>| -> Vec<u8> {
        (0..d).flat_map(|i| (0..d).map(move |j| (i, j))).flat_map(|(i, j)| m[(i, j)].to_le_bytes()).collect()
    };
    let (sxx, syy) = (full(&stats.moments[0].sxx), full(&stats.moments[0].syy));
    let tensors: Vec<(String, TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .map(|(key, view)| {
            let view = match key.as_str() {
                "layers.0.sxx" => TensorView::new(Dtype::F64, vec![d, d], &sxx).unwrap(),
                "layers.0.syy" => TensorView::new(Dtype::F64, vec![d, d], &syy).unwrap(),
                _ => view,
            };
            (key, view)
        })
        .collect();
    let mut metadata = header.metadata().clone().unwrap();
    metadata.insert("version".into(), "1".into());
    let v1 = dir.path().join("v1.safetensors");
    safetensors::serialize_to_file(tensors, Some(metadata), &v1).unwrap();
    let (old, new) = (Stats::load(&v1).unwrap(), Stats::load(&v2).unwrap());
    for m in [&old.moments[0], &new.moments[0]] {
        assert_eq!(m.sxx, stats.moments[0].sxx);
        assert_eq!(m.syy, stats.moments[0].syy);
        assert_eq!(m.syx, stats.moments[0].syx);
    }
    let (size_v1, size_v2) = (std::fs::metadata(&v1).unwrap().len(), std::fs::metadata(&v2).unwrap().len());
    assert!(size_v2 < size_v1, "{size_v2} vs {size_v1}");
}

/// Synthetic statistics are moments with a known answer: `Σxx = n (I + 0.1 J/d)`,
/// `Σyx = 0.5 Σxx`, `Σyy = 0.25 Σxx + 0.1 n I`, so the LMMSE map is `W = 0.5 I`, `b = 0`, and it
/// misses `tr(0.1 I) = 0.1 d` of the output's variance per token. Written as the file format's
/// one writer writes it, read back through the reader.
#[test]
fn synthetic_statistics_read_back_as_the_moments_they_describe() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("synthetic.safetensors");
    let d = 48;
    let layers: Vec<LayerTensors> =
        (0..2).map(|l| LayerTensors::attention(l, &format!("x{l}"), &format!("y{l}"))).collect();
    let bytes = nbl_onnx::stats::write_synthetic(&path, "synthetic", d, &layers).unwrap();
    assert_eq!(bytes, std::fs::metadata(&path).unwrap().len());
    let stats = Stats::load(&path).unwrap();
    assert_eq!((stats.hidden_size, stats.layers.clone(), stats.tokens()), (d, layers, 1_000_000));
    let n = 1e6;
    for m in &stats.moments {
        for i in 0..d {
            for j in 0..d {
                let sxx = n * f64::from(u8::from(i == j)) + 0.1 * n / d as f64;
                assert_eq!(m.sxx[(i, j)], sxx, "sxx[{i},{j}]");
                assert_eq!(m.syx[(i, j)], 0.5 * sxx, "syx[{i},{j}]");
                assert_eq!(m.syy[(i, j)], 0.25 * sxx + 0.1 * n * f64::from(u8::from(i == j)), "syy[{i},{j}]");
            }
        }
        let fit = nbl_onnx::nbl::fit_layer(0, m.clone(), 0.0, false).unwrap();
        for i in 0..d {
            for j in 0..d {
                let want = if i == j { 0.5 } else { 0.0 };
                assert!((fit.w[(i, j)] - want).abs() < 1e-9, "W[{i},{j}] = {}", fit.w[(i, j)]);
            }
        }
        assert!(fit.b.iter().all(|b| b.abs() < 1e-9));
        // The covariances are S/(n − 1): 0.1 d up to the factor n/(n − 1).
        let expected = 0.1 * d as f64 * n / (n - 1.0);
        assert!((fit.residual_energy - expected).abs() < 1e-9 * expected, "{}", fit.residual_energy);
    }
}
