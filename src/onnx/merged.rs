//! Merged decoders: Optimum's `decoder_model_merged.onnx` holds two decoders as the two branches of
//! one `If` on `use_cache_branch`: one runs the prompt without a KV cache, the other the decode steps
//! with one, both reading the weights from the main graph. A rewrite works on each branch as a model
//! of its own ([`Merged::branch`]) and puts the two back together ([`Merged::join`]).

use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result, ensure};

use super::proto::{GraphProto, NodeProto, ValueInfoProto};
use super::{Model, value_type};

/// The `If` whose branches are a merged decoder's two graphs.
#[derive(Clone, Copy, Debug)]
pub struct Merged {
    node: usize,
}

/// Which branch: the one that reads the KV cache, or the one that runs without it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Branch {
    Cached,
    Uncached,
}

impl Branch {
    fn tag(self) -> &'static str {
        match self {
            Branch::Cached => "with_cache",
            Branch::Uncached => "without_cache",
        }
    }
}

/// Renames tensors in `nodes` (inputs and outputs) as `renames` says.
fn renamed(nodes: &[NodeProto], renames: &HashMap<String, String>) -> Vec<NodeProto> {
    nodes
        .iter()
        .map(|n| {
            let mut n = n.clone();
            for name in n.input.iter_mut().chain(n.output.iter_mut()) {
                if let Some(new) = renames.get(name.as_str()) {
                    *name = new.clone();
                }
            }
            n
        })
        .collect()
}

/// Every name the nodes read.
fn reads(nodes: &[NodeProto]) -> HashSet<String> {
    nodes.iter().flat_map(|n| n.input.iter().filter(|i| !i.is_empty()).cloned()).collect()
}

impl Merged {
    /// The merged decoder in `model`: its `logits` come out of an `If`.
    pub fn find(model: &Model) -> Option<Merged> {
        let graph = model.graph();
        let logits = graph.output.iter().find(|o| o.name() == "logits")?;
        let node = graph.node.iter().position(|n| n.output.iter().any(|o| o == logits.name()))?;
        (graph.node[node].op_type() == "If").then_some(Merged { node })
    }

    /// The name of the `If` node and of its condition, for messages.
    pub fn describe(&self, model: &Model) -> (String, String) {
        let node = &model.graph().node[self.node];
        (node.name().to_string(), node.input.first().cloned().unwrap_or_default())
    }

