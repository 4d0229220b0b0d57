//! `check` on rewritten fixtures: both engines run and decode with the KV cache, the gates fail
//! with exit code 1, and structural defects are found.

mod common;

use common::*;
use nbl_onnx::onnx::Model;

/// Every rewritten fixture passes `check` on ONNX Runtime and on tract (where tract has the
/// operators), including a greedy decode with the KV cache; an unchanged model decodes exactly
/// like the original.
#[test]
fn rewritten_fixtures_pass_check_and_decode_with_their_kv_cache() {
    for fixture in fixture_names() {
        let ws = workspace(&fixture);
        // Every rewrite decodes. One export as written cannot: the GenAI builder's `-p fp16 -e cpu`
        // graph annotates a past+sequence-long tensor with the `sequence_length` dim, and ONNX
        // Runtime's CPU provider fails on it at the first decode step. `check` says the model runs
        // without its annotations, which the rewrite does not carry.
        let steps = "4";
        let (code, mut original) = check(&ws.model, &["--decode-steps", steps]);
        let original_decodes = code == Some(0);
        if !original_decodes {
            let text = original.to_string();
            assert!(
                text.contains("decode step 1") && text.contains("without the model's value_info"),
                "{fixture}: {text}"
            );
            let (code, prompt_only) = check(&ws.model, &["--decode-steps", "0"]);
            assert_eq!(code, Some(0), "{fixture}: {prompt_only}");
            original = prompt_only;
        }
        let tract_ran_the_original = status(&original, "tract") == "ok";
        for k in ["0", "1", "2"] {
            let out = rewrite(&ws, &["--layers", k, "--allow-noop"]);
            let reference = ws.model.to_str().unwrap();
            let (code, report) = check(&out, &["--reference", reference, "--decode-steps", steps]);
            assert_eq!(code, Some(0), "{fixture} k={k}: {report}");
            let has_kv = fixture_json(&fixture)["has_kv_cache"].as_bool().unwrap();
            let expected_steps = if has_kv { steps.parse().unwrap() } else { 0 };
            assert_eq!(decoded(&report, "onnxruntime").len(), expected_steps, "{fixture}");
            if k == "0" {
                if original_decodes {
                    assert_eq!(
                        decoded(&report, "onnxruntime"),
                        decoded(&original, "onnxruntime"),
                        "{fixture}"
                    );
                }
                assert_eq!(report["reference"]["max_abs_logit_diff"], 0.0, "{fixture}");
                assert_eq!(report["reference"]["top1_agreement"], 1.0);
                if fixture_json(&fixture)["has_kv_cache"].as_bool().unwrap() {
                    let generation = &report["reference"]["generation"];
                    assert_eq!(generation["exact_match_rate"], 1.0, "{fixture}: {generation}");
                    assert_eq!(generation["mean_common_tokens"], 16.0, "{fixture}: {generation}");
                }
            }
            // A rewrite must not cost a model its portability: what tract ran, it still runs.
            if tract_ran_the_original {
                assert_eq!(status(&report, "tract"), "ok", "{fixture} k={k}: {report}");
                assert_eq!(decoded(&report, "tract"), decoded(&report, "onnxruntime"), "{fixture} k={k}");
            }
        }
    }
}

#[test]
fn check_gates_fail_with_exit_code_1() {
    let ws = workspace("llama-optimum-past");
    let out = rewrite(&ws, &["--layers", "2"]);
    let reference = ws.model.to_str().unwrap();
    let gates = ["--max-kl", "1e-9", "--min-top1", "1", "--min-common-tokens", "16"];
    let (code, report) = check(&out, &[&["--reference", reference], &gates[..]].concat());
    assert_eq!(code, Some(1), "{report}");
    let problems = report["problems"].as_array().unwrap();
    assert!(problems.iter().any(|p| p.as_str().unwrap().contains("exceeds the max-kl gate")), "{report}");
    assert!(problems.iter().any(|p| p.as_str().unwrap().contains("below the min-top1 gate")), "{report}");
    assert!(
        problems.iter().any(|p| p.as_str().unwrap().contains("below the min-common-tokens gate 16")),
        "{report}"
    );
    // Natural-text prompts: 8 prompts of 32 tokens of held-out C4, 16 tokens generated from each.
    assert_eq!(report["reference"]["positions"], 8 * 32, "{report}");
    assert_eq!(report["reference"]["generation"]["prompts"], 8, "{report}");
    for bad in [&["--gen-tokens", "0"][..], &["--min-common-tokens", "nan"], &["--min-common-tokens", "17"]] {
        let out = nbl(&[&["check", out.to_str().unwrap(), "--reference", reference], bad].concat());
        assert_bad_input(&out, bad[0]);
    }
}

