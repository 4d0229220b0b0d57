//! The graph surgery: each chosen attention block's output is replaced by `Y = X Wᵀ + b` (NBL) or
//! by nothing (attention dropping), the KV cache of those layers leaves the model's interface, and
//! whatever no output needs any more is eliminated by reference count.
//!
//! All edits of one rewrite are collected in a [`Patch`] first and applied at once.

use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result, bail, ensure};
use clap::ValueEnum;
use faer::Mat;
use ndarray::{Array1, Array2};
use serde::Serialize;

use crate::blocks::{AttentionBlock, Blocks};
use crate::engine::prefill_inputs;
use crate::onnx::graph::eliminate_dead;
use crate::onnx::proto::{GraphProto, NodeProto, StringStringEntryProto, TensorProto};
use crate::onnx::{DType, GraphIndex, Model, Tensor, build};

/// What replaces a chosen attention block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Replacement {
    /// `Y = X Wᵀ + b`, the LMMSE map (NBL)
    Linear,
    /// `Y = 0`: the residual passes through (the attention-dropping baseline)
    Drop,
}

/// What happens to the KV cache of replaced layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KvCache {
    /// Remove the layers' past/present tensors from the model's inputs and outputs
    Drop,
    /// Keep the model's interface unchanged (the cache of those layers is still computed)
    Keep,
}

/// One layer to replace, with its linear map when the replacement is linear.
pub struct LayerEdit<'a> {
    pub block: &'a AttentionBlock,
    /// `W` (`d×d`) and `b`: `y = W x + b`.
    pub map: Option<(&'a Mat<f64>, &'a [f64])>,
}

/// What the rewrite changed, for the report.
#[derive(Clone, Debug, Serialize)]
pub struct RewriteSummary {
    pub layers: Vec<usize>,
    pub replace: Replacement,
    pub kv: KvCache,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub params_removed: u64,
    pub params_added: u64,
    /// `None` when the model has inputs whose shapes cannot be told (the rewrite still proceeds).
    pub kv_bytes_per_token_before: Option<u64>,
    pub kv_bytes_per_token_after: Option<u64>,
    pub removed_inputs: Vec<String>,
    pub removed_outputs: Vec<String>,
}

/// Every edit of one rewrite, built before anything changes.
#[derive(Default)]
struct Patch {
    new_nodes: Vec<(usize, NodeProto)>,
    new_initializers: Vec<TensorProto>,
    /// (node, input slot, tensor it reads from now on).
    rewire: Vec<(usize, usize, String)>,
    /// Every read of a tensor is redirected to another.
    redirect: HashMap<String, String>,
    /// Nodes replaced by another node.
    replace: Vec<(usize, NodeProto)>,
    remove_inputs: HashSet<String>,
    remove_outputs: HashSet<String>,
}

impl Patch {
    fn apply(self, graph: &mut GraphProto) {
        for (node, slot, name) in self.rewire {
            graph.node[node].input[slot] = name;
        }
        for (node, replacement) in self.replace {
            graph.node[node] = replacement;
        }
        if !self.redirect.is_empty() {
            for node in &mut graph.node {
                for input in &mut node.input {
                    if let Some(to) = self.redirect.get(input) {
                        *input = to.clone();
                    }
                }
            }
        }
        // Insert from the back so that earlier positions stay valid.
        let mut inserts = self.new_nodes;
        inserts.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
        for (at, node) in inserts {
            graph.node.insert(at, node);
        }
        graph.initializer.extend(self.new_initializers);
        graph.input.retain(|v| !self.remove_inputs.contains(v.name()));
        graph.output.retain(|v| !self.remove_outputs.contains(v.name()));
    }
}

