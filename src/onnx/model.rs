//! Loading and saving ONNX models, with external data read lazily: loading maps the `.onnx` file and
//! only checks where external weights live; their bytes are read when a tensor is asked for.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use prost::Message;

use super::proto::{GraphProto, ModelProto, StringStringEntryProto, TensorProto, tensor_proto};
use super::tensor::{DType, Tensor};
use crate::atomic;

/// Input counts (fewest, most) of the operators detection and the rewrite read, from the ONNX and
/// ONNX Runtime contrib operator specifications.
const ARITY: &[(&str, usize, usize)] = &[
    ("Add", 2, 2),
    ("Sub", 2, 2),
    ("Mul", 2, 2),
    ("Div", 2, 2),
    ("MatMul", 2, 2),
    ("Gemm", 2, 3),
    ("Gather", 2, 2),
    ("Softmax", 1, 1),
    ("Transpose", 1, 1),
    ("Cast", 1, 1),
    ("LayerNormalization", 2, 3),
    ("SimplifiedLayerNormalization", 2, 2),
    ("RMSNormalization", 2, 2),
    ("SkipLayerNormalization", 3, 5),
    ("SkipSimplifiedLayerNormalization", 3, 4),
    ("MatMulNBits", 3, 6),
    ("GroupQueryAttention", 7, 14),
];

/// Offsets in external data files: tensors of at least `PAGE_ALIGNED_FROM` bytes start on a page
/// (4096 bytes), as ONNX Runtime expects for memory-mapping them; smaller ones on 64 bytes (a cache
/// line), so that a model of many small tensors is not mostly padding.
const PAGE: u64 = 4096;
const PAGE_ALIGNED_FROM: u64 = 1 << 16;
const SMALL_ALIGNMENT: u64 = 64;

/// The offset a tensor of `length` bytes starts at when written at `offset` or later.
fn aligned(offset: u64, length: u64) -> u64 {
    offset.next_multiple_of(if length >= PAGE_ALIGNED_FROM { PAGE } else { SMALL_ALIGNMENT })
}

/// In a model with external data, tensors of at least this many bytes are stored externally (the
/// threshold `onnx.save_model` uses).
const EMBEDDED_LIMIT: usize = 1024;

/// An ONNX model: the decoded protobuf and where it came from (external data is relative to it).
pub struct Model {
    pub path: PathBuf,
    pub proto: ModelProto,
}

/// Where an initializer's bytes live when `data_location = EXTERNAL`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalLocation {
    /// Relative path from the model's directory, as written in the model.
    pub location: String,
    pub offset: u64,
    pub length: Option<u64>,
}

/// What to name instead of the directory `dir`: the models in it, or in its `onnx/` folder (a Hub
/// repository), as a hint for the error message.
fn models_inside(dir: &Path) -> String {
    let onnx_files = |d: &Path| -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = fs::read_dir(d)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "onnx"))
            .collect();
        found.sort();
        found
    };
    let mut found = onnx_files(dir);
    if found.is_empty() {
        found = onnx_files(&dir.join(crate::hub::ONNX_FOLDER));
    }
    match found.as_slice() {
        [] => String::new(),
        [one] => format!(" (did you mean {}?)", one.display()),
        many => {
            let names: Vec<String> = many.iter().map(|p| p.display().to_string()).collect();
            format!(": it holds {} models; name the one to use: {}", many.len(), names.join(", "))
        }
    }
}

impl Model {
    /// Reads and checks a model file. The file is memory-mapped and decoded without copying tensor
    /// payloads; external data files are only checked for existence and size.
    pub fn load(path: impl AsRef<Path>) -> Result<Model> {
        let path = path.as_ref();
        let meta = fs::metadata(path).with_context(|| format!("cannot open model {}", path.display()))?;
        if meta.is_dir() {
            bail!("{} is a directory, not an ONNX model file{}", path.display(), models_inside(path));
        }
        ensure!(meta.len() > 0, "{} is empty, not an ONNX model", path.display());
        let file = File::open(path).with_context(|| format!("cannot open model {}", path.display()))?;
        // SAFETY: the map is read-only; a file truncated underneath us would fault, as with any
        // memory-mapped reader (tract and ONNX Runtime map models the same way).
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot map model {}", path.display()))?;
        Model::from_bytes(Bytes::from_owner(map), path)
    }

