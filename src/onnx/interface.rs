//! A decoder's interface as data: how to feed each declared input for a prefill from position 0
//! (ids, attention mask, positions, an empty KV cache) and for a decode step, and what the KV cache
//! costs per token. Read once from the model's declared inputs.

use anyhow::{Context, Result, bail};
use ndarray::{Array1, Array2, ArrayD};

use super::{DType, Model, Tensor, attr_int, value_type};

/// What one graph input carries.
#[derive(Clone, Debug)]
enum Role {
    Ids,
    AttentionMask,
    PositionIds,
    CachePosition,
    /// A merged decoder's `use_cache_branch`: false for the prompt (the branch without the cache),
    /// true for decode steps.
    UseCacheBranch,
    /// A past key or value: `[batch, kv_heads, past, head_dim]`, with the batch and past axes
    /// filled in per run.
    Cache(Vec<CacheAxis>),
}

#[derive(Clone, Copy, Debug)]
enum CacheAxis {
    Batch,
    Past,
    Fixed(usize),
}

#[derive(Clone, Debug)]
struct Input {
    name: String,
    dtype: DType,
    role: Role,
}

/// The model's inputs, in declaration order, with what each carries.
#[derive(Clone, Debug)]
pub struct Interface {
    inputs: Vec<Input>,
    /// A static cache: the past inputs are buffers of a fixed capacity (at least this many tokens)
    /// that the model fills, as onnxruntime-genai feeds a `GroupQueryAttention` with a sliding
    /// window (which refuses a cache shorter than its window). `None`: the past grows step by step.
    static_cache: Option<usize>,
    /// Tokens to be decoded after the prefill, which a static cache must have room for.
    decode_room: usize,
}

impl Interface {
    /// Reads the interface of `model`. `hidden_size` (from the detected blocks) sizes KV-cache axes
    /// the model leaves symbolic, with the `num_heads` of its fused attention op. Fails naming an
    /// input it does not know how to feed.
    pub fn of(model: &Model, hidden_size: Option<usize>) -> Result<Interface> {
        let graph = model.graph();
        let initializers: std::collections::HashSet<&str> =
            graph.initializer.iter().map(|t| t.name()).collect();
        let head_size = || head_size(model, hidden_size);
        let mut inputs = Vec::new();
        // Older IRs list initializers among the inputs too; they are not fed.
        for input in graph.input.iter().filter(|v| !initializers.contains(v.name())) {
            let name = input.name();
            let (dtype, dims) =
                value_type(input).with_context(|| format!("graph input {name:?} is not a tensor"))?;
            let role = match name {
                "input_ids" => Role::Ids,
                "attention_mask" => Role::AttentionMask,
                "position_ids" => Role::PositionIds,
                "cache_position" => Role::CachePosition,
                "use_cache_branch" if dtype == DType::Bool => Role::UseCacheBranch,
                _ if dtype.is_float() && dims.len() == 4 => Role::Cache(cache_axes(name, &dims, head_size)?),
                _ => bail!(
                    "{}: don't know how to feed graph input {name:?} ({dtype}, {} dims)",
                    model.path.display(),
                    dims.len()
                ),
            };
            if !matches!(role, Role::Cache(_) | Role::UseCacheBranch) {
                ensure_integer(dtype, name)?;
            }
            inputs.push(Input { name: name.to_string(), dtype, role });
        }
        // A window of `local_window_size` tokens needs a cache at least that long, from the start.
        let static_cache = graph
            .node
            .iter()
            .filter(|n| n.op_type() == "GroupQueryAttention")
            .filter_map(|n| attr_int(n, "local_window_size"))
            .filter_map(|w| usize::try_from(w).ok())
            .filter(|&w| w > 0)
            .max();
        Ok(Interface { inputs, static_cache, decode_room: 0 })
    }

    /// The same interface, with room for `steps` decode steps after a prefill (what a static cache
    /// must hold besides the prompt).
    pub fn with_decode_room(mut self, steps: usize) -> Interface {
        self.decode_room = steps;
        self
    }

    /// Whether the model takes a KV cache.
    pub fn has_cache(&self) -> bool {
        self.inputs.iter().any(|i| matches!(i.role, Role::Cache(_)))
    }

