//! Finding decoder layers and their attention blocks, by walking the residual stream from the token
//! embedding: every residual junction adds a branch computed from the stream back into it, and the
//! branches that hold attention are the blocks NBL can linearise.
//!
//! A junction is `s' = Add(s, t)` or a fused `SkipLayerNormalization`/`SkipSimplifiedLayerNormalization`
//! (inputs 0 and 1 summed, the sum on output 3 and its normalisation on output 0), where the branch
//! tensor `t` is computed from the stream tensor `s`. For an attention branch, `X = s` and `Y = t`.
//! Boundaries are found from the data flow alone; names only label layers and are cross-checked.

use std::collections::HashSet;

use anyhow::{Result, bail};
use serde::Serialize;

use crate::onnx::proto::{GraphProto, NodeProto};
use crate::onnx::{DType, GraphIndex, Model, TensorId, value_type};

/// Junctions that fuse the residual add with the next norm; the sum is on output 3.
const SKIP_NORM_OPS: &[&str] = &["SkipLayerNormalization", "SkipSimplifiedLayerNormalization"];

/// The attention a branch holds: decomposed (`Softmax` into a `MatMul`, or a KV-cache input), or a
/// fused operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKind {
    Decomposed,
    Fused(FusedAttention),
}

/// Fused attention operators (ai.onnx and com.microsoft).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FusedAttention {
    Attention,
    MultiHeadAttention,
    GroupQueryAttention,
    PagedAttention,
    SparseAttention,
    PackedAttention,
    PackedMultiHeadAttention,
    DecoderMaskedMultiHeadAttention,
}

impl FusedAttention {
    const ALL: [FusedAttention; 8] = [
        FusedAttention::Attention,
        FusedAttention::MultiHeadAttention,
        FusedAttention::GroupQueryAttention,
        FusedAttention::PagedAttention,
        FusedAttention::SparseAttention,
        FusedAttention::PackedAttention,
        FusedAttention::PackedMultiHeadAttention,
        FusedAttention::DecoderMaskedMultiHeadAttention,
    ];

    pub fn from_op(op: &str) -> Option<FusedAttention> {
        FusedAttention::ALL.into_iter().find(|f| f.op_type() == op)
    }

    pub fn op_type(self) -> &'static str {
        match self {
            FusedAttention::Attention => "Attention",
            FusedAttention::MultiHeadAttention => "MultiHeadAttention",
            FusedAttention::GroupQueryAttention => "GroupQueryAttention",
            FusedAttention::PagedAttention => "PagedAttention",
            FusedAttention::SparseAttention => "SparseAttention",
            FusedAttention::PackedAttention => "PackedAttention",
            FusedAttention::PackedMultiHeadAttention => "PackedMultiHeadAttention",
            FusedAttention::DecoderMaskedMultiHeadAttention => "DecoderMaskedMultiHeadAttention",
        }
    }
}

impl std::fmt::Display for AttentionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttentionKind::Decomposed => f.pad("decomposed"),
            AttentionKind::Fused(op) => f.pad(op.op_type()),
        }
    }
}

/// Written as in `inspect --json`: `decomposed` or the fused operator's type.
impl Serialize for AttentionKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Where a branch joins the stream: input `slot` of node `node` (a position in the graph the
/// blocks were found in) reads the branch tensor `Y`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Junction {
    pub node: usize,
    pub slot: usize,
}

/// One decoder layer's attention block: what enters it and what it adds back to the stream.
#[derive(Clone, Debug, Serialize)]
pub struct AttentionBlock {
    pub layer: usize,
    /// The residual-stream tensor entering the attention's input norm.
    pub x: String,
    /// The attention output entering the residual junction.
    pub y: String,
    pub kind: AttentionKind,
    /// Nodes that no output needs any more once the block and its KV cache are removed.
    pub nodes: usize,
    pub kv_inputs: Vec<String>,
    pub kv_outputs: Vec<String>,
    #[serde(skip)]
    pub junction: Junction,
}

