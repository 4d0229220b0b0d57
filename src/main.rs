//! The `nbl-onnx` command line: parses arguments and calls the library, one function per subcommand.
//! Exit codes: 0 success, 1 a check or gate failed, 2 bad input.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, ensure};
use clap::{Parser, Subcommand};

use nbl_onnx::blocks::{Blocks, find_blocks};
use nbl_onnx::calibrate::{Shard, calibrate, fingerprint, layer_tensors};
use nbl_onnx::check::{self, CheckReport, EngineRun};
use nbl_onnx::data::{TextEncoder, pack};
use nbl_onnx::engine::{self, EngineChoice, EngineOptions, ExecutionProvider};
use nbl_onnx::inspect::{inspect, trial_run};
use nbl_onnx::nbl::{Criterion, DEFAULT_LAMBDA};
use nbl_onnx::onnx::Model;
use nbl_onnx::report::analyze;
use nbl_onnx::rewrite::{KvCache, LayerEdit, Replacement, rewrite};
use nbl_onnx::stats::{DataSummary, Stats};

#[derive(Parser)]
#[command(name = "nbl-onnx", version, about = "Neural Block Linearization for ONNX LLM exports")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the decoder layers' attention blocks: the tensors X entering and Y leaving each one
    Inspect(InspectArgs),
    /// Measure every attention block on calibration text into a statistics file
    Calibrate(CalibrateArgs),
    /// Combine statistics of disjoint data shards into what one run over all of it gives
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
struct BenchArgs {
    /// Models to time
    #[arg(required = true, num_args = 1..)]
    models: Vec<PathBuf>,
    /// Prompt tokens for the prefill
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    /// Tokens generated greedily with the KV cache
    #[arg(long = "gen", default_value_t = 128)]
    new_tokens: usize,
    /// Timed runs per model (after one warm-up run each)
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// ONNX Runtime execution provider
    #[arg(long, value_enum, default_value_t = ExecutionProvider::Cpu)]
    ep: ExecutionProvider,
    /// Intra-op threads (default: ONNX Runtime's choice)
    #[arg(long)]
    threads: Option<usize>,
    /// Print JSON instead of a table
    #[arg(long)]
    json: bool,
    /// Print only the peak memory of loading and running the one model given (what `bench` runs
    /// in a fresh process per model)
    #[arg(long, hide = true)]
    peak_memory: bool,
}

#[derive(clap::Args)]
struct EvalArgs {
    /// Models to score; the first is the reference for KL and top-1 agreement
    #[arg(required = true, num_args = 1..)]
    models: Vec<PathBuf>,
    /// Evaluation data: .json, .jsonl or .txt
    #[arg(long, required = true, num_args = 1..)]
    data: Vec<PathBuf>,
    /// tokenizer.json (default: beside the first model)
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// End-of-text token id (default: from the first model's configs)
    #[arg(long)]
    eos_id: Option<i64>,
    /// Tokens per block
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Number of blocks (default: every block the data gives)
    #[arg(long)]
    samples: Option<usize>,
    #[command(flatten)]
    engine: EngineArgs,
    /// Print JSON instead of a table
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct CheckArgs {
    /// The model to check
    model: PathBuf,
    /// The original model, to measure logit differences, KL divergence and top-1 agreement
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Print JSON instead of text
    #[arg(long)]
    json: bool,
    /// Fail if the mean KL divergence from the reference exceeds this
    #[arg(long, requires = "reference")]
    max_kl: Option<f64>,
    /// Fail if top-1 agreement with the reference is below this (0..1)
    #[arg(long, requires = "reference")]
    min_top1: Option<f64>,
    /// Prompt length of the sample input
    #[arg(long, default_value_t = 16)]
    prompt_len: usize,
    /// Greedy decode steps with the KV cache after the prompt
    #[arg(long, default_value_t = 2)]
    decode_steps: usize,
    /// ONNX Runtime execution provider
    #[arg(long, value_enum, default_value_t = ExecutionProvider::Cpu)]
    ep: ExecutionProvider,
}

/// A check or gate failed: exit code 1 (the report says why).
#[derive(Debug)]
struct CheckFailed;

impl std::fmt::Display for CheckFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("check failed")
    }
}

impl std::error::Error for CheckFailed {}

