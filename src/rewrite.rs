//! The graph surgery: each chosen attention block's output is replaced by `Y = X Wᵀ + b` (NBL) or
//! by nothing (attention dropping), the KV cache of those layers leaves the model's interface, and
//! whatever no output needs any more is eliminated by reference count.
//!
//! All edits of one rewrite are collected in one [`Patch`] and applied at once.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use clap::ValueEnum;
use faer::Mat;
use ndarray::{Array1, Array2};
use serde::Serialize;

use crate::blocks::{AttentionBlock, Blocks, Junction};
use crate::cost::{Footprint, output_projection};
use crate::onnx::proto::GraphProto;
use crate::onnx::proto::{NodeProto, StringStringEntryProto, TensorProto};
use crate::onnx::{DType, GraphIndex, Interface, Model, Patch, Tensor, TensorId, attr_int, build};
use crate::quantize::{Quantized, Quantizer, quantize};
use crate::report::Analysis;
use crate::stats::MomentsSource;

/// What replaces a chosen attention block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Replacement {
    /// `Y = X Wᵀ + b`, the LMMSE map (NBL)
    Linear,
    /// `Y = 0`: the residual passes through (the attention-dropping baseline)
    Drop,
}

/// What happens to the KV cache of replaced layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KvCache {
    /// Remove the layers' past/present tensors from the model's inputs and outputs
    Drop,
    /// Keep the model's interface unchanged (the cache of those layers is still computed)
    Keep,
}

/// One layer to replace, with its linear map when the replacement is linear.
pub struct LayerEdit<'a> {
    pub block: &'a AttentionBlock,
    pub map: Option<LinearMap>,
}

/// `y = W x + b` (`W` is `d×d`), with what GPTQ weighs `W`'s rounding errors by.
#[derive(Clone)]
pub struct LinearMap {
    pub w: Mat<f64>,
    pub b: Vec<f64>,
    /// `E[x xᵀ]` of the layer's input, for GPTQ.
    pub second_moment: Option<Mat<f64>>,
}

/// The format `W` is stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    /// The format of the replaced attention's projections (MatMulNBits int4/int8 with their
    /// block size and accuracy level; int8 per output, dequantised by DequantizeLinear, for ONNX
    /// Runtime's quantisers' graphs; or a float type)
    Auto,
    F32,
    F16,
    Bf16,
    /// com.microsoft::MatMulNBits, 4 bits
    Int4,
    /// com.microsoft::MatMulNBits, 8 bits
    Int8,
}

/// How the maps are written, resolved for one model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum MapStorage {
    /// A `MatMul` by `Wᵀ` in this element type.
    Float(#[serde(serialize_with = "crate::rewrite::dtype_name")] DType),
    /// A `MatMulNBits` of `W` quantised by `quantizer`.
    Blocks { bits: u32, block_size: usize, accuracy_level: i64, quantizer: Quantizer },
    /// A `MatMul` by int8 `Wᵀ` with one scale per output, dequantised by a standard
    /// `DequantizeLinear` (the form of ONNX Runtime's QDQ quantiser, which every runtime runs).
    PerChannelInt8 { quantizer: Quantizer },
}

impl MapStorage {
    /// How `W` is rounded, when it is.
    pub fn quantizer(&self) -> Option<Quantizer> {
        match *self {
            MapStorage::Float(_) => None,
            MapStorage::Blocks { quantizer, .. } | MapStorage::PerChannelInt8 { quantizer } => {
                Some(quantizer)
            }
        }
    }
}

fn dtype_name<S: serde::Serializer>(dtype: &DType, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(dtype)
}

