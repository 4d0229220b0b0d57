//! The command line's arguments: one clap struct per subcommand, and the groups they share
//! (engine, data, layer selection), validated once into the pipeline's plans. The rules that
//! join flags live here, and so do the flag names: the library speaks of quantities.

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use clap::{Parser, Subcommand};

use nbl_onnx::bench::BenchOptions;
use nbl_onnx::calibrate::{LayerRange, MomentsOn, Shard};
use nbl_onnx::check::{CheckOptions, Gates};
use nbl_onnx::cost::Optimize;
use nbl_onnx::data::{DataRequest, DataSpec, Split};
use nbl_onnx::engine::{EngineChoice, EngineOptions, ExecutionProvider};
use nbl_onnx::fit::quantize::Quantizer;
use nbl_onnx::fit::storage::WeightFormat;
use nbl_onnx::nbl::DEFAULT_LAMBDA;
use nbl_onnx::onnx::Model;
use nbl_onnx::pipeline::{
    Budget, Calibration, GenerationPlan, Limit, RewritePlan, SelectPlan, SweepPlan, output_paths,
};
use nbl_onnx::rewrite::{KvCache, Replacement};
use nbl_onnx::select::{Criterion, Selection};
use nbl_onnx::stats::MomentPrecision;
use nbl_onnx::unit::UnitKind;

#[derive(Parser)]
#[command(name = "nbl-onnx", version, about = "Neural Block Linearization for ONNX LLM exports")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// List the decoder layers' attention blocks: the tensors X entering and Y leaving each one
    Inspect(InspectArgs),
    /// Measure every attention block on calibration text into a statistics file
    Calibrate(CalibrateArgs),
    /// Combine statistics of disjoint data shards, or of disjoint layer ranges, into what one run
    /// over all of it gives
    MergeStats(MergeArgs),
    /// Rank layers by their CCA bound and fit the linear maps, from a statistics file
    Analyze(AnalyzeArgs),
    /// Replace the most linear attention blocks by MatMul + Add and write the new model
    Rewrite(RewriteArgs),
    /// Validate a model, run it on ONNX Runtime and tract with a short KV-cache decode, and
    /// compare it with a reference; exit code 1 on any failure or gate
    Check(CheckArgs),
    /// Perplexity of each model on held-out text, and KL divergence and top-1 agreement of every
    /// model after the first with the first
    Eval(EvalArgs),
    /// Prefill latency and greedy decode throughput with the KV cache (batch 1), models run
    /// alternately, medians over runs
    Bench(BenchArgs),
    /// The frontier of speed against quality: the budget's measured choice among units and the
    /// attention-only methods, every point on held-out text, the fastest within the budget timed
    Sweep(SweepArgs),
    /// Write the model card (README.md) of a rewrite again, with the check, eval and bench reports
    /// measured on it since
    Card(CardArgs),
    /// Print a shell's completion script (e.g. `nbl-onnx completions bash > /etc/bash_completion.d/nbl-onnx`)
    Completions(CompletionsArgs),
    /// Print the manual page, in roff (e.g. `nbl-onnx man > nbl-onnx.1; man ./nbl-onnx.1`)
    Man,
    /// Write a statistics file of a given size without calibrating, for benchmarks at scale
    #[command(hide = true)]
    SyntheticStats(SyntheticStatsArgs),
}

