//! Engines that run ONNX models behind one trait: ONNX Runtime (production; CPU, CUDA, TensorRT) and
//! tract (embedded, pure Rust; always available and the independent second runtime in checks).

mod ort;
mod tract;

use anyhow::{Result, bail};
use clap::ValueEnum;

use crate::onnx::{Model, Tensor};

/// A loaded model, ready to run.
pub trait Session {
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
    /// Loads `model` as it is in memory, exposing the intermediate tensors `extra_outputs` after
    /// the model's outputs. A model the engine has no implementation for fails with
    /// [`Unsupported`].
    fn load(&self, model: &Model, extra_outputs: &[String]) -> Result<Box<dyn Session>>;

    /// Loads `model` to be run step after step with state: each `carried` (input, output) pair's
    /// output is the pair's input at the next step, and only the `fetched` outputs come back. This
    /// default passes the state through the host; an engine that can keep it where it computes
    /// (ONNX Runtime: in the execution provider's memory) does so.
    fn load_stateful(
        &self,
        model: &Model,
        carried: &[(String, String)],
        fetched: &[String],
    ) -> Result<Box<dyn StatefulSession>> {
        Ok(Box::new(HostStateful {
            session: self.load(model, &[])?,
            carried: carried.to_vec(),
            fetched: fetched.to_vec(),
            state: Vec::new(),
        }))
    }
}

/// A model run step after step with state that stays in the engine (see [`Engine::load_stateful`]):
/// the running sums of a calibration, the KV cache of a decoder.
pub trait StatefulSession {
    /// Sets the state, in the order of the carried pairs, before a first step.
    fn reset(&mut self, state: Vec<Tensor>) -> Result<()>;
    /// Runs one step: `inputs` are the model's inputs but the carried ones. Returns the fetched
    /// outputs, on the host.
    fn step(&mut self, inputs: &[(String, Tensor)]) -> Result<Vec<Tensor>>;
    /// The state after the last step, on the host.
    fn state(&mut self) -> Result<Vec<Tensor>>;
}

struct HostStateful {
    session: Box<dyn Session>,
    carried: Vec<(String, String)>,
    fetched: Vec<String>,
    state: Vec<Tensor>,
}

impl StatefulSession for HostStateful {
    fn reset(&mut self, state: Vec<Tensor>) -> Result<()> {
        anyhow::ensure!(
            state.len() == self.carried.len(),
            "{} state tensors for {}",
            state.len(),
            self.carried.len()
        );
        self.state = state;
        Ok(())
    }

    fn step(&mut self, inputs: &[(String, Tensor)]) -> Result<Vec<Tensor>> {
        let state = std::mem::take(&mut self.state);
        let mut all = inputs.to_vec();
        all.extend(self.carried.iter().map(|(input, _)| input.clone()).zip(state));
        let mut outputs: Vec<Option<Tensor>> = self.session.run(&all)?.into_iter().map(Some).collect();
        let names = self.session.output_names();
        let mut take = |name: &String| {
            let i = names.iter().position(|o| o == name);
            i.and_then(|i| outputs[i].take())
                .ok_or_else(|| anyhow::anyhow!("the engine returned no {name:?}"))
        };
        self.state = self.carried.iter().map(|(_, output)| take(output)).collect::<Result<_>>()?;
        self.fetched.iter().map(take).collect()
    }

    fn state(&mut self) -> Result<Vec<Tensor>> {
        Ok(self.state.clone())
    }
}

/// The engine does not implement something the model uses (an operator, an element type): the
/// model may be fine, this engine cannot run it. Callers that try several engines branch on it.
#[derive(Debug)]
pub struct Unsupported {
    pub engine: String,
    pub reason: String,
}

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} cannot run this model: {}", self.engine, self.reason)
    }
}

impl std::error::Error for Unsupported {}

/// The model `extra_outputs` are exposed in, through a [`Patch`](crate::onnx::Patch).
fn with_outputs(model: &Model, extra_outputs: &[String]) -> Result<crate::onnx::proto::ModelProto> {
    let mut proto = model.proto.clone();
    if !extra_outputs.is_empty() {
        let mut patch = crate::onnx::Patch::new(model.graph())?;
        for name in extra_outputs {
            patch.add_output(name)?;
        }
        proto.graph = Some(patch.apply()?.graph);
    }
    Ok(proto)
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

/// Opens the engine asked for. `auto` falls back to tract only for the CPU provider, and says so in
/// `describe()`; a GPU provider that cannot be had is an error, never a silent CPU run.
pub fn open(options: &EngineOptions) -> Result<Box<dyn Engine>> {
    match options.engine {
        EngineChoice::Ort => Ok(Box::new(ort::OrtEngine::new(options)?)),
        EngineChoice::Tract => {
            if options.ep != ExecutionProvider::Cpu {
                bail!(
                    "tract runs on the CPU only; use ONNX Runtime for the {} execution provider",
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