/// Whether a residual branch was taken as attention, and why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Attention(AttentionKind),
    /// No Softmax feeding a MatMul, no fused attention op, no KV-cache input; `ops` summarises
    /// what the branch holds instead.
    NotAttention {
        ops: String,
    },
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Attention(kind) => write!(f, "attention ({kind})"),
            Verdict::NotAttention { ops } => write!(
                f,
                "not attention: no Softmax feeding a MatMul, no fused attention op, no KV-cache input (ops: {ops})"
            ),
        }
    }
}

/// Every residual branch found on the walk, with the reason it was or was not taken as attention.
#[derive(Clone, Debug)]
pub struct Branch {
    /// The branch tensor and the name of the node where it joins the stream (for messages).
    pub branch: String,
    pub junction: String,
    pub nodes: usize,
    pub verdict: Verdict,
}

/// The decoder's structure as far as NBL needs it.
#[derive(Clone, Debug, Serialize)]
pub struct Blocks {
    pub layers: Vec<AttentionBlock>,
    pub hidden_size: usize,
    /// The stream's element type, where it can be told.
    #[serde(serialize_with = "dtype_or_unknown")]
    pub dtype: Option<DType>,
    /// Rows of the token embedding table, where the stream starts from one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<usize>,
    #[serde(skip)]
    pub branches: Vec<Branch>,
    /// Where the layer numbers in names disagree with the stream order.
    pub warnings: Vec<String>,
}

fn dtype_or_unknown<S: serde::Serializer>(
    dtype: &Option<DType>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match dtype {
        Some(d) => s.collect_str(d),
        None => s.serialize_str("unknown"),
    }
}

impl Blocks {
    /// Every layer's X and Y tensor names, in layer order: `[x0, y0, x1, y1, ...]`.
    pub fn xy_tensors(&self) -> Vec<String> {
        self.layers.iter().flat_map(|l| [l.x.clone(), l.y.clone()]).collect()
    }

    /// The block of layer `layer`.
    pub fn layer(&self, layer: usize) -> Option<&AttentionBlock> {
        self.layers.iter().find(|l| l.layer == layer)
    }
}

/// Finds every attention block of a decoder-only LLM graph.
pub fn find_blocks(model: &Model) -> Result<Blocks> {
    let graph = model.graph();
    let index = GraphIndex::new(graph)?;
    index.topological_order(graph)?;
    let start = stream_start(graph, &index)?;
    let live = index.live_nodes();

    let mut branches = Vec::new();
    let mut layers: Vec<AttentionBlock> = Vec::new();
    let mut stream = start;
    let mut steps = 0;
    loop {
        let Some(junction) = next_junction(graph, &index, stream) else {
            // Exporters may scale or cast the embedding before the first layer (Gemma's `* sqrt(d)`).
            match passthrough_successor(graph, &index, stream) {
                Some(next) if branches.is_empty() && steps < 3 => {
                    stream = next;
                    steps += 1;
                    continue;
                }
                _ => break,
            }
        };
        let analysis = analyse_branch(graph, &index, &live, &junction);
        branches.push(Branch {
            branch: index.name(junction.branch).to_string(),
            junction: graph.node[junction.node].name().to_string(),
            nodes: analysis.dying.len(),
            verdict: analysis.verdict.clone(),
        });
        if let Verdict::Attention(kind) = analysis.verdict {
            layers.push(AttentionBlock {
                layer: layers.len(),
                x: index.name(stream).to_string(),
                y: index.name(junction.branch).to_string(),
                kind,
                nodes: analysis.dying.len(),
                kv_inputs: analysis.kv_inputs.iter().map(|&t| index.name(t).to_string()).collect(),
                kv_outputs: analysis.kv_outputs.iter().map(|&t| index.name(t).to_string()).collect(),
                junction: Junction { node: junction.node, slot: junction.branch_slot },
            });
        }
        match junction.out {
            Some(out) => stream = out,
            None => break,
        }
    }

    if layers.is_empty() {
        let mut msg = format!(
            "no attention block found in {}: walked the residual stream from {:?}",
            model.path.display(),
            index.name(start)
        );
        if branches.is_empty() {
            msg.push_str(", but no node adds a branch computed from it back into it (no residual junction)");
        }
        for (i, b) in branches.iter().enumerate() {
            msg.push_str(&format!(
                "\n  branch {i}: {:?} joins at node {:?} ({} nodes): {}",
                b.branch, b.junction, b.nodes, b.verdict
            ));
        }
        bail!(msg);
    }

    let first_x = index.id(&layers[0].x).expect("indexed");
    let dtype = stream_dtype(graph, &index, first_x);
    let hidden_size = hidden_size(model, &index, first_x, start)?;
    let warnings = cross_check(graph, &index, &layers);
    let vocab_size = embedding_rows(graph, &index, start);
    Ok(Blocks { layers, hidden_size, dtype, vocab_size, branches, warnings })
}

