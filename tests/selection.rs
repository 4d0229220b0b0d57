//! Choosing layers: named layers exactly, measured selection step by step against an independent
//! measurement, and every criterion spelt alike on the command line, in the report and in the
//! rewritten model's metadata.

mod common;

use common::*;
use nbl_onnx::detect::find_layout;
use nbl_onnx::onnx::Model;

/// `--layer-ids` names layers, not edits: a repeat changes nothing, and the order given is kept.
#[test]
fn layer_ids_select_exactly_the_layers_named() {
    let ws = workspace("llama-optimum-past");
    for (ids, selected, metadata) in [("2,1,2", vec![2, 1], "2,1"), ("1,0", vec![1, 0], "1,0")] {
        let out = rewrite(&ws, &["--layer-ids", ids]);
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(ws.dir.path().join("model.nbl.json")).unwrap()).unwrap();
        assert_eq!(report["selected"], serde_json::json!(selected), "{ids}");
        let mut sorted = selected.clone();
        sorted.sort_unstable();
        assert_eq!(report["rewrite"]["layers"], serde_json::json!(sorted), "{ids}");
        let model = Model::load(&out).unwrap();
        let meta: Vec<(&str, &str)> =
            model.proto.metadata_props.iter().map(|p| (p.key(), p.value())).collect();
        assert!(meta.contains(&("nbl.layers", metadata)), "{ids}: {meta:?}");
        assert_eq!(find_layout(&model).unwrap().layers.len(), 3 - selected.len(), "{ids}");
    }
}

/// `--criterion measured` adds, at each step, the candidate whose linearisation together with the
/// layers already chosen diverges least from the original on the probe blocks. The test scores
/// every candidate set itself, by rewriting each with `--layer-ids` and running `eval` on the same
/// blocks, and checks the choices and the KL each step reports (the search keeps the original's
/// log-probabilities in f32, eval in f64).
#[test]
fn measured_selection_adds_the_layer_that_diverges_least() {
    let ws = workspace("llama-optimum-past");
    let probe = ["--data", ws.corpus.to_str().unwrap(), "--seq-len", "32"];
    let (_, report) = rewrite_to(
        &ws,
        "measured.onnx",
        &["--criterion", "measured", "--layers", "2", "--probe-sequences", "2"],
    );
    let steps = report["measured"]["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    assert_eq!(report["measured"]["passes"], 1 + 3 + 2, "{}", report["measured"]);

    let kl_of = |ids: &str| -> f64 {
        let out = ws.dir.path().join(format!("ids-{}.onnx", ids.replace(',', "-")));
        ok(nbl(&[
            "rewrite",
            ws.model.to_str().unwrap(),
            "--stats",
            ws.stats.to_str().unwrap(),
            "--layer-ids",
            ids,
            "-o",
            out.to_str().unwrap(),
        ]));
        let mut args = vec![
            "eval",
            ws.model.to_str().unwrap(),
            out.to_str().unwrap(),
            "--samples",
            "2",
            "--engine",
            "ort",
            "--json",
        ];
        args.extend_from_slice(&probe);
        let eval: serde_json::Value = serde_json::from_slice(&ok(nbl(&args)).stdout).unwrap();
        eval["models"][1]["kl_vs_first"].as_f64().unwrap()
    };
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs().max(1e-9);
    let singles: Vec<(usize, f64)> = (0..3).map(|l| (l, kl_of(&l.to_string()))).collect();
    let first = singles.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
    assert_eq!(steps[0]["layer"], first.0, "singles {singles:?}");
    assert!(close(steps[0]["kl"].as_f64().unwrap(), first.1), "{} vs {}", steps[0]["kl"], first.1);
    let pairs: Vec<(usize, f64)> = (0..3)
        .filter(|&l| l != first.0)
        .map(|l| (l, kl_of(&format!("{},{}", first.0.min(l), first.0.max(l)))))
        .collect();
    let second = pairs.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
    assert_eq!(steps[1]["layer"], second.0, "pairs {pairs:?}");
    assert!(close(steps[1]["kl"].as_f64().unwrap(), second.1), "{} vs {}", steps[1]["kl"], second.1);
    assert_eq!(report["selected"], serde_json::json!([first.0, second.0]));
}

/// The report JSON and the model's metadata spell every criterion as the command line takes it
/// (`weighted-cca`, not `weightedcca`), and the fitting as the report does.
#[test]
fn every_criterion_is_spelt_as_the_cli_spells_it_in_the_report_and_the_metadata() {
    let ws = workspace("llama-optimum-past");
    for criterion in ["cca", "cosine", "residual", "weighted-cca", "measured"] {
        let out = format!("{criterion}.onnx");
        let extra = ["--criterion", criterion, "--layers", "1", "--probe-sequences", "1"];
        let (path, report) = rewrite_to(&ws, &out, &extra);
        assert_eq!(report["criterion"], criterion, "{criterion}");
        let model = Model::load(&path).unwrap();
        let metadata = |key: &str| {
            model.proto.metadata_props.iter().find(|p| p.key() == key).map(|p| p.value().to_string())
        };
        assert_eq!(metadata("nbl.criterion").as_deref(), Some(criterion));
        assert_eq!(metadata("nbl.fitting").as_deref(), report["fitting"].as_str());
        assert_eq!(metadata("nbl.replace").as_deref(), report["rewrite"]["replace"].as_str());
        assert_eq!(metadata("nbl.kv").as_deref(), report["rewrite"]["kv"].as_str());
    }
}
