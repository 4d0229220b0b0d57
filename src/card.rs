//! The model card: the `README.md` a Hub user reads beside a rewritten model. Hugging Face model-card
//! front matter (`base_model` where `config.json` names the model it came from, `library_name: onnx`,
//! `tags`), then what was replaced and why, the calibration, the bytes before and after, and the
//! quality and speed measured by `check`, `eval` and `bench` where their reports are given, each with
//! the command line that reproduces it.
//!
//! Everything is read from the reports' JSON, so that `nbl-onnx card` can write the card again later,
//! once the rewrite has been checked and timed.

use std::fmt::Write;
use std::path::Path;

use serde_json::Value;

/// The reports a card is written from: the rewrite's, and those of the commands run on it since.
pub struct CardSources<'a> {
    pub rewrite: &'a Value,
    pub check: Option<&'a Value>,
    pub eval: Option<&'a Value>,
    pub bench: Option<&'a Value>,
    /// `config.json` of the rewritten model, for `base_model`.
    pub config: Option<&'a Value>,
}

/// Marks a card this tool wrote (and may write again); a README.md without it is the user's.
pub const MARK: &str = "<!-- written by nbl-onnx -->";

/// Whether the README.md at `path` may be written: absent, or written by this tool.
pub fn may_write(path: &Path) -> bool {
    std::fs::read_to_string(path).map_or(true, |text| text.contains(MARK))
}

fn name(path: &Value) -> String {
    path.as_str()
        .map(|p| Path::new(p).file_name().and_then(|n| n.to_str()).unwrap_or(p).to_string())
        .unwrap_or_else(|| "model.onnx".into())
}

fn megabytes(bytes: &Value) -> String {
    bytes.as_f64().map_or_else(|| "?".into(), |b| format!("{:.1} MB", b / 1e6))
}

/// A unit as the CLI names it (`attention 3`, `run 4-6`), from its JSON.
fn unit_text(unit: &Value) -> String {
    serde_json::from_value::<crate::unit::Unit>(unit.clone())
        .map_or_else(|_| unit.to_string(), |u| u.to_string())
}