    /// KV-cache bytes per token and batch element: the per-token size of every past input.
    pub fn kv_bytes_per_token(&self) -> u64 {
        self.inputs
            .iter()
            .filter_map(|i| match &i.role {
                Role::Cache(axes) => {
                    let per_token: usize =
                        axes.iter().map(|a| if let CacheAxis::Fixed(n) = a { *n } else { 1 }).product();
                    Some((per_token * i.dtype.size().unwrap_or(0)) as u64)
                }
                _ => None,
            })
            .sum()
    }

    /// Every input for a prefill of `ids` (`[batch, sequence]`) with nothing cached.
    pub fn prefill(&self, ids: &Array2<i64>) -> Result<Vec<(String, Tensor)>> {
        let (batch, seq) = ids.dim();
        let past = self.static_cache.map_or(0, |min| min.max(seq + self.decode_room));
        self.inputs
            .iter()
            .map(|input| {
                let tensor = match &input.role {
                    Role::Ids => integer(input.dtype, ids.clone().into_dyn()),
                    Role::AttentionMask => integer(input.dtype, Array2::<i64>::ones((batch, seq)).into_dyn()),
                    Role::PositionIds => integer(
                        input.dtype,
                        Array2::from_shape_fn((batch, seq), |(_, s)| s as i64).into_dyn(),
                    ),
                    Role::CachePosition => integer(input.dtype, Array1::from_iter(0..seq as i64).into_dyn()),
                    Role::UseCacheBranch => Tensor::Bool(ArrayD::from_elem(vec![1], false)),
                    Role::Cache(axes) => {
                        let shape: Vec<usize> = axes
                            .iter()
                            .map(|a| match a {
                                CacheAxis::Batch => batch,
                                CacheAxis::Past => past,
                                CacheAxis::Fixed(n) => *n,
                            })
                            .collect();
                        Tensor::zeros(input.dtype, &shape)?
                    }
                };
                Ok((input.name.clone(), tensor))
            })
            .collect()
    }

    /// The KV cache as (input, output) pairs: each `past_key_values.*` input with the `present.*`
    /// output that holds it after a step (see [`present_as_past`]).
    pub fn cache_pairs(&self) -> Vec<(String, String)> {
        self.inputs
            .iter()
            .filter(|i| matches!(i.role, Role::Cache(_)))
            .map(|i| {
                let rest = i.name.strip_prefix("past_key_values").unwrap_or(&i.name);
                (i.name.clone(), format!("present{rest}"))
            })
            .collect()
    }

    /// Splits the inputs of a step into the KV cache (in [`Interface::cache_pairs`] order) and
    /// the others.
    pub fn split_cache(&self, inputs: Vec<(String, Tensor)>) -> (Vec<(String, Tensor)>, Vec<Tensor>) {
        let (cache, others): (Vec<_>, Vec<_>) =
            inputs.into_iter().zip(&self.inputs).partition(|(_, input)| matches!(input.role, Role::Cache(_)));
        (others.into_iter().map(|(t, _)| t).collect(), cache.into_iter().map(|((_, t), _)| t).collect())
    }

    /// The inputs of one decode step: token `next` at position `past_len`, attending to the cache
    /// `past` (the previous step's `present.*` renamed by [`present_as_past`]), which is moved, not
    /// copied: at long contexts the cache is tens of megabytes per step.
    pub fn decode(
        &self,
        next: i64,
        mut past: Vec<(String, Tensor)>,
        past_len: usize,
    ) -> Result<Vec<(String, Tensor)>> {
        let mut others = self.decode_inputs(next, past_len).into_iter();
        self.inputs
            .iter()
            .map(|input| {
                let Role::Cache(axes) = &input.role else {
                    return Ok(others.next().expect("one tensor per input that is not the cache"));
                };
                let name = &input.name;
                let i = past
                    .iter()
                    .position(|(n, _)| n == name)
                    .with_context(|| format!("the previous step returned no {name:?}"))?;
                let cache = past.swap_remove(i).1;
                if self.static_cache.is_some() {
                    let at = axes.iter().position(|a| matches!(a, CacheAxis::Past)).unwrap_or(2);
                    let capacity = cache.shape().get(at).copied().unwrap_or(0);
                    anyhow::ensure!(
                        past_len < capacity,
                        "the static KV cache of {name:?} holds {capacity} tokens; decoding token {} needs more",
                        past_len + 1
                    );
                }
                Ok((name.clone(), cache))
            })
            .collect()
    }

