//! Where each unit sits in the graph: the stream a map of it reads, what it adds back and where,
//! and which attention (so which KV cache) it takes with it.

use anyhow::{Context, Result, bail, ensure};

use super::{AttentionSite, DecoderLayout};
use crate::onnx::{DType, Port};
use crate::unit::{MAX_RUN, Unit, UnitKind};

/// What a unit adds to the stream, as calibration measures it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnitOutput {
    /// A branch tensor entering a junction (attention, MLP).
    Branch(String),
    /// The stream after the unit minus the stream before it (a layer, a run): no one tensor holds
    /// it, so calibration computes the difference.
    StreamDelta { output: String },
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
                })
            }
        }
    }

    /// Every unit of `kinds` in the model, in layer order, with the ones that cannot be replaced
    /// and why. Runs span 2 to [`MAX_RUN`] layers.
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
