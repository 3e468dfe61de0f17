//! What to enable before creating a device: a host engine asks for the capabilities it wants
//! and gets the API version, extensions, features and queue flags they need, then checks its
//! physical device against them. [`Context::from_raw`](crate::gpu::context::Context::from_raw)
//! checks the same list and names what is missing; each pass checks it again when built.
//!
//! ```no_run
//! use understory::gpu::requirements::{Capabilities, DeviceRequirements};
//! # fn f(instance: &ash::Instance, pd: ash::vk::PhysicalDevice) -> understory::Result<()> {
//! let req = DeviceRequirements::for_capabilities(Capabilities::ALL);
//! // SAFETY: pd comes from the live instance.
//! let missing = unsafe { req.unsupported_by(instance, pd) }?; // empty: this device will do
//! assert!(missing.is_empty(), "{missing:?}");
//! // SAFETY: as above.
//! let adapter = unsafe { understory::gpu::adapter::Adapter::query(instance, 0, pd) }?;
//! let plan = req.plan(&adapter);
//! let mut names: Vec<*const std::ffi::c_char> = Vec::new(); // the engine's own, then ours:
//! names.extend(plan.extensions.iter().map(|n| n.as_ptr()));
//! // ... `plan.features.enable(&mut core, &mut v12, &mut v13)` on the feature structs the
//! // engine chains into its VkDeviceCreateInfo, and `plan.enabled` in `HostHandles::enabled`.
//! # Ok(()) }
//! ```

use std::ffi::CStr;

use ash::vk;

use crate::error::Result;
use crate::gpu::adapter::{Adapter, DeviceFeatures};

/// What understory is asked to do on a device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Heap budgets and budget-aware sub-allocation (always needed: the context itself).
    pub budget: bool,
    /// The vegetation facade's uploads and its atlas pages (mip chains are generated with blits
    /// on a graphics queue; on a compute-only queue pages have one mip level).
    pub atlas: bool,
    /// The GPU cull pass ([`CullPass`](crate::gpu::cull::CullPass)) and compute pipelines.
    pub cull: bool,
    /// The draw pass ([`DrawPass`](crate::gpu::draw::DrawPass)): indexed indirect draws in the
    /// host's dynamic-rendering scope.
    pub draw: bool,
}

impl Capabilities {
    /// Everything understory does.
    pub const ALL: Capabilities = Capabilities {
        budget: true,
        atlas: true,
        cull: true,
        draw: true,
    };

    /// Only budgets and sub-allocation.
    pub const BUDGET: Capabilities = Capabilities {
        budget: true,
        atlas: false,
        cull: false,
        draw: false,
    };
}

/// Core and Vulkan 1.2/1.3 features understory enables (extension features are in
/// [`DeviceFeatures`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoreFeatures {
    /// Vulkan 1.2 `timelineSemaphore`: the frame clock (always required).
    pub timeline_semaphore: bool,
    /// `shaderStorageBufferArrayDynamicIndexing`: the cull pass's array of instance buffers.
    pub shader_storage_buffer_array_dynamic_indexing: bool,
    /// Vulkan 1.3 `dynamicRendering`: the draw pass.
    pub dynamic_rendering: bool,
}

impl CoreFeatures {
    /// Sets these features to `VK_TRUE` in the host's feature structs (never clears one the
    /// host set). Chain `v12` (and `v13`, for the draw pass) into `VkDeviceCreateInfo`.
    pub fn enable(
        &self,
        core: &mut vk::PhysicalDeviceFeatures,
        v12: &mut vk::PhysicalDeviceVulkan12Features<'_>,
        v13: &mut vk::PhysicalDeviceVulkan13Features<'_>,
    ) {
        if self.timeline_semaphore {
            v12.timeline_semaphore = vk::TRUE;
        }
        if self.shader_storage_buffer_array_dynamic_indexing {
            core.shader_storage_buffer_array_dynamic_indexing = vk::TRUE;
        }
        if self.dynamic_rendering {
            v13.dynamic_rendering = vk::TRUE;
        }
    }
}

