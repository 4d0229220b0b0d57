//! Load → save without changes gives a model ONNX Runtime runs with identical outputs, for models
//! with embedded weights and with external data; saving never writes over its input.

mod common;

use common::*;
use nbl_onnx::onnx::Model;
use nbl_onnx::onnx::model::external_location;
use prost::Message;

/// Runs a model on its fixture's reference inputs with ONNX Runtime.
fn run(model: &Model, fixture: &str) -> Vec<nbl_onnx::onnx::Tensor> {
    let mut session = ort().load(model, &[]).unwrap();
    session.run(&reference_inputs(&reference(fixture))).unwrap()
}

fn assert_round_trip(fixture: &str, data_file: Option<&str>) {
    let original = Model::load(model_path(fixture)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("copy.onnx");
    original.save(&out).unwrap();

    let mut written: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    let mut expected = vec!["copy.onnx".to_string()];
    expected.extend(data_file.map(str::to_string));
    assert_eq!(written, expected, "{fixture}: only the model and its data file, no temporary files");

    for name in &written {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "{name} is readable like any output");
    }
    let copy = Model::load(&out).unwrap();
    for t in &copy.graph().initializer {
        if let Some(loc) = external_location(t).unwrap() {
            assert_eq!(Some(loc.location.as_str()), data_file);
            // Tensors of 64 KiB or more start on a page (for memory mapping), smaller ones on 64 bytes.
            let alignment = if loc.length.unwrap() >= 1 << 16 { 4096 } else { 64 };
            assert_eq!(loc.offset % alignment, 0, "{fixture}: {:?} is not {alignment}-aligned", t.name());
            assert_eq!(
                copy.tensor(t).unwrap(),
                original
                    .tensor(
                        &original.graph().initializer[0..]
                            .iter()
                            .find(|o| o.name() == t.name())
                            .unwrap()
                            .clone()
                    )
                    .unwrap()
            );
        }
    }
    let a = run(&original, fixture);
    let b = run(&copy, fixture);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.to_le_bytes(), y.to_le_bytes(), "{fixture}: outputs differ after load → save");
    }
}

#[test]
fn embedded_weights_survive_load_save_bit_for_bit() {
    assert_round_trip("llama-optimum-past", None);
    // Without external data, decoding and re-encoding gives back the exporter's exact bytes.
    let bytes = std::fs::read(model_path("llama-optimum-past")).unwrap();
    let model = Model::load(model_path("llama-optimum-past")).unwrap();
    assert!(model.proto.encode_to_vec() == bytes, "re-encoded protobuf differs from the file");
}

#[test]
fn optimum_external_data_is_copied_under_the_optimum_name() {
    assert_round_trip("llama-optimum-extdata", Some("copy.onnx_data"));
}

#[test]
fn genai_external_data_is_copied_under_the_genai_name() {
    assert_round_trip("llama-genai-fp32", Some("copy.onnx.data"));
}

#[test]
fn saving_over_the_input_or_its_data_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["model.onnx", "model.onnx_data"] {
        std::fs::copy(fixtures_dir().join("llama-optimum-extdata").join(f), dir.path().join(f)).unwrap();
    }
    let before = std::fs::read(dir.path().join("model.onnx_data")).unwrap();
    let model = Model::load(dir.path().join("model.onnx")).unwrap();
    let err = model.save(&dir.path().join("model.onnx")).unwrap_err();
    assert!(err.to_string().contains("it is an input of the model"), "{err}");
    // Saving as "model" would write "model_data"; saving as "model.onnx" over "model.onnx_data" is the
    // data-file clash: both are refused before anything is written.
    assert_eq!(std::fs::read(dir.path().join("model.onnx_data")).unwrap(), before);
    let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(leftovers, 2, "no temporary files left behind");
}

/// A model saved into a missing directory creates it; under a regular file it cannot, and nothing
/// is written.
#[test]
fn saving_creates_a_missing_directory_and_refuses_one_under_a_file() {
    let model = Model::load(model_path("llama-optimum-past")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a/b/x.onnx");
    model.save(&out).unwrap();
    assert!(out.is_file());
    let file = dir.path().join("file");
    std::fs::write(&file, "").unwrap();
    let err = model.save(&file.join("x.onnx")).unwrap_err();
    assert!(format!("{err:#}").contains("cannot create output directory"), "{err:#}");
    assert_eq!(std::fs::read(&file).unwrap(), b"", "the file is untouched");
}

/// One rule for output directories in every command that writes files: missing ones are created
/// (with their parents); a path under a regular file is refused before any work, naming it.
#[test]
fn every_command_creates_missing_output_directories() {
    let ws = workspace("llama-optimum-past");
    let root = ws.dir.path();
    let (model, stats, corpus) =
        (ws.model.to_str().unwrap(), ws.stats.to_str().unwrap(), ws.corpus.to_str().unwrap());
    let at = |dir: &str, file: &str| root.join(dir).join("deeper").join(file);
    let calibrated = at("calibrate", "s.safetensors");
    let merged = at("merge", "m.safetensors");
    let chart = at("analyze", "c.svg");
    let (rewritten, report) = (at("rewrite", "m.onnx"), at("report", "r.json"));
    let synthetic = at("synthetic", "s.safetensors");
    let swept = root.join("sweep").join("deeper");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let commands: Vec<Vec<String>> = vec![
        calibrate_args(model, corpus, "16", "4", &s(&calibrated)).iter().map(|a| a.to_string()).collect(),
        ["merge-stats", stats, "-o", &s(&merged)].map(String::from).to_vec(),
        ["analyze", stats, "--json", "--chart", &s(&chart)].map(String::from).to_vec(),
        ["rewrite", model, "--stats", stats, "--layers", "1", "-o", &s(&rewritten), "--report", &s(&report)]
            .map(String::from)
            .to_vec(),
        ["synthetic-stats", &s(&synthetic), "--hidden-size", "8", "--layers", "1"].map(String::from).to_vec(),
        [
            "sweep",
            model,
            "--stats",
            stats,
            "--max-kl",
            "0.5",
            "--units",
            "attention",
            "--heldout-data",
            corpus,
            "--heldout-sequences",
            "2",
            "--seq-len",
            "32",
            "--probe-sequences",
            "2",
            "-o",
            &s(&swept),
        ]
        .map(String::from)
        .to_vec(),
    ];
    for args in &commands {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(nbl(&args));
    }
    for written in [&calibrated, &merged, &chart, &rewritten, &report, &synthetic, &swept.join("sweep.json")]
    {
        assert!(written.is_file(), "{} was not written", written.display());
    }
    // Under a regular file no directory can be made: refused before any work, naming both.
    let file = root.join("a-file");
    std::fs::write(&file, "").unwrap();
    let under = file.join("stats.safetensors");
    let run = nbl(&calibrate_args(model, corpus, "16", "4", under.to_str().unwrap()));
    assert_bad_input(
        &run,
        &format!("cannot create output directory {}: {} is not a directory", file.display(), file.display()),
    );
}
