//! The rewrite on every fixture: linearised layers compute exactly `X Wᵀ + b` from the statistics,
//! nothing else changes, zero layers changes nothing at all, and bad requests are refused.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use nbl_onnx::cost::Cost;
use nbl_onnx::detect::find_layout;
use nbl_onnx::nbl::fit_layer;
use nbl_onnx::onnx::Model;
use nbl_onnx::stats::Stats;

/// Runs a model on its fixture's reference inputs (restricted to the inputs the model still has),
/// exposing `extra`.
fn run(path: &Path, fixture: &str, extra: &[String]) -> (Vec<String>, Vec<nbl_onnx::onnx::Tensor>) {
    run_model(&Model::load(path).unwrap(), fixture, extra)
}

fn run_model(model: &Model, fixture: &str, extra: &[String]) -> (Vec<String>, Vec<nbl_onnx::onnx::Tensor>) {
    let names: Vec<&str> = model.graph().input.iter().map(|v| v.name()).collect();
    let inputs: Vec<_> = reference_inputs(&reference(fixture))
        .into_iter()
        .filter(|(n, _)| names.contains(&n.as_str()))
        .collect();
    let mut session = ort().load(model, extra).unwrap();
    let outputs = session.run(&inputs).unwrap();
    (session.output_names().to_vec(), outputs)
}

#[test]
fn linearised_layers_compute_x_w_plus_b_from_the_statistics() {
    for fixture in ["llama-optimum-past", "llama-genai-fp32", "phi3-optimum-past"] {
        let ws = workspace(fixture);
        let out = rewrite(&ws, &["--layer-ids", "1,2"]);
        let layout = find_layout(&Model::load(&ws.model).unwrap()).unwrap();
        let stats = Stats::load(&ws.stats).unwrap();
        let extra: Vec<String> =
            [1, 2].iter().flat_map(|&l| [layout.layers[l].x.clone(), format!("nbl.layers.{l}.y")]).collect();
        let (names, outputs) = run(&out, fixture, &extra);
        let get = |n: &str| outputs[names.iter().position(|o| o == n).unwrap()].to_f64().unwrap();
        for l in [1usize, 2] {
            // W and b recomputed here from the statistics, y = x Wᵀ + b evaluated in f64.
            let fit = fit_layer(l, stats.moments[l].clone(), nbl_onnx::nbl::DEFAULT_LAMBDA, false).unwrap();
            let x = get(&layout.layers[l].x);
            let y = get(&format!("nbl.layers.{l}.y"));
            let d = 64;
            let x = x.as_slice().unwrap();
            let y = y.as_slice().unwrap();
            let mut worst: f64 = 0.0;
            let mut scale: f64 = 0.0;
            for (xt, yt) in x.chunks(d).zip(y.chunks(d)) {
                for (i, got) in yt.iter().enumerate() {
                    let want: f64 =
                        fit.b[i] + xt.iter().enumerate().map(|(j, xj)| fit.w[(i, j)] * xj).sum::<f64>();
                    worst = worst.max((got - want).abs());
                    scale = scale.max(want.abs());
                }
            }
            eprintln!("{fixture} layer {l}: max |y - (x Wᵀ + b)| = {worst:.2e} (max |y| {scale:.2})");
            // f32 weights and an f32 dot product of length 64: a few ulps of the largest term.
            assert!(worst <= 1e-5 * scale.max(1.0) * 8.0, "{fixture} layer {l}: {worst}");
        }
    }
}

#[test]
fn zero_layers_leave_every_output_bit_for_bit() {
    for fixture in fixture_names() {
        let ws = workspace(&fixture);
        let out = rewrite(&ws, &["--layers", "0", "--allow-noop"]);
        // The output carries no shape annotations (value_info), and ONNX Runtime's fusions can
        // depend on them (1 ulp on gptneox-dynamo): the same nodes without them are the reference.
        let original = Model::load(&ws.model).unwrap();
        let rewritten = Model::load(&out).unwrap();
        assert!(rewritten.graph().value_info.is_empty(), "{fixture}");
        let (_, before) = run_model(&original.without_value_info(), &fixture, &[]);
        let (_, after) = run(&out, &fixture, &[]);
        for (a, b) in before.iter().zip(&after) {
            assert_eq!(a.to_le_bytes(), b.to_le_bytes(), "{fixture}");
        }
    }
}

#[test]
fn layers_before_the_first_linearised_one_are_untouched_and_the_interface_only_loses_their_cache() {
    for fixture in fixture_names() {
        let ws = workspace(&fixture);
        let out = rewrite(&ws, &["--layer-ids", "2"]);
        let original = Model::load(&ws.model).unwrap();
        let layout = find_layout(&original).unwrap();
        let rewritten = Model::load(&out).unwrap();
        let names = |m: &Model, outputs: bool| -> Vec<String> {
            let list = if outputs { &m.graph().output } else { &m.graph().input };
            list.iter().map(|v| v.name().to_string()).collect()
        };
        let kv_in = &layout.layers[2].kv_inputs;
        let kv_out = &layout.layers[2].kv_outputs;
        let expected_in: Vec<String> =
            names(&original, false).into_iter().filter(|n| !kv_in.contains(n)).collect();
        let expected_out: Vec<String> =
            names(&original, true).into_iter().filter(|n| !kv_out.contains(n)).collect();
        assert_eq!(names(&rewritten, false), expected_in, "{fixture}");
        assert_eq!(names(&rewritten, true), expected_out, "{fixture}");
        let meta: Vec<(&str, &str)> =
            rewritten.proto.metadata_props.iter().map(|p| (p.key(), p.value())).collect();
        assert!(meta.contains(&("nbl.layers", "2")), "{fixture}: {meta:?}");

        let extra: Vec<String> =
            [0, 1].iter().flat_map(|&l| [layout.layers[l].x.clone(), layout.layers[l].y.clone()]).collect();
        let (names_a, a) = run(&ws.model, &fixture, &extra);
        let (names_b, b) = run(&out, &fixture, &extra);
        for name in &extra {
            let ta = &a[names_a.iter().position(|n| n == name).unwrap()];
            let tb = &b[names_b.iter().position(|n| n == name).unwrap()];
            assert_eq!(ta.to_le_bytes(), tb.to_le_bytes(), "{fixture}: {name} changed");
        }
    }
}

