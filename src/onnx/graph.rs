//! The graph index: tensors interned to ids, with producers, consumers, topological order and dead-node
//! elimination. Built once per pass; everything else refers to tensors by `TensorId` and nodes by index.

use std::collections::{HashMap, HashSet, VecDeque};

use anyhow::{Result, bail};

use super::proto::{GraphProto, NodeProto};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(pub u32);

/// A node input or output position: input or output `slot` of the node at index `node`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Port {
    pub node: usize,
    pub slot: usize,
}

/// Producer/consumer maps over one `GraphProto`. Node indices are positions in `graph.node`.
pub struct GraphIndex {
    names: Vec<String>,
    ids: HashMap<String, TensorId>,
    producer: Vec<Option<Port>>,
    consumers: Vec<Vec<Port>>,
    node_inputs: Vec<Vec<Option<TensorId>>>,
    node_outputs: Vec<Vec<Option<TensorId>>>,
    /// Outer-scope tensors read by a node's subgraphs (If/Loop/Scan bodies).
    implicit_inputs: Vec<Vec<TensorId>>,
    pub graph_inputs: Vec<TensorId>,
    pub graph_outputs: Vec<TensorId>,
    initializers: HashMap<TensorId, usize>,
}

impl GraphIndex {
    pub fn new(graph: &GraphProto) -> Result<GraphIndex> {
        let mut index = GraphIndex {
            names: Vec::new(),
            ids: HashMap::new(),
            producer: Vec::new(),
            consumers: Vec::new(),
            node_inputs: Vec::with_capacity(graph.node.len()),
            node_outputs: Vec::with_capacity(graph.node.len()),
            implicit_inputs: Vec::with_capacity(graph.node.len()),
            graph_inputs: Vec::new(),
            graph_outputs: Vec::new(),
            initializers: HashMap::new(),
        };
        for (i, init) in graph.initializer.iter().enumerate() {
            let id = index.intern(init.name());
            index.initializers.insert(id, i);
        }
        index.graph_inputs = graph.input.iter().map(|v| index.intern(v.name())).collect();
        for (n, node) in graph.node.iter().enumerate() {
            let mut outputs = Vec::with_capacity(node.output.len());
            for (slot, name) in node.output.iter().enumerate() {
                if name.is_empty() {
                    outputs.push(None);
                    continue;
                }
                let id = index.intern(name);
                if let Some(Port { node: other, .. }) = index.producer[id.0 as usize] {
                    bail!(
                        "tensor {name:?} is produced twice: by node {:?} and node {:?}",
                        graph.node[other].name(),
                        node.name()
                    );
                }
                index.producer[id.0 as usize] = Some(Port { node: n, slot });
                outputs.push(Some(id));
            }
            index.node_outputs.push(outputs);
        }
        for (n, node) in graph.node.iter().enumerate() {
            let mut inputs = Vec::with_capacity(node.input.len());
            for (slot, name) in node.input.iter().enumerate() {
                if name.is_empty() {
                    inputs.push(None);
                    continue;
                }
                let id = index.intern(name);
                index.consumers[id.0 as usize].push(Port { node: n, slot });
                inputs.push(Some(id));
            }
            index.node_inputs.push(inputs);
            let mut implicit: Vec<TensorId> =
                subgraph_outer_reads(node).iter().map(|name| index.intern(name)).collect();
            implicit.sort();
            implicit.dedup();
            for &id in &implicit {
                index.consumers[id.0 as usize].push(Port { node: n, slot: usize::MAX });
            }
            index.implicit_inputs.push(implicit);
        }
        index.graph_outputs = graph.output.iter().map(|v| index.intern(v.name())).collect();
        Ok(index)
    }

    fn intern(&mut self, name: &str) -> TensorId {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = TensorId(self.names.len() as u32);
        self.names.push(name.to_string());
        self.ids.insert(name.to_string(), id);
        self.producer.push(None);
        self.consumers.push(Vec::new());
        id
    }

    pub fn id(&self, name: &str) -> Option<TensorId> {
        self.ids.get(name).copied()
    }

    pub fn name(&self, id: TensorId) -> &str {
        &self.names[id.0 as usize]
    }

    pub fn node_count(&self) -> usize {
        self.node_inputs.len()
    }

