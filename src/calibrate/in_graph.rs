//! Statistics computed where the model runs. The measuring graph itself turns each batch's X and Y
//! into centred cross-products and merges them into running moments, which are graph inputs and
//! outputs: the engine carries them from one batch to the next (on a GPU, in device memory), and only
//! the `d×d` matrices leave it, once, at the end.
//!
//! Per layer, for a batch of `n` tokens (`X`, `Y` as `n×d` in f64) and the running state
//! `(nₐ, μx, μy, Sxx, Syx, Syy, c)`:
//!
//! ```text
//! mx = Σₜ xₜ / n,   Xc = X − mx                               (the same for y)
//! δx = mx − μx,   δy = my − μy,   w = nₐ n / (nₐ + n)
//! Sxx' = Sxx + Xcᵀ Xc + w δx δxᵀ      Syx' = Syx + Ycᵀ Xc + w δy δxᵀ      Syy' = Syy + Ycᵀ Yc + w δy δyᵀ
//! μx' = μx + δx n / (nₐ + n),   nₐ' = nₐ + n,   c' = c + Σₜ cos(xₜ, xₜ + yₜ)
//! ```
//!
//! which is [`Moments::add_batch`] (each batch centred on its own mean, then merged as Chan et al.
//! merge), written as ONNX operators.

use anyhow::{Context, Result, bail, ensure};
use faer::Mat;
use ndarray::{ArrayD, IxDyn};

use crate::onnx::proto::NodeProto;
use crate::onnx::{DType, Model, Patch, Tensor, build};
use crate::stats::{LayerTensors, MomentPrecision, Moments};

/// The running state of one layer, in the order of the graph's inputs and outputs.
const STATE: [&str; 7] = ["count", "mean_x", "mean_y", "sxx", "syx", "syy", "cos_sum"];
/// `ReduceSum` and `Unsqueeze` take their axes as an input from opset 13 on.
const MIN_OPSET: i64 = 13;
/// ONNX's codes for double and float.
const DOUBLE: i64 = 11;
const FLOAT: i64 = 1;

/// A model that computes its own moments: its inputs are the model's plus each layer's running
/// state, its outputs the state after the batch.
pub struct MomentsGraph {
    pub model: Model,
    /// (input, output) names of every state tensor, layer by layer, [`STATE`] order within a layer.
    pub carried: Vec<(String, String)>,
    hidden_size: usize,
    layers: usize,
}

