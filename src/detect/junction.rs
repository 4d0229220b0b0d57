//! Residual junctions, where branches computed from the stream are added back into it, and the
//! terms a junction adds.

use super::stream::stream_views;
use super::view::GraphView;
use crate::onnx::{Port, TensorId};

/// Junctions that fuse the residual add with the next norm; the sum is on output 3.
pub(super) const SKIP_NORM_OPS: &[&str] = &["SkipLayerNormalization", "SkipSimplifiedLayerNormalization"];

/// One residual block found on the walk from stream tensor `s`: the terms added to the stream
/// (one for a sequential block; several for a parallel one, where attention and MLP read the same
/// stream and both are added), and the stream after them (absent for a final Skip norm whose sum is
/// unused).
pub(super) struct Join {
    pub(super) terms: Vec<Term>,
    pub(super) out: Option<TensorId>,
    /// The last junction node's two summed inputs: the one reading the stream (or the stream plus
    /// the terms before, in an `Add` chain) and the one reading the branch. A map that replaces
    /// the whole block rewires both.
    pub(super) stream_side: Port,
    pub(super) branch_side: Port,
}

/// A branch tensor computed from the stream and added into it at input `port` = (node, slot).
pub(super) struct Term {
    pub(super) tensor: TensorId,
    pub(super) port: Port,
    /// Nodes computed from the stream on the way to the branch tensor.
    pub(super) region: Vec<usize>,
}

/// Where input `slot` of `node` is one operand of a residual sum, `s' = Add(a, b)` or a Skip norm
/// (inputs 0 and 1 summed): the other operand's slot and the sum (output 0 of an `Add`, 3 of a Skip
/// norm; absent where the graph leaves it unused).
fn junction_sum(g: &GraphView, node: usize, slot: usize) -> Option<(usize, Option<TensorId>)> {
    let n = g.node(node);
    let sum_slot = match n.op_type() {
        "Add" if slot < 2 && n.input.len() == 2 => 0,
        op if SKIP_NORM_OPS.contains(&op) && slot < 2 => 3,
        _ => return None,
    };
    Some((1 - slot, g.index.output(node, sum_slot)))
}

/// The block that adds branches computed from stream tensor `s` back into it.
///
/// The junction is `s' = Add(s, t)` or a Skip norm, where `t` is computed from `s` (by value, not
/// only by shape); the widest such branch is taken. `t` is split into terms where it is itself a
/// sum of branches of `s` (`t = attn + mlp`, GPT-NeoX/Phi-2/Falcon), and the block goes on while
/// its sum feeds only another `Add` of a branch of `s` (`s' = (s + attn) + mlp`, Cohere).
pub(super) fn next_join(g: &GraphView, s: TensorId) -> Option<Join> {
    let index = g.index;
    let views = stream_views(g, s);
    let mut best: Option<(Term, Option<TensorId>, Port)> = None;
    for &Port { node, slot } in views.iter().flat_map(|&v| index.consumers(v)) {
        let Some((branch_slot, out)) = junction_sum(g, node, slot) else { continue };
        let Some(branch) = index.input(node, branch_slot) else { continue };
        if views.contains(&branch) {
            continue; // s + s
        }
        let region = g.forward_region(&views, branch);
        if region.is_empty() {
            continue; // `t` does not depend on `s`: an Add of a constant or of another stream.
        }
        if best.as_ref().is_none_or(|(b, _, _)| region.len() > b.region.len()) {
            let term = Term { tensor: branch, port: Port { node, slot: branch_slot }, region };
            best = Some((term, out, Port { node, slot }));
        }
    }
    let (branch, mut out, mut stream_side) = best?;
    let mut branch_side = branch.port;
    let mut terms = Vec::new();
    split_terms(g, &views, branch, &mut terms);
    // `s' = (s + a) + b` with `b` computed from `s`, not from `s + a`: one parallel block.
    while let Some(sum) = out {
        let readers = g.value_readers(sum);
        let &[Port { node: next, slot }] = readers.as_slice() else { break };
        let Some((other_slot, next_out)) = junction_sum(g, next, slot) else { break };
        let Some(other) = index.input(next, other_slot) else { break };
        let region = g.forward_region(&views, other);
        if region.is_empty() || !g.forward_region(&stream_views(g, sum), other).is_empty() {
            break;
        }
        branch_side = Port { node: next, slot: other_slot };
        stream_side = Port { node: next, slot };
        split_terms(g, &views, Term { tensor: other, port: branch_side, region }, &mut terms);
        out = next_out;
    }
    Some(Join { terms, out, stream_side, branch_side })
}

/// Splits a branch that is a sum of branches of the stream (`Add(a, b)`, both computed from the
/// stream, read only by the sum) into its terms.
fn split_terms(g: &GraphView, views: &[TensorId], term: Term, out: &mut Vec<Term>) {
    let index = g.index;
    if let Some(Port { node, .. }) = index.producer(term.tensor)
        && g.node(node).op_type() == "Add"
        && index.consumers(term.tensor).len() == 1
        && let (Some(a), Some(b)) = (index.input(node, 0), index.input(node, 1))
    {
        let (region_a, region_b) = (g.forward_region(views, a), g.forward_region(views, b));
        if !region_a.is_empty() && !region_b.is_empty() {
            split_terms(g, views, Term { tensor: a, port: Port { node, slot: 0 }, region: region_a }, out);
            split_terms(g, views, Term { tensor: b, port: Port { node, slot: 1 }, region: region_b }, out);
            return;
        }
    }
    out.push(term);
}