    /// Decodes and checks a model from its bytes; `path` names it in messages and locates its
    /// external data.
    pub fn from_bytes(bytes: Bytes, path: &Path) -> Result<Model> {
        let proto = ModelProto::decode(bytes).map_err(|e| {
            // The decoder names every enclosing field: for deeply nested subgraphs, kilobytes.
            let detail = e.to_string();
            let detail = match detail.char_indices().nth(240) {
                Some((cut, _)) => format!("{}…", &detail[..cut]),
                None => detail,
            };
            anyhow::anyhow!(
                "{} is not a valid ONNX model (protobuf decoding failed: {detail}); is the file truncated or of \
                 another format?",
                path.display()
            )
        })?;
        let model = Model { path: path.to_path_buf(), proto };
        model.check_header()?;
        model.check_initializers()?;
        model.check_nodes()?;
        model.check_external_data()?;
        Ok(model)
    }

    /// The directory external data locations are relative to.
    pub fn dir(&self) -> &Path {
        atomic::dir_of(&self.path)
    }

    pub fn graph(&self) -> &GraphProto {
        self.proto.graph.as_ref().expect("checked at load")
    }

    pub fn graph_mut(&mut self) -> &mut GraphProto {
        self.proto.graph.as_mut().expect("checked at load")
    }

    /// A copy without the graph's `value_info`: the same function, with none of the exporter's
    /// shape annotations of intermediate tensors. Runtimes trust those annotations, and some are
    /// wrong (see [`crate::rewrite::rewrite_as`]).
    pub fn without_value_info(&self) -> Model {
        let mut copy = Model { path: self.path.clone(), proto: self.proto.clone() };
        copy.graph_mut().value_info.clear();
        copy
    }

    /// The opset version imported for `domain` ("" is ai.onnx).
    pub fn opset(&self, domain: &str) -> Option<i64> {
        self.proto
            .opset_import
            .iter()
            .find(|o| o.domain() == domain || (domain.is_empty() && o.domain() == "ai.onnx"))
            .map(|o| o.version())
    }

    fn check_header(&self) -> Result<()> {
        let p = self.path.display();
        // Arbitrary bytes sometimes decode as a protobuf message; a real model has all three.
        ensure!(self.proto.ir_version() > 0, "{p} is not an ONNX model: it has no IR version");
        ensure!(self.proto.graph.is_some(), "{p} is not an ONNX model: it has no graph");
        ensure!(
            !self.proto.opset_import.is_empty(),
            "{p} has no opset imports; the file is probably truncated"
        );
        ensure!(!self.graph().node.is_empty(), "{p} has a graph without nodes");
        Ok(())
    }

    /// Checks what every runtime would refuse in the nodes this tool reads and rewrites: the
    /// number of inputs of the operators in [`ARITY`], and graph outputs that nothing defines.
    fn check_nodes(&self) -> Result<()> {
        let graph = self.graph();
        for node in &graph.node {
            let Some(&(_, min, max)) = ARITY.iter().find(|(op, ..)| *op == node.op_type()) else { continue };
            let given = node.input.len();
            ensure!(
                (min..=max).contains(&given),
                "{}: node {:?} ({}) has {given} inputs; {} takes {min} to {max}",
                self.path.display(),
                node.name(),
                node.op_type(),
                node.op_type()
            );
        }
        let mut defined: std::collections::HashSet<&str> = graph.input.iter().map(|v| v.name()).collect();
        defined.extend(graph.initializer.iter().map(|t| t.name()));
        defined.extend(graph.node.iter().flat_map(|n| n.output.iter().map(String::as_str)));
        for v in &graph.output {
            ensure!(
                defined.contains(v.name()),
                "{}: graph output {:?} is not produced by any node, input or initializer",
                self.path.display(),
                v.name()
            );
        }
        Ok(())
    }

