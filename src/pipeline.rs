//! The order of the work, one function per command: each loads what it reads, checks where it
//! writes, and sequences the stages (calibrate → select → fit → rewrite → report for `rewrite`).
//! It owns the reports it assembles. Options arrive validated (see the binary's `cli`); errors
//! speak of quantities and files, the command line adds the flags.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

use crate::atomic::{check_output, create_dir};
use crate::calibrate::{self, Forming, LayerRange, MomentsOn, Shard, check_fingerprint};
use crate::check::{CheckOptions, CheckReport};
use crate::cost::{Cost, Optimize};
use crate::data::{DataRequest, DataSpec, Split};
use crate::detect::{DecoderLayout, find_layout};
use crate::engine::{self, Engine, EngineChoice, EngineOptions, ExecutionProvider};
use crate::fit::quantize::Quantizer;
use crate::fit::sequential::{SequentialFit, Stage, fit_sequentially};
use crate::fit::storage::{MapStorage, WeightFormat};
use crate::fit::{Fitting, LinearMap, fit_map};
use crate::inspect::Inspection;
use crate::invalid::{Invalid, Setting};
use crate::onnx::merged::{Branch, Merged};
use crate::onnx::{Interface, Model};
use crate::report::Analysis;
use crate::rewrite::{KvCache, Replacement, RewriteOptions, RewriteSummary, UnitEdit};
use crate::select::budget::{BudgetChoice, Candidate, FRONT, Goal, Target};
use crate::select::measured::MeasuredChoice;
use crate::select::{Criterion, Selection};
use crate::stats::{MomentPrecision, MomentsSource, Stats, StatsFile};
use crate::unit::{Unit, UnitKind};
use crate::{bench, eval, inspect, probe, rewrite, select};

/// Opens the engine `options` ask for and says on stderr which one actually runs.
pub fn open_engine(options: &EngineOptions) -> Result<Box<dyn Engine>> {
    let engine = engine::open(options)?;
    eprintln!("engine: {}", engine.describe());
    Ok(engine)
}

/// Every file a command reads for `model` besides `others`: the model, its external data, and
/// the data files and tokenizer `data` names.
fn files_read(model: &Model, data: Option<&DataRequest>, others: &[&Path]) -> Vec<PathBuf> {
    let mut files = model.files();
    if let Some(data) = data {
        files.extend(data.files.iter().cloned());
        files.push(
            data.tokenizer.clone().unwrap_or_else(|| crate::hub::companion(model.dir(), "tokenizer.json")),
        );
    }
    files.extend(others.iter().map(|p| p.to_path_buf()));
    files
}

fn as_paths(files: &[PathBuf]) -> Vec<&Path> {
    files.iter().map(PathBuf::as_path).collect()
}

/// What `inspect` found in `model`, and with an engine, one run proving every X and Y exists.
pub fn inspect(model: &Path, run_on: Option<&EngineOptions>) -> Result<Inspection> {
    let model = measured_graph(Model::load(model)?, "shown")?;
    let layout = find_layout(&model)?;
    let mut report = inspect::inspect(&model, layout);
    if let Some(options) = run_on {
        report.run = Some(inspect::trial_run(&model, &report.layout, open_engine(options)?.as_ref())?);
    }
    Ok(report)
}

/// The graph whose layers are walked and measured: `model` itself, or, for a merged decoder, its
/// branch without the KV cache (the one that runs the prompt), saying so; `what` the command does
/// with it.
fn measured_graph(model: Model, what: &str) -> Result<Model> {
    let Some(merged) = Merged::find(&model) else { return Ok(model) };
    let (node, condition) = merged.describe(&model);
    eprintln!(
        "note: {} is a merged decoder (If node {node:?} on {condition:?}): its branch without the KV cache \
         is {what}, and a rewrite rewrites both branches alike",
        model.path.display()
    );
    merged.branch(&model, Branch::Uncached).with_context(|| model.path.display().to_string())
}

/// How calibration runs: the data, the engine and where the moments are formed.
#[derive(Clone, Debug)]
pub struct Calibration {
    pub data: DataRequest,
    pub engine: EngineOptions,
    /// Sequences per engine run.
    pub batch: usize,
    pub moments: MomentsOn,
    /// The type each batch's products are multiplied in.
    pub moment_precision: MomentPrecision,
    /// Every N-th sequence held out of the fit (0: none).
    pub holdout_every: usize,
    /// The kinds of units measured besides attention (every unit of each kind the model has).
    pub units: Vec<UnitKind>,
}

/// Every unit of `kinds` the model has that a map can replace. A kind named on its own of which
/// none can be replaced is refused with the reason (with `all`, it is skipped with a note); single
/// units that cannot are skipped with a note per kind.
pub fn candidate_units(layout: &DecoderLayout, kinds: &[UnitKind]) -> Result<Vec<Unit>> {
    let (usable, refused) = layout.units(kinds);
    // `--units all` asks for every kind the model allows, not for each one.
    let every_kind = kinds == UnitKind::ALL;
    for &kind in kinds {
        let not: Vec<&(Unit, String)> = refused.iter().filter(|(u, _)| u.kind == kind).collect();
        let reason = not.first().map_or("the model has none", |(_, r)| r.as_str());
        if !usable.iter().any(|u| u.kind == kind) {
            if every_kind {
                eprintln!("note: no {} unit can be replaced: {reason}", kind.name());
                continue;
            }
            bail!(Invalid {
                setting: Setting::Units,
                message: format!("no {} unit can be replaced: {reason}", kind.name())
            });
        }
        match not.as_slice() {
            [] => {}
            [(unit, reason)] => eprintln!("note: {unit} is not a candidate: {reason}"),
            [(first, _), ..] => {
                eprintln!(
                    "note: {} {} units are not candidates, {first} the first: {reason}",
                    not.len(),
                    kind.name()
                )
            }
        }
    }
    Ok(usable)
}

impl Calibration {
    /// How the moments are formed on this calibration's engine.
    fn forming(&self) -> Forming {
        Forming::resolve(self.moments, self.moment_precision, self.engine.ep)
    }

    fn run(&self, shard: Shard, layers: Option<LayerRange>) -> calibrate::Run {
        calibrate::Run {
            batch: self.batch,
            shard,
            layers,
            forming: self.forming(),
            holdout_every: self.holdout_every,
        }
    }
}

/// Sequences calibrated when no count is asked for.
pub const DEFAULT_CALIBRATION_SAMPLES: usize = 256;

/// `calibrate`: measures `model` into a statistics file at `output`.
pub fn calibrate(
    model: &Path,
    calibration: &Calibration,
    shard: Shard,
    layers: Option<LayerRange>,
    output: &Path,
) -> Result<Stats> {
    let units = &calibration.units;
    let model = measured_graph(Model::load(model)?, "calibrated")?;
    check_output(output, &as_paths(&files_read(&model, Some(&calibration.data), &[])))?;
    let layout = find_layout(&model)?;
    let engine = open_engine(&calibration.engine)?;
    let data =
        calibration.data.resolve(model.dir(), Some(DEFAULT_CALIBRATION_SAMPLES), Split::Calibration)?;
    let units = candidate_units(&layout, units)?;
    let stats =
        calibrate::run(&model, &layout, &units, engine.as_ref(), &data, calibration.run(shard, layers))?;
    create_dir(output)?;
    stats.save(output)?;
    Ok(stats)
}

