//! SPIR-V compiled from `shaders/*.wgsl` by `build.rs` and embedded in the binary.

include!(concat!(env!("OUT_DIR"), "/shaders.rs"));

/// Sizes and member offsets of the structs in `shaders/common/`, from build.rs.
pub mod layout {
    include!(concat!(env!("OUT_DIR"), "/layout.rs"));
}