/// A residual junction found on the walk: `s' = s + t` at node `node`; `out` is `s'` (absent for a
/// final Skip norm whose sum is unused).
struct Join {
    node: usize,
    branch: TensorId,
    branch_slot: usize,
    out: Option<TensorId>,
    /// Nodes computed from the stream on the way to the branch tensor.
    region: Vec<usize>,
}

/// The tensor the residual stream starts from: the token embedding (a `Gather` of an initializer by
/// integer ids), or a float `inputs_embeds` input.
fn stream_start(graph: &GraphProto, index: &GraphIndex) -> Result<TensorId> {
    let mut candidates = Vec::new();
    for (n, node) in graph.node.iter().enumerate() {
        let is_gather = matches!(node.op_type(), "Gather" | "GatherBlockQuantized");
        let (Some(table), Some(ids), Some(out)) = (index.input(n, 0), index.input(n, 1), index.output(n, 0))
        else {
            continue;
        };
        let Some((rows, cols)) = is_gather.then(|| embedding_table(graph, index, table)).flatten() else {
            continue;
        };
        // The ids must come from a graph input (possibly through casts): a gather of a constant
        // table by a computed index (rotary caches, shapes) is not an embedding.
        let ancestors = index.ancestors(&[ids]);
        let from_input = |inp: &TensorId| {
            index.consumers(*inp).iter().any(|&(c, _)| ancestors[c] || c == n) && {
                let t = graph.input.iter().find(|v| v.name() == index.name(*inp));
                t.and_then(value_type).is_some_and(|(dt, _)| matches!(dt, DType::I64 | DType::I32))
            }
        };
        let inputs: Vec<TensorId> = index.graph_inputs.iter().copied().filter(from_input).collect();
        if inputs.is_empty() {
            continue;
        }
        // Prefer the ids named `input_ids`, then the largest table (rotary caches are gathered by
        // position ids too, but the vocabulary table dwarfs them).
        let named_ids = inputs.iter().any(|&i| index.name(i) == "input_ids");
        candidates.push((named_ids, rows * cols, out));
    }
    candidates.sort_by_key(|&(named, size, _)| (!named, std::cmp::Reverse(size)));
    if let Some(&(_, _, out)) = candidates.first() {
        return Ok(out);
    }
    for v in &graph.input {
        if let Some((dtype, dims)) = value_type(v)
            && dtype.is_float()
            && dims.len() == 3
        {
            return Ok(index.id(v.name()).expect("graph inputs are indexed"));
        }
    }
    bail!(
        "no token embedding found: expected a Gather of an embedding table by the token ids (input_ids), \
         or a float [batch, sequence, hidden] input"
    )
}

/// The `(rows, columns)` of an embedding table: a 2-D initializer, possibly through `Transpose`
/// (tied embeddings: the GenAI builder gathers from `Transpose(lm_head.weight)`), `Cast` or
/// `Identity`.
fn embedding_table(graph: &GraphProto, index: &GraphIndex, table: TensorId) -> Option<(usize, usize)> {
    if let Some(i) = index.initializer(table) {
        let dims = &graph.initializer[i].dims;
        return (dims.len() == 2).then(|| (dims[0] as usize, dims[1] as usize));
    }
    let (node, _) = index.producer(table)?;
    let source = index.input(node, 0)?;
    match graph.node[node].op_type() {
        "Transpose" => embedding_table(graph, index, source).map(|(r, c)| (c, r)),
        "Cast" | "Identity" => embedding_table(graph, index, source),
        _ => None,
    }
}

