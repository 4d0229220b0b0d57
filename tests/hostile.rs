//! Hostile input: every case exits 2 with one `error:` naming what is wrong, writes no file, and
//! leaves every input byte for byte as it was.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use nbl_onnx::onnx::DType;
use nbl_onnx::onnx::Model;
use nbl_onnx::onnx::build::{node, tensor_value};
use nbl_onnx::onnx::proto::{GraphProto, ModelProto, OperatorSetIdProto, TensorProto, tensor_proto};
use nbl_onnx::stats::Stats;
use prost::Message;

/// A fixture copied into a temporary directory, calibrated on 4 blocks of 16 tokens.
fn setup(fixture: &str) -> Workspace {
    calibrated_copy(fixture, "16", "4")
}

/// A command line as owned strings, so that one table of cases can mix literals and paths.
fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
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
            damaged("shape.st", &|s| s.moments[0].syx = faer::Mat::zeros(32, 128)),
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
    // Counts are f64 in the file: negative or fractional ones are written straight into it.
    let count = |name: &str, value: f64| -> String {
        use safetensors::{SafeTensors, tensor::TensorView};
        let bytes = std::fs::read(&s.stats).unwrap();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let replaced = value.to_le_bytes();
        let tensors: Vec<(String, TensorView<'_>)> = st
            .tensors()
            .into_iter()
            .map(|(key, view)| {
                let view = if key == "layers.1.count" {
                    TensorView::new(view.dtype(), view.shape().to_vec(), &replaced).unwrap()
                } else {
                    view
                };
                (key, view)
            })
            .collect();
        let path = d.join(name);
        safetensors::serialize_to_file(tensors, header.metadata().clone(), &path).unwrap();
        path.to_str().unwrap().to_string()
    };
    let (negative, fractional) = (count("negative.st", -3.0), count("fraction.st", 2.5));
    let mut cases = cases;
    cases.push((negative, "a token count of -3"));
    cases.push((fractional, "a token count of 2.5"));
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
    // int4 maps quantise whole blocks of inputs: the hidden size (64) must be a multiple.
    let int4 = |block: &'static str| {
        ["rewrite", model, "--stats", stats, "--weight-format", "int4", "--block-size", block]
    };
    refused(d, &int4("128"), "--block-size 128 does not divide the hidden size 64");
    refused(d, &int4("24"), "--block-size 24: MatMulNBits groups are a power of two");
    refused(
        d,
        &["rewrite", model, "--stats", stats, "--block-size", "32"],
        "--block-size applies to int4/int8 maps",
    );
    refused(d, &["check", model, "--reference", model, "--max-kl", "nan"], "--max-kl");
    refused(d, &["check", model, "--reference", model, "--min-top1=-1"], "--min-top1");
    let out = d.join("out.st");
    let mut args = calibrate_args(model, corpus, "16", "4", out.to_str().unwrap());
    args.push("--eos-id=-1");
    refused(d, &args, "--eos-id -1 is negative");
    let mut args = calibrate_args(model, corpus, "16", "4", out.to_str().unwrap());
    args.extend(["--eos-id", "100000"]);
    refused(d, &args, "is not in the vocabulary");
}

