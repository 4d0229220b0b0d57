//! The edits a rewrite makes to a decoder graph, as named constructors on [`Patch`]: a site's
//! output replaced by an affine map (float, `MatMulNBits` groups, or int8 per output) or removed,
//! and a layer's KV cache taken out of the interface.

use anyhow::{Context, Result, bail, ensure};
use ndarray::{Array1, Array2};

use crate::detect::{DecoderLayout, UnitSite};
use crate::fit::LinearMap;
use crate::fit::quantize::{Quantized, quantize};
use crate::fit::storage::MapStorage;
use crate::onnx::proto::{NodeProto, TensorProto};
use crate::onnx::{DType, Patch, Port, Tensor, build};
use crate::rewrite::Replacement;
use crate::unit::Unit;

/// The initializers the splices of unit `key` add (those of its storage, where they exist).
pub(super) fn initializer_names(key: &str) -> [String; 3] {
    [format!("nbl.{key}.weight"), format!("nbl.{key}.weight_scales"), format!("nbl.{key}.bias")]
}

impl Patch<'_> {
    /// Replaces `site`'s output as `replace` says: by `map`, stored as `storage`, or by nothing.
    pub fn replace_site(
        &mut self,
        site: &UnitSite,
        replace: Replacement,
        map: Option<LinearMap>,
        storage: MapStorage,
    ) -> Result<()> {
        let n = site.unit;
        let key = n.key();
        let LinearMap { w, b, second_moment } = match (replace, map) {
            (Replacement::Drop, _) => return self.remove_branch(site),
            (Replacement::Linear, None) => bail!("{n}: no linear map to write"),
            (Replacement::Linear, Some(map)) => map,
        };
        let d = w.nrows();
        // The map computes in the type the junction adds in.
        let dtype = match site.dtype {
            Some(dtype @ (DType::F32 | DType::F16 | DType::BF16)) => dtype,
            Some(other) => bail!("{n}: cannot write a linear map in the stream's element type {other}"),
            None => {
                bail!("{n}: cannot tell the stream's element type, so the linear map cannot be written in it")
            }
        };
        // The bias stays in the stream's float type whatever W's format.
        let b = Array1::from_iter(b.iter().map(|&v| v as f32)).into_dyn();
        let bias = build::initializer(&format!("nbl.{key}.bias"), Tensor::from_f32(dtype, b)?);
        match storage {
            MapStorage::Float(w_dtype) => {
                // MatMul(X, Wᵀ): the initializer holds Wᵀ, row-major [d_in, d_out].
                let w_t = Array2::from_shape_fn((d, d), |(i, j)| w[(j, i)] as f32).into_dyn();
                let weight =
                    build::initializer(&format!("nbl.{key}.weight"), Tensor::from_f32(w_dtype, w_t)?);
                self.replace_with_affine(site, weight, bias)
            }
            MapStorage::Grouped { bits, group_size, accuracy_level, quantizer } => {
                let q = quantize(w, bits, group_size, quantizer, second_moment)
                    .with_context(|| format!("{n}: quantising W to {bits} bits"))?;
                self.replace_with_groups(site, &q, accuracy_level, dtype, bias)
            }
            MapStorage::PerChannelInt8 { quantizer } => {
                ensure!(dtype == DType::F32, "{n}: int8 maps dequantise to f32, the stream is {dtype}");
                let q = quantize(w, 8, d, quantizer, second_moment)
                    .with_context(|| format!("{n}: quantising W to int8 per output"))?;
                self.replace_with_per_channel(site, &q, bias)
            }
        }
    }

    /// Takes the KV cache of the attention layers `removed` out of the interface; returns the
    /// inputs and outputs removed. Readers outside a site (the past length read off layer 0's
    /// cache) read the same tensor of a kept layer; with no layer kept, nothing may still need it.
    pub fn remove_kv_cache(
        &mut self,
        layout: &DecoderLayout,
        removed: &[usize],
    ) -> Result<(Vec<String>, Vec<String>)> {
        let kept = layout.layers.iter().find(|l| !removed.contains(&l.layer) && !l.kv_inputs.is_empty());
        let (mut inputs, mut outputs) = (Vec::new(), Vec::new());
        for site in layout.layers.iter().filter(|l| removed.contains(&l.layer)) {
            for (i, name) in site.kv_inputs.iter().enumerate() {
                if let Some(other) = kept.and_then(|k| k.kv_inputs.get(i)) {
                    self.shunt(name, other)?;
                }
                self.remove_input(name)?;
                inputs.push(name.clone());
            }
            for name in &site.kv_outputs {
                self.remove_output(name)?;
                outputs.push(name.clone());
            }
        }
        Ok((inputs, outputs))
    }

    /// The junction node of `site`, checked to read its branch where detection found it.
    fn junction(&self, site: &UnitSite) -> Result<&NodeProto> {
        self.reading(site.junction, &site.branch, site.unit)
    }

    /// The node at `port`, checked to read `tensor` there (where detection found it, for `unit`).
    pub(super) fn reading(&self, port: Port, tensor: &str, unit: Unit) -> Result<&NodeProto> {
        let Port { node, slot } = port;
        let n = self.graph().node.get(node).with_context(|| format!("{unit}: no junction node"))?;
        ensure!(
            n.input.get(slot).map(String::as_str) == Some(tensor),
            "{unit}: node {:?} ({}) does not read {tensor:?} at input {slot}; were the layers found in another graph?",
            n.name(),
            n.op_type(),
        );
        Ok(n)
    }

    /// `Y := MatMul(X, Wᵀ) + b`: the junction reads `nbl.layers.N.y` instead of the attention
    /// output, and the attention dies. `w_t` holds `Wᵀ` (`[d_in, d_out]`), `b` the bias (`[d]`).
    ///
    /// A `W` stored in another float type than the stream (f16 maps of an f32 model)
    /// is cast to the stream's type before the product: MatMul takes one element type, and the
    /// saving is on disk, the product keeping the stream's precision.
    pub fn replace_with_affine(&mut self, site: &UnitSite, w_t: TensorProto, b: TensorProto) -> Result<()> {
        let key = site.unit.key();
        let mut weight = w_t.name().to_string();
        if w_t.data_type != b.data_type {
            let cast = format!("nbl.{key}.weight_cast");
            let mut node = build::node("Cast", &[&weight], &cast);
            node.attribute.push(build::int_attribute("to", i64::from(b.data_type.unwrap_or(1))));
            self.add_node(node)?;
            weight = cast;
        }
        let product = build::node("MatMul", &[&site.map_input, &weight], &format!("nbl.{key}.matmul"));
        self.splice_map(site, product, vec![w_t], b)
    }

    /// The junction of `site` reads `product + b` (`nbl.<unit>.y`), `product` computing `W x`
    /// from the weights `weights`; for a layer or a run, its stream input reads the unit's input.
    fn splice_map(
        &mut self,
        site: &UnitSite,
        product: NodeProto,
        weights: Vec<TensorProto>,
        b: TensorProto,
    ) -> Result<()> {
        self.junction(site)?;
        let y = format!("nbl.{}.y", site.unit.key());
        self.add_node(build::node("Add", &[&product.output[0], b.name()], &y))?;
        self.add_node(product)?;
        for w in weights {
            self.add_initializer(w)?;
        }
        self.add_initializer(b)?;
        if let Some(stream) = site.stream_side {
            self.rewire(stream.node, stream.slot, &site.map_input)?;
        }
        self.reread_shapes(site)?;
        self.rewire(site.junction.node, site.junction.slot, &y)
    }

    /// The `Shape` readers of `site.shape_sources` read the unit's input instead, which has their
    /// shape, so that the layers inside the unit die with their attention.
    fn reread_shapes(&mut self, site: &UnitSite) -> Result<()> {
        for source in &site.shape_sources {
            let Some(id) = self.index().id(source) else { continue };
            let readers: Vec<(usize, usize)> = self
                .index()
                .consumers(id)
                .iter()
                .filter(|p| p.slot != usize::MAX && self.graph().node[p.node].op_type() == "Shape")
                .map(|p| (p.node, p.slot))
                .collect();
            for (node, slot) in readers {
                self.rewire(node, slot, &site.map_input)?;
            }
        }
        Ok(())
    }

    /// `Y := MatMulNBits(X, Q) + b`: as [`Patch::replace_with_affine`], with `W` quantised in
    /// groups (`com.microsoft::MatMulNBits`, scales in the stream's type `dtype`).
    pub fn replace_with_groups(
        &mut self,
        site: &UnitSite,
        q: &Quantized,
        accuracy_level: i64,
        dtype: DType,
        b: TensorProto,
    ) -> Result<()> {
        let (product, weights) =
            grouped_product(&site.map_input, &site.unit.key(), q, Some(accuracy_level), dtype)?;
        self.splice_map(site, product, weights, b)
    }

    /// `Y := MatMul(X, DequantizeLinear(Q, scales)) + b`: as [`Patch::replace_with_affine`], with
    /// `Wᵀ` stored as int8 `[d_in, d_out]` and one f32 scale per output (`axis = 1`, zero point 0).
    pub fn replace_with_per_channel(&mut self, site: &UnitSite, q: &Quantized, b: TensorProto) -> Result<()> {
        ensure!(q.bits == 8 && q.groups() == 1, "{}: not an int8 per-output quantisation", site.unit);
        let key = site.unit.key();
        let (name, scales, dequantised) =
            (format!("nbl.{key}.weight"), format!("nbl.{key}.weight_scales"), format!("nbl.{key}.weight_dq"));
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
        let product = build::node("MatMul", &[&site.map_input, &dequantised], &format!("nbl.{key}.matmul"));
        self.splice_map(site, product, vec![w_t, scales_t], b)
    }

    /// `Y := 0`. An `Add` junction becomes the stream itself (its readers read the stream; for a
    /// layer or a run, the unit's input); a `SkipSimplifiedLayerNormalization` becomes a plain
    /// `SimplifiedLayerNormalization` of the stream (a `SkipLayerNormalization` a
    /// `LayerNormalization`), its sum output read as the stream.
    pub fn remove_branch(&mut self, site: &UnitSite) -> Result<()> {
        let node = self.junction(site)?.clone();
        let slot = site.junction.slot;
        let stream = match site.stream_side {
            Some(_) => site.map_input.clone(),
            None => node.input[1 - slot].clone(),
        };
        self.reread_shapes(site)?;
        match node.op_type() {
            "Add" => self.shunt(&node.output[0], &stream),
            op @ ("SkipSimplifiedLayerNormalization" | "SkipLayerNormalization") => {
                // Output 0 is the normalised sum; outputs 1 and 2 (statistics) are optional.
                for (i, out) in node.output.iter().enumerate().skip(1).take(2) {
                    let read = self.index().id(out).is_some_and(|id| self.index().is_read(id));
                    ensure!(!read, "{}: output {i} of {:?} is read", site.unit, node.name());
                }
                let mut norm = node.clone();
                // ONNX Runtime registers SimplifiedLayerNormalization in the default domain, and
                // LayerNormalization is standard (opset 17): inputs X, scale and (optional) bias.
                norm.domain = Some(String::new());
                norm.output.truncate(1);
                if op == "SkipSimplifiedLayerNormalization" {
                    norm.op_type = Some("SimplifiedLayerNormalization".into());
                    norm.input = vec![stream.clone(), node.input[2].clone()];
                } else {
                    let bias = node.input.get(4).filter(|b| !b.is_empty());
                    ensure!(
                        bias.is_none(),
                        "{}: {:?} adds a bias to the sum it leaves",
                        site.unit,
                        node.name()
                    );
                    norm.op_type = Some("LayerNormalization".into());
                    norm.input = vec![stream.clone(), node.input[2].clone()];
                    norm.input.extend(node.input.get(3).cloned());
                }
                self.replace_node(site.junction.node, norm)?;
                match node.output.get(3).filter(|s| !s.is_empty()) {
                    Some(sum) => self.shunt(sum, &stream),
                    None => Ok(()),
                }
            }
            op => {
                bail!("{}: dropping a branch does not handle a {op} junction ({:?})", site.unit, node.name())
            }
        }
    }
}

