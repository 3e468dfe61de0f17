// The per-instance record, defined once. build.rs appends every file of shaders/common/ to each
// shader (after its own lines, so error line numbers stay true) and emits this struct's size and
// member offsets as Rust constants that src/world/instance.rs checks at compile time.
// Kept to 32 bytes: the cull pass streams it for every instance every frame.
struct Instance {
    position: vec3<f32>,
    // Uniform scale (1 = the species' authored size).
    scale: f32,
    // Rotation about +Y, radians.
    yaw: f32,
    // Species in the low 16 bits, variant in the high 16.
    species_variant: u32,
    // RGBA8 tint, R in the low byte.
    tint: u32,
    // Slot of the patch (its atlas region and tile) in the patch table.
    patch_slot: u32,
}
