//! vk-mem 0.5 (VMA 3.x, what most ash users pick): `vmaCreateBuffer` with `MAPPED`, pinned to
//! the same memory type gpu-allocator's `CpuToGpu` picks; frees (`vmaDestroyBuffer`) through a
//! per-frame free list drained after the frame's fence. VMA's default block sizes (256 MiB
//! preferred for heaps over 1 GiB, starting smaller). `VK_EXT_memory_budget` is handed to VMA
//! where the device has it.
//!
//! Budget: VMA cannot be given a budget directly; the closest it has is `heap_size_limits`
//! (allocations past the limit fail with `VK_ERROR_OUT_OF_DEVICE_MEMORY`, and VMA's budget
//! becomes min(driver budget, limit), or 80% of the limit without the extension), plus the
//! `WITHIN_BUDGET` allocation flag, which fails an allocation that would pass that budget.

use std::ptr::NonNull;

use anyhow::{Context as _, Result};
use ash::vk;
use vk_mem::{
    Alloc, Allocation, AllocationCreateFlags, AllocationCreateInfo, AllocatorCreateFlags,
};

use crate::common::{Baseline, BudgetResult, ChurnResult, Probe, Workload, describe_type};
use crate::raw::{self, AllocFail, INSTANCE_USAGE, RawAllocator, RawBuffer, RawDevice};

pub const NAME: &str = "vk-mem";
pub const VERSION: &str = "0.5 (VMA 3)";

struct Vma {
    allocator: vk_mem::Allocator,
    memory_type: u32,
    flags: AllocationCreateFlags,
}

impl Vma {
    /// `heap_limit`: limit the heap of the pinned type to this many bytes.
    fn new(dev: &RawDevice, heap_limit: Option<u64>, within_budget: bool) -> Result<Self> {
        let memory_type = raw::upload_type_for(&dev.device, &dev.props)?;
        let heap = dev.props.memory_types_as_slice()[memory_type as usize].heap_index as usize;
        let mut limits = vec![vk::WHOLE_SIZE; dev.props.memory_heap_count as usize];
        if let Some(l) = heap_limit {
            limits[heap] = l;
        }
        let mut info =
            vk_mem::AllocatorCreateInfo::new(&dev.instance, &dev.device, dev.physical_device);
        info.vulkan_api_version = vk::API_VERSION_1_2;
        if dev.memory_budget {
            info.flags |= AllocatorCreateFlags::EXT_MEMORY_BUDGET;
        }
        if heap_limit.is_some() {
            info.heap_size_limits = &limits;
        }
        // SAFETY: instance, device and physical device are related and outlive the allocator
        // (it is dropped before the RawDevice); the extension flag is set only when enabled.
        let allocator = unsafe { vk_mem::Allocator::new(info) }.context("vmaCreateAllocator")?;
        let mut flags = AllocationCreateFlags::MAPPED;
        if within_budget {
            flags |= AllocationCreateFlags::WITHIN_BUDGET;
        }
        Ok(Self {
            allocator,
            memory_type,
            flags,
        })
    }
}

impl RawAllocator for Vma {
    type Alloc = Allocation;

    fn create(&mut self, size: u64) -> Result<RawBuffer<Allocation>, AllocFail> {
        let info = vk::BufferCreateInfo::default()
            .size(size)
            .usage(INSTANCE_USAGE)
            .sharing_mode(vk::SharingMode::EXCLUSIVE);
        let create = AllocationCreateInfo {
            flags: self.flags,
            required_flags: vk::MemoryPropertyFlags::HOST_VISIBLE
                | vk::MemoryPropertyFlags::HOST_COHERENT,
            memory_type_bits: 1 << self.memory_type,
            ..Default::default()
        };
        // SAFETY: valid create infos; the allocator's device is alive.
        let (buffer, mut alloc) =
            unsafe { self.allocator.create_buffer(&info, &create) }.map_err(|e| AllocFail {
                out_of_memory: e == vk::Result::ERROR_OUT_OF_DEVICE_MEMORY,
                message: format!("{e:?}"),
            })?;
        let mapped = self.allocator.get_allocation_info(&alloc).mapped_data;
        match NonNull::new(mapped.cast::<u8>()) {
            Some(ptr) => Ok(RawBuffer {
                buffer,
                alloc,
                ptr,
                size,
            }),
            None => {
                // SAFETY: never used by the GPU.
                unsafe { self.allocator.destroy_buffer(buffer, &mut alloc) };
                Err(AllocFail {
                    out_of_memory: false,
                    message: "VMA allocation is not mapped".into(),
                })
            }
        }
    }

    fn destroy(&mut self, mut b: RawBuffer<Allocation>) -> Result<()> {
        // SAFETY: the GPU is done with it (trait contract); buffer and allocation came from
        // this allocator together.
        unsafe { self.allocator.destroy_buffer(b.buffer, &mut b.alloc) };
        Ok(())
    }

    fn reserved(&self) -> u64 {
        self.allocator
            .get_heap_budgets()
            .map(|heaps| heaps.iter().map(|h| h.statistics.blockBytes).sum())
            .unwrap_or(0)
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
    let mut vma = Vma::new(&dev, None, false)?;
    let result = raw::churn(&dev, &mut vma, w, &base);
    let memory = describe_type(&dev.props, vma.memory_type);
    drop(vma);
    drop(dev);
    let mut r = result?;
    r.driver_delta_after_teardown = base.delta();
    r.memory = memory;
    r.notes.push(
        "frees: per-frame free list, vmaDestroyBuffer after that frame's fence (2 frames in flight)"
            .into(),
    );
    Ok(r)
}

/// Both budget variants: heap limit alone, and heap limit plus `WITHIN_BUDGET`.
pub fn budget(
    entry: &ash::Entry,
    name: &str,
    w: &Workload,
    probe: Option<&Probe>,
) -> Result<Vec<BudgetResult>> {
    let mut out = Vec::new();
    for within_budget in [false, true] {
        let base = Baseline::new(probe);
        let dev = RawDevice::new(entry, name)?;
        let mut vma = Vma::new(&dev, Some(w.budget), within_budget)?;
        let vma_budget = vma.allocator.get_heap_budgets().ok().and_then(|b| {
            let heap = dev.props.memory_types_as_slice()[vma.memory_type as usize].heap_index;
            b.get(heap as usize).map(|h| h.budget)
        });
        let (allocated, reserved, driver_delta, failure) = raw::fill_to_budget(&mut vma, w, &base)?;
        drop(vma);
        drop(dev);
        // VMA 3 checks WITHIN_BUDGET only for dedicated allocations; new blocks always respect
        // its budget, and past it allocations fall back to dedicated memory up to the limit.
        let refusal = match vma_budget {
            Some(b) if within_budget && allocated <= b => "refuses (WITHIN_BUDGET)",
            _ => "fails: out of device memory (heap limit)",
        };
        let (outcome, error) = match failure {
            None => ("goes over (hard stop at 2×B)".to_string(), None),
            Some(f) if f.out_of_memory => (refusal.to_string(), Some(f.message)),
            Some(f) => ("fails".into(), Some(f.message)),
        };
        let variant = if within_budget {
            format!(
                "heap_size_limits = B + WITHIN_BUDGET (VMA budget {})",
                vma_budget.map_or("?".into(), crate::report::bytes)
            )
        } else {
            "heap_size_limits = B".into()
        };
        out.push(BudgetResult {
            variant,
            outcome,
            error,
            allocated,
            reserved: Some(reserved),
            driver_delta,
        });
    }
    Ok(out)
}