/// Rewrites `model` in memory: the chosen layers' attention replaced, dead nodes and initializers
/// removed. Provenance goes into `metadata_props` under `provenance`.
pub fn rewrite(
    model: &mut Model,
    blocks: &Blocks,
    edits: &[LayerEdit<'_>],
    replace: Replacement,
    kv: KvCache,
    provenance: &[(&str, String)],
) -> Result<RewriteSummary> {
    let dtype = match blocks.dtype.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("cannot write the linear maps in the stream's element type {other}"),
    };
    let kv_before = kv_bytes_per_token(model).ok();
    let params_before = initializer_params(model.graph(), |_| true);
    let nodes_before = model.graph().node.len();
    let graph = model.graph_mut();
    let index = GraphIndex::new(graph)?;
    let mut patch = Patch::default();
    let chosen: HashSet<usize> = edits.iter().map(|e| e.block.layer).collect();

    for edit in edits {
        let block = edit.block;
        let junction = find_node(graph, &block.junction)?;
        let slot = graph.node[junction].input.iter().position(|i| *i == block.y).with_context(|| {
            format!("layer {}: {:?} does not read {:?}", block.layer, block.junction, block.y)
        })?;
        match (replace, edit.map) {
            (Replacement::Linear, Some((w, b))) => {
                let n = block.layer;
                let (weight, bias) = (format!("nbl.layers.{n}.weight"), format!("nbl.layers.{n}.bias"));
                let (product, y) = (format!("nbl.layers.{n}.matmul"), format!("nbl.layers.{n}.y"));
                let d = w.nrows();
                // MatMul(X, Wᵀ): the initializer holds Wᵀ, row-major [d_in, d_out].
                let w_t = Array2::from_shape_fn((d, d), |(i, j)| w[(j, i)] as f32).into_dyn();
                let b = Array1::from_iter(b.iter().map(|&v| v as f32)).into_dyn();
                patch.new_initializers.push(initializer(&weight, Tensor::from_f32(dtype, w_t)?));
                patch.new_initializers.push(initializer(&bias, Tensor::from_f32(dtype, b)?));
                patch.new_nodes.push((junction, build::node("MatMul", &[&block.x, &weight], &product)));
                patch.new_nodes.push((junction, build::node("Add", &[&product, &bias], &y)));
                patch.rewire.push((junction, slot, y));
            }
            (Replacement::Linear, None) => bail!("layer {}: no linear map to write", block.layer),
            (Replacement::Drop, _) => drop_branch(graph, &index, junction, slot, block, &mut patch)?,
        }
    }

    let mut removed_inputs = Vec::new();
    let mut removed_outputs = Vec::new();
    if kv == KvCache::Drop {
        let kept: Vec<&AttentionBlock> =
            blocks.layers.iter().filter(|l| !chosen.contains(&l.layer) && !l.kv_inputs.is_empty()).collect();
        for edit in edits {
            for (i, name) in edit.block.kv_inputs.iter().enumerate() {
                patch.remove_inputs.insert(name.clone());
                removed_inputs.push(name.clone());
                // Readers outside the block (the past length read off layer 0's cache) read the
                // same tensor of a kept layer; with no layer kept, nothing may still need it.
                if let Some(other) = kept.first().and_then(|k| k.kv_inputs.get(i)) {
                    patch.redirect.insert(name.clone(), other.clone());
                }
            }
            for name in &edit.block.kv_outputs {
                patch.remove_outputs.insert(name.clone());
                removed_outputs.push(name.clone());
            }
        }
    }
    patch.apply(graph);
    eliminate_dead(graph)?;
    sort_topologically(graph)?;
    let index = GraphIndex::new(graph)?;
    for name in &removed_inputs {
        if let Some(id) = index.id(name) {
            ensure!(
                index.consumers(id).is_empty(),
                "graph input {name:?} is still read after removing its layer's cache"
            );
        }
    }

    let nodes_after = graph.node.len();
    let new_names: HashSet<String> = edits
        .iter()
        .flat_map(|e| {
            [format!("nbl.layers.{}.weight", e.block.layer), format!("nbl.layers.{}.bias", e.block.layer)]
        })
        .collect();
    let params_added = initializer_params(graph, |t| new_names.contains(t.name()));
    let params_kept = initializer_params(graph, |t| !new_names.contains(t.name()));
    for (key, value) in provenance {
        set_metadata(&mut model.proto.metadata_props, key, value);
    }
    let kv_after = kv_bytes_per_token(model).ok();
    let mut layers: Vec<usize> = chosen.into_iter().collect();
    layers.sort_unstable();
    Ok(RewriteSummary {
        layers,
        replace,
        kv,
        nodes_before,
        nodes_after,
        params_removed: params_before - params_kept,
        params_added,
        kv_bytes_per_token_before: kv_before,
        kv_bytes_per_token_after: kv_after,
        removed_inputs,
        removed_outputs,
    })
}

/// `Y := 0`. An `Add` junction becomes the stream itself (its readers read `X`); a
/// `SkipSimplifiedLayerNormalization` becomes a plain `SimplifiedLayerNormalization` of `X`, its sum
/// output read as `X`.
fn drop_branch(
    graph: &GraphProto,
    index: &GraphIndex,
    junction: usize,
    slot: usize,
    block: &AttentionBlock,
    patch: &mut Patch,
) -> Result<()> {
    let node = &graph.node[junction];
    let stream = node.input[1 - slot].clone();
    match node.op_type() {
        "Add" => {
            patch.redirect.insert(node.output[0].clone(), stream);
        }
        "SkipSimplifiedLayerNormalization" => {
            let mut norm = node.clone();
            norm.op_type = Some("SimplifiedLayerNormalization".into());
            // ONNX Runtime registers SimplifiedLayerNormalization in the default domain.
            norm.domain = Some(String::new());
            norm.input = vec![stream.clone(), node.input[2].clone()];
            // Output 0 is the normalised sum; outputs 1 and 2 (statistics) are optional.
            let sum = node.output.get(3).cloned().unwrap_or_default();
            norm.output.truncate(1);
            for (i, out) in node.output.iter().enumerate().skip(1).take(2) {
                let used = index.id(out).is_some_and(|id| !index.consumers(id).is_empty());
                ensure!(
                    !used || out.is_empty(),
                    "layer {}: output {i} of {:?} is read",
                    block.layer,
                    node.name()
                );
            }
            if !sum.is_empty() {
                patch.redirect.insert(sum, stream);
            }
            patch.replace.push((junction, norm));
        }
        op => {
            bail!("layer {}: --replace drop does not handle a {op} junction ({:?})", block.layer, node.name())
        }
    }
    Ok(())
}