    /// Checks that initializer names are unique and that every initializer stored in the model
    /// holds exactly the elements its dims say (a short one would be read past its end).
    fn check_initializers(&self) -> Result<()> {
        let mut names = std::collections::HashSet::new();
        for t in &self.graph().initializer {
            ensure!(
                names.insert(t.name()),
                "{}: initializer {:?} is defined twice",
                self.path.display(),
                t.name()
            );
            let count = element_count(t).with_context(|| self.path.display().to_string())?;
            if t.data_location() == tensor_proto::DataLocation::External {
                continue;
            }
            if let Some(raw) = &t.raw_data {
                if let Some(expected) = expected_byte_len(t) {
                    ensure!(
                        raw.len() as u64 == expected,
                        "{}: initializer {:?} holds {} bytes, but its dims {:?} and type need {expected}",
                        self.path.display(),
                        t.name(),
                        raw.len(),
                        t.dims
                    );
                }
            } else if let Some(stored) = stored_elements(t) {
                ensure!(
                    stored == count,
                    "{}: initializer {:?} holds {stored} values, but its dims {:?} say {count}",
                    self.path.display(),
                    t.name(),
                    t.dims
                );
            }
        }
        Ok(())
    }

    /// Checks that every external-data reference is safe and lies inside an existing file. Reads
    /// file sizes only, never the data.
    fn check_external_data(&self) -> Result<()> {
        let mut sizes: HashMap<String, u64> = HashMap::new();
        let model_file = fs::canonicalize(&self.path).ok();
        let dir = fs::canonicalize(self.dir()).ok();
        for tensor in external_tensors(self.graph()) {
            let loc = external_location(tensor)?.expect("external tensors only");
            let file = self.dir().join(&loc.location);
            let size = match sizes.get(&loc.location) {
                Some(&size) => size,
                None => {
                    // After symlinks, the data must still be a file of the model's directory, and
                    // not the model itself.
                    if let (Ok(real), Some(dir)) = (fs::canonicalize(&file), &dir) {
                        ensure!(
                            real.starts_with(dir) && Some(&real) != model_file.as_ref(),
                            "{}: initializer {:?} stores its data in {}, which leads to {}: not a data file in the \
                             model's directory",
                            self.path.display(),
                            tensor.name(),
                            file.display(),
                            real.display()
                        );
                    }
                    let meta = fs::metadata(&file).map_err(|e| {
                        anyhow::anyhow!(
                            "{}: initializer {:?} stores its data in {}, which cannot be read: {e}",
                            self.path.display(),
                            tensor.name(),
                            file.display()
                        )
                    })?;
                    ensure!(meta.is_file(), "external data {} is not a regular file", file.display());
                    sizes.insert(loc.location.clone(), meta.len());
                    meta.len()
                }
            };
            let length = loc.length.unwrap_or_else(|| expected_byte_len(tensor).unwrap_or(0));
            let end = loc.offset.saturating_add(length);
            if let Some(expected) = expected_byte_len(tensor) {
                ensure!(
                    length == expected,
                    "{}: initializer {:?} stores {length} bytes externally; its dims and type need {expected}",
                    self.path.display(),
                    tensor.name()
                );
            }
            ensure!(
                end <= size,
                "{}: initializer {:?} needs bytes {}..{} of {}, which has only {size} bytes (truncated data file?)",
                self.path.display(),
                tensor.name(),
                loc.offset,
                end,
                file.display()
            );
        }
        Ok(())
    }

    /// The names of the external data files this model refers to, relative to its directory.
    pub fn external_files(&self) -> Vec<String> {
        let mut files: Vec<String> = external_tensors(self.graph())
            .filter_map(|t| external_location(t).ok().flatten().map(|l| l.location))
            .collect();
        files.sort();
        files.dedup();
        files
    }

