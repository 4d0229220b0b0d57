//! `nbl-onnx check`: is a (rewritten) model well formed, does it run on both engines, does a short
//! greedy decode with its KV cache work, and how far are its next-token distributions from a
//! reference model's. Made to gate CI: failures are listed, and any failure is exit code 1.

use std::collections::HashSet;

use anyhow::{Result, anyhow};
use ndarray::{Array2, ArrayD, Axis};
use serde::Serialize;

use crate::engine::{Engine, decode_inputs, prefill_inputs, present_as_past};
use crate::onnx::model::{external_location, tensor_shape};
use crate::onnx::{DType, GraphIndex, Model, Tensor};

/// What `check` found: problems (any makes it fail) and measurements.
#[derive(Debug, Default, Serialize)]
pub struct CheckReport {
    pub model: String,
    pub problems: Vec<String>,
    pub runs: Vec<EngineRun>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<Agreement>,
}

#[derive(Debug, Serialize)]
pub struct EngineRun {
    pub engine: String,
    /// `ok`, `failed: ...` or `unsupported: ...` (tract lacks some operators; not a failure).
    pub status: String,
    /// Tokens decoded greedily after the prompt, when the model has a KV cache.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub decoded: Vec<i64>,
}

/// Next-token agreement with a reference model on the same prompt.
#[derive(Debug, Serialize)]
pub struct Agreement {
    pub reference: String,
    pub positions: usize,
    pub max_abs_logit_diff: f64,
    /// Mean over positions of KL(reference ‖ model) of the next-token distributions.
    pub mean_kl: f64,
    pub top1_agreement: f64,
}

