//! nbl-onnx: Neural Block Linearization for ONNX exports of decoder-only LLMs.
//!
//! The data flows through one module per stage, sequenced by [`pipeline`]: [`onnx`] reads, edits
//! ([`onnx::Patch`]) and writes models; [`detect`] finds the decoder layers and their attention
//! sites; [`engine`] runs models; [`data`] turns text into token sequences; [`calibrate`]
//! measures every site into [`stats`]; [`nbl`] turns moments into bounds and linear maps;
//! [`select`] chooses the layers (by a statistic, or by running the model on [`probe`]
//! sequences); [`fit`] fits and stores their maps; [`rewrite`] splices them in (with [`genai`]
//! for ONNX Runtime GenAI's companion files); [`check`], [`eval`] and [`bench`] validate and
//! measure the result, with [`generate`], [`logits`] and [`cost`]; [`inspect`] and [`report`]
//! present what was found and done.
//!
//! Layers import downward only: `pipeline` → `select`, `fit`, `rewrite`, `check`, `eval`, `bench`,
//! `report`, `inspect` → `calibrate`, `stats`, `nbl`, `probe`, `detect`, `cost`, `generate`,
//! `logits`, `genai` → `onnx`, `engine`, `data`, `atomic`, `progress`, `invalid`. `select` never
//! imports `fit` or `rewrite`, and `rewrite` never imports `select` or `report`.

pub mod atomic;
pub mod bench;
pub mod calibrate;
pub mod card;
pub mod check;
pub mod cost;
pub mod data;
pub mod detect;
pub mod engine;
pub mod eval;
pub mod fit;
pub mod genai;
pub mod generate;
pub mod hub;
pub mod inspect;
pub mod invalid;
pub mod logits;
pub mod nbl;
pub mod onnx;
pub mod pipeline;
pub mod probe;
pub mod progress;
pub mod report;
pub mod rewrite;
pub mod select;
pub mod stats;
pub mod sweep;
pub mod unit;
