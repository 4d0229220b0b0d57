//! Where each unit sits in the graph: the stream a map of it reads, what it adds back and where,
//! and which attention (so which KV cache) it takes with it.

use anyhow::{Context, Result, bail, ensure};

use super::view::GraphView;
use super::{AttentionSite, DecoderLayout};
use crate::onnx::{DType, Port, TensorId, attr_int};
use crate::unit::{MAX_RUN, Unit, UnitKind};

/// What a unit adds to the stream, as calibration measures it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnitOutput {
    /// A branch tensor entering a junction (attention, MLP).
    Branch(String),
    /// The stream after the unit minus the stream before it (a layer, a run): no one tensor holds
    /// it, so calibration computes the difference.
    StreamDelta { output: String },
    /// What the folded MLP's output would have to be for the stream to skip the removed layers:
    /// the stream after them, minus the stream before them, plus the MLP output `branch`.
    FoldedDelta { output: String, branch: String },
}

/// The last product of an MLP branch, `y = a Wd (+ c)`, which a fold rewrites as `a Wd Wᵀ + c Wᵀ + b`.
#[derive(Clone, Debug)]
pub struct Projection {
    /// The node computing `a Wd` (a position in the graph the layers were found in), for messages.
    pub node: String,
    /// The activations `a` it multiplies.
    pub input: String,
    pub weight: ProjectionWeight,
    /// An initializer added to the product before the junction.
    pub bias: Option<String>,
}

/// How the projection stores `Wd`.
#[derive(Clone, Debug)]
pub enum ProjectionWeight {
    /// A float initializer `[K, N]` of a `MatMul`.
    Float(String),
    /// A `com.microsoft::MatMulNBits`: packed `[N, groups, block bytes]`, scales `[N · groups]`,
    /// optional packed `uint8` zero points.
    Blocks {
        packed: String,
        scales: String,
        zero_points: Option<String>,
        k: usize,
        n: usize,
        bits: u32,
        block_size: usize,
        accuracy_level: Option<i64>,
    },
}

/// Where a fold's map goes: the MLP whose projection it rewrites.
#[derive(Clone, Debug)]
pub struct FoldSite {
    /// The MLP's layer, its output entering its junction, and that junction's input.
    pub layer: usize,
    pub branch: String,
    pub junction: Port,
    pub projection: Projection,
}

/// One unit's place in the graph.
#[derive(Clone, Debug)]
pub struct UnitSite {
    pub unit: Unit,
    /// The residual-stream tensor entering the unit (its statistics' X).
    pub x: String,
    /// The view of `x` a map reads, in the type the junction adds in.
    pub map_input: String,
    pub output: UnitOutput,
    /// The element type the map's output and bias take.
    pub dtype: Option<DType>,
    /// The junction input the map's output goes to, and the tensor it reads now.
    pub junction: Port,
    pub branch: String,
    /// For a layer or a run: the same junction's stream input, rewired to `map_input` so that
    /// the layers in between die.
    pub stream_side: Option<Port>,
    /// The attention layers inside the unit, whose KV cache goes with it.
    pub attention: Vec<usize>,
    /// For a fold: the MLP its map is folded into. The unit's own layers are then removed as a
    /// dropped run is, `map_input` being the stream they fall back to.
    pub fold: Option<FoldSite>,
    /// Stream tensors inside a layer or a run whose `Shape` readers must read `map_input` instead,
    /// which has their shape: OPT restores its flattened stream to the shape of the attention's
    /// junction output, which would otherwise keep the removed attention alive.
    pub shape_sources: Vec<String>,
}

impl From<&AttentionSite> for UnitSite {
    fn from(site: &AttentionSite) -> UnitSite {
        UnitSite {
            unit: Unit::attention(site.layer),
            x: site.x.clone(),
            map_input: site.map_input.clone(),
            output: UnitOutput::Branch(site.y.clone()),
            dtype: site.dtype,
            junction: site.junction,
            branch: site.y.clone(),
            stream_side: None,
            attention: vec![site.layer],
            fold: None,
            shape_sources: Vec::new(),
        }
    }
}

