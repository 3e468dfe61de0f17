//! Physical devices: what each one offers, and which one we pick.

use std::ffi::CStr;

use ash::vk;

use crate::error::{Error, Result, vk_err};

/// The kind of physical device, in the order we prefer them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceType {
    /// A discrete GPU.
    Discrete,
    /// A GPU sharing memory with the CPU.
    Integrated,
    /// A GPU in a virtual machine.
    Virtual,
    /// A CPU driver such as lavapipe.
    Cpu,
    /// Anything else.
    Other,
}

impl DeviceType {
    fn from_vk(t: vk::PhysicalDeviceType) -> Self {
        match t {
            vk::PhysicalDeviceType::DISCRETE_GPU => Self::Discrete,
            vk::PhysicalDeviceType::INTEGRATED_GPU => Self::Integrated,
            vk::PhysicalDeviceType::VIRTUAL_GPU => Self::Virtual,
            vk::PhysicalDeviceType::CPU => Self::Cpu,
            _ => Self::Other,
        }
    }
}

/// The device extensions and features understory uses: what a device supports
/// ([`Adapter::supported`]) or what is enabled on a context's device
/// ([`Context::features`](crate::gpu::context::Context::features)). Which capability needs which
/// is [`DeviceRequirements`](crate::gpu::requirements::DeviceRequirements)' business.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeviceFeatures {
    /// `VK_EXT_memory_budget`: real per-heap budget and usage (without it, a labelled estimate).
    pub memory_budget: bool,
    /// `VK_EXT_memory_priority` with its `memoryPriority` feature: per-allocation priority for
    /// the driver's paging.
    pub memory_priority: bool,
    /// `VK_EXT_pageable_device_local_memory` with its `pageableDeviceLocalMemory` feature: lets
    /// the driver page device-local memory out (needs `memory_priority`).
    pub pageable_device_local_memory: bool,
    /// Vulkan 1.3 `dynamicRendering`: the draw pass records inside the host's
    /// `vkCmdBeginRendering` scope.
    pub dynamic_rendering: bool,
    /// The core feature `shaderStorageBufferArrayDynamicIndexing`: the cull pass reads several
    /// instance buffers per dispatch through an array of storage buffers.
    pub storage_buffer_array_dynamic_indexing: bool,
}

impl DeviceFeatures {
    /// The extension names, for `ppEnabledExtensionNames`.
    pub fn extension_names(&self) -> Vec<&'static CStr> {
        let mut v = Vec::new();
        if self.memory_budget {
            v.push(ash::ext::memory_budget::NAME);
        }
        if self.memory_priority {
            v.push(ash::ext::memory_priority::NAME);
        }
        if self.pageable_device_local_memory {
            v.push(ash::ext::pageable_device_local_memory::NAME);
        }
        v
    }

    /// Each field set here and not in `other`, by its Vulkan name.
    pub fn missing_from(&self, other: &DeviceFeatures) -> Vec<&'static str> {
        let pairs = [
            (
                self.memory_budget,
                other.memory_budget,
                "VK_EXT_memory_budget",
            ),
            (
                self.memory_priority,
                other.memory_priority,
                "VK_EXT_memory_priority (memoryPriority)",
            ),
            (
                self.pageable_device_local_memory,
                other.pageable_device_local_memory,
                "VK_EXT_pageable_device_local_memory (pageableDeviceLocalMemory)",
            ),
            (
                self.dynamic_rendering,
                other.dynamic_rendering,
                "dynamicRendering (Vulkan 1.3)",
            ),
            (
                self.storage_buffer_array_dynamic_indexing,
                other.storage_buffer_array_dynamic_indexing,
                "shaderStorageBufferArrayDynamicIndexing",
            ),
        ];
        pairs
            .into_iter()
            .filter(|(want, have, _)| *want && !*have)
            .map(|(_, _, name)| name)
            .collect()
    }

    /// The fields set in both.
    pub fn intersect(&self, other: &DeviceFeatures) -> DeviceFeatures {
        DeviceFeatures {
            memory_budget: self.memory_budget && other.memory_budget,
            memory_priority: self.memory_priority && other.memory_priority,
            pageable_device_local_memory: self.pageable_device_local_memory
                && other.pageable_device_local_memory,
            dynamic_rendering: self.dynamic_rendering && other.dynamic_rendering,
            storage_buffer_array_dynamic_indexing: self.storage_buffer_array_dynamic_indexing
                && other.storage_buffer_array_dynamic_indexing,
        }
    }
}

