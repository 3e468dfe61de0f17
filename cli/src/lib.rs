//! The `understory` command line, as a library so its tests can drive each command: `budget`
//! (the real VRAM budget of every heap), `demo` (a forest flown over, culled and drawn on the
//! GPU) and `soak` (a long session of churn and budget squeezes). It uses only understory's
//! public API, as any host engine would.

#![warn(missing_docs, unsafe_op_in_unsafe_fn)]

pub mod demo;
pub mod pressure;
pub mod report;
mod rng;
pub mod soak;
