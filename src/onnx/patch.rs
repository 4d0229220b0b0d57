//! The one way to edit a graph. A [`Patch`] records edits against an indexed graph without touching
//! it; [`Patch::apply`] then builds the edited graph at once:
//!
//! 1. replaced nodes and rewired inputs take effect, then shunts (every reader of a tensor, graph
//!    outputs and subgraphs included, reads another) and renames;
//! 2. added nodes are inserted in dependency order, each just before the first node that reads it
//!    (directly or through other added nodes), in the order they were added;
//! 3. the interface changes (inputs and outputs removed or added), initializers are added;
//! 4. whatever no graph output needs any more is removed (one meaning of dead: see
//!    [`eliminate_dead`]);
//! 5. the result is checked: every tensor produced once, read only after it is produced, removed
//!    inputs no longer read, every output provided.
//!
//! Nodes are addressed by their position in the indexed graph and tensors by name, through the one
//! [`GraphIndex`] the patch was made with; ONNX requires neither node names nor unique ones.

use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result, bail, ensure};

use super::graph::{GraphIndex, Port, eliminate_dead};
use super::proto::{GraphProto, NodeProto, TensorProto, ValueInfoProto};

/// Edits of one graph, collected before anything changes.
pub struct Patch<'g> {
    graph: &'g GraphProto,
    index: GraphIndex,
    added_nodes: Vec<NodeProto>,
    added_initializers: Vec<TensorProto>,
    /// (node, input slot, tensor it reads from now on).
    rewires: Vec<(usize, usize, String)>,
    /// Every reader of the first tensor reads the second.
    shunts: HashMap<String, String>,
    replacements: HashMap<usize, NodeProto>,
    /// Tensors renamed everywhere: producer, readers, interface, value_info, initializers.
    renames: HashMap<String, String>,
    added_inputs: Vec<ValueInfoProto>,
    removed_inputs: HashSet<String>,
    removed_outputs: HashSet<String>,
    added_outputs: Vec<String>,
}

/// The edited graph and what applying the patch did to it.
pub struct Patched {
    pub graph: GraphProto,
    /// Nodes and initializers that no output needed any more.
    pub nodes_removed: usize,
    pub initializers_removed: usize,
    /// Whether nodes had to be reordered after insertion: only when the graph came out of order.
    pub reordered: bool,
}

impl<'g> Patch<'g> {
    /// Starts a patch of `graph`, indexing it once.
    pub fn new(graph: &'g GraphProto) -> Result<Patch<'g>> {
        Ok(Patch {
            graph,
            index: GraphIndex::new(graph)?,
            added_nodes: Vec::new(),
            added_initializers: Vec::new(),
            rewires: Vec::new(),
            shunts: HashMap::new(),
            replacements: HashMap::new(),
            renames: HashMap::new(),
            added_inputs: Vec::new(),
            removed_inputs: HashSet::new(),
            removed_outputs: HashSet::new(),
            added_outputs: Vec::new(),
        })
    }

    /// The graph being patched, as it was.
    pub fn graph(&self) -> &'g GraphProto {
        self.graph
    }

    /// The index of the graph being patched, as it was.
    pub fn index(&self) -> &GraphIndex {
        &self.index
    }

    /// Whether `name` is a tensor of the graph or of this patch's added nodes and initializers.
    fn is_defined(&self, name: &str) -> bool {
        self.index.id(name).is_some_and(|id| {
            self.index.producer(id).is_some()
                || self.index.is_initializer(id)
                || self.index.is_graph_input(id)
        }) || self.added_nodes.iter().any(|n| n.output.iter().any(|o| o == name))
            || self.added_initializers.iter().any(|t| t.name() == name)
            || self.added_inputs.iter().any(|v| v.name() == name)
    }

    /// Adds a node. Nodes that read each other may be added in any order; they are inserted in
    /// dependency order before their first reader.
    pub fn add_node(&mut self, node: NodeProto) -> Result<()> {
        for output in node.output.iter().filter(|o| !o.is_empty()) {
            ensure!(
                !self.is_defined(output),
                "cannot add node {:?} ({}): tensor {output:?} already exists",
                node.name(),
                node.op_type()
            );
        }
        self.added_nodes.push(node);
        Ok(())
    }

    pub fn add_initializer(&mut self, tensor: TensorProto) -> Result<()> {
        ensure!(
            !self.is_defined(tensor.name()),
            "cannot add initializer {:?}: the name is taken",
            tensor.name()
        );
        self.added_initializers.push(tensor);
        Ok(())
    }