#[test]
fn every_fixture_rewrites_with_one_and_all_but_one_layer_and_still_runs() {
    for fixture in fixture_names() {
        let ws = workspace(&fixture);
        let original_model = Model::load(&ws.model).unwrap();
        let original = Cost::of(&original_model, find_layout(&original_model).ok().as_ref()).unwrap();
        for (k, replace) in [("1", "linear"), ("2", "linear"), ("2", "drop")] {
            let out = rewrite(&ws, &["--layers", k, "--replace", replace]);
            let (names, outputs) = run(&out, &fixture, &[]);
            let logits = &outputs[names.iter().position(|n| n == "logits").unwrap()];
            assert_eq!(logits.shape()[..2], [2, 7], "{fixture}");
            assert!(logits.to_f32().unwrap().iter().all(|v| v.is_finite()), "{fixture} k={k} {replace}");
            let rewritten = Model::load(&out).unwrap();
            let layout = find_layout(&rewritten).unwrap();
            assert_eq!(layout.layers.len(), 3 - k.parse::<usize>().unwrap(), "{fixture}: attention left");
            // Each replaced layer loses its attention's projections (q, k, v and o, as PyTorch
            // counts them) and, when linearised, gains its d×d map.
            let k_layers = k.parse::<u64>().unwrap();
            let projections = fixture_json(&fixture)["attention_weights_per_layer"].as_u64().unwrap();
            let per_layer = projections - if replace == "linear" { 64 * 64 } else { 0 };
            let cost = Cost::of(&rewritten, Some(&layout)).unwrap();
            assert_eq!(
                cost.weight_macs_per_token,
                original.weight_macs_per_token - k_layers * per_layer,
                "{fixture} k={k} {replace}"
            );
            assert_eq!(cost.attention_widths, vec![64; 3 - k_layers as usize], "{fixture} k={k} {replace}");
            let report: serde_json::Value =
                serde_json::from_slice(&std::fs::read(ws.dir.path().join("model.nbl.json")).unwrap())
                    .unwrap();
            assert_eq!(report["selected"].as_array().unwrap().len(), k.parse::<usize>().unwrap());
            let rw = &report["rewrite"];
            assert!(rw["nodes_after"].as_u64() < rw["nodes_before"].as_u64(), "{fixture}: {rw}");
            // Weights as values: an int4 MatMulNBits matrix counts K×N, not its packed bytes. A layer
            // loses at least its projections and at most a few d-vectors more (biases, a norm scale).
            let removed = rw["params_removed"].as_u64().unwrap();
            assert!(
                (k_layers * projections..=k_layers * (projections + 8 * 64)).contains(&removed),
                "{fixture} k={k}: {removed} weights removed, projections {projections} per layer"
            );
            let added = if replace == "linear" { k_layers * (64 * 64 + 64) } else { 0 };
            assert_eq!(rw["params_added"].as_u64().unwrap(), added, "{fixture}");
            let (before, after) = (&rw["weights_before"], &rw["weights_after"]);
            assert_eq!(
                after["weights"].as_u64().unwrap(),
                before["weights"].as_u64().unwrap() - removed + added,
                "{fixture}: {rw}"
            );
            if fixture_json(&fixture)["has_kv_cache"].as_bool().unwrap() {
                assert!(rw["kv_bytes_per_token_after"].as_u64() < rw["kv_bytes_per_token_before"].as_u64());
            }
        }
    }
}

#[test]
fn bad_rewrite_requests_are_refused_and_the_input_is_untouched() {
    let ws = workspace("llama-optimum-past");
    let before = std::fs::read(&ws.model).unwrap();
    let model = ws.model.to_str().unwrap();
    let stats = ws.stats.to_str().unwrap();
    let other = workspace("qwen2-optimum-past");
    let under_a_file = format!("{model}/sub/out.onnx");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--stats", stats, "--layers", "4"], "--layers 4 is more than the 3 attention layers"),
        (vec!["--stats", stats, "--layer-ids", "1,9"], "layer 9 does not exist"),
        (vec!["--stats", other.stats.to_str().unwrap()], "was measured on another model"),
        (vec!["--stats", stats, "-o", model], "over the input"),
        (vec!["--stats", stats, "-o", &under_a_file], "is not a directory"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["rewrite", model];
        args.extend(extra);
        let out = nbl(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: expected {needle:?} in {err}");
    }
    assert_eq!(std::fs::read(&ws.model).unwrap(), before, "the input model is never modified");
    let leftovers: Vec<_> = std::fs::read_dir(ws.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("nbl") || n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "nothing written by refused requests: {leftovers:?}");
}

/// A GenAI model rewritten into its own directory gets its `genai_config.json` (the remaining KV
/// layers keep their numbers, which onnxruntime-genai takes as the model declares them) and its
/// tokenizer files.
#[test]
fn genai_config_follows_the_rewritten_graph() {
    let ws = workspace("llama-genai-fp32");
    let out_dir = ws.dir.path().join("nbl");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("model.onnx");
    rewrite(&ws, &["--layer-ids", "0,2", "-o", out.to_str().unwrap()]);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("genai_config.json")).unwrap()).unwrap();
    let decoder = &config["model"]["decoder"];
    assert_eq!(decoder["num_hidden_layers"], 3, "the model still has three layers");
    assert_eq!(decoder["filename"], "model.onnx");
    let model = Model::load(&out).unwrap();
    let inputs: Vec<&str> = model.graph().input.iter().map(|v| v.name()).collect();
    let outputs: Vec<&str> = model.graph().output.iter().map(|v| v.name()).collect();
    assert_eq!(inputs, ["input_ids", "attention_mask", "past_key_values.1.key", "past_key_values.1.value"]);
    assert_eq!(outputs, ["logits", "present.1.key", "present.1.value"]);
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.onnx.data"] {
        assert!(out_dir.join(f).is_file(), "{f} beside the rewritten model");
    }
    let (code, report) = check(&out, &["--decode-steps", "3"]);
    assert_eq!(code, Some(0), "{report}");
    // The input's directory is left alone.
    let original: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ws.dir.path().join("genai_config.json")).unwrap()).unwrap();
    assert_eq!(original["model"]["decoder"]["num_hidden_layers"], 3);
}

