//! Hostile input: every case exits 2 with one `error:` naming what is wrong, writes no file, and
//! leaves every input byte for byte as it was.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use nbl_onnx::onnx::Model;
use nbl_onnx::stats::Stats;

/// A fixture copied into a temporary directory, calibrated on 4 blocks of 16 tokens.
struct Setup {
    dir: tempfile::TempDir,
    model: PathBuf,
    stats: PathBuf,
    corpus: PathBuf,
}

fn setup(fixture: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures_dir().join(fixture)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let corpus = write_corpus(dir.path());
    let model = dir.path().join("model.onnx");
    let stats = dir.path().join("stats.safetensors");
    let out = nbl(&calibrate_args(
        model.to_str().unwrap(),
        corpus.to_str().unwrap(),
        "16",
        "4",
        stats.to_str().unwrap(),
    ));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    Setup { dir, model, stats, corpus }
}

/// Every file in `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect()
}

/// Runs `args`; asserts a clear bad-input failure mentioning `needle`, and that `dir` is exactly as
/// it was (nothing written, nothing changed).
fn refused(dir: &Path, args: &[&str], needle: &str) {
    let before = snapshot(dir);
    let out = nbl(args);
    assert_bad_input(&out, needle);
    let errors = stderr(&out).lines().filter(|l| l.starts_with("error:")).count();
    assert_eq!(errors, 1, "{args:?}: one error line");
    assert_eq!(snapshot(dir), before, "{args:?}: the directory changed");
}

#[test]
fn no_output_may_name_a_file_the_command_reads() {
    let s = setup("llama-optimum-extdata");
    let d = s.dir.path();
    let (model, stats, corpus) =
        (s.model.to_str().unwrap(), s.stats.to_str().unwrap(), s.corpus.to_str().unwrap());
    let path = |name: &str| d.join(name).to_str().unwrap().to_string();
    let (data_file, tokenizer) = (path("model.onnx_data"), path("tokenizer.json"));
    for output in [corpus, &tokenizer, &data_file, model] {
        refused(d, &calibrate_args(model, corpus, "16", "4", output), "refusing to write");
    }
    refused(d, &["analyze", stats, "--chart", stats], "refusing to write");
    refused(d, &["rewrite", model, "--stats", stats, "--report", stats], "refusing to write");
    refused(
        d,
        &["rewrite", model, "--data", corpus, "--seq-len", "16", "--report", corpus],
        "refusing to write",
    );
    // The output's own data file would land on the input's: model.onnx_data beside "model.onnx".
    refused(d, &["rewrite", model, "--stats", stats, "-o", &path("./model.onnx")], "refusing to write");
    refused(
        d,
        &["rewrite", model, "--stats", stats, "-o", &path("same.onnx"), "--report", &path("same.onnx")],
        "would overwrite",
    );
    // Through a symlink, and into a directory.
    std::os::unix::fs::symlink(&s.corpus, d.join("link.json")).unwrap();
    refused(d, &calibrate_args(model, corpus, "16", "4", &path("link.json")), "refusing to write");
    std::fs::create_dir(d.join("adir")).unwrap();
    refused(d, &calibrate_args(model, corpus, "16", "4", &path("adir")), "is a directory");
}

#[test]
fn statistics_that_do_not_hold_what_they_claim_are_refused() {
    let s = setup("llama-optimum-past");
    let d = s.dir.path();
    let model = s.model.to_str().unwrap();
    let good = Stats::load(&s.stats).unwrap();
    let damaged = |name: &str, damage: &dyn Fn(&mut Stats)| -> String {
        let mut stats = Stats::load(&s.stats).unwrap();
        damage(&mut stats);
        let path = d.join(name);
        stats.save(&path).unwrap();
        path.to_str().unwrap().to_string()
    };
    let cases: Vec<(String, &str)> = vec![
        (damaged("zero.st", &|s| s.moments[0].count = 0), "not a positive integer"),
        (damaged("inf.st", &|s| s.moments[1].mean_x[3] = f64::INFINITY), "holds inf"),
        (damaged("nan.st", &|s| s.moments[2].syy[(1, 1)] = f64::NAN), "holds NaN"),
        (
            damaged("shape.st", &|s| s.moments[0].sxx = faer::Mat::zeros(32, 128)),
            "has shape [32, 128], expected [64, 64]",
        ),
        (damaged("huge.st", &|s| s.hidden_size = usize::MAX / 2), "does not fit a file"),
        (
            damaged("missing.st", &|s| {
                s.layers.remove(1);
                s.moments.remove(1);
            }),
            "holds statistics of layers [0, 2]",
        ),
    ];
    for (stats, needle) in &cases {
        refused(d, &["rewrite", model, "--stats", stats, "--layer-ids", "1"], needle);
    }
    // A file with one layer less is refused even where that layer is not asked for.
    refused(d, &["rewrite", model, "--stats", &cases[5].0, "--layers", "2"], "holds statistics of layers");
    assert_eq!(good.layers.len(), 3);
}

#[test]
fn flags_out_of_range_are_refused_naming_the_flag() {
    let s = setup("llama-optimum-past");
    let d = s.dir.path();
    let (model, stats, corpus) =
        (s.model.to_str().unwrap(), s.stats.to_str().unwrap(), s.corpus.to_str().unwrap());
    refused(d, &["rewrite", model, "--stats", stats, "--max-bound", "nan"], "--max-bound");
    refused(d, &["check", model, "--reference", model, "--max-kl", "nan"], "--max-kl");
    refused(d, &["check", model, "--reference", model, "--min-top1=-1"], "--min-top1");
    let out = d.join("out.st");
    let mut args = calibrate_args(model, corpus, "16", "4", out.to_str().unwrap());
    args.push("--eos-id=-1");
    refused(d, &args, "--eos-id -1 is negative");
    let mut args = calibrate_args(model, corpus, "16", "4", out.to_str().unwrap());
    args.extend(["--eos-id", "100000"]);
    refused(d, &args, "is not in the vocabulary");
    let _ = Model::load(&s.model).unwrap();
}
