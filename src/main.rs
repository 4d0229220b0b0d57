//! The `nbl-onnx` command line: parses arguments and calls the library, one function per subcommand.
//! Exit codes: 0 success, 1 a check or gate failed, 2 bad input.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use nbl_onnx::inspect::inspect;
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
}

fn run_inspect(args: &InspectArgs) -> Result<()> {
    let model = Model::load(&args.model)?;
    let report = inspect(&model)?;
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
