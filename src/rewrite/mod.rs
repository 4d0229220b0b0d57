//! The graph surgery: each chosen unit's output is replaced by `Y = X Wᵀ + b` (NBL for attention)
//! or by nothing (dropping), the KV cache of the attention it held leaves the model's interface,
//! and whatever no output needs any more is eliminated by reference count.
//!
//! All edits of one rewrite are collected in one [`Patch`] (the splices are named constructors in
//! [`splice`]) and applied at once. The rewrite applies a plan; it does not choose or fit.

mod fold;
mod splice;

use std::collections::HashSet;

use anyhow::{Result, bail};
use clap::ValueEnum;
use serde::Serialize;

use crate::cost::Footprint;
use crate::detect::{DecoderLayout, UnitSite};
use crate::fit::LinearMap;
use crate::fit::storage::MapStorage;
use crate::onnx::proto::StringStringEntryProto;
use crate::onnx::{DType, Interface, Model, Patch};
use crate::unit::Unit;
pub use fold::Folded;

/// What replaces a chosen unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Replacement {
    /// `Y = X Wᵀ + b`, the LMMSE map (NBL)
    Linear,
    /// `Y = 0`: the residual passes through (the attention-dropping baseline)
    Drop,
}

/// What happens to the KV cache of replaced layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvCache {
    /// Remove the layers' past/present tensors from the model's inputs and outputs
    Drop,
    /// Keep the model's interface unchanged (the cache of those layers is still computed)
    Keep,
}

/// One unit to replace, with its linear map when the replacement is linear.
pub struct UnitEdit {
    pub site: UnitSite,
    pub map: Option<LinearMap>,
}

/// How every edit of one rewrite replaces its site, and what becomes of the KV cache.
#[derive(Clone, Copy, Debug)]
pub struct RewriteOptions {
    pub replace: Replacement,
    pub kv: KvCache,
    /// How the maps are written.
    pub storage: MapStorage,
}

impl RewriteOptions {
    /// Maps in the stream's float type (f32 where it cannot be told).
    pub fn float(layout: &DecoderLayout, replace: Replacement, kv: KvCache) -> RewriteOptions {
        RewriteOptions { replace, kv, storage: MapStorage::Float(layout.dtype.unwrap_or(DType::F32)) }
    }
}

/// What the rewrite changed, for the report.
#[derive(Clone, Debug, Serialize)]
pub struct RewriteSummary {
    /// The attention layers replaced, alone or inside a larger unit.
    pub layers: Vec<usize>,
    /// Every unit replaced, in layer order.
    pub units: Vec<Unit>,
    /// The folds among them: the projection each map went into.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub folds: Vec<Folded>,
    pub replace: Replacement,
    pub kv: KvCache,
    /// How the maps were stored.
    pub weight_format: MapStorage,
    pub nodes_before: usize,
    pub nodes_after: usize,
    /// Weights (values, however stored) the rewrite removed and added.
    pub params_removed: u64,
    pub params_added: u64,
    /// Every initializer's weights and storage bytes, before and after.
    pub weights_before: Footprint,
    pub weights_after: Footprint,
    /// `None` when the model has inputs whose shapes cannot be told (the rewrite still proceeds).
    pub kv_bytes_per_token_before: Option<u64>,
    pub kv_bytes_per_token_after: Option<u64>,
    pub removed_inputs: Vec<String>,
    pub removed_outputs: Vec<String>,
    /// Shape annotations (`value_info`) of intermediate tensors not carried into the output.
    pub value_info_dropped: usize,
}

/// A copy of `model` with `maps`' units linearised, the maps stored as `storage`, the interface
/// unchanged (the KV cache of those layers is still computed, so the same inputs run it): what
/// sequential fitting calibrates and measured selection scores, never written.
pub fn linearised_copy(
    model: &Model,
    layout: &DecoderLayout,
    maps: &[(Unit, &LinearMap)],
    storage: MapStorage,
) -> Result<Model> {
    let mut copy = Model { path: model.path.clone(), proto: model.proto.clone() };
    let edits = maps
        .iter()
        .map(|&(unit, map)| Ok(UnitEdit { site: layout.unit_site(unit)?, map: Some(map.clone()) }));
    let options = RewriteOptions { replace: Replacement::Linear, kv: KvCache::Keep, storage };
    apply(&mut copy, layout, edits, options, &[])?;
    Ok(copy)
}

