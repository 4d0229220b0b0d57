//! The statistics file: safetensors with tensors `layers.N.{count,mean_x,mean_y,sxx,syx,syy,cos_sum}`
//! (f64; `sxx`, `syy` as packed upper triangles from version 2) and the model's fingerprint, layers
//! and data in the metadata. This module is the format's one writer and reader.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use faer::{Mat, MatRef};
use safetensors::tensor::TensorInfo;
use safetensors::{Dtype, SafeTensors, View};

use super::{DataSummary, LayerTensors, Moments, MomentsSource, Stats, for_each_tiled, transposed};
use crate::unit::Unit;

/// The file format's name and version, stored in the metadata.
const FORMAT: &str = "nbl-onnx-stats";
/// Version 2 stores the symmetric `sxx` and `syy` as packed upper triangles (`d(d+1)/2` values,
/// row by row): two thirds of version 1's size. Version 1 files (full matrices) still load.
const VERSION: &str = "2";
const VERSIONS_READ: [&str; 2] = ["1", "2"];

impl Stats {
    /// Writes the statistics as safetensors, atomically (temporary file, then rename). Tensors
    /// `layers.N.{count,mean_x,mean_y,sxx,syx,syy,cos_sum}` in f64, matrices row-major.
    pub fn save(&self, path: &Path) -> Result<()> {
        let heldout = self.layers.iter().zip(self.heldout.iter().flatten()).map(|(l, m)| (l, m, "heldout."));
        let all = self.layers.iter().zip(&self.moments).map(|(l, m)| (l, m, "")).chain(heldout);
        let mut tensors: Vec<(String, F64Tensor<'_>)> = Vec::new();
        for (info, m, kind) in all {
            let prefix = format!("{}.{kind}", info.unit().key());
            tensors.push((format!("{prefix}count"), F64Tensor::scalar(m.count as f64)));
            tensors.push((format!("{prefix}mean_x"), F64Tensor::vector(&m.mean_x)));
            tensors.push((format!("{prefix}mean_y"), F64Tensor::vector(&m.mean_y)));
            tensors.push((format!("{prefix}sxx"), F64Tensor::packed(m.sxx.as_ref())));
            tensors.push((format!("{prefix}syx"), F64Tensor::matrix(m.syx.as_ref())));
            tensors.push((format!("{prefix}syy"), F64Tensor::packed(m.syy.as_ref())));
            tensors.push((format!("{prefix}cos_sum"), F64Tensor::scalar(m.cos_sum)));
        }
        let summary = FileSummary {
            fingerprint: &self.fingerprint,
            hidden_size: self.hidden_size,
            tokens: self.tokens(),
        };
        write(path, &summary, &self.layers, &self.data, tensors)
    }

    /// Reads a statistics file whole, checking its format and every tensor's shape.
    pub fn load(path: &Path) -> Result<Stats> {
        StatsFile::open(path)?.read_all()
    }

    /// Reads statistics from the bytes of a file (`path` names it in messages), checking every
    /// tensor: see [`Stats::load`].
    pub fn from_bytes(map: &[u8], path: &Path) -> Result<Stats> {
        Header::parse(map, path)?.read_all(&map)
    }
}

/// What a statistics file says about itself, read and checked without its tensors.
struct Header {
    path: std::path::PathBuf,
    version: String,
    fingerprint: String,
    hidden_size: usize,
    layers: Vec<LayerTensors>,
    data: Vec<DataSummary>,
    has_heldout: bool,
    /// Each tensor's element type, shape and bytes in the file (from its start).
    tensors: HashMap<String, TensorInfo>,
}

/// Where a statistics file's bytes are read from: the file in memory, or the file itself read
/// where needed (what is held then stays one tensor's decoded values, not the file's pages).
trait ReadAt {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl ReadAt for &[u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).ok().filter(|&s| s.saturating_add(buf.len()) <= self.len());
        let start = start.ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(&self[start..start + buf.len()]);
        Ok(())
    }
}

