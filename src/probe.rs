//! How far a candidate model's next-token distributions are from the original's, on a few probe
//! sequences: the score measured selection chooses by. The original's log-probabilities are
//! computed once and held (positions × vocabulary, in f32); each candidate is run and compared a
//! sequence at a time.

use anyhow::{Result, ensure};
use ndarray::Array2;

use crate::engine::Engine;
use crate::generate::next_token_log_probs;
use crate::onnx::{Interface, Model};

/// The original model's next-token log-probabilities on the probe sequences.
pub struct Probe<'a> {
    engine: &'a dyn Engine,
    interface: Interface,
    sequences: &'a [Vec<i64>],
    reference: Vec<Vec<f32>>,
}

impl<'a> Probe<'a> {
    /// Runs `original` on `sequences` (token windows not used to fit the maps) on `engine`;
    /// `hidden_size` sizes the KV-cache inputs where the interface cannot tell.
    pub fn new(
        original: &Model,
        hidden_size: usize,
        engine: &'a dyn Engine,
        sequences: &'a [Vec<i64>],
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
        let mut positions = self.reference.iter();
        let mut total = 0.0;
        self.for_each_sequence(model, |sequence| {
            for (q, p) in sequence.iter().zip(positions.by_ref()) {
                total += p.iter().zip(q).map(|(&a, &b)| f64::from(a).exp() * (f64::from(a) - b)).sum::<f64>();
            }
        })?;
        Ok(total / self.reference.len().max(1) as f64)
    }

    /// Runs `model` on every probe sequence and hands `each` its next-token log-probabilities,
    /// position by position.
    fn for_each_sequence(&self, model: &Model, mut each: impl FnMut(Vec<Vec<f64>>)) -> Result<()> {
        let mut session = self.engine.load(model, &[])?;
        for sequence in self.sequences {
            let ids = Array2::from_shape_vec((1, sequence.len()), sequence.clone())?;
            each(next_token_log_probs(&self.interface, session.as_mut(), &ids)?.0);
        }
        Ok(())
    }
}
