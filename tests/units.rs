//! Units besides attention: an MLP, a whole layer, a run of layers, each replaced by an affine map
//! of the stream entering it, and a fold (a layer removed, its map of the previous MLP's output
//! folded into that MLP's weights), on every fixture. What the rewrite computes is read at the
//! stream after the unit (the next layer's X) and compared with the same map applied to PyTorch's
//! stream.

mod common;

use common::*;
use nbl_onnx::detect::{DecoderLayout, ProjectionWeight, UnitOutput, find_layout};
use nbl_onnx::fit::LinearMap;
use nbl_onnx::onnx::{Model, Tensor};
use nbl_onnx::rewrite::{KvCache, Replacement, RewriteOptions, UnitEdit, apply};
use nbl_onnx::unit::{Unit, UnitKind};
use ndarray::{Array2, ArrayD, Axis};

/// Every fixture has 3 layers: each unit ends before the last, so that the next layer's X shows
/// what it left in the stream.
fn units() -> [Unit; 4] {
    [Unit::mlp(1), Unit::layer(1), Unit::run(0, 2), Unit::fold(1, 1)]
}

/// A seeded map `W` (entries of about 0.05, so that `h Wᵀ` is a fraction of `h`) and `b`.
fn seeded_map(d: usize, seed: u64) -> LinearMap {
    let mut g = Gaussian::new(seed);
    let w = g.matrix(d, d);
    let b: Vec<f64> = (0..d).map(|_| 0.1 * g.sample()).collect();
    LinearMap { w: faer::Mat::from_fn(d, d, |i, j| 0.05 * w[i * d + j]), b, second_moment: None }
}

/// `rows` (tokens × d) mapped: `rows Wᵀ + b`.
fn affine(rows: &Array2<f64>, map: &LinearMap) -> Array2<f64> {
    let d = map.b.len();
    let w = Array2::from_shape_fn((d, d), |(i, j)| map.w[(i, j)]);
    let mut out = rows.dot(&w.t());
    out.axis_iter_mut(Axis(0)).for_each(|mut row| row.iter_mut().zip(&map.b).for_each(|(v, b)| *v += b));
    out
}

fn tokens(t: &Tensor, d: usize) -> Array2<f64> {
    let a: ArrayD<f64> = t.to_f64().unwrap();
    let n = a.len() / d;
    a.into_shape_with_order((n, d)).unwrap()
}

/// The tensors `names` of `model` run on the fixture's reference inputs.
fn run(
    model: &Model,
    reference: &std::collections::BTreeMap<String, Tensor>,
    names: &[String],
) -> Vec<Tensor> {
    let declared: Vec<&str> = model.graph().input.iter().map(|v| v.name()).collect();
    let inputs: Vec<_> =
        reference_inputs(reference).into_iter().filter(|(n, _)| declared.contains(&n.as_str())).collect();
    let mut session = ort().load(model, names).unwrap();
    let outputs = session.run(&inputs).unwrap();
    let own = session.output_names().len() - names.len();
    outputs.into_iter().skip(own).collect()
}

/// The logits of `model` run on the fixture's reference inputs.
fn logits_of(model: &Model, reference: &std::collections::BTreeMap<String, Tensor>) -> Tensor {
    let declared: Vec<&str> = model.graph().input.iter().map(|v| v.name()).collect();
    let inputs: Vec<_> =
        reference_inputs(reference).into_iter().filter(|(n, _)| declared.contains(&n.as_str())).collect();
    let mut session = ort().load(model, &[]).unwrap();
    let at = session.output_names().iter().position(|n| n == "logits").unwrap();
    session.run(&inputs).unwrap().swap_remove(at)
}

/// The int4 graph computes in f32 against its f32 reference (as in the other PyTorch comparisons).
fn float_accuracy(model: &mut Model) {
    for node in &mut model.graph_mut().node {
        for attr in node.attribute.iter_mut().filter(|a| a.name() == "accuracy_level") {
            attr.i = Some(1);
        }
    }
}

