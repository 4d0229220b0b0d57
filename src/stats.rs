//! Streaming moments of each attention block's input `x` and output `y`: means and centred
//! cross-products in f64, merged across batches and shards with the pairwise update of Chan et al.,
//! and their safetensors file. Activations are never stored: each batch goes straight in.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use safetensors::tensor::TensorInfo;
use safetensors::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};

/// The file format's name and version, stored in the metadata.
const FORMAT: &str = "nbl-onnx-stats";
/// Version 2 stores the symmetric `sxx` and `syy` as packed upper triangles (`d(d+1)/2` values,
/// row by row): two thirds of version 1's size. Version 1 files (full matrices) still load.
const VERSION: &str = "2";
const VERSIONS_READ: [&str; 2] = ["1", "2"];

/// Moments of one layer over `count` tokens (all `d×d` matrices in f64):
/// `mean_x = Σx/n`, `sxx = Σ(x-μx)(x-μx)ᵀ`, `syx = Σ(y-μy)(x-μx)ᵀ`, `syy = Σ(y-μy)(y-μy)ᵀ`,
/// and `cos_sum = Σ cos(x, x+y)` (the LLM-Drop criterion).
#[derive(Clone, Debug)]
pub struct Moments {
    pub count: u64,
    pub mean_x: Vec<f64>,
    pub mean_y: Vec<f64>,
    pub sxx: Mat<f64>,
    pub syx: Mat<f64>,
    pub syy: Mat<f64>,
    pub cos_sum: f64,
}

impl Moments {
    pub fn new(d: usize) -> Moments {
        Moments {
            count: 0,
            mean_x: vec![0.0; d],
            mean_y: vec![0.0; d],
            sxx: Mat::zeros(d, d),
            syx: Mat::zeros(d, d),
            syy: Mat::zeros(d, d),
            cos_sum: 0.0,
        }
    }

    pub fn dim(&self) -> usize {
        self.mean_x.len()
    }

    /// Whether every mean, cross-product and the cosine sum is finite.
    pub fn is_finite(&self) -> bool {
        let finite = |m: &Mat<f64>| (0..m.ncols()).all(|j| m.col(j).iter().all(|v| v.is_finite()));
        self.mean_x.iter().chain(&self.mean_y).all(|v| v.is_finite())
            && finite(&self.sxx)
            && finite(&self.syx)
            && finite(&self.syy)
            && self.cos_sum.is_finite()
    }

    /// Adds a batch of tokens: `x` and `y` are `n×d`, row-major. The batch is centred on its own
    /// mean (in f64) before its cross-products are formed, then merged (Chan et al.), so that large
    /// common offsets (massive activations) do not cancel catastrophically.
    pub fn add_batch(&mut self, x: &[f32], y: &[f32]) {
        let d = self.dim();
        assert!(x.len() == y.len() && x.len().is_multiple_of(d), "x and y must both be n×{d}");
        let n = x.len() / d;
        if n == 0 {
            return;
        }
        let column_mean = |v: &[f32]| {
            let mut mean = vec![0.0f64; d];
            for row in v.chunks_exact(d) {
                for (m, &e) in mean.iter_mut().zip(row) {
                    *m += f64::from(e);
                }
            }
            mean.iter_mut().for_each(|m| *m /= n as f64);
            mean
        };
        let mean_x = column_mean(x);
        let mean_y = column_mean(y);
        let xc = Mat::from_fn(n, d, |t, j| f64::from(x[t * d + j]) - mean_x[j]);
        let yc = Mat::from_fn(n, d, |t, j| f64::from(y[t * d + j]) - mean_y[j]);
        let cos_sum: f64 =
            x.chunks_exact(d).zip(y.chunks_exact(d)).map(|(xt, yt)| cosine_with_sum(xt, yt)).sum();

        add_gram(self.sxx.as_mut(), xc.as_ref());
        matmul(self.syx.as_mut(), Accum::Add, yc.transpose(), xc.as_ref(), 1.0, Par::Seq);
        add_gram(self.syy.as_mut(), yc.as_ref());
        self.absorb(n as u64, &mean_x, &mean_y, cos_sum);
    }