/// `merge-stats`: statistics of disjoint shards or layer ranges combined into `output`.
pub fn merge_stats(inputs: &[PathBuf], output: &Path) -> Result<Stats> {
    check_output(output, &as_paths(inputs))?;
    for (i, a) in inputs.iter().enumerate() {
        for b in &inputs[..i] {
            let same =
                std::fs::canonicalize(a).ok().zip(std::fs::canonicalize(b).ok()).is_some_and(|(a, b)| a == b);
            ensure!(!same, "{} is given twice: its tokens would count twice", a.display());
        }
    }
    let parts = inputs.iter().map(|p| Ok((p.clone(), Stats::load(p)?))).collect::<Result<Vec<_>>>()?;
    let merged = Stats::merge(parts)?;
    create_dir(output)?;
    merged.save(output)?;
    Ok(merged)
}

/// How layers are ranked and chosen.
#[derive(Clone, Debug)]
pub struct SelectPlan {
    pub criterion: Criterion,
    /// `None`: a quarter of the layers, rounded down, at least one.
    pub selection: Option<Selection>,
    /// The ridge `λ`.
    pub lambda: f64,
}

impl SelectPlan {
    fn selection(&self, layers: usize) -> Selection {
        self.selection.clone().unwrap_or(Selection::Count((layers / 4).max(1).min(layers)))
    }
}

/// `analyze`: every layer of `stats` fitted and ranked, checked against `model` where given; the
/// chart written to `chart`.
pub fn analyze(
    stats_path: &Path,
    select: &SelectPlan,
    spectrum: bool,
    model: Option<&Path>,
    chart: &Path,
) -> Result<Analysis> {
    // Read layer by layer: what is held does not grow with the number of layers.
    let stats = StatsFile::open(stats_path)?;
    if let Some(path) = model {
        let model = Model::load(path)?;
        check_fingerprint(&stats, stats_path, &model, &find_layout(&model)?)?;
    }
    let layers = stats.layers().iter().filter(|l| l.unit.is_none()).count();
    let selection = select.selection(layers);
    selection.check(layers, &format!("layers in {}", stats_path.display()))?;
    let analysis = crate::report::analyze(&stats, select.criterion, &selection, select.lambda, spectrum)?;
    let mut inputs = vec![stats_path.to_path_buf()];
    inputs.extend(model.map(Path::to_path_buf));
    check_output(chart, &as_paths(&inputs))?;
    create_dir(chart)?;
    crate::atomic::write(chart, analysis.svg().as_bytes()).context("writing the chart")?;
    Ok(analysis)
}

/// Everything a rewrite needs, validated.
#[derive(Clone, Debug)]
pub struct RewritePlan {
    pub model: PathBuf,
    pub output: PathBuf,
    pub report: PathBuf,
    /// Statistics to fit from; `None`: calibrate first.
    pub stats: Option<PathBuf>,
    pub calibration: Calibration,
    pub select: SelectPlan,
    /// Measured selection: text to score on (none: the calibration data) and how many sequences.
    pub probe_data: Vec<PathBuf>,
    pub probe_sequences: usize,
    pub replace: Replacement,
    pub kv: KvCache,
    pub weight_format: WeightFormat,
    pub quantizer: Quantizer,
    pub group_size: Option<usize>,
    /// Fit sequentially, this many layers per stage.
    pub stage_size: Option<usize>,
    /// Write an unchanged copy when the selection replaces no layer.
    pub allow_noop: bool,
    /// Budget mode: the units chosen by measurement within a KL budget, not layers by a criterion.
    pub budget: Option<Budget>,
}

/// A quality budget and what to save within it.
#[derive(Clone, Debug)]
pub struct Budget {
    pub limit: Limit,
    /// Stop at the least harm that reaches this predicted speed-up (of what `optimize` says).
    pub target_speedup: Option<f64>,
    pub optimize: Optimize,
    /// Text the final model's KL is confirmed on (none: the built-in held-out documents).
    pub heldout_data: Vec<PathBuf>,
}

/// How much harm a budget allows, measured on the probe sequences.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "measure", content = "max")]
pub enum Limit {
    /// The mean KL(original ‖ rewrite) over the positions.
    Kl(f64),
    /// The rewrite's perplexity over the original's, minus 1 (0.05: 5% higher).
    PplIncrease(f64),
}

impl Limit {
    pub fn max(self) -> f64 {
        match self {
            Limit::Kl(max) | Limit::PplIncrease(max) => max,
        }
    }

    /// `KL 0.2` or `a perplexity increase of 5%`.
    fn describe(self) -> String {
        match self {
            Limit::Kl(max) => format!("KL {max}"),
            Limit::PplIncrease(max) => format!("a perplexity increase of {}%", max * 100.0),
        }
    }
}

/// What a budget bought: the choice, and the final model's KL and perplexity on held-out text
/// beside its predicted speed-ups.
#[derive(Serialize)]
pub struct BudgetReport {
    #[serde(flatten)]
    pub choice: BudgetChoice,
    pub limit: Limit,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_speedup: Option<f64>,
    pub optimize: Optimize,
    pub units: Vec<Unit>,
    /// The harm (the limit's measure) on the probe sequences.
    pub probe_harm: f64,
    /// KL(original ‖ rewrite) and the perplexity increase on held-out sequences.
    pub heldout_kl: f64,
    pub heldout_ppl_increase: f64,
    pub heldout_sequences: usize,
    /// The original's cost over the rewrite's, at the predicted prompt and context.
    pub predicted_decode_speedup: f64,
    pub predicted_prefill_speedup: f64,
}

/// The selection replaced no layer and an unchanged copy was not asked for.
#[derive(Debug)]
pub struct NothingToRewrite;

impl std::fmt::Display for NothingToRewrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("nothing to rewrite: the selection replaces no layer")
    }
}

impl std::error::Error for NothingToRewrite {}

/// The rewrite report (`<stem>.nbl.json`): the analysis that chose the layers, with the models and
/// what the rewrite changed.
#[derive(Serialize)]
pub struct RewriteReport {
    #[serde(flatten)]
    pub analysis: Analysis,
    pub model: String,
    pub output: String,
    /// Where this report is written.
    pub report: String,
    /// The command that wrote it, where it ran from the command line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// What the statistics were measured on.
    pub calibration: Vec<crate::stats::DataSummary>,
    /// With measured selection, each greedy step and what the search cost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured: Option<MeasuredChoice>,
    /// In budget mode, the units chosen within it and what they bought.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetReport>,
    pub fitting: Fitting,
    /// With sequential fitting, what each stage fitted and cost.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<Stage>,
    pub rewrite: RewriteSummary,
}