/// What to enable on one device ([`DeviceRequirements::plan`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicePlan {
    /// Device extensions to enable.
    pub extensions: Vec<&'static CStr>,
    /// Core features to enable ([`CoreFeatures::enable`]).
    pub features: CoreFeatures,
    /// The same, as `HostHandles::enabled` wants it.
    pub enabled: DeviceFeatures,
}

/// What a set of [`Capabilities`] needs of the instance, the device and the queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceRequirements {
    /// The capabilities asked for.
    pub capabilities: Capabilities,
    /// Lowest `apiVersion` of the instance and the device.
    pub api_version: u32,
    /// Device extensions that must be enabled.
    pub extensions: Vec<&'static CStr>,
    /// Device extensions understory uses when enabled (real budgets, memory priority, paging);
    /// enable each one the device supports. `VK_EXT_memory_priority` and
    /// `VK_EXT_pageable_device_local_memory` need their features (`memoryPriority`,
    /// `pageableDeviceLocalMemory`) enabled too.
    pub optional_extensions: Vec<&'static CStr>,
    /// Core features that must be enabled.
    pub features: CoreFeatures,
    /// Core features understory uses when enabled (faster paths); enable each the device
    /// supports: `shaderStorageBufferArrayDynamicIndexing` lets the cull pass read up to
    /// [`WIDE_SOURCES_PER_DISPATCH`](crate::gpu::cull::WIDE_SOURCES_PER_DISPATCH) instance
    /// buffers per dispatch (or [`SOURCES_PER_DISPATCH`](crate::gpu::cull::SOURCES_PER_DISPATCH)
    /// where the device has fewer storage-buffer bindings) instead of one.
    pub optional_features: CoreFeatures,
    /// Flags the queue handed to understory must have.
    pub queue_flags: vk::QueueFlags,
    /// The same as a [`DeviceFeatures`], for comparing with what a host enabled.
    pub device_features: DeviceFeatures,
}

impl DeviceRequirements {
    /// The requirements of `capabilities` (the budget is always included).
    pub fn for_capabilities(capabilities: Capabilities) -> Self {
        let c = Capabilities {
            budget: true,
            ..capabilities
        };
        let mut queue_flags = vk::QueueFlags::empty();
        if c.cull {
            queue_flags |= vk::QueueFlags::COMPUTE;
        }
        if c.draw {
            queue_flags |= vk::QueueFlags::GRAPHICS;
        }
        if queue_flags.is_empty() {
            // Uploads and one-shot work need a queue that takes copies; compute or graphics
            // queues always do.
            queue_flags = vk::QueueFlags::COMPUTE;
        }
        let device_features = DeviceFeatures {
            dynamic_rendering: c.draw,
            ..Default::default()
        };
        let features = CoreFeatures {
            timeline_semaphore: true,
            dynamic_rendering: c.draw,
            ..Default::default()
        };
        let optional_features = CoreFeatures {
            shader_storage_buffer_array_dynamic_indexing: c.cull,
            ..Default::default()
        };
        Self {
            capabilities: c,
            api_version: if c.draw {
                vk::API_VERSION_1_3
            } else {
                vk::API_VERSION_1_2
            },
            extensions: device_features.extension_names(),
            optional_extensions: vec![
                ash::ext::memory_budget::NAME,
                ash::ext::memory_priority::NAME,
                ash::ext::pageable_device_local_memory::NAME,
            ],
            features,
            optional_features,
            queue_flags,
            device_features,
        }
    }

    /// What to enable on `adapter`: the required extensions and features, and each optional
    /// one it supports that needs no extra feature struct (`VK_EXT_memory_budget`, the
    /// storage-buffer array indexing). `memoryPriority` and `pageableDeviceLocalMemory` are
    /// left to hosts that chain their feature structs.
    pub fn plan(&self, adapter: &Adapter) -> DevicePlan {
        let s = &adapter.supported;
        let enabled = DeviceFeatures {
            memory_budget: s.memory_budget,
            storage_buffer_array_dynamic_indexing: self
                .optional_features
                .shader_storage_buffer_array_dynamic_indexing
                && s.storage_buffer_array_dynamic_indexing,
            ..self.device_features
        };
        let features = CoreFeatures {
            shader_storage_buffer_array_dynamic_indexing: enabled
                .storage_buffer_array_dynamic_indexing,
            ..self.features
        };
        DevicePlan {
            extensions: enabled.extension_names(),
            features,
            enabled,
        }
    }

