//! `nbl-onnx check`: is a (rewritten) model well formed, does it run on both engines, does a short
//! greedy decode with its KV cache work, and how far are its next-token distributions from a
//! reference model's. Made to gate CI: failures are listed, and any failure is exit code 1.

use std::collections::HashSet;
use std::fmt::Write;

use anyhow::{Context, Result, anyhow, ensure};
use ndarray::{Array2, ArrayD};
use serde::Serialize;

use crate::data::DataSpec;
use crate::data::sample_prompt;
use crate::detect::DecoderLayout;
use crate::engine::{Engine, Unsupported};
use crate::generate::{Continuations, Decoder, GenerationAgreement};
use crate::logits::{Divergence, log_softmax};
use crate::onnx::model::{external_location, tensor_shape};
use crate::onnx::{DType, GraphIndex, Interface, Model};

/// What `check` found: problems (any makes it fail) and measurements.
#[derive(Debug, Default, Serialize)]
pub struct CheckReport {
    pub model: String,
    pub problems: Vec<String>,
    pub runs: Vec<EngineRun>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<Agreement>,
    /// What was not checked, and why (steps skipped; no quality gate set).
    pub notes: Vec<String>,
    /// Whether a quality gate (`--max-kl`, `--min-top1`) was set: without one, passing says only that
    /// the model is well formed and runs.
    pub gated: bool,
}

#[derive(Debug, Serialize)]
pub struct EngineRun {
    pub engine: String,
    /// `ok`, `failed: ...` or `unsupported: ...` (tract lacks some operators; not a failure).
    pub status: RunStatus,
    /// Tokens decoded greedily after the prompt, when the model has a KV cache.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub decoded: Vec<i64>,
}