/// Where a rewrite of `model` goes: `output` or `<stem>.nbl.onnx` beside the input, and `report`
/// or `<stem>.nbl.json` beside the output.
pub fn output_paths(model: &Path, output: Option<&Path>, report: Option<&Path>) -> (PathBuf, PathBuf) {
    let stem = model.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    // `-o DIR/` or an existing directory: a repository of its own, in the input's layout.
    let into_dir =
        |o: &Path| o.is_dir() || o.as_os_str().to_string_lossy().ends_with(std::path::MAIN_SEPARATOR);
    let output = match output {
        Some(dir) if into_dir(dir) => crate::hub::output_in(dir, model),
        Some(o) => o.to_path_buf(),
        None => model.with_file_name(format!("{stem}.nbl.onnx")),
    };
    let out_stem = output.file_stem().and_then(|s| s.to_str()).unwrap_or("model").trim_end_matches(".nbl");
    let report =
        report.map_or_else(|| output.with_file_name(format!("{out_stem}.nbl.json")), Path::to_path_buf);
    (output, report)
}

/// The model being rewritten, what was found in it and how its maps are stored: what every
/// stage of a rewrite reads.
struct Subject {
    model: Model,
    layout: DecoderLayout,
    storage: MapStorage,
    /// The engine and calibration data, where a stage runs the model.
    engine: Option<Box<dyn Engine>>,
    data: Option<DataSpec>,
    /// For a merged decoder, the `If` and the merged model: `model` is then its branch without
    /// the cache, which is calibrated and fitted; the branch with the cache is rewritten alike.
    merged: Option<(Merged, Model)>,
}

impl Subject {
    fn engine(&self) -> Result<&dyn Engine> {
        self.engine.as_deref().context("no engine was opened for this rewrite")
    }

    fn sequences(&self) -> Result<Vec<Vec<i64>>> {
        let data = self.data.as_ref().context("no calibration data was given for this rewrite")?;
        Ok(data.pack(self.model.dir(), self.layout.vocab_size)?.sequences)
    }
}

/// `rewrite`: calibrate (or read statistics), select, fit, rewrite, write the model and its report.
pub fn rewrite(plan: &RewritePlan) -> Result<RewriteReport> {
    let subject = rewrite_subject(plan)?;
    let candidates = candidate_units(&subject.layout, &plan.calibration.units)?;
    let stats = moments(plan, &subject, &candidates)?;
    let selection = plan.select.selection(subject.layout.layers.len());
    let mut analysis =
        crate::report::analyze(stats.as_ref(), plan.select.criterion, &selection, plan.select.lambda, false)?;
    let measured = match (plan.select.criterion, &selection) {
        (Criterion::Measured, Selection::Count(k)) => {
            let choice = choose_by_measurement(plan, &subject, &analysis, stats.as_ref(), *k)?;
            analysis.select(choice.layers());
            Some(choice)
        }
        _ => None,
    };
    let budget = match &plan.budget {
        Some(budget) => {
            let report = choose_within_budget(plan, budget, &subject, stats.as_ref(), &candidates)?;
            analysis.select(
                report.units.iter().filter(|u| u.kind == UnitKind::Attention).map(|u| u.layer).collect(),
            );
            Some(report)
        }
        None => None,
    };
    let units: Vec<Unit> = match &budget {
        Some(report) => report.units.clone(),
        None => analysis.selected.iter().map(|&l| Unit::attention(l)).collect(),
    };
    match &budget {
        Some(report) => eprintln!(
            "{} units within {}: {}",
            units.len(),
            report.limit.describe(),
            units.iter().map(Unit::to_string).collect::<Vec<_>>().join(", ")
        ),
        None => eprintln!("{}", analysis.choice()),
    }
    if units.is_empty() && !plan.allow_noop {
        bail!(NothingToRewrite);
    }
    let (fitted, stages) = match plan.stage_size {
        Some(size) => {
            let fit = fit_in_stages(plan, &subject, &analysis.selected, stats.as_ref(), size)?;
            (Some(fit.maps.into_iter().map(|(l, m)| (Unit::attention(l), m)).collect()), fit.stages)
        }
        None => (None, Vec::new()),
    };
    let fitting = if plan.stage_size.is_some() { Fitting::Sequential } else { Fitting::OneShot };
    let Subject { mut model, layout, storage, merged, .. } = subject;
    let provenance = provenance(plan, &analysis, &units, fitting, storage, stats.as_ref())?;
    let progress = crate::progress::bar(
        units.len() as u64,
        "writing maps {bar:40} {pos}/{len} units  ETA {eta}",
        "units",
    );
    let summary = {
        let fitter = Fitter { stats: stats.as_ref(), lambda: plan.select.lambda, storage };
        let maps = MapSource { fitted, fitter };
        let options = RewriteOptions { replace: plan.replace, kv: plan.kv, storage };
        match merged {
            None => rewrite::apply(
                &mut model,
                &layout,
                maps.edits(&layout, &units, &progress),
                options,
                &provenance,
            )?,
            // The same units with the same maps in the branch with the cache, found on its own
            // (its tensors are named apart); its summary has the KV cache the rewrite removed.
            Some((merged, original)) => {
                let mut cached = merged.branch(&original, Branch::Cached)?;
                let cached_layout =
                    find_layout(&cached).context("the merged decoder's branch with the cache")?;
                ensure!(
                    cached_layout.layers.len() == layout.layers.len(),
                    "the merged decoder's branches hold {} and {} attention layers",
                    cached_layout.layers.len(),
                    layout.layers.len()
                );
                let edits: Vec<UnitEdit> = maps.edits(&layout, &units, &progress).collect::<Result<_>>()?;
                let cached_edits = edits
                    .iter()
                    .zip(&units)
                    .map(|(edit, &unit)| {
                        Ok(UnitEdit { site: cached_layout.unit_site(unit)?, map: edit.map.clone() })
                    })
                    .collect::<Vec<_>>();
                rewrite::apply(&mut model, &layout, edits.into_iter().map(Ok), options, &provenance)?;
                let summary =
                    rewrite::apply(&mut cached, &cached_layout, cached_edits, options, &provenance)?;
                model = merged.join(&original, &cached, &model)?;
                summary
            }
        }
    };
    progress.finish_and_clear();
    let report = RewriteReport {
        analysis,
        model: plan.model.display().to_string(),
        output: plan.output.display().to_string(),
        report: plan.report.display().to_string(),
        command: crate::report::command_line().map(str::to_string),
        calibration: stats.data().to_vec(),
        measured,
        budget,
        fitting,
        stages,
        rewrite: summary,
    };
    write_rewrite(plan, &model, &report)?;
    Ok(report)
}

/// Loads the model, checks every output path, finds the layers, resolves the storage, and opens
/// the engine and data where a stage will run the model.
fn rewrite_subject(plan: &RewritePlan) -> Result<Subject> {
    ensure!(
        plan.output != plan.report,
        "the report {} would overwrite the model written there",
        plan.report.display()
    );
    let model = Model::load(&plan.model)?;
    let outputs: Vec<PathBuf> =
        [Some(plan.output.clone()), model.data_file_for(&plan.output), Some(plan.report.clone())]
            .into_iter()
            .flatten()
            .collect();
    let Some(merged) = Merged::find(&model) else { return subject(plan, model, &outputs) };
    let branch = measured_graph(
        Model { path: model.path.clone(), proto: model.proto.clone() },
        "calibrated and fitted",
    )?;
    let mut subject = subject(plan, branch, &outputs)?;
    subject.merged = Some((merged, model));
    Ok(subject)
}

