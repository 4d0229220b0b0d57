//! Layer numbers in names: they only label layers, so they are cross-checked against the stream
//! order and disagreements reported, never used to find a boundary.

use std::collections::HashSet;

use super::AttentionSite;
use super::view::GraphView;
use crate::onnx::Port;

/// Compares stream-order layer numbers with the ones in node and KV-cache names; returns warnings.
pub(super) fn cross_check(g: &GraphView, layers: &[AttentionSite]) -> Vec<String> {
    let mut warnings = Vec::new();
    for site in layers {
        let kv_numbers: HashSet<usize> =
            site.kv_inputs.iter().chain(&site.kv_outputs).filter_map(|n| number_after(n, ".")).collect();
        if !kv_numbers.is_empty() && !kv_numbers.contains(&site.layer) {
            warnings.push(format!(
                "layer {} (stream order) uses KV-cache tensors numbered {:?}",
                site.layer, kv_numbers
            ));
        }
        let Some(y) = g.index.id(&site.y) else { continue };
        if let Some(Port { node, .. }) = g.index.producer(y)
            && let Some(n) = number_after(g.node(node).name(), "layers.")
            && n != site.layer
        {
            warnings.push(format!(
                "layer {} (stream order) ends at node {:?}, whose name says layer {n}",
                site.layer,
                g.node(node).name()
            ));
        }
    }
    let past_inputs = g.graph.input.iter().filter(|v| v.name().starts_with("past_key_values.")).count();
    if past_inputs > 0 && past_inputs != 2 * layers.len() {
        warnings.push(format!(
            "the model has {past_inputs} past_key_values inputs but {} attention layers were found",
            layers.len()
        ));
    }
    warnings
}

/// The first run of digits after `marker` (`"past_key_values.3.key"` with `"."` gives 3).
fn number_after(name: &str, marker: &str) -> Option<usize> {
    name.match_indices(marker).find_map(|(i, m)| {
        let rest = &name[i + m.len()..];
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_numbers_are_read_from_names() {
        assert_eq!(number_after("past_key_values.12.key", "."), Some(12));
        assert_eq!(number_after("/model/layers.3/self_attn/o_proj/MatMul", "layers."), Some(3));
        assert_eq!(number_after("logits", "."), None);
    }
}
