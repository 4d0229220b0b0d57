//! Calibration: one instrumented copy of the graph exposes every layer's X and Y; one pass over the
//! packed data feeds all layers' moments, batch by batch, without keeping activations. The moments
//! are formed on the host from the returned activations, or inside the graph ([`in_graph`]).

pub mod in_graph;

use std::borrow::Cow;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::ValueEnum;
use ndarray::Array2;
use rayon::prelude::*;

use crate::data::DataSpec;
use crate::detect::{DecoderLayout, UnitOutput};
use crate::engine::{Engine, ExecutionProvider, select};
use crate::onnx::proto::tensor_proto;
use crate::onnx::{Interface, Model, Patch, Tensor, build};
use crate::stats::{DataSummary, LayerTensors, MomentPrecision, Moments, MomentsSource, Stats};
use crate::unit::{Unit, UnitKind};

/// Calibration tokens per hidden dimension below which the fitted maps overfit noticeably: on
/// SmolLM2-135M (d = 576), 2,048 tokens (3.6 per dimension) give +0.5% perplexity at k = 4 on the
/// calibration text and +15% on held-out text.
const FEW_TOKENS_PER_DIMENSION: f64 = 20.0;

/// Where each batch's moments are formed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MomentsOn {
    /// graph on a GPU provider, host on the CPU
    Auto,
    /// In the measuring graph, in f64, accumulated where the model runs; only the final d×d
    /// matrices reach the host
    Graph,
    /// On the host, in f64, from the X and Y the engine returns for every token
    Host,
}

impl MomentsOn {
    pub fn resolve(self, ep: ExecutionProvider) -> MomentsOn {
        match (self, ep) {
            (MomentsOn::Auto, ExecutionProvider::Cpu) => MomentsOn::Host,
            (MomentsOn::Auto, _) => MomentsOn::Graph,
            (chosen, _) => chosen,
        }
    }
}

/// How each batch's moments are formed: where, and in which type its products are multiplied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forming {
    pub on: MomentsOn,
    pub precision: MomentPrecision,
}

impl Forming {
    /// `on` and `precision` with their `Auto` resolved for `ep`: the graph on a GPU provider, the
    /// host on the CPU; f32 products everywhere (tensor cores on a GPU; on the CPU they measured
    /// 1.08× faster on the host and 1.13× in the graph than f64, with bounds within 1.3e-6 and the
    /// same ranking: `bench/moment-precision.json`).
    pub fn resolve(on: MomentsOn, precision: MomentPrecision, ep: ExecutionProvider) -> Forming {
        let precision = match precision {
            MomentPrecision::Auto => MomentPrecision::F32,
            chosen => chosen,
        };
        Forming { on: on.resolve(ep), precision }
    }
}

/// Which decoder layers a run calibrates: `start..end` (layer numbers, end excluded). Runs over
/// disjoint ranges split the statistics' memory; `merge-stats` joins their files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerRange {
    pub start: usize,
    pub end: usize,
}

impl std::str::FromStr for LayerRange {
    type Err = String;

    /// `A..B` with `A < B`.
    fn from_str(s: &str) -> std::result::Result<LayerRange, String> {
        let (a, b) = s.split_once("..").ok_or("expected A..B (layers A to B-1), e.g. 0..16")?;
        let start: usize = a.trim().parse().map_err(|_| format!("bad first layer {a:?}"))?;
        let end: usize = b.trim().parse().map_err(|_| format!("bad end {b:?}"))?;
        if start >= end {
            return Err(format!("layer range {start}..{end} is empty: need A < B"));
        }
        Ok(LayerRange { start, end })
    }
}

impl LayerRange {
    /// The layout of the layers in this range; fails when none of the model's layers is in it.
    pub fn of(&self, layout: &DecoderLayout) -> Result<DecoderLayout> {
        let mut chosen = layout.clone();
        chosen.layers.retain(|l| (self.start..self.end).contains(&l.layer));
        let numbers: Vec<usize> = layout.layers.iter().map(|l| l.layer).collect();
        ensure!(
            !chosen.layers.is_empty(),
            "the layer range {}..{} holds none of the model's layers {numbers:?}",
            self.start,
            self.end
        );
        Ok(chosen)
    }
}