/// The tensors that carry the stream value `s` into a branch: `s` itself, the outputs of `Cast` and
/// `Identity` nodes reading it (TorchScript exports keep the norm's `x.to(float32)` on the residual
/// path even when it is a no-op), and, when `s` is the sum output of a fused Skip norm, that node's
/// normalised outputs (the norm is fused into the junction).
fn stream_views(graph: &GraphProto, index: &GraphIndex, s: TensorId) -> Vec<TensorId> {
    let mut views = vec![s];
    if let Some((node, 3)) = index.producer(s)
        && SKIP_NORM_OPS.contains(&graph.node[node].op_type())
    {
        views.extend((0..3).filter_map(|slot| index.output(node, slot)));
    }
    for &(c, _) in index.consumers(s) {
        if matches!(graph.node[c].op_type(), "Cast" | "Identity") {
            views.extend(index.output(c, 0));
        }
    }
    views
}

/// The residual junction that consumes stream tensor `s`, choosing the widest branch when there
/// are several candidates.
fn next_junction(graph: &GraphProto, index: &GraphIndex, s: TensorId) -> Option<Join> {
    let views = stream_views(graph, index, s);
    let mut best: Option<Join> = None;
    for &(node, slot) in views.iter().flat_map(|&v| index.consumers(v)) {
        let n = &graph.node[node];
        let (branch_slot, out) = match n.op_type() {
            "Add" if slot < 2 && n.input.len() == 2 => (1 - slot, index.output(node, 0)),
            op if SKIP_NORM_OPS.contains(&op) && slot < 2 => (1 - slot, index.output(node, 3)),
            _ => continue,
        };
        let Some(branch) = index.input(node, branch_slot) else { continue };
        if views.contains(&branch) {
            continue; // s + s
        }
        let region = forward_region(index, &views, branch);
        if region.is_empty() {
            continue; // `t` does not depend on `s`: an Add of a constant or of another stream.
        }
        if best.as_ref().is_none_or(|b| region.len() > b.region.len()) {
            best = Some(Join { node, branch, branch_slot, out, region });
        }
    }
    best
}

/// Nodes reachable forward from `from` that `to` depends on.
fn forward_region(index: &GraphIndex, from: &[TensorId], to: TensorId) -> Vec<usize> {
    let needed = index.ancestors(&[to]);
    let mut in_region = vec![false; index.node_count()];
    let mut stack: Vec<TensorId> = from.to_vec();
    let mut region = Vec::new();
    while let Some(t) = stack.pop() {
        for &(c, _) in index.consumers(t) {
            if needed[c] && !in_region[c] {
                in_region[c] = true;
                region.push(c);
                stack.extend(index.outputs(c).iter().flatten());
            }
        }
    }
    region.sort_unstable();
    region
}

/// A single elementwise successor (`Mul`/`Div` by a constant, `Cast`) through which the stream passes.
fn passthrough_successor(graph: &GraphProto, index: &GraphIndex, s: TensorId) -> Option<TensorId> {
    let consumers = index.consumers(s);
    let &[(node, _)] = consumers else { return None };
    matches!(graph.node[node].op_type(), "Mul" | "Div" | "Cast").then(|| index.output(node, 0))?
}

struct BranchAnalysis {
    verdict: Verdict,
    dying: Vec<usize>,
    kv_inputs: Vec<TensorId>,
    kv_outputs: Vec<TensorId>,
}