/// What the stream after `unit` is once its map replaces it: for a layer or a run, PyTorch's
/// stream before it plus the map of it; for an MLP, the stream after it with the MLP's term
/// swapped for the map of the stream it reads (the term and that stream read off the original
/// graph, whose streams match PyTorch's).
fn expected_stream(
    fixture: &str,
    model: &Model,
    layout: &DecoderLayout,
    unit: Unit,
    map: &LinearMap,
) -> Array2<f64> {
    let reference = reference(fixture);
    let d = layout.hidden_size;
    let pytorch = |layer: usize| tokens(&reference[&format!("layers.{layer}.x")], d);
    let site = layout.unit_site(unit).unwrap();
    match &site.output {
        UnitOutput::StreamDelta { .. } => {
            let x = pytorch(unit.layer);
            &x + &affine(&x, map)
        }
        UnitOutput::Branch(term) => {
            let taps = run_original(model, &reference, &[site.map_input.clone(), term.clone()]);
            let (x, term) = (tokens(&taps[0], d), tokens(&taps[1], d));
            pytorch(unit.last() + 1) - &term + &affine(&x, map)
        }
        UnitOutput::FoldedDelta { branch, .. } => {
            let term = tokens(&run_original(model, &reference, std::slice::from_ref(branch))[0], d);
            pytorch(unit.layer) - &term + &affine(&term, map)
        }
    }
}

/// `names` of the unrewritten `model`, computing in f32.
fn run_original(
    model: &Model,
    reference: &std::collections::BTreeMap<String, Tensor>,
    names: &[String],
) -> Vec<Tensor> {
    let mut original = Model { path: model.path.clone(), proto: model.proto.clone() };
    float_accuracy(&mut original);
    run(&original, reference, names)
}

/// Why the fixtures' MLPs cannot take a fold: a mixture of experts, a post-norm (Gemma2, OLMo2),
/// Granite's residual multiplier, int8 products, a cast to the stream's type.
const FOLD_REFUSALS: [&str; 2] = ["mixture of experts", "no weight to fold a map into"];