/// The card's Markdown.
pub fn render(s: &CardSources) -> String {
    let r = s.rewrite;
    let summary = &r["rewrite"];
    let mut out = String::from("---\n");
    if let Some(base) = s.config.and_then(|c| c["_name_or_path"].as_str()).filter(|b| !b.is_empty()) {
        let _ = writeln!(out, "base_model: {base}");
    }
    out.push_str("library_name: onnx\ntags:\n- onnx\n- nbl\n- neural-block-linearization\n---\n\n");
    out.push_str(MARK);
    out.push('\n');
    let original = name(&r["model"]);
    let _ = writeln!(out, "\n# {} (linearised with nbl-onnx)\n", name(&r["output"]));
    let units: Vec<String> = summary["units"].as_array().into_iter().flatten().map(unit_text).collect();
    let layers = r["layers"].as_array().map_or(0, Vec::len);
    let how = match summary["replace"].as_str() {
        Some("drop") => "removed (its term set to zero)",
        _ => "replaced by one affine map (`MatMul` + `Add`, fitted by least squares)",
    };
    let _ = writeln!(
        out,
        "This is `{original}` with {} of its {layers} decoder layers' blocks {how}: Neural Block \
         Linearization ([arXiv 2505.21077](https://arxiv.org/abs/2505.21077)), written by nbl-onnx {}. \
         It runs on any ONNX runtime as the original does; the replaced attention blocks need no KV cache.\n",
        units.len(),
        env!("CARGO_PKG_VERSION")
    );

    out.push_str("## What was replaced\n\n");
    let _ = writeln!(out, "- Units: {}.", if units.is_empty() { "none".into() } else { units.join(", ") });
    match &r["budget"] {
        Value::Object(b) => {
            let _ = writeln!(
                out,
                "- Chosen by measurement within a quality budget ({}): held-out KL {:.4} on {} sequences, \
                 predicted {:.3}x decode and {:.3}x prefill.",
                b.get("limit").map(Value::to_string).unwrap_or_default().trim_matches('"'),
                b.get("heldout_kl").and_then(Value::as_f64).unwrap_or(f64::NAN),
                b.get("heldout_sequences").and_then(Value::as_u64).unwrap_or(0),
                b.get("predicted_decode_speedup").and_then(Value::as_f64).unwrap_or(f64::NAN),
                b.get("predicted_prefill_speedup").and_then(Value::as_f64).unwrap_or(f64::NAN),
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "- Criterion: `{}` (the CCA bound ranks layers by how linear their block is; lower is more linear).",
                r["criterion"].as_str().unwrap_or("?")
            );
        }
    }
    let _ = writeln!(
        out,
        "- Fitting: {}, ridge λ = {}; maps stored as {}.",
        r["fitting"].as_str().unwrap_or("?"),
        r["lambda"],
        match &summary["weight_format"] {
            Value::String(s) => s.clone(),
            other => other.to_string().replace(['{', '}', '"'], "").replace(':', " "),
        }
    );
    let chosen: Vec<&Value> =
        r["layers"].as_array().into_iter().flatten().filter(|l| l["linearized"] == true).collect();
    if !chosen.is_empty() {
        out.push_str(
            "\n| layer | bound / d | cosine(x, x + y) | residual the map misses |\n|---|---|---|---|\n",
        );
        for l in chosen {
            let _ = writeln!(
                out,
                "| {} | {:.4} | {:.3} | {:.1}% |",
                l["layer"],
                l["bound_normalized"].as_f64().unwrap_or(f64::NAN),
                l["cosine"].as_f64().unwrap_or(f64::NAN),
                100.0 * l["fit_residual"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }

    out.push_str("\n## Calibration\n\n");
    let _ = writeln!(out, "- {} tokens.", r["tokens"]);
    for d in r["calibration"].as_array().into_iter().flatten() {
        let files: Vec<&str> =
            d["files"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        let _ = writeln!(
            out,
            "- {} sequences of {} tokens from {}, on {}.",
            d["blocks"],
            d["seq_len"],
            if files.is_empty() { "the built-in C4 sample".to_string() } else { files.join(", ") },
            d["engine"].as_str().unwrap_or("?")
        );
    }

    out.push_str("\n## Size\n\n| | original | this model |\n|---|---|---|\n");
    let _ = writeln!(
        out,
        "| weights | {} | {} |",
        megabytes(&summary["weights_before"]["bytes"]),
        megabytes(&summary["weights_after"]["bytes"])
    );
    let _ = writeln!(
        out,
        "| KV cache per token | {} bytes | {} bytes |",
        summary["kv_bytes_per_token_before"], summary["kv_bytes_per_token_after"]
    );
    let _ = writeln!(out, "| nodes | {} | {} |", summary["nodes_before"], summary["nodes_after"]);

    out.push_str("\n## Quality and speed\n\n");
    let mut measured = false;
    if let Some(check) = s.check {
        measured = true;
        let a = &check["reference"];
        let verdict =
            if check["problems"].as_array().is_some_and(Vec::is_empty) { "passed" } else { "failed" };
        let _ = write!(
            out,
            "- `check` {verdict}: mean KL(original ‖ this) {:.4}, top-1 agreement {:.3} over {} positions",
            a["mean_kl"].as_f64().unwrap_or(f64::NAN),
            a["top1_agreement"].as_f64().unwrap_or(f64::NAN),
            a["positions"]
        );
        if let Some(g) = a.get("generation").filter(|g| g.is_object()) {
            let _ = write!(
                out,
                "; greedy continuations share {:.2} of {} tokens",
                g["mean_common_tokens"].as_f64().unwrap_or(f64::NAN),
                g["tokens"]
            );
        }
        out.push_str(".\n");
    }
    if let Some(eval) = s.eval {
        measured = true;
        for m in eval["models"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "- `eval`, {}: perplexity {:.3} on {} sequences of {} tokens.",
                name(&m["path"]),
                m["ppl"].as_f64().unwrap_or(f64::NAN),
                eval["sequences"],
                eval["seq_len"]
            );
        }
    }
    if let Some(bench) = s.bench {
        measured = true;
        for m in bench["models"].as_array().into_iter().flatten().skip(1) {
            let _ = writeln!(
                out,
                "- `bench` on {} ({} prompt tokens, {} generated): {:.3}x prefill, {:.3}x decode against the original.",
                bench["ep"].as_str().unwrap_or("?"),
                bench["prompt_len"],
                bench["gen"],
                m["prefill_speedup"].as_f64().unwrap_or(f64::NAN),
                m["decode_speedup"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    if !measured {
        out.push_str(
            "Not measured yet. `nbl-onnx check`, `eval` and `bench` measure it; `nbl-onnx card` adds their \
             reports here.\n",
        );
    }

    let commands: Vec<&str> = [Some(r), s.check, s.eval, s.bench]
        .into_iter()
        .flatten()
        .filter_map(|v| v["command"].as_str())
        .collect();
    if !commands.is_empty() {
        out.push_str("\n## Reproduce\n\n```\n");
        for c in commands {
            let _ = writeln!(out, "{c}");
        }
        out.push_str("```\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_card_says_what_was_done_and_what_it_cost() {
        let rewrite = json!({
            "model": "repo/onnx/model_q4.onnx", "output": "new/onnx/model_q4.onnx", "criterion": "cca",
            "fitting": "one-shot", "lambda": 1e-6, "tokens": 65536,
            "command": "nbl-onnx rewrite repo/onnx/model_q4.onnx -o new/",
            "calibration": [{"files": [], "seq_len": 512, "blocks": 128, "shard": [0, 1], "engine": "onnxruntime"}],
            "layers": [{"layer": 0, "linearized": false}, {"layer": 1, "linearized": true,
                        "bound_normalized": 0.25, "cosine": 0.97, "fit_residual": 0.125}],
            "rewrite": {"units": [{"kind": "attention", "layer": 1}], "replace": "linear",
                        "weight_format": {"Float": "f32"}, "nodes_before": 10, "nodes_after": 8,
                        "weights_before": {"bytes": 3_000_000}, "weights_after": {"bytes": 2_500_000},
                        "kv_bytes_per_token_before": 1024, "kv_bytes_per_token_after": 512}
        });
        let config = json!({"_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"});
        let check = json!({"problems": [], "command": "nbl-onnx check new/onnx/model_q4.onnx --reference x",
                           "reference": {"mean_kl": 0.05, "top1_agreement": 0.9, "positions": 256,
                                         "generation": {"mean_common_tokens": 12.5, "tokens": 16}}});
        let card = render(&CardSources {
            rewrite: &rewrite,
            check: Some(&check),
            eval: None,
            bench: None,
            config: Some(&config),
        });
        assert!(
            card.starts_with(
                "---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlibrary_name: onnx\ntags:\n- onnx\n- nbl\n"
            ),
            "{card}"
        );
        assert!(
            card.contains("This is `model_q4.onnx` with 1 of its 2 decoder layers' blocks replaced"),
            "{card}"
        );
        assert!(card.contains("- Units: attention 1."), "{card}");
        assert!(card.contains("| 1 | 0.2500 | 0.970 | 12.5% |"), "{card}");
        assert!(card.contains("- 128 sequences of 512 tokens from the built-in C4 sample"), "{card}");
        assert!(card.contains("| weights | 3.0 MB | 2.5 MB |"), "{card}");
        assert!(card.contains("| KV cache per token | 1024 bytes | 512 bytes |"), "{card}");
        assert!(
            card.contains("`check` passed: mean KL(original ‖ this) 0.0500, top-1 agreement 0.900"),
            "{card}"
        );
        assert!(card.contains("share 12.50 of 16 tokens"), "{card}");
        assert!(
            card.contains("```\nnbl-onnx rewrite repo/onnx/model_q4.onnx -o new/\nnbl-onnx check "),
            "{card}"
        );
        // Without measurements it says so, and how to add them.
        let bare =
            render(&CardSources { rewrite: &rewrite, check: None, eval: None, bench: None, config: None });
        assert!(
            bare.starts_with("---\nlibrary_name: onnx\n") && bare.contains("Not measured yet."),
            "{bare}"
        );
    }
}
