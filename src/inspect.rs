//! `nbl-onnx inspect`: what the tool sees in a model, as a table for people and JSON for scripts.

use std::fmt::Write;

use anyhow::{Result, ensure};
use ndarray::Array2;
use serde::Serialize;

use crate::detect::{DecoderLayout, Verdict};
use crate::engine::{Engine, select};
use crate::onnx::{Interface, Model};

/// A model's attention blocks with enough context to recognise the model.
#[derive(Serialize)]
pub struct Inspection {
    pub model: String,
    pub producer: String,
    pub opset: i64,
    pub graph_nodes: usize,
    pub external_data: Vec<String>,
    /// What statistics files are matched to the model by (its structure, not its weights).
    pub fingerprint: String,
    #[serde(flatten)]
    pub layout: DecoderLayout,
    /// Present when the layers were also computed on an engine (`inspect --run`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<TrialRun>,
}

/// One forward pass with every X and Y exposed: proof that the named tensors exist and are sane.
#[derive(Serialize)]
pub struct TrialRun {
    pub engine: String,
    pub tokens: [usize; 2],
    /// Per layer, the shapes of X and Y.
    pub shapes: Vec<[Vec<usize>; 2]>,
}

/// Runs `model` once on `engine` over a short token sequence and checks every X and Y: shape
/// `[batch, sequence, hidden]` (or `[batch·sequence, hidden]`, where the stream is flattened as OPT
/// flattens it for its MLP half), finite values.
pub fn trial_run(model: &Model, layout: &DecoderLayout, engine: &dyn Engine) -> Result<TrialRun> {
    const BATCH: usize = 1;
    const SEQUENCE: usize = 8;
    let ids = Array2::from_shape_fn((BATCH, SEQUENCE), |(_, s)| 1 + s as i64);
    let inputs = Interface::of(model, Some(layout.hidden_size))?.prefill(&ids)?;
    let extra = layout.xy_tensors();
    let mut session = engine.load(model, &extra)?;
    let outputs = session.run(&inputs)?;
    let captured = select(session.as_ref(), &outputs, &extra)?;
    let mut shapes = Vec::new();
    for (layer, pair) in layout.layers.iter().zip(captured.chunks(2)) {
        for (name, t) in [(&layer.x, pair[0]), (&layer.y, pair[1])] {
            let expected = [BATCH, SEQUENCE, layout.hidden_size];
            let flattened = [BATCH * SEQUENCE, layout.hidden_size];
            ensure!(
                t.shape() == expected || t.shape() == flattened,
                "layer {}: {name:?} has shape {:?}, expected {expected:?} (or {flattened:?})",
                layer.layer,
                t.shape()
            );
            ensure!(
                t.to_f32()?.iter().all(|v| v.is_finite()),
                "layer {}: {name:?} has non-finite values",
                layer.layer
            );
        }
        shapes.push([pair[0].shape().to_vec(), pair[1].shape().to_vec()]);
    }
    Ok(TrialRun { engine: engine.describe(), tokens: [BATCH, SEQUENCE], shapes })
}

/// What `inspect` reports of `model`, whose layers are `layout`.
pub fn inspect(model: &Model, layout: DecoderLayout) -> Inspection {
    Inspection {
        model: model.path.display().to_string(),
        producer: format!("{} {}", model.proto.producer_name(), model.proto.producer_version())
            .trim()
            .to_string(),
        opset: model.opset("").unwrap_or(0),
        graph_nodes: model.graph().node.len(),
        external_data: model.external_files(),
        fingerprint: crate::calibrate::fingerprint(model, &layout),
        layout,
        run: None,
    }
}

impl Inspection {
    /// The readable report: one line per attention block, then the non-attention branches' verdicts.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let b = &self.layout;
        let _ = writeln!(
            out,
            "{}: {} attention layers, hidden size {}, {} ({} nodes, opset {}, {})",
            self.model,
            b.layers.len(),
            b.hidden_size,
            b.dtype.map_or("unknown element type".to_string(), |d| d.to_string()),
            self.graph_nodes,
            self.opset,
            if self.producer.is_empty() { "unknown producer" } else { &self.producer }
        );
        if !self.external_data.is_empty() {
            let _ = writeln!(out, "external data: {}", self.external_data.join(", "));
        }
        let xw = b.layers.iter().map(|l| l.x.len()).max().unwrap_or(1).max(1);
        let yw = b.layers.iter().map(|l| l.y.len()).max().unwrap_or(1).max(1);
        let _ = writeln!(
            out,
            "{:>5}  {:<19}  {:>5}  {:<xw$}  {:<yw$}  kv cache",
            "layer", "kind", "nodes", "X", "Y"
        );
        for l in &b.layers {
            let kv = if l.kv_inputs.is_empty() && l.kv_outputs.is_empty() {
                "-".to_string()
            } else {
                format!("{} in, {} out", l.kv_inputs.len(), l.kv_outputs.len())
            };
            let _ = writeln!(
                out,
                "{:>5}  {:<19}  {:>5}  {:<xw$}  {:<yw$}  {kv}",
                l.layer, l.kind, l.nodes, l.x, l.y
            );
        }
        let others =
            b.branches.iter().filter(|br| matches!(br.verdict, Verdict::NotAttention { .. })).count();
        let _ = writeln!(out, "{others} other residual branches (MLP)");
        let parallel = b.layers.iter().filter(|l| l.parallel).count();
        if parallel > 0 {
            let _ = writeln!(
                out,
                "{parallel} parallel blocks: attention and MLP read the same stream; Y is the attention term alone"
            );
        }
        if let Some(run) = &self.run {
            let _ = writeln!(
                out,
                "ran {}x{} tokens on {}: every X and Y is [batch, sequence, {}] and finite",
                run.tokens[0], run.tokens[1], run.engine, b.hidden_size
            );
        }
        for w in &b.warnings {
            let _ = writeln!(out, "warning: {w}");
        }
        out
    }
}
