//! Element types and dense tensors: what an initializer or an engine output holds, with conversion to
//! f32/f64 arrays for the numerics.

use anyhow::{Result, bail, ensure};
use half::{bf16, f16};
use ndarray::{ArrayD, IxDyn};

/// The largest tensor this tool creates itself (KV caches, inputs): 64 GiB.
const MAX_TENSOR_BYTES: usize = 1 << 36;

/// An ONNX element type (`TensorProto.DataType`), with the types this tool computes in named.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I8,
    U8,
    Bool,
    /// Any other ONNX element type, by its code (strings, float8, int4, complex, ...).
    Other(i32),
}

impl DType {
    pub fn from_onnx(code: i32) -> DType {
        match code {
            1 => DType::F32,
            2 => DType::U8,
            3 => DType::I8,
            6 => DType::I32,
            7 => DType::I64,
            9 => DType::Bool,
            10 => DType::F16,
            11 => DType::F64,
            16 => DType::BF16,
            other => DType::Other(other),
        }
    }

    pub fn onnx_code(self) -> i32 {
        match self {
            DType::F32 => 1,
            DType::U8 => 2,
            DType::I8 => 3,
            DType::I32 => 6,
            DType::I64 => 7,
            DType::Bool => 9,
            DType::F16 => 10,
            DType::F64 => 11,
            DType::BF16 => 16,
            DType::Other(code) => code,
        }
    }

    /// Bytes per element, where elements are whole bytes.
    pub fn size(self) -> Option<usize> {
        match self {
            DType::F64 | DType::I64 => Some(8),
            DType::F32 | DType::I32 => Some(4),
            DType::F16 | DType::BF16 => Some(2),
            DType::I8 | DType::U8 | DType::Bool => Some(1),
            DType::Other(_) => None,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
    }

    /// Whether every value of `self` is exactly a value of `to`: a Cast from `self` to `to`
    /// changes the type, not the value.
    pub fn widens_to(self, to: DType) -> bool {
        use DType::*;
        self == to || matches!((self, to), (F16 | BF16, F32 | F64) | (F32, F64))
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DType::F32 => f.write_str("f32"),
            DType::F16 => f.write_str("f16"),
            DType::BF16 => f.write_str("bf16"),
            DType::F64 => f.write_str("f64"),
            DType::I64 => f.write_str("i64"),
            DType::I32 => f.write_str("i32"),
            DType::I8 => f.write_str("i8"),
            DType::U8 => f.write_str("u8"),
            DType::Bool => f.write_str("bool"),
            DType::Other(code) => write!(f, "onnx-type-{code}"),
        }
    }
}

/// A dense tensor of one of the element types the engines exchange with us.
#[derive(Clone, Debug, PartialEq)]
pub enum Tensor {
    F32(ArrayD<f32>),
    F16(ArrayD<f16>),
    BF16(ArrayD<bf16>),
    F64(ArrayD<f64>),
    I64(ArrayD<i64>),
    I32(ArrayD<i32>),
    I8(ArrayD<i8>),
    U8(ArrayD<u8>),
    Bool(ArrayD<bool>),
}

/// Applies `$body` to the array inside any variant of a `Tensor`.
macro_rules! each_variant {
    ($tensor:expr, $a:ident => $body:expr) => {
        match $tensor {
            Tensor::F32($a) => $body,
            Tensor::F16($a) => $body,
            Tensor::BF16($a) => $body,
            Tensor::F64($a) => $body,
            Tensor::I64($a) => $body,
            Tensor::I32($a) => $body,
            Tensor::I8($a) => $body,
            Tensor::U8($a) => $body,
            Tensor::Bool($a) => $body,
        }
    };
}

impl Tensor {
    pub fn dtype(&self) -> DType {
        match self {
            Tensor::F32(_) => DType::F32,
            Tensor::F16(_) => DType::F16,
            Tensor::BF16(_) => DType::BF16,
            Tensor::F64(_) => DType::F64,
            Tensor::I64(_) => DType::I64,
            Tensor::I32(_) => DType::I32,
            Tensor::I8(_) => DType::I8,
            Tensor::U8(_) => DType::U8,
            Tensor::Bool(_) => DType::Bool,
        }
    }

