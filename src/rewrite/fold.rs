//! ReplaceMe's zero-cost form of a run: the layers are removed, and their map of the previous
//! MLP's output `y ↦ y Wᵀ + b` is folded into that MLP's down-projection. `y = a Wd + c` becomes
//! `a (Wd Wᵀ) + (c Wᵀ + b)`: a projection of the same shape, so the map costs nothing at inference.
//!
//! The product is computed in f64 and stored as the projection was: a float matrix in its own
//! type (exact to that type's rounding), or a `MatMulNBits` dequantised, multiplied and quantised
//! again to the same bits and block size (round to nearest: GPTQ would need the moments of the
//! MLP's hidden activations, which calibration does not collect).

use anyhow::{Context, Result, ensure};
use ndarray::{Array1, Array2, Ix2};
use serde::Serialize;

use crate::detect::{FoldSite, Projection, ProjectionWeight, UnitSite};
use crate::fit::LinearMap;
use crate::fit::quantize::{Quantizer, quantize};
use crate::onnx::{Model, Patch, Tensor, build};
use crate::unit::Unit;

use super::splice::grouped_product;

/// What a fold rewrote, for the report.
#[derive(Clone, Debug, Serialize)]
pub struct Folded {
    pub unit: Unit,
    /// The down-projection node whose weights now carry the map.
    pub projection: String,
    /// Whether the weights were quantised again (`MatMulNBits`), rather than multiplied exactly.
    pub requantised: bool,
}

impl Patch<'_> {
    /// `site`'s layers removed and `map` folded into the projection of `fold`'s MLP, whose
    /// weights are read from `model`. The MLP's junction reads the folded product plus its bias
    /// (`nbl.<unit>.y`); the old projection dies with nothing reading it.
    pub fn fold_map(
        &mut self,
        site: &UnitSite,
        fold: &FoldSite,
        map: &LinearMap,
        model: &Model,
    ) -> Result<Folded> {
        let unit = site.unit;
        let key = unit.key();
        let Projection { node, input, weight, bias } = &fold.projection;
        let context = || format!("{unit}: folding its map into {node:?} (layer {}'s MLP)", fold.layer);
        let d = map.b.len();
        let value = |name: &str| -> Result<Tensor> {
            let i = self
                .index()
                .id(name)
                .and_then(|t| self.index().initializer(t))
                .with_context(|| format!("initializer {name:?} is gone"))?;
            model.tensor(&self.graph().initializer[i])
        };
        let c = match bias {
            Some(name) => {
                Some(value(name).with_context(context)?.to_f64()?.into_iter().collect::<Vec<f64>>())
            }
            None => None,
        };
        let w = Array2::from_shape_fn((d, d), |(i, j)| map.w[(i, j)]);
        // (c Wᵀ + b): the bias the folded product needs.
        let mut b = Array1::from_vec(map.b.clone());
        if let Some(c) = &c {
            ensure!(
                c.len() == d,
                "{}: the bias of {node:?} holds {} values, the stream {d}",
                context(),
                c.len()
            );
            b += &w.dot(&Array1::from_vec(c.clone()));
        }
        let (product, weights, dtype, requantised) = match weight {
            ProjectionWeight::Float(name) => {
                let t = value(name).with_context(context)?;
                let dtype = t.dtype();
                let wd = t.to_f64()?.into_dimensionality::<Ix2>().with_context(context)?;
                ensure!(
                    wd.ncols() == d,
                    "{}: {name:?} has {} outputs, the stream {d}",
                    context(),
                    wd.ncols()
                );
                // a Wd Wᵀ: the initializer holds (Wd Wᵀ), [K, d].
                let folded = wd.dot(&w.t()).mapv(|v| v as f32).into_dyn();
                let folded =
                    build::initializer(&format!("nbl.{key}.weight"), Tensor::from_f32(dtype, folded)?);
                let product = build::node("MatMul", &[input, folded.name()], &format!("nbl.{key}.matmul"));
                (product, vec![folded], dtype, false)
            }
            ProjectionWeight::Blocks {
                packed,
                scales,
                zero_points,
                k,
                n,
                bits,
                block_size,
                accuracy_level,
            } => {
                ensure!(*n == d, "{}: {node:?} has {n} outputs, the stream {d}", context());
                let scales_t = value(scales).with_context(context)?;
                let dtype = scales_t.dtype();
                let blocks = Blocks {
                    packed: value(packed).with_context(context)?.to_le_bytes(),
                    scales: scales_t.to_f64()?.into_iter().collect(),
                    zero_points: match zero_points {
                        Some(z) => Some(value(z).with_context(context)?.to_le_bytes()),
                        None => None,
                    },
                    k: *k,
                    n: *n,
                    bits: *bits,
                    block_size: *block_size,
                };
                // W Wd, with Wd as MatMulNBits holds it: [N, K], one row per output.
                let wd = blocks.dequantize().with_context(context)?;
                let folded = w.dot(&wd);
                let folded = faer::Mat::from_fn(*n, *k, |i, j| folded[(i, j)]);
                let q = quantize(folded, *bits, *block_size, Quantizer::Rtn, None).with_context(context)?;
                let (product, weights) = grouped_product(input, &key, &q, *accuracy_level, dtype)?;
                (product, weights, dtype, true)
            }
        };
        let b = build::initializer(
            &format!("nbl.{key}.bias"),
            Tensor::from_f32(dtype, b.mapv(|v| v as f32).into_dyn())?,
        );
        let y = format!("nbl.{key}.y");
        self.add_node(build::node("Add", &[&product.output[0], b.name()], &y))?;
        self.add_node(product)?;
        for t in weights.into_iter().chain([b]) {
            self.add_initializer(t)?;
        }
        self.reading(fold.junction, &fold.branch, unit)?;
        self.rewire(fold.junction.node, fold.junction.slot, &y)?;
        self.remove_branch(site)?;
        Ok(Folded { unit, projection: node.clone(), requantised })
    }
}