impl MapStorage {
    /// Resolves `format` for `model`: `auto` follows the projection that makes the first block's
    /// `Y` (a `MatMulNBits`' bits, block size and accuracy level; int8 per output for an int8
    /// product of ONNX Runtime's quantisers, in the standard operators those graphs use, so that
    /// every engine that ran the model still does; else the stream's float type).
    ///
    /// `block_size` overrides the block size of int4/int8 maps; it must divide the hidden size.
    pub fn resolve(
        format: WeightFormat,
        quantizer: Quantizer,
        block_size: Option<usize>,
        model: &Model,
        blocks: &Blocks,
    ) -> Result<MapStorage> {
        let stream = blocks.dtype.context("cannot tell the stream's element type")?;
        let graph = model.graph();
        let index = GraphIndex::new(graph)?;
        let output_projection = blocks
            .layers
            .first()
            .and_then(|l| output_projection(graph, &index, &l.y))
            .map(|n| &graph.node[n]);
        let projection = output_projection.filter(|n| n.op_type() == "MatMulNBits");
        let blocks_like = |bits: u32| MapStorage::Blocks {
            bits,
            block_size: block_size
                .or(projection.and_then(|n| attr_int(n, "block_size")).map(|b| b as usize))
                .unwrap_or(32),
            accuracy_level: projection.and_then(|n| attr_int(n, "accuracy_level")).unwrap_or(0),
            quantizer,
        };
        let storage = match format {
            WeightFormat::Auto => match projection {
                Some(n) => blocks_like(attr_int(n, "bits").unwrap_or(4) as u32),
                // A per-axis DequantizeLinear needs opset 13.
                None if output_projection.is_some_and(|n| int8_product(graph, &index, n))
                    && model.opset("").is_some_and(|v| v >= 13) =>
                {
                    MapStorage::PerChannelInt8 { quantizer }
                }
                None => MapStorage::Float(stream),
            },
            WeightFormat::F32 => MapStorage::Float(DType::F32),
            WeightFormat::F16 => MapStorage::Float(DType::F16),
            WeightFormat::Bf16 => MapStorage::Float(DType::BF16),
            WeightFormat::Int4 => blocks_like(4),
            WeightFormat::Int8 => blocks_like(8),
        };
        let d = blocks.hidden_size;
        match storage {
            MapStorage::Blocks { bits, block_size, .. } => {
                ensure!(
                    block_size >= 16 && block_size.is_power_of_two(),
                    "--block-size {block_size}: MatMulNBits blocks are a power of two of at least 16"
                );
                ensure!(
                    d.is_multiple_of(block_size),
                    "{}: the hidden size {d} is not a multiple of the block size {block_size}, and {bits}-bit \
                     maps (MatMulNBits) quantise whole blocks of inputs; choose a --block-size that divides {d}, \
                     or --weight-format f32|f16",
                    model.path.display()
                );
            }
            MapStorage::Float(_) | MapStorage::PerChannelInt8 { .. } => ensure!(
                block_size.is_none(),
                "--block-size applies to --weight-format int4|int8 (MatMulNBits maps) only, not to {storage:?}"
            ),
        }
        Ok(storage)
    }
}

/// Whether `product` multiplies by int8 weights the way ONNX Runtime's quantisers write it:
/// `MatMulInteger`, `DynamicQuantizeMatMul` or `MatMulIntegerToFloat` (dynamic quantisation), or a
/// `MatMul` of a `DequantizeLinear`'d 8-bit initializer (QDQ).
fn int8_product(graph: &GraphProto, index: &GraphIndex, product: &NodeProto) -> bool {
    let eight_bit = |t: Option<TensorId>| {
        t.and_then(|t| index.initializer(t)).is_some_and(|i| {
            matches!(DType::from_onnx(graph.initializer[i].data_type()), DType::I8 | DType::U8)
        })
    };
    let weights = product.input.get(1).and_then(|w| index.id(w));
    match product.op_type() {
        "MatMulInteger" | "DynamicQuantizeMatMul" | "MatMulIntegerToFloat" => eight_bit(weights),
        "MatMul" => weights.and_then(|w| index.producer(w)).is_some_and(|(dq, _)| {
            graph.node[dq].op_type() == "DequantizeLinear" && eight_bit(index.input(dq, 0))
        }),
        _ => false,
    }
}

/// What the rewrite changed, for the report.
#[derive(Clone, Debug, Serialize)]
pub struct RewriteSummary {
    pub layers: Vec<usize>,
    pub replace: Replacement,
    pub kv: KvCache,
    /// How the maps were stored.
    pub weight_format: MapStorage,
    pub nodes_before: usize,
    pub nodes_after: usize,
    /// Weights (values, however stored) the rewrite removed and added.
    pub params_removed: u64,
    pub params_added: u64,
    /// Every initializer's weights and storage bytes, before and after.
    pub weights_before: Footprint,
    pub weights_after: Footprint,
    /// `None` when the model has inputs whose shapes cannot be told (the rewrite still proceeds).
    pub kv_bytes_per_token_before: Option<u64>,
    pub kv_bytes_per_token_after: Option<u64>,
    pub removed_inputs: Vec<String>,
    pub removed_outputs: Vec<String>,
    /// Shape annotations (`value_info`) of intermediate tensors not carried into the output.
    pub value_info_dropped: usize,
}

