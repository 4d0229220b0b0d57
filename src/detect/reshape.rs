//! `Reshape`s that keep the residual stream's rows, so that the walk sees through them: OPT runs the
//! MLP half of each layer on the stream flattened to `[batch·sequence, d]` and reshapes it back after
//! that half's junction. Proven from the shape computation, not from names:
//! - a *flatten* reshapes `t` to `[-1, last dimension of t]`;
//! - a *restore* reshapes a tensor computed from a flatten's output back to exactly the shape of that
//!   flatten's input (`[Shape(a)[0], Shape(a)[1], ...]`, each dimension in order).
//!
//! Both keep every row (one token's `d` values) in place: what the stream carries is the same, only
//! its leading dimensions are grouped differently. Maps that read and write the stream work row by
//! row (`MatMul` on the last axis), so they read and write at whichever shape the junction uses.

use super::view::GraphView;
use crate::onnx::proto::TensorProto;
use crate::onnx::{Port, TensorId};

/// One element of a shape vector computed in the graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dim {
    /// A constant.
    Const(i64),
    /// Dimension `axis` of a tensor (negative: from the end).
    Of(TensorId, i64),
}

/// A 1-D integer tensor computed from shapes: its elements, or the whole shape of a tensor whose
/// rank is not known.
#[derive(Clone, Debug)]
enum Value {
    Elements(Vec<Dim>),
    ShapeOf(TensorId),
}

/// How deep the evaluation follows a shape computation (OPT's is 5 nodes deep).
const MAX_DEPTH: usize = 12;

