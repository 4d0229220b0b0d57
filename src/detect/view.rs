//! The graph as every step of the walk reads it: the graph with its index (built once per walk), and
//! the small queries the steps share.

use crate::onnx::proto::{GraphProto, NodeProto, TensorProto};
use crate::onnx::{GraphIndex, Port, TensorId};

/// A graph and its index, read together by every step of the walk.
pub(super) struct GraphView<'g> {
    pub(super) graph: &'g GraphProto,
    pub(super) index: &'g GraphIndex,
}

impl<'g> GraphView<'g> {
    /// Node `n` (a position in the graph).
    pub(super) fn node(&self, n: usize) -> &'g NodeProto {
        &self.graph.node[n]
    }

    /// The initializer behind `t`, through the ops exporters put between a weight and its use.
    pub(super) fn constant_source(&self, t: TensorId) -> Option<&'g TensorProto> {
        self.index.constant_source(self.graph, t)
    }

    /// Ops that read only a tensor's shape: what they compute does not depend on its values.
    pub(super) fn is_shape_only(&self, node: usize) -> bool {
        matches!(self.node(node).op_type(), "Shape" | "Size")
    }

    /// The nodes that read `t`'s values (not only its shape), with their input slots.
    pub(super) fn value_readers(&self, t: TensorId) -> Vec<Port> {
        self.index
            .consumers(t)
            .iter()
            .copied()
            .filter(|&Port { node: c, .. }| !self.is_shape_only(c))
            .collect()
    }

    /// Nodes reachable forward from `from`, by value (not through `Shape`), that `to` depends on.
    pub(super) fn forward_region(&self, from: &[TensorId], to: TensorId) -> Vec<usize> {
        let index = self.index;
        let needed = index.ancestors(&[to]);
        let mut in_region = vec![false; index.node_count()];
        let mut stack: Vec<TensorId> = from.to_vec();
        let mut region = Vec::new();
        while let Some(t) = stack.pop() {
            for &Port { node: c, .. } in index.consumers(t) {
                if needed[c] && !in_region[c] && !self.is_shape_only(c) {
                    in_region[c] = true;
                    region.push(c);
                    stack.extend(index.outputs(c).iter().flatten());
                }
            }
        }
        region.sort_unstable();
        region
    }

    /// Whether nodes `a` and `b` compute the same values: the same operator on the same inputs with
    /// the same attributes.
    pub(super) fn same_computation(&self, a: usize, b: usize) -> bool {
        let (a, b) = (self.node(a), self.node(b));
        a.op_type() == b.op_type()
            && a.domain() == b.domain()
            && a.input == b.input
            && a.attribute == b.attribute
    }

    /// The nodes reading `t`, for messages.
    pub(super) fn readers(&self, t: TensorId) -> String {
        let names: Vec<String> = self
            .index
            .consumers(t)
            .iter()
            .take(4)
            .map(|&Port { node: c, .. }| {
                format!("node {:?} ({})", self.node(c).name(), self.node(c).op_type())
            })
            .collect();
        if names.is_empty() { "nothing".to_string() } else { names.join(", ") }
    }

    /// The most frequent op types among `nodes`, for messages: `MatMul×3, Relu×1`.
    pub(super) fn op_histogram(&self, nodes: &[usize]) -> String {
        let mut counts: Vec<(&str, usize)> = Vec::new();
        for &n in nodes {
            let op = self.node(n).op_type();
            match counts.iter_mut().find(|(o, _)| *o == op) {
                Some((_, c)) => *c += 1,
                None => counts.push((op, 1)),
            }
        }
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let shown: Vec<String> = counts.iter().take(6).map(|(op, c)| format!("{op}×{c}")).collect();
        if shown.is_empty() { "none".to_string() } else { shown.join(", ") }
    }
}