/// How a model fared on one engine.
#[derive(Clone, Debug, PartialEq)]
pub enum RunStatus {
    Ok,
    /// The engine does not implement an operator the model uses: reported, not failed, unless
    /// the engine runs the reference.
    Unsupported(String),
    Failed(String),
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunStatus::Ok => f.write_str("ok"),
            RunStatus::Unsupported(why) => write!(f, "unsupported: {why}"),
            RunStatus::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

/// Written as one string: `ok`, `unsupported: …` or `failed: …`.
impl Serialize for RunStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Next-token agreement with a reference model on the same prompts, and how their greedy
/// continuations agree.
#[derive(Debug, Serialize)]
pub struct Agreement {
    pub reference: String,
    pub positions: usize,
    pub max_abs_logit_diff: f64,
    /// Mean over positions of KL(reference ‖ model) of the next-token distributions.
    pub mean_kl: f64,
    pub top1_agreement: f64,
    /// Absent when a model has no KV cache to generate with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<GenerationAgreement>,
}

impl CheckReport {
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Structural validation: every node input provided and produced before use (the stored order is
/// topological), opsets imported for every domain used, initializers consistent with their dims and
/// used, graph inputs used, graph outputs produced.
pub fn structure(model: &Model) -> Vec<String> {
    let graph = model.graph();
    let mut problems = Vec::new();
    let index = match GraphIndex::new(graph) {
        Ok(index) => index,
        Err(e) => return vec![format!("{e:#}")],
    };
    let mut available: HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
    available.extend(graph.input.iter().map(|v| v.name()));
    for node in &graph.node {
        for input in node.input.iter().filter(|i| !i.is_empty()) {
            if !available.contains(input.as_str()) {
                let produced = index.id(input).and_then(|id| index.producer(id)).is_some();
                problems.push(if produced {
                    format!(
                        "node {:?} ({}) reads {input:?} before it is produced",
                        node.name(),
                        node.op_type()
                    )
                } else {
                    format!(
                        "node {:?} ({}) reads {input:?}, which nothing provides",
                        node.name(),
                        node.op_type()
                    )
                });
            }
        }
        available.extend(node.output.iter().filter(|o| !o.is_empty()).map(String::as_str));
        let domain = node.domain();
        if model.opset(domain).is_none() {
            problems.push(format!(
                "node {:?} ({}) uses domain {domain:?}, which is not imported",
                node.name(),
                node.op_type()
            ));
        }
    }
    for t in &graph.initializer {
        if !index.id(t.name()).is_some_and(|id| index.is_read(id)) {
            problems.push(format!("initializer {:?} is not used", t.name()));
        }
        let Ok(shape) = tensor_shape(t) else {
            problems.push(format!("initializer {:?} has a negative dimension", t.name()));
            continue;
        };
        let expected = DType::from_onnx(t.data_type()).size().map(|s| s * shape.iter().product::<usize>());
        let stored = match external_location(t) {
            Ok(Some(loc)) => loc.length.map(|l| l as usize),
            Ok(None) => t.raw_data.as_ref().map(|r| r.len()),
            Err(e) => {
                problems.push(format!("{e:#}"));
                continue;
            }
        };
        if let (Some(expected), Some(stored)) = (expected, stored)
            && expected != stored
        {
            problems.push(format!(
                "initializer {:?} holds {stored} bytes; its dims and type need {expected}",
                t.name()
            ));
        }
    }
    for v in &graph.input {
        if !index.id(v.name()).is_some_and(|id| index.is_read(id)) {
            problems.push(format!("graph input {:?} is not used", v.name()));
        }
    }
    for v in &graph.output {
        let known = index.id(v.name()).is_some_and(|id| {
            index.producer(id).is_some() || index.is_graph_input(id) || index.is_initializer(id)
        });
        if !known {
            problems.push(format!("graph output {:?} is not produced", v.name()));
        }
    }
    problems
}

/// What `check` runs and gates on.
pub struct CheckOptions {
    /// Natural text to prompt with (sequences of the prompt length, as many as prompts wanted).
    pub prompts: DataSpec,
    pub decode_steps: usize,
    /// Tokens generated greedily from every prompt by the model and the reference.
    pub gen_tokens: usize,
    pub gates: Gates,
}

/// The quality gates: a check with a reference fails when any set is not met.
#[derive(Clone, Copy, Debug, Default)]
pub struct Gates {
    /// The most mean KL divergence from the reference allowed.
    pub max_kl: Option<f64>,
    /// The least top-1 agreement with the reference allowed.
    pub min_top1: Option<f64>,
    /// The fewest tokens the greedy continuations may share on average.
    pub min_common_tokens: Option<f64>,
}

impl Gates {
    /// Each gate by its name (as the report and the command line call it) and its limit.
    fn named(&self) -> [(&'static str, Option<f64>); 3] {
        [("max-kl", self.max_kl), ("min-top1", self.min_top1), ("min-common-tokens", self.min_common_tokens)]
    }

    fn any(&self) -> bool {
        self.named().iter().any(|(_, v)| v.is_some())
    }

    /// What the agreement fails of these gates.
    fn failures(&self, agreement: &Agreement) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(max) = self.max_kl
            && agreement.mean_kl > max
        {
            problems.push(format!("mean KL {:.4e} exceeds the max-kl gate {max}", agreement.mean_kl));
        }
        if let Some(min) = self.min_top1
            && agreement.top1_agreement < min
        {
            problems.push(format!(
                "top-1 agreement {:.4} is below the min-top1 gate {min}",
                agreement.top1_agreement
            ));
        }
        match (&agreement.generation, self.min_common_tokens) {
            (Some(g), Some(min)) if g.mean_common_tokens < min => problems.push(format!(
                "the continuations share {:.2} tokens on average, below the min-common-tokens gate {min}",
                g.mean_common_tokens
            )),
            (None, Some(_)) => problems.push(
                "the min-common-tokens gate is set, but a model has no KV cache to generate with".to_string(),
            ),
            _ => {}
        }
        problems
    }
}

/// The prompts: blocks of natural text, or, without a tokenizer beside the model, synthetic ids
/// (with a note: agreement on them says little).
fn prompts(
    model: &Model,
    layout: Option<&DecoderLayout>,
    spec: &DataSpec,
    notes: &mut Vec<String>,
) -> Result<Vec<Array2<i64>>> {
    let vocab = layout.and_then(|b| b.vocab_size);
    let no_tokenizer =
        spec.tokenizer.is_none() && !crate::hub::companion(model.dir(), "tokenizer.json").is_file();
    if no_tokenizer && spec.files.is_empty() {
        notes.push(format!(
            "no tokenizer.json beside the model: the prompt is {} synthetic token ids, on which agreement with \
             the reference says little (name a tokenizer)",
            spec.seq_len
        ));
        return Ok(vec![sample_prompt(spec.seq_len, vocab.unwrap_or(2))]);
    }
    let packed = spec.pack(model.dir(), vocab)?;
    Ok(packed
        .sequences
        .into_iter()
        .map(|b| Array2::from_shape_vec((1, b.len()), b).expect("one row"))
        .collect())
}

/// Fails unless the options can be checked with.
fn validate(options: &CheckOptions) -> Result<()> {
    ensure!(options.prompts.seq_len > 0, "a prompt must hold at least 1 token");
    ensure!(options.gen_tokens > 0, "at least 1 token must be generated");
    for (gate, value) in options.gates.named() {
        if let Some(v) = value {
            ensure!(v.is_finite() && v >= 0.0, "the {gate} gate must be a finite number ≥ 0, not {v}");
        }
    }
    if let Some(min) = options.gates.min_common_tokens {
        ensure!(
            min <= options.gen_tokens as f64,
            "the min-common-tokens gate {min} is more than the {} tokens generated",
            options.gen_tokens
        );
    }
    Ok(())
}

/// Checks `model` (whose layers are `layout`, where any are left): its structure, a prompt and a
/// greedy decode on ONNX Runtime (`ort`) and tract, and, with a `reference`, the agreement of
/// their next-token distributions and the gates. tract lacks some operators: a model it cannot
/// build is reported, not failed, unless tract runs the reference (then the rewrite broke
/// portability); a model tract fails on, at load or at run, is reported the same way where it
/// fails on the reference too.
pub fn run(
    model: &Model,
    layout: Option<&DecoderLayout>,
    reference: Option<&Model>,
    ort: &dyn Engine,
    tract: &dyn Engine,
    options: &CheckOptions,
) -> Result<CheckReport> {
    validate(options)?;
    // The reference stands for its function: its exporter's shape annotations are hints the
    // rewrite does not carry, and a wrong one must not keep it from decoding.
    let reference = reference.map(Model::without_value_info);
    let reference = reference.as_ref();
    let hidden_size = layout.map(|b| b.hidden_size);
    let mut report = CheckReport {
        model: model.path.display().to_string(),
        problems: structure(model),
        gated: options.gates.any(),
        ..Default::default()
    };
    if options.decode_steps > 0 && Interface::of(model, hidden_size).is_ok_and(|i| !i.has_cache()) {
        report.notes.push(format!(
            "the model has no KV cache: the {} decode steps were skipped",
            options.decode_steps
        ));
    }
    if !report.gated {
        report.notes.push(
            "no quality gate set (max-kl, min-top1, min-common-tokens): passing says the model is well \
             formed and runs, not that it agrees with its reference"
                .to_string(),
        );
    }
    let prompts = prompts(model, layout, &options.prompts, &mut report.notes)?;
    let trial = Trial { model, reference, hidden_size, prompt: &prompts[0], steps: options.decode_steps };
    // ONNX Runtime is what the comparison runs on: it must run the model. tract is a second
    // opinion: where it cannot run the reference either, that is said, not failed.
    for (engine, second_opinion) in [(ort, false), (tract, true)] {
        let (run, problem) = trial.on(engine, second_opinion);
        report.problems.extend(problem);
        report.runs.push(run);
    }
    let ran = report.runs.iter().any(|r| r.status == RunStatus::Ok);
    let decodes: Vec<&Vec<i64>> =
        report.runs.iter().filter(|r| !r.decoded.is_empty()).map(|r| &r.decoded).collect();
    if decodes.len() == 2 && decodes[0] != decodes[1] {
        report
            .problems
            .push(format!("ONNX Runtime and tract decode differently: {:?} vs {:?}", decodes[0], decodes[1]));
    }
    if let (Some(reference), true) = (reference, ran) {
        match compare(model, reference, hidden_size, ort, &prompts, options.gen_tokens) {
            Ok((agreement, note)) => {
                report.notes.extend(note);
                report.problems.extend(options.gates.failures(&agreement));
                report.reference = Some(agreement);
            }
            Err(e) => report.problems.push(format!("comparing with {}: {e:#}", reference.path.display())),
        }
    }
    Ok(report)
}

/// One model's prompt and greedy decode, tried on an engine.
struct Trial<'a> {
    model: &'a Model,
    reference: Option<&'a Model>,
    hidden_size: Option<usize>,
    prompt: &'a Array2<i64>,
    steps: usize,
}

impl Trial<'_> {
    /// How the model fared on `engine`, and the problem that makes, if any. On a
    /// `second_opinion` engine, a failure the reference shares (at load or at run) is the
    /// engine's limit, not the model's: reported, not failed.
    fn on(&self, engine: &dyn Engine, second_opinion: bool) -> (EngineRun, Option<String>) {
        let run = |status, decoded| EngineRun { engine: engine.describe(), status, decoded };
        let e = match run_and_decode(self.model, self.hidden_size, engine, self.prompt, self.steps) {
            Ok((_, decoded)) => return (run(RunStatus::Ok, decoded), None),
            Err(e) => e,
        };
        if second_opinion
            && e.downcast_ref::<Unsupported>().is_none()
            && let Some(reference) = self.reference
            && let Err(on_reference) =
                run_and_decode(reference, self.hidden_size, engine, self.prompt, self.steps)
        {
            let first_line = format!("{on_reference:#}").lines().next().unwrap_or("").to_string();
            let why = format!(
                "{} cannot run this model, nor its reference {}: {first_line}",
                engine.describe(),
                reference.path.display()
            );
            return (run(RunStatus::Unsupported(why), vec![]), None);
        }
        // Without a reference, the model checked is the original as far as `check` knows: a
        // second engine that cannot run it says something about the engine, not the model.
        if second_opinion && self.reference.is_none() && e.downcast_ref::<Unsupported>().is_none() {
            let first_line = format!("{e:#}").lines().next().unwrap_or("").to_string();
            let why = format!("{} cannot run this model: {first_line}", engine.describe());
            return (run(RunStatus::Unsupported(why), vec![]), None);
        }
        if e.downcast_ref::<Unsupported>().is_some() {
            let reference_runs = self.reference.is_some_and(|r| {
                run_and_decode(r, self.hidden_size, engine, self.prompt, self.steps).is_ok()
            });
            let problem = reference_runs
                .then(|| format!("{} runs the reference but not this model: {e:#}", engine.describe()));
            let first_line = format!("{e:#}").lines().next().unwrap_or("").to_string();
            return (run(RunStatus::Unsupported(first_line), vec![]), problem);
        }
        let mut problem = format!("{}: {e:#}", engine.describe());
        if !self.model.graph().value_info.is_empty()
            && run_and_decode(
                &self.model.without_value_info(),
                self.hidden_size,
                engine,
                self.prompt,
                self.steps,
            )
            .is_ok()
        {
            problem.push_str(
                " (it runs without the model's value_info: the exporter's shape annotations of \
                 intermediate tensors are wrong; a `nbl-onnx rewrite` output carries none)",
            );
        }
        (run(RunStatus::Failed(format!("{e:#}")), vec![]), Some(problem))
    }
}

impl CheckReport {
    /// The readable report: one line per engine, the agreement, every problem, the verdict.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for run in &self.runs {
            let decoded =
                if run.decoded.is_empty() { String::new() } else { format!(", decoded {:?}", run.decoded) };
            let _ = writeln!(out, "{}: {}{decoded}", run.engine, run.status);
        }
        if let Some(a) = &self.reference {
            let _ = writeln!(
                out,
                "vs {}: {} positions, max |Δlogit| {:.4e}, mean KL {:.4e}, top-1 agreement {:.4}",
                a.reference, a.positions, a.max_abs_logit_diff, a.mean_kl, a.top1_agreement
            );
            if let Some(g) = &a.generation {
                let _ = writeln!(
                    out,
                    "greedy continuations of {} tokens from {} prompts: {:.2} tokens in common on average, {:.0}% identical",
                    g.tokens,
                    g.prompts,
                    g.mean_common_tokens,
                    100.0 * g.exact_match_rate
                );
            }
        }
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        for p in &self.problems {
            let _ = writeln!(out, "FAIL: {p}");
        }
        let verdict = match (self.passed(), self.gated) {
            (false, _) => "check failed",
            (true, true) => "check passed",
            (true, false) => "check passed (no quality gate set)",
        };
        let _ = writeln!(out, "{verdict}");
        out
    }
}

