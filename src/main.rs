//! The `nbl-onnx` command line: parses arguments ([`cli`]), calls the library, prints. One
//! function per subcommand. Exit codes: 0 success, 1 a check or gate failed, 2 bad input.

mod cli;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;

use cli::*;
use nbl_onnx::atomic::{check_output, check_output_creating_dir};
use nbl_onnx::blocks::find_blocks;
use nbl_onnx::calibrate::{self, Shard, check_fingerprint};
use nbl_onnx::check::{self, CheckOptions};
use nbl_onnx::data::{DataSpec, Split};
use nbl_onnx::engine::{self, EngineChoice, EngineOptions, ExecutionProvider};
use nbl_onnx::inspect::{inspect, trial_run};
use nbl_onnx::measured;
use nbl_onnx::nbl::{Criterion, Selection};
use nbl_onnx::onnx::Model;
use nbl_onnx::report::analyze;
use nbl_onnx::rewrite::{MapSource, MapStorage, Replacement, RewriteReport, output_paths, rewrite_selected};
use nbl_onnx::sequential::{Stages, fit_sequentially};
use nbl_onnx::stats::{MomentsSource, Stats, StatsFile};
use nbl_onnx::{bench, eval, genai};

/// Prints `value` as JSON, or `text` for people.
fn emit(json: bool, value: &impl serde::Serialize, text: impl FnOnce() -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", text());
    }
    Ok(())
}

fn run_inspect(args: &InspectArgs) -> Result<()> {
    let model = Model::load(&args.model)?;
    let blocks = find_blocks(&model)?;
    let mut report = inspect(&model, blocks);
    if args.run {
        report.run = Some(trial_run(&model, &report.blocks, args.engine.open()?.as_ref())?);
    }
    emit(args.json, &report, || report.table())
}

/// Every file a command reads for `model` besides `others`: the model, its external data, and
/// the data files and tokenizer `data` names.
fn files_read(model: &Model, data: Option<&DataArgs>, others: &[&Path]) -> Vec<PathBuf> {
    let mut files = model.files();
    if let Some(data) = data {
        files.extend(data.data.iter().cloned());
        files.push(data.tokenizer.clone().unwrap_or_else(|| model.dir().join("tokenizer.json")));
    }
    files.extend(others.iter().map(|p| p.to_path_buf()));
    files
}

fn run_calibrate(args: &CalibrateArgs) -> Result<()> {
    let model = Model::load(&args.model)?;
    let inputs = files_read(&model, Some(&args.calibration.data), &[]);
    check_output(&args.output, &inputs.iter().map(PathBuf::as_path).collect::<Vec<_>>())?;
    let blocks = find_blocks(&model)?;
    let engine = args.calibration.engine.open()?;
    let data =
        args.calibration.data.spec(model.dir(), Some(DEFAULT_CALIBRATION_SAMPLES), Split::Calibration)?;
    let run = calibrate::Run {
        batch: args.calibration.batch,
        shard: args.shard,
        layers: args.layer_range,
        moments: args.calibration.moments(),
        holdout_every: args.calibration.holdout_every,
    };
    let stats = calibrate::run(&model, &blocks, engine.as_ref(), &data, run)?;
    stats.save(&args.output)?;
    eprintln!("wrote {} ({} layers, {} tokens)", args.output.display(), stats.layers.len(), stats.tokens());
    Ok(())
}