/// Classifies a branch and measures what removing it frees: the nodes that die when the junction
/// stops reading the branch and the branch's graph outputs (its KV cache) are dropped.
fn analyse_branch(graph: &GraphProto, index: &GraphIndex, live: &[bool], j: &Join) -> BranchAnalysis {
    let kv_outputs: Vec<TensorId> = index
        .graph_outputs
        .iter()
        .copied()
        .filter(|&o| index.producer(o).is_some_and(|(p, _)| j.region.binary_search(&p).is_ok()))
        .collect();

    // Liveness without the branch: roots are the other graph outputs, and the junction no longer
    // reads the branch tensor.
    let mut still_live = vec![false; index.node_count()];
    let mut stack: Vec<TensorId> =
        index.graph_outputs.iter().copied().filter(|o| !kv_outputs.contains(o)).collect();
    let mut seen: HashSet<TensorId> = stack.iter().copied().collect();
    while let Some(t) = stack.pop() {
        let Some((node, _)) = index.producer(t) else { continue };
        if still_live[node] {
            continue;
        }
        still_live[node] = true;
        for (slot, input) in index.inputs(node).iter().enumerate() {
            let Some(input) = *input else { continue };
            let cut = node == j.node && slot == j.branch_slot;
            if !cut && seen.insert(input) {
                stack.push(input);
            }
        }
        for &input in index.implicit_inputs(node) {
            if seen.insert(input) {
                stack.push(input);
            }
        }
    }
    let dying: Vec<usize> = (0..index.node_count()).filter(|&n| live[n] && !still_live[n]).collect();

    let float_input = |t: TensorId| {
        graph
            .input
            .iter()
            .find(|v| v.name() == index.name(t))
            .and_then(value_type)
            .is_some_and(|(dt, _)| dt.is_float())
    };
    let mut kv_inputs: Vec<TensorId> = dying
        .iter()
        .flat_map(|&n| index.all_inputs(n))
        .filter(|&t| index.is_graph_input(t) && float_input(t))
        .collect();
    kv_inputs.sort();
    kv_inputs.dedup();
    // Keep the model's declared order.
    kv_inputs.sort_by_key(|t| index.graph_inputs.iter().position(|g| g == t));

    let nodes: Vec<&NodeProto> = dying.iter().map(|&n| &graph.node[n]).collect();
    let fused = nodes.iter().find_map(|n| FusedAttention::from_op(n.op_type()));
    let softmax_into_matmul =
        dying.iter().any(|&n| graph.node[n].op_type() == "Softmax" && feeds_matmul(graph, index, n, 3));
    let verdict = if let Some(op) = fused {
        Verdict::Attention(AttentionKind::Fused(op))
    } else if softmax_into_matmul || !kv_inputs.is_empty() {
        Verdict::Attention(AttentionKind::Decomposed)
    } else {
        Verdict::NotAttention { ops: op_histogram(&nodes) }
    };
    BranchAnalysis { verdict, dying, kv_inputs, kv_outputs }
}

/// Whether node `n`'s output reaches a MatMul through at most `depth` cheap elementwise ops.
fn feeds_matmul(graph: &GraphProto, index: &GraphIndex, n: usize, depth: usize) -> bool {
    index.outputs(n).iter().flatten().any(|&t| {
        index.consumers(t).iter().any(|&(c, _)| match graph.node[c].op_type() {
            "MatMul" | "Einsum" => true,
            "Cast" | "Where" | "Dropout" | "Identity" if depth > 0 => {
                feeds_matmul(graph, index, c, depth - 1)
            }
            _ => false,
        })
    })
}

fn op_histogram(nodes: &[&NodeProto]) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for n in nodes {
        match counts.iter_mut().find(|(op, _)| *op == n.op_type()) {
            Some((_, c)) => *c += 1,
            None => counts.push((n.op_type(), 1)),
        }
    }
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let shown: Vec<String> = counts.iter().take(6).map(|(op, c)| format!("{op}×{c}")).collect();
    if shown.is_empty() { "none".to_string() } else { shown.join(", ") }
}

/// The element type of a stream tensor: from value_info where the exporter wrote it, else by
/// following the stream back through the ops that keep its type.
fn stream_dtype(graph: &GraphProto, index: &GraphIndex, t: TensorId) -> Option<DType> {
    let name = index.name(t);
    let declared =
        graph.value_info.iter().chain(&graph.input).chain(&graph.output).find(|v| v.name() == name);
    if let Some((dtype, _)) = declared.and_then(value_type) {
        return Some(dtype);
    }
    if let Some(i) = index.initializer(t) {
        return Some(DType::from_onnx(graph.initializer[i].data_type()));
    }
    let (node, _) = index.producer(t)?;
    let n = &graph.node[node];
    match n.op_type() {
        "Cast" => crate::onnx::attr_int(n, "to").map(|c| DType::from_onnx(c as i32)),
        // Gather (the embedding's table), Add and the norms keep their first input's type.
        _ => stream_dtype(graph, index, index.input(node, 0)?),
    }
}