    /// The node and output slot that produce a tensor; `None` for graph inputs and initializers.
    pub fn producer(&self, id: TensorId) -> Option<Port> {
        self.producer[id.0 as usize]
    }

    /// The nodes reading a tensor, with the input slot (`usize::MAX` for a read from a subgraph).
    pub fn consumers(&self, id: TensorId) -> &[Port] {
        &self.consumers[id.0 as usize]
    }

    pub fn inputs(&self, node: usize) -> &[Option<TensorId>] {
        &self.node_inputs[node]
    }

    pub fn outputs(&self, node: usize) -> &[Option<TensorId>] {
        &self.node_outputs[node]
    }

    /// Explicit and implicit (subgraph) inputs of a node.
    pub fn all_inputs(&self, node: usize) -> impl Iterator<Item = TensorId> + '_ {
        self.node_inputs[node].iter().flatten().copied().chain(self.implicit_inputs[node].iter().copied())
    }

    /// Outer-scope tensors read by a node's subgraphs.
    pub fn implicit_inputs(&self, node: usize) -> &[TensorId] {
        &self.implicit_inputs[node]
    }

    pub fn input(&self, node: usize, slot: usize) -> Option<TensorId> {
        self.node_inputs[node].get(slot).copied().flatten()
    }

    pub fn output(&self, node: usize, slot: usize) -> Option<TensorId> {
        self.node_outputs[node].get(slot).copied().flatten()
    }

    pub fn is_initializer(&self, id: TensorId) -> bool {
        self.initializers.contains_key(&id)
    }

    /// The position of an initializer in `graph.initializer`.
    pub fn initializer(&self, id: TensorId) -> Option<usize> {
        self.initializers.get(&id).copied()
    }

    pub fn is_graph_input(&self, id: TensorId) -> bool {
        self.graph_inputs.contains(&id)
    }

    pub fn is_graph_output(&self, id: TensorId) -> bool {
        self.graph_outputs.contains(&id)
    }

    /// Whether anything reads the tensor: a node, a subgraph, or the graph's outputs.
    pub fn is_read(&self, id: TensorId) -> bool {
        !self.consumers(id).is_empty() || self.is_graph_output(id)
    }

    /// Whether every node comes after the producers of everything it reads (the order ONNX
    /// requires). Not the same as [`GraphIndex::topological_order`] being the identity: that is one
    /// particular order among those the graph allows.
    pub fn is_sorted(&self) -> bool {
        (0..self.node_count()).all(|node| {
            self.all_inputs(node).all(|id| self.producer(id).is_none_or(|Port { node: p, .. }| p < node))
        })
    }

    /// Node indices in dependency order (Kahn's algorithm, ties by position). Fails on a cycle or on
    /// a tensor that nothing provides, naming the node.
    pub fn topological_order(&self, graph: &GraphProto) -> Result<Vec<usize>> {
        let n = self.node_count();
        let mut missing = vec![0usize; n];
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (node, waiting) in missing.iter_mut().enumerate() {
            for id in self.all_inputs(node) {
                match self.producer(id) {
                    Some(Port { node: p, .. }) => {
                        *waiting += 1;
                        dependents[p].push(node);
                    }
                    None if self.is_initializer(id) || self.is_graph_input(id) => {}
                    None => bail!(
                        "node {:?} ({}) reads tensor {:?}, which no node, input or initializer provides",
                        graph.node[node].name(),
                        graph.node[node].op_type(),
                        self.name(id)
                    ),
                }
            }
        }
        let mut ready: VecDeque<usize> = (0..n).filter(|&i| missing[i] == 0).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(node) = ready.pop_front() {
            order.push(node);
            for &d in &dependents[node] {
                missing[d] -= 1;
                if missing[d] == 0 {
                    ready.push_back(d);
                }
            }
        }
        if order.len() < n {
            let stuck = (0..n).find(|&i| missing[i] > 0).expect("some node is left");
            bail!(
                "the graph has a cycle through node {:?} ({})",
                graph.node[stuck].name(),
                graph.node[stuck].op_type()
            );
        }
        Ok(order)
    }

    /// The initializer behind `tensor`, looking through the ops exporters put between a weight and
    /// its use (a transposed tied embedding, a cast, dequantisation, an identity, a reshape).
    pub fn constant_source<'g>(
        &self,
        graph: &'g GraphProto,
        tensor: TensorId,
    ) -> Option<&'g super::proto::TensorProto> {
        let mut tensor = tensor;
        for _ in 0..4 {
            if let Some(i) = self.initializer(tensor) {
                return Some(&graph.initializer[i]);
            }
            let Port { node: producer, .. } = self.producer(tensor)?;
            match graph.node[producer].op_type() {
                "Transpose" | "Cast" | "Identity" | "DequantizeLinear" | "Reshape" => {
                    tensor = self.input(producer, 0)?
                }
                _ => return None,
            }
        }
        None
    }

    /// Nodes that some graph output needs: the one meaning of "live".
    pub fn live_nodes(&self) -> Vec<bool> {
        let mut live = vec![false; self.node_count()];
        let mut stack: Vec<TensorId> = self.graph_outputs.clone();
        let mut seen: HashSet<TensorId> = stack.iter().copied().collect();
        while let Some(id) = stack.pop() {
            if let Some(Port { node, .. }) = self.producer(id)
                && !live[node]
            {
                live[node] = true;
                for input in self.all_inputs(node) {
                    if seen.insert(input) {
                        stack.push(input);
                    }
                }
            }
        }
        live
    }

    /// The nodes `tensors` are computed from (transitively), as a membership mask.
    pub fn ancestors(&self, tensors: &[TensorId]) -> Vec<bool> {
        let mut mask = vec![false; self.node_count()];
        let mut stack: Vec<TensorId> = tensors.to_vec();
        while let Some(id) = stack.pop() {
            if let Some(Port { node, .. }) = self.producer(id)
                && !mask[node]
            {
                mask[node] = true;
                stack.extend(self.all_inputs(node));
            }
        }
        mask
    }
}

