//! `nbl-onnx bench`: prefill latency and greedy decode throughput with the KV cache, batch 1, models
//! run alternately after a warm-up so that machine noise falls on all of them alike; medians over
//! runs. Peak memory is measured with each model loaded and run alone.

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use ndarray::{Array2, Axis};
use serde::Serialize;

use crate::check::{argmax, sample_prompt};
use crate::engine::{Engine, Session, decode_inputs, prefill_inputs, present_as_past};
use crate::onnx::Model;
use crate::rewrite::kv_bytes_per_token;

#[derive(Clone, Debug, Serialize)]
pub struct ModelTiming {
    pub path: String,
    /// Median prefill latency of `prompt_len` tokens, in milliseconds.
    pub prefill_ms: f64,
    /// Median greedy decode throughput with the KV cache, in tokens per second.
    pub decode_tok_s: f64,
    /// Peak resident memory of the process with this model alone loaded and run once, in MiB.
    pub peak_mem_mb: f64,
    pub kv_bytes_per_token: u64,
}

pub struct BenchOptions {
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub runs: usize,
}

/// One prefill and `gen` decode steps; returns (prefill seconds, decode seconds).
fn one_run(
    model: &Model,
    session: &mut dyn Session,
    prompt: &Array2<i64>,
    new_tokens: usize,
) -> Result<(f64, f64)> {
    let names = session.output_names().to_vec();
    let logits_at = names.iter().position(|n| n == "logits").context("the model has no \"logits\" output")?;
    let inputs = prefill_inputs(model, prompt)?;
    let start = Instant::now();
    let outputs = session.run(&inputs)?;
    let prefill = start.elapsed().as_secs_f64();
    ensure!(
        names.iter().any(|n| n.starts_with("present")),
        "{} has no KV cache: decode throughput needs one",
        model.path.display()
    );
    let mut past = present_as_past(&names, &outputs);
    let mut logits = outputs[logits_at].to_f32()?;
    let start = Instant::now();
    for length in prompt.ncols()..prompt.ncols() + new_tokens {
        let last = logits.index_axis(Axis(1), logits.shape()[1] - 1);
        let next = argmax(last.index_axis(Axis(0), 0).iter().copied()) as i64;
        let outputs = session.run(&decode_inputs(model, next, &past, length)?)?;
        past = present_as_past(&names, &outputs);
        logits = outputs[logits_at].to_f32()?;
    }
    Ok((prefill, start.elapsed().as_secs_f64()))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// Peak RSS of this process since the last reset, in MiB (Linux `VmHWM`).
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Resets the peak-RSS mark (`echo 5 > /proc/self/clear_refs`).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

pub fn bench(models: &[Model], engine: &dyn Engine, options: &BenchOptions) -> Result<Vec<ModelTiming>> {
    ensure!(
        options.runs > 0 && options.new_tokens > 0 && options.prompt_len > 0,
        "--runs, --gen and --prompt-len must be positive"
    );
    let vocab = crate::blocks::find_blocks(&models[0]).ok().and_then(|b| b.vocab_size).unwrap_or(2);
    let prompt = sample_prompt(options.prompt_len, vocab);

    // Memory: each model alone, loaded and run once.
    let mut peaks = Vec::new();
    for model in models {
        reset_peak_rss();
        let mut session = engine.load(model, &[])?;
        one_run(model, session.as_mut(), &prompt, options.new_tokens.min(4))?;
        drop(session);
        peaks.push(peak_rss_mb().unwrap_or(f64::NAN));
    }

    // Timing: all loaded, a warm-up run each, then alternating runs.
    let mut sessions: Vec<Box<dyn Session>> =
        models.iter().map(|m| engine.load(m, &[])).collect::<Result<_>>()?;
    for (model, session) in models.iter().zip(&mut sessions) {
        one_run(model, session.as_mut(), &prompt, options.new_tokens)?;
    }
    let mut prefill: Vec<Vec<f64>> = vec![Vec::new(); models.len()];
    let mut decode: Vec<Vec<f64>> = vec![Vec::new(); models.len()];
    for run in 0..options.runs {
        for (i, (model, session)) in models.iter().zip(&mut sessions).enumerate() {
            crate::atomic::check_interrupt()?;
            let (p, d) = one_run(model, session.as_mut(), &prompt, options.new_tokens)?;
            prefill[i].push(p * 1e3);
            decode[i].push(options.new_tokens as f64 / d);
            eprintln!(
                "run {}/{}: {} prefill {:.1} ms, decode {:.1} tokens/s",
                run + 1,
                options.runs,
                model.path.display(),
                p * 1e3,
                options.new_tokens as f64 / d
            );
        }
    }
    models
        .iter()
        .enumerate()
        .map(|(i, model)| {
            Ok(ModelTiming {
                path: model.path.display().to_string(),
                prefill_ms: median(prefill[i].clone()),
                decode_tok_s: median(decode[i].clone()),
                peak_mem_mb: peaks[i],
                kv_bytes_per_token: kv_bytes_per_token(model)?,
            })
        })
        .collect()
}