    /// Input `slot` of `node` reads `to` instead of what it reads now.
    pub fn rewire(&mut self, node: usize, slot: usize, to: &str) -> Result<()> {
        let n = self.graph.node.get(node).with_context(|| format!("no node at position {node}"))?;
        ensure!(slot < n.input.len(), "node {:?} ({}) has no input {slot}", n.name(), n.op_type());
        self.rewires.push((node, slot, to.to_string()));
        Ok(())
    }

    /// Every reader of `from` (nodes, subgraphs, graph outputs) reads `to` instead. A graph output
    /// keeps its name: it becomes an `Identity` of `to`.
    pub fn shunt(&mut self, from: &str, to: &str) -> Result<()> {
        ensure!(self.index.id(from).is_some(), "cannot shunt {from:?}: no such tensor");
        ensure!(from != to, "cannot shunt {from:?} to itself");
        if let Some(previous) = self.shunts.insert(from.to_string(), to.to_string()) {
            ensure!(previous == to, "{from:?} is shunted twice: to {previous:?} and {to:?}");
        }
        Ok(())
    }

    /// Replaces the node at `node` by `with`.
    pub fn replace_node(&mut self, node: usize, with: NodeProto) -> Result<()> {
        ensure!(node < self.graph.node.len(), "no node at position {node}");
        ensure!(self.replacements.insert(node, with).is_none(), "node at position {node} is replaced twice");
        Ok(())
    }

    /// Renames a tensor everywhere it appears. Renames take effect together, so `a → b, b → c`
    /// swaps nothing into a collision.
    pub fn rename(&mut self, from: &str, to: &str) -> Result<()> {
        ensure!(self.index.id(from).is_some(), "cannot rename {from:?}: no such tensor");
        self.renames.insert(from.to_string(), to.to_string());
        Ok(())
    }

    /// Adds a graph input (after the existing ones).
    pub fn add_input(&mut self, value: ValueInfoProto) -> Result<()> {
        ensure!(!self.is_defined(value.name()), "cannot add input {:?}: the name is taken", value.name());
        self.added_inputs.push(value);
        Ok(())
    }

    /// Removes a graph input from the interface; nothing may read it after the patch.
    pub fn remove_input(&mut self, name: &str) -> Result<()> {
        ensure!(self.graph.input.iter().any(|v| v.name() == name), "the graph has no input {name:?}");
        self.removed_inputs.insert(name.to_string());
        Ok(())
    }

    /// Removes a graph output from the interface.
    pub fn remove_output(&mut self, name: &str) -> Result<()> {
        ensure!(self.graph.output.iter().any(|v| v.name() == name), "the graph has no output {name:?}");
        self.removed_outputs.insert(name.to_string());
        Ok(())
    }

    /// Makes an intermediate tensor, the graph's or an added node's, a graph output (after the
    /// existing ones; an output removed before stays where it was, and nothing happens when it
    /// already is one).
    pub fn add_output(&mut self, name: &str) -> Result<()> {
        ensure!(
            self.index.id(name).is_some() || self.is_defined(name),
            "cannot expose {name:?}: no such tensor"
        );
        if self.removed_outputs.remove(name) {
            return Ok(());
        }
        if !self.graph.output.iter().any(|v| v.name() == name)
            && !self.added_outputs.iter().any(|o| o == name)
        {
            self.added_outputs.push(name.to_string());
        }
        Ok(())
    }