/// Runs the prompt and then `steps` greedy decode steps (see [`Decoder::generate`]).
pub fn run_and_decode(
    model: &Model,
    hidden_size: Option<usize>,
    engine: &dyn Engine,
    prompt: &Array2<i64>,
    steps: usize,
) -> Result<(ArrayD<f32>, Vec<i64>)> {
    Decoder::load(model, hidden_size, engine, steps)?.generate(prompt, steps)
}

/// The agreement of `model` with `reference` on every prompt: next-token distributions at every
/// position, and greedy continuations of `gen_tokens` tokens where both can generate (else a note
/// says why not).
fn compare(
    model: &Model,
    reference: &Model,
    hidden_size: Option<usize>,
    engine: &dyn Engine,
    prompts: &[Array2<i64>],
    gen_tokens: usize,
) -> Result<(Agreement, Option<String>)> {
    let mut ours = Decoder::load(model, hidden_size, engine, gen_tokens)?;
    let mut theirs = Decoder::load(reference, hidden_size, engine, gen_tokens)?;
    let mut note = None;
    let mut generate = ours.has_cache() && theirs.has_cache();
    if !generate {
        note = Some("a model has no KV cache: the continuations were not compared".to_string());
    } else if let Err(e) = theirs.generate(&prompts[0], gen_tokens) {
        // What the reference cannot do, its rewrite is not asked to.
        note = Some(format!(
            "the reference cannot generate with its KV cache, so continuations were not compared: {e:#}"
        ));
        generate = false;
    }
    let steps = if generate { gen_tokens } else { 0 };
    let (mut max_diff, mut divergence, mut continuations) =
        (0f64, Divergence::default(), Continuations::default());
    for prompt in prompts {
        let (logits, generated) = ours.generate(prompt, steps)?;
        let (ref_logits, ref_generated) = theirs.generate(prompt, steps).context("the reference")?;
        max_diff = max_diff.max(add_positions(&mut divergence, &ref_logits, &logits)?);
        if generate {
            continuations.add(&ref_generated, &generated);
        }
    }
    let agreement = Agreement {
        reference: reference.path.display().to_string(),
        positions: divergence.positions() as usize,
        max_abs_logit_diff: max_diff,
        mean_kl: divergence.mean_kl(),
        top1_agreement: divergence.top1_agreement(),
        generation: generate.then(|| GenerationAgreement::of(&continuations, gen_tokens)),
    };
    Ok((agreement, note))
}

