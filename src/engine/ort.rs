//! ONNX Runtime through `ort`, loaded at run time. The only module that knows ONNX Runtime exists.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow, bail, ensure};
use ndarray::ArrayD;
use ort::environment::Environment;
use ort::ep::{ExecutionProvider as _, ExecutionProviderDispatch};
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session as OrtSession;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{IoBinding, SessionInputValue};
use ort::value::{DynValue, Tensor as OrtTensor, TensorElementType, TensorRef, TensorValueType, ValueType};
use prost::Message;

use super::{EngineOptions, ExecutionProvider, Session, StatefulSession};
use crate::onnx::{Model, Tensor};

/// The process's one ONNX Runtime environment (the library can be loaded only once).
static ENVIRONMENT: OnceLock<std::result::Result<(Environment, PathBuf), String>> = OnceLock::new();

pub struct OrtEngine {
    environment: &'static Environment,
    library: PathBuf,
    ep: ExecutionProvider,
    threads: Option<usize>,
}

/// The ONNX Runtime shared library, the first found of: `ORT_DYLIB_PATH`; the `onnxruntime` (or
/// `onnxruntime-gpu`) package of the Python environment this executable is installed in, as
/// `pip install nbl-onnx` installs them; where `scripts/setup-ort.sh` puts it.
fn library_path(ep: ExecutionProvider) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        let path = PathBuf::from(path);
        ensure!(path.is_file(), "ORT_DYLIB_PATH={} is not a file", path.display());
        return Ok(path);
    }
    if let Some(path) = python_environment_library() {
        return Ok(path);
    }
    let flavour = if ep == ExecutionProvider::Cpu { "cpu" } else { "gpu" };
    let root = match std::env::var_os("NBL_ORT_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("HOME").context("HOME is not set")?;
            Path::new(&home).join(".cache/nbl-onnx/onnxruntime")
        }
    };
    let path = root.join(flavour).join("libonnxruntime.so");
    ensure!(
        path.is_file(),
        "the ONNX Runtime library was not found: pip install {} into the Python environment nbl-onnx is \
         installed in, or run scripts/setup-ort.sh{} (looked for {}), or set ORT_DYLIB_PATH",
        if flavour == "gpu" { "onnxruntime-gpu[cuda,cudnn]" } else { "onnxruntime" },
        if flavour == "gpu" { " --gpu" } else { "" },
        path.display(),
    );
    Ok(path)
}

/// `libonnxruntime.so.*` of the `onnxruntime` package of the environment this executable is
/// installed in: a virtualenv or prefix keeps executables in `bin/` and packages in
/// `lib/pythonX.Y/site-packages/`. The newest version where there are several.
fn python_environment_library() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?.canonicalize().ok()?;
    let prefix = exe.parent()?.parent()?;
    let mut found = Vec::new();
    for lib in ["lib", "lib64"] {
        for python in std::fs::read_dir(prefix.join(lib)).into_iter().flatten().flatten() {
            if !python.file_name().to_string_lossy().starts_with("python") {
                continue;
            }
            let capi = python.path().join("site-packages/onnxruntime/capi");
            found.extend(std::fs::read_dir(capi).into_iter().flatten().flatten().map(|f| f.path()).filter(
                |p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("libonnxruntime.so."))
                },
            ));
        }
    }
    found.into_iter().max()
}

impl OrtEngine {
    pub fn new(options: &EngineOptions) -> Result<OrtEngine> {
        let loaded = ENVIRONMENT.get_or_init(|| {
            let load = || -> Result<(Environment, PathBuf)> {
                let path = library_path(options.ep)?;
                if options.ep != ExecutionProvider::Cpu {
                    preload_cuda_libraries(&path)?;
                }
                let builder = ort::init_from(&path)
                    .map_err(|e| anyhow!("cannot load ONNX Runtime from {}: {e}", path.display()))?;
                let environment = builder.with_name("nbl-onnx").build().map_err(|e| anyhow!("{e}"))?;
                Ok((environment, path))
            };
            load().map_err(|e| format!("{e:#}"))
        });
        let (environment, library) = loaded.as_ref().map_err(|e| anyhow!("{e}"))?;
        // Registration can still fail per session (missing CUDA libraries, no device); that too is an
        // error (`error_on_failure`), but a build without the provider is told here, before any work.
        let compiled_in = match options.ep {
            ExecutionProvider::Cpu => Ok(true),
            ExecutionProvider::Cuda => ort::ep::CUDA::is_available(),
            ExecutionProvider::Tensorrt => ort::ep::TensorRT::is_available(),
        };
        if !compiled_in.map_err(|e| anyhow!("{e}"))? {
            bail!(
                "the ONNX Runtime library {} has no {} execution provider: install the GPU build \
                 (pip install onnxruntime-gpu[cuda,cudnn] in place of onnxruntime, or scripts/setup-ort.sh --gpu, \
                 or point ORT_DYLIB_PATH at one)",
                library.display(),
                options.ep
            );
        }
        Ok(OrtEngine { environment, library: library.clone(), ep: options.ep, threads: options.threads })
    }