/// The device limits understory sizes its work by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeviceLimits {
    /// `maxPerStageDescriptorStorageBuffers` (at least 4): bounds how many instance buffers
    /// one cull dispatch reads.
    pub max_per_stage_storage_buffers: u32,
    /// `maxPerStageResources`.
    pub max_per_stage_resources: u32,
    /// `maxDescriptorSetStorageBuffers`.
    pub max_descriptor_set_storage_buffers: u32,
    /// `maxStorageBufferRange` (at least 128 MiB): the most bytes one storage binding covers.
    pub max_storage_buffer_range: u32,
    /// `maxComputeWorkGroupCount`.
    pub max_compute_work_group_count: [u32; 3],
}

/// One memory heap as the physical device describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HeapInfo {
    /// Heap size in bytes.
    pub size: u64,
    /// `VK_MEMORY_HEAP_DEVICE_LOCAL_BIT`.
    pub device_local: bool,
}

/// What a physical device is and offers, read once at enumeration.
#[derive(Clone, Debug)]
pub struct Adapter {
    /// Position in `vkEnumeratePhysicalDevices` order (what `UNDERSTORY_DEVICE=<index>` means).
    pub index: usize,
    /// The handle.
    pub handle: vk::PhysicalDevice,
    /// `deviceName`.
    pub name: String,
    /// Discrete, integrated, virtual, CPU.
    pub device_type: DeviceType,
    /// Highest Vulkan version the device supports (`VK_MAKE_API_VERSION` encoded).
    pub api_version: u32,
    /// Driver name and version, e.g. `NVIDIA 580.95.05` or `llvmpipe Mesa 22.3.6`.
    pub driver: String,
    /// PCI vendor id.
    pub vendor_id: u32,
    /// PCI device id.
    pub device_id: u32,
    /// Which of understory's extensions and features it supports.
    pub supported: DeviceFeatures,
    /// The limits understory sizes its work by.
    pub limits: DeviceLimits,
    /// `timelineSemaphore` feature (required).
    pub timeline_semaphore: bool,
    /// `memoryPriority` feature of `VK_EXT_memory_priority`.
    pub memory_priority_feature: bool,
    /// `pageableDeviceLocalMemory` feature.
    pub pageable_feature: bool,
    /// The queue family we would use: graphics+compute if any, else compute-only.
    pub queue_family: Option<u32>,
    /// Flags of every queue family, by index.
    pub queue_families: Vec<vk::QueueFlags>,
    /// Memory heaps.
    pub heaps: Vec<HeapInfo>,
    /// `timestampPeriod` in nanoseconds per tick.
    pub timestamp_period_ns: f32,
    /// Subgroup vote, ballot, arithmetic and shuffle operations are supported in compute
    /// shaders (what [`Compaction::Subgroup`](crate::gpu::cull::Compaction::Subgroup) uses; the
    /// name is older than the vote and shuffle it now also needs).
    pub subgroup_ballot_arithmetic_in_compute: bool,
    /// Subgroup size.
    pub subgroup_size: u32,
}

impl Adapter {
    /// Why this device cannot run understory, or `None` if it can.
    pub fn unsuitable_because(&self) -> Option<String> {
        if self.api_version < vk::API_VERSION_1_2 {
            return Some(format!("Vulkan {} < 1.2", format_version(self.api_version)));
        }
        if !self.timeline_semaphore {
            return Some("no timelineSemaphore feature".into());
        }
        if self.queue_family.is_none() {
            return Some("no compute queue family".into());
        }
        None
    }