impl ReadAt for std::fs::File {
    #[cfg(unix)]
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
    #[cfg(windows)]
    fn read_at(&self, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
        while !buf.is_empty() {
            match std::os::windows::fs::FileExt::seek_read(self, buf, offset)? {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
            }
        }
        Ok(())
    }
}

/// Values are decoded this many bytes at a time.
const READ_CHUNK: usize = 1 << 20;

impl Header {
    fn parse(map: &[u8], path: &Path) -> Result<Header> {
        let not_stats = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!("{} is not an nbl-onnx statistics file: {e}", path.display())
        };
        let (header_len, header) = SafeTensors::read_metadata(map).map_err(|e| not_stats(&e))?;
        let data_start = (8 + header_len) as u64;
        let tensors: HashMap<String, TensorInfo> = header
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let (start, end) = info.data_offsets;
                let info = TensorInfo {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    data_offsets: (start + data_start as usize, end + data_start as usize),
                };
                (name, info)
            })
            .collect();
        let meta = header.metadata().clone().unwrap_or_default();
        let field =
            |k: &str| meta.get(k).cloned().ok_or_else(|| not_stats(&format!("no {k:?} in its metadata")));
        if field("format")? != FORMAT {
            bail!(not_stats(&"wrong format name"));
        }
        let version = field("version")?;
        ensure!(
            VERSIONS_READ.contains(&version.as_str()),
            "{}: statistics format version {version} is not supported",
            path.display()
        );
        let hidden_size: usize = field("hidden_size")?.parse().map_err(|e| not_stats(&e))?;
        // The matrices are d×d f64 and must fit in the file: a larger d is a damaged header.
        let file_len = map.len() as u128;
        ensure!(
            hidden_size > 0
                && (hidden_size as u128)
                    .checked_mul(hidden_size as u128)
                    .and_then(|n| n.checked_mul(8))
                    .is_some_and(|bytes| bytes <= file_len),
            "{}: hidden_size {hidden_size} does not fit a file of {file_len} bytes",
            path.display()
        );
        let layers: Vec<LayerTensors> = serde_json::from_str(&field("layers")?).map_err(|e| not_stats(&e))?;
        ensure!(!layers.is_empty(), "{}: the statistics hold no layers", path.display());
        let mut units: Vec<Unit> = layers.iter().map(LayerTensors::unit).collect();
        units.sort_unstable();
        units.dedup();
        ensure!(units.len() == layers.len(), "{}: a layer is listed twice", path.display());
        let data: Vec<DataSummary> = serde_json::from_str(&field("data")?).map_err(|e| not_stats(&e))?;
        // Held-out moments are there for every layer or for none.
        let has_heldout = tensors.contains_key(&format!("{}.heldout.count", layers[0].unit().key()));
        Ok(Header {
            path: path.to_path_buf(),
            version,
            fingerprint: field("model_fingerprint")?,
            hidden_size,
            layers,
            data,
            has_heldout,
            tensors,
        })
    }

    /// The `key` tensor's values, checked (f64, of `shape`, every value finite) and given to
    /// `sink` in order, a chunk at a time.
    fn read(
        &self,
        bytes: &dyn ReadAt,
        key: &str,
        shape: &[usize],
        mut sink: impl FnMut(usize, f64),
    ) -> Result<()> {
        let path = self.path.display();
        let info = self
            .tensors
            .get(key)
            .with_context(|| format!("{path} is not an nbl-onnx statistics file: tensor {key} is missing"))?;
        ensure!(info.dtype == Dtype::F64, "{path}: tensor {key} is not f64");
        ensure!(info.shape == shape, "{path}: tensor {key} has shape {:?}, expected {shape:?}", info.shape);
        // The safetensors header was validated: offsets match the shape and lie in the file.
        let (start, end) = info.data_offsets;
        let mut buf = vec![0u8; (end - start).min(READ_CHUNK)];
        let mut at = 0;
        while start + 8 * at < end {
            let len = buf.len().min(end - start - 8 * at);
            let chunk = &mut buf[..len];
            bytes
                .read_at(chunk, (start + 8 * at) as u64)
                .with_context(|| format!("reading {key} from {path}"))?;
            for c in chunk.chunks_exact(8) {
                let v = f64::from_le_bytes(c.try_into().expect("8 bytes"));
                if !v.is_finite() {
                    bail!("{path}: tensor {key} holds {v}");
                }
                sink(at, v);
                at += 1;
            }
        }
        Ok(())
    }

    /// Every layer's moments (and held-out moments, where the file has them), in memory.
    fn read_all(&self, bytes: &dyn ReadAt) -> Result<Stats> {
        let read = |heldout: bool| {
            (0..self.layers.len()).map(|i| self.moments(bytes, i, heldout)).collect::<Result<Vec<_>>>()
        };
        Ok(Stats {
            fingerprint: self.fingerprint.clone(),
            hidden_size: self.hidden_size,
            layers: self.layers.clone(),
            moments: read(false)?,
            heldout: if self.has_heldout { Some(read(true)?) } else { None },
            data: self.data.clone(),
        })
    }

    /// The token count of the `index`-th layer (the same for every layer).
    fn count(&self, bytes: &dyn ReadAt, index: usize, heldout: bool) -> Result<u64> {
        let info = &self.layers[index];
        let key = format!("{}.{}count", info.unit().key(), if heldout { "heldout." } else { "" });
        let mut count = 0.0;
        self.read(bytes, &key, &[1], |_, v| count = v)?;
        ensure!(
            count >= 1.0 && count.fract() == 0.0 && count <= (1u64 << 53) as f64,
            "{}: {} has a token count of {count}, not a positive integer",
            self.path.display(),
            info.unit()
        );
        Ok(count as u64)
    }

    /// The moments of the `index`-th layer (or its held-out moments), every tensor checked: f64,
    /// of the shape the format gives it, every value finite. Values go straight into the
    /// matrices: what is held is the moments and one chunk of bytes.
    fn moments(&self, bytes: &dyn ReadAt, index: usize, heldout: bool) -> Result<Moments> {
        let info = &self.layers[index];
        let prefix = format!("{}.{}", info.unit().key(), if heldout { "heldout." } else { "" });
        let d = self.hidden_size;
        let vector = |name: &str| -> Result<Vec<f64>> {
            let mut v = vec![0.0; d];
            self.read(bytes, &format!("{prefix}{name}"), &[d], |i, x| v[i] = x)?;
            Ok(v)
        };
        // Row-major in the file: read into the transpose's columns, then transposed in tiles.
        let matrix = |name: &str| -> Result<Mat<f64>> {
            let mut t = Mat::<f64>::zeros(d, d);
            self.read(bytes, &format!("{prefix}{name}"), &[d, d], |i, x| t[(i % d, i / d)] = x)?;
            Ok(transposed(t.as_ref()))
        };
        // Version 1: full matrices; version 2: upper triangles, row by row, read into the lower
        // triangle's columns and mirrored.
        let symmetric = |name: &str| -> Result<Mat<f64>> {
            if self.version == "1" {
                return matrix(name);
            }
            let mut m = Mat::<f64>::zeros(d, d);
            let (mut row, mut col) = (0, 0);
            self.read(bytes, &format!("{prefix}{name}"), &[d * (d + 1) / 2], |_, x| {
                m[(col, row)] = x;
                col += 1;
                if col == d {
                    row += 1;
                    col = row;
                }
            })?;
            for_each_tiled(d, d, |i, j| {
                if i < j {
                    m[(i, j)] = m[(j, i)];
                }
            });
            Ok(m)
        };
        let mut cos_sum = 0.0;
        self.read(bytes, &format!("{prefix}cos_sum"), &[1], |_, v| cos_sum = v)?;
        Ok(Moments {
            count: self.count(bytes, index, heldout)?,
            mean_x: vector("mean_x")?,
            mean_y: vector("mean_y")?,
            sxx: symmetric("sxx")?,
            syx: matrix("syx")?,
            syy: symmetric("syy")?,
            cos_sum,
        })
    }
}