#[test]
fn every_unit_computes_what_its_map_computes_on_the_pytorch_stream() {
    let (mut checked_folds, mut refused_folds) = (0, 0);
    for fixture in fixture_names() {
        let model = Model::load(model_path(&fixture)).unwrap();
        let layout = find_layout(&model).unwrap();
        let d = layout.hidden_size;
        for (seed, unit) in units().into_iter().enumerate() {
            let site = match layout.unit_site(unit) {
                Ok(site) => site,
                Err(e) => {
                    // Only a mixture of experts is refused among these fixtures' units, whole
                    // layers across a post-norm (OPT-350m), and folds
                    // into MLPs whose output is not their projection's.
                    let e = format!("{e:#}");
                    let moe = e.contains("mixture of experts") && e.contains("TopK");
                    let fold = unit.kind == UnitKind::Fold && FOLD_REFUSALS.iter().any(|r| e.contains(r));
                    let whole_layers = unit.kind != UnitKind::Mlp && e.contains("(post-norm)");
                    assert!(moe || fold || whole_layers, "{fixture}: {unit}: {e}");
                    eprintln!("{fixture}: {unit} refused: {e}");
                    refused_folds += usize::from(unit.kind == UnitKind::Fold);
                    continue;
                }
            };
            // A fold into int4 weights, and the MLP term it rewrites.
            let requantised = site
                .fold
                .as_ref()
                .filter(|f| matches!(f.projection.weight, ProjectionWeight::Blocks { .. }))
                .map(|f| f.branch.clone());
            // In a post-norm layer the next layer reads the stream after a norm, so PyTorch's next
            // layer input is no stream before it: those units are checked by their logits
            // (`every_unit_rewrite_computes_what_the_patched_pytorch_model_computes`).
            if layout.ends.iter().any(|e| unit.layers().any(|l| l == e.layer) && e.normalised) {
                eprintln!("{fixture}: {unit}: post-norm, checked by its logits");
                continue;
            }
            let map = seeded_map(d, seed as u64 + 1);
            let expected = expected_stream(&fixture, &model, &layout, unit, &map);

            let mut rewritten = Model { path: model.path.clone(), proto: model.proto.clone() };
            let map_again = map.clone();
            let edit = UnitEdit { site, map: Some(map) };
            let options = RewriteOptions::float(&layout, Replacement::Linear, KvCache::Drop);
            let summary = apply(&mut rewritten, &layout, vec![Ok(edit)], options, &[]).unwrap();
            float_accuracy(&mut rewritten);
            // Every attention inside the unit takes its KV cache with it, and nothing else does.
            let kv_layers: Vec<usize> = if unit.holds_attention() { unit.layers().collect() } else { vec![] };
            assert_eq!(summary.layers, kv_layers, "{fixture}: {unit}");
            let removed: usize = kv_layers.iter().map(|&l| layout.layers[l].kv_inputs.len()).sum();
            assert_eq!(summary.removed_inputs.len(), removed, "{fixture}: {unit}");

            // A fold removes the layer's end junction: its readers read the stream before it.
            let after = match unit.kind {
                UnitKind::Fold => layout.layers[unit.layer].x.clone(),
                _ => layout.layers[unit.last() + 1].x.clone(),
            };
            let reference = reference(&fixture);
            let got = tokens(&run(&rewritten, &reference, &[after])[0], d);
            let diff = (&got - &expected).iter().map(|v| v.abs()).fold(0.0, f64::max);
            let scale = expected.iter().map(|v| v.abs()).fold(0.0, f64::max);
            let tolerance = f64::from(tolerance(&fixture)) * scale.max(1.0);
            eprintln!(
                "{fixture}: {unit}: stream after it within {diff:.2e} of the map on PyTorch's (max {scale:.2})"
            );
            if quantised_activations(&fixture) {
                let cos = cosine(&Tensor::F64(got.into_dyn()), &Tensor::F64(expected.into_dyn()));
                assert!(cos >= QUANTISED_MIN_COSINE, "{fixture}: {unit}: cosine {cos}");
            } else if let Some(branch) = &requantised {
                // The folded int4 weights are rounded again: what the fold adds to the stream
                // (the stream minus the MLP's own term before it) is the map's term to within
                // that rounding.
                let term = tokens(&run_original(&model, &reference, std::slice::from_ref(branch))[0], d);
                let base = &expected - &affine(&term, &map_again);
                let (added, wanted) = (&got - &base, &expected - &base);
                let error = (&added - &wanted).iter().map(|v| v * v).sum::<f64>().sqrt()
                    / wanted.iter().map(|v| v * v).sum::<f64>().sqrt();
                // Rounding weights like these to int4 in groups (step amax/7, about 0.36 σ) leaves
                // about 0.36/√12 ≈ 10% of their size; a wrong fold (a transposed map, a lost bias
                // or zero point) errs by the whole term.
                eprintln!("{fixture}: {unit}: requantised, the fold's term within {error:.3} (relative)");
                assert!(error <= 0.15, "{fixture}: {unit}: relative error {error}");
            } else {
                assert!(diff <= tolerance, "{fixture}: {unit}: {diff} > {tolerance}");
            }
            checked_folds += usize::from(unit.kind == UnitKind::Fold);
        }
    }
    eprintln!("folds: {checked_folds} checked, {refused_folds} refused");
    assert!(
        checked_folds >= 20,
        "most fixtures' MLPs end in their projection: {checked_folds} folds checked"
    );
}