/// [`rewrite_subject`] for a model already loaded, which writes `outputs`.
fn subject(plan: &RewritePlan, model: Model, outputs: &[PathBuf]) -> Result<Subject> {
    let stats: Vec<&Path> = plan.stats.iter().map(PathBuf::as_path).collect();
    let inputs = files_read(&model, Some(&plan.calibration.data), &stats);
    for out in outputs {
        check_output(out, &as_paths(&inputs))?;
    }
    let layout = find_layout(&model)?;
    let layers = layout.layers.len();
    plan.select.selection(layers).check(layers, &format!("attention layers of {}", plan.model.display()))?;
    let storage = MapStorage::resolve(plan.weight_format, plan.quantizer, plan.group_size, &model, &layout)?;
    if let (EngineChoice::Tract, MapStorage::Grouped { bits, .. }) = (plan.calibration.engine.engine, storage)
    {
        bail!(
            "{bits}-bit maps are com.microsoft::MatMulNBits nodes, which tract cannot run; choose float maps or ONNX Runtime"
        );
    }
    // The engine and data are needed to calibrate, by every stage after the first, and to measure.
    let runs_model = plan.stats.is_none()
        || plan.stage_size.is_some()
        || plan.select.criterion == Criterion::Measured
        || plan.budget.is_some();
    let engine = runs_model.then(|| open_engine(&plan.calibration.engine)).transpose()?;
    let data = runs_model
        .then(|| {
            plan.calibration.data.resolve(model.dir(), Some(DEFAULT_CALIBRATION_SAMPLES), Split::Calibration)
        })
        .transpose()?;
    Ok(Subject { model, layout, storage, engine, data, merged: None })
}

/// The original model's moments: the statistics file, checked against the model, or a
/// calibration run.
fn moments(plan: &RewritePlan, subject: &Subject, units: &[Unit]) -> Result<Box<dyn MomentsSource>> {
    if let Some(path) = &plan.stats {
        let stats = StatsFile::open(path)?;
        check_fingerprint(&stats, path, &subject.model, &subject.layout)?;
        return Ok(Box::new(stats));
    }
    let data = subject.data.as_ref().context("no calibration data was given for this rewrite")?;
    let run = plan.calibration.run(Shard::WHOLE, None);
    Ok(Box::new(calibrate::run(&subject.model, &subject.layout, units, subject.engine()?, data, run)?))
}

/// Measured selection: `k` of the `2k` lowest-bound layers, chosen greedily by the KL of the
/// model with them linearised, on probe sequences.
fn choose_by_measurement(
    plan: &RewritePlan,
    subject: &Subject,
    analysis: &Analysis,
    stats: &dyn MomentsSource,
    k: usize,
) -> Result<MeasuredChoice> {
    let Subject { model, layout, storage, .. } = subject;
    let sequences = probe_sequences(plan, subject, &plan.probe_data, Split::Calibration)?;
    let engine = subject.engine()?;
    let probe = probe::Probe::new(model, layout.hidden_size, engine, sequences)?;
    let candidates: Vec<usize> = analysis.order.iter().copied().take(2 * k).collect();
    let maps: Vec<(Unit, LinearMap)> = candidates
        .iter()
        .map(|&l| Ok((Unit::attention(l), fit_map(stats, Unit::attention(l), analysis.lambda, *storage)?)))
        .collect::<Result<_>>()?;
    select::measured::choose(&candidates, k, probe.tokens(), |set| {
        let chosen: Vec<(Unit, &LinearMap)> =
            maps.iter().filter(|(u, _)| set.contains(&u.layer)).map(|(u, m)| (*u, m)).collect();
        probe.mean_kl(&rewrite::linearised_copy(model, layout, &chosen, *storage)?)
    })
}

/// Budget mode: the units of `--units` the statistics hold, each scored alone on probe
/// sequences, then chosen greedily within the budget (see [`select::budget`]); the chosen set's KL
/// confirmed on held-out sequences.
fn choose_within_budget(
    plan: &RewritePlan,
    budget: &Budget,
    subject: &Subject,
    stats: &dyn MomentsSource,
    units: &[Unit],
) -> Result<BudgetReport> {
    let mut search = Search::new(plan, budget.limit, subject, stats, units)?;
    let scored = search.alone()?;
    let choice = search.choose(&scored, budget)?;
    search.confirm(budget, choice)
}

/// A budget search over the units of one model: the probe, each candidate's predicted saving, and
/// the maps of the sets it scores.
struct Search<'a> {
    plan: &'a RewritePlan,
    subject: &'a Subject,
    limit: Limit,
    probe: probe::Probe<'a>,
    original_ppl: f64,
    before: Predicted,
    candidates: Vec<Candidate>,
    fitter: Fitter<'a>,
    maps: MapCache,
}