/// The rewrite report (`<stem>.nbl.json`): the analysis that chose the layers, with the models and
/// what the rewrite changed.
#[derive(Serialize)]
pub struct RewriteReport {
    #[serde(flatten)]
    pub analysis: Analysis,
    pub model: String,
    pub output: String,
    /// With `--criterion measured`, each greedy step and what the search cost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured: Option<crate::measured::MeasuredChoice>,
    /// `one-shot` (every map from the original model's statistics) or `sequential`.
    pub fitting: &'static str,
    /// With sequential fitting, what each stage fitted and cost.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<crate::sequential::Stage>,
    pub rewrite: RewriteSummary,
}

/// Where a rewrite of `model` goes: `output` or `<stem>.nbl.onnx` beside the input, and `report`
/// or `<stem>.nbl.json` beside the output.
pub fn output_paths(model: &Path, output: Option<&Path>, report: Option<&Path>) -> (PathBuf, PathBuf) {
    let stem = model.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    let output = output.map_or_else(|| model.with_file_name(format!("{stem}.nbl.onnx")), Path::to_path_buf);
    let out_stem = output.file_stem().and_then(|s| s.to_str()).unwrap_or("model").trim_end_matches(".nbl");
    let report =
        report.map_or_else(|| output.with_file_name(format!("{out_stem}.nbl.json")), Path::to_path_buf);
    (output, report)
}

/// Rewrites the layers `analysis` selected, with the maps it fitted from `stats`, and records
/// where they came from in the model's metadata.
pub fn rewrite_selected(
    model: &mut Model,
    blocks: &Blocks,
    analysis: &Analysis,
    maps: MapSource<'_>,
    replace: Replacement,
    kv: KvCache,
    storage: MapStorage,
) -> Result<RewriteSummary> {
    let gptq = storage.quantizer() == Some(Quantizer::Gptq);
    let progress = crate::progress::bar(
        analysis.selected.len() as u64,
        "writing maps {bar:40} {pos}/{len} layers  ETA {eta}",
        "layers",
    );
    let MapSource { stats, mut fitted } = maps;
    let sequential = fitted.is_some();
    let edits = analysis.selected.iter().map(|&l| {
        progress.inc(1);
        let block = blocks.layer(l).with_context(|| format!("the model has no attention layer {l}"))?;
        let map = match &mut fitted {
            Some(maps) => {
                let at = maps
                    .iter()
                    .position(|(layer, _)| *layer == l)
                    .with_context(|| format!("no map of layer {l}"))?;
                maps.swap_remove(at).1
            }
            None => fit_map(stats, l, analysis.lambda, gptq)?,
        };
        Ok(LayerEdit { block, map: Some(map) })
    });
    let layer_list = analysis.selected.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(",");
    let lowercase = |v: &dyn std::fmt::Debug| format!("{v:?}").to_lowercase();
    let provenance = [
        ("nbl.version", env!("CARGO_PKG_VERSION").to_string()),
        ("nbl.layers", layer_list),
        ("nbl.replace", lowercase(&replace)),
        ("nbl.kv", lowercase(&kv)),
        ("nbl.criterion", lowercase(&analysis.criterion)),
        ("nbl.fitting", if sequential { "sequential" } else { "one-shot" }.to_string()),
        ("nbl.weight_format", serde_json::to_string(&storage)?),
        ("nbl.calibration", serde_json::json!({"tokens": stats.tokens(), "data": stats.data()}).to_string()),
    ];
    let summary = rewrite_as(model, blocks, edits, replace, kv, storage, &provenance);
    progress.finish_and_clear();
    summary
}

/// Where the chosen layers' maps come from: the statistics the layers were chosen from, and the
/// maps when they were fitted already (by [`crate::sequential`]). Without those, each map is fitted
/// from the statistics (the analysis keeps no map) as the rewrite reaches its layer: one layer's
/// moments and map are held at a time, then only the map's encoding.
pub struct MapSource<'a> {
    pub stats: &'a dyn MomentsSource,
    pub fitted: Option<Vec<(usize, LinearMap)>>,
}

