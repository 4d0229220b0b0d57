//! Budget mode (`rewrite --max-kl B --units ...`): units chosen by measurement within a KL budget,
//! the chosen set confirmed on held-out text, and the refusals.

mod common;

use common::*;
use nbl_onnx::onnx::Model;
use nbl_onnx::unit::Unit;

/// `rewrite` of the workspace's model calibrating on its corpus (no statistics file), with `extra`.
fn rewrite_args<'a>(ws: &'a Workspace, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["rewrite", ws.model.to_str().unwrap()];
    args.extend_from_slice(&data_args(ws));
    args.extend_from_slice(&["-o", out]);
    args.extend_from_slice(extra);
    args
}

/// `calibrate --units UNITS` of the workspace's model on its corpus, into `UNITS.safetensors` there.
fn calibrate_units(ws: &Workspace, units: &str) -> nbl_onnx::stats::Stats {
    let stats = ws.dir.path().join(format!("{units}.safetensors"));
    let model = ws.model.to_str().unwrap();
    let mut args = calibrate_args(model, ws.corpus.to_str().unwrap(), "32", "8", stats.to_str().unwrap());
    args.extend(["--units", units]);
    ok(nbl(&args));
    nbl_onnx::stats::Stats::load(&stats).unwrap()
}

#[test]
fn the_budget_buys_units_of_every_kind_without_overshooting() {
    let ws = workspace("llama-optimum-past");
    let out = ws.dir.path().join("budget/model.onnx");
    let run = ok(nbl(&rewrite_args(&ws, out.to_str().unwrap(), &["--max-kl", "0.3", "--units", "all"])));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.with_file_name("model.nbl.json")).unwrap()).unwrap();
    let budget = &report["budget"];
    // Every unit of the 3-layer model was scored alone: 3 each of attention, MLP, layer, runs
    // 0-1, 1-2 and 0-2, and folds 1-1, 1-2 and 2-2.
    assert_eq!(budget["alone"].as_array().unwrap().len(), 15, "{budget}");
    let steps = budget["steps"].as_array().unwrap();
    assert!(!steps.is_empty(), "{budget}");
    let mut saving = 0.0;
    for step in steps {
        let kl = step["harm"].as_f64().unwrap();
        assert!(kl <= 0.3, "a step went over the budget: {step}");
        assert!(step["saving"].as_f64().unwrap() > saving, "each step saves more: {budget}");
        saving = step["saving"].as_f64().unwrap();
    }
    let units: Vec<Unit> = serde_json::from_value(budget["units"].clone()).unwrap();
    for (i, a) in units.iter().enumerate() {
        assert!(units[i + 1..].iter().all(|b| !a.overlaps(b)), "{units:?}");
    }
    // What was written is what was chosen, and it says so.
    let mut written: Vec<Unit> = serde_json::from_value(report["rewrite"]["units"].clone()).unwrap();
    let mut chosen = units.clone();
    written.sort();
    chosen.sort();
    assert_eq!(written, chosen);
    assert!(budget["heldout_kl"].as_f64().unwrap().is_finite());
    assert!(budget["predicted_decode_speedup"].as_f64().unwrap() > 1.0, "{budget}");
    assert!(budget["predicted_prefill_speedup"].as_f64().unwrap() > 1.0, "{budget}");
    assert!(stderr(&run).contains("held-out KL"), "{}", stderr(&run));
    let model = Model::load(&out).unwrap();
    let meta =
        |key: &str| model.proto.metadata_props.iter().find(|p| p.key() == key).map(|p| p.value().to_string());
    if units.iter().any(|u| u.kind != nbl_onnx::unit::UnitKind::Attention) {
        let meta_units: Vec<Unit> = serde_json::from_str(&meta("nbl.units").unwrap()).unwrap();
        assert_eq!(meta_units.len(), units.len());
    }
    // The rewrite runs and decodes with its cache.
    let (code, check) = check(&out, &[]);
    assert_eq!(code, Some(0), "{check}");
    assert_eq!(status(&check, "onnxruntime"), "ok");
}