/// Which slice of the data this run calibrates: sequences `[index·S/count, (index+1)·S/count)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;

    /// `I/N` with `0 ≤ I < N`.
    fn from_str(s: &str) -> std::result::Result<Shard, String> {
        let (i, n) = s.split_once('/').ok_or("expected I/N, e.g. 0/4")?;
        let index: usize = i.trim().parse().map_err(|_| format!("bad shard index {i:?}"))?;
        let count: usize = n.trim().parse().map_err(|_| format!("bad shard count {n:?}"))?;
        if count == 0 || index >= count {
            return Err(format!("shard {index}/{count}: need 0 ≤ I < N"));
        }
        Ok(Shard { index, count })
    }
}

impl Shard {
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// The items of `all` this shard owns (contiguous, sizes differing by at most one).
    pub fn slice<'a, T>(&self, all: &'a [T]) -> &'a [T] {
        let n = all.len();
        &all[self.index * n / self.count..(self.index + 1) * n / self.count]
    }
}

/// What one calibration run covers and how it runs.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    /// Sequences per engine run.
    pub batch: usize,
    pub shard: Shard,
    /// `None`: every layer.
    pub layers: Option<LayerRange>,
    /// How the moments are formed (resolved: no `Auto`).
    pub forming: Forming,
    /// Every N-th sequence is held out of the fit, its moments kept apart (0: none).
    pub holdout_every: usize,
}

/// Calibrates `model` on the data, layers and shard `run` says into statistics: every attention
/// site's moments, and those of `units` besides (the ones in the layer range).
pub fn run(
    model: &Model,
    layout: &DecoderLayout,
    units: &[Unit],
    engine: &dyn Engine,
    data: &DataSpec,
    run: Run,
) -> Result<Stats> {
    let Run { batch, shard, layers, forming, holdout_every } = run;
    let measured = match layers {
        Some(range) => Cow::Owned(range.of(layout)?),
        None => Cow::Borrowed(layout),
    };
    let in_range = |u: &&Unit| layers.is_none_or(|r| r.start <= u.layer && u.last() < r.end);
    let units: Vec<Unit> = units.iter().filter(in_range).copied().collect();
    let (copy, taps) = measurement(model, &measured, &units)?;
    let measuring = copy.as_ref().unwrap_or(model);
    ensure!(data.samples != Some(0), "at least 1 sequence must be calibrated");
    let packed = data.pack(model.dir(), layout.vocab_size)?;
    if let Some(samples) = data.samples
        && packed.sequences.len() < samples
    {
        eprintln!(
            "note: the data gives {} sequences of {} tokens, fewer than the {samples} asked for",
            packed.sequences.len(),
            data.seq_len,
        );
    }
    let slice = shard.slice(&packed.sequences);
    ensure!(
        !slice.is_empty(),
        "shard {}/{} has no sequences: the data gives only {}",
        shard.index,
        shard.count,
        packed.sequences.len()
    );
    // Every `holdout_every`-th block (the last of each group) is held out of the fit.
    let held = |i: usize| holdout_every > 0 && i % holdout_every == holdout_every - 1;
    let fit: Vec<Vec<i64>> =
        slice.iter().enumerate().filter(|&(i, _)| !held(i)).map(|(_, b)| b.clone()).collect();
    let heldout: Vec<Vec<i64>> =
        slice.iter().enumerate().filter(|&(i, _)| held(i)).map(|(_, b)| b.clone()).collect();
    ensure!(
        holdout_every == 0 || (!heldout.is_empty() && !fit.is_empty()),
        "holding out every {holdout_every}-th sequence holds out none of the {}, or all: calibrate on at \
         least {holdout_every} sequences",
        slice.len()
    );
    let tokens = fit.len() * data.seq_len;
    let per_dimension = tokens as f64 / layout.hidden_size as f64;
    if per_dimension < FEW_TOKENS_PER_DIMENSION {
        eprintln!(
            "note: {tokens} tokens for hidden size {d}: {per_dimension:.1} per dimension. Each map has d² = {} \
             weights, fitted here on fewer than {FEW_TOKENS_PER_DIMENSION} tokens per dimension: it will fit \
             these tokens better than new text, and the bounds will look better than held-out quality is. \
             Calibrate on more text; holding every 8th sequence out measures the gap.",
            layout.hidden_size * layout.hidden_size,
            d = layout.hidden_size,
        );
    }
    let d = layout.hidden_size;
    let moments = calibrate(measuring, d, &taps, engine, &fit, batch, forming)?;
    let heldout = if heldout.is_empty() {
        None
    } else {
        eprintln!("held-out sequences ({} of {}), not fitted to:", heldout.len(), slice.len());
        Some(calibrate(measuring, d, &taps, engine, &heldout, batch, forming)?)
    };
    Ok(Stats {
        // The whole model's, so that files of other layers of it merge with this one.
        fingerprint: fingerprint(model, layout),
        hidden_size: layout.hidden_size,
        layers: taps,
        moments,
        heldout,
        data: vec![DataSummary {
            files: data.describe(),
            seq_len: data.seq_len,
            sequences: slice.len(),
            shard: [shard.index, shard.count],
            engine: engine.describe(),
        }],
    })
}

