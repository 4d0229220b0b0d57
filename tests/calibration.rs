//! Calibration on the fixtures: statistics from ONNX Runtime, from tract and from the PyTorch
//! activations agree; sharded runs merge into exactly one run; bad input is refused clearly.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use nbl_onnx::calibrate::{Forming, MomentsOn, calibrate, layer_tensors};
use nbl_onnx::detect::find_layout;
use nbl_onnx::engine::Engine;
use nbl_onnx::nbl::fit_layer;
use nbl_onnx::onnx::{Model, Tensor};
use nbl_onnx::select::{Ranking, ranking};
use nbl_onnx::stats::{MomentPrecision, Moments, Stats};

/// The fixture's reference token ids as calibration blocks.
/// `merge-stats PARTS... -o OUT`.
fn merge_stats(parts: &[&Path], out: &Path) -> std::process::Output {
    let mut args = vec!["merge-stats"];
    args.extend(parts.iter().map(|p| p.to_str().unwrap()));
    args.extend(["-o", out.to_str().unwrap()]);
    nbl(&args)
}

fn reference_sequences(name: &str) -> Vec<Vec<i64>> {
    let Tensor::I64(ids) = reference(name)["inputs.input_ids"].clone() else { panic!("int64 ids") };
    ids.outer_iter().map(|row| row.iter().copied().collect()).collect()
}

/// Moments computed straight from the PyTorch activations saved with the fixture.
fn pytorch_moments(name: &str, layers: usize) -> Vec<Moments> {
    let reference = reference(name);
    (0..layers)
        .map(|l| {
            let x = reference[&format!("layers.{l}.x")].to_f32().unwrap();
            let y = reference[&format!("layers.{l}.y")].to_f32().unwrap();
            let d = *x.shape().last().unwrap();
            let mut m = Moments::new(d);
            m.add_batch(x.as_slice().unwrap(), y.as_slice().unwrap());
            m
        })
        .collect()
}

/// Largest relative difference over every statistic, relative to each tensor's largest entry.
fn max_relative_difference(a: &Moments, b: &Moments) -> f64 {
    assert_eq!(a.count, b.count);
    let d = a.dim();
    let rel = |x: &faer::Mat<f64>, y: &faer::Mat<f64>| {
        let scale = (0..d * d).map(|k| y[(k / d, k % d)].abs()).fold(0.0, f64::max);
        (0..d * d).map(|k| (x[(k / d, k % d)] - y[(k / d, k % d)]).abs()).fold(0.0, f64::max) / scale
    };
    let vec_rel = |x: &[f64], y: &[f64]| {
        let scale = y.iter().map(|v| v.abs()).fold(0.0, f64::max);
        x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0.0, f64::max) / scale
    };
    [
        rel(&a.sxx, &b.sxx),
        rel(&a.syx, &b.syx),
        rel(&a.syy, &b.syy),
        vec_rel(&a.mean_x, &b.mean_x),
        vec_rel(&a.mean_y, &b.mean_y),
        (a.cos_sum - b.cos_sum).abs() / b.cos_sum.abs(),
    ]
    .into_iter()
    .fold(0.0, f64::max)
}

fn engine_moments(name: &str, engine: &dyn Engine) -> Vec<Moments> {
    let model = Model::load(model_path(name)).unwrap();
    let layout = find_layout(&model).unwrap();
    let taps = layer_tensors(&layout);
    calibrate(
        &model,
        layout.hidden_size,
        &taps,
        engine,
        &reference_sequences(name),
        1,
        f64_on(MomentsOn::Host),
    )
    .unwrap()
}

/// Moments formed `on` the host or in the graph, every product in f64.
fn f64_on(on: MomentsOn) -> Forming {
    Forming { on, precision: MomentPrecision::F64 }
}

/// f32 activations agree to ~1e-5 relative between engines and PyTorch (see the X/Y test);
/// second moments of them agree to the same order (measured: ≤ 1.2e-6).
const STATS_TOLERANCE: f64 = 1e-5;