/// A perplexity budget measures the harm as the relative perplexity increase on the probe; a target
/// speed-up stops at the least harm that reaches it, and exits 1 naming the fastest point where no
/// choice does.
#[test]
fn a_perplexity_budget_and_a_target_speedup_choose_by_their_own_measure() {
    let ws = workspace("llama-optimum-past");
    let out = ws.dir.path().join("ppl/model.onnx");
    ok(nbl(&rewrite_args(
        &ws,
        out.to_str().unwrap(),
        &["--max-ppl-increase", "20%", "--units", "attention,mlp"],
    )));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.with_file_name("model.nbl.json")).unwrap()).unwrap();
    let budget = &report["budget"];
    assert_eq!(budget["limit"], serde_json::json!({"measure": "ppl-increase", "max": 0.2}), "{budget}");
    for step in budget["steps"].as_array().unwrap() {
        assert!(step["harm"].as_f64().unwrap() <= 0.2, "{step}");
    }
    assert!(budget["heldout_ppl_increase"].as_f64().unwrap().is_finite());

    let out = ws.dir.path().join("target/model.onnx");
    ok(nbl(&rewrite_args(&ws, out.to_str().unwrap(), &["--target-speedup", "1.2", "--units", "all"])));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.with_file_name("model.nbl.json")).unwrap()).unwrap();
    let budget = &report["budget"];
    assert!(budget["predicted_decode_speedup"].as_f64().unwrap() >= 1.2, "{budget}");
    // It stops once the target is reached: the last step alone is what takes it there.
    let steps = budget["steps"].as_array().unwrap();
    assert!(!steps.is_empty());

    let out = ws.dir.path().join("too-fast/model.onnx");
    let run =
        nbl(&rewrite_args(&ws, out.to_str().unwrap(), &["--target-speedup", "1000", "--units", "attention"]));
    let err = stderr(&run);
    assert_eq!(run.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no choice reaches a predicted speed-up of 1000: the fastest point found is "),
        "{err}"
    );
    assert!(!out.exists());
}

/// A fold chosen by the budget is written into the MLP before it, said so in the report, and the
/// model runs and decodes: float weights multiplied, int4 weights quantised again (GenAI).
#[test]
fn a_chosen_fold_goes_into_the_mlp_weights_and_the_report_says_so() {
    for (fixture, requantised) in [("llama-optimum-past", false), ("llama-genai-int4", true)] {
        let ws = workspace(fixture);
        let out = ws.dir.path().join("fold/model.onnx");
        let run = ok(nbl(&rewrite_args(&ws, out.to_str().unwrap(), &["--max-kl", "10", "--units", "fold"])));
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.with_file_name("model.nbl.json")).unwrap()).unwrap();
        let folds = report["rewrite"]["folds"].as_array().unwrap();
        assert!(!folds.is_empty(), "{fixture}: {report}");
        for fold in folds {
            let unit: Unit = serde_json::from_value(fold["unit"].clone()).unwrap();
            assert_eq!(unit.kind, nbl_onnx::unit::UnitKind::Fold);
            assert_eq!(fold["requantised"], requantised, "{fixture}: {fold}");
            let projection = fold["projection"].as_str().unwrap();
            assert!(projection.contains(&format!("layers.{}/mlp/down_proj", unit.layer - 1)), "{projection}");
            assert!(
                stderr(&run).contains(&format!("{unit}: the map is folded into {projection:?}")),
                "{}",
                stderr(&run)
            );
        }
        let (code, check) = check(&out, &[]);
        assert_eq!(code, Some(0), "{fixture}: {check}");
        assert_eq!(status(&check, "onnxruntime"), "ok", "{fixture}");
    }
}

#[test]
fn a_budget_no_unit_meets_exits_1_naming_the_cheapest_point() {
    let ws = workspace("llama-optimum-past");
    let out = ws.dir.path().join("none/model.onnx");
    let run =
        nbl(&rewrite_args(&ws, out.to_str().unwrap(), &["--max-kl", "1e-9", "--units", "attention,mlp"]));
    let err = stderr(&run);
    assert_eq!(run.status.code(), Some(1), "{err}");
    assert!(err.contains("no unit stays within KL 0.000000001: the cheapest point found is "), "{err}");
    assert!(err.contains(" alone, at KL 0.0"), "{err}");
    assert!(!out.exists() && !out.with_file_name("model.nbl.json").exists(), "nothing may be written");
}