    /// Builds the edited graph (see the module documentation for the steps).
    pub fn apply(self) -> Result<Patched> {
        let mut graph = self.graph.clone();
        let was_ordered = self.index.is_sorted();

        for (node, with) in self.replacements {
            graph.node[node] = with;
        }
        for (node, slot, to) in self.rewires {
            graph.node[node].input[slot] = to;
        }
        let mut extra_nodes = Vec::new();
        if !self.shunts.is_empty() {
            for node in &mut graph.node {
                for input in &mut node.input {
                    if let Some(to) = self.shunts.get(input) {
                        *input = to.clone();
                    }
                }
                rename_outer_reads(node, &self.shunts);
            }
            for output in &graph.output {
                if let Some(to) = self.shunts.get(output.name()) {
                    // The interface keeps the name; its producer's copy is renamed out of the way (and dies).
                    let hidden = format!("{}.shunted", output.name());
                    for node in &mut graph.node {
                        node.output
                            .iter_mut()
                            .filter(|o| *o == output.name())
                            .for_each(|o| *o = hidden.clone());
                    }
                    extra_nodes.push(super::build::node("Identity", &[to], output.name()));
                }
            }
        }
        if !self.renames.is_empty() {
            rename_everywhere(&mut graph, &self.renames);
        }

        let mut added = self.added_nodes;
        added.extend(extra_nodes);
        graph.node = insert_in_dependency_order(std::mem::take(&mut graph.node), added)?;
        graph.initializer.extend(self.added_initializers);
        graph.input.retain(|v| !self.removed_inputs.contains(v.name()));
        graph.input.extend(self.added_inputs);
        graph.output.retain(|v| !self.removed_outputs.contains(v.name()));
        graph.output.extend(
            self.added_outputs
                .iter()
                .map(|name| ValueInfoProto { name: Some(name.clone()), ..Default::default() }),
        );

        let removed = eliminate_dead(&mut graph)?;
        let index = GraphIndex::new(&graph)?;
        check_interface(&graph, &index, &self.removed_inputs)?;
        // Also checks that every tensor read is provided and that there is no cycle.
        let order = index.topological_order(&graph)?;
        let reordered = !index.is_sorted();
        if reordered {
            ensure!(
                !was_ordered,
                "internal error: the patch put a node before an input it reads, in a graph that was in order"
            );
            let mut nodes: Vec<Option<NodeProto>> =
                std::mem::take(&mut graph.node).into_iter().map(Some).collect();
            graph.node = order.into_iter().map(|i| nodes[i].take().expect("each node once")).collect();
        }
        Ok(Patched {
            graph,
            nodes_removed: removed.nodes,
            initializers_removed: removed.initializers,
            reordered,
        })
    }
}

/// Places each added node just before the first existing node that needs it (reads it, or reads
/// an added node that reads it); nodes nothing existing reads go at the end. Among themselves, the
/// added nodes keep dependency order, then the order they were added in.
fn insert_in_dependency_order(existing: Vec<NodeProto>, added: Vec<NodeProto>) -> Result<Vec<NodeProto>> {
    if added.is_empty() {
        return Ok(existing);
    }
    let producer: HashMap<&str, usize> = added
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().filter(|o| !o.is_empty()).map(move |o| (o.as_str(), i)))
        .collect();
    // Dependency order among the added nodes (Kahn, ties by the order added).
    let reads_added = |n: &NodeProto| -> Vec<usize> {
        let mut deps: Vec<usize> = n.input.iter().filter_map(|i| producer.get(i.as_str()).copied()).collect();
        deps.sort_unstable();
        deps.dedup();
        deps
    };
    let deps: Vec<Vec<usize>> = added.iter().map(reads_added).collect();
    let mut rank = vec![usize::MAX; added.len()];
    let mut next = 0;
    while next < added.len() {
        let ready = (0..added.len())
            .find(|&i| rank[i] == usize::MAX && deps[i].iter().all(|&d| rank[d] != usize::MAX));
        let Some(i) = ready else {
            let stuck = (0..added.len()).find(|&i| rank[i] == usize::MAX).expect("a node is left");
            bail!(
                "the added nodes form a cycle through {:?} ({})",
                added[stuck].name(),
                added[stuck].op_type()
            );
        };
        rank[i] = next;
        next += 1;
    }
    // Anchor: the position of the first existing reader, carried back to what the readers read.
    let mut anchor = vec![existing.len(); added.len()];
    for (position, node) in existing.iter().enumerate() {
        for input in &node.input {
            if let Some(&i) = producer.get(input.as_str()) {
                anchor[i] = anchor[i].min(position);
            }
        }
    }
    let mut by_rank: Vec<usize> = (0..added.len()).collect();
    by_rank.sort_by_key(|&i| std::cmp::Reverse(rank[i]));
    for &i in &by_rank {
        for &d in &deps[i] {
            anchor[d] = anchor[d].min(anchor[i]);
        }
    }
    let mut order: Vec<usize> = (0..added.len()).collect();
    order.sort_by_key(|&i| (anchor[i], rank[i]));
    let mut added: Vec<Option<NodeProto>> = added.into_iter().map(Some).collect();
    let mut pending = order.into_iter().peekable();
    let mut nodes = Vec::with_capacity(existing.len() + added.len());
    for (position, node) in existing.into_iter().enumerate() {
        while let Some(i) = pending.next_if(|&i| anchor[i] == position) {
            nodes.push(added[i].take().expect("each added node once"));
        }
        nodes.push(node);
    }
    nodes.extend(pending.map(|i| added[i].take().expect("each added node once")));
    Ok(nodes)
}

