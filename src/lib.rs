//! # understory
//!
//! A budget-aware Vulkan backend for huge fields of instanced vegetation. It links into an
//! engine's renderer (or creates its own device), reports the real VRAM budget of every heap
//! (`VK_EXT_memory_budget`, or a labelled estimate), and keeps vegetation memory inside it.
//!
//! ```no_run
//! use understory::gpu::context::Context;
//!
//! # fn main() -> understory::Result<()> {
//! let ctx = Context::from_env()?; // honours UNDERSTORY_VALIDATION / UNDERSTORY_DEVICE
//! let mut heaps = ctx.heap_budgets();
//! for heap in heaps.refresh(&[])? {
//!     println!("heap {}: {} of {} bytes ({})", heap.index, heap.usage, heap.budget, heap.source);
//! }
//! # Ok(()) }
//! ```
//!
//! See `ARCHITECTURE.md` in the project docs for the layers and the frame flow.

#![warn(missing_docs, unsafe_op_in_unsafe_fn)]

pub mod error;
pub mod gpu;
pub mod policy;
pub mod vegetation;
pub mod world;

pub use error::{Error, Result};