    /// The inputs of one decode step but the KV cache (which a stateful session holds): token
    /// `next` at position `past_len`, in declaration order.
    pub fn decode_inputs(&self, next: i64, past_len: usize) -> Vec<(String, Tensor)> {
        let position = past_len as i64;
        self.inputs
            .iter()
            .filter_map(|input| {
                if let Role::UseCacheBranch = input.role {
                    return Some((input.name.clone(), Tensor::Bool(ArrayD::from_elem(vec![1], true))));
                }
                let values = match input.role {
                    Role::Ids => ArrayD::from_elem(vec![1, 1], next),
                    Role::AttentionMask => Array2::<i64>::ones((1, past_len + 1)).into_dyn(),
                    Role::PositionIds => ArrayD::from_elem(vec![1, 1], position),
                    Role::CachePosition => ArrayD::from_elem(vec![1], position),
                    Role::Cache(_) | Role::UseCacheBranch => return None,
                };
                Some((input.name.clone(), integer(input.dtype, values)))
            })
            .collect()
    }
}

/// A run's `present.*` outputs named as the next step's `past_key_values.*` inputs (taking them
/// out of `outputs`).
pub fn present_as_past(names: &[String], outputs: Vec<Tensor>) -> Vec<(String, Tensor)> {
    names
        .iter()
        .zip(outputs)
        .filter_map(|(n, t)| n.strip_prefix("present").map(|rest| (format!("past_key_values{rest}"), t)))
        .collect()
}

fn ensure_integer(dtype: DType, name: &str) -> Result<()> {
    if !matches!(dtype, DType::I64 | DType::I32 | DType::Bool) {
        bail!("graph input {name:?} has type {dtype}; expected an integer type");
    }
    Ok(())
}

/// `values` in the input's integer type (checked when the interface was read).
fn integer(dtype: DType, values: ArrayD<i64>) -> Tensor {
    match dtype {
        DType::I32 => Tensor::I32(values.mapv(|v| v as i32)),
        DType::Bool => Tensor::Bool(values.mapv(|v| v != 0)),
        _ => Tensor::I64(values),
    }
}

/// The axes of a past key or value. Symbolic dims are read as: the first one batch, the next the
/// past length, and any other the head size of the model's attention op.
fn cache_axes(
    name: &str,
    dims: &[Option<i64>],
    head_size: impl Fn() -> Option<usize>,
) -> Result<Vec<CacheAxis>> {
    let mut axes = Vec::with_capacity(dims.len());
    let mut symbolic_seen = 0;
    for (axis, dim) in dims.iter().enumerate() {
        axes.push(match dim {
            Some(d) if axis > 0 => CacheAxis::Fixed(
                usize::try_from(*d).with_context(|| format!("KV-cache input {name:?} has dimension {d}"))?,
            ),
            _ => {
                symbolic_seen += 1;
                match (axis, symbolic_seen) {
                    (0, _) => CacheAxis::Batch,
                    (_, 2) => CacheAxis::Past,
                    _ => CacheAxis::Fixed(head_size().with_context(|| {
                        format!("cannot tell the size of axis {axis} of KV-cache input {name:?}")
                    })?),
                }
            }
        });
    }
    Ok(axes)
}

/// The per-head size of a fused attention op: hidden size over its `num_heads` attribute.
fn head_size(model: &Model, hidden_size: Option<usize>) -> Option<usize> {
    let node = model
        .graph()
        .node
        .iter()
        .find(|n| attr_int(n, "num_heads").is_some() && n.op_type().contains("Attention"))?;
    let heads = usize::try_from(attr_int(node, "num_heads")?).ok()?;
    let hidden = hidden_size?;
    (heads > 0 && hidden.is_multiple_of(heads)).then(|| hidden / heads)
}