    fn execution_providers(&self) -> Vec<ExecutionProviderDispatch> {
        match self.ep {
            ExecutionProvider::Cpu => vec![],
            ExecutionProvider::Cuda => vec![ort::ep::CUDA::default().build().error_on_failure()],
            ExecutionProvider::Tensorrt => vec![
                ort::ep::TensorRT::default().build().error_on_failure(),
                ort::ep::CUDA::default().build().error_on_failure(),
            ],
        }
    }
}

/// The CUDA wheels (`nvidia-*-cu13`) put their libraries under `site-packages/nvidia/*/lib`; the
/// CUDA provider finds them only if they are loaded first.
fn preload_cuda_libraries(library: &Path) -> Result<()> {
    let real = std::fs::canonicalize(library)?;
    // .../site-packages/onnxruntime/capi/libonnxruntime.so.X -> .../site-packages/nvidia
    let Some(site) = real.ancestors().nth(3) else { return Ok(()) };
    let nvidia = site.join("nvidia");
    if !nvidia.is_dir() {
        return Ok(()); // a system CUDA install, found by the dynamic loader
    }
    let lib_dir = |parts: &[&str]| parts.iter().map(|p| nvidia.join(p).join("lib")).find(|d| d.is_dir());
    let cuda = lib_dir(&["cu13", "cuda_runtime"]);
    let cudnn = lib_dir(&["cudnn"]);
    ort::ep::cuda::preload_dylibs(cuda.as_deref(), cudnn.as_deref())
        .map_err(|e| anyhow!("cannot load the CUDA libraries from {}: {e}", nvidia.display()))
}

impl super::Engine for OrtEngine {
    fn describe(&self) -> String {
        let version = std::fs::canonicalize(&self.library)
            .ok()
            .and_then(|p| p.file_name()?.to_str()?.strip_prefix("libonnxruntime.so.").map(str::to_string))
            .unwrap_or_else(|| "(unknown version)".into());
        format!("onnxruntime {version} ({})", self.ep)
    }

    fn load(&self, model: &Model, extra_outputs: &[String]) -> Result<Box<dyn Session>> {
        let session = self.session(model, extra_outputs)?;
        let outputs = session.outputs().iter().map(|o| o.name().to_string()).collect();
        Ok(Box::new(OrtRunner { session, outputs }))
    }

    /// The state stays in the execution provider's memory between steps (I/O binding): on a GPU,
    /// only the fetched outputs cross to the host at each step.
    fn load_stateful(
        &self,
        model: &Model,
        carried: &[(String, String)],
        fetched: &[String],
    ) -> Result<Box<dyn StatefulSession>> {
        let session = self.session(model, &[])?;
        let err = |e: ort::Error| anyhow!("ONNX Runtime I/O binding: {e}");
        let binding = session.create_binding().map_err(err)?;
        let device = match self.ep {
            ExecutionProvider::Cpu => AllocationDevice::CPU,
            ExecutionProvider::Cuda | ExecutionProvider::Tensorrt => AllocationDevice::CUDA,
        };
        let memory =
            |device| MemoryInfo::new(device, 0, AllocatorType::Device, MemoryType::Default).map_err(err);
        Ok(Box::new(OrtStateful {
            session,
            binding,
            carried: carried.to_vec(),
            fetched: fetched.to_vec(),
            state: Vec::new(),
            device: memory(device)?,
            host: memory(AllocationDevice::CPU)?,
        }))
    }
}