    /// The `If` attribute (`then_branch` or `else_branch`) holding `branch`: the cached one reads
    /// the KV cache (a 4-D float graph input).
    fn attribute(&self, model: &Model, branch: Branch) -> Result<&'static str> {
        let graph = model.graph();
        let cache: HashSet<&str> = graph
            .input
            .iter()
            .filter(|v| value_type(v).is_some_and(|(dtype, dims)| dtype.is_float() && dims.len() == 4))
            .map(|v| v.name())
            .collect();
        let reads_cache = |attr: &str| -> Result<bool> {
            let body = self.body(model, attr)?;
            Ok(reads(&body.node).iter().any(|r| cache.contains(r.as_str())))
        };
        let (then_cached, else_cached) = (reads_cache("then_branch")?, reads_cache("else_branch")?);
        ensure!(
            then_cached != else_cached,
            "the branches of the merged decoder's If do not split into one with the KV cache and one without"
        );
        Ok(match (branch, then_cached) {
            (Branch::Cached, true) | (Branch::Uncached, false) => "then_branch",
            _ => "else_branch",
        })
    }

    fn body<'m>(&self, model: &'m Model, attr: &str) -> Result<&'m GraphProto> {
        let node = &model.graph().node[self.node];
        node.attribute
            .iter()
            .find(|a| a.name() == attr)
            .and_then(|a| a.g.as_ref())
            .with_context(|| format!("If node {:?} has no {attr}", node.name()))
    }

    /// `branch` as a model of its own: its nodes, the main graph's initializers and the inputs it
    /// reads, and the `If`'s outputs as the main graph names them. Its path is the merged model's,
    /// so that the files beside it (tokenizer, config) are found.
    pub fn branch(&self, model: &Model, branch: Branch) -> Result<Model> {
        let main = model.graph();
        let node = &main.node[self.node];
        let body = self.body(model, self.attribute(model, branch)?)?;
        ensure!(
            body.output.len() == node.output.len(),
            "the If node {:?} has {} outputs and its branch {}",
            node.name(),
            node.output.len(),
            body.output.len()
        );
        let renames: HashMap<String, String> =
            body.output.iter().map(|o| o.name().to_string()).zip(node.output.iter().cloned()).collect();
        let nodes = renamed(&body.node, &renames);
        let read = reads(&nodes);
        let condition = node.input.first().map(String::as_str).unwrap_or_default();
        let outputs: Vec<ValueInfoProto> = body
            .output
            .iter()
            .zip(&node.output)
            .map(|(inner, outer)| {
                let declared = main.output.iter().find(|o| o.name() == outer);
                let mut v = declared.cloned().unwrap_or_else(|| inner.clone());
                v.name = Some(outer.clone());
                v
            })
            .collect();
        let graph = GraphProto {
            name: Some(format!("{}.{}", main.name(), branch.tag())),
            node: nodes,
            initializer: main.initializer.iter().chain(&body.initializer).cloned().collect(),
            input: main
                .input
                .iter()
                .filter(|v| v.name() != condition && read.contains(v.name()))
                .cloned()
                .collect(),
            output: outputs,
            ..Default::default()
        };
        let mut proto = model.proto.clone();
        proto.graph = Some(graph);
        Ok(Model { path: model.path.clone(), proto })
    }

    /// `original` with its branches replaced by `cached` and `uncached` (as [`Merged::branch`] made
    /// them, rewritten): the `If` keeps the outputs both still produce, and the main graph the
    /// inputs and initializers either still reads (the removed layers' KV cache goes).
    pub fn join(&self, original: &Model, cached: &Model, uncached: &Model) -> Result<Model> {
        let mut main = original.graph().clone();
        let if_outputs = main.node[self.node].output.clone();
        let produced = |m: &Model, name: &str| m.graph().output.iter().any(|o| o.name() == name);
        let kept: Vec<String> =
            if_outputs.iter().filter(|o| produced(cached, o) && produced(uncached, o)).cloned().collect();
        let mut bodies = Vec::new();
        // What the graph still reads: the main graph's nodes and both bodies.
        let mut read: HashSet<String> = reads(&main.node);
        for (model, branch) in [(cached, Branch::Cached), (uncached, Branch::Uncached)] {
            let graph = model.graph();
            // The branch returns its outputs under the names the If gives them, as Optimum's merge
            // writes it (ONNX Runtime and tract both read it so).
            let output = kept
                .iter()
                .map(|o| graph.output.iter().find(|v| v.name() == o).expect("kept").clone())
                .collect();
            let body = GraphProto {
                name: Some(format!("{}.{}", original.graph().name(), branch.tag())),
                node: graph.node.clone(),
                output,
                ..Default::default()
            };
            read.extend(reads(&body.node));
            bodies.push((self.attribute(original, branch)?, body));
        }
        // The weights both branches read, pooled by name (a map both rewrites wrote is one tensor).
        let mut initializers = Vec::new();
        let mut seen = HashSet::new();
        for t in cached.graph().initializer.iter().chain(&uncached.graph().initializer) {
            if seen.insert(t.name().to_string()) {
                initializers.push(t.clone());
            }
        }
        let node = &mut main.node[self.node];
        node.output = kept.clone();
        for (attr, body) in bodies {
            let slot = node.attribute.iter_mut().find(|a| a.name() == attr).expect("checked");
            slot.g = Some(body);
        }
        main.initializer = initializers.into_iter().filter(|t| read.contains(t.name())).collect();
        main.input.retain(|v| read.contains(v.name()));
        let outer: HashSet<&String> = main.node.iter().flat_map(|n| n.output.iter()).collect();
        main.output.retain(|v| outer.contains(&v.name().to_string()));
        let mut proto = original.proto.clone();
        proto.graph = Some(main);
        Ok(Model { path: original.path.clone(), proto })
    }
}
