//! `nbl-onnx eval`: perplexity of each model on packed held-out sequences and, for every model after
//! the first, how far its next-token distributions are from the first's (mean KL divergence and
//! top-1 agreement), measured on the same tokens in the same run.

use anyhow::{Context, Result, ensure};
use ndarray::Array2;
use serde::Serialize;

use crate::engine::{Engine, Session};
use crate::generate::{Continuations, Decoder, GenerationAgreement, next_token_log_probs};
use crate::logits::Divergence;
use crate::onnx::{Interface, Model};

#[derive(Clone, Debug, Serialize)]
pub struct ModelScore {
    pub path: String,
    /// `exp(mean negative log-likelihood)` of every token after the first of each sequence.
    pub ppl: f64,
    /// Tokens scored.
    pub tokens: u64,
    /// Mean over positions of KL(first model ‖ this model); absent for the first model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl_vs_first: Option<f64>,
    /// Share of positions where this model's most likely next token is the first model's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_vs_first: Option<f64>,
    /// Tokens run through the model per second of engine time (plain inference throughput).
    pub tokens_per_s: f64,
    /// How this model's greedy continuations agree with the first model's (absent for the first
    /// model, and where a model has no KV cache).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation_vs_first: Option<GenerationAgreement>,
}

/// The eval JSON: `{"engine","seq_len","sequences","models":[...]}`, with `blocks` (the former
/// name of `sequences`) kept for one release.
#[derive(Serialize)]
pub struct Report {
    pub engine: String,
    pub seq_len: usize,
    pub sequences: usize,
    #[serde(rename = "blocks")]
    sequences_alias: usize,
    pub models: Vec<ModelScore>,
}

impl Report {
    pub fn new(engine: String, seq_len: usize, sequences: usize, models: Vec<ModelScore>) -> Report {
        Report { engine, seq_len, sequences, sequences_alias: sequences, models }
    }

    /// The readable table: one line per model.
    pub fn table(&self) -> String {
        let mut out = format!("{} sequences of {} tokens on {}\n", self.sequences, self.seq_len, self.engine);
        out.push_str(&format!(
            "{:>10}  {:>10}  {:>10}  {:>8}  {:>14}  model\n",
            "ppl", "tokens", "KL", "top-1", "gen common/id"
        ));
        for s in &self.models {
            let kl = s.kl_vs_first.map_or("-".to_string(), |v| format!("{v:.5}"));
            let top1 = s.top1_vs_first.map_or("-".to_string(), |v| format!("{v:.4}"));
            let generation = s.generation_vs_first.as_ref().map_or("-".to_string(), |g| {
                format!("{:.1}/{} {:.0}%", g.mean_common_tokens, g.tokens, 100.0 * g.exact_match_rate)
            });
            out.push_str(&format!(
                "{:>10.4}  {:>10}  {kl:>10}  {top1:>8}  {generation:>14}  {}\n",
                s.ppl, s.tokens, s.path
            ));
        }
        out
    }
}

/// How every model after the first continues the first halves of `prompts` sequences of `sequences`,
/// `tokens` tokens each, greedily, against the first model; `None` where a model has no KV cache.
pub fn generation_agreement(
    models: &[Model],
    hidden_size: Option<usize>,
    engine: &dyn Engine,
    sequences: &[Vec<i64>],
    prompts: usize,
    tokens: usize,
) -> Result<Vec<Option<GenerationAgreement>>> {
    ensure!(tokens > 0, "at least 1 token must be generated");
    let mut decoders =
        models.iter().map(|m| Decoder::load(m, hidden_size, engine, tokens)).collect::<Result<Vec<_>>>()?;
    if decoders.iter().any(|d| !d.has_cache()) {
        return Ok(models.iter().map(|_| None).collect());
    }
    let mut agreement: Vec<Continuations> = models.iter().map(|_| Continuations::default()).collect();
    for sequence in sequences.iter().take(prompts) {
        let prompt = Array2::from_shape_vec((1, sequence.len() / 2), sequence[..sequence.len() / 2].to_vec())
            .expect("one row");
        let mut first = Vec::new();
        for (i, (decoder, model)) in decoders.iter_mut().zip(models).enumerate() {
            crate::atomic::check_interrupt()?;
            let (_, generated) = decoder
                .generate(&prompt, tokens)
                .with_context(|| format!("{}: generating", model.path.display()))?;
            if i == 0 {
                first = generated;
            } else {
                agreement[i].add(&first, &generated);
            }
        }
    }
    Ok(agreement
        .iter()
        .enumerate()
        .map(|(i, c)| (i > 0).then(|| GenerationAgreement::of(c, tokens)))
        .collect())
}

