//! Engines that run ONNX models behind one trait: ONNX Runtime (production; CPU, CUDA, TensorRT) and
//! tract (embedded, pure Rust; always available and the independent second runtime in checks).

mod feed;
mod ort;
mod tract;

pub use feed::{decode_inputs, prefill_inputs, present_as_past};

use anyhow::{Result, bail};
use clap::ValueEnum;

use crate::onnx::{Model, Tensor};

/// A loaded model, ready to run.
pub trait Session {
    /// The model's input names, in declaration order.
    fn input_names(&self) -> &[String];
    /// The output names: the model's own, then the extra outputs asked for at load.
    fn output_names(&self) -> &[String];
    /// Runs the model; returns one tensor per `output_names()` entry, in that order.
    fn run(&mut self, inputs: &[(String, Tensor)]) -> Result<Vec<Tensor>>;
}

/// Picks `names` out of a run's outputs (a requested tensor that is also a model output appears
/// once, under the model's own position).
pub fn select<'a>(session: &dyn Session, outputs: &'a [Tensor], names: &[String]) -> Result<Vec<&'a Tensor>> {
    names
        .iter()
        .map(|name| {
            let i = session
                .output_names()
                .iter()
                .position(|o| o == name)
                .ok_or_else(|| anyhow::anyhow!("the engine returned no tensor {name:?}"))?;
            Ok(&outputs[i])
        })
        .collect()
}

/// A runtime able to load models.
pub trait Engine {
    /// What actually runs, e.g. `onnxruntime 1.32.0 (CPU)` or `tract 0.23.9`.
    fn describe(&self) -> String;
    /// Loads `model`, exposing the intermediate tensors `extra_outputs` after the model's outputs.
    fn load(&self, model: &Model, extra_outputs: &[String]) -> Result<Box<dyn Session>>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EngineChoice {
    /// ONNX Runtime when its library loads, else tract
    Auto,
    /// ONNX Runtime, loaded from ORT_DYLIB_PATH or the library scripts/setup-ort.sh installs
    Ort,
    /// tract, the embedded pure-Rust engine
    Tract,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExecutionProvider {
    Cpu,
    Cuda,
    Tensorrt,
}

impl std::fmt::Display for ExecutionProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ExecutionProvider::Cpu => "CPU",
            ExecutionProvider::Cuda => "CUDA",
            ExecutionProvider::Tensorrt => "TensorRT",
        })
    }
}

#[derive(Clone, Copy, Debug)]
pub struct EngineOptions {
    pub engine: EngineChoice,
    pub ep: ExecutionProvider,
    /// Intra-op threads; `None` lets the engine decide.
    pub threads: Option<usize>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { engine: EngineChoice::Auto, ep: ExecutionProvider::Cpu, threads: None }
    }
}

/// Opens the engine asked for. `auto` falls back to tract only for the CPU provider, and says so in
/// `describe()`; a GPU provider that cannot be had is an error, never a silent CPU run.
pub fn open(options: &EngineOptions) -> Result<Box<dyn Engine>> {
    match options.engine {
        EngineChoice::Ort => Ok(Box::new(ort::OrtEngine::new(options)?)),
        EngineChoice::Tract => {
            if options.ep != ExecutionProvider::Cpu {
                bail!(
                    "tract runs on the CPU only; use --engine ort for the {} execution provider",
                    options.ep
                );
            }
            Ok(Box::new(tract::TractEngine::new(None)))
        }
        EngineChoice::Auto => match ort::OrtEngine::new(options) {
            Ok(engine) => Ok(Box::new(engine)),
            Err(e) if options.ep == ExecutionProvider::Cpu => {
                Ok(Box::new(tract::TractEngine::new(Some(format!("ONNX Runtime unavailable: {e:#}")))))
            }
            Err(e) => Err(e),
        },
    }
}
