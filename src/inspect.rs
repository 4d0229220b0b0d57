//! `nbl-onnx inspect`: what the tool sees in a model, as a table for people and JSON for scripts.

use std::fmt::Write;

use anyhow::Result;
use serde::Serialize;

use crate::blocks::{Blocks, find_blocks};
use crate::onnx::Model;

/// A model's attention blocks with enough context to recognise the model.
#[derive(Serialize)]
pub struct Inspection {
    pub model: String,
    pub producer: String,
    pub opset: i64,
    pub graph_nodes: usize,
    pub external_data: Vec<String>,
    #[serde(flatten)]
    pub blocks: Blocks,
    pub warnings: Vec<String>,
}

pub fn inspect(model: &Model) -> Result<Inspection> {
    let blocks = find_blocks(model)?;
    Ok(Inspection {
        model: model.path.display().to_string(),
        producer: format!("{} {}", model.proto.producer_name(), model.proto.producer_version())
            .trim()
            .to_string(),
        opset: model.opset("").unwrap_or(0),
        graph_nodes: model.graph().node.len(),
        external_data: model.external_files(),
        warnings: blocks.warnings.clone(),
        blocks,
    })
}

impl Inspection {
    /// The readable report: one line per attention block, then the non-attention branches' verdicts.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let b = &self.blocks;
        let _ = writeln!(
            out,
            "{}: {} attention blocks, hidden size {}, {} ({} nodes, opset {}, {})",
            self.model,
            b.layers.len(),
            b.hidden_size,
            b.dtype,
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
        let others = b.branches.iter().filter(|br| !br.verdict.starts_with("attention")).count();
        let _ = writeln!(out, "{others} other residual branches (MLP)");
        for w in &self.warnings {
            let _ = writeln!(out, "warning: {w}");
        }
        out
    }
}