/// `model` ready to measure `units` besides every attention site of `layout`, and what each
/// entry of the statistics is measured on: attention sites first, in layer order, then `units`
/// (attention units among them are the sites themselves). A layer's or a run's output is the
/// stream after it minus the stream before: one `Sub` node each, added to a copy of the model.
/// Returns the copy only where one was needed.
pub fn measurement(
    model: &Model,
    layout: &DecoderLayout,
    units: &[Unit],
) -> Result<(Option<Model>, Vec<LayerTensors>)> {
    let mut taps = layer_tensors(layout);
    let mut patch: Option<Patch> = None;
    for &unit in units.iter().filter(|u| u.kind != UnitKind::Attention) {
        let site = layout.unit_site(unit)?;
        let y = match &site.output {
            UnitOutput::Branch(y) => y.clone(),
            UnitOutput::StreamDelta { output } | UnitOutput::FoldedDelta { output, .. } => {
                let patch = match &mut patch {
                    Some(p) => p,
                    None => patch.insert(Patch::new(model.graph())?),
                };
                let y = format!("nbl.measure.{}.y", unit.key());
                let delta = match &site.output {
                    UnitOutput::FoldedDelta { branch, .. } => {
                        let delta = format!("nbl.measure.{}.delta", unit.key());
                        patch.add_node(build::node("Add", &[&delta, branch], &y))?;
                        delta
                    }
                    _ => y.clone(),
                };
                patch.add_node(build::node("Sub", &[output, &site.map_input], &delta))?;
                // An output until the measuring graph reads it, or it dies with the patch.
                patch.add_output(&y)?;
                y
            }
        };
        taps.push(LayerTensors { layer: unit.layer, x: site.x, y, unit: Some(unit) });
    }
    let Some(patch) = patch else { return Ok((None, taps)) };
    let mut proto = model.proto.clone();
    proto.graph = Some(patch.apply()?.graph);
    Ok((Some(Model { path: model.path.clone(), proto }), taps))
}