impl<'a> Search<'a> {
    fn new(
        plan: &'a RewritePlan,
        limit: Limit,
        subject: &'a Subject,
        stats: &'a dyn MomentsSource,
        units: &[Unit],
    ) -> Result<Search<'a>> {
        let Subject { model, layout, storage, .. } = subject;
        let d = layout.hidden_size;
        if let Some(missing) = units.iter().find(|u| !stats.layers().iter().any(|t| t.unit() == **u)) {
            bail!(Invalid {
                setting: Setting::Units,
                message: format!(
                    "the statistics hold no moments of {missing}: calibrate with --units {} (or leave out --stats)",
                    plan.calibration.units.iter().map(|k| k.name()).collect::<Vec<_>>().join(",")
                ),
            });
        }
        let engine = subject.engine()?;
        let sequences = probe_sequences(plan, subject, &plan.probe_data, Split::Calibration)?;
        let probe = probe::Probe::new(model, d, engine, sequences)?;
        let original_ppl = probe.score(model)?.ppl;
        let before = Predicted::of(model, d)?;
        let optimize = plan.budget.as_ref().map_or(Optimize::Decode, |b| b.optimize);
        eprintln!("budget: {} candidate units, scored alone on {} probe tokens", units.len(), probe.tokens());
        let candidates: Vec<Candidate> = units
            .iter()
            .map(|&unit| {
                let after =
                    Predicted::of(&predicted_rewrite(model, layout, &[unit], plan.replace, *storage)?, d)?;
                Ok(Candidate { unit, saving: before.spent(optimize) - after.spent(optimize) })
            })
            .collect::<Result<_>>()?;
        let fitter = Fitter { stats, lambda: plan.select.lambda, storage: *storage };
        Ok(Search {
            plan,
            subject,
            limit,
            probe,
            original_ppl,
            before,
            candidates,
            fitter,
            maps: MapCache::default(),
        })
    }

    /// The harm of replacing `set`, in the limit's measure, on the probe.
    fn harm(&mut self, set: &[Unit]) -> Result<f64> {
        // The maps of the set scored last are kept: the chosen units' stay between steps, the
        // others are fitted as they are scored (each is d² values in f64).
        let copy = self.maps.replaced(self.subject, &self.fitter, set, self.plan.replace, KvCache::Keep)?;
        let score = self.probe.score(&copy)?;
        Ok(match self.limit {
            Limit::Kl(_) => score.kl,
            Limit::PplIncrease(_) => score.ppl / self.original_ppl - 1.0,
        })
    }

    fn alone(&mut self) -> Result<select::budget::Scored> {
        let candidates = self.candidates.clone();
        select::budget::score_alone(&candidates, |set| self.harm(set))
    }

    /// The choice within `budget` among the candidates of `scored`.
    fn choose(&mut self, scored: &select::budget::Scored, budget: &Budget) -> Result<BudgetChoice> {
        let goal = Goal {
            measure: match budget.limit {
                Limit::Kl(_) => "KL",
                Limit::PplIncrease(_) => "perplexity increase",
            },
            max_harm: budget.limit.max(),
            target: budget
                .target_speedup
                .map(|speedup| Target { speedup, spent: self.before.spent(budget.optimize) }),
        };
        let tokens = self.probe.tokens();
        select::budget::choose_from(scored, goal, FRONT, tokens, |set| self.harm(set))
    }

    /// The chosen set measured on held-out sequences, with its predicted speed-ups.
    fn confirm(&mut self, budget: &Budget, choice: BudgetChoice) -> Result<BudgetReport> {
        let (plan, subject) = (self.plan, self.subject);
        let Subject { model, layout, storage, .. } = subject;
        let d = layout.hidden_size;
        let chosen = choice.units();
        let final_copy = self.maps.replaced(subject, &self.fitter, &chosen, plan.replace, KvCache::Keep)?;
        let heldout = probe_sequences(plan, subject, &budget.heldout_data, Split::Evaluation)?;
        let heldout_count = heldout.len();
        let heldout_probe = probe::Probe::new(model, d, subject.engine()?, heldout)?;
        let heldout_score = heldout_probe.score(&final_copy)?;
        let heldout_ppl_increase = heldout_score.ppl / heldout_probe.score(model)?.ppl - 1.0;
        let after = Predicted::of(&predicted_rewrite(model, layout, &chosen, plan.replace, *storage)?, d)?;
        let speedup = |o: Optimize| self.before.spent(o) / after.spent(o);
        eprintln!(
            "budget: probe {:.5}; held-out KL {:.5}, perplexity {:+.2}% on {heldout_count} sequences; predicted \
             decode {:.3}x, prefill {:.3}x",
            choice.harm(),
            heldout_score.kl,
            100.0 * heldout_ppl_increase,
            speedup(Optimize::Decode),
            speedup(Optimize::Prefill)
        );
        let heldout_harm = match budget.limit {
            Limit::Kl(_) => heldout_score.kl,
            Limit::PplIncrease(_) => heldout_ppl_increase,
        };
        if heldout_harm > budget.limit.max() {
            eprintln!(
                "note: on held-out text the rewrite is over the budget ({}): the probe sequences are few; give \
                 more (--probe-sequences) or a tighter budget",
                budget.limit.describe()
            );
        }
        Ok(BudgetReport {
            probe_harm: choice.harm(),
            units: chosen,
            choice,
            limit: budget.limit,
            target_speedup: budget.target_speedup,
            optimize: budget.optimize,
            heldout_kl: heldout_score.kl,
            heldout_ppl_increase,
            heldout_sequences: heldout_count,
            predicted_decode_speedup: speedup(Optimize::Decode),
            predicted_prefill_speedup: speedup(Optimize::Prefill),
        })
    }
}

/// How maps are fitted: from which statistics, with which ridge, stored how.
struct Fitter<'a> {
    stats: &'a dyn MomentsSource,
    lambda: f64,
    storage: MapStorage,
}

impl Fitter<'_> {
    fn fit(&self, unit: Unit) -> Result<LinearMap> {
        fit_map(self.stats, unit, self.lambda, self.storage)
    }
}

/// The maps of the units last asked for, kept while the next set shares them.
#[derive(Default)]
struct MapCache {
    maps: Vec<(Unit, LinearMap)>,
}

impl MapCache {
    /// The subject's model with `units` replaced as `replace` says (their maps fitted where not
    /// held), the KV cache of their attention as `kv` says.
    fn replaced(
        &mut self,
        subject: &Subject,
        fitter: &Fitter,
        units: &[Unit],
        replace: Replacement,
        kv: KvCache,
    ) -> Result<Model> {
        let Subject { model, layout, .. } = subject;
        if replace == Replacement::Linear {
            self.maps.retain(|(u, _)| units.contains(u));
            for &unit in units {
                if !self.maps.iter().any(|(u, _)| *u == unit) {
                    self.maps.push((unit, fitter.fit(unit)?));
                }
            }
        }
        let edits = units.iter().map(|&unit| {
            let map = self.maps.iter().find(|(u, _)| *u == unit).map(|(_, m)| m.clone());
            Ok(UnitEdit { site: layout.unit_site(unit)?, map })
        });
        let options = RewriteOptions { replace, kv, storage: fitter.storage };
        let mut copy = Model { path: model.path.clone(), proto: model.proto.clone() };
        rewrite::apply(&mut copy, layout, edits, options, &[])?;
        Ok(copy)
    }
}

/// A model's predicted cost: its multiply-adds and weight bytes, and its KV cache per position.
struct Predicted {
    cost: Cost,
    kv_bytes_per_token: u64,
}

impl Predicted {
    fn of(model: &Model, hidden_size: usize) -> Result<Predicted> {
        let layout = find_layout(model).ok();
        Ok(Predicted {
            cost: Cost::of(model, layout.as_ref())?,
            kv_bytes_per_token: Interface::of(model, Some(hidden_size))?.kv_bytes_per_token(),
        })
    }

    fn spent(&self, optimize: Optimize) -> f64 {
        optimize.spent(&self.cost, self.kv_bytes_per_token)
    }
}

/// `model` with `units` replaced as a rewrite writes it (the KV cache of their attention dropped),
/// for its cost: the values of the maps do not change it, so they are zeros.
fn predicted_rewrite(
    model: &Model,
    layout: &DecoderLayout,
    units: &[Unit],
    replace: Replacement,
    storage: MapStorage,
) -> Result<Model> {
    let d = layout.hidden_size;
    let zero = LinearMap { w: faer::Mat::zeros(d, d), b: vec![0.0; d], second_moment: None };
    let map = (replace == Replacement::Linear).then_some(zero);
    let edits = units.iter().map(|&unit| Ok(UnitEdit { site: layout.unit_site(unit)?, map: map.clone() }));
    let mut copy = Model { path: model.path.clone(), proto: model.proto.clone() };
    let options = RewriteOptions { replace, kv: KvCache::Drop, storage: storage.rounded_to_nearest() };
    rewrite::apply(&mut copy, layout, edits, options, &[])?;
    Ok(copy)
}

/// `count` sequences (`--probe-sequences`) of `files`, or of the built-in sample's `split`
/// without any, at the calibration's sequence length.
fn probe_sequences(
    plan: &RewritePlan,
    subject: &Subject,
    files: &[PathBuf],
    split: Split,
) -> Result<Vec<Vec<i64>>> {
    let Subject { model, layout, .. } = subject;
    let mut request = plan.calibration.data.clone();
    if !files.is_empty() || split == Split::Evaluation {
        request.files = files.to_vec();
    }
    request.samples = Some(plan.probe_sequences);
    Ok(request.resolve(model.dir(), None, split)?.pack(model.dir(), layout.vocab_size)?.sequences)
}