#[test]
fn check_finds_structural_defects() {
    let ws = workspace("llama-optimum-past");
    let mut model = Model::load(&ws.model).unwrap();
    let graph = model.graph_mut();
    let mut unused = graph.initializer[0].clone();
    unused.name = Some("orphan".into());
    graph.initializer.push(unused);
    let last = graph.node.len() - 1;
    let moved = graph.node.remove(last);
    graph.node.insert(0, moved); // the lm_head now reads its input before it is produced
    let broken = ws.dir.path().join("broken.onnx");
    model.save(&broken).unwrap();
    let (code, report) = check(&broken, &[]);
    assert_eq!(code, Some(1));
    let text = report["problems"].to_string();
    assert!(text.contains("initializer \\\"orphan\\\" is not used"), "{text}");
    assert!(text.contains("before it is produced"), "{text}");
}

/// A second engine that fails on some models with an evaluation error (as tract does on BLOOM's
/// ALiBi `CumSum`: `TDim is not a number`), not for a missing operator.
struct FailsOn {
    inner: Box<dyn nbl_onnx::engine::Engine>,
    /// The paths of the models it fails on.
    models: Vec<std::path::PathBuf>,
}

impl nbl_onnx::engine::Engine for FailsOn {
    fn describe(&self) -> String {
        "tract (failing)".into()
    }

    fn load(&self, model: &Model, extra: &[String]) -> anyhow::Result<Box<dyn nbl_onnx::engine::Session>> {
        anyhow::ensure!(!self.models.contains(&model.path), "evaluating node CumSum: TDim is not a number");
        self.inner.load(model, extra)
    }
}

/// Where the second engine cannot run the reference either, `check` says so and passes; where it
/// ran the reference but not the rewrite, that is still a failure; without a reference, a failure.
#[test]
fn an_engine_that_cannot_run_the_reference_is_reported_not_failed() {
    use nbl_onnx::check::{CheckOptions, Gates, run};
    use nbl_onnx::data::{DataSpec, Split};
    let ws = workspace("llama-optimum-past");
    let rewritten = rewrite(&ws, &["--layers", "1"]);
    let (model, reference) = (Model::load(&rewritten).unwrap(), Model::load(&ws.model).unwrap());
    let layout = nbl_onnx::detect::find_layout(&model).ok();
    let options = CheckOptions {
        prompts: DataSpec {
            files: vec![ws.corpus.clone()],
            built_in: Split::Evaluation,
            tokenizer: None,
            eos_id: None,
            seq_len: 16,
            samples: Some(2),
        },
        decode_steps: 2,
        gen_tokens: 4,
        gates: Gates { max_kl: Some(10.0), ..Gates::default() },
    };
    let ort = ort();
    let check = |fails_on: &[&std::path::Path], reference: Option<&Model>| {
        let second = FailsOn { inner: tract(), models: fails_on.iter().map(|p| p.to_path_buf()).collect() };
        run(&model, layout.as_ref(), reference, ort.as_ref(), &second, &options).unwrap()
    };
    // It fails on both: the engine's limit, reported.
    let report = check(&[&rewritten, &ws.model], Some(&reference));
    assert!(report.passed(), "{}", report.text());
    let status = report.runs[1].status.to_string();
    assert!(
        status.starts_with("unsupported: tract (failing) cannot run this model, nor its reference"),
        "{status}"
    );
    assert!(status.contains("TDim is not a number"), "{status}");
    // It runs the reference but not the rewrite: the rewrite broke it.
    let report = check(&[&rewritten], Some(&reference));
    assert!(!report.passed());
    assert!(report.problems.iter().any(|p| p.contains("TDim is not a number")), "{:?}", report.problems);
    // Without a reference the model checked is the original as far as check knows: the second
    // engine's failure is its limit, reported, not a failure of the model.
    let report = check(&[&rewritten], None);
    assert!(report.passed(), "{}", report.text());
    let status = report.runs[1].status.to_string();
    assert!(status.starts_with("unsupported: tract (failing) cannot run this model: "), "{status}");
}

/// BLOOM's rewrite passes `check --reference`, and the report names what tract could not run: the
/// ALiBi `CumSum`, which it cannot evaluate on the original either.
#[test]
fn check_passes_bloom_and_names_what_tract_cannot_run() {
    let ws = workspace("bloom-optimum-past");
    let out = rewrite(&ws, &["--layers", "1"]);
    let (code, report) = check(&out, &["--reference", ws.model.to_str().unwrap(), "--max-kl", "5"]);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(status(&report, "onnxruntime"), "ok", "{report}");
    let tract = engine_run(&report, "tract")["status"].as_str().unwrap();
    assert!(tract.starts_with("unsupported: tract"), "{tract}");
    assert!(tract.contains("cannot run this model, nor its reference"), "{tract}");
    assert!(tract.contains("/transformer/CumSum"), "{tract}");
}
