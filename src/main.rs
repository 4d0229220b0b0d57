//! The `nbl-onnx` command line: parses and validates arguments ([`cli`]), calls one pipeline
//! function per subcommand, prints. Exit codes: 0 success, 1 a check or gate failed (or nothing
//! was rewritten), 2 bad input.

mod cli;

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, ensure};
use clap::{CommandFactory, Parser};

use cli::*;
use nbl_onnx::calibrate::check_fingerprint;
use nbl_onnx::detect::find_layout;
use nbl_onnx::invalid::{Invalid, Setting};
use nbl_onnx::onnx::Model;
use nbl_onnx::pipeline::{self, GenerationPlan, NothingToRewrite};
use nbl_onnx::select::Criterion;
use nbl_onnx::select::budget::Unreachable;
use nbl_onnx::stats::write_synthetic;

/// A run that worked but did not pass: a failed check or gate, or nothing to rewrite. Exit code 1.
#[derive(Debug)]
struct NotPassed;

impl std::fmt::Display for NotPassed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not passed")
    }
}

impl std::error::Error for NotPassed {}

/// Prints `value` as JSON, or `text` for people.
fn emit(json: bool, value: &impl serde::Serialize, text: impl FnOnce() -> String) -> Result<()> {
    if json {
        // With the command that made it, so that a report says how to reproduce it.
        let mut value = serde_json::to_value(value)?;
        if let (Some(object), Some(command)) = (value.as_object_mut(), nbl_onnx::report::command_line()) {
            object.insert("command".into(), command.into());
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{}", text());
    }
    Ok(())
}

fn run_inspect(args: &InspectArgs) -> Result<()> {
    let report = pipeline::inspect(&args.model, args.run.then(|| args.engine.options()).as_ref())?;
    emit(args.json, &report, || report.table())
}

fn run_calibrate(args: &CalibrateArgs) -> Result<()> {
    let calibration = args.calibration.calibration();
    let stats = pipeline::calibrate(&args.model, &calibration, args.shard, args.layer_range, &args.output)?;
    let sites = stats.layers.iter().filter(|t| t.unit.is_none()).count();
    let others = match stats.layers.len() - sites {
        0 => String::new(),
        n => format!(" and {n} other units"),
    };
    eprintln!("wrote {} ({sites} layers{others}, {} tokens)", args.output.display(), stats.tokens());
    if args.json {
        let summary = serde_json::json!({
            "output": args.output.display().to_string(),
            "model": args.model.display().to_string(),
            "layers": sites,
            "units": stats.layers.len() - sites,
            "tokens": stats.tokens(),
        });
        println!("{summary}");
    }
    Ok(())
}

fn run_merge(args: &MergeArgs) -> Result<()> {
    let merged = pipeline::merge_stats(&args.stats, &args.output)?;
    let (files, output, tokens) = (args.stats.len(), args.output.display(), merged.tokens());
    eprintln!("merged {files} files into {output} ({tokens} tokens)");
    Ok(())
}

fn run_sweep(args: &SweepArgs) -> Result<()> {
    let plan = args.plan()?;
    let report = pipeline::sweep(&plan)?;
    let [json, markdown, svg] = pipeline::sweep_outputs(&plan.output_dir);
    eprintln!("wrote {}, {} and {}", json.display(), markdown.display(), svg.display());
    emit(args.json, &report, || report.table())?;
    for line in report.closing_lines() {
        eprintln!("{line}");
    }
    Ok(())
}

fn run_analyze(args: &AnalyzeArgs) -> Result<()> {
    ensure!(
        args.select.criterion != Criterion::Measured,
        "--criterion measured runs the model on text: use it with rewrite (analyze reads statistics only)"
    );
    let chart = args.chart.clone().unwrap_or_else(|| args.stats.with_extension("svg"));
    let analysis =
        pipeline::analyze(&args.stats, &args.select.plan(), args.spectrum, args.model.as_deref(), &chart)?;
    eprintln!("chart: {}", chart.display());
    emit(args.json, &analysis, || analysis.table())
}

fn run_rewrite(args: &RewriteArgs) -> Result<()> {
    let plan = args.plan()?;
    let report = match pipeline::rewrite(&plan) {
        Err(e) if e.is::<NothingToRewrite>() => {
            eprintln!("{e}; pass --allow-noop to write an unchanged copy");
            return Err(NotPassed.into());
        }
        Err(e) if e.downcast_ref::<Unreachable>().is_some() => {
            eprintln!("{e}; nothing was written");
            return Err(NotPassed.into());
        }
        other => other?,
    };
    let s = &report.rewrite;
    let units = s.units.iter().map(|u| u.to_string()).collect::<Vec<_>>().join(", ");
    let kv = |b: Option<u64>| b.map_or("?".to_string(), |b| b.to_string());
    eprintln!(
        "wrote {} ({:?} {units}; nodes {} -> {}; parameters -{} +{}; KV cache {} -> {} bytes/token) and {}",
        plan.output.display(),
        s.replace,
        s.nodes_before,
        s.nodes_after,
        s.params_removed,
        s.params_added,
        kv(s.kv_bytes_per_token_before),
        kv(s.kv_bytes_per_token_after),
        plan.report.display()
    );
    for fold in &s.folds {
        let how = if fold.requantised { "quantised again to its own bits" } else { "multiplied exactly" };
        eprintln!(
            "{}: the map is folded into {:?} (its weights {how}, and a bias added)",
            fold.unit, fold.projection
        );
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

fn run_check(args: &CheckArgs) -> Result<()> {
    let options = args.options()?;
    let report = pipeline::check(&args.model, args.reference.as_deref(), args.ep, &options)?;
    emit(args.json, &report, || report.text())?;
    if report.passed() { Ok(()) } else { Err(NotPassed.into()) }
}

fn run_eval(args: &EvalArgs) -> Result<()> {
    let generation = GenerationPlan { prompts: args.gen_prompts, tokens: args.gen_tokens };
    let report = pipeline::eval(&args.models, &args.data.request(), &args.engine.options(), generation)?;
    emit(args.json, &report, || report.table())
}

fn run_bench(args: &BenchArgs) -> Result<()> {
    let options = args.options();
    if args.peak_memory {
        ensure!(args.models.len() == 1, "--peak-memory measures one model");
        println!("{}", pipeline::peak_memory(&args.models[0], &options)?);
        return Ok(());
    }
    let report = pipeline::bench(&args.models, &options, &|model| peak_memory_in_child(model, &options))?;
    emit(args.json, &report, || report.table())
}

fn run_card(args: &CardArgs) -> Result<()> {
    let read = |path: &Path| -> Result<serde_json::Value> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
    };
    let rewrite = read(&args.report)?;
    let output = rewrite["output"]
        .as_str()
        .with_context(|| format!("{} is not a rewrite report: it names no output", args.report.display()))?;
    let dir = nbl_onnx::atomic::dir_of(Path::new(output));
    let companion_dir = nbl_onnx::hub::RepoLayout::of(dir).companion_dir(dir);
    let card = args.output.clone().unwrap_or_else(|| companion_dir.join("README.md"));
    ensure!(
        nbl_onnx::card::may_write(&card),
        "refusing to write {}: it is not a model card nbl-onnx wrote (give another -o)",
        card.display()
    );
    let [check, eval, bench] =
        [&args.check, &args.eval, &args.bench].map(|p| p.as_deref().map(read).transpose());
    let (check, eval, bench) = (check?, eval?, bench?);
    let config = read(&companion_dir.join("config.json")).ok();
    let sources = nbl_onnx::card::CardSources {
        rewrite: &rewrite,
        check: check.as_ref(),
        eval: eval.as_ref(),
        bench: bench.as_ref(),
        config: config.as_ref(),
    };
    nbl_onnx::atomic::check_output(&card, &[&args.report])?;
    let mut set = nbl_onnx::atomic::OutputSet::new();
    set.stage_bytes(&card, nbl_onnx::card::render(&sources).as_bytes())?;
    set.commit()?;
    eprintln!("wrote {}", card.display());
    Ok(())
}

fn run_synthetic_stats(args: &SyntheticStatsArgs) -> Result<()> {
    let (fingerprint, d, layers) = match &args.model {
        Some(path) => {
            let model = Model::load(path)?;
            let layout = find_layout(&model)?;
            let fingerprint = nbl_onnx::calibrate::fingerprint(&model, &layout);
            (fingerprint, layout.hidden_size, nbl_onnx::calibrate::layer_tensors(&layout))
        }
        None => {
            let layers = (0..args.layers)
                .map(|l| nbl_onnx::stats::LayerTensors::attention(l, &format!("x{l}"), &format!("y{l}")))
                .collect();
            ("synthetic".to_string(), args.hidden_size, layers)
        }
    };
    nbl_onnx::atomic::check_output(&args.output, &[])?;
    nbl_onnx::atomic::create_dir(&args.output)?;
    let bytes =
        write_synthetic(&args.output, &fingerprint, d, &layers).context("writing synthetic statistics")?;
    let path = args.output.display().to_string();
    let summary = serde_json::json!({"path": path, "hidden_size": d, "layers": layers.len(), "bytes": bytes});
    println!("{summary}");
    // The file must be what rewrite accepts for the model it was made for.
    if let Some(model) = &args.model {
        let model = Model::load(model)?;
        let stats = nbl_onnx::stats::StatsFile::open(&args.output)?;
        check_fingerprint(&stats, &args.output, &model, &find_layout(&model)?)?;
    }
    Ok(())
}

/// The flag that carries `setting`, as it leads a message about its value.
fn flag(setting: Setting) -> &'static str {
    match setting {
        Setting::LayerCount => "--layers ",
        Setting::LayerIds => "--layer-ids: ",
        Setting::MaxBound => "--max-bound: ",
        Setting::GroupSize => "--block-size ",
        Setting::SequenceLength => "--seq-len: ",
        Setting::EosId => "--eos-id ",
        Setting::Units => "--units: ",
    }
}

/// The message of a failed command, the flag named where the library says which setting was wrong.
fn message(e: &anyhow::Error) -> String {
    match e.chain().find_map(|c| c.downcast_ref::<Invalid>()) {
        Some(invalid) => format!("{}{e:#}", flag(invalid.setting)),
        None => format!("{e:#}"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    nbl_onnx::report::record_command_line(std::env::args());
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
        Command::Sweep(args) => run_sweep(args),
        Command::Card(args) => run_card(args),
        Command::Completions(args) => {
            // Into memory first: the generator panics on a failed write (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(args.shell, &mut Cli::command(), "nbl-onnx", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script)
                .context("writing the completion script")
        }
        Command::Man => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .context("writing the manual page"),
        Command::SyntheticStats(args) => run_synthetic_stats(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<NotPassed>() => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {}", message(&e));
            ExitCode::from(2)
        }
    }
}