/// Sequential fitting: each stage after the first calibrates the model with the maps fitted so
/// far in place.
fn fit_in_stages(
    plan: &RewritePlan,
    subject: &Subject,
    chosen: &[usize],
    stats: &dyn MomentsSource,
    stage_size: usize,
) -> Result<SequentialFit> {
    let Subject { model, layout, storage, .. } = subject;
    let sequences = subject.sequences()?;
    let engine = subject.engine()?;
    let forming = plan.calibration.forming();
    let d = layout.hidden_size;
    let fit = fit_sequentially(chosen, stage_size, stats, plan.select.lambda, *storage, |fitted, rest| {
        let fitted: Vec<(Unit, &LinearMap)> = fitted.iter().map(|&(l, m)| (Unit::attention(l), m)).collect();
        let staged = rewrite::linearised_copy(model, layout, &fitted, *storage)?;
        let mut measured = layout.clone();
        measured.layers.retain(|s| rest.contains(&s.layer));
        let taps = calibrate::layer_tensors(&measured);
        let moments =
            calibrate::calibrate(&staged, d, &taps, engine, &sequences, plan.calibration.batch, forming)?;
        Ok(Box::new(Stats::measured(d, taps, moments)) as Box<dyn MomentsSource>)
    })?;
    for (i, stage) in fit.stages.iter().enumerate() {
        eprintln!("stage {}: fitted layers {:?} in {:.1} s", i + 1, stage.layers, stage.seconds);
    }
    Ok(fit)
}

/// Where the chosen layers' maps come from: `fitted` where they were fitted already
/// (sequentially), else fitted from `stats` as the rewrite reaches each layer, so that one layer's
/// moments and map are held at a time, then only the map's encoding.
struct MapSource<'a> {
    fitted: Option<Vec<(Unit, LinearMap)>>,
    fitter: Fitter<'a>,
}

impl<'a> MapSource<'a> {
    /// The edits of the `chosen` units, taken one at a time.
    fn edits(
        mut self,
        layout: &'a DecoderLayout,
        chosen: &'a [Unit],
        progress: &'a indicatif::ProgressBar,
    ) -> impl Iterator<Item = Result<UnitEdit>> + 'a {
        chosen.iter().map(move |&unit| {
            progress.inc(1);
            let site = layout.unit_site(unit)?;
            let map = match &mut self.fitted {
                Some(maps) => {
                    let at = maps
                        .iter()
                        .position(|(u, _)| *u == unit)
                        .with_context(|| format!("no map of {unit}"))?;
                    maps.swap_remove(at).1
                }
                None => self.fitter.fit(unit)?,
            };
            Ok(UnitEdit { site, map: Some(map) })
        })
    }
}

/// A value as the report JSON spells it.
fn spelling(value: &impl Serialize) -> Result<String> {
    Ok(match serde_json::to_value(value)? {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    })
}

/// What the rewrite records in the model's `metadata_props`, spelt as the report spells it.
fn provenance(
    plan: &RewritePlan,
    analysis: &Analysis,
    units: &[Unit],
    fitting: Fitting,
    storage: MapStorage,
    stats: &dyn MomentsSource,
) -> Result<Vec<(&'static str, String)>> {
    let layers = analysis.selected.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(",");
    let mut props = vec![
        ("nbl.version", env!("CARGO_PKG_VERSION").to_string()),
        ("nbl.layers", layers),
        ("nbl.replace", spelling(&plan.replace)?),
        ("nbl.kv", spelling(&plan.kv)?),
        ("nbl.criterion", spelling(&analysis.criterion)?),
        ("nbl.fitting", spelling(&fitting)?),
        ("nbl.weight_format", serde_json::to_string(&storage)?),
        ("nbl.calibration", serde_json::json!({"tokens": stats.tokens(), "data": stats.data()}).to_string()),
    ];
    if units.iter().any(|u| u.kind != UnitKind::Attention) {
        props.push(("nbl.units", serde_json::to_string(units)?));
    }
    Ok(props)
}