/// Renames tensors in every place a graph names them.
fn rename_everywhere(graph: &mut GraphProto, renames: &HashMap<String, String>) {
    let rename = |name: &mut String| {
        if let Some(to) = renames.get(name.as_str()) {
            *name = to.clone();
        }
    };
    for node in &mut graph.node {
        node.input.iter_mut().for_each(rename);
        node.output.iter_mut().for_each(rename);
        rename_outer_reads(node, renames);
    }
    for v in graph.input.iter_mut().chain(&mut graph.output).chain(&mut graph.value_info) {
        if let Some(to) = v.name.as_ref().and_then(|n| renames.get(n)) {
            v.name = Some(to.clone());
        }
    }
    for t in &mut graph.initializer {
        if let Some(to) = t.name.as_ref().and_then(|n| renames.get(n)) {
            t.name = Some(to.clone());
        }
    }
}

/// Applies `renames` to the outer-scope reads of a node's subgraphs (`If`/`Loop`/`Scan` bodies),
/// leaving names a subgraph defines itself alone.
fn rename_outer_reads(node: &mut NodeProto, renames: &HashMap<String, String>) {
    for attr in &mut node.attribute {
        for g in attr.g.iter_mut().chain(attr.graphs.iter_mut()) {
            rename_in_subgraph(g, renames);
        }
    }
}

fn rename_in_subgraph(graph: &mut GraphProto, renames: &HashMap<String, String>) {
    let mut defined: HashSet<String> = graph.input.iter().map(|v| v.name().to_string()).collect();
    defined.extend(graph.initializer.iter().map(|t| t.name().to_string()));
    defined.extend(graph.node.iter().flat_map(|n| n.output.iter().cloned()));
    let visible: HashMap<String, String> = renames
        .iter()
        .filter(|(from, _)| !defined.contains(*from))
        .map(|(a, b)| (a.clone(), b.clone()))
        .collect();
    if visible.is_empty() {
        return;
    }
    for node in &mut graph.node {
        for input in &mut node.input {
            if let Some(to) = visible.get(input.as_str()) {
                *input = to.clone();
            }
        }
        rename_outer_reads(node, &visible);
    }
    for output in &mut graph.output {
        if let Some(to) = output.name.as_ref().and_then(|n| visible.get(n)) {
            output.name = Some(to.clone());
        }
    }
}