/// A statistics file read layer by layer: its header at once, each layer's moments read from the
/// file when asked for, so that what is held does not grow with the number of layers (nor with
/// the pages of a memory map).
pub struct StatsFile {
    file: std::fs::File,
    header: Header,
    tokens: u64,
}

impl StatsFile {
    pub fn open(path: &Path) -> Result<StatsFile> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open statistics {}", path.display()))?;
        // The header is parsed from a map of the file, which touches only its first pages.
        // SAFETY: read-only map of a file we do not modify, dropped before this returns.
        let map =
            unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        let header = Header::parse(&map, path)?;
        drop(map);
        let tokens = header.count(&file, 0, false)?;
        Ok(StatsFile { file, header, tokens })
    }

    /// Every layer's moments, in memory.
    pub fn read_all(&self) -> Result<Stats> {
        self.header.read_all(&self.file)
    }
}

impl MomentsSource for StatsFile {
    fn fingerprint(&self) -> &str {
        &self.header.fingerprint
    }
    fn hidden_size(&self) -> usize {
        self.header.hidden_size
    }
    fn layers(&self) -> &[LayerTensors] {
        &self.header.layers
    }
    fn data(&self) -> &[DataSummary] {
        &self.header.data
    }
    fn tokens(&self) -> u64 {
        self.tokens
    }
    fn moments(&self, index: usize) -> Result<std::borrow::Cow<'_, Moments>> {
        Ok(std::borrow::Cow::Owned(self.header.moments(&self.file, index, false)?))
    }
    fn heldout(&self, index: usize) -> Result<Option<std::borrow::Cow<'_, Moments>>> {
        if !self.header.has_heldout {
            return Ok(None);
        }
        Ok(Some(std::borrow::Cow::Owned(self.header.moments(&self.file, index, true)?)))
    }
}

