//! `nbl-onnx bench`: prefill latency and greedy decode throughput with the KV cache, batch 1, models
//! run alternately after a warm-up so that machine noise falls on all of them alike; medians over
//! runs. Peak memory is measured with each model loaded and run alone in a fresh process (memory a
//! process has freed stays resident, so one process cannot measure several models).

use std::fmt::Write;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use ndarray::{Array2, Axis};
use serde::Serialize;

use crate::cost::Cost;
use crate::data::sample_prompt;
use crate::detect::{DecoderLayout, find_layout};
use crate::engine::{Engine, ExecutionProvider, StatefulSession};
use crate::logits::{self, argmax};
use crate::onnx::merged::{Branch, Merged};
use crate::onnx::{Interface, Model, Tensor};

#[derive(Clone, Debug, Serialize)]
pub struct ModelTiming {
    pub path: String,
    /// Median prefill latency of `prompt_len` tokens, in milliseconds.
    pub prefill_ms: f64,
    /// Median greedy decode throughput with the KV cache, in tokens per second.
    pub decode_tok_s: f64,
    /// Every timed run, in order (the spread shows how noisy the machine was).
    pub prefill_ms_runs: Vec<f64>,
    pub decode_tok_s_runs: Vec<f64>,
    /// Peak resident memory of a process that loads this model alone and runs it once, in MiB
    /// (measured by [`peak_memory_mb`] in a fresh process; absent where not measured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_mem_mb: Option<f64>,
    pub kv_bytes_per_token: u64,
    /// Multiply-adds of the prefill and of a mean decode step, counted from the graph.
    pub prefill_gmacs: f64,
    pub decode_mmacs_per_token: f64,
    /// Bytes a mean decode step reads: stored weights once and the KV cache at that context.
    pub decode_mbytes_per_token: f64,
    /// Speed-ups over the first model: measured, and predicted by the multiply-add counts.
    pub prefill_speedup: f64,
    pub decode_speedup: f64,
    pub predicted_prefill_speedup: f64,
    pub predicted_decode_speedup: f64,
    /// The decode speed-up the bytes read predict (memory-bound decoding).
    pub predicted_decode_speedup_bytes: f64,
}

/// Measures a model's peak memory (in a process of its own).
pub type PeakMemory<'a> = &'a dyn Fn(&Model) -> Result<f64>;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub runs: usize,
    /// Where the engine runs and with how many threads: what the fresh process measuring peak
    /// memory is given too.
    pub ep: ExecutionProvider,
    pub threads: Option<usize>,
}

/// A model to time, with what is read off it once.
struct Subject<'m> {
    model: &'m Model,
    layout: Option<DecoderLayout>,
    interface: Interface,
    /// What its cost is counted on: the model itself, or a merged decoder's branch with the cache
    /// (with an empty cache it computes what the other branch computes for a prompt).
    counted: Option<Model>,
}

impl Subject<'_> {
    fn of(model: &Model, decode_steps: usize) -> Result<Subject<'_>> {
        let counted = match Merged::find(model) {
            Some(merged) => Some(merged.branch(model, Branch::Cached)?),
            None => None,
        };
        let layout = find_layout(counted.as_ref().unwrap_or(model)).ok();
        let interface =
            Interface::of(model, layout.as_ref().map(|b| b.hidden_size))?.with_decode_room(decode_steps);
        ensure!(
            interface.has_cache(),
            "{} has no KV cache: decode throughput needs one",
            model.path.display()
        );
        Ok(Subject { model, layout, interface, counted })
    }

    /// The benchmark prompt: `len` ids drawn from the model's vocabulary (2 when it cannot be told).
    fn prompt(&self, len: usize) -> Array2<i64> {
        sample_prompt(len, self.layout.as_ref().and_then(|b| b.vocab_size).unwrap_or(2))
    }
}

