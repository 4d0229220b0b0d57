//! tract, the embedded pure-Rust engine: always available, and the independent second runtime.
//! tract wants concrete input shapes for its optimised plan, so one plan is built per input-shape
//! signature and cached.

use std::collections::HashMap;

use anyhow::{Result, anyhow, bail, ensure};
use prost::Message;
use std::sync::Arc;

use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModel, InferenceModelExt, IntoRunnable, IntoTensor, TValue,
    Tensor as TractTensor, TypedRunnableModel,
};

use super::{Session, Unsupported};
use crate::onnx::{Model, Tensor};

type Plan = Arc<TypedRunnableModel>;

pub struct TractEngine {
    /// Why tract runs instead of ONNX Runtime, when `auto` fell back.
    fallback_reason: Option<String>,
}

impl TractEngine {
    pub fn new(fallback_reason: Option<String>) -> TractEngine {
        TractEngine { fallback_reason }
    }
}

impl super::Engine for TractEngine {
    fn describe(&self) -> String {
        let version = "tract 0.23.9";
        match &self.fallback_reason {
            Some(reason) => format!("{version} ({reason})"),
            None => version.to_string(),
        }
    }

    /// Loads the model as it is in memory (encoded, then parsed by tract like a file), with external
    /// data read from the model's directory.
    fn load(&self, model: &Model, extra_outputs: &[String]) -> Result<Box<dyn Session>> {
        let path = &model.path;
        let bytes = super::with_outputs(model, extra_outputs)?.encode_to_vec();
        // Exporters' value_info carries symbolic dims that conflict with the concrete shapes each plan
        // is built for; tract infers every intermediate shape itself.
        let onnx = tract_onnx::onnx().with_ignore_value_info(true);
        let proto = onnx
            .proto_model_for_read(&mut bytes.as_slice())
            .map_err(|e| anyhow!("tract cannot decode {}: {e}", path.display()))?;
        let parsed = onnx.parse(&proto, model.dir().to_str()).map_err(|e| self.unsupported(&e))?;
        ensure!(
            parsed.unresolved_inputs.is_empty(),
            "tract: {} reads tensors nothing provides: {:?}",
            path.display(),
            parsed.unresolved_inputs
        );
        let mut inference = parsed.model;
        let outputs: Vec<String> = model
            .graph()
            .output
            .iter()
            .map(|o| o.name().to_string())
            .chain(extra_outputs.iter().cloned())
            .fold(Vec::new(), |mut names, n| {
                if !names.contains(&n) {
                    names.push(n);
                }
                names
            });
        inference
            .select_outputs_by_name(&outputs)
            .map_err(|e| anyhow!("tract: cannot expose outputs of {}: {e}", path.display()))?;
        let inputs = inference
            .input_outlets()
            .map_err(|e| anyhow!("{e}"))?
            .iter()
            .map(|o| inference.node(o.node).name.clone())
            .collect();
        Ok(Box::new(TractRunner {
            model: inference,
            inputs,
            outputs,
            plans: HashMap::new(),
            engine: self.describe(),
        }))
    }
}

impl TractEngine {
    /// tract reports an unknown operator deep in its error chain; surface it.
    fn unsupported(&self, e: &anyhow::Error) -> anyhow::Error {
        Unsupported { engine: super::Engine::describe(self), reason: error_chain(e) }.into()
    }
}

fn error_chain(e: &anyhow::Error) -> String {
    let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    chain.join(": ")
}

struct TractRunner {
    model: InferenceModel,
    inputs: Vec<String>,
    outputs: Vec<String>,
    plans: HashMap<Vec<(DatumType, Vec<usize>)>, Plan>,
    engine: String,
}

impl Session for TractRunner {
    fn output_names(&self) -> &[String] {
        &self.outputs
    }

    fn run(&mut self, inputs: &[(String, Tensor)]) -> Result<Vec<Tensor>> {
        let mut ordered = Vec::with_capacity(self.inputs.len());
        for name in &self.inputs {
            let (_, t) = inputs
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| anyhow!("input {name:?} was not given"))?;
            ordered.push(to_tract(t)?);
        }
        let signature: Vec<(DatumType, Vec<usize>)> =
            ordered.iter().map(|t| (t.datum_type(), t.shape().to_vec())).collect();
        if !self.plans.contains_key(&signature) {
            let mut model = self.model.clone();
            for (i, (dt, shape)) in signature.iter().enumerate() {
                model
                    .set_input_fact(i, InferenceFact::dt_shape(*dt, shape.as_slice()))
                    .map_err(|e| anyhow!("tract: input {:?}: {e}", self.inputs[i]))?;
            }
            // What tract cannot type or optimise, it has no implementation for.
            let plan = model.into_optimized().and_then(|m| m.into_runnable()).map_err(|e| Unsupported {
                engine: self.engine.clone(),
                reason: format!("cannot prepare the model: {}", error_chain(&e)),
            })?;
            self.plans.insert(signature.clone(), plan);
        }
        let plan = &self.plans[&signature];
        let values: tract_onnx::prelude::TVec<TValue> = ordered.into_iter().map(TValue::from).collect();
        let results = plan.run(values).map_err(|e| anyhow!("tract run failed: {}", error_chain(&e)))?;
        results.into_iter().map(|t| from_tract(t.into_tensor())).collect()
    }
}

fn to_tract(tensor: &Tensor) -> Result<TractTensor> {
    Ok(match tensor {
        Tensor::F32(a) => a.clone().into(),
        Tensor::F16(a) => a.clone().into(),
        Tensor::F64(a) => a.clone().into(),
        Tensor::I64(a) => a.clone().into(),
        Tensor::I32(a) => a.clone().into(),
        Tensor::I8(a) => a.clone().into(),
        Tensor::U8(a) => a.clone().into(),
        Tensor::Bool(a) => a.clone().into(),
        Tensor::BF16(_) => {
            return Err(
                Unsupported { engine: "tract".into(), reason: "it has no bf16 tensors".into() }.into()
            );
        }
    })
}

fn from_tract(tensor: TractTensor) -> Result<Tensor> {
    let e = |e: anyhow::Error| anyhow!("{e}");
    Ok(match tensor.datum_type() {
        DatumType::F32 => Tensor::F32(tensor.into_plain_array().map_err(e)?),
        DatumType::F16 => Tensor::F16(tensor.into_plain_array().map_err(e)?),
        DatumType::F64 => Tensor::F64(tensor.into_plain_array().map_err(e)?),
        DatumType::I64 => Tensor::I64(tensor.into_plain_array().map_err(e)?),
        DatumType::I32 => Tensor::I32(tensor.into_plain_array().map_err(e)?),
        DatumType::I8 => Tensor::I8(tensor.into_plain_array().map_err(e)?),
        DatumType::U8 => Tensor::U8(tensor.into_plain_array().map_err(e)?),
        DatumType::Bool => Tensor::Bool(tensor.into_plain_array().map_err(e)?),
        other => bail!("tract returned a {other:?} tensor"),
    })
}
