//! Finding decoder layers and their attention blocks, by walking the residual stream from the token
//! embedding: every residual junction adds a branch computed from the stream back into it, and the
//! branches that hold attention are the blocks NBL can linearise.
//!
//! A junction is `s' = Add(s, t)` or a fused `SkipLayerNormalization`/`SkipSimplifiedLayerNormalization`
//! (inputs 0 and 1 summed, the sum on output 3 and its normalisation on output 0), where the branch
//! tensor `t` is computed from the stream tensor `s`. For an attention branch, `X = s` and `Y = t`.
//! Boundaries are found from the data flow alone; names only label layers and are cross-checked.

use std::collections::HashSet;

use anyhow::{Context, Result, bail, ensure};
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
    /// Attention and the MLP read the same stream and are both added to it (GPT-NeoX, Phi-2,
    /// Falcon, Cohere): `Y` is the attention term alone.
    pub parallel: bool,
    /// Nodes that no output needs any more once the block and its KV cache are removed.
    pub nodes: usize,
    pub kv_inputs: Vec<String>,
    pub kv_outputs: Vec<String>,
    /// The stream as the junction adds to it, which a linear map reads in place of the attention:
    /// `x`, or a widening Cast of it where the stream's sums run in a wider type than `x` (Optimum's
    /// fp16 exports add the f16 embedding to an f32 stream).
    pub map_input: String,
    /// The element type the junction adds in, which a map's output and bias take.
    #[serde(serialize_with = "dtype_or_unknown")]
    pub dtype: Option<DType>,
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
    /// The stream's element type where it enters the first block, where it can be told (each
    /// block's own, where the sums run in a wider type, is [`AttentionBlock::dtype`]).
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
    let mut prologue = 0;
    loop {
        let Some(join) = next_join(graph, &index, stream) else {
            // Before the first block, the stream may pass through a prologue: a scale (Gemma's
            // `× √d`), an added position embedding (GPT-2), a Cast, an embedding norm (BLOOM). A
            // block's input is read at least twice (by its branch and its junction), a prologue
            // step's only once.
            match prologue_step(graph, &index, stream) {
                Some(next) if branches.is_empty() && prologue < MAX_PROLOGUE => {
                    stream = next;
                    prologue += 1;
                    continue;
                }
                _ => break,
            }
        };
        let mut attention_y: Option<TensorId> = None;
        for term in &join.terms {
            let analysis = analyse_branch(graph, &index, &live, term)?;
            branches.push(Branch {
                branch: index.name(term.tensor).to_string(),
                junction: graph.node[term.port.0].name().to_string(),
                nodes: analysis.dying.len(),
                verdict: analysis.verdict.clone(),
            });
            if let Verdict::Attention(kind) = analysis.verdict {
                if let Some(first) = attention_y {
                    bail!(
                        "{}: the block after stream tensor {:?} adds two attention branches to the stream \
                         ({:?} and {:?}); which one to linearise cannot be told",
                        model.path.display(),
                        index.name(stream),
                        index.name(first),
                        index.name(term.tensor)
                    );
                }
                attention_y = Some(term.tensor);
                // The junction reads the stream itself or one of its views; where it reads neither
                // (the attention term of a parallel block meets the MLP's first), `x`.
                let views = stream_views(graph, &index, stream);
                let read =
                    |t: &TensorId| graph.node[term.port.0].input.iter().any(|i| index.id(i) == Some(*t));
                let map_input =
                    if read(&stream) { stream } else { views.iter().copied().find(read).unwrap_or(stream) };
                layers.push(AttentionBlock {
                    layer: layers.len(),
                    x: index.name(stream).to_string(),
                    y: index.name(term.tensor).to_string(),
                    kind,
                    parallel: join.terms.len() > 1,
                    nodes: analysis.dying.len(),
                    kv_inputs: analysis.kv_inputs.iter().map(|&t| index.name(t).to_string()).collect(),
                    kv_outputs: analysis.kv_outputs.iter().map(|&t| index.name(t).to_string()).collect(),
                    map_input: index.name(map_input).to_string(),
                    dtype: stream_dtype(graph, &index, map_input),
                    junction: Junction { node: term.port.0, slot: term.port.1 },
                });
            }
        }
        match join.out {
            Some(out) => stream = out,
            None => break,
        }
    }

    if let Some(node) = stream_continues(graph, &index, stream) {
        let n = &graph.node[node];
        let op = if n.domain().is_empty() {
            n.op_type().to_string()
        } else {
            format!("{}::{}", n.domain(), n.op_type())
        };
        bail!(
            "{}: the residual stream goes on after {:?} through node {:?} ({op}), which nbl-onnx cannot see \
             through, and more residual blocks follow it; refusing rather than treating the {} block(s) before \
             it as the whole model",
            model.path.display(),
            index.name(stream),
            n.name(),
            layers.len()
        );
    }
    if layers.is_empty() {
        let mut msg = format!(
            "no attention block found in {}: walked the residual stream from {:?}",
            model.path.display(),
            index.name(start)
        );
        if branches.is_empty() {
            msg.push_str(&format!(
                " to {:?}, but no node adds a branch computed from it back into it (no residual junction); \
                 it is read by {}",
                index.name(stream),
                readers(graph, &index, stream)
            ));
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

/// Nodes an unknown operator on the stream may take before the next residual block shows.
const HIDDEN_STEPS: usize = 4;

/// Where the walk stopped at stream tensor `s`: a node that reads `s` and leads, through a chain of
/// at most [`HIDDEN_STEPS`] nodes each reading the last one's output, to another residual block
/// means the stream passes through an operator the walk does not know (a quantise/dequantise
/// pair, a custom op). Returns the first node of the chain. At the true end of the stream (the
/// final norm, the head) no residual block follows.
fn stream_continues(graph: &GraphProto, index: &GraphIndex, s: TensorId) -> Option<usize> {
    for view in stream_views(graph, index, s) {
        for (first, _) in value_readers(graph, index, view) {
            let mut t = index.output(first, 0);
            for _ in 0..HIDDEN_STEPS {
                let Some(tensor) = t else { break };
                if next_join(graph, index, tensor).is_some() {
                    return Some(first);
                }
                let readers = value_readers(graph, index, tensor);
                let &[(next, _)] = readers.as_slice() else { break };
                t = index.output(next, 0);
            }
        }
    }
    None
}

/// One residual block found on the walk from stream tensor `s`: the terms added to the stream
/// (one for a sequential block; several for a parallel one, where attention and MLP read the same
/// stream and both are added), and the stream after them (absent for a final Skip norm whose sum is
/// unused).
struct Join {
    terms: Vec<Term>,
    out: Option<TensorId>,
}

/// A branch tensor computed from the stream and added into it at input `port` = (node, slot).
struct Term {
    tensor: TensorId,
    port: (usize, usize),
    /// Nodes computed from the stream on the way to the branch tensor.
    region: Vec<usize>,
}

/// Prologue steps allowed between the token embedding and the first block.
const MAX_PROLOGUE: usize = 16;

/// The tensor the residual stream starts from: the token embedding (a `Gather` of an initializer by
/// integer ids), or a float `inputs_embeds` input.
fn stream_start(graph: &GraphProto, index: &GraphIndex) -> Result<TensorId> {
    let mut candidates = Vec::new();
    for n in 0..graph.node.len() {
        let (Some(ids), Some(out)) = (index.input(n, 1), index.output(n, 0)) else {
            continue;
        };
        let Some((rows, cols)) = embedding_shape(graph, index, n) else {
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

/// The `(rows, columns)` of the table an embedding node gathers from, in values: a `Gather` of a
/// 2-D table, or a `GatherBlockQuantized` of packed integers (tied int4 embeddings: the GenAI
/// builder gathers from the LM head's `MatMulNBits` matrix, `8 / bits` values per byte). `None`
/// for any other node.
fn embedding_shape(graph: &GraphProto, index: &GraphIndex, node: usize) -> Option<(usize, usize)> {
    let n = &graph.node[node];
    let (rows, cols, dtype) = match n.op_type() {
        "Gather" | "GatherBlockQuantized" => embedding_table(graph, index, index.input(node, 0)?)?,
        _ => return None,
    };
    if n.op_type() == "GatherBlockQuantized" && dtype == DType::U8 {
        let bits = crate::onnx::attr_int(n, "bits").unwrap_or(4);
        let per_byte = usize::try_from(8 / bits.clamp(1, 8)).ok()?;
        return Some((rows, cols * per_byte));
    }
    Some((rows, cols))
}

/// The `(rows, columns)` and element type of a table: a 2-D initializer, possibly through
/// `Transpose` (tied embeddings: the GenAI builder gathers from `Transpose(lm_head.weight)`),
/// `Cast`, `Identity`, or a `Reshape` that keeps the rows (`[rows, blocks, bytes]` to
/// `[rows, blocks·bytes]`).
fn embedding_table(graph: &GraphProto, index: &GraphIndex, table: TensorId) -> Option<(usize, usize, DType)> {
    if let Some(i) = index.initializer(table) {
        let t = &graph.initializer[i];
        let dims: Vec<usize> = t.dims.iter().map(|&d| usize::try_from(d).ok()).collect::<Option<_>>()?;
        return (dims.len() == 2).then(|| (dims[0], dims[1], DType::from_onnx(t.data_type())));
    }
    let (node, _) = index.producer(table)?;
    let source = index.input(node, 0)?;
    match graph.node[node].op_type() {
        "Transpose" => embedding_table(graph, index, source).map(|(r, c, t)| (c, r, t)),
        "Cast" | "Identity" => embedding_table(graph, index, source),
        "Reshape" => {
            let t = &graph.initializer[index.initializer(source)?];
            let dims: Vec<usize> = t.dims.iter().map(|&d| usize::try_from(d).ok()).collect::<Option<_>>()?;
            let (&rows, rest) = dims.split_first()?;
            let cols = rest.iter().try_fold(1usize, |n, &d| n.checked_mul(d))?;
            Some((rows, cols, DType::from_onnx(t.data_type())))
        }
        _ => None,
    }
}

/// The tensors that carry the stream value `s` into a branch: `s` itself, the outputs of `Identity`
/// nodes and of `Cast`s that keep every value reading it (to its own type: TorchScript exports keep
/// the norm's `x.to(float32)` on the residual path even when it is a no-op; or wider: Optimum's
/// fp16 exports add the f16 embedding to an f32 residual stream), and, when `s` is the sum output
/// of a fused Skip norm, that node's normalised outputs (the norm is fused into the junction). A
/// narrowing Cast is a step of its own: it rounds the stream.
fn stream_views(graph: &GraphProto, index: &GraphIndex, s: TensorId) -> Vec<TensorId> {
    // Chains of them too (a dropped branch leaves the Cast that fed its junction in front of the
    // next one's), each view with its own type.
    let mut views = vec![(s, stream_dtype(graph, index, s))];
    let mut next = 0;
    while next < views.len() {
        let (view, dtype) = views[next];
        next += 1;
        for &(c, _) in index.consumers(view) {
            let n = &graph.node[c];
            let to = (n.op_type() == "Cast")
                .then(|| crate::onnx::attr_int(n, "to").map(|code| DType::from_onnx(code as i32)))
                .flatten();
            let keeps_values = match (dtype, to) {
                (Some(from), Some(to)) => from.widens_to(to),
                _ => true,
            };
            if (n.op_type() == "Identity" || (n.op_type() == "Cast" && keeps_values))
                && let Some(out) = index.output(c, 0).filter(|o| views.iter().all(|(v, _)| v != o))
            {
                views.push((out, to.or(dtype)));
            }
        }
    }
    let mut views: Vec<TensorId> = views.into_iter().map(|(v, _)| v).collect();
    // The same output of a copy of the node that made `s`: the same value.
    if let Some((producer, slot)) = index.producer(s) {
        let first_input = index.input(producer, 0);
        let copies = first_input
            .map_or(&[][..], |i| index.consumers(i))
            .iter()
            .filter(|&&(c, _)| c != producer && same_computation(&graph.node[producer], &graph.node[c]));
        views.extend(copies.filter_map(|&(c, _)| index.output(c, slot)).collect::<Vec<_>>());
    }
    if let Some((node, 3)) = index.producer(s)
        && SKIP_NORM_OPS.contains(&graph.node[node].op_type())
    {
        views.extend((0..3).filter_map(|slot| index.output(node, slot)));
    }
    views
}

/// Whether two nodes compute the same values: the same operator on the same inputs with the same
/// attributes.
fn same_computation(a: &NodeProto, b: &NodeProto) -> bool {
    a.op_type() == b.op_type() && a.domain() == b.domain() && a.input == b.input && a.attribute == b.attribute
}

/// The block that adds branches computed from stream tensor `s` back into it.
///
/// The junction is `s' = Add(s, t)` or a Skip norm, where `t` is computed from `s` (by value, not
/// only by shape); the widest such branch is taken. `t` is split into terms where it is itself a
/// sum of branches of `s` (`t = attn + mlp`, GPT-NeoX/Phi-2/Falcon), and the block goes on while
/// its sum feeds only another `Add` of a branch of `s` (`s' = (s + attn) + mlp`, Cohere).
fn next_join(graph: &GraphProto, index: &GraphIndex, s: TensorId) -> Option<Join> {
    let views = stream_views(graph, index, s);
    let mut best: Option<(Term, Option<TensorId>)> = None;
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
        let region = forward_region(graph, index, &views, branch);
        if region.is_empty() {
            continue; // `t` does not depend on `s`: an Add of a constant or of another stream.
        }
        if best.as_ref().is_none_or(|(b, _)| region.len() > b.region.len()) {
            best = Some((Term { tensor: branch, port: (node, branch_slot), region }, out));
        }
    }
    let (branch, mut out) = best?;
    let mut terms = Vec::new();
    split_terms(graph, index, &views, branch, &mut terms);
    // `s' = (s + a) + b` with `b` computed from `s`, not from `s + a`: one parallel block.
    while let Some(sum) = out {
        let readers = value_readers(graph, index, sum);
        let &[(next, slot)] = readers.as_slice() else { break };
        let n = &graph.node[next];
        let next_out = match n.op_type() {
            "Add" if slot < 2 && n.input.len() == 2 => index.output(next, 0),
            op if SKIP_NORM_OPS.contains(&op) && slot < 2 => index.output(next, 3),
            _ => break,
        };
        let Some(other) = index.input(next, 1 - slot) else { break };
        let region = forward_region(graph, index, &views, other);
        if region.is_empty()
            || !forward_region(graph, index, &stream_views(graph, index, sum), other).is_empty()
        {
            break;
        }
        split_terms(graph, index, &views, Term { tensor: other, port: (next, 1 - slot), region }, &mut terms);
        out = next_out;
    }
    Some(Join { terms, out })
}

/// Splits a branch that is a sum of branches of the stream (`Add(a, b)`, both computed from the
/// stream, read only by the sum) into its terms.
fn split_terms(graph: &GraphProto, index: &GraphIndex, views: &[TensorId], term: Term, out: &mut Vec<Term>) {
    if let Some((node, _)) = index.producer(term.tensor)
        && graph.node[node].op_type() == "Add"
        && index.consumers(term.tensor).len() == 1
        && let (Some(a), Some(b)) = (index.input(node, 0), index.input(node, 1))
    {
        let (region_a, region_b) =
            (forward_region(graph, index, views, a), forward_region(graph, index, views, b));
        if !region_a.is_empty() && !region_b.is_empty() {
            split_terms(graph, index, views, Term { tensor: a, port: (node, 0), region: region_a }, out);
            split_terms(graph, index, views, Term { tensor: b, port: (node, 1), region: region_b }, out);
            return;
        }
    }
    out.push(term);
}

/// Ops that read only a tensor's shape: what they compute does not depend on its values.
fn is_shape_only(graph: &GraphProto, node: usize) -> bool {
    matches!(graph.node[node].op_type(), "Shape" | "Size")
}

/// The nodes that read `t`'s values (not only its shape), with their input slots.
fn value_readers(graph: &GraphProto, index: &GraphIndex, t: TensorId) -> Vec<(usize, usize)> {
    index.consumers(t).iter().copied().filter(|&(c, _)| !is_shape_only(graph, c)).collect()
}

/// Nodes reachable forward from `from`, by value (not through `Shape`), that `to` depends on.
fn forward_region(graph: &GraphProto, index: &GraphIndex, from: &[TensorId], to: TensorId) -> Vec<usize> {
    let needed = index.ancestors(&[to]);
    let mut in_region = vec![false; index.node_count()];
    let mut stack: Vec<TensorId> = from.to_vec();
    let mut region = Vec::new();
    while let Some(t) = stack.pop() {
        for &(c, _) in index.consumers(t) {
            if needed[c] && !in_region[c] && !is_shape_only(graph, c) {
                in_region[c] = true;
                region.push(c);
                stack.extend(index.outputs(c).iter().flatten());
            }
        }
    }
    region.sort_unstable();
    region
}

/// Ops through which the stream may pass before the first block, keeping its meaning: elementwise
/// scales and shifts by something not computed from the stream, casts, dropout, an embedding norm.
const PROLOGUE_OPS: &[&str] = &[
    "Mul",
    "Div",
    "Add",
    "Sub",
    "Cast",
    "Identity",
    "Dropout",
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "RMSNormalization",
    // ONNX Runtime's dynamic quantiser stores the embedding table in int8 and dequantises the rows
    // it gathers.
    "DequantizeLinear",
];

/// The next stream tensor of the prologue: `s` read by one node (besides shape reads, and counting
/// copies of it as one) of [`PROLOGUE_OPS`], whose other operands are not computed from `s`.
fn prologue_step(graph: &GraphProto, index: &GraphIndex, s: TensorId) -> Option<TensorId> {
    let readers = value_readers(graph, index, s);
    // Copies of one node count as one reader (ONNX Runtime's optimiser gives each consumer of a
    // dequantised tensor a DequantizeLinear of its own); [`stream_views`] takes the others' outputs.
    let (node, slot) = *readers.first()?;
    if !readers.iter().all(|&(other, _)| same_computation(&graph.node[node], &graph.node[other])) {
        return None;
    }
    if !PROLOGUE_OPS.contains(&graph.node[node].op_type()) {
        return None;
    }
    let others_constant = index.inputs(node).iter().enumerate().all(|(i, input)| {
        i == slot || input.is_none_or(|t| forward_region(graph, index, &[s], t).is_empty() && t != s)
    });
    others_constant.then(|| index.output(node, 0))?
}

/// The nodes reading `t`, for messages.
fn readers(graph: &GraphProto, index: &GraphIndex, t: TensorId) -> String {
    let names: Vec<String> = index
        .consumers(t)
        .iter()
        .take(4)
        .map(|&(c, _)| format!("node {:?} ({})", graph.node[c].name(), graph.node[c].op_type()))
        .collect();
    if names.is_empty() { "nothing".to_string() } else { names.join(", ") }
}

struct BranchAnalysis {
    verdict: Verdict,
    dying: Vec<usize>,
    kv_inputs: Vec<TensorId>,
    kv_outputs: Vec<TensorId>,
}

/// Classifies a branch and measures what removing it frees: the nodes that die when the junction
/// stops reading the branch and the branch's graph outputs (its KV cache) are dropped. Refuses an
/// attention branch that cannot be replaced alone: one that computes an MLP after its attention,
/// or that produces a graph output other than a KV cache.
fn analyse_branch(
    graph: &GraphProto,
    index: &GraphIndex,
    live: &[bool],
    term: &Term,
) -> Result<BranchAnalysis> {
    let kv_outputs: Vec<TensorId> = index
        .graph_outputs
        .iter()
        .copied()
        .filter(|&o| index.producer(o).is_some_and(|(p, _)| term.region.binary_search(&p).is_ok()))
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
            let cut = (node, slot) == term.port;
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
    if matches!(verdict, Verdict::Attention(_)) {
        let branch = index.name(term.tensor);
        for &n in &dying {
            check_attention_inputs(&graph.node[n])?;
        }
        // Projections multiply by matrices; anything else is not a decoder this tool can replace.
        for &n in &dying {
            if matches!(graph.node[n].op_type(), "MatMul" | "Gemm")
                && let Some(weight) = index.input(n, 1).and_then(|w| index.constant_source(graph, w))
            {
                ensure!(
                    weight.dims.len() == 2,
                    "the attention branch {branch:?} multiplies at node {:?} ({}) by weight {:?} of rank {}, not 2: \
                     not a projection this tool can replace",
                    graph.node[n].name(),
                    graph.node[n].op_type(),
                    weight.name(),
                    weight.dims.len()
                );
            }
        }
        for &o in &kv_outputs {
            let declared = graph.output.iter().find(|v| v.name() == index.name(o)).and_then(value_type);
            if let Some((dtype, dims)) = declared
                && !(dtype.is_float() && dims.len() == 4)
            {
                bail!(
                    "the attention branch {branch:?} produces graph output {:?} ({dtype}, {} dims), which is \
                     not a KV cache: replacing the branch would remove it",
                    index.name(o),
                    dims.len()
                );
            }
        }
        let products = weight_products_after_attention(graph, index, &dying, term.tensor);
        if products > 1 {
            bail!(
                "the attention branch {branch:?} (joining at node {:?}) multiplies by {products} weight matrices \
                 after its attention, where an output projection is one: it holds more than attention (an MLP?) \
                 and cannot be replaced alone",
                graph.node[term.port.0].name()
            );
        }
    }
    Ok(BranchAnalysis { verdict, dying, kv_inputs, kv_outputs })
}

/// Fails for a fused attention node without the inputs its operator requires (ONNX Runtime would
/// refuse the graph; a rewrite must not pass it on).
fn check_attention_inputs(node: &NodeProto) -> Result<()> {
    let required: &[usize] = match node.op_type() {
        // query, (key, value), past key, past value, seqlens_k, total_sequence_length
        "GroupQueryAttention" => &[0, 5, 6],
        "MultiHeadAttention" | "PackedMultiHeadAttention" | "DecoderMaskedMultiHeadAttention" => &[0],
        // com.microsoft::Attention: input, weights; ai.onnx::Attention: Q, K, V
        "Attention" if node.domain() == "com.microsoft" => &[0, 1],
        "Attention" => &[0, 1, 2],
        _ => &[],
    };
    for &slot in required {
        ensure!(
            node.input.get(slot).is_some_and(|i| !i.is_empty()),
            "node {:?} ({}) lacks its required input {slot}",
            node.name(),
            node.op_type()
        );
    }
    Ok(())
}

/// The constant-weight products on the way from a branch's attention (its Softmax or fused
/// attention op) to the branch tensor `y`: the output projection, and whatever else follows.
fn weight_products_after_attention(
    graph: &GraphProto,
    index: &GraphIndex,
    dying: &[usize],
    y: TensorId,
) -> usize {
    let cores: Vec<TensorId> = dying
        .iter()
        .filter(|&&n| {
            let op = graph.node[n].op_type();
            op == "Softmax" || FusedAttention::from_op(op).is_some()
        })
        .flat_map(|&n| index.outputs(n).iter().flatten().copied())
        .collect();
    forward_region(graph, index, &cores, y)
        .into_iter()
        .filter(|&n| {
            matches!(
                graph.node[n].op_type(),
                "MatMul" | "Gemm" | "FusedMatMul" | "MatMulNBits" | "MatMulInteger"
            ) && index.input(n, 1).is_some_and(|w| index.constant_source(graph, w).is_some())
        })
        .count()
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
        // Dequantised values take the scale's type.
        "DequantizeLinear" => stream_dtype(graph, index, index.input(node, 1)?),
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
    let declared = declared
        .and_then(value_type)
        .and_then(|(_, dims)| dims.last().copied().flatten())
        .filter(|&d| d > 0)
        .map(|d| d as u64);
    let embedding = index
        .producer(start)
        .and_then(|(node, _)| embedding_shape(graph, index, node))
        .map(|(_, cols)| cols as u64);
    let norm_scale = index.consumers(x).iter().find_map(|&(c, _)| {
        let n = &graph.node[c];
        let slot = if SKIP_NORM_OPS.contains(&n.op_type()) { 2 } else { 1 };
        let scale = index.input(c, slot).filter(|_| n.op_type().contains("Normalization"))?;
        let dims = &graph.initializer[index.initializer(scale)?].dims;
        (dims.len() == 1).then(|| dims[0] as u64)
    });
    let d = declared.or(embedding).or(norm_scale).with_context(|| {
        format!("cannot tell the hidden size of {name:?}: no declared shape, embedding table or norm scale")
    })?;
    // Where the graph says it twice, both must agree: a damaged declaration would size every
    // statistic (d² values per matrix) after it.
    if let (Some(a), Some(b)) = (declared, embedding.or(norm_scale)) {
        ensure!(a == b, "{name:?} is declared {a} wide, but the embedding table or norm scale is {b} wide");
    }
    ensure!(
        d <= MAX_HIDDEN_SIZE,
        "{name:?} is {d} wide: more than any decoder's hidden size ({MAX_HIDDEN_SIZE})"
    );
    Ok(d as usize)
}

/// The widest residual stream this tool accepts (the largest decoders have d ≈ 2¹⁴).
const MAX_HIDDEN_SIZE: u64 = 1 << 17;

/// The number of rows of the embedding table the stream starts from.
fn embedding_rows(graph: &GraphProto, index: &GraphIndex, start: TensorId) -> Option<usize> {
    let (node, _) = index.producer(start)?;
    embedding_shape(graph, index, node).map(|(rows, _)| rows)
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
        model_of(nodes)
    }

    /// A model of `nodes`; every tensor they read that no node produces (but the ids) is an
    /// initializer, sized by its name (`*embed`/`*wpe` [32, 8], `lm_head` [8, 32], `*w1` [8, 16],
    /// `*w2` [16, 8], other `*w*` [8, 8], `*g*` [8], anything else a scalar).
    fn model_of(nodes: Vec<NodeProto>) -> Model {
        let produced: HashSet<&str> =
            nodes.iter().flat_map(|n| n.output.iter().map(String::as_str)).collect();
        let mut inits: Vec<TensorProto> = Vec::new();
        for input in nodes.iter().flat_map(|n| &n.input) {
            let name = input.as_str();
            if produced.contains(name) || name.ends_with("_ids") || inits.iter().any(|t| t.name() == name) {
                continue;
            }
            let last = name.rsplit('.').next().unwrap();
            let dims: Vec<i64> = match last {
                "embed" | "wpe" => vec![32, 8],
                "lm_head" => vec![8, 32],
                "w1" => vec![8, 16],
                "w2" => vec![16, 8],
                l if l.starts_with('w') => vec![8, 8],
                l if l.starts_with('g') => vec![8],
                _ => vec![],
            };
            inits.push(TensorProto {
                name: Some(name.into()),
                dims,
                data_type: Some(1),
                ..Default::default()
            });
        }
        let graph = GraphProto {
            node: nodes,
            initializer: inits,
            input: vec![
                tensor_value("input_ids", DType::I64, None),
                tensor_value("position_ids", DType::I64, None),
            ],
            output: vec![tensor_value("logits", DType::F32, None)],
            ..Default::default()
        };
        let proto = ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
            graph: Some(graph),
            ..Default::default()
        };
        Model { path: "synthetic.onnx".into(), proto }
    }

    /// `p.o = MatMul(softmax(q kᵀ) v, p.wo)` of `p.n = x · p.g`.
    fn attention(p: &str, x: &str) -> Vec<NodeProto> {
        let t = |s: &str| format!("{p}.{s}");
        vec![
            node("Mul", &[x, &t("g")], &t("n")),
            node("MatMul", &[&t("n"), &t("wq")], &t("q")),
            node("MatMul", &[&t("n"), &t("wk")], &t("k")),
            node("MatMul", &[&t("n"), &t("wv")], &t("v")),
            node("Transpose", &[&t("k")], &t("kt")),
            node("MatMul", &[&t("q"), &t("kt")], &t("scores")),
            node("Softmax", &[&t("scores")], &t("probs")),
            node("MatMul", &[&t("probs"), &t("v")], &t("a")),
            node("MatMul", &[&t("a"), &t("wo")], &t("o")),
        ]
    }

    /// `p.down = MatMul(Relu(MatMul(x · p.g, p.w1)), p.w2)`.
    fn mlp(p: &str, x: &str) -> Vec<NodeProto> {
        let t = |s: &str| format!("{p}.{s}");
        vec![
            node("Mul", &[x, &t("g")], &t("n")),
            node("MatMul", &[&t("n"), &t("w1")], &t("up")),
            node("Relu", &[&t("up")], &t("act")),
            node("MatMul", &[&t("act"), &t("w2")], &t("down")),
        ]
    }

    /// Two layers from `h0`, each built by `layer(prefix, input, output)`, then the LM head.
    fn two_layers(prologue: Vec<NodeProto>, layer: impl Fn(&str, &str, &str) -> Vec<NodeProto>) -> Model {
        let mut nodes = prologue;
        nodes.extend(layer("l0", "h0", "h1"));
        nodes.extend(layer("l1", "h1", "h2"));
        nodes.push(node("MatMul", &["h2", "lm_head"], "logits"));
        model_of(nodes)
    }

    fn embedding() -> Vec<NodeProto> {
        vec![node("Gather", &["embed", "input_ids"], "h0")]
    }

    /// GPT-NeoX, Phi-2, Falcon: `h' = h + (mlp(h) + attn(h))`.
    fn parallel_sum_layer(p: &str, x: &str, out: &str) -> Vec<NodeProto> {
        let mut nodes = attention(&format!("{p}.attn"), x);
        nodes.extend(mlp(&format!("{p}.mlp"), x));
        nodes.push(node(
            "Add",
            &[&format!("{p}.mlp.down"), &format!("{p}.attn.o")],
            &format!("{p}.branches"),
        ));
        nodes.push(node("Add", &[&format!("{p}.branches"), x], out));
        nodes
    }

    /// Cohere: `h' = (h + attn(h)) + mlp(h)`.
    fn parallel_chain_layer(p: &str, x: &str, out: &str) -> Vec<NodeProto> {
        let mut nodes = attention(&format!("{p}.attn"), x);
        nodes.extend(mlp(&format!("{p}.mlp"), x));
        nodes.push(node("Add", &[x, &format!("{p}.attn.o")], &format!("{p}.mid")));
        nodes.push(node("Add", &[&format!("{p}.mid"), &format!("{p}.mlp.down")], out));
        nodes
    }

    /// Llama: `m = h + attn(h)`, `h' = m + mlp(m)`.
    fn sequential_layer(p: &str, x: &str, out: &str) -> Vec<NodeProto> {
        let mid = format!("{p}.mid");
        let mut nodes = attention(&format!("{p}.attn"), x);
        nodes.push(node("Add", &[x, &format!("{p}.attn.o")], &mid));
        nodes.extend(mlp(&format!("{p}.mlp"), &mid));
        nodes.push(node("Add", &[&mid, &format!("{p}.mlp.down")], out));
        nodes
    }

    #[test]
    fn in_parallel_blocks_y_is_the_attention_term_alone() {
        for layer in [parallel_sum_layer, parallel_chain_layer] {
            let blocks = find_blocks(&two_layers(embedding(), layer)).unwrap();
            assert_eq!(blocks.layers.len(), 2);
            for (l, block) in blocks.layers.iter().enumerate() {
                assert_eq!(
                    (block.x.as_str(), block.y.as_str()),
                    (["h0", "h1"][l], format!("l{l}.attn.o").as_str())
                );
                assert!(block.parallel);
                // Only the attention dies: Mul (its own norm), q, k, v, Transpose, scores, Softmax, PV, o.
                assert_eq!(block.nodes, 9, "layer {l}");
            }
            let mlps =
                blocks.branches.iter().filter(|b| matches!(b.verdict, Verdict::NotAttention { .. })).count();
            assert_eq!(mlps, 2, "each block's MLP is a branch of its own");
        }
        let sequential = find_blocks(&two_layers(embedding(), sequential_layer)).unwrap();
        assert!(sequential.layers.iter().all(|b| !b.parallel));
        assert_eq!(sequential.layers[1].x, "h1");
    }

    fn to_f16(mut cast: NodeProto) -> NodeProto {
        cast.attribute.push(crate::onnx::proto::AttributeProto {
            name: Some("to".into()),
            i: Some(DType::F16.onnx_code().into()),
            ..Default::default()
        });
        cast
    }

    #[test]
    fn a_prologue_of_scales_casts_and_position_embeddings_leads_to_the_first_block() {
        let gemma = vec![
            node("Gather", &["embed", "input_ids"], "tok"),
            node("Mul", &["tok", "normalizer"], "scaled"),
            to_f16(node("Cast", &["scaled"], "h0")),
        ];
        let gpt2 = vec![
            node("Gather", &["embed", "input_ids"], "tok"),
            node("Shape", &["tok"], "tok_shape"),
            node("Gather", &["wpe", "position_ids"], "pos"),
            node("Add", &["tok", "pos"], "h0"),
        ];
        let bloom = vec![
            node("Gather", &["embed", "input_ids"], "tok"),
            node("LayerNormalization", &["tok", "g_emb", "b_emb"], "h0"),
        ];
        // ONNX Runtime's dynamic quantiser: an int8 table, its gathered rows dequantised.
        let dynamic_int8 = vec![
            node("Gather", &["embed", "input_ids"], "tok_quantized"),
            node("DequantizeLinear", &["tok_quantized", "embed_scale", "embed_zero_point"], "h0"),
        ];
        for prologue in [gemma, gpt2, bloom, dynamic_int8] {
            let blocks = find_blocks(&two_layers(prologue, sequential_layer)).unwrap();
            assert_eq!(blocks.layers.len(), 2);
            assert_eq!(blocks.layers[0].x, "h0");
            assert_eq!(blocks.vocab_size, Some(32));
        }
    }

    #[test]
    fn an_attention_branch_that_also_computes_an_mlp_is_refused() {
        // `h' = h + mlp(attn(h))`: replacing the branch would replace the MLP too.
        let layer = |p: &str, x: &str, out: &str| {
            let mut nodes = attention(&format!("{p}.attn"), x);
            nodes.extend(mlp(&format!("{p}.mlp"), &format!("{p}.attn.o")));
            nodes.push(node("Add", &[x, &format!("{p}.mlp.down")], out));
            nodes
        };
        let err = find_blocks(&two_layers(embedding(), layer)).unwrap_err().to_string();
        assert!(err.contains("multiplies by 3 weight matrices after its attention"), "{err}");
    }

    #[test]
    fn a_block_adding_two_attention_branches_is_refused() {
        let layer = |p: &str, x: &str, out: &str| {
            let mut nodes = attention(&format!("{p}.a"), x);
            nodes.extend(attention(&format!("{p}.b"), x));
            nodes.push(node("Add", &[&format!("{p}.a.o"), &format!("{p}.b.o")], &format!("{p}.sum")));
            nodes.push(node("Add", &[x, &format!("{p}.sum")], out));
            nodes
        };
        let err = find_blocks(&two_layers(embedding(), layer)).unwrap_err().to_string();
        assert!(err.contains("adds two attention branches"), "{err}");
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