#[derive(clap::Args)]
struct InspectArgs {
    /// The ONNX model (.onnx; external data is read from beside it)
    model: PathBuf,
    /// Print JSON instead of a table
    #[arg(long)]
    json: bool,
    /// Also run the model once on an engine and check every X and Y it computes
    #[arg(long)]
    run: bool,
    #[command(flatten)]
    engine: EngineArgs,
}

/// Where models run.
#[derive(clap::Args)]
struct EngineArgs {
    /// Engine: ONNX Runtime, tract, or ONNX Runtime when its library loads and tract otherwise
    #[arg(long, value_enum, default_value_t = EngineChoice::Auto)]
    engine: EngineChoice,
    /// ONNX Runtime execution provider; one that cannot be registered is an error
    #[arg(long, value_enum, default_value_t = ExecutionProvider::Cpu)]
    ep: ExecutionProvider,
    /// Intra-op threads (default: the engine's choice)
    #[arg(long)]
    threads: Option<usize>,
}

impl EngineArgs {
    /// Opens the engine and says on stderr which one actually runs.
    fn open(&self) -> Result<Box<dyn engine::Engine>> {
        let options = EngineOptions { engine: self.engine, ep: self.ep, threads: self.threads };
        let engine = engine::open(&options)?;
        eprintln!("engine: {}", engine.describe());
        Ok(engine)
    }
}

#[derive(clap::Args)]
struct CalibrateArgs {
    /// The ONNX model to measure
    model: PathBuf,
    #[command(flatten)]
    calibration: CalibrationArgs,
    /// Calibrate slice I of N disjoint slices of the blocks (merge the results with merge-stats)
    #[arg(long, default_value = "0/1")]
    shard: Shard,
    /// Output statistics file (.safetensors)
    #[arg(short, long)]
    output: PathBuf,
}

/// The calibration data and how it is run.
#[derive(clap::Args)]
struct CalibrationArgs {
    /// Calibration data: .json, .jsonl or .txt (documents, or records with input_ids)
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// tokenizer.json (default: beside the model)
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// End-of-text token id appended to each document (default: from generation_config.json or
    /// tokenizer_config.json beside the model)
    #[arg(long)]
    eos_id: Option<i64>,
    /// Number of packed blocks to use (before sharding)
    #[arg(long, default_value_t = 256)]
    samples: usize,
    /// Tokens per block
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Blocks per engine run
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(clap::Args)]
struct RewriteArgs {
    /// The ONNX model to rewrite (never modified)
    model: PathBuf,
    /// Statistics from calibrate; without it the model is calibrated first (--data ...)
    #[arg(long)]
    stats: Option<PathBuf>,
    #[command(flatten)]
    calibration: CalibrationArgs,
    /// Number of layers to replace (default: a quarter of the layers, rounded down)
    #[arg(long, conflicts_with_all = ["layer_ids", "max_bound"])]
    layers: Option<usize>,
    /// Exactly these layers, e.g. 3,7
    #[arg(long, value_delimiter = ',', conflicts_with = "max_bound")]
    layer_ids: Option<Vec<usize>>,
    /// Every layer whose normalised bound (bound/d) is at most B
    #[arg(long)]
    max_bound: Option<f64>,
    /// Ranking criterion
    #[arg(long, value_enum, default_value_t = Criterion::Cca)]
    criterion: Criterion,
    /// linear: Y = X Wᵀ + b (NBL); drop: Y = 0 (attention dropping, for comparison)
    #[arg(long, value_enum, default_value_t = Replacement::Linear)]
    replace: Replacement,
    /// drop: remove the replaced layers' KV cache from the interface; keep: leave it unchanged
    #[arg(long, value_enum, default_value_t = KvCache::Drop)]
    kv: KvCache,
    /// Ridge λ for the linear maps
    #[arg(long, default_value_t = DEFAULT_LAMBDA)]
    lambda: f64,
    /// Output model (default: <stem>.nbl.onnx beside the input)
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Report (default: <stem>.nbl.json beside the output)
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(clap::Args)]
struct MergeArgs {
    /// Statistics files of the same model over disjoint data
    #[arg(required = true, num_args = 1..)]
    stats: Vec<PathBuf>,
    /// Output statistics file
    #[arg(short, long)]
    output: PathBuf,
}

