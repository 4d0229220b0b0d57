//! nbl-onnx: Neural Block Linearization for ONNX exports of decoder-only LLMs.
//!
//! The data flows through one module per stage: [`onnx`] reads, edits ([`onnx::Patch`]) and writes
//! models; [`blocks`] finds the attention blocks; [`engine`] runs models; [`data`] turns text into
//! token blocks; [`calibrate`] measures every block into [`stats`]; [`nbl`] turns statistics into
//! bounds, linear maps and the chosen layers, [`measured`] chooses them by running the model and
//! [`sequential`] fits them stage by stage on the partly rewritten model; [`rewrite`] splices the maps in (with [`genai`] for
//! ONNX Runtime GenAI's companion files); [`check`], [`eval`] and [`bench`] validate and measure the
//! result, with [`logits`] and [`cost`]; [`inspect`] and [`report`] present what was found and done.

pub mod atomic;
pub mod bench;
pub mod blocks;
pub mod calibrate;
pub mod check;
pub mod cost;
pub mod data;
pub mod engine;
pub mod eval;
pub mod genai;
pub mod generate;
pub mod inspect;
pub mod logits;
pub mod measured;
pub mod nbl;
pub mod onnx;
pub mod progress;
pub mod quantize;
pub mod report;
pub mod rewrite;
pub mod sequential;
pub mod stats;
