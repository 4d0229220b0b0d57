//! Engine selection from the command line: which engine ran is always said, a missing library or
//! execution provider is a clear error (exit 2), and `auto` falls back to tract only on the CPU.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use nbl_onnx::detect::find_layout;
use nbl_onnx::onnx::{Interface, Model};
use ndarray::Array2;

fn inspect_run(env: &[(&str, &str)], extra: &[&str]) -> Output {
    let model = model_path("llama-optimum-past");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nbl-onnx"));
    cmd.args(["inspect", model.to_str().unwrap(), "--run"]).args(extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// The real library, as scripts/setup-ort.sh installs it.
fn cpu_library() -> String {
    let home = std::env::var("HOME").unwrap();
    let link = format!("{home}/.cache/nbl-onnx/onnxruntime/cpu/libonnxruntime.so");
    let path = std::env::var("ORT_DYLIB_PATH").unwrap_or(link);
    std::fs::canonicalize(path).expect("ONNX Runtime installed").to_string_lossy().into_owned()
}

#[test]
fn onnx_runtime_runs_and_says_so() {
    let out = inspect_run(&[], &["--engine", "ort"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("engine: onnxruntime 1."), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("every X and Y is [batch, sequence, 64] and finite")
    );
}

#[test]
fn tract_runs_and_says_so() {
    let out = inspect_run(&[], &["--engine", "tract"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).starts_with("engine: tract 0.23"), "{}", stderr(&out));
}

#[test]
fn a_missing_onnx_runtime_library_is_an_error_naming_the_path() {
    let out = inspect_run(&[("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")], &["--engine", "ort"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("ORT_DYLIB_PATH=/nonexistent/libonnxruntime.so is not a file"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_file_that_is_not_a_library_is_an_error_not_a_crash() {
    let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    let out = inspect_run(&[("ORT_DYLIB_PATH", readme)], &["--engine", "ort"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot load ONNX Runtime from"), "{}", stderr(&out));
}

#[test]
fn auto_falls_back_to_tract_and_says_why() {
    let out = inspect_run(&[("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("engine: tract 0.23.9 (ONNX Runtime unavailable: ORT_DYLIB_PATH="), "{err}");
}

#[test]
fn auto_never_falls_back_for_a_gpu_provider() {
    let out = inspect_run(&[("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")], &["--ep", "cuda"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(!stderr(&out).contains("tract"), "{}", stderr(&out));
}

#[test]
fn cuda_on_the_cpu_build_is_an_error_before_any_work() {
    for ep in ["cuda", "tensorrt"] {
        let out = inspect_run(&[("ORT_DYLIB_PATH", &cpu_library())], &["--engine", "ort", "--ep", ep]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("execution provider: install the GPU build (pip install onnxruntime-gpu"),
            "{err}"
        );
        assert!(out.stdout.is_empty());
    }
}

/// Installed by pip, the executable sits in `<env>/bin` and finds the `onnxruntime` package of its
/// own environment, with nothing set; an environment without one is told what to install.
#[test]
fn the_executable_finds_onnx_runtime_in_its_python_environment() {
    let env = tempfile::tempdir().unwrap();
    let bin = env.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let exe = bin.join("nbl-onnx");
    std::fs::copy(env!("CARGO_BIN_EXE_nbl-onnx"), &exe).unwrap();
    let run = || {
        let model = model_path("llama-optimum-past");
        Command::new(&exe)
            .args(["inspect", model.to_str().unwrap(), "--run", "--engine", "ort"])
            .env_remove("ORT_DYLIB_PATH")
            .env("NBL_ORT_DIR", env.path().join("no-setup-ort-install"))
            .output()
            .unwrap()
    };
    let out = run();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("pip install onnxruntime into the Python environment"), "{}", stderr(&out));

    let library = cpu_library();
    let capi = env.path().join("lib/python3.11/site-packages/onnxruntime/capi");
    std::fs::create_dir_all(&capi).unwrap();
    let name = Path::new(&library).file_name().unwrap();
    std::os::unix::fs::symlink(&library, capi.join(name)).unwrap();
    let out = run();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("engine: onnxruntime 1."), "{}", stderr(&out));
}

#[test]
fn tract_refuses_a_gpu_provider() {
    let out = inspect_run(&[], &["--engine", "tract", "--ep", "cuda"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("tract runs on the CPU only"), "{}", stderr(&out));
}

/// The inputs nbl-onnx builds for a prefill are exactly the ones the fixtures were verified with
/// against PyTorch: same names, dtypes, shapes (empty KV cache included) and values.
#[test]
fn prefill_inputs_match_the_reference_inputs_of_every_fixture() {
    for name in fixture_names() {
        let model = Model::load(model_path(&name)).unwrap();
        let reference = reference(&name);
        let expected = reference_inputs(&reference);
        let ids = reference["inputs.input_ids"].clone();
        let nbl_onnx::onnx::Tensor::I64(ids) = ids else { panic!("{name}: int64 ids") };
        let ids: Array2<i64> = ids.into_dimensionality().unwrap();
        let hidden_size = find_layout(&model).unwrap().hidden_size;
        let mut built = Interface::of(&model, Some(hidden_size))
            .and_then(|i| i.prefill(&ids))
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let mut expected = expected.clone();
        built.sort_by(|a, b| a.0.cmp(&b.0));
        expected.sort_by(|a, b| a.0.cmp(&b.0));
        let names =
            |v: &[(String, nbl_onnx::onnx::Tensor)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(names(&built), names(&expected), "{name}");
        for ((n, got), (_, want)) in built.iter().zip(&expected) {
            assert_eq!(got, want, "{name}: input {n}");
        }
    }
}

/// An edit made in memory is what both engines run: here layer 1's attention dropped (the model is
/// never written), which changes the logits, and ONNX Runtime and tract agree on the new ones.
#[test]
fn a_model_edited_in_memory_runs_alike_on_both_engines() {
    use nbl_onnx::rewrite::{KvCache, Replacement, RewriteOptions, UnitEdit, apply};
    use nbl_onnx::unit::Unit;
    let fixture = "llama-optimum-past";
    let original = Model::load(model_path(fixture)).unwrap();
    let layout = find_layout(&original).unwrap();
    let mut edited = Model::load(model_path(fixture)).unwrap();
    let edits = vec![UnitEdit { site: layout.unit_site(Unit::attention(1)).unwrap(), map: None }];
    apply(
        &mut edited,
        &layout,
        edits.into_iter().map(Ok),
        RewriteOptions::float(&layout, Replacement::Drop, KvCache::Drop),
        &[],
    )
    .unwrap();

    let reference = reference(fixture);
    let logits = |model: &Model, engine: &dyn nbl_onnx::engine::Engine| {
        let declared: Vec<&str> = model.graph().input.iter().map(|v| v.name()).collect();
        let inputs: Vec<_> = reference_inputs(&reference)
            .into_iter()
            .filter(|(n, _)| declared.contains(&n.as_str()))
            .collect();
        let mut session = engine.load(model, &[]).unwrap();
        let outputs = session.run(&inputs).unwrap();
        let at = session.output_names().iter().position(|n| n == "logits").unwrap();
        outputs[at].clone()
    };
    let before = logits(&original, ort().as_ref());
    let (on_ort, on_tract) = (logits(&edited, ort().as_ref()), logits(&edited, tract().as_ref()));
    let (changed, scale) = max_abs_diff(&on_ort, &before);
    let (apart, _) = max_abs_diff(&on_tract, &on_ort);
    eprintln!(
        "edited vs original: max |Δlogit| {changed:.3e}; tract vs ONNX Runtime: {apart:.3e} (scale {scale:.2})"
    );
    assert!(changed > 1e-3 * scale, "the edit changes the logits");
    assert!(apart <= 1e-4 * scale.max(1.0), "both engines run the edited model: {apart}");
}

/// A decoder whose KV cache stays in the engine (I/O binding on ONNX Runtime; passed through the
/// host on tract) computes the same logits, step by step, as one fed its cache from the host.
#[test]
fn stateful_decoding_matches_decoding_through_the_host_on_every_fixture() {
    use nbl_onnx::onnx::present_as_past;
    let engines = [ort(), tract()];
    let mut compared = 0;
    for name in fixture_names() {
        // The function, not the exporter's shape annotations: see the next test.
        let model = Model::load(model_path(&name)).unwrap().without_value_info();
        let hidden = find_layout(&model).ok().map(|b| b.hidden_size);
        let interface = Interface::of(&model, hidden).unwrap().with_decode_room(3);
        if !interface.has_cache() {
            continue;
        }
        let prompt = Array2::from_shape_fn((1, 5), |(_, t)| 3 + 7 * t as i64);
        for engine in &engines {
            let Ok(mut plain) = engine.load(&model, &[]) else { continue }; // tract: not every graph
            let names = plain.output_names().to_vec();
            let logits_at = names.iter().position(|n| n == "logits").unwrap();
            // tract can build a graph it then cannot prepare for running (an operator it lacks).
            let mut outputs = match plain.run(&interface.prefill(&prompt).unwrap()) {
                Ok(outputs) => outputs,
                Err(e) if e.downcast_ref::<nbl_onnx::engine::Unsupported>().is_some() => continue,
                Err(e) if tract_cannot_evaluate(&name, &format!("{e:#}")) => continue,
                Err(e) => panic!("{name} on {}: {e:#}", engine.describe()),
            };
            let mut stateful =
                engine.load_stateful(&model, &interface.cache_pairs(), &["logits".to_string()]).unwrap();
            let (inputs, cache) = interface.split_cache(interface.prefill(&prompt).unwrap());
            stateful.reset(cache).unwrap();
            let mut fetched = stateful.step(&inputs).unwrap();
            for length in 5..8 {
                let (diff, scale) = max_abs_diff(&fetched[0], &outputs[logits_at]);
                let on = engine.describe();
                assert!(diff <= 1e-6 * scale.max(1.0), "{name} on {on}, {length} tokens: {diff}");
                let next = 1 + length as i64;
                let past = present_as_past(&names, outputs);
                let step = interface.decode_inputs(next, length);
                outputs = plain
                    .run(&interface.decode(next, past, length).unwrap())
                    .unwrap_or_else(|e| panic!("{name} on {on}: {e:#}"));
                fetched = stateful.step(&step).unwrap();
            }
            assert_eq!(stateful.state().unwrap().len(), interface.cache_pairs().len(), "{name}");
            compared += 1;
        }
    }
    assert!(compared >= 30, "only {compared} fixture/engine pairs decoded");
}

/// The GenAI builder's fp16 CPU export annotates the keys and values repeated after the past-cache
/// Concat as `[batch_size, sequence_length, ...]`, where they have `total_sequence_length` rows.
/// ONNX Runtime's CPU provider sizes the Casts it inserts around the f16 ops from those annotations,
/// so the model as written fails at the first decode step; the same graph without its `value_info`
/// (what `rewrite` writes) decodes, and its prefill logits are the same.
#[test]
fn a_wrong_shape_annotation_breaks_decoding_on_onnx_runtime_and_dropping_annotations_fixes_it() {
    use nbl_onnx::onnx::present_as_past;
    let as_written = Model::load(model_path("llama-genai-fp16")).unwrap();
    assert!(!as_written.graph().value_info.is_empty());
    let function = as_written.without_value_info();
    assert!(function.graph().value_info.is_empty());
    assert_eq!(function.graph().node.len(), as_written.graph().node.len());
    let hidden = find_layout(&as_written).ok().map(|b| b.hidden_size);
    let interface = Interface::of(&as_written, hidden).unwrap().with_decode_room(1);
    let prompt = Array2::from_shape_fn((1, 5), |(_, t)| 3 + 7 * t as i64);
    let engine = ort();
    let mut prefills = Vec::new();
    let mut decoded = Vec::new();
    for model in [&as_written, &function] {
        let mut session = engine.load(model, &[]).unwrap();
        let names = session.output_names().to_vec();
        let outputs = session.run(&interface.prefill(&prompt).unwrap()).unwrap();
        prefills.push(outputs[names.iter().position(|n| n == "logits").unwrap()].clone());
        let past = present_as_past(&names, outputs);
        decoded.push(session.run(&interface.decode(6, past, 5).unwrap()).map_err(|e| format!("{e:#}")));
    }
    let (diff, _) = max_abs_diff(&prefills[0], &prefills[1]);
    assert_eq!(diff, 0.0, "the annotations do not change the prefill");
    let Err(error) = &decoded[0] else { panic!("the model as written decodes") };
    assert!(error.contains("re-use buffer"), "{error}");
    assert!(decoded[1].is_ok(), "{:?}", decoded[1].as_ref().err());
}
