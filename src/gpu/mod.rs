//! The thin gpu layer: every `unsafe` Vulkan call lives here. It turns decisions into Vulkan
//! calls and reports numbers back; it decides nothing that policy could decide.

pub mod adapter;
pub mod atlas;
pub mod budget;
pub mod compute;
pub mod context;
pub mod cull;
pub mod debug;
pub mod draw;
pub mod frame;
pub mod instance;
pub mod memory;
pub mod pyramid;
pub mod requirements;
pub mod scan;
pub mod shaders;
pub mod shadow;
pub mod timeline;
pub(crate) mod upload;