#[test]
fn statistics_agree_between_onnx_runtime_tract_and_pytorch() {
    let ort = ort();
    let tract = tract();
    for name in ["llama-optimum-past", "qwen2-optimum-past", "phi3-optimum-past", "llama-dynamo"] {
        let from_ort = engine_moments(name, ort.as_ref());
        let from_tract = engine_moments(name, tract.as_ref());
        let from_torch = pytorch_moments(name, from_ort.len());
        for (l, ((o, t), p)) in from_ort.iter().zip(&from_tract).zip(&from_torch).enumerate() {
            let (ot, op) = (max_relative_difference(o, t), max_relative_difference(o, p));
            eprintln!("{name} layer {l}: ORT vs tract {ot:.2e}, ORT vs PyTorch {op:.2e}");
            assert!(ot < STATS_TOLERANCE && op < STATS_TOLERANCE, "{name} layer {l}");
        }
    }
}

#[test]
fn genai_statistics_agree_with_pytorch() {
    let ort = ort();
    let name = "llama-genai-fp32";
    let from_ort = engine_moments(name, ort.as_ref());
    for (l, (o, p)) in from_ort.iter().zip(&pytorch_moments(name, 3)).enumerate() {
        let diff = max_relative_difference(o, p);
        eprintln!("{name} layer {l}: ORT vs PyTorch {diff:.2e}");
        assert!(diff < STATS_TOLERANCE, "{name} layer {l}");
    }
}

/// Six blocks of 16 fixed pseudo-random token ids (below every fixture's vocabulary of 512).
fn random_sequences() -> Vec<Vec<i64>> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..6)
        .map(|_| {
            (0..16)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state % 512) as i64
                })
                .collect()
        })
        .collect()
}

/// In-graph and host moments of `name` on `engine`, three batches of two blocks each (so the graph's
/// merge across batches is exercised), each batch's products in `precision`.
fn graph_and_host_moments_in(
    name: &str,
    engine: &dyn Engine,
    precision: MomentPrecision,
) -> (Vec<Moments>, Vec<Moments>) {
    let model = Model::load(model_path(name)).unwrap();
    let layout = find_layout(&model).unwrap();
    let taps = layer_tensors(&layout);
    let run = |on| {
        let forming = Forming { on, precision };
        calibrate(&model, layout.hidden_size, &taps, engine, &random_sequences(), 2, forming).unwrap()
    };
    (run(MomentsOn::Graph), run(MomentsOn::Host))
}

fn graph_and_host_moments(name: &str, engine: &dyn Engine) -> (Vec<Moments>, Vec<Moments>) {
    graph_and_host_moments_in(name, engine, MomentPrecision::F64)
}

fn bound_order(moments: &[Moments]) -> Vec<usize> {
    let fits: Vec<_> =
        moments.iter().enumerate().map(|(l, m)| fit_layer(l, m.clone(), 1e-6, false).unwrap()).collect();
    ranking(&fits, Ranking::Cca)
}

/// The graph computes in f64 what the host computes in f64, from the same activations: they agree
/// to summation order (measured ≤ 5e-16, int4 graphs included). Where the activations are f16,
/// ONNX Runtime optimises the two measuring graphs differently (the host's exposes X and Y as
/// outputs), and the activations themselves differ by f16 rounding (measured ≤ 1.4e-4).
#[test]
fn in_graph_statistics_equal_host_statistics_on_every_fixture() {
    let ort = ort();
    for name in fixture_names() {
        let (graph, host) = graph_and_host_moments(&name, ort.as_ref());
        let tolerance = if fixture_json(&name)["dtype"] == "float16" { 1e-3 } else { 1e-12 };
        for (l, (g, h)) in graph.iter().zip(&host).enumerate() {
            let diff = max_relative_difference(g, h);
            eprintln!("{name} layer {l}: graph vs host {diff:.2e}");
            assert!(diff < tolerance, "{name} layer {l}: {diff:.2e}");
        }
        assert_eq!(bound_order(&graph), bound_order(&host), "{name}: the bound ranks layers differently");
    }
}