#[test]
fn bad_budgets_and_units_are_refused() {
    let ws = workspace("llama-optimum-past");
    let out = ws.dir.path().join("bad.onnx");
    let out = out.to_str().unwrap();
    for budget in [
        "--max-kl=-0.1",
        "--max-kl=nan",
        "--max-kl=0",
        "--max-kl=inf",
        "--max-ppl-increase=-5",
        "--target-speedup=0.9",
    ] {
        let run = nbl(&rewrite_args(&ws, out, &[budget]));
        assert_eq!(run.status.code(), Some(2), "{budget}: {}", stderr(&run));
        let flag = budget.split('=').next().unwrap();
        assert!(stderr(&run).contains(flag), "{}", stderr(&run));
    }
    let run = nbl(&rewrite_args(&ws, out, &["--max-kl", "0.1", "--max-ppl-increase", "5"]));
    assert_eq!(run.status.code(), Some(2), "one budget at a time: {}", stderr(&run));
    let run = nbl(&rewrite_args(&ws, out, &["--max-kl", "0.1", "--units", "mlp,ffn"]));
    assert_eq!(run.status.code(), Some(2));
    assert!(stderr(&run).contains("unknown unit \"ffn\""), "{}", stderr(&run));
    // Units besides attention need a budget to choose among them.
    assert_bad_input(&nbl(&rewrite_args(&ws, out, &["--units", "mlp", "--layers", "1"])), "without --max-kl");
    // Statistics without the moments the units need name the calibration flag that provides them.
    let stats = ws.stats.to_str().unwrap();
    let run = nbl(&rewrite_args(&ws, out, &["--stats", stats, "--max-kl", "0.1", "--units", "mlp"]));
    assert_bad_input(&run, "--units: the statistics hold no moments of mlp 0: calibrate with --units mlp");
    assert!(!std::path::Path::new(out).exists());
}

#[test]
fn a_mixture_of_experts_mlp_is_refused_with_the_reason() {
    let ws = workspace("gptoss-optimum-past");
    let out = ws.dir.path().join("moe.onnx");
    let run = nbl(&rewrite_args(&ws, out.to_str().unwrap(), &["--max-kl", "0.1", "--units", "mlp"]));
    assert_bad_input(&run, "--units: no mlp unit can be replaced");
    let err = stderr(&run);
    assert!(
        err.contains("mixture of experts") && err.contains("TopK") && err.contains("--units layer"),
        "{err}"
    );
    // Its layers can be replaced whole: calibrate measures them.
    let stats = calibrate_units(&ws, "layer");
    let units: Vec<Unit> = stats.layers.iter().map(|t| t.unit()).collect();
    assert!(units.contains(&Unit::layer(0)) && units.contains(&Unit::layer(2)), "{units:?}");
}

/// Statistics with units besides attention stay what analyze reads (attention sites), and a
/// statistics file of only attention, from any version, reads as before.
#[test]
fn statistics_with_units_keep_attention_for_analysis() {
    let ws = workspace("llama-optimum-past");
    let (read, stats) = (calibrate_units(&ws, "run,mlp"), ws.dir.path().join("run,mlp.safetensors"));
    // 3 attention sites, 3 MLPs, runs 0-1, 1-2, 0-2.
    assert_eq!(read.layers.len(), 9);
    let with_units = read.layers.iter().filter(|t| t.unit.is_some()).count();
    assert_eq!(with_units, 6);
    // The attention sites' moments are the same as a file without units holds.
    let plain = nbl_onnx::stats::Stats::load(&ws.stats).unwrap();
    for l in 0..3 {
        assert_eq!(read.moments[l].sxx, plain.moments[l].sxx, "layer {l}");
    }
    let analysis =
        ok(nbl(&["analyze", stats.to_str().unwrap(), "--json", "--model", ws.model.to_str().unwrap()]));
    let analysis: serde_json::Value = serde_json::from_slice(&analysis.stdout).unwrap();
    assert_eq!(analysis["layers"].as_array().unwrap().len(), 3, "{analysis}");
}