/// A copy of `fixture`'s model with `damage` done to it, saved as `name` in `dir` (re-encoded
/// directly, so that the damage is not repaired on the way).
fn damaged_model(
    dir: &Path,
    fixture: &str,
    name: &str,
    damage: impl Fn(&mut nbl_onnx::onnx::proto::ModelProto),
) -> String {
    use prost::Message;
    let mut proto = Model::load(model_path(fixture)).unwrap().proto;
    damage(&mut proto);
    let path = dir.join(name);
    std::fs::write(&path, proto.encode_to_vec()).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn damaged_models_are_refused_before_anything_is_written() {
    use nbl_onnx::onnx::proto::{StringStringEntryProto, TensorShapeProto, tensor_shape_proto, type_proto};
    let s = setup("llama-optimum-extdata");
    let d = s.dir.path();
    let fixture = "llama-optimum-past";
    let short = damaged_model(d, fixture, "short.onnx", |p| {
        let t = &mut p.graph.as_mut().unwrap().initializer[0];
        let raw = t.raw_data.as_ref().unwrap();
        t.raw_data = Some(raw.slice(..raw.len() / 2));
    });
    let twice = damaged_model(d, fixture, "twice.onnx", |p| {
        let g = p.graph.as_mut().unwrap();
        let copy = g.initializer[0].clone();
        g.initializer.push(copy);
    });
    // A declared width of 2^40 for the stream: every d×d statistic would be sized after it.
    let huge_width = damaged_model(d, fixture, "huge.onnx", |p| {
        let x = "/model/embed_tokens/Gather_output_0";
        let mut declared = nbl_onnx::onnx::build::tensor_value(x, nbl_onnx::onnx::DType::F32, Some(3));
        let Some(type_proto::Value::TensorType(t)) = declared.r#type.as_mut().unwrap().value.as_mut() else {
            panic!()
        };
        let dims: &mut TensorShapeProto = t.shape.as_mut().unwrap();
        dims.dim[2].value = Some(tensor_shape_proto::dimension::Value::DimValue(1 << 40));
        p.graph.as_mut().unwrap().value_info.push(declared);
    });
    // External data: a symlink out of the directory, the model file itself, an offset that wraps.
    std::os::unix::fs::symlink("/etc/hostname", d.join("escape.data")).unwrap();
    let extdata = "llama-optimum-extdata";
    let relocate = |name: &str, location: &str, offset: &str| {
        let (location, offset) = (location.to_string(), offset.to_string());
        damaged_model(d, extdata, name, move |p| {
            let t = p
                .graph
                .as_mut()
                .unwrap()
                .initializer
                .iter_mut()
                .find(|t| !t.external_data.is_empty())
                .unwrap();
            let entry =
                |k: &str, v: &str| StringStringEntryProto { key: Some(k.into()), value: Some(v.into()) };
            let length = t.external_data.iter().find(|e| e.key() == "length").unwrap().value().to_string();
            t.external_data =
                vec![entry("location", &location), entry("offset", &offset), entry("length", &length)];
        })
    };
    let escape = relocate("escape.onnx", "escape.data", "0");
    let itself = relocate("itself.onnx", "itself.onnx", "0");
    let wrap = relocate("wrap.onnx", "model.onnx_data", &(u64::MAX - 8).to_string());
    let cases = [
        (&short, "holds"),
        (&twice, "is defined twice"),
        (&escape, "not a data file in the model's directory"),
        (&itself, "not a data file in the model's directory"),
        (&wrap, "needs bytes"),
    ];
    let corpus = s.corpus.to_str().unwrap();
    let out = d.join("out.onnx");
    for (model, needle) in cases {
        refused(d, &["inspect", model], needle);
        refused(
            d,
            &["rewrite", model, "--data", corpus, "--seq-len", "16", "-o", out.to_str().unwrap()],
            needle,
        );
    }
    // Operators without what they need: a GroupQueryAttention missing its sequence lengths, an
    // output projection whose weight is not a matrix.
    let gqa = damaged_model(d, "llama-genai-fp32", "gqa.onnx", |p| {
        let node =
            p.graph.as_mut().unwrap().node.iter_mut().find(|n| n.op_type() == "GroupQueryAttention").unwrap();
        node.input[5] = String::new();
    });
    let gqa_short = damaged_model(d, "llama-genai-fp32", "gqa-short.onnx", |p| {
        let node =
            p.graph.as_mut().unwrap().node.iter_mut().find(|n| n.op_type() == "GroupQueryAttention").unwrap();
        node.input.truncate(5);
    });
    std::fs::copy(fixtures_dir().join("llama-genai-fp32/model.onnx.data"), d.join("model.onnx.data"))
        .unwrap();
    let rank3 = damaged_model(d, fixture, "rank3.onnx", |p| {
        let g = p.graph.as_mut().unwrap();
        let o_proj = g.node.iter().find(|n| n.name().contains("layers.0/self_attn/o_proj")).unwrap();
        let weight = o_proj.input[1].clone();
        let t = g.initializer.iter_mut().find(|t| t.name() == weight).unwrap();
        t.dims = vec![1, 64, 64];
    });
    let skip_alone = damaged_model(d, "llama-genai-fp32", "skip.onnx", |p| {
        let g = p.graph.as_mut().unwrap();
        let skip = g.node.iter_mut().find(|n| n.op_type() == "SkipSimplifiedLayerNormalization").unwrap();
        skip.input.truncate(1);
    });
    let wide_add = damaged_model(d, fixture, "wide.onnx", |p| {
        let g = p.graph.as_mut().unwrap();
        let add = g.node.iter_mut().find(|n| n.op_type() == "Add").unwrap();
        let first = add.input[0].clone();
        add.input.resize(100_000, first);
    });
    let undefined_output = damaged_model(d, fixture, "undefined.onnx", |p| {
        let g = p.graph.as_mut().unwrap();
        g.output.push(nbl_onnx::onnx::build::tensor_value("nowhere", nbl_onnx::onnx::DType::F32, None));
    });
    // An operator the walk cannot see through on the stream between layers 0 and 1 (as a
    // quantisation format unknown to the tool would put there): refused by name, not taken as the
    // end of a one-layer model.
    let unknown = damaged_model(d, fixture, "unknown.onnx", |p| {
        use nbl_onnx::onnx::proto::{NodeProto, OperatorSetIdProto};
        let g = p.graph.as_mut().unwrap();
        let at = g.node.iter().position(|n| n.name() == "/model/layers.0/Add_1").unwrap();
        let stream = g.node[at].output[0].clone();
        let requantized = format!("{stream}/requantized");
        for n in &mut g.node {
            for input in n.input.iter_mut().filter(|i| **i == stream) {
                *input = requantized.clone();
            }
        }
        let node = NodeProto {
            name: Some("/model/layers.0/requantize".into()),
            op_type: Some("ResidualRequantize".into()),
            domain: Some("com.example".into()),
            input: vec![stream],
            output: vec![requantized],
            ..Default::default()
        };
        g.node.insert(at + 1, node);
        p.opset_import.push(OperatorSetIdProto { domain: Some("com.example".into()), version: Some(1) });
    });
    for command in [
        vec!["inspect", unknown.as_str()],
        vec!["rewrite", unknown.as_str(), "--data", corpus, "--seq-len", "16"],
    ] {
        refused(d, &command, "through node \"/model/layers.0/requantize\" (com.example::ResidualRequantize)");
    }
    refused(d, &["inspect", &skip_alone], "has 1 inputs; SkipSimplifiedLayerNormalization takes 3 to 4");
    refused(d, &["inspect", &wide_add], "has 100000 inputs; Add takes 2 to 2");
    refused(d, &["inspect", &undefined_output], "graph output \"nowhere\" is not produced");
    refused(d, &["inspect", &rank3], "of rank 3, not 2");
    // A refusal inside a branch names the file it is in.
    refused(d, &["inspect", &rank3], &format!("error: {rank3}: the attention branch"));
    let rank1 = damaged_model(d, fixture, "rank1.onnx", |p| {
        let g = p.graph.as_mut().unwrap();
        let q_proj = g.node.iter().find(|n| n.name().contains("layers.1/self_attn/q_proj")).unwrap();
        let weight = q_proj.input[1].clone();
        let t = g.initializer.iter_mut().find(|t| t.name() == weight).unwrap();
        t.dims = vec![64 * 64];
    });
    refused(d, &["inspect", &rank1], "of rank 1, not 2");
    refused(d, &["inspect", &gqa], "lacks its required input 5");
    refused(d, &["inspect", &gqa_short], "has 5 inputs; GroupQueryAttention takes 7 to 14");
    let stats = d.join("huge.safetensors");
    refused(
        d,
        &calibrate_args(&huge_width, corpus, "16", "4", stats.to_str().unwrap()),
        "declared 1099511627776 wide",
    );
}