fn run_merge(args: &MergeArgs) -> Result<()> {
    let inputs: Vec<&Path> = args.stats.iter().map(PathBuf::as_path).collect();
    check_output(&args.output, &inputs)?;
    for (i, a) in args.stats.iter().enumerate() {
        for b in &args.stats[..i] {
            let same =
                std::fs::canonicalize(a).ok().zip(std::fs::canonicalize(b).ok()).is_some_and(|(a, b)| a == b);
            ensure!(!same, "{} is given twice: its tokens would count twice", a.display());
        }
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
    // Read layer by layer: what is held does not grow with the number of layers.
    ensure!(
        args.select.criterion != Criterion::Measured,
        "--criterion measured runs the model on text: use it with rewrite (analyze reads statistics only)"
    );
    let stats = StatsFile::open(&args.stats)?;
    if let Some(path) = &args.model {
        let model = Model::load(path)?;
        check_fingerprint(&stats, &args.stats, &model, &find_blocks(&model)?)?;
    }
    let layers = stats.layers().len();
    let selection = args.select.selection(layers);
    selection.check(layers, &format!("layers in {}", args.stats.display()))?;
    let analysis = analyze(&stats, args.select.criterion, &selection, args.select.lambda, args.spectrum)?;
    let chart = args.chart.clone().unwrap_or_else(|| args.stats.with_extension("svg"));
    let mut inputs = vec![args.stats.clone()];
    inputs.extend(args.model.iter().cloned());
    check_output(&chart, &inputs.iter().map(PathBuf::as_path).collect::<Vec<_>>())?;
    nbl_onnx::atomic::write(&chart, analysis.svg().as_bytes()).context("writing the chart")?;
    eprintln!("chart: {}", chart.display());
    emit(args.json, &analysis, || analysis.table())
}

fn run_rewrite(args: &RewriteArgs) -> Result<()> {
    let (output, report_path) = output_paths(&args.model, args.output.as_deref(), args.report.as_deref());
    let mut model = Model::load(&args.model)?;
    let inputs = files_read(
        &model,
        Some(&args.calibration.data),
        &args.stats.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
    );
    let inputs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    for out in
        [Some(output.clone()), model.data_file_for(&output), Some(report_path.clone())].iter().flatten()
    {
        check_output_creating_dir(out, &inputs)?;
    }
    ensure!(
        output != report_path,
        "the report {} would overwrite the model written there",
        report_path.display()
    );
    let blocks = find_blocks(&model)?;
    let selection = args.select.selection(blocks.layers.len());
    selection.check(blocks.layers.len(), &format!("attention layers of {}", args.model.display()))?;
    let storage = MapStorage::resolve(args.weight_format, args.quantizer, args.block_size, &model, &blocks)?;
    if let (EngineChoice::Tract, MapStorage::Blocks { bits, .. }) = (args.calibration.engine.engine, &storage)
    {
        bail!(
            "--weight-format: {bits}-bit maps are com.microsoft::MatMulNBits nodes, which tract (--engine tract) \
             cannot run; use --weight-format f32|f16, or --engine ort"
        );
    }
    ensure!(
        !(args.sequential && args.replace == Replacement::Drop),
        "--sequential fits linear maps stage by stage; with --replace drop there is nothing to fit"
    );
    let measuring = args.select.criterion == Criterion::Measured;
    ensure!(
        !measuring || matches!(selection, Selection::Count(_)),
        "--criterion measured chooses a number of layers (--layers K), not --layer-ids or --max-bound"
    );
    // The engine and data are needed to calibrate, by every stage after the first, and to measure.
    let needs_engine = args.stats.is_none() || args.sequential || measuring;
    let engine = needs_engine.then(|| args.calibration.engine.open()).transpose()?;
    let data = needs_engine
        .then(|| {
            args.calibration.data.spec(model.dir(), Some(DEFAULT_CALIBRATION_SAMPLES), Split::Calibration)
        })
        .transpose()?;
    let stats: Box<dyn MomentsSource> = match &args.stats {
        Some(path) => {
            let stats = StatsFile::open(path)?;
            check_fingerprint(&stats, path, &model, &blocks)?;
            Box::new(stats)
        }
        None => {
            let run = calibrate::Run {
                batch: args.calibration.batch,
                shard: Shard::WHOLE,
                layers: None,
                moments: args.calibration.moments(),
                holdout_every: args.calibration.holdout_every,
            };
            let engine = engine.as_deref().expect("opened to calibrate");
            let data = data.as_ref().expect("resolved to calibrate");
            Box::new(calibrate::run(&model, &blocks, engine, data, run)?)
        }
    };
    let mut analysis = analyze(stats.as_ref(), args.select.criterion, &selection, args.select.lambda, false)?;
    let measured = if let (true, Selection::Count(k)) = (measuring, &selection) {
        let spec = args.calibration.data.spec(model.dir(), Some(args.probe_blocks), Split::Calibration)?;
        let spec = DataSpec {
            files: if args.select_data.is_empty() { spec.files } else { args.select_data.clone() },
            samples: Some(args.probe_blocks),
            ..spec
        };
        let probe_blocks = spec.pack(model.dir(), blocks.vocab_size)?.blocks;
        let probe =
            measured::Probe { engine: engine.as_deref().expect("opened to measure"), blocks: &probe_blocks };
        let fits: Vec<_> = analysis.layers.iter().map(|row| row.fit.clone()).collect();
        let choice =
            measured::choose(&model, &blocks, &fits, stats.as_ref(), *k, analysis.lambda, storage, &probe)?;
        analysis.select(choice.layers());
        Some(choice)
    } else {
        None
    };
    eprintln!("{}", analysis.choice());
    if analysis.selected.is_empty() && !args.allow_noop {
        eprintln!(
            "nothing to rewrite: the selection replaces no layer; pass --allow-noop to write an unchanged copy"
        );
        return Err(check::Failed.into());
    }
    let (fitted, stages) = if args.sequential {
        let blocks_of_text =
            data.as_ref().expect("resolved for the stages").pack(model.dir(), blocks.vocab_size)?.blocks;
        let stages = Stages {
            engine: engine.as_deref().expect("opened for the stages"),
            data: &blocks_of_text,
            batch: args.calibration.batch,
            moments: args.calibration.moments(),
            size: args.stage_size,
        };
        let fit = fit_sequentially(
            &model,
            &blocks,
            &analysis.selected,
            stats.as_ref(),
            analysis.lambda,
            storage,
            &stages,
        )?;
        for (i, stage) in fit.stages.iter().enumerate() {
            eprintln!("stage {}: fitted layers {:?} in {:.1} s", i + 1, stage.layers, stage.seconds);
        }
        (Some(fit.maps), fit.stages)
    } else {
        (None, Vec::new())
    };
    let fitting = if args.sequential { "sequential" } else { "one-shot" };
    let summary = rewrite_selected(
        &mut model,
        &blocks,
        &analysis,
        MapSource { stats: stats.as_ref(), fitted },
        args.replace,
        args.kv,
        storage,
    )?;
    nbl_onnx::atomic::create_dir(&output)?;
    nbl_onnx::atomic::create_dir(&report_path)?;
    let companion = genai::prepare(&model, &output)?;
    model.save(&output)?;
    if let Some(companion) = companion {
        companion.write()?;
    }
    eprintln!(
        "wrote {} ({:?} layers {:?}; nodes {} -> {}; parameters -{} +{}; KV cache {} -> {} bytes/token) and {}",
        output.display(),
        args.replace,
        analysis.selected,
        summary.nodes_before,
        summary.nodes_after,
        summary.params_removed,
        summary.params_added,
        summary.kv_bytes_per_token_before.map_or("?".to_string(), |b| b.to_string()),
        summary.kv_bytes_per_token_after.map_or("?".to_string(), |b| b.to_string()),
        report_path.display()
    );
    let report = RewriteReport {
        analysis,
        model: args.model.display().to_string(),
        output: output.display().to_string(),
        measured,
        fitting,
        stages,
        rewrite: summary,
    };
    nbl_onnx::atomic::write(&report_path, serde_json::to_string_pretty(&report)?.as_bytes())
}

fn run_check(args: &CheckArgs) -> Result<()> {
    let model = Model::load(&args.model)?;
    let tokens = args.prompt_len + args.gen_tokens.max(args.decode_steps);
    nbl_onnx::data::check_context(model.dir(), tokens, "--prompt-len with --gen-tokens")?;
    let reference = args.reference.as_ref().map(Model::load).transpose()?;
    let blocks = find_blocks(&model).ok();
    let ort = engine::open(&EngineOptions { engine: EngineChoice::Ort, ep: args.ep, threads: None })?;
    let tract = engine::open(&EngineOptions {
        engine: EngineChoice::Tract,
        ep: ExecutionProvider::Cpu,
        threads: None,
    })?;
    ensure!(args.prompts > 0, "--prompts must be at least 1");
    let prompts = nbl_onnx::data::DataSpec {
        files: args.data.clone(),
        built_in: Split::Evaluation,
        tokenizer: args.tokenizer.clone(),
        eos_id: None,
        seq_len: args.prompt_len,
        samples: Some(args.prompts),
    };
    let options = CheckOptions {
        prompts,
        decode_steps: args.decode_steps,
        gen_tokens: args.gen_tokens,
        max_kl: args.max_kl,
        min_top1: args.min_top1,
        min_common_tokens: args.min_common_tokens,
    };
    let report =
        check::run(&model, blocks.as_ref(), reference.as_ref(), ort.as_ref(), tract.as_ref(), &options)?;
    emit(args.json, &report, || report.text())?;
    if report.passed() { Ok(()) } else { Err(check::Failed.into()) }
}

/// The models `eval` and `bench` compare, each for its function: exporters' shape annotations can
/// be wrong in ways that stop a runtime from decoding (see `Model::without_value_info`), a rewrite
/// carries none, and they do not change the speed (1.004x prefill, 1.002x decode on the SmolLM2
/// int4 GenAI export).
fn load_functions(paths: &[PathBuf]) -> Result<Vec<Model>> {
    paths.iter().map(|p| Ok(Model::load(p)?.without_value_info())).collect()
}

fn run_eval(args: &EvalArgs) -> Result<()> {
    let models = load_functions(&args.models)?;
    let blocks = find_blocks(&models[0])?;
    let spec = args.data.spec(models[0].dir(), None, Split::Evaluation)?;
    let packed = spec.pack(models[0].dir(), blocks.vocab_size)?;
    let engine = args.engine.open()?;
    let hidden_size = Some(blocks.hidden_size);
    let mut scores = eval::evaluate(&models, hidden_size, engine.as_ref(), &packed.blocks)?;
    if models.len() > 1 {
        let (prompts, tokens) = (args.gen_prompts, args.gen_tokens);
        let agreement = eval::generation_agreement(
            &models,
            hidden_size,
            engine.as_ref(),
            &packed.blocks,
            prompts,
            tokens,
        )?;
        for (score, generation) in scores.iter_mut().zip(agreement) {
            score.generation_vs_first = generation;
        }
    }
    let report = eval::Report {
        engine: engine.describe(),
        seq_len: spec.seq_len,
        blocks: packed.blocks.len(),
        models: scores,
    };
    emit(args.json, &report, || report.table())
}

fn run_bench(args: &BenchArgs) -> Result<()> {
    let models = load_functions(&args.models)?;
    for model in &models {
        let tokens = args.prompt_len + args.new_tokens;
        nbl_onnx::data::check_context(model.dir(), tokens, "--prompt-len with --gen")?;
    }
    let engine =
        engine::open(&EngineOptions { engine: EngineChoice::Ort, ep: args.ep, threads: args.threads })?;
    if args.peak_memory {
        ensure!(models.len() == 1, "--peak-memory measures one model");
        println!("{}", bench::peak_memory_mb(&models[0], engine.as_ref(), args.prompt_len)?);
        return Ok(());
    }
    eprintln!("engine: {}", engine.describe());
    let options = bench::BenchOptions {
        prompt_len: args.prompt_len,
        new_tokens: args.new_tokens,
        runs: args.runs,
        ep: args.ep,
        threads: args.threads,
    };
    let timings = bench::bench(&models, engine.as_ref(), &options)?;
    let json = serde_json::json!({
        "ep": args.ep.to_string(), "engine": engine.describe(), "threads": args.threads,
        "prompt_len": args.prompt_len, "gen": args.new_tokens, "runs": args.runs, "models": &timings,
    });
    emit(args.json, &json, || bench::table(&timings, &options, &engine.describe()))
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
        Err(e) if e.is::<check::Failed>() => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