    /// Merges the moments of a disjoint set of tokens:
    /// `S = S_a + S_b + δ δᵀ · n_a n_b / n` with `δ = μ_b − μ_a`.
    pub fn merge(&mut self, other: &Moments) {
        assert_eq!(self.dim(), other.dim());
        if other.count == 0 {
            return;
        }
        self.sxx += &other.sxx;
        self.syx += &other.syx;
        self.syy += &other.syy;
        self.absorb(other.count, &other.mean_x, &other.mean_y, other.cos_sum);
    }

    /// Counts in `n` more tokens with means `mean_x`, `mean_y`, whose own centred cross-products
    /// were just added: corrects the cross-products for the shift of the mean
    /// (`δ δᵀ · n_a n_b / n`), then updates the means, the count and the cosine sum.
    fn absorb(&mut self, n: u64, mean_x: &[f64], mean_y: &[f64], cos_sum: f64) {
        let (na, nb) = (self.count as f64, n as f64);
        let total = na + nb;
        let delta_x: Vec<f64> = mean_x.iter().zip(&self.mean_x).map(|(b, a)| b - a).collect();
        let delta_y: Vec<f64> = mean_y.iter().zip(&self.mean_y).map(|(b, a)| b - a).collect();
        self.add_mean_correction(&delta_x, &delta_y, na * nb / total);
        for (m, dlt) in self.mean_x.iter_mut().zip(&delta_x) {
            *m += dlt * nb / total;
        }
        for (m, dlt) in self.mean_y.iter_mut().zip(&delta_y) {
            *m += dlt * nb / total;
        }
        self.count += n;
        self.cos_sum += cos_sum;
    }

    fn add_mean_correction(&mut self, delta_x: &[f64], delta_y: &[f64], weight: f64) {
        if weight == 0.0 {
            return;
        }
        let d = self.dim();
        for j in 0..d {
            let wx = delta_x[j] * weight;
            for (i, dy) in delta_y.iter().enumerate() {
                self.syx[(i, j)] += dy * wx;
            }
            // The symmetric ones get one value per pair, so that they stay exactly symmetric (the
            // file stores their upper triangles).
            for i in 0..=j {
                let (xx, yy) = (delta_x[i] * wx, delta_y[i] * delta_y[j] * weight);
                self.sxx[(i, j)] += xx;
                self.syy[(i, j)] += yy;
                if i != j {
                    self.sxx[(j, i)] += xx;
                    self.syy[(j, i)] += yy;
                }
            }
        }
    }

    /// Sample covariances `C = S / (n − 1)`: (`C_xx`, `C_yx`, `C_yy`).
    pub fn covariances(&self) -> (Mat<f64>, Mat<f64>, Mat<f64>) {
        let scale = 1.0 / (self.count.max(2) - 1) as f64;
        (scaled(self.sxx.as_ref(), scale), scaled(self.syx.as_ref(), scale), scaled(self.syy.as_ref(), scale))
    }

    /// The input's second moment `E[x xᵀ] = C_xx + μ_x μ_xᵀ` (what GPTQ weighs errors by).
    pub fn second_moment_x(&self) -> Mat<f64> {
        let scale = 1.0 / (self.count.max(2) - 1) as f64;
        let d = self.dim();
        Mat::from_fn(d, d, |i, j| self.sxx[(i, j)] * scale + self.mean_x[i] * self.mean_x[j])
    }

    /// Mean cosine similarity of a block's input and output, `cos(x, x + y)`.
    pub fn mean_cosine(&self) -> f64 {
        if self.count == 0 { f64::NAN } else { self.cos_sum / self.count as f64 }
    }
}

/// `S += AᵀA` for symmetric `S`: only the lower triangle is multiplied (half a GEMM's work, the
/// bulk of calibration's own cost), then mirrored to the upper.
fn add_gram(mut s: faer::MatMut<'_, f64>, a: MatRef<'_, f64>) {
    use faer::linalg::matmul::triangular::{BlockStructure, matmul as triangular_matmul};
    let rect = BlockStructure::Rectangular;
    triangular_matmul(
        s.as_mut(),
        BlockStructure::TriangularLower,
        Accum::Add,
        a.transpose(),
        rect,
        a,
        rect,
        1.0,
        Par::Seq,
    );
    for j in 0..s.ncols() {
        for i in 0..j {
            s[(i, j)] = s[(j, i)];
        }
    }
}