/// A `MatMulNBits` weight as stored: `[N, groups, block bytes]` codes, `[N · groups]` scales and
/// optional zero points (packed like the codes, a row of `groups` per output).
struct Blocks {
    packed: Vec<u8>,
    scales: Vec<f64>,
    zero_points: Option<Vec<u8>>,
    k: usize,
    n: usize,
    bits: u32,
    block_size: usize,
}

impl Blocks {
    /// The `N×K` matrix the codes stand for: `(q − zero point) · scale`, the zero point
    /// `2^(bits−1)` where none is stored.
    fn dequantize(&self) -> Result<Array2<f64>> {
        let bits = self.bits as usize;
        let per_byte = 8 / bits;
        let groups = self.k.div_ceil(self.block_size);
        let blob = self.block_size / per_byte;
        let zp_row = groups.div_ceil(per_byte);
        ensure!(
            self.packed.len() == self.n * groups * blob,
            "the packed weights are not [N, groups, block bytes]"
        );
        ensure!(self.scales.len() == self.n * groups, "the scales are not [N · groups]");
        if let Some(z) = &self.zero_points {
            ensure!(z.len() == self.n * zp_row, "the zero points are not [N · ⌈groups · bits / 8⌉]");
        }
        let mask = ((1u16 << bits) - 1) as u8;
        let code =
            |bytes: &[u8], at: usize, within: usize| (bytes[at] >> ((within % per_byte) * bits)) & mask;
        Ok(Array2::from_shape_fn((self.n, self.k), |(n, k)| {
            let (group, within) = (k / self.block_size, k % self.block_size);
            let q = code(&self.packed, (n * groups + group) * blob + within / per_byte, within);
            let zero = match &self.zero_points {
                Some(z) => code(z, n * zp_row + group / per_byte, group),
                None => 1 << (bits - 1),
            };
            (f64::from(q) - f64::from(zero)) * self.scales[n * groups + group]
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::quantize::Quantized;

    /// The dequantisation of packed codes agrees with the quantiser's own (which packs the same
    /// layout), and a stored zero point shifts every code of its group.
    #[test]
    fn blocks_dequantise_as_the_quantiser_packs_them() {
        let (n, k) = (3, 64);
        let w = faer::Mat::from_fn(n, k, |i, j| ((i * 31 + j * 7) % 17) as f64 / 17.0 - 0.5);
        for bits in [4, 8] {
            let q: Quantized = quantize(w.clone(), bits, 16, Quantizer::Rtn, None).unwrap();
            let expected = q.dequantize();
            let mut blocks = Blocks {
                packed: q.packed.clone(),
                scales: q.scales.iter().map(|&s| f64::from(s)).collect(),
                zero_points: None,
                k,
                n,
                bits,
                block_size: 16,
            };
            let got = blocks.dequantize().unwrap();
            for i in 0..n {
                for j in 0..k {
                    assert_eq!(got[(i, j)], expected[(i, j)], "{bits} bits at ({i}, {j})");
                }
            }
            // Zero points one below the default: every value grows by one scale.
            let default = 1u8 << (bits - 1);
            let per_byte = 8 / bits as usize;
            let zp: u8 = (0..per_byte).map(|s| (default - 1) << (s * bits as usize)).fold(0, |a, v| a | v);
            blocks.zero_points = Some(vec![zp; n * 4usize.div_ceil(per_byte)]);
            let shifted = blocks.dequantize().unwrap();
            let scale = blocks.scales[2 * 4 + 3];
            assert!((shifted[(2, 60)] - got[(2, 60)] - scale).abs() < 1e-12, "{bits} bits");
        }
    }
}