    /// Reads everything about `handle` (`index` is only recorded).
    ///
    /// # Safety
    /// `handle` must come from `instance`, which must be live and at Vulkan >= 1.1.
    pub unsafe fn query(
        instance: &ash::Instance,
        index: usize,
        handle: vk::PhysicalDevice,
    ) -> Result<Self> {
        // SAFETY: handle belongs to instance (caller).
        let props = unsafe { instance.get_physical_device_properties(handle) };
        let name = props
            .device_name_as_c_str()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "<unnamed>".into());
        // SAFETY: as above.
        let exts = unsafe { instance.enumerate_device_extension_properties(handle) }
            .map_err(vk_err("vkEnumerateDeviceExtensionProperties"))?;
        let has = |n: &CStr| exts.iter().any(|e| e.extension_name_as_c_str() == Ok(n));
        let extensions = DeviceFeatures {
            memory_budget: has(ash::ext::memory_budget::NAME),
            memory_priority: has(ash::ext::memory_priority::NAME),
            pageable_device_local_memory: has(ash::ext::pageable_device_local_memory::NAME)
                && has(ash::ext::memory_priority::NAME),
            dynamic_rendering: false,
            storage_buffer_array_dynamic_indexing: false,
        };

        let mut timeline = false;
        let mut priority = false;
        let mut pageable = false;
        let mut driver = format!("driver {:#x}", props.driver_version);
        let mut subgroup_size = 0;
        let mut subgroup_ballot = false;
        let mut extensions = extensions;
        if props.api_version >= vk::API_VERSION_1_2 {
            let mut v12 = vk::PhysicalDeviceVulkan12Features::default();
            let mut v13 = vk::PhysicalDeviceVulkan13Features::default();
            let mut prio = vk::PhysicalDeviceMemoryPriorityFeaturesEXT::default();
            let mut page = vk::PhysicalDevicePageableDeviceLocalMemoryFeaturesEXT::default();
            let mut f2 = vk::PhysicalDeviceFeatures2::default().push_next(&mut v12);
            if extensions.memory_priority {
                f2 = f2.push_next(&mut prio);
            }
            if extensions.pageable_device_local_memory {
                f2 = f2.push_next(&mut page);
            }
            if props.api_version >= vk::API_VERSION_1_3 {
                f2 = f2.push_next(&mut v13);
            }
            // SAFETY: the chained structs belong to extensions the device supports or to its
            // core version (physical-device-level functionality of a supported extension may be
            // queried).
            unsafe { instance.get_physical_device_features2(handle, &mut f2) };
            let core = f2.features;
            extensions.storage_buffer_array_dynamic_indexing =
                core.shader_storage_buffer_array_dynamic_indexing == vk::TRUE;
            extensions.dynamic_rendering = v13.dynamic_rendering == vk::TRUE;
            timeline = v12.timeline_semaphore == vk::TRUE;
            priority = prio.memory_priority == vk::TRUE;
            pageable = page.pageable_device_local_memory == vk::TRUE;

            let mut drv = vk::PhysicalDeviceDriverProperties::default();
            let mut sg = vk::PhysicalDeviceSubgroupProperties::default();
            let mut p2 = vk::PhysicalDeviceProperties2::default()
                .push_next(&mut drv)
                .push_next(&mut sg);
            // SAFETY: VkPhysicalDeviceDriverProperties and the subgroup properties are core in
            // 1.2.
            unsafe { instance.get_physical_device_properties2(handle, &mut p2) };
            let dname = drv.driver_name_as_c_str().map(|s| s.to_string_lossy());
            let dinfo = drv.driver_info_as_c_str().map(|s| s.to_string_lossy());
            if let (Ok(n), Ok(i)) = (dname, dinfo) {
                driver = format!("{n} {i}").trim().to_string();
            }
            subgroup_size = sg.subgroup_size;
            subgroup_ballot = sg.supported_stages.contains(vk::ShaderStageFlags::COMPUTE)
                && sg.supported_operations.contains(
                    vk::SubgroupFeatureFlags::VOTE
                        | vk::SubgroupFeatureFlags::BALLOT
                        | vk::SubgroupFeatureFlags::ARITHMETIC
                        | vk::SubgroupFeatureFlags::SHUFFLE,
                )
                && (1..=128).contains(&sg.subgroup_size);
        }