/// A copy of `model` with `maps`' layers linearised, the maps stored as `storage`, the interface
/// unchanged (the KV cache of those layers is still computed, so the same inputs run it): what
/// sequential fitting calibrates and measured selection scores, never written.
pub fn linearised_copy(
    model: &Model,
    blocks: &Blocks,
    maps: &[(usize, &LinearMap)],
    storage: MapStorage,
) -> Result<Model> {
    let mut copy = Model { path: model.path.clone(), proto: model.proto.clone() };
    let edits = maps.iter().map(|&(layer, map)| {
        let block =
            blocks.layer(layer).with_context(|| format!("the model has no attention layer {layer}"))?;
        Ok(LayerEdit { block, map: Some(map.clone()) })
    });
    rewrite_as(&mut copy, blocks, edits, Replacement::Linear, KvCache::Keep, storage, &[])?;
    Ok(copy)
}

/// Layer `layer`'s LMMSE map from `stats`, with the input's second moment when GPTQ will quantise
/// it (GPTQ weighs each input by the layer's `E[x xᵀ]`).
pub fn fit_map(
    stats: &dyn MomentsSource,
    layer: usize,
    lambda: f64,
    second_moment: bool,
) -> Result<LinearMap> {
    let i = stats
        .layers()
        .iter()
        .position(|t| t.layer == layer)
        .with_context(|| format!("no statistics of layer {layer}"))?;
    let moments = stats.moments(i)?.into_owned();
    let second_moment = second_moment.then(|| moments.second_moment_x());
    let fit = crate::nbl::fit_layer(layer, moments, lambda, false)?;
    Ok(LinearMap { w: fit.w, b: fit.b, second_moment })
}

/// Rewrites `model` in memory: the chosen layers' attention replaced, dead nodes and initializers
/// removed, in one [`Patch`]. Provenance goes into `metadata_props` under `provenance`.
pub fn rewrite(
    model: &mut Model,
    blocks: &Blocks,
    edits: Vec<LayerEdit<'_>>,
    replace: Replacement,
    kv: KvCache,
    provenance: &[(&str, String)],
) -> Result<RewriteSummary> {
    let storage = MapStorage::Float(blocks.dtype.unwrap_or(DType::F32));
    rewrite_as(model, blocks, edits.into_iter().map(Ok), replace, kv, storage, provenance)
}

