//! What a rewrite can replace by one affine map of the residual stream: a **unit**. Attention
//! (NBL) and the MLP are one branch of one decoder layer; a layer, or a run of consecutive layers
//! (ReplaceMe), is a stretch of the stream from the layer's input to the last one's output.

use serde::{Deserialize, Serialize};

/// The longest run of consecutive layers one map replaces.
pub const MAX_RUN: usize = 4;

/// The kinds of units, as the CLI (`--units`) and the reports spell them.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum UnitKind {
    /// a layer's attention branch: `h + attn(norm(h))` becomes `h + h Wᵀ + b` (NBL)
    Attention,
    /// a layer's MLP branch, as an affine map of the stream it reads
    Mlp,
    /// a whole decoder layer: `h ↦ h + h Wᵀ + b` from its input to its output stream
    Layer,
    /// 2 to 4 consecutive layers by one map (ReplaceMe)
    Run,
}

impl UnitKind {
    pub const ALL: [UnitKind; 4] = [UnitKind::Attention, UnitKind::Mlp, UnitKind::Layer, UnitKind::Run];

    pub fn name(self) -> &'static str {
        match self {
            UnitKind::Attention => "attention",
            UnitKind::Mlp => "mlp",
            UnitKind::Layer => "layer",
            UnitKind::Run => "run",
        }
    }
}

/// One unit: its kind, its first decoder layer and how many layers it spans (1 but for runs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Unit {
    pub kind: UnitKind,
    pub layer: usize,
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub span: usize,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

impl Unit {
    pub fn attention(layer: usize) -> Unit {
        Unit { kind: UnitKind::Attention, layer, span: 1 }
    }

    pub fn mlp(layer: usize) -> Unit {
        Unit { kind: UnitKind::Mlp, layer, span: 1 }
    }

    pub fn layer(layer: usize) -> Unit {
        Unit { kind: UnitKind::Layer, layer, span: 1 }
    }

    /// Layers `layer..layer + span`; a span of 1 is a [`UnitKind::Layer`].
    pub fn run(layer: usize, span: usize) -> Unit {
        let kind = if span == 1 { UnitKind::Layer } else { UnitKind::Run };
        Unit { kind, layer, span }
    }

    /// The decoder layers the unit touches.
    pub fn layers(&self) -> std::ops::Range<usize> {
        self.layer..self.layer + self.span
    }

    /// The last decoder layer it touches.
    pub fn last(&self) -> usize {
        self.layer + self.span - 1
    }

    /// Whether it replaces a layer's attention (and so its KV cache).
    pub fn holds_attention(&self) -> bool {
        self.kind != UnitKind::Mlp
    }

    /// Whether two units replace a common part of the model (and so cannot both be taken).
    pub fn overlaps(&self, other: &Unit) -> bool {
        let shared = self.layer <= other.last() && other.layer <= self.last();
        let branches = |u: &Unit| matches!(u.kind, UnitKind::Attention | UnitKind::Mlp);
        // Attention and MLP of one layer are disjoint; anything else in a common layer is not.
        shared && !(branches(self) && branches(other) && self.kind != other.kind)
    }

    /// The unit's name in statistics files and in the initializers of its map:
    /// `layers.N` (attention, as in files of every version), `mlp.N`, `layer.N`, `run.A-B`.
    pub fn key(&self) -> String {
        match self.kind {
            UnitKind::Attention => format!("layers.{}", self.layer),
            UnitKind::Mlp => format!("mlp.{}", self.layer),
            UnitKind::Layer => format!("layer.{}", self.layer),
            UnitKind::Run => format!("run.{}-{}", self.layer, self.last()),
        }
    }
}

/// `attention 3`, `mlp 3`, `layer 3`, `run 3-5`.
impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            UnitKind::Run => write!(f, "run {}-{}", self.layer, self.last()),
            kind => write!(f, "{} {}", kind.name(), self.layer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlaps_follow_what_each_unit_replaces() {
        let (a3, m3, l3) = (Unit::attention(3), Unit::mlp(3), Unit::layer(3));
        assert!(!a3.overlaps(&m3), "attention and MLP of one layer are disjoint");
        assert!(a3.overlaps(&a3) && a3.overlaps(&l3) && m3.overlaps(&l3));
        assert!(!a3.overlaps(&Unit::attention(4)));
        let run = Unit::run(2, 3);
        assert_eq!((run.kind, run.last(), run.key()), (UnitKind::Run, 4, "run.2-4".to_string()));
        assert!(run.overlaps(&m3) && run.overlaps(&Unit::layer(4)) && !run.overlaps(&Unit::attention(5)));
        assert_eq!(Unit::run(7, 1), Unit::layer(7));
        assert_eq!(run.to_string(), "run 2-4");
        assert_eq!(Unit::attention(0).key(), "layers.0", "attention keeps the statistics files' own key");
    }

    #[test]
    fn serialised_as_kind_layer_and_span() {
        let json = serde_json::to_string(&Unit::mlp(2)).unwrap();
        assert_eq!(json, r#"{"kind":"mlp","layer":2}"#);
        let run: Unit = serde_json::from_str(r#"{"kind":"run","layer":1,"span":3}"#).unwrap();
        assert_eq!(run, Unit::run(1, 3));
    }
}