/// The interface after a patch: removed inputs are read by nothing, every output is provided,
/// no name is declared twice.
fn check_interface(graph: &GraphProto, index: &GraphIndex, removed_inputs: &HashSet<String>) -> Result<()> {
    for name in removed_inputs {
        if let Some(id) = index.id(name)
            && let Some(&Port { node: reader, .. }) = index.consumers(id).first()
        {
            bail!(
                "graph input {name:?} was removed but node {:?} ({}) still reads it",
                graph.node[reader].name(),
                graph.node[reader].op_type()
            );
        }
    }
    for v in &graph.output {
        let provided = index.id(v.name()).is_some_and(|id| {
            index.producer(id).is_some() || index.is_graph_input(id) || index.is_initializer(id)
        });
        ensure!(provided, "graph output {:?} is not produced by anything", v.name());
    }
    for list in [&graph.input, &graph.output] {
        let mut seen = HashSet::new();
        for v in list {
            ensure!(seen.insert(v.name()), "{:?} is declared twice in the graph's interface", v.name());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::DType;
    use crate::onnx::build::{node, tensor_value};

    fn init(name: &str) -> TensorProto {
        TensorProto { name: Some(name.into()), data_type: Some(1), dims: vec![1], ..Default::default() }
    }

    /// `y = Relu(x + w)`, with a dead `Neg` reading `a`.
    fn sample() -> GraphProto {
        GraphProto {
            node: vec![node("Add", &["x", "w"], "a"), node("Neg", &["a"], "dead"), node("Relu", &["a"], "y")],
            input: vec![tensor_value("x", DType::F32, None)],
            output: vec![tensor_value("y", DType::F32, None)],
            initializer: vec![init("w")],
            ..Default::default()
        }
    }

    fn ops(graph: &GraphProto) -> Vec<&str> {
        graph.node.iter().map(|n| n.op_type()).collect()
    }

    #[test]
    fn two_nodes_inserted_at_one_place_land_in_dependency_order_without_a_sort() {
        let graph = sample();
        let mut patch = Patch::new(&graph).unwrap();
        // Added reader first, producer second: the insertion itself must order them.
        patch.add_node(node("Sigmoid", &["m"], "s")).unwrap();
        patch.add_node(node("Mul", &["a", "w"], "m")).unwrap();
        patch.rewire(2, 0, "s").unwrap();
        let patched = patch.apply().unwrap();
        assert!(!patched.reordered, "no sort was needed");
        assert_eq!(ops(&patched.graph), ["Add", "Mul", "Sigmoid", "Relu"]);
        assert_eq!(patched.nodes_removed, 1, "the dead Neg goes");
    }

    /// A node appended at the end that reads an early tensor is in order, though a breadth-first
    /// topological sort would visit it before the later nodes of the chain (what the in-graph
    /// statistics do to every model; it was taken for an error on some).
    #[test]
    fn a_node_appended_after_a_chain_it_reads_the_start_of_needs_no_sort() {
        let graph = GraphProto {
            node: vec![node("Relu", &["x"], "a"), node("Neg", &["a"], "b"), node("Relu", &["b"], "y")],
            input: vec![tensor_value("x", DType::F32, None)],
            output: vec![tensor_value("y", DType::F32, None)],
            ..Default::default()
        };
        let mut patch = Patch::new(&graph).unwrap();
        patch.add_node(node("Sigmoid", &["a"], "s")).unwrap();
        patch.add_output("s").unwrap();
        let patched = patch.apply().unwrap();
        assert!(!patched.reordered);
        assert_eq!(ops(&patched.graph), ["Relu", "Neg", "Relu", "Sigmoid"]);
    }

    #[test]
    fn a_shunt_rewires_every_reader_and_keeps_an_output_name() {
        let mut graph = sample();
        graph.output.push(tensor_value("a", DType::F32, None));
        let mut patch = Patch::new(&graph).unwrap();
        patch.shunt("a", "x").unwrap();
        let patched = patch.apply().unwrap();
        let g = &patched.graph;
        assert_eq!(ops(g), ["Relu", "Identity"], "the Add died; output a is an Identity of x");
        assert_eq!(g.node[0].input, ["x"]);
        assert_eq!((g.node[1].input[0].as_str(), g.node[1].output[0].as_str()), ("x", "a"));
        assert_eq!(g.output.iter().map(|v| v.name()).collect::<Vec<_>>(), ["y", "a"]);
    }

    #[test]
    fn renames_take_effect_together() {
        let graph = sample();
        let mut patch = Patch::new(&graph).unwrap();
        patch.rename("a", "y").unwrap();
        patch.rename("y", "z").unwrap();
        let g = patch.apply().unwrap().graph;
        assert_eq!(g.node[0].output, ["y"]);
        assert_eq!((g.node[1].input[0].as_str(), g.node[1].output[0].as_str()), ("y", "z"));
        assert_eq!(g.output[0].name(), "z");
    }

    #[test]
    fn a_removed_input_still_read_is_an_error_naming_the_reader() {
        let graph = sample();
        let mut patch = Patch::new(&graph).unwrap();
        patch.remove_input("x").unwrap();
        let err = patch.apply().err().unwrap().to_string();
        assert!(err.contains("\"x\" was removed but node \"a\" (Add) still reads it"), "{err}");
    }

    #[test]
    fn a_tensor_cannot_be_produced_twice() {
        let graph = sample();
        let mut patch = Patch::new(&graph).unwrap();
        let err = patch.add_node(node("Neg", &["x"], "a")).unwrap_err().to_string();
        assert!(err.contains("tensor \"a\" already exists"), "{err}");
    }

    #[test]
    fn an_added_output_is_exposed_and_keeps_its_producer_alive() {
        let graph = sample();
        let mut patch = Patch::new(&graph).unwrap();
        patch.add_output("dead").unwrap();
        let g = patch.apply().unwrap().graph;
        assert_eq!(ops(&g), ["Add", "Neg", "Relu"]);
        assert_eq!(g.output.iter().map(|v| v.name()).collect::<Vec<_>>(), ["y", "dead"]);
    }
}