/// The integer values of a constant tensor.
fn ints(t: &TensorProto) -> Option<Vec<i64>> {
    use crate::onnx::DType;
    if !t.int64_data.is_empty() {
        return Some(t.int64_data.clone());
    }
    if !t.int32_data.is_empty() {
        return Some(t.int32_data.iter().map(|&v| i64::from(v)).collect());
    }
    let raw = t.raw_data.as_deref()?;
    match DType::from_onnx(t.data_type()) {
        DType::I64 => {
            Some(raw.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes"))).collect())
        }
        DType::I32 => Some(
            raw.chunks_exact(4)
                .map(|b| i64::from(i32::from_le_bytes(b.try_into().expect("4 bytes"))))
                .collect(),
        ),
        _ => None,
    }
}

fn constant(g: &GraphView, t: TensorId) -> Option<Vec<i64>> {
    if let Some(i) = g.index.initializer(t) {
        return ints(&g.graph.initializer[i]);
    }
    let Port { node, .. } = g.index.producer(t)?;
    let n = g.node(node);
    if n.op_type() != "Constant" {
        return None;
    }
    let attr = n.attribute.first()?;
    match attr.name() {
        "value" => ints(attr.t.as_ref()?),
        "value_int" => attr.i.map(|v| vec![v]),
        "value_ints" => Some(attr.ints.clone()),
        _ => None,
    }
}

/// What the integer tensor `t` holds, in terms of constants and other tensors' dimensions.
fn evaluate(g: &GraphView, t: TensorId, depth: usize) -> Option<Value> {
    if let Some(values) = constant(g, t) {
        return Some(Value::Elements(values.into_iter().map(Dim::Const).collect()));
    }
    if depth == 0 {
        return None;
    }
    let Port { node, .. } = g.index.producer(t)?;
    let n = g.node(node);
    let input = |slot: usize| g.index.input(node, slot);
    let elements = |slot: usize| match evaluate(g, input(slot)?, depth - 1)? {
        Value::Elements(e) => Some(e),
        Value::ShapeOf(_) => None,
    };
    match n.op_type() {
        "Shape" if n.attribute.is_empty() => Some(Value::ShapeOf(input(0)?)),
        "Cast" | "Identity" | "Squeeze" | "Unsqueeze" => {
            // Scalars and one-element vectors alike: the elements are what matters.
            evaluate(g, input(0)?, depth - 1)
        }
        "Concat" => {
            let mut out = Vec::new();
            for slot in 0..n.input.len() {
                out.extend(elements(slot)?);
            }
            Some(Value::Elements(out))
        }
        "Gather" => {
            let indices = constant(g, input(1)?)?;
            match evaluate(g, input(0)?, depth - 1)? {
                Value::ShapeOf(of) => {
                    Some(Value::Elements(indices.iter().map(|&i| Dim::Of(of, i)).collect()))
                }
                Value::Elements(e) => {
                    let len = e.len() as i64;
                    let pick =
                        |i: i64| e.get(usize::try_from(if i < 0 { i + len } else { i }).ok()?).copied();
                    Some(Value::Elements(indices.iter().map(|&i| pick(i)).collect::<Option<_>>()?))
                }
            }
        }
        "Slice" => {
            let (starts, ends) = (constant(g, input(1)?)?, constant(g, input(2)?)?);
            let axes = input(3).map_or(Some(vec![0]), |a| constant(g, a))?;
            let steps = input(4).map_or(Some(vec![1]), |s| constant(g, s))?;
            if starts.len() != 1 || ends.len() != 1 || axes != [0] || steps != [1] {
                return None;
            }
            let (start, end) = (starts[0], ends[0]);
            match evaluate(g, input(0)?, depth - 1)? {
                // The last |start| dimensions of a shape of unknown rank (`x.shape[-1:]`).
                Value::ShapeOf(of) if start < 0 && end >= i64::from(i32::MAX) => {
                    Some(Value::Elements((start..0).map(|i| Dim::Of(of, i)).collect()))
                }
                Value::ShapeOf(of) if start >= 0 && end >= start && end < i64::from(i32::MAX) => {
                    Some(Value::Elements((start..end).map(|i| Dim::Of(of, i)).collect()))
                }
                Value::ShapeOf(_) => None,
                Value::Elements(e) => {
                    let len = e.len() as i64;
                    let clamp = |v: i64| (if v < 0 { v + len } else { v }).clamp(0, len) as usize;
                    Some(Value::Elements(e[clamp(start)..clamp(end).max(clamp(start))].to_vec()))
                }
            }
        }
        _ => None,
    }
}

/// The target shape of Reshape node `node`, where it can be read.
fn target(g: &GraphView, node: usize) -> Option<Vec<Dim>> {
    match evaluate(g, g.index.input(node, 1)?, MAX_DEPTH)? {
        Value::Elements(e) => Some(e),
        Value::ShapeOf(_) => None,
    }
}

/// Whether Reshape node `node` flattens its input `t` to `[-1, last dimension of t]`.
pub(super) fn is_flatten(g: &GraphView, node: usize) -> bool {
    let Some(input) = g.index.input(node, 0) else { return false };
    g.node(node).op_type() == "Reshape"
        && matches!(target(g, node).as_deref(), Some([Dim::Const(-1), Dim::Of(of, -1)]) if *of == input)
}

/// Whether Reshape node `node` restores the shape a flatten took away: its target is every
/// dimension of a flatten's input `a`, in order (as many as `a` has: at least 2), and its input is
/// computed from that flatten's output.
pub(super) fn is_restore(g: &GraphView, node: usize) -> bool {
    if g.node(node).op_type() != "Reshape" {
        return false;
    }
    let (Some(input), Some(dims)) = (g.index.input(node, 0), target(g, node)) else { return false };
    let Some(Dim::Of(a, 0)) = dims.first().copied() else { return false };
    let in_order = dims.len() >= 2 && dims.iter().enumerate().all(|(i, d)| *d == Dim::Of(a, i as i64));
    if !in_order {
        return false;
    }
    // The flatten of `a` this undoes, upstream of the restore's input.
    let upstream = g.index.ancestors(&[input]);
    g.index.consumers(a).iter().any(|&Port { node: f, slot }| slot == 0 && upstream[f] && is_flatten(g, f))
}