/// `sweep` draws every curve from the same statistics: the budget path among the units asked for
/// and the attention-only methods, each point on held-out text, the fastest within the budget
/// chosen per curve and timed against the original.
#[test]
fn sweep_draws_the_frontier_and_recommends_a_point_within_the_budget() {
    let ws = workspace("llama-optimum-past");
    let dir = ws.dir.path().join("frontier");
    let mut args = vec!["sweep", ws.model.to_str().unwrap()];
    args.extend_from_slice(&data_args(&ws));
    args.extend_from_slice(&[
        "--max-kl",
        "0.5,0.2",
        "--units",
        "all",
        "--heldout-sequences",
        "2",
        "--bench",
        "--runs",
        "1",
        "--prompt-len",
        "16",
        "--gen",
        "4",
        "--long-context",
        "48",
        "-o",
        dir.to_str().unwrap(),
    ]);
    let run = ok(nbl(&args));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("sweep.json")).unwrap()).unwrap();
    let methods: Vec<&str> =
        report["curves"].as_array().unwrap().iter().map(|c| c["method"].as_str().unwrap()).collect();
    let kinds = ["budget-attention", "budget-mlp", "budget-layer", "budget-run", "budget-fold"];
    assert_eq!(methods[..6], [&["budget"], &kinds[..]].concat());
    assert_eq!(methods[6..], ["nbl", "cosine", "drop"]);
    assert_eq!(report["max_kl"], serde_json::json!([0.2, 0.5]), "budgets ascending");
    for curve in report["curves"].as_array().unwrap() {
        let points = curve["points"].as_array().unwrap();
        let method = curve["method"].as_str().unwrap();
        // Each attention-only curve adds one layer per point.
        if !method.starts_with("budget") {
            assert!(!points.is_empty(), "{curve}");
            for (k, p) in points.iter().enumerate() {
                assert_eq!(p["units"].as_array().unwrap().len(), k + 1, "{curve}");
            }
        }
        // A kind's own curve holds only that kind, and is drawn, not timed.
        let shown_only = curve["shown_only"] == true;
        assert_eq!(shown_only, method.starts_with("budget-") && method != "budget-attention", "{method}");
        if let Some(kind) = method.strip_prefix("budget-") {
            for p in points {
                assert!(p["units"].as_array().unwrap().iter().all(|u| u["kind"] == kind), "{p}");
            }
        }
        for (chosen, budget) in curve["chosen"].as_array().unwrap().iter().zip([0.2, 0.5]) {
            let Some(chosen) = chosen.as_u64() else { continue };
            let p = &points[chosen as usize];
            assert!(p["heldout"]["kl"].as_f64().unwrap() <= budget, "{p}");
            if shown_only {
                assert!(p.get("measured").is_none() && p.get("generation").is_none(), "{p}");
                continue;
            }
            // Timed after the prompt length and after the long context, beside the bytes model's
            // prediction at each.
            for prompt_len in [16, 48] {
                let timed = p["measured"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|m| m["max_kl"] == budget && m["prompt_len"] == prompt_len)
                    .unwrap_or_else(|| panic!("{p}"));
                assert!(timed["decode_speedup"].as_f64().unwrap() > 0.0, "{p}");
                assert!(timed["predicted_decode_speedup"].as_f64().unwrap() >= 1.0, "{p}");
            }
            assert!(p["generation"]["prompts"].as_u64().unwrap() > 0, "{p}");
        }
    }
    let table = String::from_utf8(run.stdout.clone()).unwrap();
    assert!(table.contains("| method | units | held-out KL |"), "{table}");
    assert_eq!(std::fs::read_to_string(dir.join("sweep.md")).unwrap(), table);
    assert!(std::fs::read_to_string(dir.join("sweep.svg")).unwrap().starts_with("<svg"));
    let err = stderr(&run);
    let closing: Vec<&str> = err.lines().rev().take(2).collect();
    assert!(closing[0].starts_with("fastest within held-out KL 0.5: "), "{err}");
    assert_eq!(report["bench"]["long_context"], 48, "{}", report["bench"]);
    assert!(table.contains(" @48"), "{table}");
    assert!(closing[1].contains("held-out KL 0.2"), "{err}");
}
