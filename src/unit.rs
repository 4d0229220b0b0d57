//! What a rewrite can replace by one affine map of the residual stream: a **unit**. Attention
//! (NBL) and the MLP are one branch of one decoder layer; a layer, or a run of consecutive layers
//! (ReplaceMe), is a stretch of the stream from the layer's input to the last one's output. A fold
//! removes a run of layers too, and folds its map into the previous layer's MLP down-projection,
//! as ReplaceMe does, so that it costs nothing at inference.

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
    /// 1 to 4 consecutive layers removed, their map applied to the previous layer's MLP output
    /// and folded into its down-projection (ReplaceMe's zero-cost form)
    Fold,
}

impl UnitKind {
    pub const ALL: [UnitKind; 5] =
        [UnitKind::Attention, UnitKind::Mlp, UnitKind::Layer, UnitKind::Run, UnitKind::Fold];

    pub fn name(self) -> &'static str {
        match self {
            UnitKind::Attention => "attention",
            UnitKind::Mlp => "mlp",
            UnitKind::Layer => "layer",
            UnitKind::Run => "run",
            UnitKind::Fold => "fold",
        }
    }
}

/// One unit: its kind, its first decoder layer and how many layers it spans (1 but for runs and
/// folds). A fold's layers are the ones it removes; the MLP it folds into is the layer before.
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

    /// Layers `layer..layer + span` removed, their map folded into layer `layer − 1`'s MLP.
    pub fn fold(layer: usize, span: usize) -> Unit {
        Unit { kind: UnitKind::Fold, layer, span }
    }

    /// The decoder layers the unit replaces whole or in part (for a fold, the ones it removes).
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

    /// The branches of the model the unit replaces: `(layer, is_mlp)`. A fold replaces the MLP
    /// it folds into as well as every branch of the layers it removes.
    fn parts(&self) -> Vec<(usize, bool)> {
        match self.kind {
            UnitKind::Attention => vec![(self.layer, false)],
            UnitKind::Mlp => vec![(self.layer, true)],
            UnitKind::Layer | UnitKind::Run | UnitKind::Fold => {
                let folded = (self.kind == UnitKind::Fold).then(|| (self.layer.wrapping_sub(1), true));
                folded.into_iter().chain(self.layers().flat_map(|l| [(l, false), (l, true)])).collect()
            }
        }
    }

    /// Whether two units replace a common part of the model (and so cannot both be taken).
    pub fn overlaps(&self, other: &Unit) -> bool {
        let theirs = other.parts();
        self.parts().iter().any(|p| theirs.contains(p))
    }

    /// The unit's name in statistics files and in the initializers of its map:
    /// `layers.N` (attention, as in files of every version), `mlp.N`, `layer.N`, `run.A-B`,
    /// `fold.A-B`.
    pub fn key(&self) -> String {
        match self.kind {
            UnitKind::Attention => format!("layers.{}", self.layer),
            UnitKind::Mlp => format!("mlp.{}", self.layer),
            UnitKind::Layer => format!("layer.{}", self.layer),
            UnitKind::Run => format!("run.{}-{}", self.layer, self.last()),
            UnitKind::Fold => format!("fold.{}-{}", self.layer, self.last()),
        }
    }
}

/// `attention 3`, `mlp 3`, `layer 3`, `run 3-5`, `fold 3-5`.
impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            UnitKind::Run | UnitKind::Fold => {
                write!(f, "{} {}-{}", self.kind.name(), self.layer, self.last())
            }
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
    fn a_fold_overlaps_the_mlp_it_folds_into_and_the_layers_it_removes() {
        let fold = Unit::fold(3, 2);
        assert_eq!(
            (fold.key(), fold.to_string(), fold.layers()),
            ("fold.3-4".to_string(), "fold 3-4".into(), 3..5)
        );
        assert!(
            fold.overlaps(&Unit::mlp(2)) && fold.overlaps(&Unit::layer(2)) && fold.overlaps(&Unit::run(1, 2))
        );
        assert!(!fold.overlaps(&Unit::attention(2)), "the attention before the folded MLP stays");
        assert!(fold.overlaps(&Unit::attention(4)) && !fold.overlaps(&Unit::mlp(5)));
        assert!(fold.overlaps(&Unit::fold(5, 1)), "the next fold's MLP is removed by this one");
        assert!(!fold.overlaps(&Unit::fold(6, 1)) && !Unit::fold(1, 1).overlaps(&Unit::attention(0)));
    }

    #[test]
    fn serialised_as_kind_layer_and_span() {
        let json = serde_json::to_string(&Unit::mlp(2)).unwrap();
        assert_eq!(json, r#"{"kind":"mlp","layer":2}"#);
        let run: Unit = serde_json::from_str(r#"{"kind":"run","layer":1,"span":3}"#).unwrap();
        assert_eq!(run, Unit::run(1, 3));
    }
}