/// One prefill and `gen` decode steps; returns (prefill seconds, decode seconds). The KV cache
/// stays in the engine between steps, as a serving runtime keeps it (ONNX Runtime: I/O binding, in
/// the execution provider's memory), and only the logits come back; the decode time includes what a
/// serving loop must do between steps (argmax, the next step's inputs) and nothing more.
fn one_run(
    interface: &Interface,
    session: &mut dyn StatefulSession,
    prompt: &Array2<i64>,
    new_tokens: usize,
) -> Result<(f64, f64)> {
    let (inputs, cache) = interface.split_cache(interface.prefill(prompt)?);
    session.reset(cache)?;
    let start = Instant::now();
    let logits = session.step(&inputs)?;
    let prefill = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut next = last_argmax(&logits[0])?;
    for length in prompt.ncols()..prompt.ncols() + new_tokens {
        next = last_argmax(&session.step(&interface.decode_inputs(next, length))?[0])?;
    }
    Ok((prefill, start.elapsed().as_secs_f64()))
}

/// `model` loaded with its KV cache as the state that stays in the engine, the logits fetched.
fn load(model: &Model, interface: &Interface, engine: &dyn Engine) -> Result<Box<dyn StatefulSession>> {
    let outputs: Vec<String> = model.graph().output.iter().map(|o| o.name().to_string()).collect();
    let logits = outputs[logits::position(&outputs)?].clone();
    engine.load_stateful(model, &interface.cache_pairs(), &[logits])
}