impl DecoderLayout {
    /// Where `unit` sits, or why it cannot be replaced.
    pub fn unit_site(&self, unit: Unit) -> Result<UnitSite> {
        let layers = self.layers.len();
        ensure!(
            unit.span >= 1 && unit.last() < layers,
            "the model has {layers} attention layers: there is no {unit}"
        );
        match unit.kind {
            UnitKind::Attention => Ok(UnitSite::from(&self.layers[unit.layer])),
            UnitKind::Mlp => {
                let mlp = self.mlps.iter().find(|m| m.layer == unit.layer).with_context(|| {
                    format!("layer {} has no branch besides attention: no MLP to replace", unit.layer)
                })?;
                if let Some(reason) = &mlp.refused {
                    bail!("the MLP of layer {} cannot be replaced: it is {reason}", unit.layer);
                }
                Ok(UnitSite {
                    unit,
                    x: mlp.x.clone(),
                    map_input: mlp.map_input.clone(),
                    output: UnitOutput::Branch(mlp.y.clone()),
                    dtype: mlp.dtype,
                    junction: mlp.junction,
                    branch: mlp.y.clone(),
                    stream_side: None,
                    attention: Vec::new(),
                    fold: None,
                    shape_sources: Vec::new(),
                })
            }
            UnitKind::Layer | UnitKind::Run => {
                ensure!(
                    unit.span <= MAX_RUN,
                    "a run spans at most {MAX_RUN} layers, {unit} spans {}",
                    unit.span
                );
                let first = &self.layers[unit.layer];
                let end = self.ends.iter().find(|e| e.layer == unit.last()).with_context(|| {
                    format!(
                        "where layer {} ends cannot be told: no junction after its attention",
                        unit.last()
                    )
                })?;
                if let Some(normed) =
                    self.ends.iter().find(|e| unit.layers().any(|l| l == e.layer) && e.normalised)
                {
                    bail!(
                        "layer {} normalises the stream after its junctions (post-norm): a map of {unit} \
                         would leave that norm out; attention and mlp units can be replaced",
                        normed.layer
                    );
                }
                let output = end.output.clone().with_context(|| {
                    format!(
                        "layer {}'s output stream is fused into the final norm and is no tensor of the graph: \
                         {unit} cannot be measured",
                        unit.last()
                    )
                })?;
                ensure!(
                    end.dtype.is_none() || end.dtype == first.dtype,
                    "the stream enters {unit} as {} and leaves it as {}: one map cannot span the change",
                    first.dtype.map_or("unknown".into(), |d| d.to_string()),
                    end.dtype.map_or("unknown".into(), |d| d.to_string())
                );
                Ok(UnitSite {
                    unit,
                    x: first.map_input.clone(),
                    map_input: first.map_input.clone(),
                    output: UnitOutput::StreamDelta { output },
                    dtype: first.dtype,
                    junction: end.branch_side,
                    branch: end.branch.clone(),
                    stream_side: Some(end.stream_side),
                    attention: unit.layers().collect(),
                    fold: None,
                    // Where the stream is reshaped inside the span, each attention junction's
                    // output is the shape the layer's restore reads (it is the unit's input's).
                    shape_sources: if self
                        .ends
                        .iter()
                        .any(|e| unit.layers().any(|l| l == e.layer) && e.reshaped)
                    {
                        unit.layers().filter_map(|l| self.layers[l].junction_output.clone()).collect()
                    } else {
                        Vec::new()
                    },
                })
            }
            UnitKind::Fold => {
                ensure!(
                    unit.layer >= 1,
                    "{unit} would fold into the MLP of the layer before layer 0: there is none"
                );
                let run =
                    self.unit_site(Unit::run(unit.layer, unit.span)).with_context(|| format!("{unit}"))?;
                let before = unit.layer - 1;
                let mlp = self.mlps.iter().find(|m| m.layer == before).with_context(|| {
                    format!("{unit} folds into layer {before}'s MLP, and layer {before} has no branch besides attention")
                })?;
                if let Some(reason) = &mlp.refused {
                    bail!("{unit} cannot fold into the MLP of layer {before}: it is {reason}");
                }
                let projection = mlp.projection.clone().map_err(|reason| {
                    anyhow::anyhow!("{unit} cannot fold into the MLP of layer {before}: {reason}")
                })?;
                ensure!(
                    mlp.dtype.is_some() && mlp.dtype == run.dtype,
                    "{unit}: the MLP of layer {before} adds in {} and the stream it skips to is {}: one map cannot span the change",
                    mlp.dtype.map_or("unknown".into(), |d| d.to_string()),
                    run.dtype.map_or("unknown".into(), |d| d.to_string())
                );
                let UnitOutput::StreamDelta { output } = run.output else {
                    unreachable!("a run ends in a stream")
                };
                Ok(UnitSite {
                    unit,
                    x: mlp.y.clone(),
                    output: UnitOutput::FoldedDelta { output, branch: mlp.y.clone() },
                    fold: Some(FoldSite {
                        layer: before,
                        branch: mlp.y.clone(),
                        junction: mlp.junction,
                        projection,
                    }),
                    ..run
                })
            }
        }
    }