/// An interrupted rewrite (Ctrl-C while the weights are copied) leaves neither the output nor a
/// temporary file, and the input untouched.
#[test]
fn an_interrupted_rewrite_leaves_no_file_behind() {
    use common::synthetic::{Shape, synthetic_model, synthetic_stats};
    let shape = Shape { d: 256, layers: 4, vocab: 262_144, mlp: 4096 }; // ~0.3 GB of weights
    let dir = tempfile::tempdir().unwrap();
    synthetic_model(dir.path(), shape);
    let model = dir.path().join("model.onnx");
    let stats = dir.path().join("stats.safetensors");
    synthetic_stats(&Model::load(&model).unwrap(), &stats, shape);
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_nbl-onnx"))
        .args(["rewrite", model.to_str().unwrap(), "--stats", stats.to_str().unwrap(), "--layers", "1", "-o"])
        .arg(out_dir.join("model.onnx"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt as soon as the weights are being written.
    let started = std::time::Instant::now();
    while std::fs::read_dir(&out_dir).unwrap().next().is_none() && started.elapsed().as_secs() < 30 {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    // SAFETY: signalling our own child process by its id.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) }, 0);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&out_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
}

/// A rewrite into a directory of its own writes one set of files: the model's data, the model, the
/// GenAI config, the tokenizer and config copies and the report. A SIGTERM before any of them gets
/// its name (the writer pauses there in this test) leaves none of them, nor the directory it made,
/// and the message says what was removed.
#[test]
fn an_output_set_interrupted_between_its_files_leaves_nothing() {
    let ws = workspace("llama-genai-fp32");
    let out_root = ws.dir.path().join("out");
    std::fs::create_dir(&out_root).unwrap();
    let out_dir = out_root.join("new");
    let phases = [
        "model.onnx.data",
        "model.onnx",
        "genai_config.json",
        "tokenizer.json",
        "config.json",
        "model.nbl.json",
    ];
    for (i, phase) in phases.iter().enumerate() {
        let child = Command::new(env!("CARGO_BIN_EXE_nbl-onnx"))
            .args([
                "rewrite",
                ws.model.to_str().unwrap(),
                "--stats",
                ws.stats.to_str().unwrap(),
                "--layers",
                "1",
                "-o",
            ])
            .arg(out_dir.join("model.onnx"))
            .env("NBL_TEST_PAUSE_BEFORE_RENAME", phase)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let marker = out_dir.join(format!("{phase}.paused"));
        let started = std::time::Instant::now();
        while !marker.exists() && started.elapsed().as_secs() < 60 {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(marker.exists(), "{phase}: the writer never paused there");
        let written: Vec<String> = phases[..i].iter().map(|p| p.to_string()).collect();
        for name in &written {
            assert!(out_dir.join(name).is_file(), "{phase}: {name} should have its name by now");
        }
        // SAFETY: signalling our own child process by its id.
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{phase}: {err}");
        assert!(err.contains("interrupted; no output is left"), "{phase}: {err}");
        for name in &written {
            assert!(
                err.contains(&out_dir.join(name).display().to_string()),
                "{phase}: {name} not named: {err}"
            );
        }
        assert!(!out_dir.exists(), "{phase}: {:?} left", std::fs::read_dir(&out_dir).map(|d| d.count()));
        assert_eq!(std::fs::read_dir(&out_root).unwrap().count(), 0, "{phase}");
    }
}

/// Layer 0's cache is also read outside the block (the past length for the causal mask): with it
/// removed, those readers use a kept layer's cache and decoding still works.
#[test]
fn readers_of_a_removed_cache_are_redirected_to_a_kept_layer() {
    let ws = workspace("llama-optimum-past");
    let original = Model::load(&ws.model).unwrap();
    let index = nbl_onnx::onnx::GraphIndex::new(original.graph()).unwrap();
    let past0 = index.id("past_key_values.0.key").unwrap();
    assert!(index.consumers(past0).len() > 1, "the fixture reads layer 0's cache outside the block");
    let out = rewrite(&ws, &["--layer-ids", "0"]);
    let rewritten = Model::load(&out).unwrap();
    assert!(!rewritten.graph().input.iter().any(|v| v.name().starts_with("past_key_values.0.")));
    let (code, report) = check(&out, &["--decode-steps", "4"]);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(decoded(&report, "onnxruntime").len(), 4);
    assert_eq!(decoded(&report, "tract"), decoded(&report, "onnxruntime"));
}

/// Without --stats the model is calibrated first, with the calibrate options.
#[test]
fn rewrite_calibrates_inline_without_statistics() {
    let ws = workspace("qwen2-optimum-past");
    let corpus = &ws.corpus;
    let out = nbl(&[
        "rewrite",
        ws.model.to_str().unwrap(),
        "--data",
        corpus.to_str().unwrap(),
        "--seq-len",
        "32",
        "--samples",
        "8",
        "--layers",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ws.dir.path().join("model.nbl.json")).unwrap()).unwrap();
    assert_eq!(report["tokens"], 256);
    assert_eq!(report["selected"].as_array().unwrap().len(), 1);
    // The same statistics as calibrate's: the same choice as from the stats file.
    let from_file = rewrite(&ws, &["--layers", "1", "-o", ws.dir.path().join("b.onnx").to_str().unwrap()]);
    let report_b: serde_json::Value =
        serde_json::from_slice(&std::fs::read(from_file.with_file_name("b.nbl.json")).unwrap()).unwrap();
    assert_eq!(report["selected"], report_b["selected"]);
}

/// `--kv keep` leaves the model's interface exactly as it was: the replaced layers' cache is still
/// computed and returned, so runtimes with a fixed cache layout keep working.
#[test]
fn kv_keep_leaves_the_interface_unchanged() {
    let ws = workspace("llama-optimum-past");
    let out = rewrite(&ws, &["--layer-ids", "1", "--kv", "keep"]);
    let names = |path: &Path| {
        let m = Model::load(path).unwrap();
        let inputs: Vec<String> = m.graph().input.iter().map(|v| v.name().to_string()).collect();
        let outputs: Vec<String> = m.graph().output.iter().map(|v| v.name().to_string()).collect();
        (inputs, outputs)
    };
    assert_eq!(names(&out), names(&ws.model));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ws.dir.path().join("model.nbl.json")).unwrap()).unwrap();
    assert_eq!(report["rewrite"]["kv_bytes_per_token_after"], report["rewrite"]["kv_bytes_per_token_before"]);
    let (code, check_report) = check(&out, &["--decode-steps", "3"]);
    assert_eq!(code, Some(0), "{check_report}");
    assert_eq!(decoded(&check_report, "onnxruntime").len(), 3);
}

/// The rewrite computes what PyTorch computes with the same layer's attention term replaced by
/// `h Wᵀ + b` of the layer input `h` (saved with each fixture as `patched.*`): in a parallel block
/// `h + mlp(norm(h)) + W h + b`, with sandwich norms and residual multipliers where the family has
/// them. A wrong X, a wrong Y (an MLP replaced with the attention) or a wrong junction shows here.
#[test]
fn every_rewrite_computes_what_the_patched_pytorch_model_computes() {
    use nbl_onnx::fit::LinearMap;
    use nbl_onnx::rewrite::{KvCache, Replacement, RewriteOptions, UnitEdit, apply};
    use nbl_onnx::unit::Unit;
    for fixture in fixture_names() {
        let reference = reference(&fixture);
        let patched = |key: &str| {
            reference.get(&format!("patched.{key}")).unwrap_or_else(|| panic!("{fixture}: no patched.{key}"))
        };
        let layer = patched("layer").to_f64().unwrap()[0] as usize;
        let w = patched("weight").to_f64().unwrap();
        let b: Vec<f64> = patched("bias").to_f64().unwrap().iter().copied().collect();
        let w = faer::Mat::from_fn(w.shape()[0], w.shape()[1], |i, j| w[[i, j]]);

        let mut model = Model::load(model_path(&fixture)).unwrap();
        let layout = find_layout(&model).unwrap();
        let edit = UnitEdit {
            site: layout.unit_site(Unit::attention(layer)).unwrap(),
            map: Some(LinearMap { w, b, second_moment: None }),
        };
        apply(
            &mut model,
            &layout,
            vec![Ok(edit)],
            RewriteOptions::float(&layout, Replacement::Linear, KvCache::Drop),
            &[],
        )
        .unwrap();
        // As in the X/Y test: the builder's int4 graph computes in f32 against its f32 reference.
        for node in &mut model.graph_mut().node {
            for attr in node.attribute.iter_mut().filter(|a| a.name() == "accuracy_level") {
                attr.i = Some(1);
            }
        }
        let declared: Vec<&str> = model.graph().input.iter().map(|v| v.name()).collect();
        let inputs: Vec<_> = reference_inputs(&reference)
            .into_iter()
            .filter(|(n, _)| declared.contains(&n.as_str()))
            .collect();
        let mut session = ort().load(&model, &[]).unwrap();
        let outputs = session.run(&inputs).unwrap();
        let logits = &outputs[session.output_names().iter().position(|n| n == "logits").unwrap()];
        let (diff, scale) = max_abs_diff(logits, patched("logits"));
        let tolerance = tolerance(&fixture);
        let cos = cosine(logits, patched("logits"));
        eprintln!(
            "{fixture}: layer {layer} replaced, logits max abs diff {diff:.2e} from patched PyTorch (max {scale:.2}), \
             cosine {cos:.6}"
        );
        if quantised_activations(&fixture) {
            assert!(cos >= QUANTISED_MIN_COSINE, "{fixture}: cosine {cos}");
        } else {
            assert!(diff <= tolerance * scale.max(1.0), "{fixture}: {diff} (max |logit| {scale})");
        }
    }
}

/// `rewrite MODEL` alone does the whole job: the built-in C4 sample calibrates, at least one layer
/// is chosen (a quarter of 3 rounds to none), the choice is explained, and a new output directory is
/// made.
#[test]
fn rewrite_with_nothing_but_the_model_uses_the_built_in_sample() {
    let ws = workspace("llama-optimum-past");
    let out = ws.dir.path().join("new/dir/model.onnx");
    // Short blocks keep the test fast; the data is the built-in sample all the same.
    let run = nbl(&[
        "rewrite",
        ws.model.to_str().unwrap(),
        "--seq-len",
        "64",
        "--samples",
        "8",
        "-o",
        out.to_str().unwrap(),
    ]);
    let err = stderr(&run);
    assert_eq!(run.status.code(), Some(0), "{err}");
    assert!(err.contains("data: built-in C4 sample, documents 0-199"), "{err}");
    assert!(err.contains("chose 1 of 3 layers"), "{err}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.with_file_name("model.nbl.json")).unwrap()).unwrap();
    assert_eq!(report["tokens"], 512);
    assert_eq!(report["selected"].as_array().unwrap().len(), 1);
    assert!(Model::load(&out).is_ok());
}

/// An int4 export's maps come out int4 (`--weight-format auto`): a `MatMulNBits` with the
/// model's block size and accuracy level, whose integers and scales, unpacked here by the
/// operator's specification, are `W` rounded to nearest; the layer computes `x Qᵀ + b`.
#[test]
fn int4_maps_are_matmulnbits_of_w_rounded_block_by_block() {
    let ws = workspace("llama-genai-int4");
    let out = rewrite(&ws, &["--layer-ids", "1", "--quantizer", "rtn"]);
    let mut model = Model::load(&out).unwrap();
    let graph = model.graph();
    let node = graph.node.iter().find(|n| n.output[0] == "nbl.layers.1.matmul").unwrap();
    assert_eq!((node.op_type(), node.domain()), ("MatMulNBits", "com.microsoft"));
    let attr = |name: &str| node.attribute.iter().find(|a| a.name() == name).unwrap().i();
    assert_eq!(
        (attr("K"), attr("N"), attr("bits"), attr("block_size"), attr("accuracy_level")),
        (64, 64, 4, 32, 4)
    );
    let tensor = |name: &str| {
        let t = graph.initializer.iter().find(|t| t.name() == name).unwrap();
        model.tensor(t).unwrap()
    };
    let (packed, scales) = (tensor(&node.input[1]), tensor(&node.input[2]));
    let nbl_onnx::onnx::Tensor::U8(packed) = packed else { panic!("packed uint8") };
    assert_eq!(packed.shape(), [64, 2, 16]);
    let scales = scales.to_f64().unwrap();
    // W[n, k] = (q - 8) · scale[n, k / 32], q the k-th nibble of row n, low nibble first.
    let q = |n: usize, k: usize| {
        let byte = packed[[n, k / 32, (k % 32) / 2]];
        if k.is_multiple_of(2) { byte & 0x0F } else { byte >> 4 }
    };
    let dequantised = faer::Mat::from_fn(64, 64, |n, k| {
        (f64::from(q(n, k)) - 8.0) * scales.as_slice().unwrap()[n * 2 + k / 32]
    });
    let stats = Stats::load(&ws.stats).unwrap();
    let fit = fit_layer(1, stats.moments[1].clone(), nbl_onnx::nbl::DEFAULT_LAMBDA, false).unwrap();
    for n in 0..64 {
        for k in 0..64 {
            let step = scales.as_slice().unwrap()[n * 2 + k / 32];
            assert!((fit.w[(n, k)] - dequantised[(n, k)]).abs() <= step / 2.0 * 1.0001, "({n}, {k})");
        }
    }
    // Computed in f32 (accuracy_level 1) against x Qᵀ + b in f64.
    for node in &mut model.graph_mut().node {
        for a in node.attribute.iter_mut().filter(|a| a.name() == "accuracy_level") {
            a.i = Some(1);
        }
    }
    let layout = find_layout(&Model::load(&ws.model).unwrap()).unwrap();
    let x_name = layout.layers[1].x.clone();
    let names: Vec<&str> = model.graph().input.iter().map(|v| v.name()).collect();
    let inputs: Vec<_> = reference_inputs(&reference("llama-genai-int4"))
        .into_iter()
        .filter(|(n, _)| names.contains(&n.as_str()))
        .collect();
    let mut session = ort().load(&model, &[x_name.clone(), "nbl.layers.1.y".into()]).unwrap();
    let outputs = session.run(&inputs).unwrap();
    let get = |name: &str| {
        outputs[session.output_names().iter().position(|o| o == name).unwrap()].to_f64().unwrap()
    };
    let (x, y) = (get(&x_name), get("nbl.layers.1.y"));
    let (x, y) = (x.as_slice().unwrap(), y.as_slice().unwrap());
    let mut worst: f64 = 0.0;
    for (xt, yt) in x.chunks(64).zip(y.chunks(64)) {
        for (i, got) in yt.iter().enumerate() {
            let want = fit.b[i] + (0..64).map(|j| dequantised[(i, j)] * xt[j]).sum::<f64>();
            worst = worst.max((got - want).abs());
        }
    }
    eprintln!("int4 map: max |y - (x Qᵀ + b)| = {worst:.2e}");
    assert!(worst < 1e-3, "{worst}");
}

/// `W` stored in another float type than the stream is cast to the stream's type before the
/// product (MatMul takes one element type): every float format on an f32 and an f16 model gives a
/// model ONNX Runtime runs, whose logits differ from the stream-typed map's by that format's
/// rounding of W (measured: f16 2e-4, bf16 1.5e-3 of the largest logit; an f32 W on an f16 model
/// is rounded to f16 by its cast, as an f16 W is).
#[test]
fn every_float_weight_format_gives_a_model_that_runs() {
    for fixture in ["llama-optimum-past", "llama-genai-fp16-cuda"] {
        let ws = workspace(fixture);
        let rewritten = |format: &str| {
            let out = ws.dir.path().join(format!("{format}.onnx"));
            let args = ["--layer-ids", "1", "--weight-format", format, "-o", out.to_str().unwrap()];
            rewrite(&ws, &args);
            let (names, outputs) = run(&out, fixture, &[]);
            outputs[names.iter().position(|n| n == "logits").unwrap()].clone()
        };
        let stream = rewritten(if fixture.contains("fp16") { "f16" } else { "f32" });
        for (format, tolerance) in [("f32", 1e-6), ("f16", 2e-3), ("bf16", 1e-2)] {
            let (diff, scale) = max_abs_diff(&rewritten(format), &stream);
            eprintln!("{fixture}, W as {format}: logits differ by {diff:.2e} (largest {scale:.2})");
            assert!(diff <= tolerance * scale.max(1.0), "{fixture} {format}: {diff}");
        }
    }
}

/// A model rewritten into a directory of its own gets the tokenizer and config files a runtime
/// loads from there (Optimum's `ORTModelForCausalLM` reads `config.json`); `check` then prompts with
/// natural text.
#[test]
fn a_rewrite_into_its_own_directory_takes_the_tokenizer_and_config_along() {
    let ws = workspace("llama-optimum-past");
    let dir = ws.dir.path().join("out");
    let out = dir.join("model.onnx");
    rewrite(&ws, &["--layers", "1", "-o", out.to_str().unwrap()]);
    for file in ["tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"] {
        let copied = std::fs::read(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(copied, std::fs::read(ws.dir.path().join(file)).unwrap(), "{file}");
    }
    assert!(!dir.join("genai_config.json").exists(), "an Optimum export has no GenAI config");
    let (code, report) = check(&out, &["--reference", ws.model.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{report}");
    assert!(!report.to_string().contains("synthetic token ids"), "{report}");
}

/// Optimum's fp16 export adds f16 branches to an f32 residual stream: the f16 embedding is cast
/// up for layer 0's Add. Layer 0's map reads that widened view and writes f32, as the junction adds;
/// `auto` stores `W` in f16 (the embedding's and q/k/v's type) and casts it up for the product.
#[test]
fn a_map_on_a_widened_stream_computes_in_the_junctions_type() {
    use nbl_onnx::onnx::DType;
    let ws = workspace("llama-optimum-fp16");
    let original = Model::load(&ws.model).unwrap();
    let layout = find_layout(&original).unwrap();
    assert_eq!(layout.dtype, Some(DType::F16));
    let first = &layout.layers[0];
    assert_ne!(first.map_input, first.x, "layer 0 reads the f16 embedding through a Cast to f32");
    assert_eq!(first.dtype, Some(DType::F32));
    for later in &layout.layers[1..] {
        assert_eq!((later.map_input.as_str(), later.dtype), (later.x.as_str(), Some(DType::F32)));
    }
    let out = rewrite(&ws, &["--layer-ids", "0"]);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ws.dir.path().join("model.nbl.json")).unwrap()).unwrap();
    assert_eq!(report["rewrite"]["weight_format"], serde_json::json!({"Float": "f16"}));
    let model = Model::load(&out).unwrap();
    let graph = model.graph();
    let product = graph.node.iter().find(|n| n.name() == "nbl.layers.0.matmul").expect("the map's MatMul");
    assert_eq!(product.input[0], first.map_input);
    let dtype_of = |name: &str| {
        let t = graph.initializer.iter().find(|t| t.name() == name).unwrap();
        DType::from_onnx(t.data_type())
    };
    assert_eq!((dtype_of("nbl.layers.0.weight"), dtype_of("nbl.layers.0.bias")), (DType::F16, DType::F32));
    // Layer 0 linearised: the logits are PyTorch's with that layer patched (fp16 tolerance).
    let (names, outputs) = run(&out, "llama-optimum-fp16", &[]);
    let logits = &outputs[names.iter().position(|n| n == "logits").unwrap()];
    let (_, before) = run(&ws.model, "llama-optimum-fp16", &[]);
    let (moved, scale) = max_abs_diff(logits, &before[0]);
    assert!(moved > 1e-3 * scale, "the rewrite changed layer 0: {moved}");
}

/// On ONNX Runtime's quantised graphs `auto` keeps the maps int8: `Wᵀ` as int8 with one scale per
/// output, dequantised by a standard `DequantizeLinear`, so tract still runs the model. With
/// round-to-nearest, each stored weight is the f32 map's weight rounded on its output's grid:
/// `scale = max |w| / 127` and `|w − q · scale| ≤ scale / 2`.
#[test]
fn int8_maps_on_quantised_graphs_are_per_output_int8_that_every_engine_runs() {
    for fixture in ["llama-optimum-dynamic-int8", "llama-optimum-qdq"] {
        let ws = workspace(fixture);
        let (int8, report) = rewrite_to(&ws, "int8.onnx", &["--layer-ids", "1", "--quantizer", "rtn"]);
        assert_eq!(
            report["rewrite"]["weight_format"],
            serde_json::json!({"PerChannelInt8": {"quantizer": "rtn"}})
        );
        let (float, _) = rewrite_to(&ws, "f32.onnx", &["--layer-ids", "1", "--weight-format", "f32"]);
        let (w_t, _) = stored_map(&float, 1);
        let model = Model::load(&int8).unwrap();
        let get = |name: &str| {
            let t = model.graph().initializer.iter().find(|t| t.name() == name).unwrap();
            model.tensor(t).unwrap().to_f64().unwrap().iter().copied().collect::<Vec<f64>>()
        };
        let (q, scales) = (get("nbl.layers.1.weight"), get("nbl.layers.1.weight_scales"));
        let d = scales.len();
        assert_eq!((q.len(), w_t.len()), (d * d, d * d));
        for out in 0..d {
            let amax = (0..d).map(|k| w_t[k * d + out].abs()).fold(0.0, f64::max);
            assert!((scales[out] - amax / 127.0).abs() <= 1e-6 * amax, "{fixture} output {out}");
            for k in 0..d {
                let error = (w_t[k * d + out] - q[k * d + out] * scales[out]).abs();
                assert!(error <= scales[out] / 2.0 * (1.0 + 1e-5), "{fixture} W[{out}, {k}]: {error}");
            }
        }
        let dq = model
            .graph()
            .node
            .iter()
            .find(|n| n.op_type() == "DequantizeLinear" && n.input[0] == "nbl.layers.1.weight");
        assert!(
            dq.is_some_and(|n| n.attribute.iter().any(|a| a.name() == "axis" && a.i() == 1)),
            "{fixture}"
        );
        let (code, check) = check(&int8, &["--reference", ws.model.to_str().unwrap()]);
        assert_eq!(code, Some(0), "{fixture}: {check}");
        assert_eq!(status(&check, "tract"), "ok", "{fixture}: tract runs the int8 maps");
    }
}

/// `MatMulNBits` may carry `g_idx` (act-order GPTQ) and a bias, its inputs 4 and 5. No exporter
/// reachable here writes them, so this test adds them to the int4 fixture with values that keep
/// its function: each input in its own block's group, a zero bias. The model then computes the
/// same logits, and calibrates, rewrites and passes `check` as the fixture does; its weights count
/// the biases but not `g_idx`.
#[test]
fn matmulnbits_with_g_idx_and_bias_is_read_like_any_other() {
    use nbl_onnx::onnx::{DType, Tensor, build};
    let ws = workspace("llama-genai-int4");
    let mut model = Model::load(&ws.model).unwrap();
    // In f32 (accuracy level 1): at level 4 ONNX Runtime quantises the activations to int8 without
    // g_idx and not with it, and the logits would differ by that.
    for node in model.graph_mut().node.iter_mut().filter(|n| n.op_type() == "MatMulNBits") {
        for attr in node.attribute.iter_mut().filter(|a| a.name() == "accuracy_level") {
            attr.i = Some(1);
        }
    }
    let plain = ws.dir.path().join("plain-f32.onnx");
    model.save(&plain).unwrap();
    let graph = model.graph_mut();
    let (mut added, mut biases) = (Vec::new(), 0u64);
    for (i, node) in graph.node.iter_mut().enumerate().filter(|(_, n)| n.op_type() == "MatMulNBits") {
        let attr = |name: &str| node.attribute.iter().find(|a| a.name() == name).unwrap().i() as usize;
        let (k, n, block) = (attr("K"), attr("N"), attr("block_size"));
        let g_idx: Vec<u8> = (0..k).flat_map(|c| ((c / block) as i32).to_le_bytes()).collect();
        let (g, b) = (format!("test.g_idx.{i}"), format!("test.bias.{i}"));
        added.push(build::initializer(&g, Tensor::from_le_bytes(DType::I32, &[k], &g_idx).unwrap()));
        let zeros = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[n]));
        added.push(build::initializer(&b, Tensor::from_f32(DType::F32, zeros).unwrap()));
        biases += n as u64;
        node.input.resize(4, String::new()); // no zero points
        node.input.extend([g, b]);
    }
    assert!(biases > 0);
    graph.initializer.extend(added);
    let extended = ws.dir.path().join("g_idx.onnx");
    model.save(&extended).unwrap();

    let logits = |path: &Path| {
        let (names, outputs) = run(path, "llama-genai-int4", &[]);
        outputs[names.iter().position(|n| n == "logits").unwrap()].clone()
    };
    let (diff, scale) = max_abs_diff(&logits(&extended), &logits(&plain));
    assert!(diff <= 1e-5 * scale.max(1.0), "g_idx and a zero bias change nothing: {diff}");

    let stats = ws.dir.path().join("g_idx.nblstats");
    let (corpus, stats_path) = (ws.corpus.to_str().unwrap(), stats.to_str().unwrap());
    ok(nbl(&calibrate_args(extended.to_str().unwrap(), corpus, "32", "8", stats_path)));
    let out = ws.dir.path().join("g_idx-out/model.onnx");
    let args = [
        "rewrite",
        extended.to_str().unwrap(),
        "--stats",
        stats.to_str().unwrap(),
        "--layers",
        "1",
        "-o",
        out.to_str().unwrap(),
    ];
    ok(nbl(&args));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.with_file_name("model.nbl.json")).unwrap()).unwrap();
    let (_, original) = rewrite_to(&ws, "plain.onnx", &["--layers", "1"]);
    let weights = |r: &serde_json::Value| r["rewrite"]["weights_before"]["weights"].as_u64().unwrap();
    assert_eq!(weights(&report), weights(&original) + biases, "biases are weights, g_idx is not");
    let format = &report["rewrite"]["weight_format"]["Blocks"];
    assert_eq!(
        (&format["bits"], &format["block_size"], &format["accuracy_level"]),
        (&4.into(), &32.into(), &1.into())
    );
    let (code, check) = check(&out, &["--reference", extended.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{check}");
}

/// The stored `Wᵀ` (row-major `[d_in, d_out]`) and `b` of layer `layer` in a rewritten model.
fn stored_map(path: &Path, layer: usize) -> (Vec<f64>, Vec<f64>) {
    let model = Model::load(path).unwrap();
    let get = |name: String| {
        let t = model
            .graph()
            .initializer
            .iter()
            .find(|t| t.name() == name)
            .unwrap_or_else(|| panic!("no {name}"));
        model.tensor(t).unwrap().to_f64().unwrap().iter().copied().collect::<Vec<f64>>()
    };
    (get(format!("nbl.layers.{layer}.weight")), get(format!("nbl.layers.{layer}.bias")))
}

/// With one layer there is nothing before it: sequential fitting is the one-shot fit, bit for bit.
#[test]
fn sequential_fitting_of_one_layer_is_the_one_shot_fit() {
    let ws = workspace("llama-optimum-past");
    let (one_shot, report) = rewrite_to(&ws, "one-shot.onnx", &["--layer-ids", "2"]);
    assert_eq!(report["fitting"], "one-shot");
    let (sequential, report) = rewrite_to(&ws, "sequential.onnx", &["--layer-ids", "2", "--sequential"]);
    assert_eq!(report["fitting"], "sequential");
    assert_eq!(report["stages"].as_array().unwrap().len(), 1, "{}", report["stages"]);
    assert_eq!(stored_map(&one_shot, 2), stored_map(&sequential, 2));
}

/// The second stage's map is the LMMSE fit of that layer's X and Y on the model whose first chosen
/// layer is already linearised. The test captures X and Y there itself (the first map from the
/// statistics, spliced in by the library, the model run block by block) and fits by least squares
/// with the same ridge, by QR of the augmented system `[X_c; √((n−1)λ D)] Wᵀ = [Y_c; 0]`: no moments,
/// no Cholesky.
#[test]
fn the_second_stage_fits_the_model_with_the_first_layer_linearised() {
    use faer::linalg::solvers::SolveLstsq;
    use nbl_onnx::data::{DataSpec, Split};
    use nbl_onnx::fit::LinearMap;
    use nbl_onnx::onnx::Interface;
    use nbl_onnx::rewrite::{KvCache, Replacement, RewriteOptions, UnitEdit, apply};
    use nbl_onnx::unit::Unit;

    let ws = workspace("llama-optimum-past");
    let (first, second) = (1usize, 2usize);
    let ids = format!("{first},{second}");
    let (sequential, report) = rewrite_to(&ws, "sequential.onnx", &["--layer-ids", &ids, "--sequential"]);
    assert_eq!(report["stages"].as_array().unwrap().len(), 2, "{}", report["stages"]);
    let (one_shot, _) = rewrite_to(&ws, "one-shot.onnx", &["--layer-ids", &ids]);

    // The model with the first layer linearised, from the one-shot statistics.
    let mut model = Model::load(&ws.model).unwrap();
    let layout = find_layout(&model).unwrap();
    let stats = Stats::load(&ws.stats).unwrap();
    let lambda = nbl_onnx::nbl::DEFAULT_LAMBDA;
    let fit = fit_layer(first, stats.moments[first].clone(), lambda, false).unwrap();
    let edit = UnitEdit {
        site: layout.unit_site(Unit::attention(first)).unwrap(),
        map: Some(LinearMap { w: fit.w, b: fit.b, second_moment: None }),
    };
    apply(
        &mut model,
        &layout,
        vec![Ok(edit)],
        RewriteOptions::float(&layout, Replacement::Linear, KvCache::Keep),
        &[],
    )
    .unwrap();

    // X and Y of the second layer on the calibration blocks.
    let spec = DataSpec {
        files: vec![ws.corpus.clone()],
        built_in: Split::Calibration,
        tokenizer: None,
        eos_id: None,
        seq_len: 32,
        samples: Some(8),
    };
    let data = spec.pack(ws.dir.path(), layout.vocab_size).unwrap().sequences;
    let d = layout.hidden_size;
    let (x_name, y_name) = (layout.layers[second].x.clone(), layout.layers[second].y.clone());
    let mut session = ort().load(&model, &[x_name.clone(), y_name.clone()]).unwrap();
    let interface = Interface::of(&model, Some(d)).unwrap();
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for block in &data {
        let ids = ndarray::Array2::from_shape_vec((1, block.len()), block.clone()).unwrap();
        let outputs = session.run(&interface.prefill(&ids).unwrap()).unwrap();
        let names = session.output_names();
        let get = |n: &str| outputs[names.iter().position(|o| o == n).unwrap()].to_f64().unwrap();
        xs.extend(get(&x_name).iter().copied());
        ys.extend(get(&y_name).iter().copied());
    }
    let n = xs.len() / d;
    let column_means =
        |v: &[f64]| (0..d).map(|j| (0..n).map(|t| v[t * d + j]).sum::<f64>() / n as f64).collect::<Vec<_>>();
    let (mx, my) = (column_means(&xs), column_means(&ys));
    // The ridge λ · max(C_jj, 10⁻⁶ tr(C)/d) on each input dimension j (the documented one).
    let variance: Vec<f64> = (0..d)
        .map(|j| (0..n).map(|t| (xs[t * d + j] - mx[j]).powi(2)).sum::<f64>() / (n - 1) as f64)
        .collect();
    let floor = 1e-6 * variance.iter().sum::<f64>() / d as f64;
    let scale: Vec<f64> = variance.iter().map(|v| ((n - 1) as f64 * lambda * v.max(floor)).sqrt()).collect();
    let a = faer::Mat::from_fn(n + d, d, |r, j| {
        if r < n {
            xs[r * d + j] - mx[j]
        } else if r - n == j {
            scale[j]
        } else {
            0.0
        }
    });
    let rhs = faer::Mat::from_fn(n + d, d, |r, j| if r < n { ys[r * d + j] - my[j] } else { 0.0 });
    let w_t = a.qr().solve_lstsq(&rhs); // d_in × d_out
    let bias: Vec<f64> = (0..d).map(|o| my[o] - (0..d).map(|i| w_t[(i, o)] * mx[i]).sum::<f64>()).collect();

    let relative = |got: &[f64], want: &dyn Fn(usize) -> f64| {
        let num: f64 = got.iter().enumerate().map(|(i, g)| (g - want(i)).powi(2)).sum();
        let den: f64 = (0..got.len()).map(|i| want(i).powi(2)).sum();
        (num / den).sqrt()
    };
    let (seq_w, seq_b) = stored_map(&sequential, second);
    let (shot_w, _) = stored_map(&one_shot, second);
    let w_at = |i: usize| w_t[(i / d, i % d)];
    // f32 storage of W (6e-8) and f32 activations summed in another order: 1e-5 is ample, and
    // the one-shot map, fitted on the original model, is far outside it.
    let seq_error = relative(&seq_w, &w_at);
    let shot_error = relative(&shot_w, &w_at);
    eprintln!(
        "second layer's W: sequential {seq_error:.2e}, one-shot {shot_error:.2e} from the independent fit"
    );
    assert!(seq_error < 1e-5, "sequential W differs by {seq_error:e}");
    assert!(
        shot_error > 1e-3,
        "the one-shot map is as close ({shot_error:e}): the test cannot tell them apart"
    );
    let b_error = relative(&seq_b, &|i| bias[i]);
    assert!(b_error < 1e-5, "sequential b differs by {b_error:e}");
}