/// Each batch's products in f32, merged in f64: the graph and the host agree to f32 summation
/// order, and both to the all-f64 moments within what f32 products of centred batches err by
/// (about ε_f32 · √(batch tokens) ≈ 7e-7 here; measured ≤ 1.6e-7), with the same bound ranking.
#[test]
fn f32_products_agree_with_f64_moments_on_the_fixtures() {
    let ort = ort();
    for name in ["llama-optimum-past", "gemma2-optimum-past", "llama-genai-int4", "gptneox-optimum-past"] {
        let (graph, host) = graph_and_host_moments_in(name, ort.as_ref(), MomentPrecision::F32);
        let (_, exact) = graph_and_host_moments(name, ort.as_ref());
        for (l, ((g, h), e)) in graph.iter().zip(&host).zip(&exact).enumerate() {
            let (gh, he) = (max_relative_difference(g, h), max_relative_difference(h, e));
            eprintln!("{name} layer {l}: f32 graph vs f32 host {gh:.2e}, f32 host vs f64 {he:.2e}");
            assert!(gh < 1e-5 && he < 1e-5, "{name} layer {l}: {gh:.2e}, {he:.2e}");
        }
        assert_eq!(bound_order(&host), bound_order(&exact), "{name}: f32 products rank layers differently");
        assert_eq!(bound_order(&graph), bound_order(&exact), "{name}: f32 products rank layers differently");
    }
}

/// An engine without device state (tract) runs the same graph, its state passing through the host.
#[test]
fn in_graph_statistics_run_on_tract_too() {
    let tract = tract();
    for name in ["llama-optimum-past", "gemma2-optimum-past"] {
        let (graph, host) = graph_and_host_moments(name, tract.as_ref());
        for (l, (g, h)) in graph.iter().zip(&host).enumerate() {
            let diff = max_relative_difference(g, h);
            assert!(diff < 1e-12, "{name} layer {l}: {diff:.2e}");
        }
    }
}

/// Layers calibrated in separate runs over the same blocks, joined by merge-stats, are one run's
/// statistics: the same activations, the same arithmetic (the measuring graph only exposes fewer
/// tensors). Overlapping ranges, ranges over other data and empty ranges are refused.
#[test]
fn layer_ranges_calibrated_apart_join_into_exactly_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = write_corpus(dir.path());
    for fixture in ["llama-optimum-past", "llama-genai-fp32"] {
        let model = model_path(fixture);
        let calibrate = |out: &Path, extra: &[&str], samples: &str| {
            let mut args = calibrate_args(
                model.to_str().unwrap(),
                corpus.to_str().unwrap(),
                "16",
                samples,
                out.to_str().unwrap(),
            );
            args.extend(extra);
            nbl(&args)
        };
        let ok = |out: std::process::Output| assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let path = |name: &str| dir.path().join(format!("{fixture}-{name}.safetensors"));
        ok(calibrate(&path("whole"), &[], "10"));
        ok(calibrate(&path("first"), &["--layer-range", "0..2"], "10"));
        ok(calibrate(&path("last"), &["--layer-range", "2..99"], "10"));
        assert_eq!(Stats::load(&path("first")).unwrap().layers.len(), 2);
        // Given last first: the joined file lists the layers in order all the same.
        ok(merge_stats(&[&path("last"), &path("first")], &path("joined")));
        let (whole, joined) = (Stats::load(&path("whole")).unwrap(), Stats::load(&path("joined")).unwrap());
        assert_eq!(whole.layers, joined.layers, "{fixture}");
        assert_eq!(whole.fingerprint, joined.fingerprint);
        for (l, (a, b)) in whole.moments.iter().zip(&joined.moments).enumerate() {
            let diff = max_relative_difference(b, a);
            eprintln!("{fixture} layer {l}: joined vs one run {diff:.2e}");
            assert!(diff <= 1e-12, "{fixture} layer {l}: {diff}");
        }

        ok(calibrate(&path("middle"), &["--layer-range", "1..3"], "10"));
        assert_bad_input(
            &merge_stats(&[&path("first"), &path("middle")], &path("bad")),
            "already part of the merge",
        );
        ok(calibrate(&path("last-other-data"), &["--layer-range", "2..3"], "8"));
        assert_bad_input(
            &merge_stats(&[&path("first"), &path("last-other-data")], &path("bad")),
            "other data",
        );
        assert_bad_input(
            &calibrate(&path("bad"), &["--layer-range", "5..9"], "10"),
            "none of the model's layers",
        );
        assert_bad_input(&calibrate(&path("bad"), &["--layer-range", "2..2"], "10"), "is empty");
        assert!(!path("bad").exists());
    }
}