/// Runs `model` over `data` (sequences of `seq_len` ids), `batch` at a time, and returns the
/// moments of every entry of `taps` (`d` wide), formed as `forming` says (on the host or in the
/// graph; each batch's products in f64 or f32). Shows progress on a terminal.
pub fn calibrate(
    model: &Model,
    d: usize,
    taps: &[LayerTensors],
    engine: &dyn Engine,
    data: &[Vec<i64>],
    batch: usize,
    forming: Forming,
) -> Result<Vec<Moments>> {
    let Forming { on, precision } = forming;
    ensure!(batch > 0, "a batch must hold at least 1 sequence");
    ensure!(!data.is_empty(), "no calibration sequences to run");
    let interface = Interface::of(model, Some(d))?;
    let seq_len = data[0].len();
    let total_tokens = (data.len() * seq_len) as u64;
    let progress = crate::progress::bar(
        total_tokens,
        "calibrating {bar:40} {pos}/{len} tokens  {rate}  ETA {eta}",
        "tokens",
    );
    let started = Instant::now();
    let batches =
        data.chunks(batch).map(|chunk| Array2::from_shape_fn((chunk.len(), seq_len), |(i, t)| chunk[i][t]));

    // Seconds spent building the session: on a large model this is most of a short run, and
    // inference's own speed (`bench`) leaves it out too.
    let loaded: f64;
    let moments = match on {
        MomentsOn::Graph => {
            let graph = in_graph::MomentsGraph::new(model, d, taps, precision)?;
            let mut session = engine.load_stateful(&graph.model, &graph.carried, &[])?;
            session.reset(graph.initial_state())?;
            loaded = started.elapsed().as_secs_f64();
            for (b, ids) in batches.enumerate() {
                crate::atomic::check_interrupt()?;
                session.step(&interface.prefill(&ids)?).with_context(|| format!("calibration batch {b}"))?;
                progress.inc(ids.len() as u64);
            }
            let moments = graph.moments(session.state()?)?;
            for (m, tap) in moments.iter().zip(taps) {
                ensure!(
                    m.is_finite(),
                    "{}: the moments of {:?} and {:?} are not finite; the model overflows on this data \
                     (an f16 model may need f32 activations)",
                    tap.describe(),
                    tap.x,
                    tap.y
                );
            }
            moments
        }
        MomentsOn::Host | MomentsOn::Auto => {
            let extra: Vec<String> = taps.iter().flat_map(|t| [t.x.clone(), t.y.clone()]).collect();
            let mut session = engine.load(&measuring_graph(model, &extra)?, &[])?;
            loaded = started.elapsed().as_secs_f64();
            let mut moments: Vec<Moments> = taps.iter().map(|_| Moments::new(d)).collect();
            for (b, ids) in batches.enumerate() {
                crate::atomic::check_interrupt()?;
                let outputs = session
                    .run(&interface.prefill(&ids)?)
                    .with_context(|| format!("calibration batch {b}"))?;
                let captured = select(session.as_ref(), &outputs, &extra)?;
                moments.par_iter_mut().zip(taps.par_iter()).zip(captured.par_chunks(2)).try_for_each(
                    |((m, tap), xy)| -> Result<()> {
                        let x = activations(xy[0], d, &tap.describe(), &tap.x, b)?;
                        let y = activations(xy[1], d, &tap.describe(), &tap.y, b)?;
                        m.add_batch_in(precision, &x, &y);
                        Ok(())
                    },
                )?;
                progress.inc(ids.len() as u64);
            }
            moments
        }
    };
    progress.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let attention = taps.iter().filter(|t| t.unit.is_none()).count();
    let others = match taps.len() - attention {
        0 => String::new(),
        n => format!(" and {n} other units"),
    };
    eprintln!(
        "calibrated {attention} layers{others} on {total_tokens} tokens in {seconds:.1} s ({:.0} tokens/s; \
         {:.0} tokens/s after the {loaded:.1} s session load; moments {}, products in {})",
        total_tokens as f64 / seconds.max(1e-9),
        total_tokens as f64 / (seconds - loaded).max(1e-9),
        if on == MomentsOn::Graph { "in the graph" } else { "on the host" },
        if precision == MomentPrecision::F32 { "f32" } else { "f64" }
    );
    Ok(moments)
}