/// Rewrites `model` in memory: every edit's site replaced as `options` says, the KV cache of
/// those layers removed (with [`KvCache::Drop`]), dead nodes and initializers eliminated, in one
/// [`Patch`]. The edits are taken one at a time, and each map is encoded and dropped before the
/// next is asked for. `provenance` goes into `metadata_props`.
pub fn apply(
    model: &mut Model,
    layout: &DecoderLayout,
    edits: impl IntoIterator<Item = Result<UnitEdit>>,
    options: RewriteOptions,
    provenance: &[(&str, String)],
) -> Result<RewriteSummary> {
    let hidden_size = Some(layout.hidden_size);
    let kv_before = Interface::of(model, hidden_size).ok().map(|i| i.kv_bytes_per_token());
    let before = Footprint::of(model.graph(), |_| true)?;
    let nodes_before = model.graph().node.len();

    let mut patch = Patch::new(model.graph())?;
    let mut units: Vec<Unit> = Vec::new();
    let mut layers: Vec<usize> = Vec::new();
    let mut folds = Vec::new();
    for edit in edits {
        let UnitEdit { site, map } = edit?;
        if let Some(other) = units.iter().find(|u| u.overlaps(&site.unit)) {
            bail!("{} and {other} are both chosen, and they replace a common part of the model", site.unit);
        }
        units.push(site.unit);
        layers.extend(&site.attention);
        match (&site.fold, options.replace, &map) {
            // A fold's map goes into its MLP's weights, whatever format new maps are stored in.
            (Some(fold), Replacement::Linear, Some(map)) => {
                folds.push(patch.fold_map(&site, fold, map, model)?)
            }
            _ => patch.replace_site(&site, options.replace, map, options.storage)?,
        }
    }
    units.sort_unstable_by_key(|u| (u.layer, u.kind));
    layers.sort_unstable();
    let (removed_inputs, removed_outputs) = match options.kv {
        KvCache::Drop => patch.remove_kv_cache(layout, &layers)?,
        KvCache::Keep => (Vec::new(), Vec::new()),
    };
    *model.graph_mut() = patch.apply()?.graph;
    // The exporter's shape annotations of intermediate tensors are optional hints that runtimes
    // trust, and they are not always right: the GenAI builder's fp16 CPU export labels the keys and
    // values repeated after the past-cache Concat with `sequence_length` where they have
    // `total_sequence_length`, and ONNX Runtime's CPU provider then fails at the first decode step
    // (it sizes the buffers of the Casts it inserts from them). Runtimes infer shapes themselves,
    // so the rewrite writes none rather than vouch for ones it did not check.
    let value_info_dropped = std::mem::take(&mut model.graph_mut().value_info).len();
    if matches!(options.storage, MapStorage::Grouped { .. }) && model.opset("com.microsoft").is_none() {
        model.proto.opset_import.push(crate::onnx::proto::OperatorSetIdProto {
            domain: Some("com.microsoft".into()),
            version: Some(1),
        });
    }

    let new_names: HashSet<String> = units.iter().flat_map(|u| splice::initializer_names(&u.key())).collect();
    let graph = model.graph();
    let added = Footprint::of(graph, |t| new_names.contains(t.name()))?;
    let after = Footprint::of(graph, |_| true)?;
    let nodes_after = graph.node.len();
    for (key, value) in provenance {
        set_metadata(&mut model.proto.metadata_props, key, value);
    }
    let kv_after = Interface::of(model, hidden_size).ok().map(|i| i.kv_bytes_per_token());
    Ok(RewriteSummary {
        layers,
        units,
        folds,
        replace: options.replace,
        kv: options.kv,
        weight_format: options.storage,
        nodes_before,
        nodes_after,
        params_removed: before.weights - (after.weights - added.weights),
        params_added: added.weights,
        weights_before: before,
        weights_after: after,
        kv_bytes_per_token_before: kv_before,
        kv_bytes_per_token_after: kv_after,
        removed_inputs,
        removed_outputs,
        value_info_dropped,
    })
}

fn set_metadata(props: &mut Vec<StringStringEntryProto>, key: &str, value: &str) {
    props.retain(|p| p.key() != key);
    props.push(StringStringEntryProto { key: Some(key.to_string()), value: Some(value.to_string()) });
}