/// What dead-node elimination removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub nodes: usize,
    pub initializers: usize,
}

/// Removes nodes no graph output needs, then initializers and `value_info` entries nothing reads.
/// Graph inputs are part of the model's interface and are left to the caller.
pub fn eliminate_dead(graph: &mut GraphProto) -> Result<Removed> {
    let index = GraphIndex::new(graph)?;
    let live = index.live_nodes();
    let before_nodes = graph.node.len();
    let mut position = 0;
    graph.node.retain(|_| {
        let keep = live[position];
        position += 1;
        keep
    });
    let index = GraphIndex::new(graph)?;
    let used = |name: &str| index.id(name).is_some_and(|id| index.is_read(id));
    let before_inits = graph.initializer.len();
    graph.initializer.retain(|t| used(t.name()));
    let produced = |name: &str| index.id(name).is_some_and(|id| index.producer(id).is_some());
    graph.value_info.retain(|v| produced(v.name()));
    Ok(Removed {
        nodes: before_nodes - graph.node.len(),
        initializers: before_inits - graph.initializer.len(),
    })
}

/// Names a node's subgraphs read from the enclosing scope: those not defined inside the subgraph.
fn subgraph_outer_reads(node: &NodeProto) -> Vec<String> {
    let mut reads = Vec::new();
    for attr in &node.attribute {
        for g in attr.g.iter().chain(attr.graphs.iter()) {
            collect_outer_reads(g, &mut HashSet::new(), &mut reads);
        }
    }
    reads
}