/// The hidden size: from the declared shape of X, else the embedding table's width, else the width
/// of the first norm's scale.
fn hidden_size(model: &Model, index: &GraphIndex, x: TensorId, start: TensorId) -> Result<usize> {
    let graph = model.graph();
    let name = index.name(x);
    let declared = graph.value_info.iter().chain(&graph.input).find(|v| v.name() == name);
    if let Some(Some(d)) = declared.and_then(value_type).and_then(|(_, dims)| dims.last().copied())
        && d > 0
    {
        return Ok(d as usize);
    }
    if let Some((node, _)) = index.producer(start)
        && graph.node[node].op_type() == "Gather"
        && let Some((_, cols)) = index.input(node, 0).and_then(|t| embedding_table(graph, index, t))
    {
        return Ok(cols);
    }
    for &(c, _) in index.consumers(x) {
        let n = &graph.node[c];
        if n.op_type().contains("Normalization")
            && let Some(scale) = index.input(c, if SKIP_NORM_OPS.contains(&n.op_type()) { 2 } else { 1 })
            && let Some(i) = index.initializer(scale)
            && graph.initializer[i].dims.len() == 1
        {
            return Ok(graph.initializer[i].dims[0] as usize);
        }
    }
    bail!("cannot tell the hidden size of {name:?}: no declared shape, embedding table or norm scale")
}

/// The number of rows of the embedding table the stream starts from.
fn embedding_rows(graph: &GraphProto, index: &GraphIndex, start: TensorId) -> Option<usize> {
    let (node, _) = index.producer(start)?;
    if graph.node[node].op_type() != "Gather" {
        return None;
    }
    embedding_table(graph, index, index.input(node, 0)?).map(|(rows, _)| rows)
}

/// Compares stream-order layer numbers with the ones in node and KV-cache names; returns warnings.
fn cross_check(graph: &GraphProto, index: &GraphIndex, layers: &[AttentionBlock]) -> Vec<String> {
    let mut warnings = Vec::new();
    for block in layers {
        let kv_numbers: HashSet<usize> =
            block.kv_inputs.iter().chain(&block.kv_outputs).filter_map(|n| number_after(n, ".")).collect();
        if !kv_numbers.is_empty() && !kv_numbers.contains(&block.layer) {
            warnings.push(format!(
                "layer {} (stream order) uses KV-cache tensors numbered {:?}",
                block.layer, kv_numbers
            ));
        }
        let Some(y) = index.id(&block.y) else { continue };
        if let Some((node, _)) = index.producer(y)
            && let Some(n) = number_after(graph.node[node].name(), "layers.")
            && n != block.layer
        {
            warnings.push(format!(
                "layer {} (stream order) ends at node {:?}, whose name says layer {n}",
                block.layer,
                graph.node[node].name()
            ));
        }
    }
    let past_inputs = graph.input.iter().filter(|v| v.name().starts_with("past_key_values.")).count();
    if past_inputs > 0 && past_inputs != 2 * layers.len() {
        warnings.push(format!(
            "the model has {past_inputs} past_key_values inputs but {} attention blocks were found",
            layers.len()
        ));
    }
    warnings
}