fn scaled(m: MatRef<'_, f64>, s: f64) -> Mat<f64> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] * s)
}

/// `cos(x, x + y)` in f64; 0 for a zero vector.
fn cosine_with_sum(x: &[f32], y: &[f32]) -> f64 {
    let (mut xz, mut xx, mut zz) = (0.0f64, 0.0f64, 0.0f64);
    for (&a, &b) in x.iter().zip(y) {
        let (a, z) = (f64::from(a), f64::from(a) + f64::from(b));
        xz += a * z;
        xx += a * a;
        zz += z * z;
    }
    let norms = (xx * zz).sqrt();
    if norms > 0.0 { xz / norms } else { 0.0 }
}

/// Which tensors a layer's statistics were measured on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerTensors {
    pub layer: usize,
    pub x: String,
    pub y: String,
}

/// Where the statistics come from: the data and how it was cut, for reports and for merging.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataSummary {
    pub files: Vec<String>,
    pub seq_len: usize,
    pub blocks: usize,
    /// `[index, count]` of the shard, `[0, 1]` for a whole run.
    pub shard: [usize; 2],
    pub engine: String,
}

/// All layers' moments of one model, with what identifies the model and the data.
pub struct Stats {
    pub fingerprint: String,
    pub hidden_size: usize,
    pub layers: Vec<LayerTensors>,
    pub moments: Vec<Moments>,
    /// Moments of held-out blocks, layer by layer, not used in any fit: where calibrate kept some
    /// (`--holdout-every`), the maps' error on text they were not fitted to.
    pub heldout: Option<Vec<Moments>>,
    /// One entry per shard merged in (a single run has one).
    pub data: Vec<DataSummary>,
}

impl Stats {
    pub fn tokens(&self) -> u64 {
        self.moments.first().map_or(0, |m| m.count)
    }

    /// Writes the statistics as safetensors, atomically (temporary file, then rename). Tensors
    /// `layers.N.{count,mean_x,mean_y,sxx,syx,syy,cos_sum}` in f64, matrices row-major.
    pub fn save(&self, path: &Path) -> Result<()> {
        let heldout = self.layers.iter().zip(self.heldout.iter().flatten()).map(|(l, m)| (l, m, "heldout."));
        let all = self.layers.iter().zip(&self.moments).map(|(l, m)| (l, m, "")).chain(heldout);
        let mut tensors: Vec<(String, F64Tensor<'_>)> = Vec::new();
        for (info, m, kind) in all {
            let prefix = format!("layers.{}.{kind}", info.layer);
            tensors.push((format!("{prefix}count"), F64Tensor::scalar(m.count as f64)));
            tensors.push((format!("{prefix}mean_x"), F64Tensor::vector(&m.mean_x)));
            tensors.push((format!("{prefix}mean_y"), F64Tensor::vector(&m.mean_y)));
            tensors.push((format!("{prefix}sxx"), F64Tensor::packed(m.sxx.as_ref())));
            tensors.push((format!("{prefix}syx"), F64Tensor::matrix(m.syx.as_ref())));
            tensors.push((format!("{prefix}syy"), F64Tensor::packed(m.syy.as_ref())));
            tensors.push((format!("{prefix}cos_sum"), F64Tensor::scalar(m.cos_sum)));
        }
        let metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("version".to_string(), VERSION.to_string()),
            ("model_fingerprint".to_string(), self.fingerprint.clone()),
            ("hidden_size".to_string(), self.hidden_size.to_string()),
            ("tokens".to_string(), self.tokens().to_string()),
            ("layers".to_string(), serde_json::to_string(&self.layers)?),
            ("data".to_string(), serde_json::to_string(&self.data)?),
        ]);
        let tmp = crate::atomic::temp_beside(path)?;
        safetensors::serialize_to_file(tensors, Some(metadata), tmp.path())
            .with_context(|| format!("writing {}", path.display()))?;
        crate::atomic::persist(tmp, path)
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