/// As [`rewrite`], with the maps stored as `storage` says. The edits are taken one at a time, and
/// each map is encoded and dropped before the next is asked for.
pub fn rewrite_as<'b>(
    model: &mut Model,
    blocks: &'b Blocks,
    edits: impl IntoIterator<Item = Result<LayerEdit<'b>>>,
    replace: Replacement,
    kv: KvCache,
    storage: MapStorage,
    provenance: &[(&str, String)],
) -> Result<RewriteSummary> {
    let hidden_size = Some(blocks.hidden_size);
    let kv_before = Interface::of(model, hidden_size).ok().map(|i| i.kv_bytes_per_token());
    let before = Footprint::of(model.graph(), |_| true)?;
    let nodes_before = model.graph().node.len();

    let mut patch = Patch::new(model.graph())?;
    let mut chosen = HashSet::new();
    let mut edited = Vec::new();
    for edit in edits {
        let edit = edit?;
        ensure!(chosen.insert(edit.block.layer), "layer {} is chosen twice", edit.block.layer);
        edited.push(edit.block);
        match (replace, edit.map) {
            (Replacement::Linear, Some(LinearMap { w, b, second_moment })) => {
                let d = w.nrows();
                let n = edit.block.layer;
                // The map computes in the type the junction adds in.
                let dtype = match edit.block.dtype {
                    Some(dtype @ (DType::F32 | DType::F16 | DType::BF16)) => dtype,
                    Some(other) => {
                        bail!("layer {n}: cannot write a linear map in the stream's element type {other}")
                    }
                    None => bail!(
                        "layer {n}: cannot tell the stream's element type, so the linear map cannot be written in it"
                    ),
                };
                // The bias stays in the stream's float type whatever W's format.
                let b = Array1::from_iter(b.iter().map(|&v| v as f32)).into_dyn();
                let bias = build::initializer(&format!("nbl.layers.{n}.bias"), Tensor::from_f32(dtype, b)?);
                match storage {
                    MapStorage::Float(w_dtype) => {
                        // MatMul(X, Wᵀ): the initializer holds Wᵀ, row-major [d_in, d_out].
                        let w_t = Array2::from_shape_fn((d, d), |(i, j)| w[(j, i)] as f32).into_dyn();
                        let weight = build::initializer(
                            &format!("nbl.layers.{n}.weight"),
                            Tensor::from_f32(w_dtype, w_t)?,
                        );
                        patch.replace_with_affine(edit.block, weight, bias)?;
                    }
                    MapStorage::Blocks { bits, block_size, accuracy_level, quantizer } => {
                        let q = quantize(w, bits, block_size, quantizer, second_moment)
                            .with_context(|| format!("layer {n}: quantising W to {bits} bits"))?;
                        patch.replace_with_blocks(edit.block, &q, accuracy_level, dtype, bias)?;
                    }
                    MapStorage::PerChannelInt8 { quantizer } => {
                        ensure!(
                            dtype == DType::F32,
                            "layer {n}: int8 maps dequantise to f32, the stream is {dtype}"
                        );
                        let q = quantize(w, 8, d, quantizer, second_moment)
                            .with_context(|| format!("layer {n}: quantising W to int8 per output"))?;
                        patch.replace_with_per_channel(edit.block, &q, bias)?;
                    }
                }
            }
            (Replacement::Linear, None) => bail!("layer {}: no linear map to write", edit.block.layer),
            (Replacement::Drop, _) => patch.remove_branch(edit.block)?,
        }
    }
    let mut removed_inputs = Vec::new();
    let mut removed_outputs = Vec::new();
    if kv == KvCache::Drop {
        let kept = blocks.layers.iter().find(|l| !chosen.contains(&l.layer) && !l.kv_inputs.is_empty());
        for block in &edited {
            for (i, name) in block.kv_inputs.iter().enumerate() {
                // Readers outside the block (the past length read off layer 0's cache) read the
                // same tensor of a kept layer; with no layer kept, nothing may still need it.
                if let Some(other) = kept.and_then(|k| k.kv_inputs.get(i)) {
                    patch.shunt(name, other)?;
                }
                patch.remove_input(name)?;
                removed_inputs.push(name.clone());
            }
            for name in &block.kv_outputs {
                patch.remove_output(name)?;
                removed_outputs.push(name.clone());
            }
        }
    }
    *model.graph_mut() = patch.apply()?.graph;
    // The exporter's shape annotations of intermediate tensors are optional hints that runtimes
    // trust, and they are not always right: the GenAI builder's fp16 CPU export labels the keys and
    // values repeated after the past-cache Concat with `sequence_length` where they have
    // `total_sequence_length`, and ONNX Runtime's CPU provider then fails at the first decode step
    // (it sizes the buffers of the Casts it inserts from them). Runtimes infer shapes themselves,
    // so the rewrite writes none rather than vouch for ones it did not check.
    let value_info_dropped = std::mem::take(&mut model.graph_mut().value_info).len();
    if matches!(storage, MapStorage::Blocks { .. }) && model.opset("com.microsoft").is_none() {
        model.proto.opset_import.push(crate::onnx::proto::OperatorSetIdProto {
            domain: Some("com.microsoft".into()),
            version: Some(1),
        });
    }

    let graph = model.graph();
    let new_names: HashSet<String> = chosen
        .iter()
        .flat_map(|&n| {
            [
                format!("nbl.layers.{n}.weight"),
                format!("nbl.layers.{n}.weight_scales"),
                format!("nbl.layers.{n}.bias"),
            ]
        })
        .collect();
    let added = Footprint::of(graph, |t| new_names.contains(t.name()))?;
    let after = Footprint::of(graph, |_| true)?;
    let nodes_after = graph.node.len();
    for (key, value) in provenance {
        set_metadata(&mut model.proto.metadata_props, key, value);
    }
    let kv_after = Interface::of(model, hidden_size).ok().map(|i| i.kv_bytes_per_token());
    let mut layers: Vec<usize> = chosen.into_iter().collect();
    layers.sort_unstable();
    Ok(RewriteSummary {
        layers,
        replace,
        kv,
        weight_format: storage,
        nodes_before,
        nodes_after,
        params_removed: before.weights - (after.weights - added.weights),
        params_added: added.weights,
        weights_before: before,
        weights_after: after,
        kv_bytes_per_token_before: kv_before,
        kv_bytes_per_token_after: kv_after,
        removed_inputs,
        removed_outputs,
        value_info_dropped,
    })
}