/// The greedy next token: argmax of the last position's logits ([batch, positions, vocab]).
fn last_argmax(logits: &Tensor) -> Result<i64> {
    ensure!(
        logits.shape().len() == 3,
        "logits have shape {:?}, expected [batch, positions, vocab]",
        logits.shape()
    );
    let row = |a: &ndarray::ArrayD<f32>| {
        argmax(a.index_axis(Axis(1), a.shape()[1] - 1).index_axis(Axis(0), 0).iter().copied())
    };
    Ok(match logits {
        Tensor::F32(a) => row(a),
        other => row(&other.to_f32()?),
    } as i64)
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

/// Peak resident memory of this process after loading `model` and running a prefill and four
/// decode steps, in MiB. Meant for a fresh process that has run nothing else: the hidden
/// process the command line starts for each model.
pub fn peak_memory_mb(model: &Model, engine: &dyn Engine, prompt_len: usize) -> Result<f64> {
    let subject = Subject::of(model, 4)?;
    let mut session = load(model, &subject.interface, engine)?;
    one_run(&subject.interface, session.as_mut(), &subject.prompt(prompt_len), 4)?;
    peak_rss_mb().context("cannot read VmHWM from /proc/self/status")
}

/// Times every model (alternately, after a warm-up run each), then measures each one's peak
/// memory with `peak_memory` where given (in a fresh process: see [`peak_memory_mb`]).
pub fn bench(
    models: &[&Model],
    engine: &dyn Engine,
    options: &BenchOptions,
    peak_memory: Option<PeakMemory>,
) -> Result<BenchReport> {
    ensure!(
        options.runs > 0 && options.new_tokens > 0 && options.prompt_len > 0,
        "the runs, the tokens generated and the prompt's length must be positive"
    );
    let subjects = models.iter().map(|m| Subject::of(m, options.new_tokens)).collect::<Result<Vec<_>>>()?;
    let prompt = subjects[0].prompt(options.prompt_len);

    // Timing: all loaded, a warm-up run each, then alternating runs.
    let mut sessions: Vec<Box<dyn StatefulSession>> =
        subjects.iter().map(|s| load(s.model, &s.interface, engine)).collect::<Result<_>>()?;
    for (subject, session) in subjects.iter().zip(&mut sessions) {
        one_run(&subject.interface, session.as_mut(), &prompt, options.new_tokens)?;
    }
    let mut prefill: Vec<Vec<f64>> = vec![Vec::new(); models.len()];
    let mut decode: Vec<Vec<f64>> = vec![Vec::new(); models.len()];
    for run in 0..options.runs {
        for (i, (subject, session)) in subjects.iter().zip(&mut sessions).enumerate() {
            crate::atomic::check_interrupt()?;
            let (p, d) = one_run(&subject.interface, session.as_mut(), &prompt, options.new_tokens)?;
            prefill[i].push(p * 1e3);
            decode[i].push(options.new_tokens as f64 / d);
            eprintln!(
                "run {}/{}: {} prefill {:.1} ms, decode {:.1} tokens/s",
                run + 1,
                options.runs,
                subject.model.path.display(),
                p * 1e3,
                options.new_tokens as f64 / d
            );
        }
    }
    let costs = subjects
        .iter()
        .map(|s| Cost::of(s.counted.as_ref().unwrap_or(s.model), s.layout.as_ref()))
        .collect::<Result<Vec<_>>>()?;
    let prefill_ms: Vec<f64> = prefill.iter().cloned().map(median).collect();
    let decode_tok_s: Vec<f64> = decode.iter().cloned().map(median).collect();
    let prefill_macs: Vec<f64> = costs.iter().map(|c| c.prefill(options.prompt_len)).collect();
    let decode_macs: Vec<f64> =
        costs.iter().map(|c| c.decode_step(options.prompt_len, options.new_tokens)).collect();
    let context = options.prompt_len as f64 + (options.new_tokens as f64 + 1.0) / 2.0;
    let decode_bytes: Vec<f64> = costs
        .iter()
        .zip(&subjects)
        .map(|(c, s)| c.decode_bytes(context, s.interface.kv_bytes_per_token()))
        .collect();
    let timings = subjects
        .iter()
        .enumerate()
        .map(|(i, subject)| {
            Ok(ModelTiming {
                path: subject.model.path.display().to_string(),
                prefill_ms: prefill_ms[i],
                decode_tok_s: decode_tok_s[i],
                prefill_ms_runs: prefill[i].clone(),
                decode_tok_s_runs: decode[i].clone(),
                peak_mem_mb: peak_memory.map(|measure| measure(subject.model)).transpose()?,
                kv_bytes_per_token: subject.interface.kv_bytes_per_token(),
                prefill_gmacs: prefill_macs[i] / 1e9,
                decode_mmacs_per_token: decode_macs[i] / 1e6,
                decode_mbytes_per_token: decode_bytes[i] / 1e6,
                prefill_speedup: prefill_ms[0] / prefill_ms[i],
                decode_speedup: decode_tok_s[i] / decode_tok_s[0],
                predicted_prefill_speedup: prefill_macs[0] / prefill_macs[i],
                predicted_decode_speedup: decode_macs[0] / decode_macs[i],
                predicted_decode_speedup_bytes: decode_bytes[0] / decode_bytes[i],
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(BenchReport {
        ep: options.ep.to_string(),
        engine: engine.describe(),
        threads: options.threads,
        prompt_len: options.prompt_len,
        new_tokens: options.new_tokens,
        runs: options.runs,
        models: timings,
    })
}

/// The bench JSON: `{"ep","engine","threads","prompt_len","gen","runs","models":[...]}`.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub ep: String,
    pub engine: String,
    pub threads: Option<usize>,
    pub prompt_len: usize,
    /// Tokens generated (`gen` in the JSON, as on the command line).
    #[serde(rename = "gen")]
    pub new_tokens: usize,
    pub runs: usize,
    pub models: Vec<ModelTiming>,
}

impl BenchReport {
    /// The readable table of a bench run.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "prompt {} tokens, {} generated, median of {} runs on {}",
            self.prompt_len, self.new_tokens, self.runs, self.engine
        );
        let _ = writeln!(
            out,
            "{:>10}  {:>12}  {:>17}  {:>25}  {:>8}  {:>12}  model",
            "prefill ms",
            "decode tok/s",
            "prefill x (MACs)",
            "decode x (MACs, bytes)",
            "peak MiB",
            "KV bytes/tok"
        );
        for t in &self.models {
            let _ = writeln!(
                out,
                "{:>10.1}  {:>12.2}  {:>17}  {:>25}  {:>8}  {:>12}  {}",
                t.prefill_ms,
                t.decode_tok_s,
                format!("{:.3} ({:.3})", t.prefill_speedup, t.predicted_prefill_speedup),
                format!(
                    "{:.3} ({:.3}, {:.3})",
                    t.decode_speedup, t.predicted_decode_speedup, t.predicted_decode_speedup_bytes
                ),
                t.peak_mem_mb.map_or("-".to_string(), |m| format!("{m:.0}")),
                t.kv_bytes_per_token,
                t.path
            );
        }
        out
    }
}