#[test]
fn sharded_calibration_merges_into_exactly_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = write_corpus(dir.path());
    let model = model_path("llama-optimum-past");
    let calibrate = |out: &Path, shard: &str| {
        let mut args = calibrate_args(
            model.to_str().unwrap(),
            corpus.to_str().unwrap(),
            "16",
            "10",
            out.to_str().unwrap(),
        );
        args.extend(["--shard", shard]);
        let out = nbl(&args);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    };
    let whole = dir.path().join("whole.safetensors");
    calibrate(&whole, "0/1");
    let mut shards = Vec::new();
    for i in 0..3 {
        let path = dir.path().join(format!("shard{i}.safetensors"));
        calibrate(&path, &format!("{i}/3"));
        shards.push(path);
    }
    let merged = dir.path().join("merged.safetensors");
    let out = merge_stats(&shards.iter().map(PathBuf::as_path).collect::<Vec<_>>(), &merged);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let (a, b) = (Stats::load(&whole).unwrap(), Stats::load(&merged).unwrap());
    assert_eq!(a.tokens(), 160);
    assert_eq!(a.tokens(), b.tokens());
    assert_eq!(a.fingerprint, b.fingerprint);
    for (l, (x, y)) in a.moments.iter().zip(&b.moments).enumerate() {
        let diff = max_relative_difference(y, x);
        eprintln!("layer {l}: merged vs one run, max relative difference {diff:.2e}");
        assert!(diff <= 1e-9, "layer {l}: {diff}");
    }
    assert_eq!(b.data.len(), 3);

    // A shard merged twice is refused, under its own name or another.
    let copy = dir.path().join("copy.safetensors");
    std::fs::copy(&shards[0], &copy).unwrap();
    let twice = dir.path().join("twice.safetensors");
    for (second, needle) in [(&shards[0], "is given twice"), (&copy, "already part of the merge")] {
        assert_bad_input(&merge_stats(&[&shards[0], second], &twice), needle);
    }
    // So is a whole run merged with itself.
    let whole_copy = dir.path().join("whole-copy.safetensors");
    std::fs::copy(&whole, &whole_copy).unwrap();
    assert_bad_input(&merge_stats(&[&whole, &whole_copy], &twice), "already part of the merge");
    assert!(!twice.exists());
}

