//! nbl-onnx: Neural Block Linearization for ONNX exports of decoder-only LLMs.
//!
//! The data flows through one module per stage: [`onnx`] reads models, [`blocks`] finds the
//! attention blocks, [`engine`] runs models, [`data`] turns text into token blocks, [`calibrate`]
//! measures every block into [`stats`], [`nbl`] turns statistics into bounds and linear maps, and
//! [`inspect`] and [`report`] present the results.

pub mod atomic;
pub mod bench;
pub mod blocks;
pub mod calibrate;
pub mod check;
pub mod cost;
pub mod data;
pub mod engine;
pub mod eval;
pub mod inspect;
pub mod nbl;
pub mod onnx;
pub mod progress;
pub mod report;
pub mod rewrite;
pub mod stats;
