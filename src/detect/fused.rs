//! The fused attention operators, in one table: how a branch's fused attention is recognised and
//! what a node of each must carry.

use crate::onnx::proto::NodeProto;

/// Fused attention operators (ai.onnx and com.microsoft).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FusedAttention {
    Attention,
    MultiHeadAttention,
    GroupQueryAttention,
    PagedAttention,
    SparseAttention,
    PackedAttention,
    PackedMultiHeadAttention,
    DecoderMaskedMultiHeadAttention,
}

/// One fused attention operator: its type in a domain, and the inputs a node of it must have
/// (ONNX Runtime would refuse the graph without them).
struct FusedOp {
    kind: FusedAttention,
    domain: &'static str,
    op_type: &'static str,
    required_inputs: &'static [usize],
}

impl FusedOp {
    const fn new(
        kind: FusedAttention,
        domain: &'static str,
        op_type: &'static str,
        required_inputs: &'static [usize],
    ) -> FusedOp {
        FusedOp { kind, domain, op_type, required_inputs }
    }
}

const AI_ONNX: &str = "ai.onnx";
const MICROSOFT: &str = "com.microsoft";

/// Every fused attention operator. `Attention` is in both domains, with different inputs; the
/// standard one comes first.
const FUSED: [FusedOp; 9] = {
    use FusedAttention as F;
    [
        // Q, K, V
        FusedOp::new(F::Attention, AI_ONNX, "Attention", &[0, 1, 2]),
        // input, weights
        FusedOp::new(F::Attention, MICROSOFT, "Attention", &[0, 1]),
        FusedOp::new(F::MultiHeadAttention, MICROSOFT, "MultiHeadAttention", &[0]),
        // query, (key, value), past key, past value, seqlens_k, total_sequence_length
        FusedOp::new(F::GroupQueryAttention, MICROSOFT, "GroupQueryAttention", &[0, 5, 6]),
        FusedOp::new(F::PagedAttention, MICROSOFT, "PagedAttention", &[]),
        FusedOp::new(F::SparseAttention, MICROSOFT, "SparseAttention", &[]),
        FusedOp::new(F::PackedAttention, MICROSOFT, "PackedAttention", &[]),
        FusedOp::new(F::PackedMultiHeadAttention, MICROSOFT, "PackedMultiHeadAttention", &[0]),
        FusedOp::new(F::DecoderMaskedMultiHeadAttention, MICROSOFT, "DecoderMaskedMultiHeadAttention", &[0]),
    ]
};

impl FusedAttention {
    /// The fused attention operator of type `op`, in any domain.
    pub fn from_op(op: &str) -> Option<FusedAttention> {
        FUSED.iter().find(|f| f.op_type == op).map(|f| f.kind)
    }

    /// The operator's type, as a node spells it.
    pub fn op_type(self) -> &'static str {
        FUSED.iter().find(|f| f.kind == self).map(|f| f.op_type).expect("every fused attention op has a row")
    }
}

/// The inputs `node` must have if it is a fused attention operator (none otherwise). The op type
/// decides, as in [`FusedAttention::from_op`]; the domain (empty meaning ai.onnx) only chooses
/// between operators of one type, and a node of another domain is held to the first of its type.
pub(super) fn required_inputs(node: &NodeProto) -> &'static [usize] {
    let domain = if node.domain().is_empty() { AI_ONNX } else { node.domain() };
    let mut of_type = FUSED.iter().filter(|f| f.op_type == node.op_type()).peekable();
    let first = of_type.peek().map(|f| f.required_inputs);
    of_type.find(|f| f.domain == domain).map(|f| f.required_inputs).or(first).unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::build::node;

    #[test]
    fn every_fused_operator_is_found_by_its_op_type() {
        use FusedAttention::*;
        for kind in [
            Attention,
            MultiHeadAttention,
            GroupQueryAttention,
            PagedAttention,
            SparseAttention,
            PackedAttention,
            PackedMultiHeadAttention,
            DecoderMaskedMultiHeadAttention,
        ] {
            // A new operator must be listed here, and so given a row.
            match kind {
                Attention
                | MultiHeadAttention
                | GroupQueryAttention
                | PagedAttention
                | SparseAttention
                | PackedAttention
                | PackedMultiHeadAttention
                | DecoderMaskedMultiHeadAttention => {}
            }
            assert_eq!(FusedAttention::from_op(kind.op_type()), Some(kind));
        }
        assert_eq!(FusedAttention::from_op("Softmax"), None);
    }

    #[test]
    fn the_domain_tells_the_two_attention_operators_apart() {
        let in_domain = |op: &str, domain: &str| {
            let mut n = node(op, &["x"], "y");
            n.domain = Some(domain.into());
            required_inputs(&n)
        };
        assert_eq!(in_domain("Attention", ""), &[0, 1, 2]);
        assert_eq!(in_domain("Attention", "ai.onnx"), &[0, 1, 2]);
        assert_eq!(in_domain("Attention", "com.microsoft"), &[0, 1]);
        // Any other domain is held to the standard operator.
        assert_eq!(in_domain("Attention", "custom"), &[0, 1, 2]);
        assert_eq!(in_domain("GroupQueryAttention", "com.microsoft"), &[0, 5, 6]);
        // The op type alone decides where only one domain has the operator.
        assert_eq!(in_domain("MultiHeadAttention", ""), &[0]);
        assert_eq!(in_domain("Softmax", ""), &[] as &[usize]);
    }
}