/// Running sums for one model.
#[derive(Default)]
struct Tally {
    nll: f64,
    divergence: Divergence,
    tokens: u64,
    seconds: f64,
}

/// Scores `models` (of one architecture, hidden size `hidden_size` where known) on `sequences` (each a
/// row of token ids), one sequence at a time.
pub fn evaluate(
    models: &[Model],
    hidden_size: Option<usize>,
    engine: &dyn Engine,
    sequences: &[Vec<i64>],
) -> Result<Vec<ModelScore>> {
    ensure!(!models.is_empty(), "no models to evaluate");
    ensure!(
        !sequences.is_empty() && sequences[0].len() >= 2,
        "evaluation needs sequences of at least 2 tokens"
    );
    let interfaces: Vec<Interface> =
        models.iter().map(|m| Interface::of(m, hidden_size)).collect::<Result<_>>()?;
    let mut sessions: Vec<Box<dyn Session>> =
        models.iter().map(|m| engine.load(m, &[])).collect::<Result<_>>()?;
    let mut tallies: Vec<Tally> = models.iter().map(|_| Tally::default()).collect();
    let progress = crate::progress::bar(
        (sequences.len() * models.len()) as u64,
        "evaluating {bar:40} {pos}/{len} model-sequences  {rate}  ETA {eta}",
        "sequences",
    );
    for (b, sequence) in sequences.iter().enumerate() {
        let ids = Array2::from_shape_vec((1, sequence.len()), sequence.clone()).expect("one row");
        let mut reference: Option<Vec<Vec<f64>>> = None;
        for (i, (model, session)) in models.iter().zip(&mut sessions).enumerate() {
            crate::atomic::check_interrupt()?;
            let (log_probs, seconds) = next_token_log_probs(&interfaces[i], session.as_mut(), &ids)
                .with_context(|| format!("{}: sequence {b}", model.path.display()))?;
            let tally = &mut tallies[i];
            tally.seconds += seconds;
            // Position t predicts token t+1.
            for (t, lp) in log_probs.iter().take(sequence.len() - 1).enumerate() {
                let next = sequence[t + 1] as usize;
                ensure!(
                    next < lp.len(),
                    "token id {next} is outside the vocabulary of {}",
                    model.path.display()
                );
                tally.nll -= lp[next];
                tally.tokens += 1;
            }
            match &reference {
                None => reference = Some(log_probs),
                Some(first) => {
                    ensure!(
                        first[0].len() == log_probs[0].len(),
                        "{} has another vocabulary size",
                        model.path.display()
                    );
                    for (p, q) in first.iter().zip(&log_probs) {
                        tally.divergence.add(p, q);
                    }
                }
            }
            progress.inc(1);
        }
    }
    progress.finish_and_clear();
    Ok(models
        .iter()
        .zip(&tallies)
        .enumerate()
        .map(|(i, (model, t))| ModelScore {
            path: model.path.display().to_string(),
            ppl: (t.nll / t.tokens as f64).exp(),
            tokens: t.tokens,
            kl_vs_first: (i > 0).then(|| t.divergence.mean_kl()),
            top1_vs_first: (i > 0).then(|| t.divergence.top1_agreement()),
            tokens_per_s: (sequences.len() * sequences[0].len()) as f64 / t.seconds,
            generation_vs_first: None,
        })
        .collect())
}
