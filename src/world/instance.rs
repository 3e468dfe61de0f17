//! The per-instance record shared with the shaders (`shaders/common/instance.wgsl`).

use crate::gpu::shaders::layout;

/// One vegetation instance: 32 bytes, laid out exactly as WGSL `Instance`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Instance {
    /// World position of the base, metres.
    pub position: [f32; 3],
    /// Uniform scale.
    pub scale: f32,
    /// Rotation about +Y, radians.
    pub yaw: f32,
    /// Species (low 16 bits) and variant (high 16 bits).
    pub species_variant: u32,
    /// RGBA8 tint, R in the low byte.
    pub tint: u32,
    /// Slot of the patch in the patch table (set by understory at upload).
    pub patch_slot: u32,
}

// The layout is defined once, in WGSL; build.rs emits its offsets and these lines hold the Rust
// side to them.
const _: () = assert!(size_of::<Instance>() == 32);
const _: () = assert!(size_of::<Instance>() == layout::INSTANCE_SIZE);
const _: () = assert!(std::mem::offset_of!(Instance, position) == layout::INSTANCE_OFFSET_POSITION);
const _: () = assert!(std::mem::offset_of!(Instance, scale) == layout::INSTANCE_OFFSET_SCALE);
const _: () = assert!(std::mem::offset_of!(Instance, yaw) == layout::INSTANCE_OFFSET_YAW);
const _: () = assert!(
    std::mem::offset_of!(Instance, species_variant) == layout::INSTANCE_OFFSET_SPECIES_VARIANT
);
const _: () = assert!(std::mem::offset_of!(Instance, tint) == layout::INSTANCE_OFFSET_TINT);
const _: () =
    assert!(std::mem::offset_of!(Instance, patch_slot) == layout::INSTANCE_OFFSET_PATCH_SLOT);

impl Instance {
    /// An instance at `position` with scale 1, no rotation, white tint.
    pub fn at(position: glam::Vec3) -> Self {
        Self {
            position: position.to_array(),
            scale: 1.0,
            yaw: 0.0,
            species_variant: 0,
            tint: u32::MAX,
            patch_slot: 0,
        }
    }

    /// The position as a vector.
    pub fn pos(&self) -> glam::Vec3 {
        glam::Vec3::from_array(self.position)
    }

    /// Whether position, scale and yaw are finite and the scale positive.
    pub fn is_finite(&self) -> bool {
        self.position.iter().all(|v| v.is_finite())
            && self.scale.is_finite()
            && self.scale > 0.0
            && self.yaw.is_finite()
    }
}