#[derive(clap::Args)]
pub struct CardArgs {
    /// The rewrite's report (<stem>.nbl.json)
    pub report: PathBuf,
    /// `check --json` output of the rewritten model against the original
    #[arg(long)]
    pub check: Option<PathBuf>,
    /// `eval --json` output (the original first, the rewrite next)
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// `bench --json` output (the original first, the rewrite next)
    #[arg(long)]
    pub bench: Option<PathBuf>,
    /// Where the card goes (default: README.md where the rewrite's config and tokenizer are)
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete in
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(clap::Args)]
pub struct SweepArgs {
    /// The ONNX model (never modified)
    pub model: PathBuf,
    /// Statistics from calibrate (with the --units asked for); without it the model is calibrated first
    #[arg(long)]
    pub stats: Option<PathBuf>,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
    /// The budgets, comma-separated: each curve's fastest point within each held-out KL is chosen
    #[arg(long, value_parser = positive, value_delimiter = ',', required = true)]
    pub max_kl: Vec<f64>,
    /// How far the attention-only curves go: until their held-out KL passes this (default: twice
    /// the largest budget)
    #[arg(long, value_parser = positive)]
    pub walk_kl: Option<f64>,
    /// What the budget saves: bytes per decode step, or prefill multiply-adds
    #[arg(long, value_enum, default_value_t = Optimize::Decode)]
    pub optimize: Optimize,
    /// Sequences of --seq-len tokens the budget search scores candidates on
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    pub probe_sequences: usize,
    /// Held-out text every point is measured on (default: the built-in C4 sample's documents 200-299)
    #[arg(long, num_args = 1..)]
    pub heldout_data: Vec<PathBuf>,
    /// Held-out sequences of --seq-len tokens every point is measured on
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    pub heldout_sequences: usize,
    /// Ridge λ (see rewrite)
    #[arg(long, default_value_t = DEFAULT_LAMBDA, value_parser = non_negative)]
    pub lambda: f64,
    /// Prompts the chosen points continue greedily, against the original
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    pub gen_prompts: usize,
    /// Tokens each chosen point generates per prompt
    #[arg(long, default_value_t = 16, value_parser = at_least_one)]
    pub gen_tokens: usize,
    /// Time the chosen points and the original side by side (bench: alternating runs)
    #[arg(long)]
    pub bench: bool,
    /// Prompt tokens of each timed run, with --bench
    #[arg(long, default_value_t = 512, value_parser = at_least_one, requires = "bench")]
    pub prompt_len: usize,
    /// Tokens generated in each timed run, with --bench
    #[arg(long = "gen", default_value_t = 128, value_parser = at_least_one, requires = "bench")]
    pub new_tokens: usize,
    /// Timed runs per model, with --bench
    #[arg(long, default_value_t = 3, value_parser = at_least_one, requires = "bench")]
    pub runs: usize,
    /// Also time the chosen points after a prompt of this many tokens, with --bench: decoding
    /// over a long KV cache, where removing attention saves the most
    #[arg(long, value_parser = at_least_one, requires = "bench")]
    pub long_context: Option<usize>,
    /// Directory for sweep.json, sweep.md and sweep.svg (default: <stem>.sweep beside the model)
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Print the JSON report instead of the table
    #[arg(long)]
    pub json: bool,
}

impl SweepArgs {
    pub fn plan(&self) -> Result<SweepPlan> {
        let stem = self.model.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
        let output_dir =
            self.output.clone().unwrap_or_else(|| self.model.with_file_name(format!("{stem}.sweep")));
        let mut budgets = self.max_kl.clone();
        budgets.sort_by(f64::total_cmp);
        budgets.dedup();
        let largest = *budgets.last().expect("required");
        let walk_kl = self.walk_kl.unwrap_or(2.0 * largest);
        ensure!(walk_kl >= largest, "--walk-kl {walk_kl} is below the largest budget {largest}");
        let unused = output_dir.join("sweep.json");
        let rewrite = RewritePlan {
            model: self.model.clone(),
            output: unused.clone(),
            report: unused,
            stats: self.stats.clone(),
            calibration: self.calibration.calibration(),
            select: SelectPlan { criterion: Criterion::Cca, selection: None, lambda: self.lambda },
            probe_data: Vec::new(),
            probe_sequences: self.probe_sequences,
            replace: Replacement::Linear,
            kv: KvCache::Drop,
            weight_format: WeightFormat::Auto,
            quantizer: Quantizer::Gptq,
            group_size: None,
            stage_size: None,
            allow_noop: false,
            budget: Some(Budget {
                limit: Limit::Kl(largest),
                target_speedup: None,
                optimize: self.optimize,
                heldout_data: self.heldout_data.clone(),
            }),
        };
        Ok(SweepPlan {
            rewrite,
            budgets,
            output_dir,
            walk_kl,
            heldout_sequences: self.heldout_sequences,
            generation: GenerationPlan { prompts: self.gen_prompts, tokens: self.gen_tokens },
            bench: self.bench.then(|| BenchOptions {
                prompt_len: self.prompt_len,
                new_tokens: self.new_tokens,
                runs: self.runs,
                ep: self.calibration.engine.options().ep,
                threads: None,
            }),
            long_context: self.long_context,
        })
    }
}

