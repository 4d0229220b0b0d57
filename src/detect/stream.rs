//! The residual stream itself: where it starts (the token embedding, then a prologue), the tensors
//! that carry its value (its views), where the walk stops, and its element type and width.

use anyhow::{Context, Result, bail, ensure};

use super::junction::{SKIP_NORM_OPS, next_join};
use super::view::GraphView;
use crate::onnx::{DType, Port, TensorId, value_type};

/// The tensor the residual stream starts from: the token embedding (a `Gather` of an initializer by
/// integer ids), or a float `inputs_embeds` input.
pub(super) fn stream_start(g: &GraphView) -> Result<TensorId> {
    let (graph, index) = (g.graph, g.index);
    let mut candidates = Vec::new();
    for n in 0..graph.node.len() {
        let (Some(ids), Some(out)) = (index.input(n, 1), index.output(n, 0)) else {
            continue;
        };
        let Some((rows, cols)) = embedding_shape(g, n) else {
            continue;
        };
        // The ids must come from a graph input (possibly through casts): a gather of a constant
        // table by a computed index (rotary caches, shapes) is not an embedding.
        let ancestors = index.ancestors(&[ids]);
        let from_input = |inp: &TensorId| {
            index.consumers(*inp).iter().any(|&Port { node: c, .. }| ancestors[c] || c == n) && {
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
fn embedding_shape(g: &GraphView, node: usize) -> Option<(usize, usize)> {
    let n = g.node(node);
    let (rows, cols, dtype) = match n.op_type() {
        "Gather" | "GatherBlockQuantized" => embedding_table(g, g.index.input(node, 0)?)?,
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
fn embedding_table(g: &GraphView, table: TensorId) -> Option<(usize, usize, DType)> {
    let (graph, index) = (g.graph, g.index);
    if let Some(i) = index.initializer(table) {
        let t = &graph.initializer[i];
        let dims: Vec<usize> = t.dims.iter().map(|&d| usize::try_from(d).ok()).collect::<Option<_>>()?;
        return (dims.len() == 2).then(|| (dims[0], dims[1], DType::from_onnx(t.data_type())));
    }
    let Port { node, .. } = index.producer(table)?;
    let source = index.input(node, 0)?;
    match g.node(node).op_type() {
        "Transpose" => embedding_table(g, source).map(|(r, c, t)| (c, r, t)),
        "Cast" | "Identity" => embedding_table(g, source),
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

/// The number of rows of the embedding table the stream starts from.
pub(super) fn embedding_rows(g: &GraphView, start: TensorId) -> Option<usize> {
    let Port { node, .. } = g.index.producer(start)?;
    embedding_shape(g, node).map(|(rows, _)| rows)
}

/// Prologue steps allowed between the token embedding and the first block.
pub(super) const MAX_PROLOGUE: usize = 16;

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
    // A projection of a narrower embedding to the stream's width (OPT-350m's `project_in`).
    "MatMul",
];

/// Norms through which the stream passes between blocks in a post-norm model (OPT-350m, GPT-1:
/// `LayerNorm(h + attn(h))`): the normalised stream is what the next block reads.
const POST_NORM_OPS: &[&str] = &["LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"];

/// The next stream tensor of the prologue: `s` read by one node (besides shape reads, and counting
/// copies of it as one) of [`PROLOGUE_OPS`], whose other operands are not computed from `s`.
pub(super) fn prologue_step(g: &GraphView, s: TensorId) -> Option<TensorId> {
    step_through(g, s, PROLOGUE_OPS)
}

/// The normalised stream after a post-norm junction: `s` read by one norm alone (besides shape
/// reads), or by a short chain of them (a post-norm layer whose attention was dropped leaves its
/// norm behind the previous layer's), with more residual junctions after it. At the end of a
/// pre-norm stack the final norm is read the same way, but no junction follows it: the walk ends
/// there as before.
pub(super) fn post_norm_step(g: &GraphView, s: TensorId) -> Option<TensorId> {
    const MAX_NORMS: usize = 4;
    let mut at = s;
    for _ in 0..MAX_NORMS {
        // The norm may read a view of the sum (OPT-350m normalises its MLP half's sum once
        // reshaped back).
        let next = stream_views(g, at).into_iter().find_map(|v| step_through(g, v, POST_NORM_OPS))?;
        if next_join(g, next).is_some() {
            return Some(next);
        }
        at = next;
    }
    None
}

/// The output of the one node that reads `s` (copies of it counting as one), where it is one of
/// `ops` and its other operands are not computed from `s`.
fn step_through(g: &GraphView, s: TensorId, ops: &[&str]) -> Option<TensorId> {
    let readers = g.value_readers(s);
    // Copies of one node count as one reader (ONNX Runtime's optimiser gives each consumer of a
    // dequantised tensor a DequantizeLinear of its own); [`stream_views`] takes the others' outputs.
    let Port { node, slot } = *readers.first()?;
    if !readers.iter().all(|&Port { node: other, .. }| g.same_computation(node, other)) {
        return None;
    }
    if !ops.contains(&g.node(node).op_type()) {
        return None;
    }
    let others_constant =
        g.index.inputs(node).iter().enumerate().all(|(i, input)| {
            i == slot || input.is_none_or(|t| g.forward_region(&[s], t).is_empty() && t != s)
        });
    others_constant.then(|| g.index.output(node, 0))?
}

/// The tensors that carry the stream value `s` into a branch: `s` itself, the outputs of `Identity`
/// nodes, of `Reshape`s that keep every row (`reshape`: OPT's flattened MLP half), and of `Cast`s
/// that keep every value reading it (to its own type: TorchScript exports keep
/// the norm's `x.to(float32)` on the residual path even when it is a no-op; or wider: Optimum's
/// fp16 exports add the f16 embedding to an f32 residual stream), and, when `s` is the sum output
/// of a fused Skip norm, that node's normalised outputs (the norm is fused into the junction). A
/// narrowing Cast is a step of its own: it rounds the stream.
pub(super) fn stream_views(g: &GraphView, s: TensorId) -> Vec<TensorId> {
    let index = g.index;
    // Chains of them too (a dropped branch leaves the Cast that fed its junction in front of the
    // next one's), each view with its own type.
    let mut views = vec![(s, stream_dtype(g, s))];
    let mut next = 0;
    while next < views.len() {
        let (view, dtype) = views[next];
        next += 1;
        for &Port { node: c, .. } in index.consumers(view) {
            let n = g.node(c);
            let to = (n.op_type() == "Cast")
                .then(|| crate::onnx::attr_int(n, "to").map(|code| DType::from_onnx(code as i32)))
                .flatten();
            let keeps_values = match (dtype, to) {
                (Some(from), Some(to)) => from.widens_to(to),
                _ => true,
            };
            // A reshape that keeps every row: the same stream, its leading dimensions regrouped.
            let keeps_rows = n.op_type() == "Reshape"
                && index.input(c, 0) == Some(view)
                && (super::reshape::is_flatten(g, c) || super::reshape::is_restore(g, c));
            if (n.op_type() == "Identity" || (n.op_type() == "Cast" && keeps_values) || keeps_rows)
                && let Some(out) = index.output(c, 0).filter(|o| views.iter().all(|(v, _)| v != o))
            {
                views.push((out, to.or(dtype)));
            }
        }
    }
    let mut views: Vec<TensorId> = views.into_iter().map(|(v, _)| v).collect();
    // The same output of a copy of the node that made `s`: the same value.
    if let Some(Port { node: producer, slot }) = index.producer(s) {
        let first_input = index.input(producer, 0);
        let copies = first_input
            .map_or(&[][..], |i| index.consumers(i))
            .iter()
            .filter(|&&Port { node: c, .. }| c != producer && g.same_computation(producer, c));
        views.extend(copies.filter_map(|&Port { node: c, .. }| index.output(c, slot)).collect::<Vec<_>>());
    }
    if let Some(Port { node, slot: 3 }) = index.producer(s)
        && SKIP_NORM_OPS.contains(&g.node(node).op_type())
    {
        views.extend((0..3).filter_map(|slot| index.output(node, slot)));
    }
    views
}

/// Nodes an unknown operator on the stream may take before the next residual block shows.
const HIDDEN_STEPS: usize = 4;

/// Where the walk stopped at stream tensor `s`: a node that reads `s` and leads, through a chain of
/// at most [`HIDDEN_STEPS`] nodes each reading the last one's output, to another residual block
/// means the stream passes through an operator the walk does not know (a quantise/dequantise
/// pair, a custom op). Returns the first node of the chain. At the true end of the stream (the
/// final norm, the head) no residual block follows.
pub(super) fn stream_continues(g: &GraphView, s: TensorId) -> Option<usize> {
    for view in stream_views(g, s) {
        for Port { node: first, .. } in g.value_readers(view) {
            let mut t = g.index.output(first, 0);
            for _ in 0..HIDDEN_STEPS {
                let Some(tensor) = t else { break };
                if next_join(g, tensor).is_some() {
                    return Some(first);
                }
                let readers = g.value_readers(tensor);
                let &[Port { node: next, .. }] = readers.as_slice() else { break };
                t = g.index.output(next, 0);
            }
        }
    }
    None
}

/// The element type of a stream tensor: from value_info where the exporter wrote it, else by
/// following the stream back through the ops that keep its type.
pub(super) fn stream_dtype(g: &GraphView, t: TensorId) -> Option<DType> {
    let (graph, index) = (g.graph, g.index);
    let name = index.name(t);
    let declared =
        graph.value_info.iter().chain(&graph.input).chain(&graph.output).find(|v| v.name() == name);
    if let Some((dtype, _)) = declared.and_then(value_type) {
        return Some(dtype);
    }
    if let Some(i) = index.initializer(t) {
        return Some(DType::from_onnx(graph.initializer[i].data_type()));
    }
    let Port { node, .. } = index.producer(t)?;
    let n = g.node(node);
    match n.op_type() {
        "Cast" => crate::onnx::attr_int(n, "to").map(|c| DType::from_onnx(c as i32)),
        // Dequantised values take the scale's type.
        "DequantizeLinear" => stream_dtype(g, index.input(node, 1)?),
        // Gather (the embedding's table), Add and the norms keep their first input's type.
        _ => stream_dtype(g, index.input(node, 0)?),
    }
}

/// The widest residual stream this tool accepts (the largest decoders have d ≈ 2¹⁴).
const MAX_HIDDEN_SIZE: u64 = 1 << 17;

/// The width of the stream after the projection node `node` of the prologue (a `MatMul` by a
/// constant `[in, out]` matrix): `out`.
pub(super) fn projection_width(g: &GraphView, node: usize) -> Option<u64> {
    let weight = g.constant_source(g.index.input(node, 1)?)?;
    (g.node(node).op_type() == "MatMul" && weight.dims.len() == 2).then(|| weight.dims[1] as u64)
}

/// The hidden size: from the declared shape of X, else the embedding table's width (or, where the
/// prologue projects the embedding, `projected`), else the width of the first norm's scale.
pub(super) fn hidden_size(
    g: &GraphView,
    x: TensorId,
    start: TensorId,
    projected: Option<u64>,
) -> Result<usize> {
    let (graph, index) = (g.graph, g.index);
    let name = index.name(x);
    let declared = graph.value_info.iter().chain(&graph.input).find(|v| v.name() == name);
    let declared = declared
        .and_then(value_type)
        .and_then(|(_, dims)| dims.last().copied().flatten())
        .filter(|&d| d > 0)
        .map(|d| d as u64);
    let embedding = projected.or_else(|| {
        index
            .producer(start)
            .and_then(|Port { node, .. }| embedding_shape(g, node))
            .map(|(_, cols)| cols as u64)
    });
    let norm_scale = index.consumers(x).iter().find_map(|&Port { node: c, .. }| {
        let n = g.node(c);
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