    /// The raw little-endian bytes of an initializer, from the model or its external data file.
    pub fn tensor_bytes(&self, tensor: &TensorProto) -> Result<Vec<u8>> {
        if let Some(loc) = external_location(tensor)? {
            let file = self.dir().join(&loc.location);
            let length = match loc.length {
                Some(length) => length,
                None => expected_byte_len(tensor)
                    .with_context(|| format!("external tensor {:?} has no length", tensor.name()))?,
            };
            let mut f = File::open(&file).with_context(|| format!("cannot open {}", file.display()))?;
            f.seek(SeekFrom::Start(loc.offset))?;
            let mut buf = vec![0u8; length as usize];
            f.read_exact(&mut buf)
                .with_context(|| format!("reading tensor {:?} from {}", tensor.name(), file.display()))?;
            return Ok(buf);
        }
        if let Some(raw) = &tensor.raw_data {
            return Ok(raw.to_vec());
        }
        typed_field_bytes(tensor)
    }

    /// An initializer as a dense tensor.
    pub fn tensor(&self, tensor: &TensorProto) -> Result<Tensor> {
        let dtype = DType::from_onnx(tensor.data_type());
        let shape = tensor_shape(tensor)?;
        let bytes = self.tensor_bytes(tensor)?;
        Tensor::from_le_bytes(dtype, &shape, &bytes)
            .with_context(|| format!("initializer {:?}", tensor.name()))
    }

    /// Writes the model to `out` atomically (see [`Model::stage`]).
    pub fn save(&self, out: &Path) -> Result<()> {
        let mut set = atomic::OutputSet::new();
        self.stage(out, &mut set)?;
        set.commit()
    }

    /// Stages the model as `out` in `set`: initializers stored externally in the input are copied,
    /// streaming, into one data file beside the output (named like the input's: `<out>_data` for
    /// the Optimum style, `<out>.data` otherwise), large tensors page-aligned (see [`aligned`]),
    /// staged before the model, so that a model is never visible without the weights it points
    /// to. Never writes over the input.
    pub fn stage(&self, out: &Path, set: &mut atomic::OutputSet) -> Result<()> {
        let out_dir = atomic::dir_of(out);
        let out_name = out
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("output path {} has no file name", out.display()))?;
        let mut inputs = vec![self.path.clone()];
        inputs.extend(self.external_files().iter().map(|f| self.dir().join(f)));
        let mut proto = self.proto.clone();
        let data_name = self.external_data_name(out_name);
        let mut outputs = vec![out.to_path_buf()];
        if let Some(name) = &data_name {
            outputs.push(out_dir.join(name));
        }
        for o in &outputs {
            for i in &inputs {
                ensure!(!same_file(o, i), "refusing to write {}: it is an input of the model", o.display());
            }
        }
        if let Some(name) = &data_name {
            let data_path = out_dir.join(name);
            let file = set.stage(&data_path)?;
            let graph = proto.graph.as_mut().expect("checked at load");
            self.copy_external_data(graph, name, file)
                .with_context(|| format!("writing {}", data_path.display()))?;
        }
        let bytes = proto.encode_to_vec();
        ensure!(
            bytes.len() < (2usize << 30),
            "the model's protobuf would be {} bytes, over the 2 GiB limit; store weights as external data",
            bytes.len()
        );
        set.stage_bytes(out, &bytes)
    }

    /// Every file this model is read from: the model and its external data files.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.path.clone()];
        files.extend(self.external_files().iter().map(|f| self.dir().join(f)));
        files
    }

    /// The external data file a copy saved at `out` writes beside it, if the model has external data.
    pub fn data_file_for(&self, out: &Path) -> Option<PathBuf> {
        let name = self.external_data_name(out.file_name()?.to_str()?)?;
        Some(crate::atomic::dir_of(out).join(name))
    }

    /// The data-file name for a copy saved as `out_name`, following the input's convention; `None`
    /// when the model has no external data.
    fn external_data_name(&self, out_name: &str) -> Option<String> {
        let files = self.external_files();
        let first = files.first()?;
        let in_name = self.path.file_name().and_then(|n| n.to_str()).unwrap_or("model.onnx");
        Some(if *first == format!("{in_name}_data") {
            format!("{out_name}_data")
        } else {
            format!("{out_name}.data")
        })
    }

    /// Streams every external initializer of `graph` (and its subgraphs) into `out`, rewriting the
    /// references to point at `location`.
    fn copy_external_data(&self, graph: &mut GraphProto, location: &str, out: &mut File) -> Result<()> {
        let mut writer = BufWriter::with_capacity(1 << 20, out);
        let mut offset = 0u64;
        let mut open: HashMap<String, File> = HashMap::new();
        for tensor in external_tensors_mut(graph) {
            atomic::check_interrupt()?;
            let loc = external_location(tensor)?.expect("external tensors only");
            let length = match loc.length {
                Some(length) => length,
                None => expected_byte_len(tensor)
                    .with_context(|| format!("external tensor {:?} has no length", tensor.name()))?,
            };
            let pad = aligned(offset, length) - offset;
            io::copy(&mut io::repeat(0).take(pad), &mut writer)?;
            offset += pad;
            let src = match open.entry(loc.location.clone()) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let path = self.dir().join(&loc.location);
                    e.insert(File::open(&path).with_context(|| format!("cannot open {}", path.display()))?)
                }
            };
            src.seek(SeekFrom::Start(loc.offset))?;
            let copied = io::copy(&mut src.take(length), &mut writer)?;
            ensure!(copied == length, "external data of {:?} ends early", tensor.name());
            set_external_location(tensor, location, offset, length);
            offset += length;
        }
        // Large tensors stored in the model (e.g. added by a rewrite) join the data file too, so
        // that the protobuf stays far below its 2 GiB limit.
        for tensor in graph.initializer.iter_mut() {
            let Some(raw) = tensor.raw_data.take_if(|r| r.len() >= EMBEDDED_LIMIT) else { continue };
            let pad = aligned(offset, raw.len() as u64) - offset;
            io::copy(&mut io::repeat(0).take(pad), &mut writer)?;
            offset += pad;
            writer.write_all(&raw)?;
            tensor.data_location = Some(tensor_proto::DataLocation::External as i32);
            set_external_location(tensor, location, offset, raw.len() as u64);
            offset += raw.len() as u64;
        }
        writer.flush()?;
        Ok(())
    }
}

