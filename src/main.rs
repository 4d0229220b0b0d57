//! The `nbl-onnx` command line: parses arguments and calls the library, one function per subcommand.
//! Exit codes: 0 success, 1 a check or gate failed, 2 bad input.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use nbl_onnx::engine::{self, EngineChoice, EngineOptions, ExecutionProvider};
use nbl_onnx::inspect::{inspect, trial_run};
use nbl_onnx::onnx::Model;

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
}

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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Inspect(args) => run_inspect(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
