//! Finding decoder layers and their attention sites, by walking the residual stream from the token
//! embedding: every residual junction adds a branch computed from the stream back into it, and the
//! branches that hold attention are the blocks NBL can linearise.
//!
//! A junction is `s' = Add(s, t)` or a fused `SkipLayerNormalization`/`SkipSimplifiedLayerNormalization`
//! (inputs 0 and 1 summed, the sum on output 3 and its normalisation on output 0), where the branch
//! tensor `t` is computed from the stream tensor `s`. For an attention branch, `X = s` and `Y = t`.
//! Boundaries are found from the data flow alone; names only label layers and are cross-checked.

mod branch;
mod fused;
mod junction;
mod naming;
mod reshape;
mod stream;
#[cfg(test)]
mod tests;
mod units;
mod view;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::onnx::{DType, GraphIndex, Model, Port, TensorId};
use branch::analyse_branch;
pub use fused::FusedAttention;
use junction::next_join;
use naming::cross_check;
use stream::{
    MAX_PROLOGUE, embedding_rows, hidden_size, post_norm_step, projection_width, prologue_step,
    stream_continues, stream_dtype, stream_start, stream_views,
};
pub use units::{FoldSite, Projection, ProjectionWeight, UnitOutput, UnitSite};
use view::GraphView;

/// The attention a branch holds: decomposed (`Softmax` into a `MatMul`, or a KV-cache input), or a
/// fused operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKind {
    Decomposed,
    Fused(FusedAttention),
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

/// One decoder layer's attention site: what enters it and what it adds back to the stream.
#[derive(Clone, Debug, Serialize)]
pub struct AttentionSite {
    pub layer: usize,
    /// The residual-stream tensor entering the attention's input norm.
    pub x: String,
    /// The attention output entering the residual junction.
    pub y: String,
    pub kind: AttentionKind,
    /// Attention and the MLP read the same stream and are both added to it (GPT-NeoX, Phi-2,
    /// Falcon, Cohere): `Y` is the attention term alone.
    pub parallel: bool,
    /// Nodes that no output needs any more once the site and its KV cache are removed.
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
    /// Where the branch joins the stream: the junction node's input that reads `Y` (a position in
    /// the graph the layers were found in).
    pub junction: Port,
    /// The junction's sum, the stream after the attention.
    #[serde(skip)]
    pub junction_output: Option<String>,
}

/// A decoder layer's other residual branch, its MLP: the stream it reads and the term it adds.
#[derive(Clone, Debug, Serialize)]
pub struct MlpSite {
    pub layer: usize,
    /// The stream entering the MLP's norm: after the attention's junction, or the layer's input
    /// in a parallel block.
    pub x: String,
    /// The MLP's output entering its junction.
    pub y: String,
    /// The view of `x` the junction adds to, which a map reads (as [`AttentionSite::map_input`]).
    pub map_input: String,
    #[serde(serialize_with = "dtype_or_unknown")]
    pub dtype: Option<DType>,
    pub nodes: usize,
    /// Why the branch cannot be replaced by a map alone (a mixture of experts, several
    /// branches), where it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    #[serde(skip)]
    pub junction: Port,
    /// The product that makes the branch's output, which a fold rewrites, or why there is none.
    #[serde(skip)]
    pub projection: std::result::Result<Projection, String>,
}

/// Where a decoder layer's last residual junction writes the stream the next layer reads.
#[derive(Clone, Debug, Serialize)]
pub struct LayerEnd {
    pub layer: usize,
    /// The stream after the layer; absent where the final norm fuses the last sum and leaves it
    /// unused.
    pub output: Option<String>,
    /// The tensor the last junction adds to the stream, and the junction's two summed inputs.
    #[serde(skip)]
    pub branch: String,
    #[serde(skip)]
    pub branch_side: Port,
    #[serde(skip)]
    pub stream_side: Port,
    #[serde(skip)]
    pub dtype: Option<DType>,
    /// Whether the junction adds to a reshaped view of the stream (OPT flattens it for the MLP
    /// half of each layer): the stream's shape changes inside the layer.
    #[serde(skip)]
    pub reshaped: bool,
    /// Whether a norm on the main path follows one of the layer's junctions (post-norm).
    #[serde(skip)]
    pub normalised: bool,
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
pub struct DecoderLayout {
    pub layers: Vec<AttentionSite>,
    /// Each layer's MLP, where it has one branch besides attention (by layer, in order).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mlps: Vec<MlpSite>,
    /// Each layer's output stream, layer by layer.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ends: Vec<LayerEnd>,
    pub hidden_size: usize,
    /// The stream's element type where it enters the first block, where it can be told (each
    /// block's own, where the sums run in a wider type, is [`AttentionSite::dtype`]).
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

impl DecoderLayout {
    /// Every layer's X and Y tensor names, in layer order: `[x0, y0, x1, y1, ...]`.
    pub fn xy_tensors(&self) -> Vec<String> {
        self.layers.iter().flat_map(|l| [l.x.clone(), l.y.clone()]).collect()
    }