    /// Combines statistics of the same model into what one run gives: files of disjoint data
    /// (shards) of the same layers are merged token-wise; files of disjoint layer ranges over the
    /// same data are joined, layers in order.
    pub fn merge(mut parts: Vec<(std::path::PathBuf, Stats)>) -> Result<Stats> {
        ensure!(!parts.is_empty(), "no statistics to merge");
        let (first_path, mut merged) = parts.remove(0);
        for (path, part) in parts {
            ensure!(
                part.fingerprint == merged.fingerprint,
                "{} and {} were measured on different models (fingerprints {} and {})",
                first_path.display(),
                path.display(),
                merged.fingerprint,
                part.fingerprint
            );
            if part.layers != merged.layers {
                merged.join_layers(part, &path)?;
                continue;
            }
            for d in &part.data {
                // The same shard of the same data, or the same whole run: the same tokens twice.
                ensure!(
                    !merged
                        .data
                        .iter()
                        .any(|m| m == d || (m.shard == d.shard && d.shard[1] > 1 && m.files == d.files)),
                    "{}: shard {}/{} is already part of the merge",
                    path.display(),
                    d.shard[0],
                    d.shard[1]
                );
            }
            ensure_same_heldout(&merged, &part, &path)?;
            for (a, b) in merged.moments.iter_mut().zip(&part.moments) {
                a.merge(b);
            }
            for (a, b) in merged.heldout.iter_mut().flatten().zip(part.heldout.iter().flatten()) {
                a.merge(b);
            }
            merged.data.extend(part.data);
        }
        Ok(merged)
    }

    /// Adds the layers of `part` (from `path`), measured on the same data as these.
    fn join_layers(&mut self, part: Stats, path: &Path) -> Result<()> {
        let overlap: Vec<usize> = part
            .layers
            .iter()
            .filter(|l| self.layers.iter().any(|m| m.layer == l.layer))
            .map(|l| l.layer)
            .collect();
        ensure!(
            overlap.is_empty(),
            "{}: layers {overlap:?} are already part of the merge; files of different layers must not \
             overlap, files of the same layers must hold the same ones",
            path.display()
        );
        ensure!(
            part.data == self.data && part.tokens() == self.tokens(),
            "{}: its layers were measured on other data ({} tokens) than the rest ({} tokens): layer \
             ranges join only when calibrated on the same blocks",
            path.display(),
            part.tokens(),
            self.tokens()
        );
        ensure_same_heldout(self, &part, path)?;
        let mut heldout: Vec<(usize, Moments)> = self
            .layers
            .iter()
            .chain(&part.layers)
            .map(|l| l.layer)
            .zip(self.heldout.take().into_iter().flatten().chain(part.heldout.into_iter().flatten()))
            .collect();
        heldout.sort_by_key(|(layer, _)| *layer);
        if !heldout.is_empty() {
            self.heldout = Some(heldout.into_iter().map(|(_, m)| m).collect());
        }
        let mut layers: Vec<(LayerTensors, Moments)> = self
            .layers
            .drain(..)
            .zip(self.moments.drain(..))
            .chain(part.layers.into_iter().zip(part.moments))
            .collect();
        layers.sort_by_key(|(info, _)| info.layer);
        (self.layers, self.moments) = layers.into_iter().unzip();
        Ok(())
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
        let mut numbers: Vec<usize> = layers.iter().map(|l| l.layer).collect();
        numbers.sort_unstable();
        numbers.dedup();
        ensure!(numbers.len() == layers.len(), "{}: a layer is listed twice", path.display());
        let data: Vec<DataSummary> = serde_json::from_str(&field("data")?).map_err(|e| not_stats(&e))?;
        // Held-out moments are there for every layer or for none.
        let has_heldout = tensors.contains_key(&format!("layers.{}.heldout.count", layers[0].layer));
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
        let key = format!("layers.{}.{}count", info.layer, if heldout { "heldout." } else { "" });
        let mut count = 0.0;
        self.read(bytes, &key, &[1], |_, v| count = v)?;
        ensure!(
            count >= 1.0 && count.fract() == 0.0 && count <= (1u64 << 53) as f64,
            "{}: layer {} has a token count of {count}, not a positive integer",
            self.path.display(),
            info.layer
        );
        Ok(count as u64)
    }

