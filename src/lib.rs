//! nbl-onnx: Neural Block Linearization for ONNX exports of decoder-only LLMs.
//!
//! The data flows through one module per stage: [`onnx`] reads models, [`blocks`] finds the
//! attention blocks, [`engine`] runs models, [`inspect`] reports what was found.

pub mod blocks;
pub mod engine;
pub mod inspect;
pub mod onnx;