#[derive(clap::Args)]
struct AnalyzeArgs {
    /// Statistics file written by calibrate or merge-stats
    stats: PathBuf,
    /// Print JSON instead of a table
    #[arg(long)]
    json: bool,
    /// Ranking criterion
    #[arg(long, value_enum, default_value_t = Criterion::Cca)]
    criterion: Criterion,
    /// How many layers to mark for linearisation (default: a quarter of the layers, rounded down)
    #[arg(long)]
    layers: Option<usize>,
    /// Ridge λ: ε = λ · tr(C)/d is added to the covariances
    #[arg(long, default_value_t = DEFAULT_LAMBDA)]
    lambda: f64,
    /// Also compute every layer's canonical correlations (an SVD per layer)
    #[arg(long)]
    spectrum: bool,
    /// Check that the statistics were measured on this model
    #[arg(long)]
    model: Option<PathBuf>,
    /// Where to write the SVG chart (default: beside the statistics, with .svg)
    #[arg(long)]
    chart: Option<PathBuf>,
}

fn run_inspect(args: &InspectArgs) -> Result<()> {
    let model = Model::load(&args.model)?;
    let mut report = inspect(&model)?;
    if args.run {
        let engine = args.engine.open()?;
        report.run = Some(trial_run(&model, &report.blocks, engine.as_ref())?);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// Fails early, before any long work, if `output` cannot be written or would replace `input`.
fn check_output(output: &Path, input: &Path) -> Result<()> {
    let dir = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    ensure!(dir.is_dir(), "output directory {} does not exist", dir.display());
    if let (Ok(a), Ok(b)) = (std::fs::canonicalize(output), std::fs::canonicalize(input)) {
        ensure!(a != b, "refusing to write {} over the input", output.display());
    }
    Ok(())
}

/// Calibrates `model` on the data of `args` (shard `shard` of it) into statistics.
fn measure(model: &Model, blocks: &Blocks, args: &CalibrationArgs, shard: Shard) -> Result<Stats> {
    ensure!(!args.data.is_empty(), "no calibration data: pass --data FILE (or --stats STATS)");
    ensure!(args.samples > 0, "--samples must be at least 1");
    let encoder = TextEncoder::new(model.dir(), args.tokenizer.as_deref(), args.eos_id)?;
    if let (Some(tokens), Some(rows)) = (encoder.vocab_size(), blocks.vocab_size) {
        ensure!(
            tokens <= rows,
            "tokenizer {} has {tokens} tokens, more than the model's embedding table ({rows} rows): \
             it belongs to another model",
            encoder.tokenizer_path.display()
        );
    }
    let packed = pack(&args.data, &encoder, args.seq_len, Some(args.samples), blocks.vocab_size)?;
    if packed.blocks.len() < args.samples {
        eprintln!(
            "note: the data gives {} blocks of {} tokens, fewer than --samples {}",
            packed.blocks.len(),
            args.seq_len,
            args.samples
        );
    }
    let slice = shard.slice(&packed.blocks);
    ensure!(
        !slice.is_empty(),
        "shard {}/{} has no blocks: the data gives only {}",
        shard.index,
        shard.count,
        packed.blocks.len()
    );
    let engine = args.engine.open()?;
    let moments = calibrate(model, blocks, engine.as_ref(), slice, args.batch)?;
    Ok(Stats {
        fingerprint: fingerprint(model, blocks),
        hidden_size: blocks.hidden_size,
        layers: layer_tensors(blocks),
        moments,
        data: vec![DataSummary {
            files: args.data.iter().map(|p| p.display().to_string()).collect(),
            seq_len: args.seq_len,
            blocks: slice.len(),
            shard: [shard.index, shard.count],
            engine: engine.describe(),
        }],
    })
}

fn run_calibrate(args: &CalibrateArgs) -> Result<()> {
    check_output(&args.output, &args.model)?;
    let model = Model::load(&args.model)?;
    let blocks = find_blocks(&model)?;
    let stats = measure(&model, &blocks, &args.calibration, args.shard)?;
    stats.save(&args.output)?;
    eprintln!("wrote {} ({} layers, {} tokens)", args.output.display(), stats.layers.len(), stats.tokens());
    Ok(())
}

/// Fails unless `stats` were measured on `model`.
fn check_fingerprint(stats: &Stats, stats_path: &Path, model: &Model, blocks: &Blocks) -> Result<()> {
    let expected = fingerprint(model, blocks);
    ensure!(
        expected == stats.fingerprint,
        "{} was measured on another model (fingerprint {}, {} has {expected})",
        stats_path.display(),
        stats.fingerprint,
        model.path.display()
    );
    Ok(())
}

fn run_rewrite(args: &RewriteArgs) -> Result<()> {
    let stem = args.model.file_stem().and_then(|s| s.to_str()).unwrap_or("model").to_string();
    let output = args.output.clone().unwrap_or_else(|| args.model.with_file_name(format!("{stem}.nbl.onnx")));
    let out_stem =
        output.file_stem().and_then(|s| s.to_str()).unwrap_or("model").trim_end_matches(".nbl").to_string();
    let report_path =
        args.report.clone().unwrap_or_else(|| output.with_file_name(format!("{out_stem}.nbl.json")));
    check_output(&output, &args.model)?;
    check_output(&report_path, &args.model)?;
    ensure!(args.lambda >= 0.0 && args.lambda.is_finite(), "--lambda must be a finite number ≥ 0");

    let mut model = Model::load(&args.model)?;
    let blocks = find_blocks(&model)?;
    let n_layers = blocks.layers.len();
    if let Some(k) = args.layers {
        ensure!(
            k <= n_layers,
            "--layers {k} is more than the {n_layers} attention layers of {}",
            args.model.display()
        );
    }
    if let Some(ids) = &args.layer_ids {
        for &id in ids {
            ensure!(
                id < n_layers,
                "--layer-ids: layer {id} does not exist (the model has layers 0..{})",
                n_layers - 1
            );
        }
    }
    let stats = match &args.stats {
        Some(path) => {
            let stats = Stats::load(path)?;
            check_fingerprint(&stats, path, &model, &blocks)?;
            stats
        }
        None => measure(&model, &blocks, &args.calibration, Shard::WHOLE)?,
    };
    let mut analysis = analyze(&stats, args.criterion, 0, args.lambda, false)?;
    let selected: Vec<usize> = match (&args.layer_ids, args.max_bound) {
        (Some(ids), _) => {
            let mut ids = ids.clone();
            ids.dedup();
            ids
        }
        (None, Some(max)) => {
            analysis.order.iter().copied().filter(|&l| analysis.fits[l].bound_normalized <= max).collect()
        }
        (None, None) => analysis.order.iter().copied().take(args.layers.unwrap_or(n_layers / 4)).collect(),
    };
    for row in &mut analysis.layers {
        row.linearized = selected.contains(&row.layer);
    }
    analysis.selected = selected.clone();

    let edits: Vec<LayerEdit<'_>> = selected
        .iter()
        .map(|&l| LayerEdit {
            block: &blocks.layers[l],
            map: Some((&analysis.fits[l].w, analysis.fits[l].b.as_slice())),
        })
        .collect();
    let layer_list = selected.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(",");
    let provenance = [
        ("nbl.version", env!("CARGO_PKG_VERSION").to_string()),
        ("nbl.layers", layer_list),
        ("nbl.replace", format!("{:?}", args.replace).to_lowercase()),
        ("nbl.kv", format!("{:?}", args.kv).to_lowercase()),
        ("nbl.criterion", format!("{:?}", args.criterion).to_lowercase()),
        ("nbl.calibration", serde_json::json!({"tokens": stats.tokens(), "data": stats.data}).to_string()),
    ];
    let summary = rewrite(&mut model, &blocks, &edits, args.replace, args.kv, &provenance)?;
    let genai = genai_files(&mut model, &args.model, &output)?;
    model.save(&output)?;
    if let Some((config, files)) = genai {
        let dir = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        nbl_onnx::atomic::write(
            &dir.join("genai_config.json"),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
        for file in files {
            std::fs::copy(&file, dir.join(file.file_name().expect("a file")))
                .with_context(|| format!("copying {}", file.display()))?;
        }
    }
    let report = serde_json::json!({
        "model": args.model.display().to_string(),
        "output": output.display().to_string(),
        "analysis": analysis,
        "rewrite": summary,
    });
    let mut flat = serde_json::to_value(&analysis)?;
    if let (Some(obj), Some(extra)) = (flat.as_object_mut(), report.as_object()) {
        for (k, v) in extra {
            if k != "analysis" {
                obj.insert(k.clone(), v.clone());
            }
        }
    }
    nbl_onnx::atomic::write(&report_path, serde_json::to_string_pretty(&flat)?.as_bytes())?;
    eprintln!(
        "wrote {} ({:?} layers {:?}; nodes {} -> {}; parameters -{} +{}; KV cache {} -> {} bytes/token) and {}",
        output.display(),
        args.replace,
        selected,
        summary.nodes_before,
        summary.nodes_after,
        summary.params_removed,
        summary.params_added,
        summary.kv_bytes_per_token_before.map_or("?".to_string(), |b| b.to_string()),
        summary.kv_bytes_per_token_after.map_or("?".to_string(), |b| b.to_string()),
        report_path.display()
    );
    Ok(())
}

fn run_check(args: &CheckArgs) -> Result<()> {
    let model = Model::load(&args.model)?;
    let reference = args.reference.as_ref().map(Model::load).transpose()?;
    ensure!(args.prompt_len > 0, "--prompt-len must be at least 1");
    let mut report = CheckReport { model: args.model.display().to_string(), ..Default::default() };
    report.problems = check::structure(&model);
    let vocab = find_blocks(&model).ok().and_then(|b| b.vocab_size).unwrap_or(2);
    let prompt = check::sample_prompt(args.prompt_len, vocab);

    let ort = engine::open(&EngineOptions { engine: EngineChoice::Ort, ep: args.ep, threads: None })?;
    let tract = engine::open(&EngineOptions {
        engine: EngineChoice::Tract,
        ep: ExecutionProvider::Cpu,
        threads: None,
    })?;
    let mut ort_logits = None;
    for engine in [&ort, &tract] {
        let (status, decoded) =
            match check::run_and_decode(&model, engine.as_ref(), &prompt, args.decode_steps) {
                Ok((logits, decoded)) => {
                    if ort_logits.is_none() {
                        ort_logits = Some(logits);
                    }
                    ("ok".to_string(), decoded)
                }
                // tract implements only part of the com.microsoft and newest ai.onnx operators: a model
                // it cannot build is reported, not failed; a model it builds must run.
                Err(e)
                    if engine.describe().starts_with("tract") && !format!("{e:#}").contains("run failed") =>
                {
                    (format!("unsupported: {}", format!("{e:#}").lines().next().unwrap_or("")), vec![])
                }
                Err(e) => {
                    report.problems.push(format!("{}: {e:#}", engine.describe()));
                    (format!("failed: {e:#}"), vec![])
                }
            };
        report.runs.push(EngineRun { engine: engine.describe(), status, decoded });
    }
    let decodes: Vec<&Vec<i64>> =
        report.runs.iter().filter(|r| !r.decoded.is_empty()).map(|r| &r.decoded).collect();
    if decodes.len() == 2 && decodes[0] != decodes[1] {
        report
            .problems
            .push(format!("ONNX Runtime and tract decode differently: {:?} vs {:?}", decodes[0], decodes[1]));
    }
    if let (Some(reference), Some(path), Some(logits)) = (&reference, &args.reference, &ort_logits) {
        let (ref_logits, _) = check::run_and_decode(reference, ort.as_ref(), &prompt, 0)?;
        let agreement = check::agreement(&path.display().to_string(), &ref_logits, logits)?;
        if let Some(max) = args.max_kl
            && agreement.mean_kl > max
        {
            report.problems.push(format!("mean KL {:.4e} exceeds --max-kl {max}", agreement.mean_kl));
        }
        if let Some(min) = args.min_top1
            && agreement.top1_agreement < min
        {
            report
                .problems
                .push(format!("top-1 agreement {:.4} is below --min-top1 {min}", agreement.top1_agreement));
        }
        report.reference = Some(agreement);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for run in &report.runs {
            let decoded =
                if run.decoded.is_empty() { String::new() } else { format!(", decoded {:?}", run.decoded) };
            println!("{}: {}{decoded}", run.engine, run.status);
        }
        if let Some(a) = &report.reference {
            println!(
                "vs {}: {} positions, max |Δlogit| {:.4e}, mean KL {:.4e}, top-1 agreement {:.4}",
                a.reference, a.positions, a.max_abs_logit_diff, a.mean_kl, a.top1_agreement
            );
        }
        for p in &report.problems {
            println!("FAIL: {p}");
        }
        println!("{}", if report.passed() { "check passed" } else { "check failed" });
    }
    if report.passed() { Ok(()) } else { Err(CheckFailed.into()) }
}

/// Files a runtime loads from the model's directory besides the model itself.
const COMPANION_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer.model",
];

/// For an ONNX Runtime GenAI model (a `genai_config.json` beside it): the config for the output
/// (KV layers renumbered in `model`) and the tokenizer files to copy. The input's directory is
/// never written to: a GenAI output there gets a note instead.
fn genai_files(
    model: &mut Model,
    input: &Path,
    output: &Path,
) -> Result<Option<(serde_json::Value, Vec<PathBuf>)>> {
    let in_dir = model.dir().to_path_buf();
    let config_path = in_dir.join("genai_config.json");
    if !config_path.is_file() {
        return Ok(None);
    }
    let out_dir = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if std::fs::canonicalize(out_dir)? == std::fs::canonicalize(&in_dir)? {
        eprintln!(
            "note: {} is an ONNX Runtime GenAI model; its genai_config.json is left as it is. Write the \
             rewritten model into its own directory (-o DIR/model.onnx) to get an updated config and the \
             tokenizer files beside it",
            input.display()
        );
        return Ok(None);
    }
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
    let filename = output.file_name().and_then(|n| n.to_str()).unwrap_or("model.onnx");
    let config = nbl_onnx::rewrite::genai_config_for(model, &config, filename)?;
    let files = COMPANION_FILES.iter().map(|f| in_dir.join(f)).filter(|p| p.is_file()).collect();
    Ok(Some((config, files)))
}

fn run_eval(args: &EvalArgs) -> Result<()> {
    let models = args.models.iter().map(Model::load).collect::<Result<Vec<_>>>()?;
    let blocks = find_blocks(&models[0])?;
    let encoder = TextEncoder::new(models[0].dir(), args.tokenizer.as_deref(), args.eos_id)?;
    let packed = pack(&args.data, &encoder, args.seq_len, args.samples, blocks.vocab_size)?;
    let engine = args.engine.open()?;
    let scores = nbl_onnx::eval::evaluate(&models, engine.as_ref(), &packed.blocks)?;
    if args.json {
        let json = serde_json::json!({"engine": engine.describe(), "seq_len": args.seq_len, "blocks": packed.blocks.len(), "models": scores});
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        println!("{} blocks of {} tokens on {}", packed.blocks.len(), args.seq_len, engine.describe());
        println!("{:>10}  {:>10}  {:>10}  {:>8}  model", "ppl", "tokens", "KL", "top-1");
        for s in &scores {
            let kl = s.kl_vs_first.map_or("-".to_string(), |v| format!("{v:.5}"));
            let top1 = s.top1_vs_first.map_or("-".to_string(), |v| format!("{v:.4}"));
            println!("{:>10.4}  {:>10}  {kl:>10}  {top1:>8}  {}", s.ppl, s.tokens, s.path);
        }
    }
    Ok(())
}

fn run_bench(args: &BenchArgs) -> Result<()> {
    let models = args.models.iter().map(Model::load).collect::<Result<Vec<_>>>()?;
    let engine =
        engine::open(&EngineOptions { engine: EngineChoice::Ort, ep: args.ep, threads: args.threads })?;
    if args.peak_memory {
        anyhow::ensure!(models.len() == 1, "--peak-memory measures one model");
        println!("{}", nbl_onnx::bench::peak_memory_mb(&models[0], engine.as_ref(), args.prompt_len)?);
        return Ok(());
    }
    eprintln!("engine: {}", engine.describe());
    let options = nbl_onnx::bench::BenchOptions {
        prompt_len: args.prompt_len,
        new_tokens: args.new_tokens,
        runs: args.runs,
    };
    let mut timings = nbl_onnx::bench::bench(&models, engine.as_ref(), &options)?;
    for (timing, path) in timings.iter_mut().zip(&args.models) {
        timing.peak_mem_mb = Some(peak_memory_in_child(args, path)?);
    }
    if args.json {
        let json = serde_json::json!({
            "ep": args.ep.to_string(), "engine": engine.describe(), "threads": args.threads,
            "prompt_len": args.prompt_len, "gen": args.new_tokens, "runs": args.runs, "models": timings,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        println!(
            "prompt {} tokens, {} generated, median of {} runs on {}",
            args.prompt_len,
            args.new_tokens,
            args.runs,
            engine.describe()
        );
        println!(
            "{:>10}  {:>12}  {:>17}  {:>17}  {:>8}  {:>12}  model",
            "prefill ms", "decode tok/s", "prefill x (MACs)", "decode x (MACs)", "peak MiB", "KV bytes/tok"
        );
        for t in &timings {
            println!(
                "{:>10.1}  {:>12.2}  {:>17}  {:>17}  {:>8.0}  {:>12}  {}",
                t.prefill_ms,
                t.decode_tok_s,
                format!("{:.3} ({:.3})", t.prefill_speedup, t.predicted_prefill_speedup),
                format!("{:.3} ({:.3})", t.decode_speedup, t.predicted_decode_speedup),
                t.peak_mem_mb.unwrap_or(f64::NAN),
                t.kv_bytes_per_token,
                t.path
            );
        }
    }
    Ok(())
}

fn peak_memory_in_child(args: &BenchArgs, model: &Path) -> Result<f64> {
    let exe = std::env::current_exe().context("cannot find this executable to measure memory")?;
    let mut command = std::process::Command::new(exe);
    command.arg("bench").arg(model).arg("--peak-memory").args(["--ep", &args.ep.to_string().to_lowercase()]);
    command.args(["--prompt-len", &args.prompt_len.to_string()]);
    if let Some(threads) = args.threads {
        command.args(["--threads", &threads.to_string()]);
    }
    let out = command.output().context("cannot start the memory measurement")?;
    anyhow::ensure!(
        out.status.success(),
        "measuring the peak memory of {} failed: {}",
        model.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().parse().with_context(|| format!("unexpected peak-memory output {text:?}"))
}

fn run_merge(args: &MergeArgs) -> Result<()> {
    for input in &args.stats {
        check_output(&args.output, input)?;
    }
    let parts = args.stats.iter().map(|p| Ok((p.clone(), Stats::load(p)?))).collect::<Result<Vec<_>>>()?;
    let merged = Stats::merge(parts)?;
    merged.save(&args.output)?;
    eprintln!(
        "merged {} files into {} ({} tokens)",
        args.stats.len(),
        args.output.display(),
        merged.tokens()
    );
    Ok(())
}

fn run_analyze(args: &AnalyzeArgs) -> Result<()> {
    let stats = Stats::load(&args.stats)?;
    if let Some(path) = &args.model {
        let model = Model::load(path)?;
        let blocks = find_blocks(&model)?;
        check_fingerprint(&stats, &args.stats, &model, &blocks)?;
    }
    let count = args.layers.unwrap_or(stats.layers.len() / 4);
    ensure!(
        count <= stats.layers.len(),
        "--layers {count} is more than the {} layers in {}",
        stats.layers.len(),
        args.stats.display()
    );
    ensure!(args.lambda >= 0.0 && args.lambda.is_finite(), "--lambda must be a finite number ≥ 0");
    let analysis = analyze(&stats, args.criterion, count, args.lambda, args.spectrum)?;
    let chart = args.chart.clone().unwrap_or_else(|| args.stats.with_extension("svg"));
    nbl_onnx::atomic::write(&chart, analysis.svg().as_bytes()).context("writing the chart")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&analysis)?);
    } else {
        print!("{}", analysis.table());
        eprintln!("chart: {}", chart.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    nbl_onnx::atomic::install_interrupt_handler();
    let result = match &cli.command {
        Command::Inspect(args) => run_inspect(args),
        Command::Calibrate(args) => run_calibrate(args),
        Command::MergeStats(args) => run_merge(args),
        Command::Analyze(args) => run_analyze(args),
        Command::Rewrite(args) => run_rewrite(args),
        Command::Check(args) => run_check(args),
        Command::Eval(args) => run_eval(args),
        Command::Bench(args) => run_bench(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<CheckFailed>() => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