impl MomentsGraph {
    /// Builds the graph measuring every entry of `taps` (`d` wide) in `model`, each batch's
    /// products multiplied in `precision`.
    pub fn new(
        model: &Model,
        d: usize,
        taps: &[LayerTensors],
        precision: MomentPrecision,
    ) -> Result<MomentsGraph> {
        let opset = default_opset(model);
        ensure!(
            opset >= MIN_OPSET,
            "in-graph statistics need opset {MIN_OPSET} or later, and {} declares opset {opset}: \
             form the moments on the host",
            model.path.display()
        );
        let mut patch = Patch::new(model.graph())?;
        for output in &model.graph().output {
            patch.remove_output(output.name())?;
        }
        let constants = [
            ("nbl.moments.rows", Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[2]), vec![-1, d as i64])?)),
            ("nbl.moments.axis0", Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[1]), vec![0])?)),
            ("nbl.moments.axis1", Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[1]), vec![1])?)),
            ("nbl.moments.first", Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[]), vec![0])?)),
            // cos(x, x + y) is 0 where a norm is 0, as on the host: 0 / max(0, tiny).
            ("nbl.moments.tiny", Tensor::F64(ArrayD::from_shape_vec(IxDyn(&[]), vec![f64::MIN_POSITIVE])?)),
        ];
        for (name, value) in constants {
            patch.add_initializer(build::initializer(name, value))?;
        }
        let mut carried = Vec::new();
        for tap in taps {
            let prefix = format!("nbl.moments.{}.", tap.unit().key());
            let state: Vec<(String, String)> =
                STATE.iter().map(|s| (format!("{prefix}{s}"), format!("{prefix}{s}.next"))).collect();
            for ((input, _), shape) in state.iter().zip(state_shapes(d)) {
                patch.add_input(build::fixed_tensor_value(input, DType::F64, &shape))?;
            }
            let mut nodes = Nodes { prefix, added: Vec::new(), precision };
            nodes.layer(&tap.x, &tap.y, &state);
            for node in nodes.added {
                patch.add_node(node)?;
            }
            for (_, output) in &state {
                patch.add_output(output)?;
            }
            carried.extend(state);
        }
        let mut proto = model.proto.clone();
        proto.graph = Some(patch.apply().context("building the in-graph statistics")?.graph);
        Ok(MomentsGraph {
            model: Model { path: model.path.clone(), proto },
            carried,
            hidden_size: d,
            layers: taps.len(),
        })
    }

    /// The state before the first batch: no tokens, all zeros.
    pub fn initial_state(&self) -> Vec<Tensor> {
        (0..self.layers)
            .flat_map(|_| state_shapes(self.hidden_size))
            .map(|shape| Tensor::F64(ArrayD::zeros(IxDyn(&shape))))
            .collect()
    }

    /// Each layer's moments from the state after the last batch.
    pub fn moments(&self, state: Vec<Tensor>) -> Result<Vec<Moments>> {
        ensure!(state.len() == self.carried.len(), "the engine returned {} state tensors", state.len());
        let d = self.hidden_size;
        let mut values = state.into_iter().map(|t| match t {
            Tensor::F64(a) => Ok(a.as_standard_layout().iter().copied().collect::<Vec<f64>>()),
            other => bail!("a state tensor came back as {:?}, not f64", other.dtype()),
        });
        let mut next = || values.next().context("state tensor missing")?;
        let square = |v: Vec<f64>| -> Result<Mat<f64>> {
            ensure!(v.len() == d * d, "a state matrix has {} values, not {d}²", v.len());
            Ok(Mat::from_fn(d, d, |i, j| v[i * d + j]))
        };
        // Gemm's Xcᵀ Xc need not come back bitwise symmetric; the file keeps one triangle.
        let symmetric = |m: Mat<f64>| Mat::from_fn(d, d, |i, j| 0.5 * (m[(i, j)] + m[(j, i)]));
        (0..self.layers)
            .map(|_| {
                let count = next()?[0];
                ensure!(count >= 0.0 && count.fract() == 0.0, "the token count came back as {count}");
                Ok(Moments {
                    count: count as u64,
                    mean_x: next()?,
                    mean_y: next()?,
                    sxx: symmetric(square(next()?)?),
                    syx: square(next()?)?,
                    syy: symmetric(square(next()?)?),
                    cos_sum: next()?[0],
                })
            })
            .collect()
    }
}

/// Shapes of [`STATE`]'s tensors.
fn state_shapes(d: usize) -> [Vec<usize>; 7] {
    [vec![], vec![d], vec![d], vec![d, d], vec![d, d], vec![d, d], vec![]]
}

fn default_opset(model: &Model) -> i64 {
    model
        .proto
        .opset_import
        .iter()
        .find(|o| o.domain().is_empty() || o.domain() == "ai.onnx")
        .map_or(0, |o| o.version())
}

/// The nodes of one layer's update, named under `prefix`.
struct Nodes {
    prefix: String,
    added: Vec<NodeProto>,
    precision: MomentPrecision,
}

impl Nodes {
    /// Adds `op` on `inputs`; its output is `output`, or a fresh name under the prefix.
    fn op(&mut self, op: &str, inputs: &[&str], output: Option<&str>) -> String {
        let name =
            output.map_or_else(|| format!("{}{}{}", self.prefix, op, self.added.len()), str::to_string);
        self.added.push(build::node(op, inputs, &name));
        name
    }

    fn with_int(&mut self, op: &str, inputs: &[&str], attribute: &str, value: i64) -> String {
        let name = self.op(op, inputs, None);
        self.added.last_mut().expect("just added").attribute.push(build::int_attribute(attribute, value));
        name
    }

    /// `aᵀ b` for `n×d` f64 matrices, in f64; in f32 (centred values cast down, the product cast
    /// back up) for f32 products.
    fn cross(&mut self, a: &str, b: &str) -> String {
        if self.precision != MomentPrecision::F32 {
            return self.with_int("Gemm", &[a, b], "transA", 1);
        }
        let narrow = |nodes: &mut Nodes, t: &str| nodes.with_int("Cast", &[t], "to", FLOAT);
        let (a32, b32) = (narrow(self, a), if a == b { None } else { Some(narrow(self, b)) });
        let product = self.with_int("Gemm", &[&a32, b32.as_deref().unwrap_or(&a32)], "transA", 1);
        self.with_int("Cast", &[&product], "to", DOUBLE)
    }