    /// The attention site of layer `layer`.
    pub fn layer(&self, layer: usize) -> Option<&AttentionSite> {
        self.layers.iter().find(|l| l.layer == layer)
    }
}

/// Finds every attention site of a decoder-only LLM graph.
pub fn find_layout(model: &Model) -> Result<DecoderLayout> {
    let graph = model.graph();
    let index = GraphIndex::new(graph)?;
    index.topological_order(graph)?;
    let g = GraphView { graph, index: &index };
    let file = || model.path.display().to_string();
    if let Some(merged) = crate::onnx::merged::Merged::find(model) {
        bail!("{}: {}", model.path.display(), merged_decoder(&merged, model));
    }
    let start = stream_start(&g).with_context(file)?;
    let live = index.live_nodes();

    let mut branches = Vec::new();
    let mut layers: Vec<AttentionSite> = Vec::new();
    // By layer: the non-attention terms (with the stream they join and their analysis), and
    // where the layer's last junction leaves the stream.
    let mut others: Vec<Vec<OtherTerm>> = Vec::new();
    let mut ends: Vec<LayerEnd> = Vec::new();
    let mut stream = start;
    let mut prologue = 0;
    // The stream's width where the prologue projects a narrower embedding (OPT-350m).
    let mut projected = None;
    loop {
        let Some(join) = next_join(&g, stream) else {
            // Before the first block, the stream may pass through a prologue: a scale (Gemma's
            // `× √d`), an added position embedding (GPT-2), a Cast, an embedding norm (BLOOM), a
            // projection (OPT-350m). A block's input is read at least twice (by its branch and its
            // junction), a prologue step's only once.
            if branches.is_empty() {
                match prologue_step(&g, stream) {
                    Some(next) if prologue < MAX_PROLOGUE => {
                        let Port { node, .. } = index.producer(next).expect("a step's output");
                        projected = projection_width(&g, node).or(projected);
                        stream = next;
                        prologue += 1;
                        continue;
                    }
                    _ => break,
                }
            }
            // Between blocks, a post-norm model normalises the stream after each junction: the
            // next block reads the normalised stream, and each map replaces its term inside the
            // norm's input (at the junction).
            match post_norm_step(&g, stream) {
                Some(next) => {
                    if let Some(end) = ends.last_mut() {
                        end.normalised = true;
                    }
                    stream = next;
                    continue;
                }
                None => break,
            }
        };
        let mut attention_y: Option<TensorId> = None;
        let mut join_others = Vec::new();
        for term in &join.terms {
            let analysis = analyse_branch(&g, &live, term).with_context(file)?;
            branches.push(Branch {
                branch: index.name(term.tensor).to_string(),
                junction: g.node(term.port.node).name().to_string(),
                nodes: analysis.dying.len(),
                verdict: analysis.verdict.clone(),
            });
            let Verdict::Attention(kind) = analysis.verdict else {
                let moe = mixture_of_experts(&g, &analysis.dying);
                join_others.push(OtherTerm { stream, port: term.port, tensor: term.tensor, analysis, moe });
                continue;
            };
            {
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
                let map_input = junction_view(&g, stream, term.port);
                layers.push(AttentionSite {
                    layer: layers.len(),
                    x: index.name(stream).to_string(),
                    y: index.name(term.tensor).to_string(),
                    kind,
                    parallel: join.terms.len() > 1,
                    nodes: analysis.dying.len(),
                    kv_inputs: analysis.kv_inputs.iter().map(|&t| index.name(t).to_string()).collect(),
                    kv_outputs: analysis.kv_outputs.iter().map(|&t| index.name(t).to_string()).collect(),
                    map_input: index.name(map_input).to_string(),
                    dtype: stream_dtype(&g, map_input),
                    junction: term.port,
                    junction_output: join.out.map(|o| index.name(o).to_string()),
                });
            }
        }
        if attention_y.is_some() {
            others.push(Vec::new());
        }
        // Branches before the first attention belong to no layer.
        if let Some(layer_others) = others.last_mut() {
            layer_others.extend(join_others);
            let branch = g.index.input(join.branch_side.node, join.branch_side.slot);
            // A norm between this layer's junctions (post-norm) stays the layer's.
            let normalised = ends.get(layers.len() - 1).is_some_and(|e: &LayerEnd| e.normalised);
            ends.truncate(layers.len() - 1);
            ends.push(LayerEnd {
                layer: layers.len() - 1,
                output: join.out.map(|o| index.name(o).to_string()),
                branch: branch.map_or_else(String::new, |b| index.name(b).to_string()),
                branch_side: join.branch_side,
                stream_side: join.stream_side,
                dtype: join.out.and_then(|o| stream_dtype(&g, o)),
                reshaped: index
                    .input(join.stream_side.node, join.stream_side.slot)
                    .and_then(|t| index.producer(t))
                    .is_some_and(|Port { node, .. }| g.node(node).op_type() == "Reshape"),
                normalised,
            });
        }
        match join.out {
            Some(out) => stream = out,
            None => break,
        }
    }

    if let Some(node) = stream_continues(&g, stream) {
        let n = g.node(node);
        let op = if n.domain().is_empty() {
            n.op_type().to_string()
        } else {
            format!("{}::{}", n.domain(), n.op_type())
        };
        bail!(
            "{}: the residual stream goes on after {:?} through node {:?} ({op}), which nbl-onnx cannot see \
             through, and more residual junctions follow it; refusing rather than treating the {} layer(s) before \
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
                g.readers(stream)
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
    let dtype = stream_dtype(&g, first_x);
    let hidden_size = hidden_size(&g, first_x, start, projected).with_context(file)?;
    let warnings = cross_check(&g, &layers);
    let vocab_size = embedding_rows(&g, start);
    let mlps =
        others.into_iter().enumerate().filter_map(|(layer, terms)| mlp_site(&g, layer, terms)).collect();
    Ok(DecoderLayout { layers, mlps, ends, hidden_size, dtype, vocab_size, branches, warnings })
}

/// Why a merged decoder (Optimum's `decoder_model_merged.onnx`: its layers inside two branches of
/// an `If`, one without a KV cache and one with) cannot be walked as it is; `onnx::merged` splits
/// it where a command can work on a branch.
fn merged_decoder(merged: &crate::onnx::merged::Merged, model: &Model) -> String {
    let (node, condition) = merged.describe(model);
    format!(
        "a merged decoder: its layers are inside the two branches of If node {:?} (on {condition:?}: one \
         branch without a KV cache, one with), as in Optimum's decoder_model_merged.onnx. inspect, \
         calibrate, rewrite, check, eval and bench read it (its branch without the cache is measured, and a rewrite \
         rewrites both branches alike); this step needs one graph: give it decoder_with_past_model.onnx \
         where the repository has it, or export one with the cache: optimum-cli export onnx --model MODEL \
         --task text-generation-with-past DIR",
        node
    )
}

/// The view of stream tensor `s` that the junction of a branch joining at `port` adds to: `s`
/// itself or one of its views; where it reads neither (the attention term of a parallel block
/// meets the MLP's first), `s`.
fn junction_view(g: &GraphView, s: TensorId, port: Port) -> TensorId {
    let read = |t: &TensorId| g.node(port.node).input.iter().any(|i| g.index.id(i) == Some(*t));
    if read(&s) { s } else { stream_views(g, s).into_iter().find(read).unwrap_or(s) }
}

/// A non-attention branch found on the walk, kept until its layer is complete.
struct OtherTerm {
    /// The stream tensor the branch is computed from and joins.
    stream: TensorId,
    port: Port,
    tensor: TensorId,
    analysis: branch::BranchAnalysis,
    moe: Option<String>,
}

/// Layer `layer`'s MLP from its non-attention branches: the one branch there is, refused where it
/// routes tokens to experts; refused where there are several. `None` without any.
fn mlp_site(g: &GraphView, layer: usize, terms: Vec<OtherTerm>) -> Option<MlpSite> {
    let count = terms.len();
    let first = terms.into_iter().next()?;
    let index = g.index;
    let map_input = junction_view(g, first.stream, first.port);
    let refused = match (count, first.moe) {
        (1, None) => None,
        (1, Some(moe)) => Some(moe),
        (n, _) => Some(format!(
            "layer {layer} adds {n} branches besides attention to the stream; which one is the MLP cannot be told"
        )),
    };
    Some(MlpSite {
        layer,
        x: index.name(first.stream).to_string(),
        y: index.name(first.tensor).to_string(),
        map_input: index.name(map_input).to_string(),
        dtype: stream_dtype(g, map_input),
        nodes: first.analysis.dying.len(),
        refused,
        junction: first.port,
        projection: units::projection(g, first.tensor),
    })
}

/// Operators that route each token to some experts: a router's `TopK`, ONNX Runtime's fused
/// mixture-of-experts operators.
const ROUTING_OPS: &[&str] = &["TopK", "MoE", "QMoE", "SparseMixer"];

/// Why a branch is a mixture of experts, where it is: each token takes a few experts' MLPs, chosen
/// by a router. One affine map of the stream does not model a choice made per token, so such a
/// branch is not replaced alone.
fn mixture_of_experts(g: &GraphView, dying: &[usize]) -> Option<String> {
    let node = dying.iter().map(|&n| g.node(n)).find(|n| ROUTING_OPS.contains(&n.op_type()))?;
    Some(format!(
        "a mixture of experts: a router chooses experts per token (node {:?}, {}), which one affine map of \
         the stream does not model; replace its whole layer instead (--units layer)",
        node.name(),
        node.op_type()
    ))
}