#[derive(clap::Args)]
pub struct InspectArgs {
    /// The ONNX model (.onnx; external data is read from beside it)
    pub model: PathBuf,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
    /// Also run the model once on an engine and check every X and Y it computes
    #[arg(long)]
    pub run: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// Where models run.
#[derive(clap::Args)]
pub struct EngineArgs {
    /// Engine: ONNX Runtime, tract, or ONNX Runtime when its library loads and tract otherwise
    #[arg(long, value_enum, default_value_t = EngineChoice::Auto)]
    pub engine: EngineChoice,
    /// ONNX Runtime execution provider; one that cannot be registered is an error
    #[arg(long, value_enum, default_value_t = ExecutionProvider::Cpu)]
    pub ep: ExecutionProvider,
    /// Intra-op threads (default: the engine's choice)
    #[arg(long)]
    pub threads: Option<usize>,
}

impl EngineArgs {
    pub fn options(&self) -> EngineOptions {
        EngineOptions { engine: self.engine, ep: self.ep, threads: self.threads }
    }
}

/// Text data and how it is cut into blocks (calibrate, rewrite, eval).
#[derive(clap::Args)]
pub struct DataArgs {
    /// Data files: .json, .jsonl or .txt (documents, or records with input_ids). Default: the
    /// built-in sample of 300 C4 documents (ODC-BY 1.0): 0-199 calibrate, 200-299 evaluate
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// tokenizer.json (default: beside the model)
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// End-of-text token id appended to each document (default: from generation_config.json or
    /// tokenizer_config.json beside the model)
    #[arg(long)]
    pub eos_id: Option<i64>,
    /// Tokens per sequence (default: 2048, or the model's context where it is shorter)
    #[arg(long, value_parser = at_least_one)]
    pub seq_len: Option<usize>,
    /// Number of packed sequences to use (default: 256 to calibrate, every sequence to evaluate)
    #[arg(long, value_parser = at_least_one)]
    pub samples: Option<usize>,
}

impl DataArgs {
    pub fn request(&self) -> DataRequest {
        DataRequest {
            files: self.data.clone(),
            tokenizer: self.tokenizer.clone(),
            eos_id: self.eos_id,
            seq_len: self.seq_len,
            samples: self.samples,
        }
    }
}

/// What calibration reads and where it runs (calibrate, and rewrite without --stats).
#[derive(clap::Args)]
pub struct CalibrationArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Sequences per engine run
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub batch: usize,
    /// Where the moments are formed: in the measuring graph, where the model runs, or on the host
    #[arg(long, value_enum, default_value_t = MomentsOn::Auto)]
    pub moments: MomentsOn,
    /// The type each batch's centred cross-products are multiplied in, before they are merged
    /// into the f64 moments: f32 (auto) is faster, most on tensor cores, and errs by about
    /// ε_f32·√(batch tokens) relative, far below what the bounds resolve
    #[arg(long, value_enum, default_value_t = MomentPrecision::Auto)]
    pub moment_precision: MomentPrecision,
    /// Hold every N-th sequence out of the fit and keep its moments apart, so that analyze and rewrite
    /// show each map's error on text it was not fitted to (0: none; doubles the statistics' size)
    #[arg(long, default_value_t = 0)]
    pub holdout_every: usize,
    /// Which units to measure, comma-separated: attention, mlp, layer, run, fold, or all. Each
    /// kind besides attention costs about as much memory and time as attention does (runs: three
    /// times, for spans of 2, 3 and 4 layers; folds: four times, for spans of 1 to 4)
    #[arg(long, default_value = "attention", value_parser = unit_kinds)]
    pub units: UnitKinds,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// A set of unit kinds, as `--units` spells it.
#[derive(Clone, Debug)]
pub struct UnitKinds(pub Vec<UnitKind>);

/// `attention,mlp,layer,run,fold` or `all`.
fn unit_kinds(s: &str) -> Result<UnitKinds, String> {
    if s.trim() == "all" {
        return Ok(UnitKinds(UnitKind::ALL.to_vec()));
    }
    let mut kinds = Vec::new();
    for name in s.split(',').map(str::trim) {
        let kind = UnitKind::ALL.into_iter().find(|k| k.name() == name).ok_or_else(|| {
            format!(
                "unknown unit {name:?}: expected attention, mlp, layer, run, fold (comma-separated) or all"
            )
        })?;
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    kinds.sort_unstable();
    Ok(UnitKinds(kinds))
}

impl CalibrationArgs {
    pub fn calibration(&self) -> Calibration {
        Calibration {
            data: self.data.request(),
            engine: self.engine.options(),
            batch: self.batch,
            moments: self.moments,
            moment_precision: self.moment_precision,
            holdout_every: self.holdout_every,
            units: self.units.0.clone(),
        }
    }
}

#[derive(clap::Args)]
pub struct CalibrateArgs {
    /// The ONNX model to measure
    pub model: PathBuf,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
    /// Calibrate slice I of N disjoint slices of the sequences (merge the results with merge-stats)
    #[arg(long, default_value = "0/1")]
    pub shard: Shard,
    /// Calibrate only layers A to B-1, e.g. 0..16 (merge the files of disjoint ranges with
    /// merge-stats): each run holds only its layers' statistics
    #[arg(long)]
    pub layer_range: Option<LayerRange>,
    /// Output statistics file (.safetensors)
    #[arg(short, long)]
    pub output: PathBuf,
    /// Print what was written as JSON: {"output", "model", "layers", "units", "tokens"}
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct MergeArgs {
    /// Statistics files of the same model over disjoint data
    #[arg(required = true, num_args = 1..)]
    pub stats: Vec<PathBuf>,
    /// Output statistics file
    #[arg(short, long)]
    pub output: PathBuf,
}

/// How layers are ranked and chosen (analyze, rewrite).
#[derive(clap::Args)]
pub struct SelectArgs {
    /// Ranking criterion
    #[arg(long, value_enum, default_value_t = Criterion::Cca)]
    pub criterion: Criterion,
    /// Number of layers to linearise (default: a quarter of the layers, rounded down, at least one)
    #[arg(long, conflicts_with_all = ["layer_ids", "max_bound"])]
    pub layers: Option<usize>,
    /// Exactly these layers, e.g. 3,7
    #[arg(long, value_delimiter = ',', conflicts_with = "max_bound")]
    pub layer_ids: Option<Vec<usize>>,
    /// Every layer whose normalised bound (bound/d) is at most B
    #[arg(long, value_parser = non_negative)]
    pub max_bound: Option<f64>,
    /// Ridge λ: each covariance C becomes C + λ · diag(C) (a share of each dimension's own variance)
    #[arg(long, default_value_t = DEFAULT_LAMBDA, value_parser = non_negative)]
    pub lambda: f64,
}

impl SelectArgs {
    pub fn plan(&self) -> SelectPlan {
        let selection = match (&self.layer_ids, self.max_bound, self.layers) {
            (Some(ids), _, _) => Some(Selection::Layers(ids.clone())),
            (None, Some(max), _) => Some(Selection::MaxBound(max)),
            (None, None, Some(k)) => Some(Selection::Count(k)),
            (None, None, None) => None,
        };
        SelectPlan { criterion: self.criterion, selection, lambda: self.lambda }
    }
}

#[derive(clap::Args)]
pub struct AnalyzeArgs {
    /// Statistics file written by calibrate or merge-stats
    pub stats: PathBuf,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Also compute every layer's canonical correlations (an SVD per layer)
    #[arg(long)]
    pub spectrum: bool,
    /// Check that the statistics were measured on this model
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Where to write the SVG chart (default: beside the statistics, with .svg)
    #[arg(long)]
    pub chart: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct RewriteArgs {
    /// The ONNX model to rewrite (never modified)
    pub model: PathBuf,
    /// Statistics from calibrate; without it the model is calibrated first (--data ...)
    #[arg(long)]
    pub stats: Option<PathBuf>,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
    #[command(flatten)]
    pub select: SelectArgs,
    /// linear: Y = X Wᵀ + b (NBL); drop: Y = 0 (attention dropping, for comparison)
    #[arg(long, value_enum, default_value_t = Replacement::Linear)]
    pub replace: Replacement,
    /// drop: remove the replaced layers' KV cache from the interface; keep: leave it unchanged
    #[arg(long, value_enum, default_value_t = KvCache::Drop)]
    pub kv: KvCache,
    /// Output model (default: <stem>.nbl.onnx beside the input)
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Report (default: <stem>.nbl.json beside the output)
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Also print the report's JSON on stdout
    #[arg(long)]
    pub json: bool,
    /// Write the model even when the selection replaces no layer (an unchanged copy)
    #[arg(long)]
    pub allow_noop: bool,
    /// Format of the maps W: auto follows the replaced attention's projections (MatMulNBits
    /// int4/int8 with their block size, or the stream's float type)
    #[arg(long, value_enum, default_value_t = WeightFormat::Auto)]
    pub weight_format: WeightFormat,
    /// How int4/int8 maps are rounded: GPTQ with the calibration second moments, or round to nearest
    #[arg(long, value_enum, default_value_t = Quantizer::Gptq)]
    pub quantizer: Quantizer,
    /// Inputs per scale of int4/int8 maps, MatMulNBits' block_size (default: the replaced
    /// projections', else 32); must divide the hidden size
    #[arg(long = "block-size", value_name = "GROUP_SIZE")]
    pub group_size: Option<usize>,
    /// Fit the chosen layers in stages, each on the activations of the model with the earlier
    /// stages' layers already linearised: one calibration pass on --data per stage after the
    /// first (give the data --stats was calibrated on)
    #[arg(long)]
    pub sequential: bool,
    /// Layers fitted per stage with --sequential (fewer stages: fewer passes)
    #[arg(long, default_value_t = 1, requires = "sequential", value_parser = at_least_one)]
    pub stage_size: usize,
    /// Text --criterion measured scores candidates on (default: the calibration data)
    #[arg(long, num_args = 1..)]
    pub select_data: Vec<PathBuf>,
    /// Sequences of --seq-len tokens --criterion measured and --max-kl score candidates on
    #[arg(long, alias = "probe-blocks", default_value_t = 4, value_parser = at_least_one)]
    pub probe_sequences: usize,
    /// Budget mode: replace as much as the predicted saving allows while the mean KL(original ‖
    /// rewrite) on the probe sequences stays at most this; the units come from --units, measured
    /// by running the model. The final model's KL on held-out text is measured and reported
    #[arg(long, value_parser = positive, group = "budget")]
    pub max_kl: Option<f64>,
    /// Budget mode with the perplexity as the measure: at most P percent higher than the
    /// original's on the probe sequences (e.g. 5 or 5%)
    #[arg(long, value_parser = percent, value_name = "P", group = "budget")]
    pub max_ppl_increase: Option<f64>,
    /// Budget mode the other way round: the least harm (KL, or within --max-kl/--max-ppl-increase)
    /// that reaches this predicted speed-up of what --optimize says (e.g. 1.1)
    #[arg(long, value_parser = above_one, value_name = "S")]
    pub target_speedup: Option<f64>,
    /// What budget mode saves: bytes read per decode step (weights and KV cache at 576 positions) or
    /// prefill multiply-adds (512 tokens)
    #[arg(long, value_enum, default_value_t = Optimize::Decode)]
    pub optimize: Optimize,
    /// Held-out text budget mode confirms the final model's KL on (default: the built-in C4 sample's
    /// documents 200-299)
    #[arg(long, num_args = 1..)]
    pub heldout_data: Vec<PathBuf>,
}

impl RewriteArgs {
    /// The rewrite to run, with the rules that join flags checked.
    pub fn plan(&self) -> Result<RewritePlan> {
        let (output, report) = output_paths(&self.model, self.output.as_deref(), self.report.as_deref());
        ensure!(
            !(self.sequential && self.replace == Replacement::Drop),
            "--sequential fits linear maps stage by stage; with --replace drop there is nothing to fit"
        );
        let select = self.select.plan();
        let measuring = select.criterion == Criterion::Measured;
        ensure!(
            !measuring || matches!(select.selection, None | Some(Selection::Count(_))),
            "--criterion measured chooses a number of layers (--layers K), not --layer-ids or --max-bound"
        );
        let limit = match (self.max_kl, self.max_ppl_increase) {
            (Some(kl), _) => Some(Limit::Kl(kl)),
            (None, Some(p)) => Some(Limit::PplIncrease(p)),
            (None, None) => self.target_speedup.map(|_| Limit::Kl(f64::INFINITY)),
        };
        let budget_mode = limit.is_some();
        ensure!(
            !(measuring && budget_mode),
            "budget mode (--max-kl, --max-ppl-increase, --target-speedup) chooses by measurement already; \
             leave out --criterion measured"
        );
        ensure!(
            !budget_mode || (select.selection.is_none() && !self.sequential),
            "budget mode chooses the units itself: leave out --layers, --layer-ids, --max-bound and --sequential"
        );
        let units = &self.calibration.units.0;
        ensure!(
            budget_mode || units == &[UnitKind::Attention],
            "--units {} without --max-kl: only a budget chooses among units besides attention",
            units.iter().map(|k| k.name()).collect::<Vec<_>>().join(",")
        );
        let budget_flags = self.optimize != Optimize::Decode || !self.heldout_data.is_empty();
        ensure!(
            budget_mode || !budget_flags,
            "--optimize and --heldout-data belong to budget mode: add --max-kl"
        );
        Ok(RewritePlan {
            model: self.model.clone(),
            output,
            report,
            stats: self.stats.clone(),
            calibration: self.calibration.calibration(),
            select,
            probe_data: self.select_data.clone(),
            probe_sequences: self.probe_sequences,
            replace: self.replace,
            kv: self.kv,
            weight_format: self.weight_format,
            quantizer: self.quantizer,
            group_size: self.group_size,
            stage_size: self.sequential.then_some(self.stage_size),
            allow_noop: self.allow_noop,
            budget: limit.map(|limit| Budget {
                limit,
                target_speedup: self.target_speedup,
                optimize: self.optimize,
                heldout_data: self.heldout_data.clone(),
            }),
        })
    }
}

#[derive(clap::Args)]
pub struct CheckArgs {
    /// The model to check
    pub model: PathBuf,
    /// The original model, to measure logit differences, KL divergence and top-1 agreement
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
    /// Fail if the mean KL divergence from the reference exceeds this
    #[arg(long, requires = "reference", value_parser = non_negative)]
    pub max_kl: Option<f64>,
    /// Fail if top-1 agreement with the reference is below this (0..1)
    #[arg(long, requires = "reference", value_parser = non_negative)]
    pub min_top1: Option<f64>,
    /// Fail if the greedy continuations share fewer tokens than this on average
    #[arg(long, requires = "reference", value_parser = non_negative)]
    pub min_common_tokens: Option<f64>,
    /// Prompt length: tokens of natural text per prompt
    #[arg(long, default_value_t = 32, value_parser = at_least_one)]
    pub prompt_len: usize,
    /// Prompts to compare on (sequences of --prompt-len tokens of the text)
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    pub prompts: usize,
    /// Tokens generated greedily from each prompt by the model and the reference
    #[arg(long, default_value_t = 16, value_parser = at_least_one)]
    pub gen_tokens: usize,
    /// Text to prompt with: .json, .jsonl or .txt (default: the built-in C4 sample's held-out
    /// documents 200-299)
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// tokenizer.json (default: beside the model)
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Greedy decode steps with the KV cache after the prompt
    #[arg(long, default_value_t = 2)]
    pub decode_steps: usize,
    /// ONNX Runtime execution provider
    #[arg(long, value_enum, default_value_t = ExecutionProvider::Cpu)]
    pub ep: ExecutionProvider,
}

impl CheckArgs {
    pub fn options(&self) -> Result<CheckOptions> {
        if let Some(min) = self.min_common_tokens {
            ensure!(
                min <= self.gen_tokens as f64,
                "--min-common-tokens {min} is more than the --gen-tokens {} generated",
                self.gen_tokens
            );
        }
        Ok(CheckOptions {
            prompts: DataSpec {
                files: self.data.clone(),
                built_in: Split::Evaluation,
                tokenizer: self.tokenizer.clone(),
                eos_id: None,
                seq_len: self.prompt_len,
                samples: Some(self.prompts),
            },
            decode_steps: self.decode_steps,
            gen_tokens: self.gen_tokens,
            gates: Gates {
                max_kl: self.max_kl,
                min_top1: self.min_top1,
                min_common_tokens: self.min_common_tokens,
            },
        })
    }
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Models to score; the first is the reference for KL and top-1 agreement
    #[arg(required = true, num_args = 1..)]
    pub models: Vec<PathBuf>,
    /// Tokens generated greedily by every model from the first half of each of --gen-prompts
    /// sequences, compared with the first model's (needs a KV cache)
    #[arg(long, default_value_t = 32, value_parser = at_least_one)]
    pub gen_tokens: usize,
    /// Sequences whose first halves are generation prompts
    #[arg(long, default_value_t = 16, value_parser = at_least_one)]
    pub gen_prompts: usize,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Models to time
    #[arg(required = true, num_args = 1..)]
    pub models: Vec<PathBuf>,
    /// Prompt tokens for the prefill
    #[arg(long, default_value_t = 512, value_parser = at_least_one)]
    pub prompt_len: usize,
    /// Tokens generated greedily with the KV cache
    #[arg(long = "gen", default_value_t = 128, value_parser = at_least_one)]
    pub new_tokens: usize,
    /// Timed runs per model (after one warm-up run each)
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    pub runs: usize,
    /// ONNX Runtime execution provider
    #[arg(long, value_enum, default_value_t = ExecutionProvider::Cpu)]
    pub ep: ExecutionProvider,
    /// Intra-op threads (default: ONNX Runtime's choice)
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
    /// Print only the peak memory of loading and running the one model given (what `bench` runs
    /// in a fresh process per model)
    #[arg(long, hide = true)]
    pub peak_memory: bool,
}

impl BenchArgs {
    pub fn options(&self) -> BenchOptions {
        BenchOptions {
            prompt_len: self.prompt_len,
            new_tokens: self.new_tokens,
            runs: self.runs,
            ep: self.ep,
            threads: self.threads,
        }
    }
}

/// Peak memory of `model`, measured by this executable's hidden `bench --peak-memory` in a fresh
/// process (memory a process has freed stays resident, so one process cannot measure several).
pub fn peak_memory_in_child(model: &Model, options: &BenchOptions) -> Result<f64> {
    let exe = std::env::current_exe().context("cannot find this executable to measure memory")?;
    let mut command = std::process::Command::new(exe);
    command.arg("bench").arg(&model.path).arg("--peak-memory");
    command.args(["--ep", &options.ep.to_string().to_lowercase()]);
    command.args(["--prompt-len", &options.prompt_len.to_string()]);
    if let Some(threads) = options.threads {
        command.args(["--threads", &threads.to_string()]);
    }
    let out = command.output().context("cannot start the memory measurement")?;
    ensure!(
        out.status.success(),
        "measuring the peak memory of {} failed: {}",
        model.path.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().parse().with_context(|| format!("unexpected peak-memory output {text:?}"))
}

#[derive(clap::Args)]
pub struct SyntheticStatsArgs {
    /// Output statistics file
    pub output: PathBuf,
    /// Take the hidden size, layers and fingerprint from this model, so that rewrite accepts the
    /// file for it
    #[arg(long, conflicts_with_all = ["hidden_size", "layers"])]
    pub model: Option<PathBuf>,
    /// Hidden size d
    #[arg(long, default_value_t = 4096, value_parser = at_least_one)]
    pub hidden_size: usize,
    /// Layers
    #[arg(long, default_value_t = 32, value_parser = at_least_one)]
    pub layers: usize,
}

/// A count of at least one.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// A finite number ≥ 0.
/// A percentage, `5` or `5%`, as a fraction (0.05); positive and finite.
fn percent(s: &str) -> Result<f64, String> {
    positive(s.trim().trim_end_matches('%')).map(|p| p / 100.0)
}

/// A speed-up: finite and above 1.
fn above_one(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 1.0 => Ok(v),
        Ok(v) => Err(format!("must be a finite speed-up above 1, not {v}")),
        Err(e) => Err(e.to_string()),
    }
}

fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(v) => Err(format!("must be a finite number > 0, not {v}")),
        Err(e) => Err(e.to_string()),
    }
}

fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        Ok(v) => Err(format!("must be a finite number ≥ 0, not {v}")),
        Err(e) => Err(e.to_string()),
    }
}