/// An f64 tensor borrowed for serialisation; matrices are written row-major.
struct F64Tensor<'a> {
    shape: Vec<usize>,
    values: Values<'a>,
}

enum Values<'a> {
    Scalar(f64),
    /// Cells computed by `f(row, column)`: a whole `d×d` matrix, or with `packed` its upper
    /// triangle, row by row.
    Cells {
        d: usize,
        packed: bool,
        f: &'a (dyn Fn(usize, usize) -> f64 + Sync),
    },
    Vector(&'a [f64]),
    Matrix(MatRef<'a, f64>),
    /// The upper triangle of a symmetric matrix, row by row.
    Packed(MatRef<'a, f64>),
}

impl<'a> F64Tensor<'a> {
    fn scalar(v: f64) -> Self {
        F64Tensor { shape: vec![1], values: Values::Scalar(v) }
    }

    fn vector(v: &'a [f64]) -> Self {
        F64Tensor { shape: vec![v.len()], values: Values::Vector(v) }
    }

    fn matrix(m: MatRef<'a, f64>) -> Self {
        F64Tensor { shape: vec![m.nrows(), m.ncols()], values: Values::Matrix(m) }
    }

    fn cells(d: usize, packed: bool, f: &'a (dyn Fn(usize, usize) -> f64 + Sync)) -> Self {
        let shape = if packed { vec![d * (d + 1) / 2] } else { vec![d, d] };
        F64Tensor { shape, values: Values::Cells { d, packed, f } }
    }

    fn packed(m: MatRef<'a, f64>) -> Self {
        let d = m.nrows();
        F64Tensor { shape: vec![d * (d + 1) / 2], values: Values::Packed(m) }
    }
}

impl View for F64Tensor<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F64
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let mut out = Vec::with_capacity(self.data_len());
        match &self.values {
            Values::Scalar(v) => out.extend(v.to_le_bytes()),
            Values::Vector(v) => v.iter().for_each(|e| out.extend(e.to_le_bytes())),
            Values::Matrix(m) => {
                for i in 0..m.nrows() {
                    for j in 0..m.ncols() {
                        out.extend(m[(i, j)].to_le_bytes());
                    }
                }
            }
            Values::Cells { d, packed, f } => {
                for i in 0..*d {
                    for j in if *packed { i } else { 0 }..*d {
                        out.extend(f(i, j).to_le_bytes());
                    }
                }
            }
            Values::Packed(m) => {
                for i in 0..m.nrows() {
                    for j in i..m.ncols() {
                        out.extend(m[(i, j)].to_le_bytes());
                    }
                }
            }
        }
        out.into()
    }

    fn data_len(&self) -> usize {
        8 * self.shape.iter().product::<usize>()
    }
}