/// `MatMulNBits(input, Q)` named for unit `key` (`nbl.<key>.matmul`), and its initializers: the
/// packed codes `[N, groups, group bytes]` and the scales in `dtype`. `accuracy_level` is written
/// where given.
pub(super) fn grouped_product(
    input: &str,
    key: &str,
    q: &Quantized,
    accuracy_level: Option<i64>,
    dtype: DType,
) -> Result<(NodeProto, Vec<TensorProto>)> {
    let (packed, scales) = (format!("nbl.{key}.weight"), format!("nbl.{key}.weight_scales"));
    let packed_t = TensorProto {
        name: Some(packed.clone()),
        dims: vec![q.n as i64, q.groups() as i64, (q.group_size * q.bits as usize / 8) as i64],
        data_type: Some(DType::U8.onnx_code()),
        raw_data: Some(q.packed.clone().into()),
        ..Default::default()
    };
    let scales_values = Array1::from_vec(q.scales.clone()).into_dyn();
    let scales_t = build::initializer(&scales, Tensor::from_f32(dtype, scales_values)?);
    let mut node = build::node("MatMulNBits", &[input, &packed, &scales], &format!("nbl.{key}.matmul"));
    node.domain = Some("com.microsoft".into());
    let attributes = [
        ("K", Some(q.k as i64)),
        ("N", Some(q.n as i64)),
        ("bits", Some(i64::from(q.bits))),
        ("block_size", Some(q.group_size as i64)),
        ("accuracy_level", accuracy_level),
    ];
    for (name, value) in attributes.into_iter().filter_map(|(n, v)| Some((n, v?))) {
        node.attribute.push(build::int_attribute(name, value));
    }
    Ok((node, vec![packed_t, scales_t]))
}