impl OrtEngine {
    fn session(&self, model: &Model, extra_outputs: &[String]) -> Result<OrtSession> {
        let bytes = super::with_outputs(model, extra_outputs)?.encode_to_vec();
        let err = |e: ort::Error<ort::session::builder::SessionBuilder>| anyhow!("{e}");
        let mut builder = OrtSession::builder(self.environment)
            .map_err(|e| anyhow!("{e}"))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(err)?
            // External data is resolved against the model's own directory, not the working directory.
            .with_config_entry(
                "session.model_external_initializers_file_folder_path",
                model.dir().to_string_lossy(),
            )
            .map_err(err)?
            .with_execution_providers(self.execution_providers())
            .map_err(err)?;
        if let Some(threads) = self.threads {
            builder = builder.with_intra_threads(threads).map_err(err)?;
        }
        builder
            .commit_from_memory(&bytes)
            .map_err(|e| anyhow!("ONNX Runtime cannot load {}: {e}", model.path.display()))
    }
}

struct OrtStateful {
    session: OrtSession,
    binding: IoBinding,
    carried: Vec<(String, String)>,
    fetched: Vec<String>,
    /// The latest state, bound as the next step's inputs.
    state: Vec<DynValue>,
    /// Where the carried outputs are kept, and where the fetched ones go.
    device: MemoryInfo<'static>,
    host: MemoryInfo<'static>,
}

impl OrtStateful {
    fn bind_state(&mut self, state: Vec<DynValue>) -> Result<()> {
        for ((input, _), value) in self.carried.iter().zip(&state) {
            self.binding.bind_input(input, value).map_err(|e| anyhow!("ONNX Runtime I/O binding: {e}"))?;
        }
        self.state = state;
        Ok(())
    }
}

impl StatefulSession for OrtStateful {
    fn reset(&mut self, state: Vec<Tensor>) -> Result<()> {
        ensure!(
            state.len() == self.carried.len(),
            "{} state tensors for {}",
            state.len(),
            self.carried.len()
        );
        let values = state.iter().map(owned_value).collect::<Result<Vec<_>>>()?;
        self.bind_state(values)
    }

    fn step(&mut self, inputs: &[(String, Tensor)]) -> Result<Vec<Tensor>> {
        let err = |e: ort::Error| anyhow!("ONNX Runtime run failed: {e}");
        for (name, tensor) in inputs {
            let value = owned_value(tensor).with_context(|| format!("input {name:?}"))?;
            self.binding.bind_input(name, &value).map_err(err)?;
        }
        // Outputs are bound afresh at every step: a bound output keeps the value of the last run,
        // and a KV cache grows.
        self.binding.clear_outputs();
        for (_, output) in &self.carried {
            self.binding.bind_output_to_device(output, &self.device).map_err(err)?;
        }
        for output in &self.fetched {
            self.binding.bind_output_to_device(output, &self.host).map_err(err)?;
        }
        let mut outputs = self.session.run_binding(&self.binding).map_err(err)?;
        let mut take =
            |name: &String| outputs.remove(name).with_context(|| format!("output {name:?} missing"));
        let state = self.carried.iter().map(|(_, output)| take(output)).collect::<Result<Vec<_>>>()?;
        let fetched = self.fetched.iter().map(|name| from_ort(&take(name)?)).collect::<Result<Vec<_>>>()?;
        drop(outputs);
        self.bind_state(state)?;
        Ok(fetched)
    }

    fn state(&mut self) -> Result<Vec<Tensor>> {
        self.state.iter().map(to_host).collect()
    }
}

/// A copy on the host of a tensor wherever it lives.
fn to_host(value: &DynValue) -> Result<Tensor> {
    fn copy<T: ort::value::PrimitiveTensorElementType + std::fmt::Debug>(value: &DynValue) -> Result<Tensor> {
        let err = |e: ort::Error| anyhow!("copying a tensor to the host: {e}");
        let typed = value.view().downcast::<TensorValueType<T>>().map_err(err)?;
        from_ort(&typed.to(AllocationDevice::CPU, 0).map_err(err)?.into_dyn())
    }
    match value.dtype() {
        ValueType::Tensor { ty: TensorElementType::Float64, .. } => copy::<f64>(value),
        ValueType::Tensor { ty: TensorElementType::Float32, .. } => copy::<f32>(value),
        ValueType::Tensor { ty: TensorElementType::Float16, .. } => copy::<half::f16>(value),
        other => bail!("cannot copy a {other:?} to the host"),
    }
}