fn collect_outer_reads(graph: &GraphProto, outer_defined: &mut HashSet<String>, reads: &mut Vec<String>) {
    let mut defined: HashSet<String> = outer_defined.clone();
    defined.extend(graph.input.iter().map(|v| v.name().to_string()));
    defined.extend(graph.initializer.iter().map(|t| t.name().to_string()));
    for node in &graph.node {
        for input in node.input.iter().filter(|n| !n.is_empty()) {
            if !defined.contains(input) {
                reads.push(input.clone());
            }
        }
        for attr in &node.attribute {
            for g in attr.g.iter().chain(attr.graphs.iter()) {
                collect_outer_reads(g, &mut defined, reads);
            }
        }
        defined.extend(node.output.iter().cloned());
    }
    for output in &graph.output {
        if !defined.contains(output.name()) {
            reads.push(output.name().to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::proto::{TensorProto, ValueInfoProto};

    fn node(name: &str, op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            name: Some(name.into()),
            op_type: Some(op.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn value(name: &str) -> ValueInfoProto {
        ValueInfoProto { name: Some(name.into()), ..Default::default() }
    }

    fn init(name: &str) -> TensorProto {
        TensorProto { name: Some(name.into()), data_type: Some(1), ..Default::default() }
    }

    /// x -> a -> b -> y, plus a dead branch a -> dead (reading initializer w_dead).
    fn sample() -> GraphProto {
        GraphProto {
            node: vec![
                node("b", "Relu", &["ta"], &["y"]),
                node("dead", "Mul", &["ta", "w_dead"], &["tdead"]),
                node("a", "Add", &["x", "w"], &["ta"]),
            ],
            input: vec![value("x")],
            output: vec![value("y")],
            initializer: vec![init("w"), init("w_dead")],
            value_info: vec![value("ta"), value("tdead")],
            ..Default::default()
        }
    }

    #[test]
    fn topological_order_puts_producers_first() {
        let g = sample();
        let index = GraphIndex::new(&g).unwrap();
        let order = index.topological_order(&g).unwrap();
        let pos = |n: usize| order.iter().position(|&o| o == n).unwrap();
        assert!(pos(2) < pos(0), "a before b: {order:?}");
        assert!(pos(2) < pos(1), "a before dead: {order:?}");
    }

    #[test]
    fn consumers_and_producers_are_indexed() {
        let g = sample();
        let index = GraphIndex::new(&g).unwrap();
        let ta = index.id("ta").unwrap();
        assert_eq!(index.producer(ta), Some(Port { node: 2, slot: 0 }));
        let mut consumers: Vec<_> = index.consumers(ta).to_vec();
        consumers.sort();
        assert_eq!(consumers, vec![Port { node: 0, slot: 0 }, Port { node: 1, slot: 0 }]);
    }

    #[test]
    fn dead_nodes_initializers_and_value_info_are_removed() {
        let mut g = sample();
        let removed = eliminate_dead(&mut g).unwrap();
        assert_eq!(removed, Removed { nodes: 1, initializers: 1 });
        let names: Vec<_> = g.node.iter().map(|n| n.name()).collect();
        assert_eq!(names, ["b", "a"]);
        assert_eq!(g.initializer.iter().map(|t| t.name()).collect::<Vec<_>>(), ["w"]);
        assert_eq!(g.value_info.iter().map(|v| v.name()).collect::<Vec<_>>(), ["ta"]);
    }

    #[test]
    fn cycle_is_reported_with_a_node_name() {
        let g = GraphProto {
            node: vec![node("p", "Relu", &["q_out"], &["p_out"]), node("q", "Relu", &["p_out"], &["q_out"])],
            output: vec![value("p_out")],
            ..Default::default()
        };
        let index = GraphIndex::new(&g).unwrap();
        let err = index.topological_order(&g).unwrap_err().to_string();
        assert!(err.contains("cycle through node"), "{err}");
    }

    #[test]
    fn missing_tensor_is_reported() {
        let g = GraphProto { node: vec![node("p", "Relu", &["nowhere"], &["out"])], ..Default::default() };
        let index = GraphIndex::new(&g).unwrap();
        let err = index.topological_order(&g).unwrap_err().to_string();
        assert!(err.contains("\"nowhere\""), "{err}");
    }

    #[test]
    fn subgraph_reads_keep_outer_producers_alive() {
        let body = GraphProto {
            node: vec![node("inner", "Identity", &["outer_t"], &["inner_out"])],
            output: vec![value("inner_out")],
            ..Default::default()
        };
        let mut if_node = node("if", "If", &["cond"], &["y"]);
        if_node.attribute.push(crate::onnx::proto::AttributeProto {
            name: Some("then_branch".into()),
            g: Some(body),
            ..Default::default()
        });
        let mut g = GraphProto {
            node: vec![node("producer", "Relu", &["x"], &["outer_t"]), if_node],
            input: vec![value("x"), value("cond")],
            output: vec![value("y")],
            ..Default::default()
        };
        let removed = eliminate_dead(&mut g).unwrap();
        assert_eq!(removed.nodes, 0);
    }
}