/// A fold is exact for float weights: the folded graph's stream after the removed layer is the
/// original graph's stream before it with the MLP's term `m` swapped for `m Wᵀ + b`, to f32
/// rounding (the product `Wd Wᵀ` is formed in f64 and stored once).
#[test]
fn a_fold_into_float_weights_is_exact() {
    for fixture in ["llama-optimum-past", "llama-genai-fp32", "qwen2-optimum-past", "gptneox-optimum-past"] {
        let model = Model::load(model_path(fixture)).unwrap();
        let layout = find_layout(&model).unwrap();
        let d = layout.hidden_size;
        let unit = Unit::fold(1, 1);
        let site = layout.unit_site(unit).unwrap();
        let fold = site.fold.clone().unwrap();
        assert!(matches!(fold.projection.weight, ProjectionWeight::Float(_)), "{fixture}");
        let reference = reference(fixture);
        let taps = run_original(&model, &reference, &[layout.layers[1].x.clone(), fold.branch.clone()]);
        let (before, term) = (tokens(&taps[0], d), tokens(&taps[1], d));
        let map = seeded_map(d, 7);
        let expected = &before - &term + &affine(&term, &map);

        let mut rewritten = Model { path: model.path.clone(), proto: model.proto.clone() };
        let options = RewriteOptions::float(&layout, Replacement::Linear, KvCache::Drop);
        let edit = UnitEdit { site, map: Some(map) };
        let summary = apply(&mut rewritten, &layout, vec![Ok(edit)], options, &[]).unwrap();
        assert_eq!(summary.folds.len(), 1, "{fixture}");
        assert!(!summary.folds[0].requantised);
        assert!(
            rewritten.graph().node.iter().all(|n| n.name() != fold.projection.node),
            "the old projection died"
        );
        // Layer 1's end junction is gone: its readers read layer 1's input, now the folded stream.
        let after = layout.layers[1].x.clone();
        let got = tokens(&run(&rewritten, &reference, &[after])[0], d);
        let diff = (&got - &expected).iter().map(|v| v.abs()).fold(0.0, f64::max);
        let scale = expected.iter().map(|v| v.abs()).fold(0.0, f64::max);
        eprintln!("{fixture}: fold 1-1 within {diff:.2e} of the unfolded map (max {scale:.2})");
        assert!(diff <= 1e-5 * scale.max(1.0), "{fixture}: {diff}");
        // Nothing but the MLP's weights grew: the parameters removed are layer 1's and the old
        // projection's, the ones added its folded copy and bias.
        assert_eq!(
            summary.params_added as usize,
            128 * d + d,
            "{fixture}: a [128, {d}] projection and its bias"
        );
    }
}

/// A run takes every layer inside it with it: none of their products, softmaxes or norms is left,
/// nor their KV cache, and the layers around it keep theirs. (What stays in their name scopes is
/// shared: the rotary tables later layers read, and the Cast of the stream the map itself reads.)
#[test]
fn a_run_removes_every_layer_inside_it() {
    let model = Model::load(model_path("llama-optimum-past")).unwrap();
    let layout = find_layout(&model).unwrap();
    let mut rewritten = Model { path: model.path.clone(), proto: model.proto.clone() };
    let edit = UnitEdit { site: layout.unit_site(Unit::run(0, 2)).unwrap(), map: Some(seeded_map(64, 9)) };
    let options = RewriteOptions::float(&layout, Replacement::Linear, KvCache::Drop);
    apply(&mut rewritten, &layout, vec![Ok(edit)], options, &[]).unwrap();
    let names: Vec<&str> = rewritten.graph().node.iter().map(|n| n.name()).collect();
    for layer in 0..2 {
        let scope = format!("/model/layers.{layer}/");
        let left: Vec<(&str, &str)> = rewritten
            .graph()
            .node
            .iter()
            .filter(|n| n.name().starts_with(&scope))
            .map(|n| (n.name(), n.op_type()))
            .collect();
        let computing = ["MatMul", "Softmax", "Pow", "ReduceMean", "Sqrt", "Sigmoid"];
        assert!(!left.iter().any(|(_, op)| computing.contains(op)), "layer {layer} still computes: {left:?}");
        assert!(left.len() <= 5, "layer {layer}: {left:?}");
    }
    assert!(names.iter().any(|n| n.starts_with("/model/layers.2/self_attn/")), "layer 2 is kept");
    let inputs: Vec<&str> = rewritten.graph().input.iter().map(|v| v.name()).collect();
    assert!(
        !inputs.iter().any(|i| i.starts_with("past_key_values.0.") || i.starts_with("past_key_values.1."))
    );
    assert!(inputs.contains(&"past_key_values.2.key"), "{inputs:?}");
}