        // SAFETY: as above.
        let families = unsafe { instance.get_physical_device_queue_family_properties(handle) };
        let queue_family = pick_queue_family(&families);
        let queue_families = families.iter().map(|f| f.queue_flags).collect();
        // SAFETY: as above.
        let mem = unsafe { instance.get_physical_device_memory_properties(handle) };
        let heaps = mem
            .memory_heaps_as_slice()
            .iter()
            .map(|h| HeapInfo {
                size: h.size,
                device_local: h.flags.contains(vk::MemoryHeapFlags::DEVICE_LOCAL),
            })
            .collect();
        Ok(Self {
            index,
            handle,
            name,
            device_type: DeviceType::from_vk(props.device_type),
            api_version: props.api_version,
            driver,
            vendor_id: props.vendor_id,
            device_id: props.device_id,
            supported: extensions,
            limits: DeviceLimits {
                max_per_stage_storage_buffers: props
                    .limits
                    .max_per_stage_descriptor_storage_buffers,
                max_per_stage_resources: props.limits.max_per_stage_resources,
                max_descriptor_set_storage_buffers: props.limits.max_descriptor_set_storage_buffers,
                max_storage_buffer_range: props.limits.max_storage_buffer_range,
                max_compute_work_group_count: props.limits.max_compute_work_group_count,
            },
            timeline_semaphore: timeline,
            memory_priority_feature: priority,
            pageable_feature: pageable,
            queue_family,
            queue_families,
            heaps,
            timestamp_period_ns: props.limits.timestamp_period,
            subgroup_ballot_arithmetic_in_compute: subgroup_ballot,
            subgroup_size,
        })
    }
}

/// Graphics+compute family if there is one (hosts draw and cull on one queue), else compute-only.
pub(crate) fn pick_queue_family(families: &[vk::QueueFamilyProperties]) -> Option<u32> {
    let gc = vk::QueueFlags::GRAPHICS | vk::QueueFlags::COMPUTE;
    let usable = |f: &vk::QueueFamilyProperties| f.queue_count > 0;
    families
        .iter()
        .position(|f| usable(f) && f.queue_flags.contains(gc))
        .or_else(|| {
            families
                .iter()
                .position(|f| usable(f) && f.queue_flags.contains(vk::QueueFlags::COMPUTE))
        })
        .map(|i| i as u32)
}

/// `VK_MAKE_API_VERSION` decoded as `major.minor.patch`.
pub fn format_version(v: u32) -> String {
    format!(
        "{}.{}.{}",
        vk::api_version_major(v),
        vk::api_version_minor(v),
        vk::api_version_patch(v)
    )
}

/// Which device to use: `UNDERSTORY_DEVICE=<index>` or `=<name substring>` (case-insensitive).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSelector {
    /// Position in enumeration order.
    Index(usize),
    /// Case-insensitive substring of the device name.
    Name(String),
}

impl DeviceSelector {
    /// Parses `"1"` as an index and anything else as a name substring. Empty input is an error.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() {
            return Err(Error::InvalidInput("empty device selector".into()));
        }
        Ok(match s.parse::<usize>() {
            Ok(i) => Self::Index(i),
            Err(_) => Self::Name(s.to_lowercase()),
        })
    }

    fn matches(&self, a: &Adapter) -> bool {
        match self {
            Self::Index(i) => a.index == *i,
            Self::Name(n) => a.name.to_lowercase().contains(n.as_str()),
        }
    }
}