    /// The moments of the `index`-th layer (or its held-out moments), every tensor checked: f64,
    /// of the shape the format gives it, every value finite. Values go straight into the
    /// matrices: what is held is the moments and one chunk of bytes.
    fn moments(&self, bytes: &dyn ReadAt, index: usize, heldout: bool) -> Result<Moments> {
        let info = &self.layers[index];
        let prefix = format!("layers.{}.{}", info.layer, if heldout { "heldout." } else { "" });
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

/// Calls `f(i, j)` for every cell of an `rows×cols` matrix, in square tiles, so that a loop that
/// reads a matrix and its transpose together touches few cache lines at a time (at d = 4096 a
/// plain loop over a transpose is five times slower).
pub(crate) fn for_each_tiled(rows: usize, cols: usize, mut f: impl FnMut(usize, usize)) {
    const TILE: usize = 32;
    for j0 in (0..cols).step_by(TILE) {
        for i0 in (0..rows).step_by(TILE) {
            for j in j0..(j0 + TILE).min(cols) {
                for i in i0..(i0 + TILE).min(rows) {
                    f(i, j);
                }
            }
        }
    }
}

/// `m` transposed, in a new column-major matrix.
pub(crate) fn transposed(m: MatRef<'_, f64>) -> Mat<f64> {
    let mut t = Mat::zeros(m.ncols(), m.nrows());
    for_each_tiled(m.nrows(), m.ncols(), |i, j| t[(j, i)] = m[(i, j)]);
    t
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

/// Per-layer moments, from memory ([`Stats`]) or read from a file as needed ([`StatsFile`]).
pub trait MomentsSource: Sync {
    fn fingerprint(&self) -> &str;
    fn hidden_size(&self) -> usize;
    fn layers(&self) -> &[LayerTensors];
    fn data(&self) -> &[DataSummary];
    fn tokens(&self) -> u64;
    /// The `index`-th layer's moments.
    fn moments(&self, index: usize) -> Result<std::borrow::Cow<'_, Moments>>;
    /// The `index`-th layer's held-out moments, where there are some.
    fn heldout(&self, index: usize) -> Result<Option<std::borrow::Cow<'_, Moments>>>;
}

impl MomentsSource for Stats {
    fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
    fn hidden_size(&self) -> usize {
        self.hidden_size
    }
    fn layers(&self) -> &[LayerTensors] {
        &self.layers
    }
    fn data(&self) -> &[DataSummary] {
        &self.data
    }
    fn tokens(&self) -> u64 {
        Stats::tokens(self)
    }
    fn moments(&self, index: usize) -> Result<std::borrow::Cow<'_, Moments>> {
        Ok(std::borrow::Cow::Borrowed(&self.moments[index]))
    }
    fn heldout(&self, index: usize) -> Result<Option<std::borrow::Cow<'_, Moments>>> {
        Ok(self.heldout.as_ref().map(|h| std::borrow::Cow::Borrowed(&h[index])))
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

/// Files merge only when both hold held-out moments or neither does.
fn ensure_same_heldout(merged: &Stats, part: &Stats, path: &Path) -> Result<()> {
    ensure!(
        merged.heldout.is_some() == part.heldout.is_some(),
        "{}: {} held-out moments and the rest {}: calibrate every part with the same --holdout-every",
        path.display(),
        if part.heldout.is_some() { "it holds" } else { "it holds no" },
        if merged.heldout.is_some() { "do" } else { "do not" }
    );
    Ok(())
}

/// An f64 tensor borrowed for serialisation; matrices are written row-major.
struct F64Tensor<'a> {
    shape: Vec<usize>,
    values: Values<'a>,
}

enum Values<'a> {
    Scalar(f64),
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
