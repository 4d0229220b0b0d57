//! The walk on synthetic decoders, one per exporter's layer shape: sequential, parallel (two ways),
//! sandwich norms, prologues, tied embeddings, and the branches it refuses.

use std::collections::HashSet;

use super::{AttentionKind, Verdict, find_layout};
use crate::onnx::build::{node, tensor_value};
use crate::onnx::proto::{GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto};
use crate::onnx::{DType, Model};

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
    let produced: HashSet<&str> = nodes.iter().flat_map(|n| n.output.iter().map(String::as_str)).collect();
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
        inits.push(TensorProto { name: Some(name.into()), dims, data_type: Some(1), ..Default::default() });
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
    nodes.push(node("Add", &[&format!("{p}.mlp.down"), &format!("{p}.attn.o")], &format!("{p}.branches")));
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
        let layout = find_layout(&two_layers(embedding(), layer)).unwrap();
        assert_eq!(layout.layers.len(), 2);
        for (l, site) in layout.layers.iter().enumerate() {
            assert_eq!(
                (site.x.as_str(), site.y.as_str()),
                (["h0", "h1"][l], format!("l{l}.attn.o").as_str())
            );
            assert!(site.parallel);
            // Only the attention dies: Mul (its own norm), q, k, v, Transpose, scores, Softmax, PV, o.
            assert_eq!(site.nodes, 9, "layer {l}");
        }
        let mlps =
            layout.branches.iter().filter(|b| matches!(b.verdict, Verdict::NotAttention { .. })).count();
        assert_eq!(mlps, 2, "each block's MLP is a branch of its own");
    }
    let sequential = find_layout(&two_layers(embedding(), sequential_layer)).unwrap();
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
        let layout = find_layout(&two_layers(prologue, sequential_layer)).unwrap();
        assert_eq!(layout.layers.len(), 2);
        assert_eq!(layout.layers[0].x, "h0");
        assert_eq!(layout.vocab_size, Some(32));
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
    let model = two_layers(embedding(), layer);
    let err = format!("{:#}", find_layout(&model).unwrap_err());
    assert!(err.contains("multiplies by 3 weight matrices after its attention"), "{err}");
    assert!(err.starts_with(&format!("{}: ", model.path.display())), "the refusal names the file: {err}");
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
    let err = find_layout(&two_layers(embedding(), layer)).unwrap_err().to_string();
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
    let layout = find_layout(&model).unwrap();
    assert_eq!(layout.layers[0].x, "h0");
    assert_eq!((layout.hidden_size, layout.vocab_size), (8, Some(32)));
}

#[test]
fn sandwich_norm_and_residual_scale_belong_to_the_branch() {
    for attention_first in [false, true] {
        let layout = find_layout(&sandwich_model(attention_first)).unwrap();
        assert_eq!(layout.layers.len(), 1);
        let layer = &layout.layers[0];
        assert_eq!((layer.x.as_str(), layer.y.as_str()), ("h0", "ys"), "Y is what enters the junction");
        assert_eq!(layer.kind, AttentionKind::Decomposed);
        // n, q, k, v, kt, scores, probs, a, o, pn, ys
        assert_eq!(layer.nodes, 11);
        assert_eq!((layout.hidden_size, layout.dtype), (8, Some(DType::F32)));
        assert_eq!(layout.branches.len(), 2);
        assert!(
            matches!(layout.branches[1].verdict, Verdict::NotAttention { .. }),
            "{:?}",
            layout.branches[1]
        );
    }
}
