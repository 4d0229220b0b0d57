//! What a residual branch holds: whether it is attention, what dies with it, and whether it can be
//! replaced alone.

use std::collections::HashSet;

use anyhow::{Result, bail, ensure};

use super::fused::{FusedAttention, required_inputs};
use super::junction::Term;
use super::view::GraphView;
use super::{AttentionKind, Verdict};
use crate::onnx::proto::NodeProto;
use crate::onnx::{Port, TensorId, value_type};

/// A branch's verdict, the nodes that die with it, and its KV-cache inputs and outputs.
pub(super) struct BranchAnalysis {
    pub(super) verdict: Verdict,
    pub(super) dying: Vec<usize>,
    pub(super) kv_inputs: Vec<TensorId>,
    pub(super) kv_outputs: Vec<TensorId>,
}

/// Classifies a branch and measures what removing it frees: the nodes that die when the junction
/// stops reading the branch and the branch's graph outputs (its KV cache) are dropped. Refuses an
/// attention branch that cannot be replaced alone: one that computes an MLP after its attention,
/// or that produces a graph output other than a KV cache.
pub(super) fn analyse_branch(g: &GraphView, live: &[bool], term: &Term) -> Result<BranchAnalysis> {
    let (graph, index) = (g.graph, g.index);
    let kv_outputs: Vec<TensorId> = index
        .graph_outputs
        .iter()
        .copied()
        .filter(|&o| {
            index.producer(o).is_some_and(|Port { node: p, .. }| term.region.binary_search(&p).is_ok())
        })
        .collect();

    // Liveness without the branch: roots are the other graph outputs, and the junction no longer
    // reads the branch tensor.
    let mut still_live = vec![false; index.node_count()];
    let mut stack: Vec<TensorId> =
        index.graph_outputs.iter().copied().filter(|o| !kv_outputs.contains(o)).collect();
    let mut seen: HashSet<TensorId> = stack.iter().copied().collect();
    while let Some(t) = stack.pop() {
        let Some(Port { node, .. }) = index.producer(t) else { continue };
        if still_live[node] {
            continue;
        }
        still_live[node] = true;
        for (slot, input) in index.inputs(node).iter().enumerate() {
            let Some(input) = *input else { continue };
            let cut = Port { node, slot } == term.port;
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
    kv_inputs.sort_by_key(|t| index.graph_inputs.iter().position(|i| i == t));

    let fused = dying.iter().find_map(|&n| FusedAttention::from_op(g.node(n).op_type()));
    let softmax_into_matmul =
        dying.iter().any(|&n| g.node(n).op_type() == "Softmax" && feeds_matmul(g, n, 3));
    let verdict = if let Some(op) = fused {
        Verdict::Attention(AttentionKind::Fused(op))
    } else if softmax_into_matmul || !kv_inputs.is_empty() {
        Verdict::Attention(AttentionKind::Decomposed)
    } else {
        Verdict::NotAttention { ops: g.op_histogram(&dying) }
    };
    if matches!(verdict, Verdict::Attention(_)) {
        let branch = index.name(term.tensor);
        for &n in &dying {
            check_attention_inputs(g.node(n))?;
        }
        // Projections multiply by matrices; anything else is not a decoder this tool can replace.
        for &n in &dying {
            if matches!(g.node(n).op_type(), "MatMul" | "Gemm")
                && let Some(weight) = index.input(n, 1).and_then(|w| g.constant_source(w))
            {
                ensure!(
                    weight.dims.len() == 2,
                    "the attention branch {branch:?} multiplies at node {:?} ({}) by weight {:?} of rank {}, not 2: \
                     not a projection this tool can replace",
                    g.node(n).name(),
                    g.node(n).op_type(),
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
        let products = weight_products_after_attention(g, &dying, term.tensor);
        if products > 1 {
            bail!(
                "the attention branch {branch:?} (joining at node {:?}) multiplies by {products} weight matrices \
                 after its attention, where an output projection is one: it holds more than attention (an MLP?) \
                 and cannot be replaced alone",
                g.node(term.port.node).name()
            );
        }
    }
    Ok(BranchAnalysis { verdict, dying, kv_inputs, kv_outputs })
}

/// Fails for a fused attention node without the inputs its operator requires (ONNX Runtime would
/// refuse the graph; a rewrite must not pass it on).
fn check_attention_inputs(node: &NodeProto) -> Result<()> {
    for &slot in required_inputs(node) {
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
fn weight_products_after_attention(g: &GraphView, dying: &[usize], y: TensorId) -> usize {
    let cores: Vec<TensorId> = dying
        .iter()
        .filter(|&&n| {
            let op = g.node(n).op_type();
            op == "Softmax" || FusedAttention::from_op(op).is_some()
        })
        .flat_map(|&n| g.index.outputs(n).iter().flatten().copied())
        .collect();
    g.forward_region(&cores, y)
        .into_iter()
        .filter(|&n| {
            matches!(g.node(n).op_type(), "MatMul" | "Gemm" | "FusedMatMul" | "MatMulNBits" | "MatMulInteger")
                && g.index.input(n, 1).is_some_and(|w| g.constant_source(w).is_some())
        })
        .count()
}

/// Whether node `n`'s output reaches a MatMul through at most `depth` cheap elementwise ops.
fn feeds_matmul(g: &GraphView, n: usize, depth: usize) -> bool {
    g.index.outputs(n).iter().flatten().any(|&t| {
        g.index.consumers(t).iter().any(|&Port { node: c, .. }| match g.node(c).op_type() {
            "MatMul" | "Einsum" => true,
            "Cast" | "Where" | "Dropout" | "Identity" if depth > 0 => feeds_matmul(g, c, depth - 1),
            _ => false,
        })
    })
}