struct OrtRunner {
    session: OrtSession,
    outputs: Vec<String>,
}

impl Session for OrtRunner {
    fn output_names(&self) -> &[String] {
        &self.outputs
    }

    fn run(&mut self, inputs: &[(String, Tensor)]) -> Result<Vec<Tensor>> {
        let mut values: Vec<(&str, SessionInputValue<'_>)> = Vec::with_capacity(inputs.len());
        for (name, tensor) in inputs {
            values.push((name, to_ort(tensor).with_context(|| format!("input {name:?}"))?));
        }
        let outputs = self.session.run(values).map_err(|e| anyhow!("ONNX Runtime run failed: {e}"))?;
        self.outputs
            .iter()
            .map(|name| {
                let value = outputs.get(name).with_context(|| format!("output {name:?} missing"))?;
                from_ort(value).with_context(|| format!("output {name:?}"))
            })
            .collect()
    }
}

/// `$f(array)` for the array of whichever element type `$tensor` holds.
macro_rules! each_array {
    ($tensor:expr, $f:ident) => {
        match $tensor {
            Tensor::F32(a) => $f(a),
            Tensor::F16(a) => $f(a),
            Tensor::BF16(a) => $f(a),
            Tensor::F64(a) => $f(a),
            Tensor::I64(a) => $f(a),
            Tensor::I32(a) => $f(a),
            Tensor::I8(a) => $f(a),
            Tensor::U8(a) => $f(a),
            Tensor::Bool(a) => $f(a),
        }
    };
}

/// An input for ONNX Runtime: a view of the array's memory when it is contiguous (the KV cache is
/// tens of megabytes at long contexts), a copy otherwise.
fn to_ort(tensor: &Tensor) -> Result<SessionInputValue<'_>> {
    fn value<T: ort::value::PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static>(
        a: &ArrayD<T>,
    ) -> Result<SessionInputValue<'_>> {
        let err = |e: ort::Error| anyhow!("{e}");
        Ok(if a.is_standard_layout() {
            TensorRef::from_array_view(a).map_err(err)?.into()
        } else {
            OrtTensor::from_array(a.as_standard_layout().into_owned()).map_err(err)?.into()
        })
    }
    each_array!(tensor, value)
}

/// An input ONNX Runtime owns (a copy), for I/O binding, which keeps inputs alive across runs.
fn owned_value(tensor: &Tensor) -> Result<DynValue> {
    fn value<T: ort::value::PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static>(
        a: &ArrayD<T>,
    ) -> Result<DynValue> {
        Ok(OrtTensor::from_array(a.as_standard_layout().into_owned()).map_err(|e| anyhow!("{e}"))?.into_dyn())
    }
    each_array!(tensor, value)
}

fn from_ort(value: &DynValue) -> Result<Tensor> {
    let ValueType::Tensor { ty, .. } = value.dtype() else {
        bail!("not a tensor: {:?}", value.dtype());
    };
    let get = |e: ort::Error| anyhow!("{e}");
    Ok(match ty {
        TensorElementType::Float32 => Tensor::F32(value.try_extract_array::<f32>().map_err(get)?.to_owned()),
        TensorElementType::Float16 => Tensor::F16(value.try_extract_array().map_err(get)?.to_owned()),
        TensorElementType::Bfloat16 => Tensor::BF16(value.try_extract_array().map_err(get)?.to_owned()),
        TensorElementType::Float64 => Tensor::F64(value.try_extract_array().map_err(get)?.to_owned()),
        TensorElementType::Int64 => Tensor::I64(value.try_extract_array().map_err(get)?.to_owned()),
        TensorElementType::Int32 => Tensor::I32(value.try_extract_array().map_err(get)?.to_owned()),
        TensorElementType::Int8 => Tensor::I8(value.try_extract_array().map_err(get)?.to_owned()),
        TensorElementType::Uint8 => Tensor::U8(value.try_extract_array().map_err(get)?.to_owned()),
        TensorElementType::Bool => Tensor::Bool(value.try_extract_array().map_err(get)?.to_owned()),
        other => bail!("element type {other:?} is not supported"),
    })
}