#[test]
fn analyze_prints_the_documented_json_and_writes_a_chart() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = write_corpus(dir.path());
    let stats = dir.path().join("stats.safetensors");
    let model = model_path("mistral-optimum-past");
    let out = nbl(&[
        "calibrate",
        model.to_str().unwrap(),
        "--data",
        corpus.to_str().unwrap(),
        "--seq-len",
        "32",
        "--samples",
        "8",
        "--batch",
        "3",
        "-o",
        stats.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("engine: "), "the engine that ran is named");

    let out = nbl(&[
        "analyze",
        stats.to_str().unwrap(),
        "--json",
        "--layers",
        "2",
        "--model",
        model.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["tokens"], 256);
    assert_eq!(json["criterion"], "cca");
    let layers = json["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    let selected = json["selected"].as_array().unwrap();
    assert_eq!(selected.len(), 2);
    for row in layers {
        for key in
            ["bound", "bound_normalized", "residual_energy", "relative_residual", "fit_residual", "cosine"]
        {
            assert!(row[key].as_f64().unwrap().is_finite(), "{key}: {row}");
        }
        let b = row["bound_normalized"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&b), "{row}");
        assert_eq!(row["linearized"].as_bool().unwrap(), selected.contains(&row["layer"]));
    }
    // The selection is the lowest bounds.
    let mut bounds: Vec<(f64, u64)> =
        layers.iter().map(|r| (r["bound"].as_f64().unwrap(), r["layer"].as_u64().unwrap())).collect();
    bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert_eq!(selected[0], bounds[0].1);
    let svg = std::fs::read_to_string(stats.with_extension("svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.matches("<rect x=").count() == 3);

    // The table form.
    let out = nbl(&["analyze", stats.to_str().unwrap(), "--criterion", "cosine"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("criterion cosine"));
}

/// Calibration on 4 blocks of 16 tokens.
fn calibrate_args_16x4<'a>(model: &'a str, data: &'a str, out: &'a str) -> Vec<&'a str> {
    calibrate_args(model, data, "16", "4", out)
}

#[test]
fn bad_calibration_input_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_path("llama-optimum-past");
    let model = model.to_str().unwrap();
    let out_path = dir.path().join("stats.safetensors");
    let out = out_path.to_str().unwrap();
    let corpus = write_corpus(dir.path());

    let missing = dir.path().join("missing.json");
    assert_bad_input(
        &nbl(&calibrate_args_16x4(model, missing.to_str().unwrap(), out)),
        "cannot read data file",
    );

    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, "[]").unwrap();
    assert_bad_input(&nbl(&calibrate_args_16x4(model, empty.to_str().unwrap(), out)), "holds no documents");

    let short = dir.path().join("short.jsonl");
    std::fs::write(&short, "{\"text\": \"Too short.\"}\n").unwrap();
    assert_bad_input(
        &nbl(&calibrate_args_16x4(model, short.to_str().unwrap(), out)),
        "fewer than one sequence",
    );

    let mut args = calibrate_args_16x4(model, corpus.to_str().unwrap(), out);
    args.extend(["--tokenizer", "/nonexistent/tokenizer.json"]);
    assert_bad_input(&nbl(&args), "tokenizer /nonexistent/tokenizer.json does not exist");

    // A model directory without a tokenizer, and text data.
    let bare = dir.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    std::fs::copy(model, bare.join("model.onnx")).unwrap();
    std::fs::copy(
        fixtures_dir().join("llama-optimum-past/generation_config.json"),
        bare.join("generation_config.json"),
    )
    .unwrap();
    let bare_model = bare.join("model.onnx");
    assert_bad_input(
        &nbl(&calibrate_args_16x4(bare_model.to_str().unwrap(), corpus.to_str().unwrap(), out)),
        "no tokenizer",
    );

    // A tokenizer with more tokens than the model's 512-row embedding table.
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..600).map(|i| (format!("w{i}"), serde_json::json!(i))).collect();
    let big = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    });
    let big_path = dir.path().join("big-tokenizer.json");
    std::fs::write(&big_path, big.to_string()).unwrap();
    let mut args = calibrate_args_16x4(model, corpus.to_str().unwrap(), out);
    args.extend(["--tokenizer", big_path.to_str().unwrap()]);
    assert_bad_input(&nbl(&args), "more than the model's embedding table (512 rows)");

    // Products in f16 would lose what the bounds resolve: only f64 and f32 (and auto) exist.
    let mut args = calibrate_args_16x4(model, corpus.to_str().unwrap(), out);
    args.extend(["--moment-precision", "f16"]);
    assert_bad_input(&nbl(&args), "invalid value 'f16' for '--moment-precision");

    // Output under a regular file: refused before any work (missing directories are created:
    // tests/model_io.rs).
    let under_a_file = dir.path().join("empty.json/stats.safetensors");
    assert_bad_input(
        &nbl(&calibrate_args_16x4(model, corpus.to_str().unwrap(), under_a_file.to_str().unwrap())),
        "cannot create output directory",
    );
    assert_bad_input(&nbl(&calibrate_args_16x4(model, corpus.to_str().unwrap(), model)), "over the input");
    assert!(!out_path.exists(), "no statistics written by a failed run");
}

#[test]
fn non_finite_activations_are_refused_naming_the_layer() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = write_corpus(dir.path());
    // The embedding table overflows: every X of layer 0 is infinite.
    let mut model = Model::load(model_path("llama-optimum-past")).unwrap();
    let graph = model.graph_mut();
    let table = graph.initializer.iter_mut().find(|t| t.name() == "model.embed_tokens.weight").unwrap();
    let n = table.raw_data.as_ref().unwrap().len() / 4;
    table.raw_data =
        Some(std::iter::repeat_n(f32::INFINITY.to_le_bytes(), n).flatten().collect::<Vec<u8>>().into());
    for f in ["tokenizer.json", "generation_config.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures_dir().join("llama-optimum-past").join(f), dir.path().join(f)).unwrap();
    }
    let broken = dir.path().join("model.onnx");
    model.save(&broken).unwrap();
    let out_path = dir.path().join("stats.safetensors");
    let out = nbl(&calibrate_args_16x4(
        broken.to_str().unwrap(),
        corpus.to_str().unwrap(),
        out_path.to_str().unwrap(),
    ));
    assert_bad_input(&out, "layer 0: tensor \"/model/embed_tokens/Gather_output_0\" holds inf");
    assert!(!out_path.exists());
}