/// What the metadata says of the statistics besides their layers and data.
struct FileSummary<'a> {
    fingerprint: &'a str,
    hidden_size: usize,
    tokens: u64,
}

/// Writes `tensors` with the format's metadata, atomically (temporary file, then rename): the one
/// place the format is written. Tensors are encoded one at a time as the file is written.
fn write(
    path: &Path,
    summary: &FileSummary<'_>,
    layers: &[LayerTensors],
    data: &[DataSummary],
    tensors: Vec<(String, F64Tensor<'_>)>,
) -> Result<()> {
    let metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("version".to_string(), VERSION.to_string()),
        ("model_fingerprint".to_string(), summary.fingerprint.to_string()),
        ("hidden_size".to_string(), summary.hidden_size.to_string()),
        ("tokens".to_string(), summary.tokens.to_string()),
        ("layers".to_string(), serde_json::to_string(layers)?),
        ("data".to_string(), serde_json::to_string(data)?),
    ]);
    let tmp = crate::atomic::temp_beside(path)?;
    safetensors::serialize_to_file(tensors, Some(metadata), tmp.path())
        .with_context(|| format!("writing {}", path.display()))?;
    crate::atomic::persist(tmp, path)
}

/// Writes statistics of `layers` at hidden size `d` without calibrating, for benchmarks of what
/// the statistics cost at scale: every layer's moments are those of `n = 10⁶` tokens whose input
/// has covariance `I + 0.1·J/d` (`J` all ones: every entry nonzero, nothing sparse) and whose
/// output is `y = 0.5 x + noise` of variance 0.1. Each tensor is computed as it is written, so
/// a file of many gigabytes needs one row's memory. Returns the file's size in bytes.
pub fn write_synthetic(path: &Path, fingerprint: &str, d: usize, layers: &[LayerTensors]) -> Result<u64> {
    const N: f64 = 1e6;
    ensure!(d > 0 && !layers.is_empty(), "synthetic statistics need a hidden size and at least one layer");
    let off = 0.1 * N / d as f64;
    let eye = |i: usize, j: usize| f64::from(u8::from(i == j));
    // Σxx = n (I + 0.1 J/d), Σyx = 0.5 Σxx, Σyy = 0.25 Σxx + 0.1 n I.
    let sxx = move |i: usize, j: usize| N * eye(i, j) + off;
    let syx = move |i: usize, j: usize| 0.5 * sxx(i, j);
    let syy = move |i: usize, j: usize| 0.25 * sxx(i, j) + 0.1 * N * eye(i, j);
    let zeros = vec![0.0; d];
    let mut tensors: Vec<(String, F64Tensor<'_>)> = Vec::new();
    for layer in layers {
        let prefix = format!("{}.", layer.unit().key());
        tensors.push((format!("{prefix}count"), F64Tensor::scalar(N)));
        tensors.push((format!("{prefix}mean_x"), F64Tensor::vector(&zeros)));
        tensors.push((format!("{prefix}mean_y"), F64Tensor::vector(&zeros)));
        tensors.push((format!("{prefix}sxx"), F64Tensor::cells(d, true, &sxx)));
        tensors.push((format!("{prefix}syx"), F64Tensor::cells(d, false, &syx)));
        tensors.push((format!("{prefix}syy"), F64Tensor::cells(d, true, &syy)));
        tensors.push((format!("{prefix}cos_sum"), F64Tensor::scalar(0.9 * N)));
    }
    let data = [DataSummary {
        files: vec!["synthetic".to_string()],
        seq_len: 2048,
        sequences: N as usize / 2048,
        shard: [0, 1],
        engine: "none".to_string(),
    }];
    let summary = FileSummary { fingerprint, hidden_size: d, tokens: N as u64 };
    write(path, &summary, layers, &data, tensors)?;
    Ok(std::fs::metadata(path)?.len())
}