/// The external location of a tensor, or `None` when its data is stored in the model. Rejects
/// absolute paths and `..`, which would let a model read arbitrary files.
pub fn external_location(tensor: &TensorProto) -> Result<Option<ExternalLocation>> {
    if tensor.data_location() != tensor_proto::DataLocation::External {
        return Ok(None);
    }
    let mut location = None;
    let mut offset = 0;
    let mut length = None;
    for entry in &tensor.external_data {
        let parse = |v: &str| {
            v.parse::<u64>().with_context(|| {
                format!("tensor {:?}: bad external data {}={v:?}", tensor.name(), entry.key())
            })
        };
        match entry.key() {
            "location" => location = Some(entry.value().to_string()),
            "offset" => offset = parse(entry.value())?,
            "length" => length = Some(parse(entry.value())?),
            _ => {}
        }
    }
    let location =
        location.with_context(|| format!("tensor {:?} is external but has no location", tensor.name()))?;
    let path = Path::new(&location);
    ensure!(
        path.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)),
        "tensor {:?}: external data location {location:?} must be a relative path inside the model's directory",
        tensor.name()
    );
    Ok(Some(ExternalLocation { location, offset, length }))
}

fn set_external_location(tensor: &mut TensorProto, location: &str, offset: u64, length: u64) {
    let entry = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
    tensor.external_data = vec![
        entry("location", location.to_string()),
        entry("offset", offset.to_string()),
        entry("length", length.to_string()),
    ];
}

/// The dims of a tensor as sizes.
pub fn tensor_shape(tensor: &TensorProto) -> Result<Vec<usize>> {
    tensor
        .dims
        .iter()
        .map(|&d| usize::try_from(d).with_context(|| format!("tensor {:?} has dimension {d}", tensor.name())))
        .collect()
}