/// Writes the rewritten model, its external data, its companion files and the report, as one set.
fn write_rewrite(plan: &RewritePlan, model: &Model, report: &RewriteReport) -> Result<()> {
    let mut set = crate::atomic::OutputSet::new();
    set.create_dir_for(&plan.output)?;
    let companion = crate::genai::Companion::prepare(model, &plan.output)?;
    model.stage(&plan.output, &mut set)?;
    if let Some(companion) = &companion {
        companion.stage(&mut set)?;
    }
    // A folder of its own gets a model card, unless it holds a README.md of someone else's.
    if let Some(companion) = companion.as_ref().filter(|c| c.writes_files()) {
        let card = companion.dir.join("README.md");
        if crate::card::may_write(&card) {
            let config: Option<serde_json::Value> =
                std::fs::read_to_string(companion.source_dir.join("config.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok());
            let rewrite = serde_json::to_value(report)?;
            let sources = crate::card::CardSources {
                rewrite: &rewrite,
                check: None,
                eval: None,
                bench: None,
                config: config.as_ref(),
            };
            set.stage_bytes(&card, crate::card::render(&sources).as_bytes())?;
        } else {
            eprintln!("note: {} is not a model card nbl-onnx wrote; it is left as it is", card.display());
        }
    }
    set.stage_bytes(&plan.report, serde_json::to_string_pretty(report)?.as_bytes())?;
    set.commit()
}

/// `check`: `model` validated, run on ONNX Runtime (`ep`) and tract, and compared with
/// `reference` where given.
pub fn check(
    model: &Path,
    reference: Option<&Path>,
    ep: ExecutionProvider,
    options: &CheckOptions,
) -> Result<CheckReport> {
    let model = Model::load(model)?;
    let tokens = options.prompts.seq_len + options.gen_tokens.max(options.decode_steps);
    crate::data::check_context(model.dir(), tokens, "a prompt with its generated tokens")?;
    let reference = reference.map(Model::load).transpose()?;
    let layout = find_layout(&model).ok();
    let ort = engine::open(&EngineOptions { engine: EngineChoice::Ort, ep, threads: None })?;
    let tract = engine::open(&EngineOptions {
        engine: EngineChoice::Tract,
        ep: ExecutionProvider::Cpu,
        threads: None,
    })?;
    crate::check::run(&model, layout.as_ref(), reference.as_ref(), ort.as_ref(), tract.as_ref(), options)
}

/// The models `eval` and `bench` compare, each for its function: exporters' shape annotations can
/// be wrong in ways that stop a runtime from decoding (see `Model::without_value_info`), a rewrite
/// carries none, and they do not change the speed (1.004x prefill, 1.002x decode on the SmolLM2
/// int4 GenAI export).
fn load_functions(paths: &[PathBuf]) -> Result<Vec<Model>> {
    paths.iter().map(|p| Ok(Model::load(p)?.without_value_info())).collect()
}

/// Greedy generation compared with the first model: `prompts` prompts, `tokens` tokens each.
#[derive(Clone, Copy, Debug)]
pub struct GenerationPlan {
    pub prompts: usize,
    pub tokens: usize,
}

/// `eval`: perplexity of every model, and KL, top-1 and generation agreement with the first.
pub fn eval(
    models: &[PathBuf],
    data: &DataRequest,
    engine: &EngineOptions,
    generation: GenerationPlan,
) -> Result<eval::Report> {
    let models = load_functions(models)?;
    // A merged decoder runs as it is (its prompt through the branch without the cache); its
    // width and vocabulary are that branch's.
    let first = Model { path: models[0].path.clone(), proto: models[0].proto.clone() };
    let layout = find_layout(&measured_graph(first, "read for its width and vocabulary")?)?;
    let spec = data.resolve(models[0].dir(), None, Split::Evaluation)?;
    let packed = spec.pack(models[0].dir(), layout.vocab_size)?;
    let engine = open_engine(engine)?;
    let hidden_size = Some(layout.hidden_size);
    let mut scores = eval::evaluate(&models, hidden_size, engine.as_ref(), &packed.sequences)?;
    if models.len() > 1 {
        let agreement = eval::generation_agreement(
            &models,
            hidden_size,
            engine.as_ref(),
            &packed.sequences,
            generation.prompts,
            generation.tokens,
        )?;
        for (score, generation) in scores.iter_mut().zip(agreement) {
            score.generation_vs_first = generation;
        }
    }
    Ok(eval::Report::new(engine.describe(), spec.seq_len, packed.sequences.len(), scores))
}

/// `bench`: every model timed on ONNX Runtime, alternately; `peak_memory` measures each alone.
pub fn bench(
    models: &[PathBuf],
    options: &bench::BenchOptions,
    peak_memory: &dyn Fn(&Model) -> Result<f64>,
) -> Result<bench::BenchReport> {
    let models = load_functions(models)?;
    for model in &models {
        crate::data::check_context(
            model.dir(),
            options.prompt_len + options.new_tokens,
            "a prompt with its generated tokens",
        )?;
    }
    let engine =
        engine::open(&EngineOptions { engine: EngineChoice::Ort, ep: options.ep, threads: options.threads })?;
    eprintln!("engine: {}", engine.describe());
    bench::bench(&models.iter().collect::<Vec<_>>(), engine.as_ref(), options, Some(peak_memory))
}

/// The peak memory of loading and running `model` (what `bench` measures in a process of its own).
pub fn peak_memory(model: &Path, options: &bench::BenchOptions) -> Result<f64> {
    let model = Model::load(model)?.without_value_info();
    let engine =
        engine::open(&EngineOptions { engine: EngineChoice::Ort, ep: options.ep, threads: options.threads })?;
    bench::peak_memory_mb(&model, engine.as_ref(), options.prompt_len)
}

/// Everything a sweep needs: the rewrite's settings (its budget is the largest of the sweep's;
/// it writes no model, so its output paths are not used), the budgets, where to write, and what
/// to measure at each point.
#[derive(Clone, Debug)]
pub struct SweepPlan {
    pub rewrite: RewritePlan,
    /// The held-out KL budgets, ascending: each curve's fastest point within each is chosen.
    pub budgets: Vec<f64>,
    /// `sweep.json`, `sweep.md` and `sweep.svg` go here.
    pub output_dir: PathBuf,
    /// The attention-only curves go on until their held-out KL passes this (above the budgets, to
    /// show them beyond).
    pub walk_kl: f64,
    pub heldout_sequences: usize,
    pub generation: GenerationPlan,
    /// Time each budget's chosen points against the original, side by side.
    pub bench: Option<bench::BenchOptions>,
    /// With `bench`, time them again after a prompt of this many tokens.
    pub long_context: Option<usize>,
}

/// The files a sweep writes into `dir`.
pub fn sweep_outputs(dir: &Path) -> [PathBuf; 3] {
    ["sweep.json", "sweep.md", "sweep.svg"].map(|f| dir.join(f))
}

/// `sweep`: the budget mode's choice at each budget among the units of `--units` (and among
/// attention alone, where more was asked for), from one scoring of every candidate alone, and, for
/// comparison, the paper's NBL (attention in CCA order), the cosine
/// order with maps, and attention dropped in the cosine order (LLM-Drop); every point measured on
/// held-out text; each curve's fastest point within each budget chosen, measured for generation,
/// and timed side by side with the original, one run per budget.
pub fn sweep(plan: &SweepPlan) -> Result<crate::sweep::SweepReport> {
    use crate::sweep::{Curve, Measured, Point, SweepReport, Timing, fastest_within};
    let started = std::time::Instant::now();
    let rw = &plan.rewrite;
    let budget = rw.budget.as_ref().context("a sweep needs a KL budget")?;
    let outputs = sweep_outputs(&plan.output_dir);
    let model = Model::load(&rw.model)?;
    // The timed prompts must fit the model before the long work starts, not after it.
    if let Some(options) = &plan.bench {
        for (prompt_len, flag) in std::iter::once((options.prompt_len, "--prompt-len"))
            .chain(plan.long_context.map(|n| (n, "--long-context")))
        {
            crate::data::check_context(
                model.dir(),
                prompt_len + options.new_tokens,
                &format!("{flag} {prompt_len} with --gen {}", options.new_tokens),
            )?;
        }
    }
    let subject = subject(rw, model, &outputs)?;
    let candidates = candidate_units(&subject.layout, &rw.calibration.units)?;
    let stats = moments(rw, &subject, &candidates)?;
    let d = subject.layout.hidden_size;
    let layers = subject.layout.layers.len();
    let analysis = crate::report::analyze(
        stats.as_ref(),
        Criterion::Cca,
        &Selection::Count(1),
        rw.select.lambda,
        false,
    )?;
    let fits: Vec<crate::nbl::LayerFit> = analysis.layers.iter().map(|r| r.fit.clone()).collect();
    let cosine_order = select::ranking(&fits, select::Ranking::Cosine);

    // The budget mode at each budget, among all the units and among attention alone: every
    // candidate scored alone once, each budget's choice made from those scores.
    let kinds = rw.calibration.units.iter().map(|k| k.name()).collect::<Vec<_>>().join(",");
    let mut search = Search::new(rw, Limit::Kl(budget.limit.max()), &subject, stats.as_ref(), &candidates)?;
    let scored = search.alone()?;
    let mut subsets =
        vec![("budget".to_string(), format!("budget: measured choice among {kinds}"), scored.clone())];
    // With several kinds, each kind's own frontier too (attention's is timed, as the paper's
    // choice of units; the others are drawn for comparison).
    if rw.calibration.units.len() > 1 {
        for &kind in &rw.calibration.units {
            let method = format!("budget-{}", kind.name());
            let describe = format!("{method}: measured choice among {} units", kind.name());
            subsets.push((method, describe, scored.only(|u| u.kind == kind)));
        }
    } else if rw.calibration.units != [UnitKind::Attention] {
        let attention = scored.only(|u| u.kind == UnitKind::Attention);
        subsets.push((
            "budget-attention".into(),
            "budget-attention: measured choice among attention".into(),
            attention,
        ));
    }
    // Per curve, the sets chosen (one per budget, each once) with their probe KL.
    type Chosen = Vec<(Vec<Unit>, f64)>;
    let mut paths: Vec<(String, String, Chosen)> = Vec::new();
    for (method, describe, subset) in subsets {
        let mut sets: Vec<(Vec<Unit>, f64)> = Vec::new();
        for &max_kl in &plan.budgets {
            let within = Budget { limit: Limit::Kl(max_kl), target_speedup: None, ..budget.clone() };
            match search.choose(&subset, &within) {
                Ok(choice) if !choice.steps.is_empty() => {
                    if !sets.iter().any(|(units, _)| *units == choice.units()) {
                        sets.push((choice.units(), choice.harm()));
                    }
                }
                Ok(_) => {}
                Err(e) if e.downcast_ref::<crate::select::budget::Unreachable>().is_some() => {
                    eprintln!("sweep: {method}: {e}");
                }
                Err(e) => return Err(e),
            }
        }
        paths.push((method, describe, sets));
    }
    drop(search);

    let engine = subject.engine()?;
    let mut heldout_plan = rw.clone();
    heldout_plan.probe_sequences = plan.heldout_sequences;
    let heldout = probe_sequences(&heldout_plan, &subject, &budget.heldout_data, Split::Evaluation)?;
    let scorer = probe::Probe::new(&subject.model, d, engine, heldout.clone())?;
    let original_ppl = scorer.score(&subject.model)?.ppl;
    let fitter = Fitter { stats: stats.as_ref(), lambda: rw.select.lambda, storage: subject.storage };
    let before = Predicted::of(&subject.model, d)?;
    let mut maps = MapCache::default();
    let mut point = |units: Vec<Unit>, replace: Replacement, probe_kl: Option<f64>| -> Result<Point> {
        let scored = scorer.score(&maps.replaced(&subject, &fitter, &units, replace, KvCache::Keep)?)?;
        let after = Predicted::of(
            &predicted_rewrite(&subject.model, &subject.layout, &units, replace, subject.storage)?,
            d,
        )?;
        Ok(Point {
            heldout: scored,
            probe_kl,
            predicted_decode_speedup: before.spent(Optimize::Decode) / after.spent(Optimize::Decode),
            predicted_prefill_speedup: before.spent(Optimize::Prefill) / after.spent(Optimize::Prefill),
            measured: Vec::new(),
            generation: None,
            units,
        })
    };
    let mut curves = Vec::new();
    for (method, describe, sets) in paths {
        let mut points = Vec::new();
        for (units, probe_kl) in sets {
            eprintln!("sweep: {method}, {} units", units.len());
            points.push(point(units, rw.replace, Some(probe_kl))?);
        }
        curves.push((method, describe, points, rw.replace));
    }
    let orders: [(&str, &str, &[usize], Replacement); 3] = [
        ("nbl", "nbl: attention in CCA order (the paper)", &analysis.order, Replacement::Linear),
        ("cosine", "cosine: attention in cosine order, linear maps", &cosine_order, Replacement::Linear),
        ("drop", "drop: attention dropped in cosine order (LLM-Drop)", &cosine_order, Replacement::Drop),
    ];
    for (method, describe, order, replace) in orders {
        let mut points = Vec::new();
        for k in 1..=layers {
            eprintln!("sweep: {method}, {k} layers");
            let p = point(order[..k].iter().map(|&l| Unit::attention(l)).collect(), replace, None)?;
            let past = p.heldout.kl > plan.walk_kl;
            points.push(p);
            if past {
                break;
            }
        }
        curves.push((method.to_string(), describe.to_string(), points, replace));
    }
    let replaces: Vec<Replacement> = curves.iter().map(|c| c.3).collect();
    let mut curves: Vec<Curve> = curves
        .into_iter()
        .map(|(method, describe, points, _)| Curve {
            shown_only: crate::sweep::shown_only(&method),
            method,
            describe,
            chosen: plan.budgets.iter().map(|&b| fastest_within(&points, b, budget.optimize)).collect(),
            points,
        })
        .collect();

    // The chosen points as a rewrite writes them, for generation and timing: each point once.
    let mut chosen: Vec<(usize, usize)> = curves
        .iter()
        .enumerate()
        .filter(|(_, curve)| !curve.shown_only)
        .flat_map(|(c, curve)| curve.chosen.iter().flatten().map(move |&p| (c, p)))
        .collect();
    chosen.sort_unstable();
    chosen.dedup();
    let mut models = vec![subject.model.without_value_info()];
    for &(c, p) in &chosen {
        let units = &curves[c].points[p].units;
        let mut model = maps.replaced(&subject, &fitter, units, replaces[c], KvCache::Drop)?;
        model.path = plan.output_dir.join(format!("{}-{}.onnx", curves[c].method, units.len()));
        models.push(model);
    }
    if chosen.is_empty() {
        eprintln!("sweep: no point of any curve is within held-out KL {}", budget.limit.max());
    } else {
        let agreement = eval::generation_agreement(
            &models,
            Some(d),
            engine,
            &heldout,
            plan.generation.prompts,
            plan.generation.tokens,
        )?;
        for (&(c, p), generation) in chosen.iter().zip(agreement.into_iter().skip(1)) {
            curves[c].points[p].generation = generation;
        }
    }
    let mut timing = None;
    if let Some(options) = &plan.bench {
        for (b, &max_kl) in plan.budgets.iter().enumerate() {
            let at: Vec<(usize, usize)> =
                chosen.iter().copied().filter(|&(c, p)| curves[c].chosen[b] == Some(p)).collect();
            if at.is_empty() {
                continue;
            }
            eprintln!("sweep: timing the points within KL {max_kl} against the original");
            // The models held for generation, not copies of them.
            let mut timed = vec![&models[0]];
            timed.extend(
                at.iter().map(|cp| &models[1 + chosen.iter().position(|x| x == cp).expect("chosen")]),
            );
            let lengths = std::iter::once(options.prompt_len).chain(plan.long_context);
            for prompt_len in lengths {
                let at_length = bench::BenchOptions { prompt_len, ..options.clone() };
                let report = bench::bench(&timed, engine, &at_length, None)?;
                for (&(c, p), t) in at.iter().zip(report.models.iter().skip(1)) {
                    curves[c].points[p].measured.push(Measured {
                        max_kl,
                        prompt_len,
                        decode_speedup: t.decode_speedup,
                        prefill_speedup: t.prefill_speedup,
                        predicted_decode_speedup: t.predicted_decode_speedup_bytes,
                    });
                }
                if prompt_len == options.prompt_len {
                    timing = Some(Timing {
                        engine: report.engine,
                        prompt_len: report.prompt_len,
                        long_context: plan.long_context,
                        new_tokens: report.new_tokens,
                        runs: report.runs,
                    });
                }
            }
        }
    }
    let report = SweepReport {
        model: rw.model.display().to_string(),
        max_kl: plan.budgets.clone(),
        optimize: budget.optimize,
        original_ppl,
        heldout_sequences: heldout.len(),
        heldout_tokens: heldout.iter().map(Vec::len).sum(),
        probe_tokens: rw.probe_sequences * heldout.first().map_or(0, Vec::len),
        curves,
        bench: timing,
        seconds: started.elapsed().as_secs_f64(),
    };
    let [json, markdown, svg] = &outputs;
    let mut set = crate::atomic::OutputSet::new();
    set.stage_bytes(json, serde_json::to_string_pretty(&report)?.as_bytes())?;
    set.stage_bytes(markdown, report.table().as_bytes())?;
    set.stage_bytes(svg, report.svg().as_bytes())?;
    set.commit()?;
    Ok(report)
}
