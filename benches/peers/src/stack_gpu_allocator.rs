//! Raw gpu-allocator 0.28 on plain ash: `vkCreateBuffer` + `Allocator::allocate`
//! (`MemoryLocation::CpuToGpu`, persistently mapped) + `vkBindBufferMemory`; frees through a
//! hand-rolled per-frame free list drained after the frame's fence. Block sizes are understory's
//! defaults, so the two differ only in what understory adds on top. No budget of any kind.

use anyhow::{Result, anyhow};
use ash::vk;
use gpu_allocator::vulkan::{
    Allocation, AllocationCreateDesc, AllocationScheme, Allocator, AllocatorCreateDesc,
};
use gpu_allocator::{AllocationError, AllocationSizes, AllocatorDebugSettings, MemoryLocation};
use understory::gpu::memory::MemoryConfig;

use crate::common::{Baseline, BudgetResult, ChurnResult, Probe, Workload, describe_type};
use crate::raw::{self, AllocFail, INSTANCE_USAGE, RawAllocator, RawBuffer, RawDevice};

pub const NAME: &str = "gpu-allocator";
pub const VERSION: &str = "0.28 (raw, on ash)";

struct GpuAllocator {
    device: ash::Device,
    allocator: Allocator,
}

impl GpuAllocator {
    fn new(dev: &RawDevice) -> Result<Self> {
        let d = MemoryConfig::default();
        let allocation_sizes =
            AllocationSizes::new(d.device_block_min_bytes, d.host_block_min_bytes)
                .with_max_device_memblock_size(d.device_block_max_bytes)
                .with_max_host_memblock_size(d.host_block_max_bytes);
        let mut debug_settings = AllocatorDebugSettings::default();
        debug_settings.log_leaks_on_shutdown = false;
        let allocator = Allocator::new(&AllocatorCreateDesc {
            instance: dev.instance.clone(),
            device: dev.device.clone(),
            physical_device: dev.physical_device,
            debug_settings,
            buffer_device_address: false,
            allocation_sizes,
        })
        .map_err(|e| anyhow!("gpu-allocator: {e}"))?;
        Ok(Self {
            device: dev.device.clone(),
            allocator,
        })
    }
}

fn fail(out_of_memory: bool, message: String) -> AllocFail {
    AllocFail {
        out_of_memory,
        message,
    }
}

impl RawAllocator for GpuAllocator {
    type Alloc = Allocation;

    fn create(&mut self, size: u64) -> Result<RawBuffer<Allocation>, AllocFail> {
        let info = vk::BufferCreateInfo::default()
            .size(size)
            .usage(INSTANCE_USAGE)
            .sharing_mode(vk::SharingMode::EXCLUSIVE);
        // SAFETY: valid create info (non-zero size); the device is alive.
        let buffer = unsafe { self.device.create_buffer(&info, None) }
            .map_err(|e| fail(e == vk::Result::ERROR_OUT_OF_DEVICE_MEMORY, e.to_string()))?;
        // SAFETY: the buffer was just created from this device.
        let requirements = unsafe { self.device.get_buffer_memory_requirements(buffer) };
        let allocation = match self.allocator.allocate(&AllocationCreateDesc {
            name: "instances",
            requirements,
            location: MemoryLocation::CpuToGpu,
            linear: true,
            allocation_scheme: AllocationScheme::GpuAllocatorManaged,
        }) {
            Ok(a) => a,
            Err(e) => {
                // SAFETY: never bound or used.
                unsafe { self.device.destroy_buffer(buffer, None) };
                let oom = matches!(e, AllocationError::OutOfMemory);
                return Err(fail(oom, e.to_string()));
            }
        };
        let bound = (|| {
            // SAFETY: the allocation is live, from this device, and satisfies the buffer's
            // requirements (size, alignment, type bits); the buffer was never bound.
            unsafe {
                self.device
                    .bind_buffer_memory(buffer, allocation.memory(), allocation.offset())
            }
            .map_err(|e| e.to_string())?;
            allocation
                .mapped_ptr()
                .ok_or_else(|| "CpuToGpu allocation is not mapped".to_string())
        })();
        match bound {
            Ok(ptr) => Ok(RawBuffer {
                buffer,
                alloc: allocation,
                ptr: ptr.cast(),
                size,
            }),
            Err(message) => {
                // SAFETY: never used by the GPU.
                unsafe { self.device.destroy_buffer(buffer, None) };
                let _ = self.allocator.free(allocation);
                Err(fail(false, message))
            }
        }
    }

    fn destroy(&mut self, b: RawBuffer<Allocation>) -> Result<()> {
        // SAFETY: the GPU is done with it (trait contract) and nothing else holds the handle.
        unsafe { self.device.destroy_buffer(b.buffer, None) };
        self.allocator
            .free(b.alloc)
            .map_err(|e| anyhow!("gpu-allocator free: {e}"))
    }

    fn reserved(&self) -> u64 {
        self.allocator.capacity()
    }
}

pub fn churn(
    entry: &ash::Entry,
    name: &str,
    w: &Workload,
    probe: Option<&Probe>,
) -> Result<ChurnResult> {
    let base = Baseline::new(probe);
    let dev = RawDevice::new(entry, name)?;
    let mut a = GpuAllocator::new(&dev)?;
    let result = raw::churn(&dev, &mut a, w, &base);
    let memory = memory_type(&dev, &mut a);
    drop(a);
    drop(dev);
    let mut r = result?;
    r.driver_delta_after_teardown = base.delta();
    r.memory = memory;
    r.notes.push(
        "frees: per-frame free list, destroyed after that frame's fence (2 frames in flight)"
            .into(),
    );
    Ok(r)
}

/// Where a CpuToGpu buffer lands (one probe allocation, freed at once).
fn memory_type(dev: &RawDevice, a: &mut GpuAllocator) -> String {
    match a.create(256) {
        Ok(b) => {
            let flags = b.alloc.memory_properties();
            let _ = a.destroy(b);
            let ty = dev
                .props
                .memory_types_as_slice()
                .iter()
                .position(|t| t.property_flags == flags)
                .unwrap_or(0);
            describe_type(&dev.props, ty as u32)
        }
        Err(e) => format!("unknown ({})", e.message),
    }
}

pub fn budget(
    entry: &ash::Entry,
    name: &str,
    w: &Workload,
    probe: Option<&Probe>,
) -> Result<BudgetResult> {
    let base = Baseline::new(probe);
    let dev = RawDevice::new(entry, name)?;
    let mut a = GpuAllocator::new(&dev)?;
    let (allocated, reserved, driver_delta, failure) = raw::fill_to_budget(&mut a, w, &base)?;
    drop(a);
    drop(dev);
    let (outcome, error) = match failure {
        None => ("goes over (no budget; hard stop at 2×B)".to_string(), None),
        Some(f) if f.out_of_memory => ("fails: out of device memory".into(), Some(f.message)),
        Some(f) => ("fails".into(), Some(f.message)),
    };
    Ok(BudgetResult {
        variant: "no budget concept".into(),
        outcome,
        error,
        allocated,
        reserved: Some(reserved),
        driver_delta,
    })
}