fn expected_byte_len(tensor: &TensorProto) -> Option<u64> {
    let size = DType::from_onnx(tensor.data_type()).size()? as u64;
    element_count(tensor).ok()?.checked_mul(size)
}

/// The number of elements a tensor's dims say it holds; an error for a negative dimension or a
/// product that overflows.
fn element_count(tensor: &TensorProto) -> Result<u64> {
    tensor.dims.iter().try_fold(1u64, |n, &d| {
        let d =
            u64::try_from(d).ok().with_context(|| format!("tensor {:?} has dimension {d}", tensor.name()))?;
        n.checked_mul(d).with_context(|| {
            format!("tensor {:?} has dims {:?}: too many elements", tensor.name(), tensor.dims)
        })
    })
}

/// How many values a tensor stored in the model's typed fields holds (not `raw_data`). `None` for
/// element types without a typed field this tool reads.
fn stored_elements(tensor: &TensorProto) -> Option<u64> {
    let dtype = DType::from_onnx(tensor.data_type());
    Some(match dtype {
        DType::F32 => tensor.float_data.len(),
        DType::F64 => tensor.double_data.len(),
        DType::I64 => tensor.int64_data.len(),
        DType::I32 | DType::F16 | DType::BF16 | DType::I8 | DType::U8 | DType::Bool => {
            tensor.int32_data.len()
        }
        DType::Other(_) => return None,
    } as u64)
}

/// All initializers with external data in a graph and its subgraphs, in a fixed order.
fn external_tensors(graph: &GraphProto) -> impl Iterator<Item = &TensorProto> {
    let mut all = Vec::new();
    collect_tensors(graph, &mut all);
    all.into_iter().filter(|t| t.data_location() == tensor_proto::DataLocation::External)
}

fn collect_tensors<'g>(graph: &'g GraphProto, out: &mut Vec<&'g TensorProto>) {
    out.extend(graph.initializer.iter());
    for node in &graph.node {
        for attr in &node.attribute {
            out.extend(attr.t.iter());
            for g in attr.g.iter().chain(attr.graphs.iter()) {
                collect_tensors(g, out);
            }
        }
    }
}

fn external_tensors_mut(graph: &mut GraphProto) -> Vec<&mut TensorProto> {
    let mut all = Vec::new();
    collect_tensors_mut(graph, &mut all);
    all.retain(|t| t.data_location() == tensor_proto::DataLocation::External);
    all
}

fn collect_tensors_mut<'g>(graph: &'g mut GraphProto, out: &mut Vec<&'g mut TensorProto>) {
    out.extend(graph.initializer.iter_mut());
    for node in &mut graph.node {
        for attr in &mut node.attribute {
            out.extend(attr.t.iter_mut());
            for g in attr.g.iter_mut().chain(attr.graphs.iter_mut()) {
                collect_tensors_mut(g, out);
            }
        }
    }
}

/// Payload bytes of a tensor stored in the typed repeated fields instead of `raw_data`.
fn typed_field_bytes(tensor: &TensorProto) -> Result<Vec<u8>> {
    let dtype = DType::from_onnx(tensor.data_type());
    let mut out = Vec::new();
    match dtype {
        DType::F32 => tensor.float_data.iter().for_each(|v| out.extend(v.to_le_bytes())),
        DType::F64 => tensor.double_data.iter().for_each(|v| out.extend(v.to_le_bytes())),
        DType::I64 => tensor.int64_data.iter().for_each(|v| out.extend(v.to_le_bytes())),
        DType::I32 => tensor.int32_data.iter().for_each(|v| out.extend(v.to_le_bytes())),
        // 16-bit floats are stored as their bit patterns in int32_data, bytes as one per int32.
        DType::F16 | DType::BF16 => {
            tensor.int32_data.iter().for_each(|&v| out.extend((v as u16).to_le_bytes()))
        }
        DType::I8 | DType::U8 | DType::Bool => tensor.int32_data.iter().for_each(|&v| out.push(v as u8)),
        DType::Other(_) => {
            bail!("tensor {:?} has element type {dtype}, which is not supported", tensor.name())
        }
    }
    Ok(out)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