/// The first run of digits after `marker` (`"past_key_values.3.key"` with `"."` gives 3).
fn number_after(name: &str, marker: &str) -> Option<usize> {
    name.match_indices(marker).find_map(|(i, m)| {
        let rest = &name[i + m.len()..];
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::build::{node, tensor_value};
    use crate::onnx::proto::{ModelProto, OperatorSetIdProto, TensorProto};

    /// A one-layer decoder with sandwich norms and a residual scale on the attention branch:
    /// `h1 = h0 + scale · norm(attn(norm(h0)))`, `h2 = h1 + mlp(h1)`; the junction's operands in
    /// the order given.
    fn sandwich_model(attention_first: bool) -> Model {
        let junction = if attention_first { ["ys", "h0"] } else { ["h0", "ys"] };
        let nodes = vec![
            node("Gather", &["embed", "input_ids"], "h0"),
            node("Mul", &["h0", "g_in"], "n"),
            node("MatMul", &["n", "wq"], "q"),
            node("MatMul", &["n", "wk"], "k"),
            node("MatMul", &["n", "wv"], "v"),
            node("Transpose", &["k"], "kt"),
            node("MatMul", &["q", "kt"], "scores"),
            node("Softmax", &["scores"], "probs"),
            node("MatMul", &["probs", "v"], "a"),
            node("MatMul", &["a", "wo"], "o"),
            node("Mul", &["o", "g_post"], "pn"),
            node("Mul", &["pn", "scale"], "ys"),
            node("Add", &junction, "h1"),
            node("MatMul", &["h1", "w1"], "up"),
            node("Relu", &["up"], "act"),
            node("MatMul", &["act", "w2"], "down"),
            node("Add", &["h1", "down"], "h2"),
            node("MatMul", &["h2", "lm_head"], "logits"),
        ];
        let init = |name: &str, dims: &[i64]| TensorProto {
            name: Some(name.into()),
            dims: dims.to_vec(),
            data_type: Some(1),
            ..Default::default()
        };
        let graph = GraphProto {
            node: nodes,
            initializer: vec![
                init("embed", &[32, 8]),
                init("g_in", &[8]),
                init("wq", &[8, 8]),
                init("wk", &[8, 8]),
                init("wv", &[8, 8]),
                init("wo", &[8, 8]),
                init("g_post", &[8]),
                init("scale", &[]),
                init("w1", &[8, 16]),
                init("w2", &[16, 8]),
                init("lm_head", &[8, 32]),
            ],
            input: vec![tensor_value("input_ids", DType::I64, None)],
            output: vec![tensor_value("logits", DType::F32, None)],
            ..Default::default()
        };
        let proto = ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
            graph: Some(graph),
            ..Default::default()
        };
        Model { path: "sandwich.onnx".into(), proto }
    }

    /// Tied embeddings as the GenAI builder writes them: `Gather(Transpose(lm_head.weight), ids)`.
    #[test]
    fn a_tied_embedding_behind_a_transpose_starts_the_stream() {
        let mut model = sandwich_model(false);
        let graph = model.graph_mut();
        graph.node[0] = node("Gather", &["embed_t", "input_ids"], "h0");
        graph.node.insert(0, node("Transpose", &["lm_head"], "embed_t"));
        graph.initializer.retain(|t| t.name() != "embed");
        let blocks = find_blocks(&model).unwrap();
        assert_eq!(blocks.layers[0].x, "h0");
        assert_eq!((blocks.hidden_size, blocks.vocab_size), (8, Some(32)));
    }

    #[test]
    fn sandwich_norm_and_residual_scale_belong_to_the_branch() {
        for attention_first in [false, true] {
            let blocks = find_blocks(&sandwich_model(attention_first)).unwrap();
            assert_eq!(blocks.layers.len(), 1);
            let layer = &blocks.layers[0];
            assert_eq!((layer.x.as_str(), layer.y.as_str()), ("h0", "ys"), "Y is what enters the junction");
            assert_eq!(layer.kind, AttentionKind::Decomposed);
            // n, q, k, v, kt, scores, probs, a, o, pn, ys
            assert_eq!(layer.nodes, 11);
            assert_eq!((blocks.hidden_size, blocks.dtype), (8, Some(DType::F32)));
            assert_eq!(blocks.branches.len(), 2);
            assert!(
                matches!(blocks.branches[1].verdict, Verdict::NotAttention { .. }),
                "{:?}",
                blocks.branches[1]
            );
        }
    }

    #[test]
    fn layer_numbers_are_read_from_names() {
        assert_eq!(number_after("past_key_values.12.key", "."), Some(12));
        assert_eq!(number_after("/model/layers.3/self_attn/o_proj/MatMul", "layers."), Some(3));
        assert_eq!(number_after("logits", "."), None);
    }
}