/// Adds every position of two runs' logits to `divergence`; returns their largest difference.
fn add_positions(divergence: &mut Divergence, reference: &ArrayD<f32>, model: &ArrayD<f32>) -> Result<f64> {
    ensure!(
        reference.shape() == model.shape(),
        "logits shapes differ: {:?} vs {:?}",
        reference.shape(),
        model.shape()
    );
    let vocab =
        reference.shape().last().copied().filter(|&v| v > 0).ok_or_else(|| anyhow!("empty logits"))?;
    let (r, m) = (reference.as_standard_layout(), model.as_standard_layout());
    let (r, m) = (r.as_slice().expect("standard layout"), m.as_slice().expect("standard layout"));
    let mut max_diff: f64 = 0.0;
    for (p, q) in r.chunks(vocab).zip(m.chunks(vocab)) {
        for (a, b) in p.iter().zip(q) {
            max_diff = max_diff.max(f64::from((a - b).abs()));
        }
        divergence.add(&log_softmax(p), &log_softmax(q));
    }
    Ok(max_diff)
}

/// Compares next-token distributions at every prompt position.
pub fn agreement(reference_name: &str, reference: &ArrayD<f32>, model: &ArrayD<f32>) -> Result<Agreement> {
    let mut divergence = Divergence::default();
    let max_abs_logit_diff = add_positions(&mut divergence, reference, model)?;
    Ok(Agreement {
        reference: reference_name.to_string(),
        positions: divergence.positions() as usize,
        max_abs_logit_diff,
        mean_kl: divergence.mean_kl(),
        top1_agreement: divergence.top1_agreement(),
        generation: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_logits_agree_fully_and_different_ones_do_not() {
        let a = ArrayD::from_shape_vec(vec![1, 2, 3], vec![1.0, 2.0, 3.0, 0.0, 0.0, 0.0]).unwrap();
        let same = agreement("ref", &a, &a).unwrap();
        assert_eq!((same.mean_kl, same.top1_agreement, same.max_abs_logit_diff), (0.0, 1.0, 0.0));
        let b = ArrayD::from_shape_vec(vec![1, 2, 3], vec![3.0, 2.0, 1.0, 0.0, 0.0, 0.0]).unwrap();
        let diff = agreement("ref", &a, &b).unwrap();
        // KL(p‖q) for p = softmax(1,2,3), q = softmax(3,2,1): Σ p (log p − log q) = 2·(p3 − p1).
        let z: f64 = [1f64, 2.0, 3.0].iter().map(|v| v.exp()).sum();
        let expected = 2.0 * (3f64.exp() - 1f64.exp()) / z / 2.0; // second position contributes 0
        assert!((diff.mean_kl - expected).abs() < 1e-12, "{} vs {expected}", diff.mean_kl);
        assert_eq!(diff.top1_agreement, 0.5);
        assert_eq!(diff.max_abs_logit_diff, 2.0);
    }
}