impl CheckReport {
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Structural validation: every node input provided and produced before use (the stored order is
/// topological), opsets imported for every domain used, initializers consistent with their dims and
/// used, graph inputs used, graph outputs produced.
pub fn structure(model: &Model) -> Vec<String> {
    let graph = model.graph();
    let mut problems = Vec::new();
    let index = match GraphIndex::new(graph) {
        Ok(index) => index,
        Err(e) => return vec![format!("{e:#}")],
    };
    let mut available: HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
    available.extend(graph.input.iter().map(|v| v.name()));
    for node in &graph.node {
        for input in node.input.iter().filter(|i| !i.is_empty()) {
            if !available.contains(input.as_str()) {
                let produced = index.id(input).and_then(|id| index.producer(id)).is_some();
                problems.push(if produced {
                    format!(
                        "node {:?} ({}) reads {input:?} before it is produced",
                        node.name(),
                        node.op_type()
                    )
                } else {
                    format!(
                        "node {:?} ({}) reads {input:?}, which nothing provides",
                        node.name(),
                        node.op_type()
                    )
                });
            }
        }
        available.extend(node.output.iter().filter(|o| !o.is_empty()).map(String::as_str));
        let domain = node.domain();
        let imported = model
            .proto
            .opset_import
            .iter()
            .any(|o| o.domain() == domain || (domain.is_empty() && o.domain() == "ai.onnx"));
        if !imported {
            problems.push(format!(
                "node {:?} ({}) uses domain {domain:?}, which is not imported",
                node.name(),
                node.op_type()
            ));
        }
    }
    for t in &graph.initializer {
        if !index.id(t.name()).is_some_and(|id| index.is_read(id)) {
            problems.push(format!("initializer {:?} is not used", t.name()));
        }
        let Ok(shape) = tensor_shape(t) else {
            problems.push(format!("initializer {:?} has a negative dimension", t.name()));
            continue;
        };
        let expected = DType::from_onnx(t.data_type()).size().map(|s| s * shape.iter().product::<usize>());
        let stored = match external_location(t) {
            Ok(Some(loc)) => loc.length.map(|l| l as usize),
            Ok(None) => t.raw_data.as_ref().map(|r| r.len()),
            Err(e) => {
                problems.push(format!("{e:#}"));
                continue;
            }
        };
        if let (Some(expected), Some(stored)) = (expected, stored)
            && expected != stored
        {
            problems.push(format!(
                "initializer {:?} holds {stored} bytes; its dims and type need {expected}",
                t.name()
            ));
        }
    }
    for v in &graph.input {
        if !index.id(v.name()).is_some_and(|id| index.is_read(id)) {
            problems.push(format!("graph input {:?} is not used", v.name()));
        }
    }
    for v in &graph.output {
        let known = index.id(v.name()).is_some_and(|id| {
            index.producer(id).is_some() || index.is_graph_input(id) || index.is_initializer(id)
        });
        if !known {
            problems.push(format!("graph output {:?} is not produced", v.name()));
        }
    }
    problems
}

/// A fixed prompt of `len` ids below `vocab` (a deterministic mix, not a repeated token).
pub fn sample_prompt(len: usize, vocab: usize) -> Array2<i64> {
    let vocab = vocab.max(2) as u64;
    Array2::from_shape_fn((1, len), |(_, t)| ((t as u64 * 7919 + 13) % vocab) as i64)
}

/// The logits output of a run, as f32 `[batch, seq, vocab]`.
fn logits(session_outputs: &[String], outputs: &[Tensor]) -> Result<ArrayD<f32>> {
    let i = session_outputs
        .iter()
        .position(|n| n == "logits")
        .ok_or_else(|| anyhow!("the model has no \"logits\" output"))?;
    outputs[i].to_f32()
}

/// Runs the prompt and then `steps` greedy decode steps feeding the KV cache back (`present.*` as
/// `past_key_values.*`). Returns the prompt's logits and the decoded ids.
pub fn run_and_decode(
    model: &Model,
    engine: &dyn Engine,
    prompt: &Array2<i64>,
    steps: usize,
) -> Result<(ArrayD<f32>, Vec<i64>)> {
    let mut session = engine.load(model, &[])?;
    let names = session.output_names().to_vec();
    let inputs = prefill_inputs(model, prompt)?;
    let has_cache = inputs.iter().any(|(n, _)| n.starts_with("past_key_values"));
    let outputs = session.run(&inputs)?;
    let prompt_logits = logits(&names, &outputs)?;
    ensure_finite(&prompt_logits, "prompt logits")?;
    let mut decoded = Vec::new();
    if !has_cache {
        return Ok((prompt_logits, decoded));
    }
    let mut past: Vec<(String, Tensor)> = present_as_past(&names, outputs);
    // Some exports return only the last position's logits.
    let mut last = prompt_logits.index_axis(Axis(1), prompt_logits.shape()[1] - 1).to_owned();
    for (step, length) in (prompt.ncols()..prompt.ncols() + steps).enumerate() {
        let next = argmax(last.index_axis(Axis(0), 0).iter().copied()) as i64;
        decoded.push(next);
        let inputs = decode_inputs(model, next, past, length)?;
        let outputs = session.run(&inputs).map_err(|e| anyhow!("decode step {}: {e:#}", step + 1))?;
        let step_logits = logits(&names, &outputs)?;
        ensure_finite(&step_logits, &format!("decode step {} logits", step + 1))?;
        last = step_logits.index_axis(Axis(1), 0).to_owned();
        past = present_as_past(&names, outputs);
    }
    Ok((prompt_logits, decoded))
}

fn ensure_finite(a: &ArrayD<f32>, what: &str) -> Result<()> {
    anyhow::ensure!(a.iter().all(|v| v.is_finite()), "{what} hold NaN or Inf");
    Ok(())
}

/// The position of the largest value (the first on ties; 0 when empty).
pub fn argmax<T: PartialOrd + Copy>(values: impl IntoIterator<Item = T>) -> usize {
    let mut best: Option<(usize, T)> = None;
    for (i, v) in values.into_iter().enumerate() {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map_or(0, |(i, _)| i)
}

/// Compares next-token distributions at every prompt position.
pub fn agreement(reference_name: &str, reference: &ArrayD<f32>, model: &ArrayD<f32>) -> Result<Agreement> {
    anyhow::ensure!(
        reference.shape() == model.shape(),
        "logits shapes differ: {:?} vs {:?}",
        reference.shape(),
        model.shape()
    );
    let vocab =
        reference.shape().last().copied().filter(|&v| v > 0).ok_or_else(|| anyhow!("empty logits"))?;
    let (r, m) = (reference.as_standard_layout(), model.as_standard_layout());
    let (r, m) = (r.as_slice().expect("standard layout"), m.as_slice().expect("standard layout"));
    let mut max_diff: f64 = 0.0;
    let (mut kl_sum, mut agree) = (0.0, 0usize);
    let positions = r.len() / vocab;
    for (p, q) in r.chunks(vocab).zip(m.chunks(vocab)) {
        for (a, b) in p.iter().zip(q) {
            max_diff = max_diff.max(f64::from((a - b).abs()));
        }
        let (lp, lq) = (log_softmax(p), log_softmax(q));
        kl_sum += lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum::<f64>();
        agree += usize::from(argmax(p.iter().copied()) == argmax(q.iter().copied()));
    }
    Ok(Agreement {
        reference: reference_name.to_string(),
        positions,
        max_abs_logit_diff: max_diff,
        mean_kl: kl_sum / positions as f64,
        top1_agreement: agree as f64 / positions as f64,
    })
}

/// `log softmax` of logits, in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&v| (f64::from(v) - max).exp()).sum();
    let log_sum = sum.ln() + max;
    logits.iter().map(|&v| f64::from(v) - log_sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_logits_agree_fully_and_kl_matches_a_hand_computation() {
        let a = ArrayD::from_shape_vec(vec![1, 2, 3], vec![1.0, 2.0, 3.0, 0.0, 0.0, 0.0]).unwrap();
        let same = agreement("ref", &a, &a).unwrap();
        assert_eq!((same.mean_kl, same.top1_agreement, same.max_abs_logit_diff), (0.0, 1.0, 0.0));
        let b = ArrayD::from_shape_vec(vec![1, 2, 3], vec![3.0, 2.0, 1.0, 0.0, 0.0, 0.0]).unwrap();
        let diff = agreement("ref", &a, &b).unwrap();
        // KL(p‖q) for p = softmax(1,2,3), q = softmax(3,2,1): Σ p (log p − log q) = 2·(p3 − p1).
        let z: f64 = [1f64, 2.0, 3.0].iter().map(|v| v.exp()).sum();
        let expected = 2.0 * (3f64.exp() - 1f64.exp()) / z / 2.0; // second position contributes 0
        assert!((diff.mean_kl - expected).abs() < 1e-12, "{} vs {expected}", diff.mean_kl);
        assert_eq!(diff.top1_agreement, 0.5);
        assert_eq!(diff.max_abs_logit_diff, 2.0);
    }
}