#[test]
fn a_rewrite_that_replaces_nothing_says_so_and_writes_nothing() {
    let s = setup("llama-optimum-past");
    let d = s.dir.path();
    let (model, stats) = (s.model.to_str().unwrap(), s.stats.to_str().unwrap());
    let before = snapshot(d);
    let out = nbl(&["rewrite", model, "--stats", stats, "--max-bound", "0"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("nothing to rewrite"), "{}", stderr(&out));
    assert_eq!(snapshot(d), before);
    let out = nbl(&["rewrite", model, "--stats", stats, "--layers", "0", "--allow-noop"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// Flags and files every command refuses, one table: each case exits 2 with one error naming the
/// flag or file, and writes nothing.
#[test]
fn every_command_refuses_bad_flags_and_files_naming_them() {
    let s = setup("llama-optimum-past");
    let d = s.dir.path();
    let (model, stats, corpus) =
        (s.model.to_str().unwrap(), s.stats.to_str().unwrap(), s.corpus.to_str().unwrap());
    let path = |name: &str| d.join(name).to_str().unwrap().to_string();
    std::fs::write(d.join("notes.txt"), "not a model").unwrap();
    std::fs::write(d.join("data.csv"), "a,b").unwrap();
    std::fs::write(d.join("broken.json"), "[{").unwrap();
    std::fs::write(d.join("negative.json"), r#"[{"input_ids": [1, -2]}]"#).unwrap();
    std::fs::write(d.join("nothing.json"), r#"[{"other": 1}]"#).unwrap();
    let other = setup("qwen2-optimum-past");
    let (out, notes, csv) = (path("out.x"), path("notes.txt"), path("data.csv"));
    let (broken, negative, nothing, missing) =
        (path("broken.json"), path("negative.json"), path("nothing.json"), path("missing.json"));
    let other_stats = other.stats.to_str().unwrap();
    let calibrate = |extra: &[&str]| -> Vec<String> {
        let mut args = argv(&calibrate_args(model, corpus, "16", "4", &out));
        args.extend(argv(extra));
        args
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (calibrate(&["--samples", "0"]), "--samples"),
        (calibrate(&["--seq-len", "0"]), "--seq-len"),
        (calibrate(&["--batch", "0"]), "--batch"),
        (calibrate(&["--shard", "3/2"]), "shard"),
        (calibrate(&["--shard", "x"]), "shard"),
        (calibrate(&["--shard", "0/0"]), "shard"),
        (calibrate(&["--data", &missing]), "missing.json"),
        (calibrate(&["--data", &csv]), "unsupported data file"),
        (calibrate(&["--data", &broken]), "broken.json"),
        (calibrate(&["--data", &negative]), "non-negative"),
        (calibrate(&["--data", &nothing]), "\"text\" or \"input_ids\""),
        (calibrate(&["--tokenizer", &missing]), "missing.json"),
        (calibrate(&["--tokenizer", &notes]), "cannot load tokenizer"),
        (calibrate(&["--engine", "nope"]), "--engine"),
        (calibrate(&["--ep", "nope"]), "--ep"),
        (argv(&["calibrate", &notes, "-o", &out]), "notes.txt"),
        (argv(&["analyze", &notes]), "notes.txt"),
        (argv(&["analyze", &missing]), "missing.json"),
        (argv(&["analyze", stats, "--lambda=-1"]), "--lambda"),
        (argv(&["analyze", stats, "--lambda", "nan"]), "--lambda"),
        (argv(&["analyze", stats, "--layers", "9"]), "--layers 9"),
        (argv(&["analyze", stats, "--layer-ids", "7"]), "layer 7"),
        (argv(&["analyze", stats, "--max-bound=-1"]), "--max-bound"),
        (argv(&["analyze", stats, "--model", other.model.to_str().unwrap()]), "another model"),
        (argv(&["analyze", stats, "--chart", &path("")]), "directory"),
        (argv(&["rewrite", model, "--stats", stats, "--lambda", "inf"]), "--lambda"),
        (argv(&["rewrite", model, "--stats", stats, "--layers", "4"]), "--layers 4"),
        (argv(&["rewrite", model, "--stats", stats, "--layer-ids", "2,0,9"]), "layer 9"),
        (argv(&["rewrite", model, "--stats", other_stats]), "another model"),
        (argv(&["rewrite", model, "--stats", &notes]), "notes.txt"),
        (argv(&["rewrite", model, "--stats", stats, "--replace", "nope"]), "--replace"),
        (argv(&["rewrite", model, "--stats", stats, "--kv", "nope"]), "--kv"),
        (
            argv(&["rewrite", model, "--stats", stats, "--engine", "tract", "--weight-format", "int4"]),
            "MatMulNBits",
        ),
        (argv(&["rewrite", &notes, "--stats", stats]), "notes.txt"),
        (argv(&["check", model, "--prompt-len", "0"]), "--prompt-len"),
        (argv(&["check", model, "--prompts", "0"]), "--prompts"),
        (argv(&["check", model, "--max-kl", "1"]), "--reference"),
        (argv(&["check", model, "--reference", &notes]), "notes.txt"),
        (argv(&["check", model, "--reference", model, "--min-top1", "inf"]), "--min-top1"),
        (argv(&["check", model, "--data", &csv]), "unsupported data file"),
        (argv(&["eval", model, "--data", corpus, "--seq-len", "0"]), "--seq-len"),
        (
            argv(&["eval", model, model, "--data", corpus, "--seq-len", "16", "--gen-tokens", "0"]),
            "--gen-tokens",
        ),
        (argv(&["eval", model, "--data", &missing]), "missing.json"),
        (argv(&["eval", &notes, "--data", corpus]), "notes.txt"),
        (argv(&["bench", model, "--prompt-len", "16", "--runs", "0"]), "--runs"),
        (argv(&["bench", model, "--prompt-len", "16", "--gen", "0"]), "--gen"),
        (argv(&["bench", model, "--prompt-len", "0", "--gen", "4"]), "--prompt-len"),
        (argv(&["bench", &notes]), "notes.txt"),
        (
            argv(&["bench", model_path("llama-optimum-nopast").to_str().unwrap(), "--prompt-len", "16"]),
            "no KV cache",
        ),
        (argv(&["merge-stats", stats, other_stats, "-o", &out]), "different models"),
        (argv(&["merge-stats", &notes, "-o", &out]), "notes.txt"),
        (argv(&["merge-stats", stats, "-o", stats]), "refusing to write"),
        (argv(&["inspect", &notes]), "notes.txt"),
        (argv(&["inspect", &missing]), "missing.json"),
        (
            argv(&["inspect", model, "--run", "--engine", "tract", "--ep", "cuda"]),
            "tract runs on the CPU only",
        ),
        (argv(&["nonsense"]), "nonsense"),
        // Longer than the fixtures' context of 256 (config.json max_position_embeddings).
        (
            argv(&["calibrate", model, "--data", corpus, "--seq-len", "300", "-o", &out]),
            "longer than the model's context of 256",
        ),
        (argv(&["check", model, "--prompt-len", "250"]), "longer than the model's context of 256"),
        (argv(&["bench", model]), "longer than the model's context of 256"),
        (argv(&["eval", model, "--seq-len", "257"]), "longer than the model's context of 256"),
        // Checked before the sweep calibrates, not after.
        (
            argv(&[
                "sweep",
                model,
                "--max-kl",
                "0.1",
                "--bench",
                "--prompt-len",
                "16",
                "--long-context",
                "200",
            ]),
            "--long-context 200 with --gen 128 makes sequences of 328 tokens, longer than the model's context of 256",
        ),
    ];
    assert!(cases.len() >= 50);
    for (args, needle) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(d, &args, needle);
    }
}

/// Subgraphs nested a thousand deep: refused in one short line (the decoder's message names every
/// enclosing field).
#[test]
fn deeply_nested_subgraphs_are_refused_in_one_short_line() {
    use nbl_onnx::onnx::proto::{AttributeProto, GraphProto, NodeProto};
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let mut model = Model::load(model_path("llama-optimum-past")).unwrap().proto;
    let mut body = GraphProto::default();
    for _ in 0..1000 {
        let node = NodeProto {
            op_type: Some("If".into()),
            attribute: vec![AttributeProto {
                name: Some("then_branch".into()),
                g: Some(body),
                ..Default::default()
            }],
            ..Default::default()
        };
        body = GraphProto { node: vec![node], ..Default::default() };
    }
    model.graph.as_mut().unwrap().node.push(body.node.remove(0));
    let path = dir.path().join("nested.onnx");
    std::fs::write(&path, model.encode_to_vec()).unwrap();
    let out = nbl(&["inspect", path.to_str().unwrap()]);
    assert_bad_input(&out, "not a valid ONNX model");
    assert!(stderr(&out).len() < 600, "{} bytes: {}", stderr(&out).len(), stderr(&out));
}

#[test]
fn a_text_file_is_not_an_onnx_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.onnx");
    std::fs::write(&path, "this is not a model\n").unwrap();
    assert_bad_input(&nbl(&["inspect", path.to_str().unwrap()]), "notes.onnx");
}

#[test]
fn an_empty_file_is_not_an_onnx_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.onnx");
    std::fs::write(&path, "").unwrap();
    assert_bad_input(&nbl(&["inspect", path.to_str().unwrap()]), "is empty");
}

#[test]
fn a_truncated_model_is_rejected_wherever_it_is_cut() {
    let bytes = std::fs::read(model_path("llama-optimum-past")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for fraction in [0.001, 0.1, 0.5, 0.9, 0.999] {
        let cut = (bytes.len() as f64 * fraction) as usize;
        let path = dir.path().join(format!("cut-{cut}.onnx"));
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let out = nbl(&["inspect", path.to_str().unwrap()]);
        assert_bad_input(&out, &format!("cut-{cut}.onnx"));
    }
}

#[test]
fn a_missing_external_data_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    std::fs::copy(model_path("llama-optimum-extdata"), &path).unwrap();
    let out = nbl(&["inspect", path.to_str().unwrap()]);
    assert_bad_input(&out, "model.onnx_data");
}

#[test]
fn a_truncated_external_data_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    std::fs::copy(model_path("llama-optimum-extdata"), &path).unwrap();
    let data = std::fs::read(fixtures_dir().join("llama-optimum-extdata/model.onnx_data")).unwrap();
    std::fs::write(dir.path().join("model.onnx_data"), &data[..data.len() / 2]).unwrap();
    assert_bad_input(&nbl(&["inspect", path.to_str().unwrap()]), "truncated data file");
}

#[test]
fn a_directory_is_not_a_model_and_the_model_inside_is_suggested() {
    let dir = fixtures_dir().join("llama-optimum-past");
    let out = nbl(&["inspect", dir.to_str().unwrap()]);
    assert_bad_input(&out, "is a directory");
    assert!(String::from_utf8_lossy(&out.stderr).contains("did you mean"));
}

#[test]
fn a_missing_file_is_named() {
    assert_bad_input(&nbl(&["inspect", "/nonexistent/model.onnx"]), "/nonexistent/model.onnx");
}

fn weight(name: &str, dims: &[i64]) -> TensorProto {
    let count: i64 = dims.iter().product();
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(tensor_proto::DataType::Float as i32),
        raw_data: Some(vec![0u8; count as usize * 4].into()),
        ..Default::default()
    }
}

/// An embedding and two residual MLP blocks, but no attention: a well-formed model of the wrong kind.
fn mlp_only_model() -> ModelProto {
    let graph = GraphProto {
        name: Some("mlp-only".into()),
        node: vec![
            node("Gather", &["embed", "input_ids"], "h0"),
            node("MatMul", &["h0", "w_up0"], "up0"),
            node("Relu", &["up0"], "act0"),
            node("MatMul", &["act0", "w_down0"], "down0"),
            node("Add", &["h0", "down0"], "h1"),
            node("MatMul", &["h1", "w_up1"], "up1"),
            node("Relu", &["up1"], "act1"),
            node("MatMul", &["act1", "w_down1"], "down1"),
            node("Add", &["h1", "down1"], "h2"),
            node("MatMul", &["h2", "lm_head"], "logits"),
        ],
        initializer: vec![
            weight("embed", &[16, 8]),
            weight("w_up0", &[8, 32]),
            weight("w_down0", &[32, 8]),
            weight("w_up1", &[8, 32]),
            weight("w_down1", &[32, 8]),
            weight("lm_head", &[8, 16]),
        ],
        input: vec![tensor_value("input_ids", DType::I64, Some(2))],
        output: vec![tensor_value("logits", DType::F32, Some(3))],
        ..Default::default()
    };
    ModelProto {
        ir_version: Some(8),
        producer_name: Some("handmade".into()),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
        graph: Some(graph),
        ..Default::default()
    }
}

fn write_model(dir: &Path, name: &str, model: &ModelProto) -> String {
    let path = dir.join(name);
    std::fs::write(&path, model.encode_to_vec()).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn a_graph_without_attention_is_explained_branch_by_branch() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), "mlp.onnx", &mlp_only_model());
    let out = nbl(&["inspect", &path]);
    assert_bad_input(&out, "no attention block found");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("branch 0: \"down0\" joins at node \"h1\""), "{stderr}");
    assert!(stderr.contains("branch 1: \"down1\""), "{stderr}");
    assert!(stderr.contains("no Softmax feeding a MatMul"), "{stderr}");
}