fn find_node(graph: &GraphProto, name: &str) -> Result<usize> {
    graph.node.iter().position(|n| n.name() == name).with_context(|| format!("node {name:?} not found"))
}

fn initializer(name: &str, tensor: Tensor) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: tensor.shape().iter().map(|&d| d as i64).collect(),
        data_type: Some(tensor.dtype().onnx_code()),
        raw_data: Some(tensor.to_le_bytes().into()),
        ..Default::default()
    }
}

fn initializer_params(graph: &GraphProto, keep: impl Fn(&TensorProto) -> bool) -> u64 {
    graph.initializer.iter().filter(|t| keep(t)).map(|t| t.dims.iter().product::<i64>().max(0) as u64).sum()
}

fn set_metadata(props: &mut Vec<StringStringEntryProto>, key: &str, value: &str) {
    props.retain(|p| p.key() != key);
    props.push(StringStringEntryProto { key: Some(key.to_string()), value: Some(value.to_string()) });
}

/// Reorders nodes into a topological order if the edits left them out of one.
fn sort_topologically(graph: &mut GraphProto) -> Result<()> {
    let index = GraphIndex::new(graph)?;
    let order = index.topological_order(graph)?;
    if order.windows(2).all(|w| w[0] < w[1]) {
        return Ok(());
    }
    let mut nodes: Vec<Option<NodeProto>> = std::mem::take(&mut graph.node).into_iter().map(Some).collect();
    graph.node = order.into_iter().map(|i| nodes[i].take().expect("each node once")).collect();
    Ok(())
}

/// KV-cache bytes per token and batch element: the per-token size of every past input.
pub fn kv_bytes_per_token(model: &Model) -> Result<u64> {
    let inputs = prefill_inputs(model, &Array2::zeros((1, 1)))?;
    Ok(inputs
        .iter()
        .filter(|(_, t)| t.dtype().is_float() && t.shape().len() == 4)
        .map(|(_, t)| {
            let s = t.shape();
            (s[1] * s[3] * t.dtype().size().unwrap_or(0)) as u64
        })
        .sum())
}

/// The KV-cache naming patterns of an ONNX Runtime GenAI `genai_config.json` (`%d` = layer).
struct KvPatterns([String; 4]);

impl KvPatterns {
    fn from_config(config: &serde_json::Value) -> Option<KvPatterns> {
        let decoder = &config["model"]["decoder"];
        let get = |section: &str, key: &str| decoder[section][key].as_str().map(str::to_string);
        Some(KvPatterns([
            get("inputs", "past_key_names")?,
            get("inputs", "past_value_names")?,
            get("outputs", "present_key_names")?,
            get("outputs", "present_value_names")?,
        ]))
    }

    /// The layer number in `name` if it matches one of the patterns.
    fn layer_of(&self, name: &str) -> Option<usize> {
        self.0.iter().find_map(|p| {
            let (head, tail) = p.split_once("%d")?;
            name.strip_prefix(head)?.strip_suffix(tail)?.parse().ok()
        })
    }

    fn rename(&self, name: &str, to: usize) -> Option<String> {
        self.0.iter().find_map(|p| {
            let (head, tail) = p.split_once("%d")?;
            name.strip_prefix(head)?.strip_suffix(tail)?.parse::<usize>().ok()?;
            Some(format!("{head}{to}{tail}"))
        })
    }
}

/// ONNX Runtime GenAI addresses the KV cache as layers `0..num_hidden_layers`: after layers'
/// caches were dropped, the remaining ones are renumbered contiguously (in order) in the graph, and
/// the returned config says how many there are and which file holds the model.
pub fn genai_config_for(
    model: &mut Model,
    config: &serde_json::Value,
    filename: &str,
) -> Result<serde_json::Value> {
    let patterns = KvPatterns::from_config(config)
        .context("genai_config.json has no model.decoder inputs/outputs KV name patterns")?;
    let graph = model.graph_mut();
    let mut layers: Vec<usize> = graph.input.iter().filter_map(|v| patterns.layer_of(v.name())).collect();
    layers.sort_unstable();
    layers.dedup();
    let new_index: HashMap<usize, usize> = layers.iter().enumerate().map(|(new, &old)| (old, new)).collect();
    let rename = |name: &mut String| {
        if let Some(old) = patterns.layer_of(name)
            && let Some(&new) = new_index.get(&old)
            && let Some(renamed) = patterns.rename(name, new)
        {
            *name = renamed;
        }
    };
    for node in &mut graph.node {
        node.input.iter_mut().for_each(rename);
        node.output.iter_mut().for_each(rename);
    }
    for v in graph.input.iter_mut().chain(graph.output.iter_mut()) {
        let mut name = v.name().to_string();
        rename(&mut name);
        v.name = Some(name);
    }
    let mut config = config.clone();
    let decoder = &mut config["model"]["decoder"];
    decoder["num_hidden_layers"] = serde_json::json!(layers.len());
    decoder["filename"] = serde_json::json!(filename);
    Ok(config)
}