    /// Σ over `axis` (a constant's name), dropping that axis.
    fn sum(&mut self, x: &str, axis: &str) -> String {
        self.with_int("ReduceSum", &[x, axis], "keepdims", 0)
    }

    /// The batch as `n×d` f64, its token count, its column means and its centred values.
    fn centred(&mut self, t: &str) -> (String, String, String, String) {
        let f64s = self.with_int("Cast", &[t], "to", DOUBLE);
        let rows = self.op("Reshape", &[&f64s, "nbl.moments.rows"], None);
        let shape = self.op("Shape", &[&rows], None);
        let n_i = self.op("Gather", &[&shape, "nbl.moments.first"], None);
        let n = self.with_int("Cast", &[&n_i], "to", DOUBLE);
        let total = self.sum(&rows, "nbl.moments.axis0");
        let mean = self.op("Div", &[&total, &n], None);
        let centred = self.op("Sub", &[&rows, &mean], None);
        (rows, n, mean, centred)
    }

    /// The update of the module documentation, from the layer's X and Y into `state`'s outputs.
    fn layer(&mut self, x: &str, y: &str, state: &[(String, String)]) {
        let [count, mean_x, mean_y, sxx, syx, syy, cos_sum] =
            std::array::from_fn(|i| (state[i].0.as_str(), state[i].1.as_str()));
        let (x, n, mx, xc) = self.centred(x);
        let (y, _, my, yc) = self.centred(y);
        let sxx_batch = self.cross(&xc, &xc);
        let syx_batch = self.cross(&yc, &xc);
        let syy_batch = self.cross(&yc, &yc);

        let z = self.op("Add", &[&x, &y], None);
        let products = [(&x, &z), (&x, &x), (&z, &z)].map(|(a, b)| {
            let p = self.op("Mul", &[a, b], None);
            self.sum(&p, "nbl.moments.axis1")
        });
        let norms_sq = self.op("Mul", &[&products[1], &products[2]], None);
        let norms = self.op("Sqrt", &[&norms_sq], None);
        let guarded = self.op("Max", &[&norms, "nbl.moments.tiny"], None);
        let cos = self.op("Div", &[&products[0], &guarded], None);
        let cos_batch = self.sum(&cos, "nbl.moments.axis0");

        let total = self.op("Add", &[count.0, &n], Some(count.1));
        let both = self.op("Mul", &[count.0, &n], None);
        let w = self.op("Div", &[&both, &total], None);
        let share = self.op("Div", &[&n, &total], None);
        let dx = self.op("Sub", &[&mx, mean_x.0], None);
        let dy = self.op("Sub", &[&my, mean_y.0], None);
        let dx_col = self.op("Unsqueeze", &[&dx, "nbl.moments.axis1"], None);
        let dy_col = self.op("Unsqueeze", &[&dy, "nbl.moments.axis1"], None);
        let dxw = self.op("Mul", &[&dx, &w], None);
        let dyw = self.op("Mul", &[&dy, &w], None);
        let dxw_row = self.op("Unsqueeze", &[&dxw, "nbl.moments.axis0"], None);
        let dyw_row = self.op("Unsqueeze", &[&dyw, "nbl.moments.axis0"], None);
        for (old, batch, col, row, out) in [
            (sxx.0, &sxx_batch, &dx_col, &dxw_row, sxx.1),
            (syx.0, &syx_batch, &dy_col, &dxw_row, syx.1),
            (syy.0, &syy_batch, &dy_col, &dyw_row, syy.1),
        ] {
            let summed = self.op("Add", &[old, batch], None);
            let correction = self.op("Mul", &[col, row], None);
            self.op("Add", &[&summed, &correction], Some(out));
        }
        for (old, delta, out) in [(mean_x.0, &dx, mean_x.1), (mean_y.0, &dy, mean_y.1)] {
            let step = self.op("Mul", &[delta, &share], None);
            self.op("Add", &[old, &step], Some(out));
        }
        self.op("Add", &[cos_sum.0, &cos_batch], Some(cos_sum.1));
    }
}