#[test]
fn a_graph_without_token_embedding_is_explained() {
    let mut model = mlp_only_model();
    let graph = model.graph.as_mut().unwrap();
    graph.node[0] = node("MatMul", &["features", "embed"], "h0");
    graph.input = vec![tensor_value("features", DType::F32, Some(2))];
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), "no-embedding.onnx", &model);
    assert_bad_input(&nbl(&["inspect", &path]), &format!("{path}: no token embedding found"));
}

#[test]
fn an_external_data_location_outside_the_model_directory_is_refused() {
    let mut model = mlp_only_model();
    let t = &mut model.graph.as_mut().unwrap().initializer[0];
    t.raw_data = None;
    t.data_location = Some(tensor_proto::DataLocation::External as i32);
    t.external_data = vec![nbl_onnx::onnx::proto::StringStringEntryProto {
        key: Some("location".into()),
        value: Some("../../etc/passwd".into()),
    }];
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), "escape.onnx", &model);
    assert_bad_input(&nbl(&["inspect", &path]), "must be a relative path inside the model's directory");
}

#[test]
fn a_graph_with_a_cycle_is_refused_naming_a_node() {
    let mut model = mlp_only_model();
    let graph = model.graph.as_mut().unwrap();
    graph.node[1].input[0] = "down0".into(); // up0 = MatMul(down0, w): down0 depends on up0
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), "cycle.onnx", &model);
    assert_bad_input(&nbl(&["inspect", &path]), "cycle through node");
}