/// `model` with the measured tensors as its only outputs: the final norm, the LM head (a fifth of
/// a small model's work at 512 tokens), the last layer's MLP and the KV-cache outputs are never
/// computed.
fn measuring_graph(model: &Model, measured: &[String]) -> Result<Model> {
    let mut patch = Patch::new(model.graph())?;
    for output in &model.graph().output {
        patch.remove_output(output.name())?;
    }
    for name in measured {
        patch.add_output(name)?;
    }
    let mut proto = model.proto.clone();
    proto.graph = Some(patch.apply()?.graph);
    Ok(Model { path: model.path.clone(), proto })
}

/// A captured tensor as `n×d` f32 values (borrowed when it already is contiguous f32), refusing
/// NaN/Inf (which would poison every statistic).
fn activations<'t>(t: &'t Tensor, d: usize, unit: &str, name: &str, batch: usize) -> Result<Cow<'t, [f32]>> {
    ensure!(
        t.shape().last() == Some(&d),
        "{unit}: tensor {name:?} has shape {:?}, expected [..., {d}]",
        t.shape()
    );
    let values = match t {
        Tensor::F32(a) => match a.as_slice() {
            Some(contiguous) => Cow::Borrowed(contiguous),
            None => Cow::Owned(a.as_standard_layout().into_owned().into_raw_vec_and_offset().0),
        },
        other => Cow::Owned(other.to_f32()?.into_raw_vec_and_offset().0),
    };
    if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
        bail!(
            "{unit}: tensor {name:?} holds {} at token {} of batch {batch}; the model overflows on this data \
             (an f16 model may need f32 activations)",
            values[bad],
            bad / d
        );
    }
    Ok(values)
}

/// The tensors each layer's moments were measured on.
pub fn layer_tensors(layout: &DecoderLayout) -> Vec<LayerTensors> {
    layout.layers.iter().map(|l| LayerTensors::attention(l.layer, &l.x, &l.y)).collect()
}

/// Identifies a model's structure for matching statistics to it: hidden size, the X/Y tensors and
/// every initializer's name, type and shape (not its values), hashed with FNV-1a.
pub fn fingerprint(model: &Model, layout: &DecoderLayout) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    };
    feed(&layout.hidden_size.to_le_bytes());
    for l in &layout.layers {
        feed(l.x.as_bytes());
        feed(l.y.as_bytes());
    }
    let mut inits: Vec<&crate::onnx::proto::TensorProto> = model.graph().initializer.iter().collect();
    inits.sort_by(|a, b| a.name().cmp(b.name()));
    for t in inits {
        feed(t.name().as_bytes());
        feed(&t.data_type.unwrap_or(tensor_proto::DataType::Undefined as i32).to_le_bytes());
        for d in &t.dims {
            feed(&d.to_le_bytes());
        }
    }
    format!("{hash:016x}")
}

/// Fails unless `stats` (read from `stats_path`) were measured on `model`, every attention layer
/// of it (other units besides, or not).
pub fn check_fingerprint(
    stats: &dyn MomentsSource,
    stats_path: &std::path::Path,
    model: &Model,
    layout: &DecoderLayout,
) -> Result<()> {
    let expected = fingerprint(model, layout);
    ensure!(
        expected == stats.fingerprint(),
        "{} was measured on another model (fingerprint {}, {} has {expected})",
        stats_path.display(),
        stats.fingerprint(),
        model.path.display()
    );
    // The fingerprint covers the model; the layer list is the file's own.
    let want = layer_tensors(layout);
    let attention: Vec<LayerTensors> = stats.layers().iter().filter(|l| l.unit.is_none()).cloned().collect();
    if attention != want {
        let have: Vec<usize> = attention.iter().map(|l| l.layer).collect();
        let need: Vec<usize> = want.iter().map(|l| l.layer).collect();
        bail!(
            "{} holds statistics of layers {have:?}, not of exactly the model's layers {need:?} and their tensors",
            stats_path.display()
        );
    }
    ensure!(
        stats.hidden_size() == layout.hidden_size,
        "{} has hidden size {}, the model {}",
        stats_path.display(),
        stats.hidden_size(),
        layout.hidden_size
    );
    Ok(())
}