    /// Everything `adapter` lacks for these requirements, by Vulkan name (empty: it will do).
    /// `queue_family` is the family the host means to hand over (`None`: any family).
    pub fn unsupported_by_adapter(
        &self,
        adapter: &Adapter,
        queue_family: Option<u32>,
    ) -> Vec<String> {
        let mut missing = Vec::new();
        if adapter.api_version < self.api_version {
            missing.push(format!(
                "Vulkan {} (the device has {})",
                crate::gpu::adapter::format_version(self.api_version),
                crate::gpu::adapter::format_version(adapter.api_version)
            ));
        }
        if !adapter.timeline_semaphore {
            missing.push("timelineSemaphore".into());
        }
        missing.extend(
            self.device_features
                .missing_from(&adapter.supported)
                .into_iter()
                .map(String::from),
        );
        let family_ok = |flags: vk::QueueFlags| flags.contains(self.queue_flags);
        let queue_ok = match queue_family {
            Some(f) => adapter
                .queue_families
                .get(f as usize)
                .is_some_and(|flags| family_ok(*flags)),
            None => adapter.queue_families.iter().any(|flags| family_ok(*flags)),
        };
        if !queue_ok {
            missing.push(format!("a queue family with {:?}", self.queue_flags));
        }
        missing
    }

    /// As [`DeviceRequirements::unsupported_by_adapter`], querying `physical_device` first.
    ///
    /// # Safety
    /// `physical_device` must come from `instance`, which must be live and at Vulkan 1.1 or
    /// later.
    pub unsafe fn unsupported_by(
        &self,
        instance: &ash::Instance,
        physical_device: vk::PhysicalDevice,
    ) -> Result<Vec<String>> {
        // SAFETY: forwarded contract.
        let adapter = unsafe { Adapter::query(instance, 0, physical_device) }?;
        Ok(self.unsupported_by_adapter(&adapter, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_capability_adds_what_it_needs() {
        let b = DeviceRequirements::for_capabilities(Capabilities::BUDGET);
        assert!(b.extensions.is_empty());
        assert!(!b.features.shader_storage_buffer_array_dynamic_indexing);
        assert!(b.features.timeline_semaphore);
        assert_eq!(b.api_version, vk::API_VERSION_1_2);
        let all = DeviceRequirements::for_capabilities(Capabilities::ALL);
        assert_eq!(all.api_version, vk::API_VERSION_1_3);
        assert!(all.extensions.is_empty(), "no device extension is required");
        assert!(all.features.dynamic_rendering);
        assert!(
            !all.features.shader_storage_buffer_array_dynamic_indexing,
            "optional"
        );
        assert!(
            all.optional_features
                .shader_storage_buffer_array_dynamic_indexing
        );
        assert!(
            all.queue_flags
                .contains(vk::QueueFlags::GRAPHICS | vk::QueueFlags::COMPUTE)
        );
    }

    #[test]
    fn enable_sets_and_never_clears() {
        let all = DeviceRequirements::for_capabilities(Capabilities::ALL);
        let mut core = vk::PhysicalDeviceFeatures {
            sampler_anisotropy: vk::TRUE,
            ..Default::default()
        };
        let mut v12 = vk::PhysicalDeviceVulkan12Features::default();
        let mut v13 = vk::PhysicalDeviceVulkan13Features::default();
        let with_optional = CoreFeatures {
            shader_storage_buffer_array_dynamic_indexing: true,
            ..all.features
        };
        with_optional.enable(&mut core, &mut v12, &mut v13);
        assert_eq!(core.sampler_anisotropy, vk::TRUE);
        assert_eq!(core.shader_storage_buffer_array_dynamic_indexing, vk::TRUE);
        assert_eq!(v12.timeline_semaphore, vk::TRUE);
        assert_eq!(v13.dynamic_rendering, vk::TRUE);
    }
}