#[test]
fn unknown_arguments_are_bad_input() {
    let out = nbl(&["inspect", "--no-such-flag", "x.onnx"]);
    assert_eq!(out.status.code(), Some(2));
}

/// OPT's flatten of the stream to `[-1, d]` is seen through because its target keeps the last
/// dimension; a reshape to `[-1, d/2]` regroups the values of each token, and the walk stops there,
/// naming it.
#[test]
fn a_reshape_that_regroups_the_stream_is_not_seen_through() {
    let model = Model::load(model_path("opt-optimum-past")).unwrap();
    assert_eq!(nbl_onnx::detect::find_layout(&model).unwrap().layers.len(), 3);
    let mut proto = model.proto.clone();
    let graph = proto.graph.as_mut().unwrap();
    let flatten = graph.node.iter().position(|n| n.name() == "/decoder/layers.0/Reshape").unwrap();
    graph.initializer.push(TensorProto {
        name: Some("half_rows".into()),
        dims: vec![2],
        data_type: Some(tensor_proto::DataType::Int64 as i32),
        int64_data: vec![-1, 32],
        ..Default::default()
    });
    graph.node[flatten].input[1] = "half_rows".into();
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), "regrouped.onnx", &proto);
    assert_bad_input(&nbl(&["inspect", &path]), "through node \"/decoder/layers.0/Reshape\" (Reshape)");
}
