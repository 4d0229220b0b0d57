//! How far a candidate model's next-token distributions are from the original's, on a few probe
//! sequences: the score measured selection chooses by. The original's log-probabilities are
//! computed once and held (positions × vocabulary, in f32); each candidate is run and compared a
//! sequence at a time.

use anyhow::{Result, ensure};
use ndarray::Array2;

use crate::engine::Engine;
use crate::generate::next_token_log_probs;
use crate::logits::argmax;
use crate::onnx::{Interface, Model};

/// How a model compares with the original on the probe sequences.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct ProbeScore {
    /// Mean `KL(original ‖ model)` over the positions.
    pub kl: f64,
    /// Share of positions where both predict the same next token.
    pub top1: f64,
    /// The model's perplexity on the sequences' own next tokens.
    pub ppl: f64,
}

/// The original model's next-token log-probabilities on the probe sequences.
pub struct Probe<'a> {
    engine: &'a dyn Engine,
    interface: Interface,
    sequences: Vec<Vec<i64>>,
    reference: Vec<Vec<f32>>,
}

impl<'a> Probe<'a> {
    /// Runs `original` on `sequences` (token windows not used to fit the maps) on `engine`;
    /// `hidden_size` sizes the KV-cache inputs where the interface cannot tell.
    pub fn new(
        original: &Model,
        hidden_size: usize,
        engine: &'a dyn Engine,
        sequences: Vec<Vec<i64>>,
    ) -> Result<Probe<'a>> {
        ensure!(!sequences.is_empty(), "measuring a model needs at least one probe sequence");
        let interface = Interface::of(original, Some(hidden_size))?;
        let mut probe = Probe { engine, interface, sequences, reference: Vec::new() };
        let mut reference = Vec::new();
        probe.for_each_sequence(original, |positions| {
            reference
                .extend(positions.into_iter().map(|lp| lp.into_iter().map(|v| v as f32).collect::<Vec<_>>()))
        })?;
        probe.reference = reference;
        Ok(probe)
    }

    /// Tokens one scoring reads.
    pub fn tokens(&self) -> usize {
        self.sequences.iter().map(Vec::len).sum()
    }

    /// Mean over the probe positions of `KL(original ‖ model)`, in f64.
    pub fn mean_kl(&self, model: &Model) -> Result<f64> {
        Ok(self.score(model)?.kl)
    }

    /// `model` against the original on the probe sequences: the mean KL and top-1 agreement over
    /// every position, and its perplexity on the positions that have a next token.
    pub fn score(&self, model: &Model) -> Result<ProbeScore> {
        let mut positions = self.reference.iter();
        let (mut kl, mut agree, mut nll, mut predicted) = (0.0, 0usize, 0.0, 0usize);
        let mut tokens = self.sequences.iter();
        self.for_each_sequence(model, |sequence| {
            let ids = tokens.next().expect("one per sequence");
            for (t, (q, p)) in sequence.iter().zip(positions.by_ref()).enumerate() {
                kl += p.iter().zip(q).map(|(&a, &b)| f64::from(a).exp() * (f64::from(a) - b)).sum::<f64>();
                agree += usize::from(argmax(p.iter().copied()) == argmax(q.iter().copied()));
                if let Some(&next) = ids.get(t + 1) {
                    nll -= q.get(next as usize).copied().unwrap_or(f64::NEG_INFINITY);
                    predicted += 1;
                }
            }
        })?;
        let n = self.reference.len().max(1) as f64;
        Ok(ProbeScore { kl: kl / n, top1: agree as f64 / n, ppl: (nll / predicted.max(1) as f64).exp() })
    }

    /// Runs `model` on every probe sequence and hands `each` its next-token log-probabilities,
    /// position by position.
    fn for_each_sequence(&self, model: &Model, mut each: impl FnMut(Vec<Vec<f64>>)) -> Result<()> {
        let mut session = self.engine.load(model, &[])?;
        for sequence in &self.sequences {
            let ids = Array2::from_shape_vec((1, sequence.len()), sequence.clone())?;
            each(next_token_log_probs(&self.interface, session.as_mut(), &ids)?.0);
        }
        Ok(())
    }
}
