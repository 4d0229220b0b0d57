//! The command line's arguments: one clap struct per subcommand, and the groups they share
//! (engine, data, layer selection), turned into the library's options.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand};

use nbl_onnx::calibrate::{LayerRange, MomentsOn, Shard};
use nbl_onnx::data::{DataSpec, Split, check_context, context_length};
use nbl_onnx::engine::{self, Engine, EngineChoice, EngineOptions, ExecutionProvider};
use nbl_onnx::nbl::{Criterion, DEFAULT_LAMBDA, Selection};
use nbl_onnx::quantize::Quantizer;
use nbl_onnx::rewrite::{KvCache, Replacement, WeightFormat};

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
    /// Opens the engine and says on stderr which one actually runs.
    pub fn open(&self) -> Result<Box<dyn Engine>> {
        let engine =
            engine::open(&EngineOptions { engine: self.engine, ep: self.ep, threads: self.threads })?;
        eprintln!("engine: {}", engine.describe());
        Ok(engine)
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
    /// Tokens per block (default: 2048, or the model's context where it is shorter)
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Number of packed blocks to use (default: 256 to calibrate, every block to evaluate)
    #[arg(long)]
    pub samples: Option<usize>,
}

impl DataArgs {
    /// The data to read for the model in `model_dir`; without `--data`, the built-in sample's
    /// `built_in` split, said on stderr. Blocks longer than the model's context are refused.
    pub fn spec(
        &self,
        model_dir: &Path,
        default_samples: Option<usize>,
        built_in: Split,
    ) -> Result<DataSpec> {
        let context = context_length(model_dir).map(|(n, _)| n);
        let seq_len =
            self.seq_len.unwrap_or_else(|| context.map_or(DEFAULT_SEQ_LEN, |c| c.min(DEFAULT_SEQ_LEN)));
        check_context(model_dir, seq_len, &format!("--seq-len {seq_len}"))?;
        if self.data.is_empty() {
            eprintln!("data: {} (pass --data FILE for your own)", built_in.describe());
        }
        Ok(DataSpec {
            files: self.data.clone(),
            built_in,
            tokenizer: self.tokenizer.clone(),
            eos_id: self.eos_id,
            seq_len,
            samples: self.samples.or(default_samples),
        })
    }
}

/// What calibration reads and where it runs (calibrate, and rewrite without --stats).
#[derive(clap::Args)]
pub struct CalibrationArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Blocks per engine run
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Where the moments are formed: in the measuring graph, where the model runs, or on the host
    #[arg(long, value_enum, default_value_t = MomentsOn::Auto)]
    pub moments: MomentsOn,
    /// Hold every N-th block out of the fit and keep its moments apart, so that analyze and rewrite
    /// show each map's error on text it was not fitted to (0: none; doubles the statistics' size)
    #[arg(long, default_value_t = 0)]
    pub holdout_every: usize,
    #[command(flatten)]
    pub engine: EngineArgs,
}

impl CalibrationArgs {
    /// `--moments`, with `auto` resolved for the execution provider.
    pub fn moments(&self) -> MomentsOn {
        self.moments.resolve(self.engine.ep)
    }
}

/// Tokens per block when --seq-len is not given and the model's context is longer.
const DEFAULT_SEQ_LEN: usize = 2048;

/// Blocks calibrated when --samples is not given.
pub const DEFAULT_CALIBRATION_SAMPLES: usize = 256;

#[derive(clap::Args)]
pub struct CalibrateArgs {
    /// The ONNX model to measure
    pub model: PathBuf,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
    /// Calibrate slice I of N disjoint slices of the blocks (merge the results with merge-stats)
    #[arg(long, default_value = "0/1")]
    pub shard: Shard,
    /// Calibrate only layers A to B-1, e.g. 0..16 (merge the files of disjoint ranges with
    /// merge-stats): each run holds only its layers' statistics
    #[arg(long)]
    pub layer_range: Option<LayerRange>,
    /// Output statistics file (.safetensors)
    #[arg(short, long)]
    pub output: PathBuf,
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
    #[arg(long)]
    pub max_bound: Option<f64>,
    /// Ridge λ: ε = λ · tr(C)/d is added to the covariances
    #[arg(long, default_value_t = DEFAULT_LAMBDA)]
    pub lambda: f64,
}

impl SelectArgs {
    pub fn selection(&self, layers: usize) -> Selection {
        match (&self.layer_ids, self.max_bound) {
            (Some(ids), _) => Selection::Layers(ids.clone()),
            (None, Some(max)) => Selection::MaxBound(max),
            (None, None) => Selection::Count(self.layers.unwrap_or((layers / 4).max(1).min(layers))),
        }
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
    /// Inputs per scale of int4/int8 maps (default: the replaced projections', else 32); must
    /// divide the hidden size
    #[arg(long)]
    pub block_size: Option<usize>,
    /// Fit the chosen layers in stages, each on the activations of the model with the earlier
    /// stages' layers already linearised: one calibration pass on --data per stage after the
    /// first (give the data --stats was calibrated on)
    #[arg(long)]
    pub sequential: bool,
    /// Layers fitted per stage with --sequential (fewer stages: fewer passes)
    #[arg(long, default_value_t = 1, requires = "sequential")]
    pub stage_size: usize,
    /// Text --criterion measured scores candidates on (default: the calibration data)
    #[arg(long, num_args = 1..)]
    pub select_data: Vec<PathBuf>,
    /// Blocks of --seq-len tokens --criterion measured scores candidates on
    #[arg(long, default_value_t = 4)]
    pub probe_blocks: usize,
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
    #[arg(long, requires = "reference")]
    pub max_kl: Option<f64>,
    /// Fail if top-1 agreement with the reference is below this (0..1)
    #[arg(long, requires = "reference")]
    pub min_top1: Option<f64>,
    /// Fail if the greedy continuations share fewer tokens than this on average
    #[arg(long, requires = "reference")]
    pub min_common_tokens: Option<f64>,
    /// Prompt length: tokens of natural text per prompt
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    /// Prompts to compare on (blocks of --prompt-len tokens of the text)
    #[arg(long, default_value_t = 8)]
    pub prompts: usize,
    /// Tokens generated greedily from each prompt by the model and the reference
    #[arg(long, default_value_t = 16)]
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

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Models to score; the first is the reference for KL and top-1 agreement
    #[arg(required = true, num_args = 1..)]
    pub models: Vec<PathBuf>,
    /// Tokens generated greedily by every model from the first half of each of --gen-prompts
    /// blocks, compared with the first model's (needs a KV cache)
    #[arg(long, default_value_t = 32)]
    pub gen_tokens: usize,
    /// Blocks whose first halves are generation prompts
    #[arg(long, default_value_t = 16)]
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
    #[arg(long, default_value_t = 512)]
    pub prompt_len: usize,
    /// Tokens generated greedily with the KV cache
    #[arg(long = "gen", default_value_t = 128)]
    pub new_tokens: usize,
    /// Timed runs per model (after one warm-up run each)
    #[arg(long, default_value_t = 5)]
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
