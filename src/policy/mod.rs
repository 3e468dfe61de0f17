//! Pure policy: plain numbers in, decisions out. No Vulkan types, no I/O.

pub mod category;
pub mod controller;
pub mod lod;
pub mod outputs;
pub mod residency;
pub mod retire;
