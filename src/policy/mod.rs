//! Pure policy: plain numbers in, decisions out. No Vulkan types, no I/O.

pub mod category;
pub mod retire;