/// Where the final norm fuses the last layer's sum and leaves it unused (GenAI graphs), a layer or a
/// run ending there has no output stream to measure, and says so; its MLP and attention do not.
#[test]
fn units_ending_in_a_fused_final_norm_are_refused_with_the_reason() {
    let model = Model::load(model_path("llama-genai-fp32")).unwrap();
    let layout = find_layout(&model).unwrap();
    for unit in [Unit::layer(2), Unit::run(1, 2)] {
        let e = format!("{:#}", layout.unit_site(unit).unwrap_err());
        assert!(e.contains("fused into the final norm"), "{unit}: {e}");
    }
    assert!(layout.unit_site(Unit::mlp(2)).is_ok() && layout.unit_site(Unit::run(0, 2)).is_ok());
    let (usable, refused) = layout.units(&nbl_onnx::unit::UnitKind::ALL);
    assert_eq!(refused.len(), 5, "layer 2, runs 1-2 and 0-2, folds 1-2 and 2-2: {refused:?}");
    assert_eq!(usable.len(), 3 + 3 + 2 + 1 + 1, "3 attention, 3 MLPs, layers 0 and 1, run 0-1, fold 1-1");
}

/// The logits of every unit's rewrite are PyTorch's with the same unit replaced by the same map
/// (`patched.<unit>.*` of each fixture, hooked into the PyTorch model by the fixture script): what
/// the stream comparisons above check at one tensor, here through every later layer, the final
/// norm and the LM head, with the KV cache of the units' layers gone.
#[test]
fn every_unit_rewrite_computes_what_the_patched_pytorch_model_computes() {
    let mut compared = 0;
    for fixture in fixture_names() {
        let model = Model::load(model_path(&fixture)).unwrap();
        let layout = find_layout(&model).unwrap();
        let reference = reference(&fixture);
        for unit in units() {
            let key = unit.key();
            let patched = |what: &str| {
                reference
                    .get(&format!("patched.{key}.{what}"))
                    .unwrap_or_else(|| panic!("{fixture}: no patched.{key}.{what}"))
            };
            // The refusals are the stream test's to check.
            let Ok(site) = layout.unit_site(unit) else { continue };
            let requantised = site
                .fold
                .as_ref()
                .is_some_and(|f| matches!(f.projection.weight, ProjectionWeight::Blocks { .. }));
            let w = patched("weight").to_f64().unwrap();
            let w = faer::Mat::from_fn(w.shape()[0], w.shape()[1], |i, j| w[[i, j]]);
            let b: Vec<f64> = patched("bias").to_f64().unwrap().iter().copied().collect();
            let mut rewritten = Model { path: model.path.clone(), proto: model.proto.clone() };
            let edit = UnitEdit { site, map: Some(LinearMap { w, b, second_moment: None }) };
            let options = RewriteOptions::float(&layout, Replacement::Linear, KvCache::Drop);
            apply(&mut rewritten, &layout, vec![Ok(edit)], options, &[]).unwrap();
            float_accuracy(&mut rewritten);
            let logits = &logits_of(&rewritten, &reference);
            let (diff, scale) = max_abs_diff(logits, patched("logits"));
            let cos = cosine(logits, patched("logits"));
            eprintln!(
                "{fixture}: {unit}: logits within {diff:.2e} of patched PyTorch (max {scale:.2}), cosine {cos:.6}"
            );
            if quantised_activations(&fixture) {
                assert!(cos >= QUANTISED_MIN_COSINE, "{fixture}: {unit}: cosine {cos}");
            } else if requantised {
                // int4 weights quantised again after the fold: the logits follow PyTorch's by
                // direction (the stream test bounds the fold's own term).
                assert!(cos >= QUANTISED_MIN_COSINE, "{fixture}: {unit}: cosine {cos}");
            } else {
                let tolerance = tolerance(&fixture) * scale.max(1.0);
                assert!(diff <= tolerance, "{fixture}: {unit}: {diff} > {tolerance}");
            }
            compared += 1;
        }
    }
    assert!(compared >= 100, "{compared} unit rewrites compared with PyTorch");
}