#[test]
fn statistics_of_another_model_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = write_corpus(dir.path());
    let stats = dir.path().join("stats.safetensors");
    let model = model_path("llama-optimum-past");
    let out =
        nbl(&calibrate_args_16x4(model.to_str().unwrap(), corpus.to_str().unwrap(), stats.to_str().unwrap()));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let other = model_path("qwen2-optimum-past");
    let out = nbl(&["analyze", stats.to_str().unwrap(), "--model", other.to_str().unwrap()]);
    assert_bad_input(&out, "was measured on another model");
    let out = nbl(&["analyze", model.to_str().unwrap()]);
    assert_bad_input(&out, "is not an nbl-onnx statistics file");
    let out = nbl(&["analyze", stats.to_str().unwrap(), "--layers", "7"]);
    assert_bad_input(&out, "--layers 7 is more than the 3 layers");
}

/// Calibrates a fixture on `corpus` (8 blocks of 32 tokens) and returns `analyze --json`.
fn analysis_of(fixture: &str, corpus: &Path, dir: &Path) -> serde_json::Value {
    let stats = dir.join(format!("{fixture}.safetensors"));
    let model = model_path(fixture);
    let mut args =
        calibrate_args_16x4(model.to_str().unwrap(), corpus.to_str().unwrap(), stats.to_str().unwrap());
    let at = args.iter().position(|a| *a == "--seq-len").unwrap();
    args.splice(at..at + 4, ["--seq-len", "32", "--samples", "8"]);
    let out = nbl(&args);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = nbl(&["analyze", stats.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn optimum_and_genai_exports_of_one_model_rank_layers_alike() {
    // The Llama fixtures share their weights; the exports differ in everything else (decomposed vs
    // GroupQueryAttention, Add vs SkipSimplifiedLayerNormalization junctions, fused QKV).
    let dir = tempfile::tempdir().unwrap();
    let corpus = write_corpus(dir.path());
    let optimum = analysis_of("llama-optimum-past", &corpus, dir.path());
    let genai = analysis_of("llama-genai-fp32", &corpus, dir.path());
    assert_eq!(optimum["tokens"], genai["tokens"]);
    assert_eq!(optimum["order"], genai["order"], "layer ranking");
    let bounds = |a: &serde_json::Value| -> Vec<f64> {
        a["layers"].as_array().unwrap().iter().map(|r| r["bound"].as_f64().unwrap()).collect()
    };
    for (l, (o, g)) in bounds(&optimum).iter().zip(bounds(&genai)).enumerate() {
        eprintln!("layer {l}: bound {o:.6} (Optimum) vs {g:.6} (GenAI)");
        assert!((o - g).abs() <= 1e-4 * o.abs().max(1.0), "layer {l}: {o} vs {g}");
    }
}

#[test]
fn in_graph_statistics_refuse_opsets_before_13() {
    let mut model = Model::load(model_path("llama-optimum-past")).unwrap();
    let layout = find_layout(&model).unwrap();
    for opset in &mut model.proto.opset_import {
        if opset.domain().is_empty() {
            opset.version = Some(12);
        }
    }
    let err = match nbl_onnx::calibrate::in_graph::MomentsGraph::new(
        &model,
        layout.hidden_size,
        &layer_tensors(&layout),
        MomentPrecision::F64,
    ) {
        Ok(_) => panic!("an opset-12 model was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("opset 13") && err.contains("moments on the host"), "{err}");
}

/// `--holdout-every N` keeps every N-th block out of the fit; analyze then shows each map's error on
/// those blocks beside its in-sample error. Fitted on 1.25 tokens per dimension, every map errs more
/// on the held-out text. A held-out file does not merge with one without.
#[test]
fn held_out_sequences_show_what_the_fit_hides() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = write_corpus(dir.path());
    let model = model_path("llama-optimum-past");
    let calibrate = |out: &Path, extra: &[&str]| {
        let mut args = calibrate_args(
            model.to_str().unwrap(),
            corpus.to_str().unwrap(),
            "16",
            "10",
            out.to_str().unwrap(),
        );
        args.extend(extra);
        nbl(&args)
    };
    let held = dir.path().join("held.safetensors");
    let out = calibrate(&held, &["--holdout-every", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stats = Stats::load(&held).unwrap();
    assert_eq!(stats.tokens(), 80);
    assert!(stats.heldout.as_ref().unwrap().iter().all(|m| m.count == 80));

    let out = nbl(&["analyze", held.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let analysis: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for layer in analysis["layers"].as_array().unwrap() {
        let (heldout, fit) =
            (layer["heldout_residual"].as_f64().unwrap(), layer["fit_residual"].as_f64().unwrap());
        assert!(heldout > fit, "layer {}: held out {heldout}, in sample {fit}", layer["layer"]);
    }
    let table = String::from_utf8(nbl(&["analyze", held.to_str().unwrap()]).stdout).unwrap();
    assert!(table.contains("held out"), "{table}");

    let plain = dir.path().join("plain.safetensors");
    assert_eq!(calibrate(&plain, &["--shard", "0/2"]).status.code(), Some(0));
    let merged = dir.path().join("merged.safetensors");
    assert_bad_input(&merge_stats(&[&held, &plain], &merged), "held-out moments");
    assert_bad_input(&calibrate(&merged, &["--holdout-every", "20"]), "holds out none");
    assert!(!merged.exists());
}

/// The moments of a layer and of a run are those of X = the stream entering it and Y = the stream
/// after it minus X, PyTorch's streams giving both; formed in the graph or on the host alike
/// (the difference is one `Sub` node in the measuring graph).
#[test]
fn unit_moments_are_those_of_the_pytorch_streams() {
    use nbl_onnx::calibrate::measurement;
    use nbl_onnx::unit::Unit;
    let ort = ort();
    for name in ["llama-optimum-past", "gptneox-optimum-past", "llama-genai-fp32"] {
        let model = Model::load(model_path(name)).unwrap();
        let layout = find_layout(&model).unwrap();
        let d = layout.hidden_size;
        let units = [Unit::layer(1), Unit::run(0, 2), Unit::mlp(2), Unit::fold(1, 1)];
        let (copy, taps) = measurement(&model, &layout, &units).unwrap();
        assert_eq!(taps.len(), layout.layers.len() + units.len());
        let measuring = copy.as_ref().unwrap();
        let moments =
            |on| calibrate(measuring, d, &taps, ort.as_ref(), &reference_sequences(name), 1, on).unwrap();
        let (host, graph) = (moments(f64_on(MomentsOn::Host)), moments(f64_on(MomentsOn::Graph)));
        let reference = reference(name);
        let stream = |l: usize| reference[&format!("layers.{l}.x")].to_f32().unwrap();
        // A fold's X is layer 0's MLP term (the stream after layer 0 minus its input and
        // attention term, in sequential and parallel blocks alike), its Y that term plus what
        // layer 1 adds.
        let mlp0 = stream(1) - &stream(0) - &reference["layers.0.y"].to_f32().unwrap();
        let fold = (mlp0.clone(), &stream(2) - &stream(1) + &mlp0);
        let spans = [(Unit::layer(1), (1, 2)), (Unit::run(0, 2), (0, 2))];
        let pairs =
            spans.map(|(unit, (first, after))| (unit, (stream(first), &stream(after) - &stream(first))));
        for (unit, (x, y)) in pairs.into_iter().chain([(Unit::fold(1, 1), fold)]) {
            let mut expected = Moments::new(d);
            expected.add_batch(x.as_slice().unwrap(), y.as_standard_layout().as_slice().unwrap());
            let at = taps.iter().position(|t| t.unit() == unit).unwrap();
            let (h, g) = (
                max_relative_difference(&host[at], &expected),
                max_relative_difference(&graph[at], &host[at]),
            );
            eprintln!("{name} {unit}: host vs PyTorch {h:.2e}, graph vs host {g:.2e}");
            // Y is a difference of streams: the engines' rounding of the stream after the unit
            // (relative 1e-6 of a stream that grows to 20x the embedding X) is larger next to it.
            assert!(h < 5.0 * STATS_TOLERANCE && g < 1e-12, "{name} {unit}: {h:.2e}, {g:.2e}");
        }
        // The MLP's X is the stream after the attention's junction: in a sequential block PyTorch's
        // x + y; in a parallel one, the layer's input.
        let at = taps.iter().position(|t| t.unit() == Unit::mlp(2)).unwrap();
        let x2 = stream(2);
        let parallel = layout.layers[2].parallel;
        let mlp_x = if parallel { x2 } else { &x2 + &reference["layers.2.y"].to_f32().unwrap() };
        let mean: Vec<f64> = mlp_x
            .to_shape((mlp_x.len() / d, d))
            .unwrap()
            .mean_axis(ndarray::Axis(0))
            .unwrap()
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        let diff = mean.iter().zip(&host[at].mean_x).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(diff < 1e-4, "{name}: the MLP's X mean is {diff} off PyTorch's");
    }
}
