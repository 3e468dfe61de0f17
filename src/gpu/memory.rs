//! GPU memory: sub-allocations from gpu-allocator, never one `vkAllocateMemory` per object.

use std::sync::Mutex;

use ash::vk;
use gpu_allocator::vulkan::{
    Allocation, AllocationCreateDesc, AllocationScheme, Allocator, AllocatorCreateDesc,
};

pub use gpu_allocator::MemoryLocation;

use crate::error::{Error, Result, vk_err};

/// What to create.
#[derive(Clone, Copy, Debug)]
pub struct BufferDesc<'a> {
    /// Debug name, shown in leak reports.
    pub name: &'a str,
    /// Size in bytes (non-zero).
    pub size: u64,
    /// Vulkan usage flags.
    pub usage: vk::BufferUsageFlags,
    /// Where the memory lives (GPU only, CPU-to-GPU upload, GPU-to-CPU readback).
    pub location: MemoryLocation,
}

/// A buffer bound to a sub-allocation. It owns the allocation; dropping it without handing it
/// back to [`Memory::destroy_buffer`] is a leak and is reported, never a silent free.
pub struct Buffer {
    raw: vk::Buffer,
    allocation: Option<Allocation>,
    size: u64,
    name: String,
}

impl Buffer {
    /// The Vulkan handle.
    pub fn raw(&self) -> vk::Buffer {
        self.raw
    }

    /// Requested size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Debug name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The mapped bytes, for host-visible buffers (`None` for GPU-only memory).
    pub fn mapped(&self) -> Option<&[u8]> {
        let a = self.allocation.as_ref()?;
        a.mapped_slice().map(|s| &s[..self.size as usize])
    }

    /// The mapped bytes, writable.
    pub fn mapped_mut(&mut self) -> Option<&mut [u8]> {
        let size = self.size as usize;
        let a = self.allocation.as_mut()?;
        a.mapped_slice_mut().map(|s| &mut s[..size])
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if self.allocation.is_some() {
            log::error!(
                "leak: buffer {:?} ({} bytes) dropped without being destroyed through understory",
                self.name,
                self.size
            );
            if !std::thread::panicking() {
                debug_assert!(false, "buffer {:?} leaked", self.name);
            }
        }
    }
}

/// One gpu-allocator per device, shareable between threads.
pub struct Memory {
    device: ash::Device,
    allocator: Mutex<Option<Allocator>>,
}

impl Memory {
    /// # Safety
    /// The handles must be live, related, and outlive this object.
    pub(crate) unsafe fn new(
        instance: &ash::Instance,
        device: &ash::Device,
        physical_device: vk::PhysicalDevice,
    ) -> Result<Self> {
        let allocator = Allocator::new(&AllocatorCreateDesc {
            instance: instance.clone(),
            device: device.clone(),
            physical_device,
            debug_settings: Default::default(),
            buffer_device_address: false,
            allocation_sizes: Default::default(),
        })?;
        Ok(Self {
            device: device.clone(),
            allocator: Mutex::new(Some(allocator)),
        })
    }

    fn with_allocator<T>(&self, f: impl FnOnce(&mut Allocator) -> Result<T>) -> Result<T> {
        let mut guard = self.allocator.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_mut() {
            Some(a) => f(a),
            None => Err(Error::InvalidInput("memory was already shut down".into())),
        }
    }

    /// Creates a buffer and binds it to a fresh sub-allocation. On any failure nothing is left
    /// allocated.
    pub fn create_buffer(&self, desc: &BufferDesc<'_>) -> Result<Buffer> {
        if desc.size == 0 {
            return Err(Error::InvalidInput(format!(
                "buffer {:?}: size 0",
                desc.name
            )));
        }
        let info = vk::BufferCreateInfo::default()
            .size(desc.size)
            .usage(desc.usage)
            .sharing_mode(vk::SharingMode::EXCLUSIVE);
        // SAFETY: valid create info; the device is alive.
        let raw =
            unsafe { self.device.create_buffer(&info, None) }.map_err(vk_err("vkCreateBuffer"))?;
        // SAFETY: raw was just created from this device.
        let requirements = unsafe { self.device.get_buffer_memory_requirements(raw) };
        let allocation = self.with_allocator(|a| {
            Ok(a.allocate(&AllocationCreateDesc {
                name: desc.name,
                requirements,
                location: desc.location,
                linear: true,
                allocation_scheme: AllocationScheme::GpuAllocatorManaged,
            })?)
        });
        let allocation = match allocation {
            Ok(a) => a,
            Err(e) => {
                // SAFETY: unbound, never used.
                unsafe { self.device.destroy_buffer(raw, None) };
                return Err(e);
            }
        };
        // SAFETY: the allocation satisfies the buffer's requirements and is unbound
        // (VUID-vkBindBufferMemory-memory-01035, -memoryOffset-01036).
        let bound = unsafe {
            self.device
                .bind_buffer_memory(raw, allocation.memory(), allocation.offset())
        };
        if let Err(e) = bound {
            // SAFETY: unbound, never used.
            unsafe { self.device.destroy_buffer(raw, None) };
            let _ = self.with_allocator(|a| Ok(a.free(allocation)?));
            return Err(Error::vk("vkBindBufferMemory", e));
        }
        Ok(Buffer {
            raw,
            allocation: Some(allocation),
            size: desc.size,
            name: desc.name.to_owned(),
        })
    }

    /// Destroys a buffer and frees its sub-allocation at once.
    ///
    /// # Safety
    /// The GPU must have finished every use of the buffer (its last submission has completed).
    pub unsafe fn destroy_buffer(&self, mut buffer: Buffer) -> Result<()> {
        // SAFETY: the caller guarantees the GPU no longer uses it.
        unsafe { self.device.destroy_buffer(buffer.raw, None) };
        match buffer.allocation.take() {
            Some(a) => self.with_allocator(|al| Ok(al.free(a)?)),
            None => Ok(()),
        }
    }

    /// Bytes in live allocations, and bytes reserved in blocks, over all memory types.
    pub fn usage(&self) -> (u64, u64) {
        self.with_allocator(|a| {
            let r = a.generate_report();
            Ok((r.total_allocated_bytes, r.total_capacity_bytes))
        })
        .unwrap_or((0, 0))
    }

    /// Drops the allocator (returning every block to the driver), logging leaks first. Returns
    /// the number of allocations still live (leaks).
    pub(crate) fn shutdown(&self) -> usize {
        let mut guard = self.allocator.lock().unwrap_or_else(|p| p.into_inner());
        let Some(a) = guard.take() else { return 0 };
        let report = a.generate_report();
        for alloc in &report.allocations {
            log::error!(
                "leak: {:?} ({} bytes) still allocated at shutdown",
                alloc.name,
                alloc.size
            );
        }
        report.allocations.len()
    }
}
