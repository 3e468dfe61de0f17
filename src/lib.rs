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
//! The README's "Using it as a library" walks through the host contract (frames, submission,
//! freeing, shutdown) with the real signatures, and `examples/host_engine.rs` is the whole flow
//! for an engine that owns its device; [`gpu::context`] states the contract in full.

#![warn(missing_docs, unsafe_op_in_unsafe_fn)]

pub mod error;
pub mod gpu;
pub mod policy;
pub mod vegetation;
pub mod world;

pub use error::{Error, Result};

/// The README's Rust examples, compiled as doctests so they keep the real signatures.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

#[cfg(test)]
mod thread_safety {
    fn send_sync<T: Send + Sync>() {}

    /// Engines move these between threads (a render thread, Bevy's render world) and share the
    /// context: each must be `Send`, and the ones used through `&` from several threads `Sync`.
    #[test]
    fn public_handles_are_send_and_sync() {
        send_sync::<crate::gpu::context::Context>();
        send_sync::<crate::gpu::context::Frame>();
        send_sync::<crate::gpu::memory::Buffer>();
        send_sync::<crate::gpu::memory::Image>();
        // A view may be read on, and dropped on, another thread than the one that mapped.
        send_sync::<crate::gpu::memory::Mapped<'static>>();
        send_sync::<crate::gpu::cull::CullPass>();
        send_sync::<crate::gpu::draw::DrawPass>();
        send_sync::<crate::gpu::compute::ComputePipeline>();
        send_sync::<crate::gpu::frame::FrameRing>();
        send_sync::<crate::vegetation::Vegetation>();
        send_sync::<crate::gpu::budget::DriverBudget>();
    }
}