/// Picks the adapter to use: the selector's match if given (it must be suitable), else the best
/// suitable one by type (discrete > integrated > virtual > CPU), first in order on ties.
pub fn select(adapters: &[Adapter], selector: Option<&DeviceSelector>) -> Result<usize> {
    let listing = || {
        adapters
            .iter()
            .map(|a| {
                format!(
                    "#{} {} ({:?}{})",
                    a.index,
                    a.name,
                    a.device_type,
                    a.unsuitable_because()
                        .map(|r| format!(", unsuitable: {r}"))
                        .unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    if adapters.is_empty() {
        return Err(Error::NoDevice {
            detail: "the Vulkan loader reports 0 physical devices".into(),
        });
    }
    if let Some(sel) = selector {
        let Some(pos) = adapters.iter().position(|a| sel.matches(a)) else {
            return Err(Error::InvalidInput(format!(
                "no device matches {sel:?}; available: {}",
                listing()
            )));
        };
        if let Some(why) = adapters[pos].unsuitable_because() {
            return Err(Error::Unsupported(format!(
                "selected device {} {}: {why}",
                adapters[pos].index, adapters[pos].name
            )));
        }
        return Ok(pos);
    }
    adapters
        .iter()
        .enumerate()
        .filter(|(_, a)| a.unsuitable_because().is_none())
        .min_by_key(|(i, a)| (a.device_type, *i))
        .map(|(i, _)| i)
        .ok_or_else(|| Error::NoDevice {
            detail: format!("no device is suitable: {}", listing()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(index: usize, name: &str, t: DeviceType) -> Adapter {
        Adapter {
            index,
            handle: vk::PhysicalDevice::null(),
            name: name.into(),
            device_type: t,
            api_version: vk::API_VERSION_1_3,
            driver: String::new(),
            vendor_id: 0,
            device_id: 0,
            supported: DeviceFeatures::default(),
            limits: DeviceLimits::default(),
            timeline_semaphore: true,
            memory_priority_feature: false,
            pageable_feature: false,
            queue_family: Some(0),
            queue_families: vec![vk::QueueFlags::COMPUTE],
            heaps: vec![],
            timestamp_period_ns: 1.0,
            subgroup_ballot_arithmetic_in_compute: false,
            subgroup_size: 0,
        }
    }

    #[test]
    fn prefers_discrete_then_integrated_then_virtual_then_cpu() {
        let list = vec![
            adapter(0, "llvmpipe", DeviceType::Cpu),
            adapter(1, "virgl", DeviceType::Virtual),
            adapter(2, "Intel UHD", DeviceType::Integrated),
            adapter(3, "NVIDIA H200", DeviceType::Discrete),
        ];
        assert_eq!(select(&list, None).unwrap(), 3);
        assert_eq!(select(&list[..3], None).unwrap(), 2);
        assert_eq!(select(&list[..2], None).unwrap(), 1);
        assert_eq!(select(&list[..1], None).unwrap(), 0);
    }

    #[test]
    fn skips_unsuitable_devices() {
        let mut old = adapter(0, "old GPU", DeviceType::Discrete);
        old.api_version = vk::API_VERSION_1_1;
        let mut no_tl = adapter(1, "no timeline", DeviceType::Discrete);
        no_tl.timeline_semaphore = false;
        let cpu = adapter(2, "llvmpipe", DeviceType::Cpu);
        assert_eq!(select(&[old.clone(), no_tl.clone(), cpu], None).unwrap(), 2);
        let err = select(&[old, no_tl], None).unwrap_err();
        assert!(matches!(err, Error::NoDevice { .. }), "{err}");
        assert!(err.to_string().contains("1.1.0 < 1.2"), "{err}");
    }

    #[test]
    fn selector_by_index_and_name() {
        let list = vec![
            adapter(0, "llvmpipe (LLVM 15)", DeviceType::Cpu),
            adapter(1, "NVIDIA H100", DeviceType::Discrete),
        ];
        let by = |s: &str| select(&list, Some(&DeviceSelector::parse(s).unwrap()));
        assert_eq!(by("0").unwrap(), 0);
        assert_eq!(by("LLVMpipe").unwrap(), 0);
        assert_eq!(by("h100").unwrap(), 1);
        assert!(matches!(by("7"), Err(Error::InvalidInput(_))));
        assert!(matches!(by("radeon"), Err(Error::InvalidInput(_))));
        assert!(DeviceSelector::parse("  ").is_err());
    }

    #[test]
    fn empty_list_is_no_device() {
        assert!(matches!(select(&[], None), Err(Error::NoDevice { .. })));
    }

    #[test]
    fn queue_family_prefers_graphics_compute() {
        let f = |flags, count| vk::QueueFamilyProperties {
            queue_flags: flags,
            queue_count: count,
            ..Default::default()
        };
        let fams = [
            f(vk::QueueFlags::TRANSFER, 1),
            f(vk::QueueFlags::COMPUTE, 1),
            f(vk::QueueFlags::GRAPHICS | vk::QueueFlags::COMPUTE, 1),
        ];
        assert_eq!(pick_queue_family(&fams), Some(2));
        assert_eq!(pick_queue_family(&fams[..2]), Some(1));
        assert_eq!(pick_queue_family(&fams[..1]), None);
        assert_eq!(
            pick_queue_family(&[f(vk::QueueFlags::COMPUTE, 0)]),
            None,
            "a family with no queues is unusable"
        );
    }
}
