//! SPIR-V compiled from `shaders/*.wgsl` by `build.rs` and embedded in the binary.

include!(concat!(env!("OUT_DIR"), "/shaders.rs"));