    pub fn shape(&self) -> &[usize] {
        each_variant!(self, a => a.shape())
    }

    pub fn len(&self) -> usize {
        each_variant!(self, a => a.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A tensor of zeros (false for bool).
    pub fn zeros(dtype: DType, shape: &[usize]) -> Result<Tensor> {
        // Refuse what cannot be allocated before trying: a damaged shape would abort the process.
        let bytes = shape
            .iter()
            .try_fold(dtype.size().unwrap_or(1), |n, &d| n.checked_mul(d))
            .filter(|&b| b <= MAX_TENSOR_BYTES);
        ensure!(
            bytes.is_some(),
            "a {dtype} tensor of shape {shape:?} is larger than {MAX_TENSOR_BYTES} bytes"
        );
        let shape = IxDyn(shape);
        Ok(match dtype {
            DType::F32 => Tensor::F32(ArrayD::zeros(shape)),
            DType::F16 => Tensor::F16(ArrayD::from_elem(shape, f16::ZERO)),
            DType::BF16 => Tensor::BF16(ArrayD::from_elem(shape, bf16::ZERO)),
            DType::F64 => Tensor::F64(ArrayD::zeros(shape)),
            DType::I64 => Tensor::I64(ArrayD::zeros(shape)),
            DType::I32 => Tensor::I32(ArrayD::zeros(shape)),
            DType::I8 => Tensor::I8(ArrayD::zeros(shape)),
            DType::U8 => Tensor::U8(ArrayD::zeros(shape)),
            DType::Bool => Tensor::Bool(ArrayD::from_elem(shape, false)),
            DType::Other(_) => bail!("cannot create a tensor of element type {dtype}"),
        })
    }

    /// Decodes little-endian element bytes (ONNX `raw_data` and external data layout).
    pub fn from_le_bytes(dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<Tensor> {
        let count: usize = shape.iter().product();
        let Some(size) = dtype.size() else {
            bail!("element type {dtype} is not supported here");
        };
        ensure!(
            bytes.len() == count * size,
            "{} bytes of data for shape {shape:?} of {dtype} (expected {})",
            bytes.len(),
            count * size
        );
        fn collect<T, const N: usize>(shape: &[usize], bytes: &[u8], f: impl Fn([u8; N]) -> T) -> ArrayD<T> {
            let values = bytes.chunks_exact(N).map(|c| f(c.try_into().expect("chunk of N bytes"))).collect();
            ArrayD::from_shape_vec(IxDyn(shape), values).expect("length checked above")
        }
        Ok(match dtype {
            DType::F32 => Tensor::F32(collect(shape, bytes, f32::from_le_bytes)),
            DType::F16 => Tensor::F16(collect(shape, bytes, f16::from_le_bytes)),
            DType::BF16 => Tensor::BF16(collect(shape, bytes, bf16::from_le_bytes)),
            DType::F64 => Tensor::F64(collect(shape, bytes, f64::from_le_bytes)),
            DType::I64 => Tensor::I64(collect(shape, bytes, i64::from_le_bytes)),
            DType::I32 => Tensor::I32(collect(shape, bytes, i32::from_le_bytes)),
            DType::I8 => Tensor::I8(collect(shape, bytes, i8::from_le_bytes)),
            DType::U8 => Tensor::U8(collect(shape, bytes, u8::from_le_bytes)),
            DType::Bool => Tensor::Bool(collect(shape, bytes, |[b]: [u8; 1]| b != 0)),
            DType::Other(_) => unreachable!("sized types only"),
        })
    }

    /// The elements as little-endian bytes, row-major (ONNX `raw_data` layout).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len() * self.dtype().size().unwrap_or(1));
        match self {
            Tensor::F32(a) => a.iter().for_each(|v| out.extend(v.to_le_bytes())),
            Tensor::F16(a) => a.iter().for_each(|v| out.extend(v.to_le_bytes())),
            Tensor::BF16(a) => a.iter().for_each(|v| out.extend(v.to_le_bytes())),
            Tensor::F64(a) => a.iter().for_each(|v| out.extend(v.to_le_bytes())),
            Tensor::I64(a) => a.iter().for_each(|v| out.extend(v.to_le_bytes())),
            Tensor::I32(a) => a.iter().for_each(|v| out.extend(v.to_le_bytes())),
            Tensor::I8(a) => a.iter().for_each(|v| out.extend(v.to_le_bytes())),
            Tensor::U8(a) => out.extend(a.iter()),
            Tensor::Bool(a) => out.extend(a.iter().map(|&b| b as u8)),
        }
        out
    }

    /// The values as f32 (exact for f16/bf16; f64 and integers are rounded).
    pub fn to_f32(&self) -> Result<ArrayD<f32>> {
        Ok(match self {
            Tensor::F32(a) => a.clone(),
            Tensor::F16(a) => a.mapv(f16::to_f32),
            Tensor::BF16(a) => a.mapv(bf16::to_f32),
            Tensor::F64(a) => a.mapv(|v| v as f32),
            Tensor::I64(a) => a.mapv(|v| v as f32),
            Tensor::I32(a) => a.mapv(|v| v as f32),
            Tensor::I8(a) => a.mapv(f32::from),
            Tensor::U8(a) => a.mapv(f32::from),
            Tensor::Bool(_) => bail!("a bool tensor has no numeric value"),
        })
    }

    /// The values as f64 (exact for every float type and for integers up to 2^53).
    pub fn to_f64(&self) -> Result<ArrayD<f64>> {
        Ok(match self {
            Tensor::F32(a) => a.mapv(f64::from),
            Tensor::F16(a) => a.mapv(f16::to_f64),
            Tensor::BF16(a) => a.mapv(bf16::to_f64),
            Tensor::F64(a) => a.clone(),
            Tensor::I64(a) => a.mapv(|v| v as f64),
            Tensor::I32(a) => a.mapv(f64::from),
            Tensor::I8(a) => a.mapv(f64::from),
            Tensor::U8(a) => a.mapv(f64::from),
            Tensor::Bool(_) => bail!("a bool tensor has no numeric value"),
        })
    }

    /// Converts an f32 array to a float tensor of `dtype` (round to nearest for f16/bf16).
    pub fn from_f32(dtype: DType, values: ArrayD<f32>) -> Result<Tensor> {
        Ok(match dtype {
            DType::F32 => Tensor::F32(values),
            DType::F16 => Tensor::F16(values.mapv(f16::from_f32)),
            DType::BF16 => Tensor::BF16(values.mapv(bf16::from_f32)),
            DType::F64 => Tensor::F64(values.mapv(f64::from)),
            other => bail!("{other} is not a float type"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_bytes_decode_to_known_values() {
        // 1.0 = 0x3C00 in f16 and 0x3F80 in bf16; -2.0 = 0xC000 (f16) and 0xC000 (bf16).
        let f16_bytes = [0x00, 0x3C, 0x00, 0xC0];
        let t = Tensor::from_le_bytes(DType::F16, &[2], &f16_bytes).unwrap();
        assert_eq!(t.to_f32().unwrap().as_slice().unwrap(), &[1.0, -2.0]);
        let bf16_bytes = [0x80, 0x3F, 0x00, 0xC0];
        let t = Tensor::from_le_bytes(DType::BF16, &[2], &bf16_bytes).unwrap();
        assert_eq!(t.to_f64().unwrap().as_slice().unwrap(), &[1.0, -2.0]);
    }

    #[test]
    fn bytes_round_trip_for_every_sized_type() {
        for dtype in [DType::F32, DType::F16, DType::BF16, DType::F64, DType::I64, DType::I32] {
            let bytes: Vec<u8> = (0..6 * dtype.size().unwrap()).map(|i| (i * 7 % 61) as u8).collect();
            let t = Tensor::from_le_bytes(dtype, &[2, 3], &bytes).unwrap();
            assert_eq!(t.shape(), &[2, 3]);
            assert_eq!(t.dtype(), dtype);
            assert_eq!(t.to_le_bytes(), bytes, "{dtype}");
        }
    }

    #[test]
    fn byte_length_mismatch_is_an_error() {
        let err = Tensor::from_le_bytes(DType::F32, &[3], &[0; 8]).unwrap_err();
        assert!(err.to_string().contains("expected 12"), "{err}");
    }

    #[test]
    fn onnx_codes_round_trip() {
        for code in 0..=25 {
            assert_eq!(DType::from_onnx(code).onnx_code(), code);
        }
    }
}