/// The edits a rewrite makes to a decoder graph, as named constructors on [`Patch`].
impl Patch<'_> {
    /// The junction node of `block`, checked to read `Y` where detection found it.
    fn junction(&self, block: &AttentionBlock) -> Result<&NodeProto> {
        let Junction { node, slot } = block.junction;
        let n = self
            .graph()
            .node
            .get(node)
            .with_context(|| format!("layer {}: no junction node", block.layer))?;
        ensure!(
            n.input.get(slot) == Some(&block.y),
            "layer {}: node {:?} ({}) does not read {:?} at input {slot}; were the blocks found in another graph?",
            block.layer,
            n.name(),
            n.op_type(),
            block.y
        );
        Ok(n)
    }

    /// `Y := MatMul(X, Wᵀ) + b`: the junction reads `nbl.layers.N.y` instead of the attention
    /// output, and the attention dies. `w_t` holds `Wᵀ` (`[d_in, d_out]`), `b` the bias (`[d]`).
    ///
    /// A `W` stored in another float type than the stream (`--weight-format f16` on an f32 model)
    /// is cast to the stream's type before the product: MatMul takes one element type, and the
    /// saving is on disk, the product keeping the stream's precision.
    pub fn replace_with_affine(
        &mut self,
        block: &AttentionBlock,
        w_t: TensorProto,
        b: TensorProto,
    ) -> Result<()> {
        let n = block.layer;
        let mut weight = w_t.name().to_string();
        if w_t.data_type != b.data_type {
            let cast = format!("nbl.layers.{n}.weight_cast");
            let mut node = build::node("Cast", &[&weight], &cast);
            node.attribute.push(build::int_attribute("to", i64::from(b.data_type.unwrap_or(1))));
            self.add_node(node)?;
            weight = cast;
        }
        let product = build::node("MatMul", &[&block.map_input, &weight], &format!("nbl.layers.{n}.matmul"));
        self.splice_map(block, product, vec![w_t], b)
    }

    /// The junction of `block` reads `product + b` (`nbl.layers.N.y`), `product` computing `W x`
    /// from the weights `weights`.
    fn splice_map(
        &mut self,
        block: &AttentionBlock,
        product: NodeProto,
        weights: Vec<TensorProto>,
        b: TensorProto,
    ) -> Result<()> {
        self.junction(block)?;
        let y = format!("nbl.layers.{}.y", block.layer);
        self.add_node(build::node("Add", &[&product.output[0], b.name()], &y))?;
        self.add_node(product)?;
        for w in weights {
            self.add_initializer(w)?;
        }
        self.add_initializer(b)?;
        self.rewire(block.junction.node, block.junction.slot, &y)
    }

    /// `Y := MatMulNBits(X, Q) + b`: as [`Patch::replace_with_affine`], with `W` quantised in
    /// blocks (`com.microsoft::MatMulNBits`, scales in the stream's type `dtype`).
    pub fn replace_with_blocks(
        &mut self,
        block: &AttentionBlock,
        q: &Quantized,
        accuracy_level: i64,
        dtype: DType,
        b: TensorProto,
    ) -> Result<()> {
        let n = block.layer;
        let product = format!("nbl.layers.{n}.matmul");
        let (packed, scales) = (format!("nbl.layers.{n}.weight"), format!("nbl.layers.{n}.weight_scales"));
        let packed_t = TensorProto {
            name: Some(packed.clone()),
            dims: vec![q.n as i64, q.blocks() as i64, (q.block_size * q.bits as usize / 8) as i64],
            data_type: Some(DType::U8.onnx_code()),
            raw_data: Some(q.packed.clone().into()),
            ..Default::default()
        };
        let scales_values = Array1::from_vec(q.scales.clone()).into_dyn();
        let scales_t = build::initializer(&scales, Tensor::from_f32(dtype, scales_values)?);
        let mut node = build::node("MatMulNBits", &[&block.map_input, &packed, &scales], &product);
        node.domain = Some("com.microsoft".into());
        for (name, value) in [
            ("K", q.k as i64),
            ("N", q.n as i64),
            ("bits", i64::from(q.bits)),
            ("block_size", q.block_size as i64),
            ("accuracy_level", accuracy_level),
        ] {
            node.attribute.push(build::int_attribute(name, value));
        }
        self.splice_map(block, node, vec![packed_t, scales_t], b)
    }

    /// `Y := MatMul(X, DequantizeLinear(Q, scales)) + b`: as [`Patch::replace_with_affine`], with
    /// `Wᵀ` stored as int8 `[d_in, d_out]` and one f32 scale per output (`axis = 1`, zero point 0).
    pub fn replace_with_per_channel(
        &mut self,
        block: &AttentionBlock,
        q: &Quantized,
        b: TensorProto,
    ) -> Result<()> {
        ensure!(q.bits == 8 && q.blocks() == 1, "layer {}: not an int8 per-output quantisation", block.layer);
        let n = block.layer;
        let (name, scales, dequantised) = (
            format!("nbl.layers.{n}.weight"),
            format!("nbl.layers.{n}.weight_scales"),
            format!("nbl.layers.{n}.weight_dq"),
        );
        // Row-major [d_in, d_out]: byte k·N + out is W[out, k].
        let bytes: Vec<u8> = (0..q.k)
            .flat_map(|k| (0..q.n).map(move |out| (k, out)))
            .map(|(k, out)| q.signed(out, k) as u8)
            .collect();
        let w_t = build::initializer(&name, Tensor::from_le_bytes(DType::I8, &[q.k, q.n], &bytes)?);
        let scales_t = build::initializer(
            &scales,
            Tensor::from_f32(DType::F32, Array1::from_vec(q.scales.clone()).into_dyn())?,
        );
        let mut dq = build::node("DequantizeLinear", &[&name, &scales], &dequantised);
        dq.attribute.push(build::int_attribute("axis", 1));
        self.add_node(dq)?;
        let product =
            build::node("MatMul", &[&block.map_input, &dequantised], &format!("nbl.layers.{n}.matmul"));
        self.splice_map(block, product, vec![w_t, scales_t], b)
    }

    /// `Y := 0`. An `Add` junction becomes the stream itself (its readers read the stream); a
    /// `SkipSimplifiedLayerNormalization` becomes a plain `SimplifiedLayerNormalization` of the
    /// stream, its sum output read as the stream.
    pub fn remove_branch(&mut self, block: &AttentionBlock) -> Result<()> {
        let node = self.junction(block)?.clone();
        let slot = block.junction.slot;
        let stream = node.input[1 - slot].clone();
        match node.op_type() {
            "Add" => self.shunt(&node.output[0], &stream),
            "SkipSimplifiedLayerNormalization" => {
                // Output 0 is the normalised sum; outputs 1 and 2 (statistics) are optional.
                for (i, out) in node.output.iter().enumerate().skip(1).take(2) {
                    let read = self.index().id(out).is_some_and(|id| self.index().is_read(id));
                    ensure!(!read, "layer {}: output {i} of {:?} is read", block.layer, node.name());
                }
                let mut norm = node.clone();
                norm.op_type = Some("SimplifiedLayerNormalization".into());
                // ONNX Runtime registers SimplifiedLayerNormalization in the default domain.
                norm.domain = Some(String::new());
                norm.input = vec![stream.clone(), node.input[2].clone()];
                norm.output.truncate(1);
                self.replace_node(block.junction.node, norm)?;
                match node.output.get(3).filter(|s| !s.is_empty()) {
                    Some(sum) => self.shunt(sum, &stream),
                    None => Ok(()),
                }
            }
            op => {
                bail!(
                    "layer {}: --replace drop does not handle a {op} junction ({:?})",
                    block.layer,
                    node.name()
                )
            }
        }
    }
}

fn set_metadata(props: &mut Vec<StringStringEntryProto>, key: &str, value: &str) {
    props.retain(|p| p.key() != key);
    props.push(StringStringEntryProto { key: Some(key.to_string()), value: Some(value.to_string()) });
}
