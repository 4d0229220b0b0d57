//! Greedy generation with the KV cache, as a serving loop runs it, and how two models'
//! continuations of the same prompt agree: what `check` and `eval` compare besides next-token
//! statistics (layer pruning is known to hold up on likelihood and fall on generation).

use anyhow::{Context, Result, ensure};
use ndarray::{Array2, ArrayD, Axis};
use serde::Serialize;

use crate::engine::{Engine, Session};
use crate::logits::{self, argmax, log_softmax};
use crate::onnx::{Interface, Model, present_as_past};

/// A model loaded for greedy generation.
pub struct Decoder {
    session: Box<dyn Session>,
    interface: Interface,
    names: Vec<String>,
}

impl Decoder {
    /// Loads `model` (hidden size `hidden_size` where known) on `engine`, with room for `steps`
    /// generated tokens after a prompt.
    pub fn load(
        model: &Model,
        hidden_size: Option<usize>,
        engine: &dyn Engine,
        steps: usize,
    ) -> Result<Decoder> {
        let interface = Interface::of(model, hidden_size)?.with_decode_room(steps);
        let session = engine.load(model, &[])?;
        let names = session.output_names().to_vec();
        Ok(Decoder { session, interface, names })
    }

    /// Whether the model can generate with a cache (without one, only the prompt is run).
    pub fn has_cache(&self) -> bool {
        self.interface.has_cache()
    }

    /// Runs `prompt` (`[1, tokens]`), then `steps` greedy steps feeding the KV cache back
    /// (`present.*` as `past_key_values.*`). Returns the prompt's logits and the generated ids;
    /// none without a KV cache.
    pub fn generate(&mut self, prompt: &Array2<i64>, steps: usize) -> Result<(ArrayD<f32>, Vec<i64>)> {
        let outputs = self.session.run(&self.interface.prefill(prompt)?)?;
        let prompt_logits = logits::logits(&self.names, &outputs).context("prompt")?;
        let mut generated = Vec::new();
        if !self.interface.has_cache() {
            return Ok((prompt_logits, generated));
        }
        let mut past = present_as_past(&self.names, outputs);
        // Some exports return only the last position's logits.
        let mut last = prompt_logits.index_axis(Axis(1), prompt_logits.shape()[1] - 1).to_owned();
        for (step, length) in (prompt.ncols()..prompt.ncols() + steps).enumerate() {
            let next = argmax(last.index_axis(Axis(0), 0).iter().copied()) as i64;
            generated.push(next);
            // The last token's step runs too: it proves the cache it returns is usable.
            let outputs = self
                .session
                .run(&self.interface.decode(next, past, length)?)
                .with_context(|| format!("decode step {}", step + 1))?;
            let step_logits =
                logits::logits(&self.names, &outputs).with_context(|| format!("decode step {}", step + 1))?;
            last = step_logits.index_axis(Axis(1), 0).to_owned();
            past = present_as_past(&self.names, outputs);
        }
        Ok((prompt_logits, generated))
    }
}

/// How a model's greedy continuations agree with a reference's, prompt by prompt.
#[derive(Clone, Copy, Debug, Default)]
pub struct Continuations {
    common: u64,
    exact: u64,
    prompts: u64,
}

impl Continuations {
    /// Adds one prompt's continuations.
    pub fn add(&mut self, reference: &[i64], model: &[i64]) {
        let common = reference.iter().zip(model).take_while(|(a, b)| a == b).count();
        self.common += common as u64;
        self.exact += u64::from(common == reference.len() && reference.len() == model.len());
        self.prompts += 1;
    }

    pub fn prompts(&self) -> u64 {
        self.prompts
    }

    /// Mean length of the longest common prefix, in tokens.
    pub fn mean_common_tokens(&self) -> f64 {
        self.common as f64 / self.prompts as f64
    }

    /// Share of prompts whose continuations are identical.
    pub fn exact_match_rate(&self) -> f64 {
        self.exact as f64 / self.prompts as f64
    }
}

/// Generation agreement for reports: `{"prompts","tokens","mean_common_tokens","exact_match_rate"}`.
#[derive(Clone, Debug, Serialize)]
pub struct GenerationAgreement {
    pub prompts: u64,
    /// Tokens generated per prompt.
    pub tokens: usize,
    pub mean_common_tokens: f64,
    pub exact_match_rate: f64,
}

impl GenerationAgreement {
    pub fn of(c: &Continuations, tokens: usize) -> GenerationAgreement {
        GenerationAgreement {
            prompts: c.prompts(),
            tokens,
            mean_common_tokens: c.mean_common_tokens(),
            exact_match_rate: c.exact_match_rate(),
        }
    }
}

/// Log-softmax of the logits at every position of a one-row prompt, in f64, and the seconds the
/// engine run took (the scoring itself is not inference).
pub fn next_token_log_probs(
    interface: &Interface,
    session: &mut dyn Session,
    ids: &Array2<i64>,
) -> Result<(Vec<Vec<f64>>, f64)> {
    let inputs = interface.prefill(ids)?;
    let started = std::time::Instant::now();
    let outputs = session.run(&inputs)?;
    let seconds = started.elapsed().as_secs_f64();
    let logits = logits::logits(session.output_names(), &outputs)?;
    ensure!(
        logits.shape()[1] == ids.ncols(),
        "logits have shape {:?}; expected [1, {}, vocabulary]",
        logits.shape(),
        ids.ncols()
    );
    let vocab = logits.shape()[2];
    let flat = logits.as_standard_layout();
    let flat = flat.as_slice().expect("standard layout");
    let log_probs = flat.chunks(vocab).map(log_softmax).collect();
    Ok((log_probs, seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_common_prefix_and_exact_matches_are_counted_per_prompt() {
        let mut c = Continuations::default();
        c.add(&[1, 2, 3, 4], &[1, 2, 3, 4]);
        c.add(&[1, 2, 3, 4], &[1, 2, 9, 4]);
        c.add(&[1, 2, 3, 4], &[7, 2, 3, 4]);
        assert_eq!(c.prompts(), 3);
        assert_eq!(c.mean_common_tokens(), (4.0 + 2.0 + 0.0) / 3.0);
        assert_eq!(c.exact_match_rate(), 1.0 / 3.0);
    }
}
