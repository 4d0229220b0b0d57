//! `eval`: perplexity checked against one computed from the PyTorch logits saved with a fixture,
//! and agreement between models (identical, and the same weights from two exporters).

mod common;

use common::*;
use nbl_onnx::onnx::Tensor;

fn eval_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["eval"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = nbl(&all);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn perplexity_matches_the_pytorch_logits() {
    let reference = reference("llama-optimum-past");
    let Tensor::I64(ids) = &reference["inputs.input_ids"] else { panic!() };
    let row: Vec<i64> = ids.outer_iter().next().unwrap().iter().copied().collect();
    let logits = reference["logits"].to_f64().unwrap();
    // Independent: mean negative log-likelihood of tokens 1..7 under PyTorch's logits, row 0.
    let vocab = logits.shape()[2];
    let mut nll = 0.0;
    for t in 0..row.len() - 1 {
        let l: Vec<f64> = (0..vocab).map(|v| logits[[0, t, v]]).collect();
        let max = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let log_sum = l.iter().map(|v| (v - max).exp()).sum::<f64>().ln() + max;
        nll -= l[row[t + 1] as usize] - log_sum;
    }
    let expected = (nll / (row.len() - 1) as f64).exp();

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ids.json");
    std::fs::write(&data, serde_json::json!([{ "input_ids": row }]).to_string()).unwrap();
    let model = model_path("llama-optimum-past");
    let json = eval_json(&[model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--seq-len", "7"]);
    let got = json["models"][0]["ppl"].as_f64().unwrap();
    eprintln!("perplexity: nbl-onnx {got}, from PyTorch logits {expected}");
    // f32 logits agree to ~1e-5 absolute; the mean log-likelihood to ~1e-6.
    assert!((got / expected - 1.0).abs() < 1e-5, "{got} vs {expected}");
    assert_eq!(json["models"][0]["tokens"], 6);
}

#[test]
fn the_same_weights_from_two_exporters_agree_and_a_model_with_itself_fully() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("text.txt");
    std::fs::write(
        &data,
        "A quiet morning in the village, with bread in the oven and rain on the roof. ".repeat(12),
    )
    .unwrap();
    let optimum = model_path("llama-optimum-past");
    let genai = model_path("llama-genai-fp32");
    let json = eval_json(&[
        optimum.to_str().unwrap(),
        optimum.to_str().unwrap(),
        genai.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--seq-len",
        "32",
    ]);
    let models = json["models"].as_array().unwrap();
    assert_eq!(models[1]["kl_vs_first"], 0.0);
    assert_eq!(models[1]["top1_vs_first"], 1.0);
    assert!(models[2]["kl_vs_first"].as_f64().unwrap() < 1e-8, "{}", models[2]);
    assert_eq!(models[2]["top1_vs_first"], 1.0);
    let (a, b) = (models[0]["ppl"].as_f64().unwrap(), models[2]["ppl"].as_f64().unwrap());
    assert!((a / b - 1.0).abs() < 1e-5, "{a} vs {b}");
    // Greedy continuations of the first half of each block: the same model continues identically.
    assert!(models[0].get("generation_vs_first").is_none());
    let generation = &models[1]["generation_vs_first"];
    assert_eq!(
        (generation["exact_match_rate"].as_f64(), generation["mean_common_tokens"].as_f64()),
        (Some(1.0), Some(32.0))
    );
    assert!(generation["prompts"].as_u64().unwrap() >= 1, "{generation}");
}

/// Without --data, eval reads the built-in sample's held-out documents (200-299), never the ones
/// calibration reads by default.
#[test]
fn eval_without_data_reads_the_held_out_documents() {
    let model = model_path("llama-optimum-past");
    let out = nbl(&["eval", model.to_str().unwrap(), "--seq-len", "64", "--samples", "4", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("documents 200-299"), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["models"][0]["tokens"], 4 * 63);
}

#[test]
fn a_file_that_is_not_a_model_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("text.txt");
    std::fs::write(&data, "Short text for a quick check of the vocabulary. ".repeat(10)).unwrap();
    let tiny = model_path("llama-optimum-past");
    let out =
        nbl(&["eval", tiny.to_str().unwrap(), data.to_str().unwrap(), "--data", data.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("text.txt"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