    /// Every unit of `kinds` in the model, in layer order, with the ones that cannot be replaced
    /// and why. Runs span 2 to [`MAX_RUN`] layers, folds 1 to [`MAX_RUN`].
    pub fn units(&self, kinds: &[UnitKind]) -> (Vec<Unit>, Vec<(Unit, String)>) {
        let layers = self.layers.len();
        let mut all = Vec::new();
        for layer in 0..layers {
            for &kind in kinds {
                match kind {
                    UnitKind::Attention => all.push(Unit::attention(layer)),
                    UnitKind::Mlp => all.push(Unit::mlp(layer)),
                    UnitKind::Layer => all.push(Unit::layer(layer)),
                    UnitKind::Run => {
                        all.extend((2..=MAX_RUN).filter(|s| layer + s <= layers).map(|s| Unit::run(layer, s)))
                    }
                    UnitKind::Fold if layer > 0 => all
                        .extend((1..=MAX_RUN).filter(|s| layer + s <= layers).map(|s| Unit::fold(layer, s))),
                    UnitKind::Fold => {}
                }
            }
        }
        let (mut usable, mut refused) = (Vec::new(), Vec::new());
        for unit in all {
            match self.unit_site(unit) {
                Ok(_) => usable.push(unit),
                Err(e) => refused.push((unit, format!("{e:#}"))),
            }
        }
        (usable, refused)
    }
}

/// How the MLP branch `y` is made, where a fold can rewrite it: by a `MatMul` of a float
/// initializer or a `MatMulNBits` of packed ones, optionally plus a constant bias. Anything else
/// between the product and the junction (a post-norm, a scale, a cast, an int8 product) is the
/// reason given.
pub(super) fn projection(g: &GraphView, y: TensorId) -> std::result::Result<Projection, String> {
    let index = g.index;
    let initializer =
        |t: Option<TensorId>| t.filter(|&t| index.is_initializer(t)).map(|t| index.name(t).to_string());
    let producer = |t: TensorId| index.producer(t).map(|p| p.node);
    let described = |n: usize| format!("{} node {:?}", g.node(n).op_type(), g.node(n).name());
    let Some(mut node) = producer(y) else {
        return Err(format!("its output {:?} has no producer", index.name(y)));
    };
    let mut bias = None;
    if g.node(node).op_type() == "Add" {
        let (a, b) = (index.input(node, 0), index.input(node, 1));
        let (product, constant) = match (initializer(a), initializer(b)) {
            (None, Some(c)) => (a, c),
            (Some(c), None) => (b, c),
            _ => {
                return Err(format!(
                    "its output is made by {}, which adds no constant bias",
                    described(node)
                ));
            }
        };
        bias = Some(constant);
        node = product
            .and_then(producer)
            .ok_or_else(|| format!("{} adds a bias to no product", described(node)))?;
    }
    let n = g.node(node);
    let input = index.input(node, 0).map(|t| index.name(t).to_string()).unwrap_or_default();
    let weight = match n.op_type() {
        "MatMul" if n.domain().is_empty() => {
            let w = initializer(index.input(node, 1)).ok_or_else(|| {
                format!("the weights of {} are not an initializer of their own", described(node))
            })?;
            let t = &g.graph.initializer
                [index.initializer(index.id(&w).expect("indexed")).expect("an initializer")];
            if t.dims.len() != 2 || !DType::from_onnx(t.data_type()).is_float() {
                return Err(format!("the weights of {} are not a float matrix", described(node)));
            }
            ProjectionWeight::Float(w)
        }
        "MatMulNBits" => {
            let extra = (4..n.input.len()).any(|i| !n.input[i].is_empty());
            let packed = initializer(index.input(node, 1));
            let scales = initializer(index.input(node, 2));
            let zero_points = initializer(index.input(node, 3));
            let zero_points_given = n.input.get(3).is_some_and(|z| !z.is_empty());
            let attribute = |name: &str| attr_int(n, name);
            match (packed, scales, attribute("K"), attribute("N"), attribute("bits"), attribute("block_size"))
            {
                (Some(packed), Some(scales), Some(k), Some(nn), Some(bits), Some(block))
                    if !extra
                        && (zero_points.is_some() || !zero_points_given)
                        && (bits == 4 || bits == 8) =>
                {
                    let zp_type = zero_points.as_ref().map(|z| {
                        let i = index.initializer(index.id(z).expect("indexed")).expect("an initializer");
                        DType::from_onnx(g.graph.initializer[i].data_type())
                    });
                    if zp_type.is_some_and(|t| t != DType::U8) {
                        return Err(format!("{} has zero points that are not packed uint8", described(node)));
                    }
                    ProjectionWeight::Blocks {
                        packed,
                        scales,
                        zero_points,
                        k: k as usize,
                        n: nn as usize,
                        bits: bits as u32,
                        block_size: block as usize,
                        accuracy_level: attribute("accuracy_level"),
                    }
                }
                _ => {
                    return Err(format!(
                        "{} is not a plain 4- or 8-bit product of initializers (a group index, a bias input or \
                         weights computed in the graph)",
                        described(node)
                    ));
                }
            }
        }
        _ => {
            return Err(format!(
                "its output is made by {}, not by a MatMul or MatMulNBits of constant weights (a norm, a scale, a \
                 cast or an int8 product comes after its projection), so there is no weight to fold a map into",
                described(node)
            ));
        }
    };
    Ok(Projection { node: n.name().to_string(), input, weight, bias })
}
