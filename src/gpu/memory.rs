//! GPU memory: budget-aware sub-allocations from gpu-allocator, with frame-fenced frees.
//!
//! # What is allocated, and what gpu-allocator keeps
//! - One gpu-allocator **per category** (instances, atlas, staging, other) of the device, each
//!   behind its own lock, so that a memory block never mixes categories. That is what makes
//!   per-category memory priority possible (`vkSetDeviceMemoryPriorityEXT` works on a whole
//!   `VkDeviceMemory`), and reserved bytes per category exact.
//! - Every buffer and image is a sub-allocation of a block; an allocation larger than the
//!   category's maximum block size gets a block of its own (gpu-allocator's "personal block").
//! - gpu-allocator 0.28 frees a block as soon as it becomes empty, **except the last general block
//!   of each memory type**, which it keeps for reuse until the allocator is dropped. Personal
//!   blocks are always freed at once. Block sizes start at the configured minimum and double with
//!   each new block up to the maximum (4 MiB steps, 4–256 MiB).
//! - understory adds two things: a size-class cache of released buffers (reused without any
//!   Vulkan call while headroom is comfortable, so churn in the frame loop does not reach
//!   `vkAllocateMemory`/`vkFreeMemory`), and [`Memory::release_empty_blocks`], which drops and
//!   recreates the allocator of a category that holds nothing, returning its kept block. Both
//!   are flushed when headroom falls below [`MemoryConfig::release_below_headroom_fraction`].
//!
//! # Freeing
//! Every [`Buffer`] and [`Image`] knows the last frame that used it: understory's recording
//! functions mark what they record, and a host that records a resource's raw handle itself
//! marks it with [`Buffer::used_in`] / [`Image::used_in`]. Dropping a resource never frees it:
//! it joins the retire queue at its last frame's value and is freed by a later
//! [`Context::collect`](crate::gpu::context::Context::collect) (or `begin_frame`) once the GPU has completed that frame. A resource
//! last used by the open frame waits for that frame's submission; if the frame is dropped
//! unsubmitted, its value goes to the next frame, so it waits for that one.
//!
//! Resources hold the context's shared state alive: their memory blocks (and mappings) and
//! the device cannot go away while any of them exists.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::gpu::context::{Frame, Shared};

use ash::vk;
use gpu_allocator::vulkan::{
    Allocation, AllocationCreateDesc, AllocationScheme, Allocator, AllocatorCreateDesc,
};
use gpu_allocator::{AllocationSizes, AllocatorDebugSettings};

pub use gpu_allocator::MemoryLocation;

use crate::error::{Error, Result, vk_err};
use crate::gpu::adapter::HeapInfo;
use crate::gpu::budget::{HeapBudget, HeapBudgets, RawHeap, Source, resolve};
use crate::policy::category::{CATEGORIES, Category, PerCategory};
use crate::policy::retire::{RetireQueue, Retired};

const MIB: u64 = 1 << 20;

/// Memory tunables. Defaults suit a 512 MiB vegetation budget.
#[derive(Clone, Debug)]
pub struct MemoryConfig {
    /// Most bytes each category may hold in live allocations (retired-but-unfreed included).
    pub cap_bytes: PerCategory<u64>,
    /// First device-local block size; blocks double up to the maximum. 256 MiB blocks (the
    /// gpu-allocator default) would be half of a 512 MiB budget in one step.
    pub device_block_min_bytes: u64,
    /// Largest device-local block size.
    pub device_block_max_bytes: u64,
    /// First host-visible block size.
    pub host_block_min_bytes: u64,
    /// Largest host-visible block size.
    pub host_block_max_bytes: u64,
    /// `VK_EXT_memory_priority` priority per category, 0..=1 (0.5 is the driver's default):
    /// vegetation is the first thing the driver should page out, below render targets.
    pub priority: PerCategory<f32>,
    /// Keep released buffers for reuse up to this many bytes per category. Where it is not
    /// zero, buffers whose size class fits it are made at that class (at most a quarter
    /// larger, [`size_class`]) so they can be reused; larger ones at their own size.
    pub cache_bytes: PerCategory<u64>,
    /// When any heap's headroom falls below this share of its budget, flush the caches and
    /// release empty blocks.
    pub release_below_headroom_fraction: f64,
    /// Fault injection: every Nth allocation fails with `VK_ERROR_OUT_OF_DEVICE_MEMORY`.
    pub fail_every_nth_allocation: Option<NonZeroU64>,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            // The vegetation categories have no cap of their own: the vegetation budget
            // (`Memory::set_vegetation_limit`, driven by the controller) is their one limit.
            cap_bytes: PerCategory([u64::MAX, u64::MAX, u64::MAX, 64 * MIB, u64::MAX]),
            device_block_min_bytes: 16 * MIB,
            device_block_max_bytes: 64 * MIB,
            host_block_min_bytes: 8 * MIB,
            host_block_max_bytes: 32 * MIB,
            priority: PerCategory([0.3, 0.2, 0.35, 0.1, 0.5]),
            cache_bytes: PerCategory([16 * MIB, 0, 0, 8 * MIB, 4 * MIB]),
            release_below_headroom_fraction: 0.10,
            fail_every_nth_allocation: None,
        }
    }
}

impl MemoryConfig {
    fn validate(&self) -> Result<()> {
        let blocks = [
            self.device_block_min_bytes,
            self.device_block_max_bytes,
            self.host_block_min_bytes,
            self.host_block_max_bytes,
        ];
        if blocks
            .iter()
            .any(|b| !(4 * MIB..=256 * MIB).contains(b) || b % (4 * MIB) != 0)
            || self.device_block_min_bytes > self.device_block_max_bytes
            || self.host_block_min_bytes > self.host_block_max_bytes
        {
            return Err(Error::InvalidInput(format!(
                "block sizes {blocks:?}: each must be a multiple of 4 MiB in 4..=256 MiB, min <= max"
            )));
        }
        if let Some(c) = Category::VEGETATION
            .iter()
            .find(|c| self.cap_bytes[**c] != u64::MAX)
        {
            return Err(Error::InvalidInput(format!(
                "a cap of {} bytes for {c}: the vegetation budget is the one cap of instances, atlas and outputs (ControllerConfig::cap_bytes, Vegetation::set_budget_cap)",
                self.cap_bytes[*c]
            )));
        }
        if self.priority.iter().any(|(_, p)| !(0.0..=1.0).contains(p)) {
            return Err(Error::InvalidInput("priorities must be in 0..=1".into()));
        }
        if !(0.0..=1.0).contains(&self.release_below_headroom_fraction) {
            return Err(Error::InvalidInput(
                "release_below_headroom_fraction must be in 0..=1".into(),
            ));
        }
        Ok(())
    }
}

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
    /// What it is for (caps, priority, statistics).
    pub category: Category,
}

/// A 2D image to create (optimal tiling, device-local).
#[derive(Clone, Copy, Debug)]
pub struct ImageDesc<'a> {
    /// Debug name.
    pub name: &'a str,
    /// Width and height in texels.
    pub extent: vk::Extent2D,
    /// Texel format.
    pub format: vk::Format,
    /// Mip levels (1 = no mips).
    pub mip_levels: u32,
    /// Usage flags.
    pub usage: vk::ImageUsageFlags,
    /// What it is for.
    pub category: Category,
}

/// Where a resource came from and what it holds.
#[derive(Clone, Debug)]
struct Meta {
    /// Shared, so that handing a resource to the retire queue copies no string.
    name: Arc<str>,
    category: Category,
    heap: usize,
    /// Bytes of the sub-allocation.
    bytes: u64,
    owner: u64,
    /// Which allocator it came from.
    pool: Pool,
}

/// Where an allocation lives: a block of the category's allocator, a small block (4 MiB, for
/// instances under a budget too small for the configured blocks), or memory of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pool {
    Blocks = 0,
    Small = 1,
    Dedicated = 2,
}

impl Buffer {
    /// Which allocator it came from (relocation moves patches between them).
    pub(crate) fn pool(&self) -> Pool {
        self.meta.pool
    }
}

/// The block size of [`Pool::Small`]: gpu-allocator's smallest.
pub(crate) const SMALL_BLOCK: u64 = 4 << 20;

/// The driver's allocation granularity assumed where it cannot be measured (no
/// `VK_EXT_memory_budget`): a dedicated allocation is counted as at least this much.
pub const ASSUMED_ALLOCATION_GRANULARITY: u64 = 64 << 10;

/// One block allocator of a category and what it holds.
struct BlockPool {
    allocator: Option<Allocator>,
    /// Allocations in it (cached buffers included).
    allocations: u64,
    /// Block bytes per heap.
    reserved: Vec<u64>,
    /// Bytes sub-allocated per heap.
    live: Vec<u64>,
}

impl CategoryState {
    /// Every allocator of the category, taken out (teardown, or leaking everything).
    fn take_allocators(&mut self) -> impl Iterator<Item = Allocator> + use<> {
        [
            self.pools[0].allocator.take(),
            self.pools[1].allocator.take(),
            self.dedicated.take(),
        ]
        .into_iter()
        .flatten()
    }
}

impl BlockPool {
    fn new(heaps: usize) -> Self {
        Self {
            allocator: None,
            allocations: 0,
            reserved: vec![0; heaps],
            live: vec![0; heaps],
        }
    }
}

/// A buffer bound to a sub-allocation, made by
/// [`Context::create_buffer`](crate::gpu::context::Context::create_buffer). Dropping it retires
/// it: it is freed once the GPU has completed the last frame that used it.
///
/// A buffer keeps its context's shared state alive, so its memory can never be freed under it,
/// even after [`Context::shutdown`](crate::gpu::context::Context::shutdown); and a mapping
/// borrows the buffer, so it cannot outlive it:
///
/// ```compile_fail,E0597
/// # fn f(ctx: &understory::gpu::context::Context, desc: &understory::gpu::memory::BufferDesc)
/// #     -> understory::Result<()> {
/// let bytes = {
///     let staging = ctx.create_buffer(desc)?;
///     staging.mapped()? // `staging` does not live long enough
/// };
/// # Ok(()) }
/// ```
pub struct Buffer {
    raw: vk::Buffer,
    allocation: Option<Allocation>,
    size: u64,
    usage: vk::BufferUsageFlags,
    location: MemoryLocation,
    meta: Meta,
    id: u64,
    /// The use word: the value of the last frame that used the buffer (the low
    /// [`FRAME_VALUE_BITS`] bits) and the number of live [`Mapped`] views (the bits above), in
    /// one atomic so that a mark and a mapping are ordered by one compare-and-swap.
    last_use: AtomicU64,
    shared: Arc<Shared>,
}

/// A 2D image bound to a sub-allocation, made by
/// [`Context::create_image`](crate::gpu::context::Context::create_image). Dropping it retires it
/// like a [`Buffer`].
pub struct Image {
    raw: vk::Image,
    allocation: Option<Allocation>,
    extent: vk::Extent2D,
    format: vk::Format,
    mip_levels: u32,
    usage: vk::ImageUsageFlags,
    meta: Meta,
    id: u64,
    last_use: AtomicU64,
    shared: Arc<Shared>,
}

/// Ids of buffers and images: unique in the process (Vulkan handles may be reused).
static NEXT_RESOURCE_ID: AtomicU64 = AtomicU64::new(1);

/// Bits of a buffer's use word that hold the last frame's value; frame values never exceed
/// [`MAX_FRAME_VALUE`] (`Clock::open` refuses a frame beyond it).
const FRAME_VALUE_BITS: u32 = 48;
/// The largest frame value a buffer can record: 2⁴⁸ − 1 (9,000 years at 1,000 frames a second).
pub(crate) const MAX_FRAME_VALUE: u64 = (1 << FRAME_VALUE_BITS) - 1;
/// One live [`Mapped`] view in a buffer's use word.
const ONE_VIEW: u64 = 1 << FRAME_VALUE_BITS;

/// Marks `last_use` with `frame`'s value, after checking the frame is of `shared`'s context.
fn mark(last_use: &AtomicU64, shared: &Shared, frame: &Frame, what: &str) -> Result<()> {
    frame.check(shared, what)?;
    last_use.fetch_max(frame.value(), Ordering::AcqRel);
    Ok(())
}

/// A read-only view of a host-visible [`Buffer`]'s mapped bytes, from [`Buffer::mapped`]; it
/// dereferences to `[u8]` (its [`Buffer::size`] bytes).
///
/// While a view is alive, no frame can start using the buffer: every mark ([`Buffer::used_in`]
/// and understory's recording functions: cull, scan, compute dispatches, draws) is refused with
/// [`Error::Lifecycle`] before anything is recorded, so the GPU never writes the bytes a view
/// shows. Views may be many at a time, and on several threads. A view that is leaked
/// (`std::mem::forget`) keeps the buffer from every later frame, as a leaked `RefCell` borrow
/// does; [`Buffer::mapped_mut`] and further views still work.
///
/// A view borrows the buffer, so the buffer cannot be written through
/// [`Buffer::mapped_mut`] while it is alive:
///
/// ```compile_fail,E0502
/// # fn f(staging: &mut understory::gpu::memory::Buffer) -> understory::Result<()> {
/// let view = staging.mapped()?;
/// staging.mapped_mut()?[0] = 1; // cannot borrow `*staging` as mutable: `view` borrows it
/// let first = view[0];
/// # Ok(()) }
/// ```
///
/// and [`Vegetation::record`](crate::vegetation::Vegetation::record), which writes instance
/// buffers with `&mut` access, cannot run while a view of one of its buffers is alive:
///
/// ```compile_fail,E0502
/// # fn f(veg: &mut understory::vegetation::Vegetation, frame: &understory::gpu::context::Frame,
/// #      cmd: ash::vk::CommandBuffer) -> understory::Result<()> {
/// let sources = veg.cull_sources();
/// let view = sources[0].0.buffer.mapped()?;
/// unsafe { veg.record(frame, cmd)? }; // cannot borrow `*veg` as mutable
/// let first = view[0];
/// # Ok(()) }
/// ```
pub struct Mapped<'a> {
    bytes: &'a [u8],
    /// The buffer's use word, whose view count this view holds one of.
    word: &'a AtomicU64,
}

impl std::ops::Deref for Mapped<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes
    }
}

impl AsRef<[u8]> for Mapped<'_> {
    fn as_ref(&self) -> &[u8] {
        self.bytes
    }
}

impl std::fmt::Debug for Mapped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapped")
            .field("len", &self.bytes.len())
            .finish()
    }
}

impl Drop for Mapped<'_> {
    fn drop(&mut self) {
        // Release: the host's reads through this view happen before any mark that sees the
        // count drop (an acquiring CAS), hence before any GPU work of that frame.
        self.word.fetch_sub(ONE_VIEW, Ordering::Release);
    }
}

impl Buffer {
    /// The Vulkan handle.
    pub fn raw(&self) -> vk::Buffer {
        self.raw
    }
    /// Requested size in bytes (the buffer may be larger: sizes are rounded to a size class).
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Bytes of memory it holds.
    pub fn bytes(&self) -> u64 {
        self.meta.bytes
    }
    /// Debug name.
    pub fn name(&self) -> &str {
        &self.meta.name
    }
    /// Category.
    pub fn category(&self) -> Category {
        self.meta.category
    }
    /// Index of the memory heap it lives in.
    pub fn heap(&self) -> usize {
        self.meta.heap
    }
    /// Whether it has a `VkDeviceMemory` of its own (not a sub-allocation of a shared block).
    pub fn is_dedicated(&self) -> bool {
        self.allocation
            .as_ref()
            .is_some_and(Allocation::is_dedicated)
    }
    /// An id unique among the process's buffers and images (Vulkan handles may be reused).
    pub fn id(&self) -> u64 {
        self.id
    }
    /// The usage flags it was created with.
    pub fn usage(&self) -> vk::BufferUsageFlags {
        self.usage
    }
    /// Records that commands of `frame` use this buffer: it is not freed before the GPU has
    /// completed that frame. understory's recording functions do this for what they record; a
    /// host that records [`Buffer::raw`] into its own commands must do it too (for the frame
    /// whose submission carries those commands), or keep the buffer alive until they completed.
    ///
    /// [`Error::Lifecycle`] (nothing marked) while a [`Mapped`] view of the buffer is alive:
    /// the host is reading the bytes the frame's commands could write. Record nothing that
    /// uses the buffer then.
    pub fn used_in(&self, frame: &Frame) -> Result<()> {
        frame.check(&self.shared, &self.meta.name)?;
        self.mark_used(frame.value())
    }
    /// The value of the last frame that used it (0: none).
    pub fn last_use(&self) -> u64 {
        self.last_use.load(Ordering::Acquire) & MAX_FRAME_VALUE
    }
    /// Marks a use by frame `value` (callers checked the frame), unless a [`Mapped`] view is
    /// alive: then [`Error::Lifecycle`] and nothing is marked. Call it before recording any
    /// command that uses the buffer, and record nothing on error.
    pub(crate) fn mark_used(&self, value: u64) -> Result<()> {
        if value > MAX_FRAME_VALUE {
            return Err(Error::Lifecycle(format!(
                "buffer {:?}: frame value {value} beyond {MAX_FRAME_VALUE}",
                self.meta.name
            )));
        }
        let mut word = self.last_use.load(Ordering::Acquire);
        loop {
            let views = word >> FRAME_VALUE_BITS;
            if views > 0 {
                return Err(Error::Lifecycle(format!(
                    "buffer {:?} is mapped ({views} live `Mapped` view(s)): no frame may use it \
                     while the host reads it; drop the views first",
                    self.meta.name
                )));
            }
            if word >= value {
                return Ok(());
            }
            // One CAS orders this mark against every mapping: a view taken after it sees the
            // new value (and refuses while the frame runs), one taken before makes it fail.
            match self.last_use.compare_exchange_weak(
                word,
                value,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => word = now,
            }
        }
    }
    /// Marks a use by frame `value` through the only reference to the buffer: no [`Mapped`]
    /// view can be alive (a view borrows the buffer), so this cannot be refused. The value is
    /// a frame's ([`MAX_FRAME_VALUE`] at most).
    pub(crate) fn touch(&mut self, value: u64) {
        debug_assert!(value <= MAX_FRAME_VALUE);
        let word = self.last_use.get_mut();
        let views = *word & !MAX_FRAME_VALUE;
        *word = views | (*word & MAX_FRAME_VALUE).max(value.min(MAX_FRAME_VALUE));
    }
    /// Whether `shared` is this buffer's context.
    pub(crate) fn belongs_to(&self, shared: &Shared) -> bool {
        self.meta.owner == shared.memory.id
    }
    fn not_ready(&self, last: u64) -> Error {
        Error::NotReady(format!(
            "buffer {:?} is used by frame {last}, which the GPU has not completed",
            self.meta.name
        ))
    }
    fn not_mapped(&self) -> Error {
        Error::InvalidInput(format!("buffer {:?} is not mapped", self.meta.name))
    }
    /// A read-only view of the mapped bytes (`size()` of them) of a host-visible buffer. Only
    /// while no frame that the GPU has not completed uses it ([`Error::NotReady`] otherwise:
    /// wait for its [`last_use`](Buffer::last_use) first); not host-visible is
    /// [`Error::InvalidInput`].
    ///
    /// While the returned [`Mapped`] is alive, no frame can start using the buffer
    /// ([`Buffer::used_in`] and every recording function that would use it return
    /// [`Error::Lifecycle`]), so the GPU cannot write what the view shows. Drop it before
    /// recording the buffer.
    pub fn mapped(&self) -> Result<Mapped<'_>> {
        let bytes = self
            .allocation
            .as_ref()
            .and_then(Allocation::mapped_slice)
            .map(|s| &s[..self.size as usize])
            .ok_or_else(|| self.not_mapped())?;
        let mut completed = None;
        let mut word = self.last_use.load(Ordering::Acquire);
        loop {
            let last = word & MAX_FRAME_VALUE;
            if last > 0 {
                // Completion only grows: a value read once stays true for the retries.
                let done = match completed {
                    Some(c) => c,
                    None => *completed.insert(self.shared.clock.completed()?),
                };
                if done < last {
                    return Err(self.not_ready(last));
                }
            }
            if word >> FRAME_VALUE_BITS == u64::MAX >> FRAME_VALUE_BITS {
                return Err(Error::Lifecycle(format!(
                    "buffer {:?} has {} live `Mapped` views, the most there can be",
                    self.meta.name,
                    u64::MAX >> FRAME_VALUE_BITS
                )));
            }
            // The view is counted in the same word as the last use: a mark after this CAS is
            // refused, and one before it is the `last` checked above.
            match self.last_use.compare_exchange_weak(
                word,
                word + ONE_VIEW,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Ok(Mapped {
                        bytes,
                        word: &self.last_use,
                    });
                }
                Err(now) => word = now,
            }
        }
    }
    /// The mapped bytes, writable; as [`Buffer::mapped`]. `&mut self`: no [`Mapped`] view and
    /// no recording that borrows the buffer can be alive meanwhile.
    pub fn mapped_mut(&mut self) -> Result<&mut [u8]> {
        let last = self.last_use();
        if last > 0 && self.shared.clock.completed()? < last {
            return Err(self.not_ready(last));
        }
        let size = self.size as usize;
        let name = self.meta.name.clone();
        self.allocation
            .as_mut()
            .and_then(Allocation::mapped_slice_mut)
            .map(|s| &mut s[..size])
            .ok_or_else(|| Error::InvalidInput(format!("buffer {name:?} is not mapped")))
    }
}

impl Image {
    /// The Vulkan handle.
    pub fn raw(&self) -> vk::Image {
        self.raw
    }
    /// Width and height.
    pub fn extent(&self) -> vk::Extent2D {
        self.extent
    }
    /// Format.
    pub fn format(&self) -> vk::Format {
        self.format
    }
    /// Mip levels.
    pub fn mip_levels(&self) -> u32 {
        self.mip_levels
    }
    /// The usage flags it was created with.
    pub fn usage(&self) -> vk::ImageUsageFlags {
        self.usage
    }
    /// An id unique among the process's buffers and images (Vulkan handles may be reused).
    pub fn id(&self) -> u64 {
        self.id
    }
    /// Bytes of memory it holds.
    pub fn bytes(&self) -> u64 {
        self.meta.bytes
    }
    /// Debug name.
    pub fn name(&self) -> &str {
        &self.meta.name
    }
    /// Category.
    pub fn category(&self) -> Category {
        self.meta.category
    }
    /// As [`Buffer::used_in`] (images are never mapped, so this is never refused for a view).
    pub fn used_in(&self, frame: &Frame) -> Result<()> {
        mark(&self.last_use, &self.shared, frame, &self.meta.name)
    }
    /// The value of the last frame that used it (0: none).
    pub fn last_use(&self) -> u64 {
        self.last_use.load(Ordering::Acquire)
    }
    /// Marks a use without checking the frame (callers checked it).
    pub(crate) fn touch(&self, value: u64) {
        self.last_use.fetch_max(value, Ordering::AcqRel);
    }
    /// Whether `shared` is this image's context.
    pub(crate) fn belongs_to(&self, shared: &Shared) -> bool {
        self.meta.owner == shared.memory.id
    }
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("name", &self.meta.name)
            .field("category", &self.meta.category)
            .field("size", &self.size)
            .field("bytes", &self.meta.bytes)
            .field("raw", &self.raw)
            .finish()
    }
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("name", &self.meta.name)
            .field("category", &self.meta.category)
            .field("extent", &self.extent)
            .field("bytes", &self.meta.bytes)
            .field("raw", &self.raw)
            .finish()
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Some(allocation) = self.allocation.take() {
            let resource = Resource::Buffer {
                raw: self.raw,
                allocation,
                meta: self.meta.clone(),
                // Made at its own size (no class): never cached, so never handed out for a
                // larger request of its class.
                key: self
                    .shared
                    .memory
                    .cache_class(self.meta.category, self.size)
                    .map(|class_bytes| CacheKey {
                        usage: self.usage,
                        location: location_id(self.location),
                        class_bytes,
                    }),
            };
            let last_use = *self.last_use.get_mut() & MAX_FRAME_VALUE;
            self.shared.memory.retire_resource(resource, last_use);
        }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if let Some(allocation) = self.allocation.take() {
            let resource = Resource::Image {
                raw: self.raw,
                allocation,
                meta: self.meta.clone(),
            };
            self.shared
                .memory
                .retire_resource(resource, *self.last_use.get_mut());
        }
    }
}

/// A Vulkan object of the context's device that holds no memory of understory's, for
/// [`Context::retire_object`](crate::gpu::context::Context::retire_object): destroyed by the
/// retire queue once the GPU has completed its last frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RawObject {
    /// `vkDestroyPipeline`.
    Pipeline(vk::Pipeline),
    /// `vkDestroyPipelineLayout`.
    PipelineLayout(vk::PipelineLayout),
    /// `vkDestroyDescriptorSetLayout`.
    DescriptorSetLayout(vk::DescriptorSetLayout),
    /// `vkDestroyDescriptorPool`.
    DescriptorPool(vk::DescriptorPool),
    /// `vkDestroyImageView`.
    ImageView(vk::ImageView),
    /// `vkDestroySampler`.
    Sampler(vk::Sampler),
    /// `vkDestroyQueryPool`.
    QueryPool(vk::QueryPool),
    /// `vkDestroyCommandPool` (frees its command buffers).
    CommandPool(vk::CommandPool),
}

impl RawObject {
    fn is_null(&self) -> bool {
        use ash::vk::Handle;
        match *self {
            RawObject::Pipeline(h) => h.is_null(),
            RawObject::PipelineLayout(h) => h.is_null(),
            RawObject::DescriptorSetLayout(h) => h.is_null(),
            RawObject::DescriptorPool(h) => h.is_null(),
            RawObject::ImageView(h) => h.is_null(),
            RawObject::Sampler(h) => h.is_null(),
            RawObject::QueryPool(h) => h.is_null(),
            RawObject::CommandPool(h) => h.is_null(),
        }
    }

    /// # Safety
    /// The object belongs to `device`, and no pending command uses it.
    unsafe fn destroy(self, device: &ash::Device) {
        // SAFETY: forwarded contract; each handle is destroyed with its own call, once.
        unsafe {
            match self {
                RawObject::Pipeline(h) => device.destroy_pipeline(h, None),
                RawObject::PipelineLayout(h) => device.destroy_pipeline_layout(h, None),
                RawObject::DescriptorSetLayout(h) => device.destroy_descriptor_set_layout(h, None),
                RawObject::DescriptorPool(h) => device.destroy_descriptor_pool(h, None),
                RawObject::ImageView(h) => device.destroy_image_view(h, None),
                RawObject::Sampler(h) => device.destroy_sampler(h, None),
                RawObject::QueryPool(h) => device.destroy_query_pool(h, None),
                RawObject::CommandPool(h) => device.destroy_command_pool(h, None),
            }
        }
    }
}

/// The handle an allocation is for, for a dedicated (exactly sized) allocation near the
/// vegetation limit.
#[derive(Clone, Copy, Debug)]
enum Dedicated {
    Buffer(vk::Buffer),
    Image(vk::Image),
}

/// Where an allocation goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Placement {
    /// A shared block, or a dedicated allocation where the category always uses one (atlas,
    /// outputs) or a new block would pass the vegetation limit.
    Auto,
    /// A dedicated allocation that may pass the vegetation limit (never the heap's budget):
    /// moving a resident patch out of a block too big for the budget, its old buffer retired
    /// right after.
    Relocate,
    /// A shared block, never a dedicated allocation (moving a patch back into blocks once the
    /// budget has room for them again).
    Shared,
}

/// Dedicated allocations of categories that may also use blocks: at most half the device's
/// `maxMemoryAllocationCount` (the host needs its share), within these bounds.
const OPTIONAL_DEDICATED_RANGE: (u64, u64) = (256, 16_384);

impl Dedicated {
    fn scheme(self) -> AllocationScheme {
        match self {
            Dedicated::Buffer(b) => AllocationScheme::DedicatedBuffer(b),
            Dedicated::Image(i) => AllocationScheme::DedicatedImage(i),
        }
    }
}

/// A resource without its handle wrapper: what the retire queue and the cache hold.
enum Resource {
    Buffer {
        raw: vk::Buffer,
        allocation: Allocation,
        meta: Meta,
        key: Option<CacheKey>,
    },
    Image {
        raw: vk::Image,
        allocation: Allocation,
        meta: Meta,
    },
    Object(RawObject),
}

impl Resource {
    fn meta(&self) -> Option<&Meta> {
        match self {
            Resource::Buffer { meta, .. } | Resource::Image { meta, .. } => Some(meta),
            Resource::Object(_) => None,
        }
    }
    /// (heap, bytes, category) for the accounting; objects hold nothing.
    fn held(&self) -> (usize, u64, Category) {
        self.meta()
            .map_or((0, 0, Category::Other), |m| (m.heap, m.bytes, m.category))
    }
}

impl std::fmt::Debug for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resource::Object(o) => write!(f, "Resource({o:?})"),
            r => write!(f, "Resource({:?})", r.meta().map(|m| &m.name)),
        }
    }
}

/// Buffers are reused only for the same usage, location and size class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct CacheKey {
    usage: vk::BufferUsageFlags,
    location: u8,
    class_bytes: u64,
}

fn location_id(l: MemoryLocation) -> u8 {
    match l {
        MemoryLocation::Unknown => 0,
        MemoryLocation::GpuOnly => 1,
        MemoryLocation::CpuToGpu => 2,
        MemoryLocation::GpuToCpu => 3,
    }
}

/// Rounds up to one of four steps per power of two (at most 25% larger), minimum 256 bytes,
/// so released buffers fit later requests of a similar size.
pub fn size_class(size: u64) -> u64 {
    if size <= 256 {
        return 256;
    }
    let top = 63 - (size - 1).leading_zeros(); // 2^top < size <= 2^(top+1)
    let base = 1u64 << top;
    let step = base / 4;
    size.div_ceil(step).saturating_mul(step)
}

/// Per-category statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CategoryStats {
    /// Bytes in live allocations (including retired-but-unfreed and cached).
    pub live_bytes: u64,
    /// Bytes of memory blocks this category's allocator holds.
    pub reserved_bytes: u64,
    /// Highest `live_bytes` seen.
    pub peak_live_bytes: u64,
    /// Live allocations.
    pub allocations: u64,
    /// The cap.
    pub cap_bytes: u64,
    /// Bytes waiting in the retire queue.
    pub pending_bytes: u64,
    /// Resources waiting in the retire queue.
    pub pending_count: u64,
    /// Bytes of released buffers kept for reuse.
    pub cached_bytes: u64,
}

/// A snapshot of understory's memory.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct MemoryStats {
    /// Per category.
    pub categories: PerCategory<CategoryStats>,
    /// Allocations made since creation (cache hits included).
    pub allocations_total: u64,
    /// Buffer requests served from the cache.
    pub cache_hits: u64,
    /// Resources freed by the retire queue since creation.
    pub frees_completed: u64,
    /// Resources and objects that joined the retire queue since creation.
    pub retired_total: u64,
    /// Requests refused with `OverBudget`.
    pub refused_over_budget: u64,
    /// Times empty blocks were released to the driver.
    pub block_releases: u64,
    /// Allocations that got a block of their own size near the vegetation limit.
    pub dedicated_allocations: u64,
}

/// One heap as understory sees it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HeapReport {
    /// The driver's (or estimated) numbers.
    #[serde(flatten)]
    pub budget: HeapBudget,
    /// Bytes of blocks understory holds in this heap, per category.
    pub ours: PerCategory<u64>,
    /// Sum of `ours`.
    pub ours_total: u64,
    /// Of `ours`, bytes waiting in the retire queue (reclaimable within frames in flight).
    pub pending: u64,
    /// `usage - ours`: what the rest of this process holds in the heap (the host engine, its
    /// swapchain and render targets, other libraries). `heapUsage` is per process, so other
    /// processes are not in it: they show up as a lower `budget` instead. 0 when the usage
    /// is estimated (no extension, or the driver's usage was impossible), unless the budget
    /// source declared what others hold ([`HeapBudget::declared_foreign`]).
    pub foreign: u64,
}

/// What a shutdown found.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ShutdownReport {
    /// Resources and objects freed from the retire queue at shutdown.
    pub drained: u64,
    /// Allocations still alive after draining, with name, category and bytes: held by objects
    /// not yet dropped (they are freed when dropped, and keep the device alive until then), or
    /// forgotten. A clean shutdown has none.
    pub leaks: Vec<Leak>,
}

/// One leaked allocation.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Leak {
    /// Its debug name.
    pub name: String,
    /// Its category.
    pub category: Category,
    /// Bytes.
    pub bytes: u64,
}

struct CategoryState {
    category: Category,
    /// Sub-allocations from shared blocks: the configured block sizes, and 4 MiB blocks.
    pools: [BlockPool; 2],
    /// Allocations of their own `VkDeviceMemory` (kept apart so that a block allocator can
    /// give back the empty block gpu-allocator keeps once nothing is sub-allocated).
    dedicated: Option<Allocator>,
    live_bytes: u64,
    peak_live_bytes: u64,
    allocations: u64,
    /// Block bytes attributed to each heap (exact: measured as capacity deltas around each
    /// allocate/free, which are the only calls that create or destroy blocks).
    reserved_by_heap: Vec<u64>,
    live_by_heap: Vec<u64>,
    prioritized: HashSet<vk::DeviceMemory>,
    cache: HashMap<CacheKey, Vec<(vk::Buffer, Allocation, Meta)>>,
    cached_bytes: u64,
}

struct BudgetState {
    heaps: HeapBudgets,
    last: Vec<HeapBudget>,
}

/// The last refresh of one heap, readable without a lock.
struct HeapLimit {
    budget: AtomicU64,
    usage_at_refresh: AtomicU64,
    /// Our reserved bytes in the heap at that refresh.
    ours_at_refresh: AtomicU64,
    /// Whether the numbers are the driver's (`VK_EXT_memory_budget`).
    ext: std::sync::atomic::AtomicBool,
}

/// The device's memory: allocators, accounting, budgets, retire queue.
pub struct Memory {
    pub(crate) id: u64,
    device: ash::Device,
    instance: ash::Instance,
    physical_device: vk::PhysicalDevice,
    config: MemoryConfig,
    heaps: Vec<HeapInfo>,
    type_flags: Vec<(vk::MemoryPropertyFlags, usize)>,
    categories: [Mutex<CategoryState>; CATEGORIES],
    reserved_total_by_heap: Vec<AtomicU64>,
    /// Reserved (block) bytes per category, readable without its lock.
    reserved_by_category: [AtomicU64; CATEGORIES],
    /// The vegetation limit: most bytes of blocks the vegetation categories may reserve
    /// together (`u64::MAX`: none).
    vegetation_limit: AtomicU64,
    /// Serializes allocations in the vegetation categories, so that two cannot both pass the
    /// limit's check.
    vegetation_group: Mutex<()>,
    retire: Mutex<(RetireQueue<Resource>, Vec<u64>)>,
    budget: Mutex<BudgetState>,
    limits: Vec<HeapLimit>,
    pageable: Option<ash::ext::pageable_device_local_memory::Device>,
    alloc_calls: AtomicU64,
    allocations_total: AtomicU64,
    cache_hits: AtomicU64,
    retired_total: AtomicU64,
    refused: AtomicU64,
    block_releases: AtomicU64,
    dedicated: AtomicU64,
    /// Dedicated allocations alive now.
    dedicated_live: AtomicU64,
    /// Whether the budget source failed once (logged once).
    source_failed: std::sync::atomic::AtomicBool,
    /// The driver's allocation granularity ([`Memory::dedicated_footprint`]).
    granularity: u64,
    granularity_measured: bool,
    /// Most dedicated allocations where blocks would do ([`OPTIONAL_DEDICATED_RANGE`]).
    max_optional_dedicated: u64,
}

static NEXT_MEMORY_ID: AtomicU64 = AtomicU64::new(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Memory {
    /// # Safety
    /// The handles must be live and related and outlive this object; `pageable` must be true
    /// only if `VK_EXT_pageable_device_local_memory` and its feature are enabled on `device`.
    pub(crate) unsafe fn new(
        instance: &ash::Instance,
        device: &ash::Device,
        physical_device: vk::PhysicalDevice,
        config: MemoryConfig,
        budgets: HeapBudgets,
        pageable: bool,
    ) -> Result<Self> {
        config.validate()?;
        // SAFETY: physical_device belongs to instance.
        let props = unsafe { instance.get_physical_device_memory_properties(physical_device) };
        // SAFETY: as above.
        let max_allocations = unsafe { instance.get_physical_device_properties(physical_device) }
            .limits
            .max_memory_allocation_count;
        let max_optional_dedicated = (u64::from(max_allocations) / 2)
            .clamp(OPTIONAL_DEDICATED_RANGE.0, OPTIONAL_DEDICATED_RANGE.1);
        let heaps: Vec<HeapInfo> = props
            .memory_heaps_as_slice()
            .iter()
            .map(|h| HeapInfo {
                size: h.size,
                device_local: h.flags.contains(vk::MemoryHeapFlags::DEVICE_LOCAL),
            })
            .collect();
        let type_flags = props
            .memory_types_as_slice()
            .iter()
            .map(|t| (t.property_flags, t.heap_index as usize))
            .collect();
        let n = heaps.len();
        let categories: [Mutex<CategoryState>; CATEGORIES] = std::array::from_fn(|i| {
            Mutex::new(CategoryState {
                category: Category::ALL[i],
                pools: [BlockPool::new(n), BlockPool::new(n)],
                dedicated: None,
                live_bytes: 0,
                peak_live_bytes: 0,
                allocations: 0,
                reserved_by_heap: vec![0; n],
                live_by_heap: vec![0; n],
                prioritized: HashSet::new(),
                cache: HashMap::new(),
                cached_bytes: 0,
            })
        });
        let mut this = Self {
            id: NEXT_MEMORY_ID.fetch_add(1, Ordering::Relaxed),
            device: device.clone(),
            instance: instance.clone(),
            physical_device,
            config,
            heaps,
            type_flags,
            categories,
            reserved_total_by_heap: (0..n).map(|_| AtomicU64::new(0)).collect(),
            reserved_by_category: std::array::from_fn(|_| AtomicU64::new(0)),
            vegetation_limit: AtomicU64::new(u64::MAX),
            vegetation_group: Mutex::new(()),
            retire: Mutex::new((RetireQueue::new(), vec![0; n])),
            budget: Mutex::new(BudgetState {
                heaps: budgets,
                last: Vec::new(),
            }),
            limits: (0..n)
                .map(|_| HeapLimit {
                    budget: AtomicU64::new(u64::MAX),
                    usage_at_refresh: AtomicU64::new(0),
                    ours_at_refresh: AtomicU64::new(0),
                    ext: std::sync::atomic::AtomicBool::new(false),
                })
                .collect(),
            pageable: pageable
                .then(|| ash::ext::pageable_device_local_memory::Device::new(instance, device)),
            alloc_calls: AtomicU64::new(0),
            allocations_total: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            retired_total: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            block_releases: AtomicU64::new(0),
            dedicated: AtomicU64::new(0),
            dedicated_live: AtomicU64::new(0),
            source_failed: std::sync::atomic::AtomicBool::new(false),
            granularity: ASSUMED_ALLOCATION_GRANULARITY,
            granularity_measured: false,
            max_optional_dedicated,
        };
        for c in &this.categories {
            let mut st = lock(c);
            st.pools[Pool::Blocks as usize].allocator = Some(this.new_allocator()?);
            st.pools[Pool::Small as usize].allocator = Some(this.small_allocator()?);
            st.dedicated = Some(this.new_allocator()?);
        }
        this.refresh_budget()?;
        this.measure_granularity()?;
        Ok(this)
    }

    /// With `VK_EXT_memory_budget`: the driver's heapUsage around one 4 KiB allocation of the
    /// memory instances live in tells what a small allocation of its own really costs. Without the extension, or with an implausible answer,
    /// [`ASSUMED_ALLOCATION_GRANULARITY`] stays, labelled as not measured.
    fn measure_granularity(&mut self) -> Result<()> {
        let Some((flags, heap)) = self.predict_type(u32::MAX, MemoryLocation::GpuOnly) else {
            return Ok(());
        };
        let Some(type_index) = self
            .type_flags
            .iter()
            .position(|(f, h)| *h == heap && f.contains(flags))
        else {
            return Ok(());
        };
        let usable = |r: &[HeapReport]| {
            r.get(heap)
                .filter(|h| h.budget.source == Source::Ext && !h.budget.usage_estimated)
                .map(|h| h.budget.usage)
        };
        let Some(before) = usable(&self.refresh_budget()?) else {
            return Ok(());
        };
        let info = vk::MemoryAllocateInfo::default()
            .allocation_size(4096)
            .memory_type_index(type_index as u32);
        // SAFETY: a memory type of this device and a non-zero size
        // (VUID-vkAllocateMemory-pAllocateInfo-01714); freed right below, never bound.
        let Ok(memory) = (unsafe { self.device.allocate_memory(&info, None) }) else {
            return Ok(());
        };
        let after = self.refresh_budget().map(|r| usable(&r));
        // SAFETY: allocated above, never bound or mapped (VUID-vkFreeMemory-memory-00677).
        unsafe { self.device.free_memory(memory, None) };
        if let Some(after) = after? {
            let delta = after.saturating_sub(before);
            if (4096..=(64 << 20)).contains(&delta) {
                self.granularity = delta;
                self.granularity_measured = true;
            }
        }
        log::debug!(
            "allocation granularity {} bytes ({})",
            self.granularity,
            if self.granularity_measured {
                "measured"
            } else {
                "assumed"
            }
        );
        Ok(())
    }

    fn new_allocator(&self) -> Result<Allocator> {
        self.allocator_with(
            AllocationSizes::new(
                self.config.device_block_min_bytes,
                self.config.host_block_min_bytes,
            )
            .with_max_device_memblock_size(self.config.device_block_max_bytes)
            .with_max_host_memblock_size(self.config.host_block_max_bytes),
        )
    }

    /// An allocator of 4 MiB blocks only ([`Pool::Small`]).
    fn small_allocator(&self) -> Result<Allocator> {
        self.allocator_with(
            AllocationSizes::new(SMALL_BLOCK, SMALL_BLOCK)
                .with_max_device_memblock_size(SMALL_BLOCK)
                .with_max_host_memblock_size(SMALL_BLOCK),
        )
    }

    fn allocator_with(&self, sizes: AllocationSizes) -> Result<Allocator> {
        let mut debug_settings = AllocatorDebugSettings::default();
        // understory reports leaks itself, by name and category.
        debug_settings.log_leaks_on_shutdown = false;
        Ok(Allocator::new(&AllocatorCreateDesc {
            instance: self.instance.clone(),
            device: self.device.clone(),
            physical_device: self.physical_device,
            debug_settings,
            buffer_device_address: false,
            allocation_sizes: sizes,
        })?)
    }

    /// The configuration.
    pub fn config(&self) -> &MemoryConfig {
        &self.config
    }

    /// The memory heaps.
    pub fn heaps(&self) -> &[HeapInfo] {
        &self.heaps
    }

    /// The heap vegetation lives in: the largest device-local one (the VRAM, not a small
    /// device-local carve-out such as the 256 MiB BAR window some drivers list as a heap of
    /// its own); the largest heap if the driver marks none device-local, which conforming
    /// drivers never do.
    pub fn device_local_heap(&self) -> usize {
        let largest = |device_local: bool| {
            self.heaps
                .iter()
                .enumerate()
                .filter(|(_, h)| h.device_local || !device_local)
                .max_by_key(|(i, h)| (h.size, std::cmp::Reverse(*i)))
                .map(|(i, _)| i)
        };
        largest(true).or_else(|| largest(false)).unwrap_or(0)
    }

    /// Replaces where budgets come from (tests inject budgets that shrink and grow on cue), and
    /// refreshes.
    pub fn set_budget_source(&self, heaps: HeapBudgets) -> Result<Vec<HeapReport>> {
        lock(&self.budget).heaps = heaps;
        self.refresh_budget()
    }
    /// The memory type gpu-allocator will pick (its flags and heap).
    fn predict_type(
        &self,
        type_bits: u32,
        location: MemoryLocation,
    ) -> Option<(vk::MemoryPropertyFlags, usize)> {
        use vk::MemoryPropertyFlags as F;
        let (preferred, required) = match location {
            MemoryLocation::GpuOnly => (F::DEVICE_LOCAL, F::DEVICE_LOCAL),
            MemoryLocation::CpuToGpu => (
                F::HOST_VISIBLE | F::HOST_COHERENT | F::DEVICE_LOCAL,
                F::HOST_VISIBLE | F::HOST_COHERENT,
            ),
            MemoryLocation::GpuToCpu => (
                F::HOST_VISIBLE | F::HOST_COHERENT | F::HOST_CACHED,
                F::HOST_VISIBLE | F::HOST_COHERENT,
            ),
            MemoryLocation::Unknown => (F::empty(), F::empty()),
        };
        let find = |want: F| {
            self.type_flags
                .iter()
                .enumerate()
                .find(|(i, (f, _))| type_bits & (1 << i) != 0 && f.contains(want))
                .map(|(_, t)| *t)
        };
        find(preferred).or_else(|| find(required))
    }

    /// The heap an allocation actually landed in.
    fn heap_of(&self, req: &vk::MemoryRequirements, a: &Allocation) -> usize {
        let props = a.memory_properties();
        self.type_flags
            .iter()
            .enumerate()
            .find(|(i, (f, _))| req.memory_type_bits & (1 << i) != 0 && *f == props)
            .map_or(0, |(_, (_, heap))| *heap)
    }

    /// Budget and current usage of a heap: the last refresh, moved by what we reserved since.
    /// Lock-free: it runs on every allocation.
    fn heap_usage_now(&self, heap: usize) -> (u64, u64) {
        let l = &self.limits[heap];
        let ours_now = self.reserved_total_by_heap[heap].load(Ordering::Relaxed);
        let budget = l.budget.load(Ordering::Relaxed);
        if l.ext.load(Ordering::Relaxed) {
            let since = ours_now as i128 - l.ours_at_refresh.load(Ordering::Relaxed) as i128;
            let usage = (l.usage_at_refresh.load(Ordering::Relaxed) as i128 + since).max(0) as u64;
            (budget, usage)
        } else {
            (budget, ours_now)
        }
    }

    /// gpu-allocator's (first, largest) block sizes for memory of these flags: host-visible
    /// types get the host sizes.
    fn block_sizes(&self, flags: vk::MemoryPropertyFlags) -> (u64, u64) {
        if flags.contains(vk::MemoryPropertyFlags::HOST_VISIBLE) {
            (
                self.config.host_block_min_bytes,
                self.config.host_block_max_bytes,
            )
        } else {
            (
                self.config.device_block_min_bytes,
                self.config.device_block_max_bytes,
            )
        }
    }

    /// Sub-allocates, enforcing the category cap, the vegetation limit (reserved bytes) and the
    /// heap budget. Nothing is left allocated on error. Returns the allocation, its heap and
    /// its pool.
    ///
    /// The atlas and the cull and draw outputs always get allocations of their own (few,
    /// large, long-lived): what they reserve is what they use, and no block of theirs stays
    /// behind when the budget falls. So does staging (a buffer or two a frame, freed once the
    /// frame completes): no staging block stays reserved between uploads, which on a device
    /// with one heap would take room from the vegetation it is there to feed. Instances share blocks: the configured ones, or 4 MiB
    /// blocks while the vegetation limit is under eight of the configured first blocks; near
    /// the limit, an allocation that would need a new block gets memory of its own, counted at
    /// the driver's allocation granularity.
    #[allow(clippy::too_many_arguments)]
    fn allocate(
        &self,
        category: Category,
        name: &str,
        req: vk::MemoryRequirements,
        location: MemoryLocation,
        linear: bool,
        handle: Dedicated,
        placement: Placement,
    ) -> Result<(Allocation, usize, Pool)> {
        let n = self.alloc_calls.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(k) = self.config.fail_every_nth_allocation {
            if n.is_multiple_of(k.get()) {
                return Err(Error::OutOfDeviceMemory {
                    call: "allocate (injected fault)",
                });
            }
        }
        let size = req.size;
        let (flags, heap) = self
            .predict_type(req.memory_type_bits, location)
            .ok_or_else(|| {
                Error::Unsupported(format!("{name}: no memory type for {location:?}"))
            })?;
        let (block_min, block_max) = self.block_sizes(flags);
        if size > self.heaps[heap].size {
            return Err(Error::InvalidInput(format!(
                "{name}: {size} bytes is larger than heap {heap} ({} bytes)",
                self.heaps[heap].size
            )));
        }
        let refuse = |what: String, available: u64| {
            self.refused.fetch_add(1, Ordering::Relaxed);
            Err(Error::OverBudget {
                what,
                requested: size,
                available,
            })
        };
        let _group = category
            .is_vegetation()
            .then(|| lock(&self.vegetation_group));
        let mut st = lock(&self.categories[category as usize]);
        let cap = self.config.cap_bytes[category];
        if st.live_bytes.saturating_add(size) > cap {
            return refuse(
                format!("{name} ({category} cap)"),
                cap.saturating_sub(st.live_bytes),
            );
        }
        let always_dedicated = matches!(
            category,
            Category::Atlas | Category::Outputs | Category::Staging
        );
        let limit = self.vegetation_limit.load(Ordering::Relaxed);
        let limited = category.is_vegetation() && limit != u64::MAX;
        let relocate = placement == Placement::Relocate && category.is_vegetation();
        let reserved_before = self.vegetation_reserved();
        // Over the limit, vegetation sheds: nothing new, not even into the free room of a block
        // (the blocks have to drain for their memory to go back), except relocations.
        if limited && !relocate && reserved_before > limit {
            return refuse(format!("{name} (vegetation over its budget)"), 0);
        }
        let footprint = self.dedicated_footprint(size);
        let optional_room = self.dedicated_room() > 0;
        // Which blocks: 4 MiB ones for instances under a limit too small for the configured
        // blocks, the configured ones otherwise.
        let small = category == Category::Instances && limited && limit < 8 * block_min;
        if relocate && !optional_room {
            return refuse(
                format!("{name} (relocation: no more allocations of its own)"),
                0,
            );
        }
        let pool_ix = if small { Pool::Small } else { Pool::Blocks } as usize;
        let (pool_min, pool_max) = if small {
            (SMALL_BLOCK, SMALL_BLOCK)
        } else {
            (block_min, block_max)
        };
        let bp = &st.pools[pool_ix];
        let free_in_blocks = bp.reserved[heap].saturating_sub(bp.live[heap]);
        // gpu-allocator's blocks double from the first size up to the largest.
        let next_block = bp.reserved[heap].clamp(pool_min, pool_max);
        // The vegetation limit counts blocks, not sub-allocations: near it, an allocation that
        // would need a new block gets memory of its own (counted at the driver's granularity),
        // so a small limit still works and nothing is reserved past it.
        let shared_only = placement == Placement::Shared && !always_dedicated;
        // A relocation always gets memory of its own (moving out of blocks to let them drain).
        let mut dedicated = always_dedicated
            || relocate
            || size > pool_max
            || (limited
                && !shared_only
                && optional_room
                && free_in_blocks < size
                && reserved_before.saturating_add(size.max(next_block)) > limit);
        let needs_new = dedicated || free_in_blocks < size;
        let cost = if dedicated {
            footprint
        } else {
            size.max(next_block)
        };
        if limited && !relocate && needs_new && reserved_before.saturating_add(cost) > limit {
            return refuse(
                format!("{name} (vegetation budget)"),
                limit.saturating_sub(reserved_before),
            );
        }
        let mut growth = if needs_new { cost } else { 0 };
        let (budget, usage) = self.heap_usage_now(heap);
        if usage.saturating_add(growth) > budget
            && !dedicated
            && !shared_only
            && optional_room
            && usage.saturating_add(footprint) <= budget
        {
            // A new block does not fit the heap's budget, memory of its own does (a tight heap
            // shared with staging, as on devices with one heap).
            dedicated = true;
            growth = footprint;
        }
        if usage.saturating_add(growth) > budget {
            return refuse(
                format!("{name} (heap {heap} budget)"),
                budget.saturating_sub(usage),
            );
        }
        let st = &mut *st;
        loop {
            let pool = if dedicated {
                Pool::Dedicated
            } else if small {
                Pool::Small
            } else {
                Pool::Blocks
            };
            let allocator = match pool {
                Pool::Dedicated => st.dedicated.as_mut(),
                p => st.pools[p as usize].allocator.as_mut(),
            }
            .ok_or_else(|| Error::Lifecycle("memory was shut down".into()))?;
            let before = allocator.capacity();
            let allocation = allocator.allocate(&AllocationCreateDesc {
                name,
                requirements: req,
                location,
                linear,
                allocation_scheme: if dedicated {
                    handle.scheme()
                } else {
                    AllocationScheme::GpuAllocatorManaged
                },
            })?;
            let grown = allocator.capacity().saturating_sub(before);
            let heap = self.heap_of(&req, &allocation);
            if dedicated {
                self.dedicated_live.fetch_add(1, Ordering::Relaxed);
                // What the driver reserves for it: at least its allocation granularity.
                self.add_reserved(st, heap, self.dedicated_footprint(grown));
            } else {
                self.add_reserved(st, heap, grown);
                let bp = &mut st.pools[pool as usize];
                bp.allocations += 1;
                bp.reserved[heap] += grown;
                bp.live[heap] += allocation.size();
            }
            if grown > 0 {
                let (budget, usage) = self.heap_usage_now(heap);
                if usage > budget {
                    self.free_locked(st, heap, pool, allocation);
                    return refuse(format!("{name} (new block in heap {heap})"), 0);
                }
                if limited && !relocate && self.vegetation_reserved() > limit {
                    // A block bigger than the room (fragmentation, or the doubling block
                    // size): give it back, and try once more with memory of its own.
                    self.free_locked(st, heap, pool, allocation);
                    if !dedicated
                        && !shared_only
                        && optional_room
                        && reserved_before.saturating_add(footprint) <= limit
                    {
                        dedicated = true;
                        continue;
                    }
                    return refuse(
                        format!("{name} (vegetation budget)"),
                        limit.saturating_sub(reserved_before),
                    );
                }
            }
            let bytes = allocation.size();
            st.live_bytes += bytes;
            st.live_by_heap[heap] += bytes;
            st.allocations += 1;
            st.peak_live_bytes = st.peak_live_bytes.max(st.live_bytes);
            self.allocations_total.fetch_add(1, Ordering::Relaxed);
            if dedicated && !always_dedicated {
                self.dedicated.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(pageable) = &self.pageable {
                // SAFETY: reading the handle of a live allocation.
                let memory = unsafe { allocation.memory() };
                if grown > 0 || !st.prioritized.contains(&memory) {
                    // SAFETY: memory is a live VkDeviceMemory of this device; the extension
                    // and its feature are enabled (constructor contract); priority is in 0..=1
                    // (validated).
                    unsafe {
                        (pageable.fp().set_device_memory_priority_ext)(
                            self.device.handle(),
                            memory,
                            self.config.priority[category],
                        )
                    };
                    st.prioritized.insert(memory);
                }
            }
            return Ok((allocation, heap, pool));
        }
    }

    /// What the driver reserves for memory of its own of `size` bytes: `size` rounded up to
    /// its allocation granularity (measured at start-up with `VK_EXT_memory_budget`,
    /// [`ASSUMED_ALLOCATION_GRANULARITY`] without).
    pub fn dedicated_footprint(&self, size: u64) -> u64 {
        size.div_ceil(self.granularity)
            .saturating_mul(self.granularity)
    }

    /// The driver's allocation granularity in use ([`Memory::dedicated_footprint`]), and
    /// whether it was measured.
    pub fn allocation_granularity(&self) -> (u64, bool) {
        (self.granularity, self.granularity_measured)
    }

    /// The bytes a buffer of `size` bytes in `category` will hold: its size class where the
    /// category caches released buffers and the class fits the cache, rounded to 256 bytes (the usual alignment). For
    /// planning; the real number is [`Buffer::bytes`].
    pub fn predicted_bytes(&self, category: Category, size: u64) -> u64 {
        let class = self.cache_class(category, size).unwrap_or(size);
        class.div_ceil(256) * 256
    }

    /// The size class a buffer of `size` bytes in `category` is made (and cached) at: only
    /// where the category caches released buffers and the class fits that cache. A larger
    /// buffer could never be cached, so it is made at its own size (no quarter wasted, and a
    /// source just under 4 GiB stays under 4 GiB).
    pub(crate) fn cache_class(&self, category: Category, size: u64) -> Option<u64> {
        let cache = self.config.cache_bytes[category];
        let class = size_class(size);
        (cache > 0 && class <= cache).then_some(class)
    }

    /// Whether the instances' shared blocks are too big for the vegetation limit: a new block
    /// would pass it, so new allocations are dedicated, and what still lives in blocks should
    /// move out for the blocks to go back (see `Vegetation`'s relocation).
    pub(crate) fn blocks_too_big(&self) -> bool {
        let limit = self.vegetation_limit.load(Ordering::Relaxed);
        limit != u64::MAX
            && self
                .vegetation_reserved()
                .saturating_add(self.instance_block(limit))
                > limit
    }

    /// The first block size new instance allocations would get under `limit`.
    fn instance_block(&self, limit: u64) -> u64 {
        let min = self
            .predict_type(u32::MAX, MemoryLocation::GpuOnly)
            .map_or(SMALL_BLOCK, |(flags, _)| self.block_sizes(flags).0);
        if limit < 8 * min { SMALL_BLOCK } else { min }
    }

    /// Dedicated allocations that may still be made where blocks would do (relocations).
    pub(crate) fn dedicated_room(&self) -> u64 {
        self.max_optional_dedicated
            .saturating_sub(self.dedicated_live.load(Ordering::Relaxed))
    }

    /// Whether new instance allocations would go to blocks again (the budget has room for one
    /// more block of the size they would get): patches moved to allocations of their own
    /// under a small budget may move back.
    pub(crate) fn blocks_fit_again(&self) -> bool {
        let limit = self.vegetation_limit.load(Ordering::Relaxed);
        self.vegetation_reserved()
            .saturating_add(self.instance_block(limit))
            <= limit
    }

    /// Bytes of shared blocks (both sizes) the category holds (the rest of its reserved bytes
    /// are memory of its own).
    pub(crate) fn block_bytes(&self, category: Category) -> u64 {
        let st = lock(&self.categories[category as usize]);
        st.pools.iter().flat_map(|p| p.reserved.iter()).sum()
    }

    /// Bytes of the category's shared blocks that no allocation uses: what moving the rest
    /// out (relocation) would give back.
    pub(crate) fn block_slack(&self, category: Category) -> u64 {
        let st = lock(&self.categories[category as usize]);
        st.pools
            .iter()
            .map(|p| {
                let reserved: u64 = p.reserved.iter().sum();
                let live: u64 = p.live.iter().sum();
                reserved.saturating_sub(live)
            })
            .sum()
    }

    /// Bytes of blocks the vegetation categories hold together.
    pub fn vegetation_reserved(&self) -> u64 {
        Category::VEGETATION
            .iter()
            .map(|c| self.reserved_by_category[*c as usize].load(Ordering::Relaxed))
            .sum()
    }

    /// The vegetation limit: the most bytes of blocks the vegetation categories (instances,
    /// atlas, outputs) may reserve together. Allocations past it are `OverBudget`; near it,
    /// new allocations get blocks of their own size. `u64::MAX` lifts it. `Vegetation` sets it
    /// to its budget every frame.
    pub fn set_vegetation_limit(&self, bytes: u64) {
        self.vegetation_limit.store(bytes, Ordering::Relaxed);
    }

    /// The vegetation limit now.
    pub fn vegetation_limit(&self) -> u64 {
        self.vegetation_limit.load(Ordering::Relaxed)
    }

    /// Accounts `grown` bytes of new blocks of `st`'s category in `heap`.
    fn add_reserved(&self, st: &mut CategoryState, heap: usize, grown: u64) {
        st.reserved_by_heap[heap] += grown;
        self.reserved_total_by_heap[heap].fetch_add(grown, Ordering::Relaxed);
        self.reserved_by_category[st.category as usize].fetch_add(grown, Ordering::Relaxed);
    }

    /// Accounts `shrunk` bytes of blocks of `st`'s category in `heap` given back.
    fn sub_reserved(&self, st: &mut CategoryState, heap: usize, shrunk: u64) {
        let shrunk = shrunk.min(st.reserved_by_heap[heap]);
        st.reserved_by_heap[heap] -= shrunk;
        self.reserved_total_by_heap[heap].fetch_sub(shrunk, Ordering::Relaxed);
        self.reserved_by_category[st.category as usize].fetch_sub(shrunk, Ordering::Relaxed);
    }

    /// Frees an allocation under its category's lock, keeping the accounting exact.
    fn free_locked(&self, st: &mut CategoryState, heap: usize, pool: Pool, allocation: Allocation) {
        let bytes = allocation.size();
        let Some(allocator) = (match pool {
            Pool::Dedicated => st.dedicated.as_mut(),
            p => st.pools[p as usize].allocator.as_mut(),
        }) else {
            return;
        };
        let before = allocator.capacity();
        if let Err(e) = allocator.free(allocation) {
            log::error!("gpu-allocator free failed: {e}");
        }
        let mut shrunk = before.saturating_sub(allocator.capacity());
        if pool == Pool::Dedicated {
            self.dedicated_live.fetch_sub(1, Ordering::Relaxed);
            shrunk = self.dedicated_footprint(shrunk);
        } else {
            let bp = &mut st.pools[pool as usize];
            bp.allocations = bp.allocations.saturating_sub(1);
            bp.reserved[heap] = bp.reserved[heap].saturating_sub(shrunk);
            bp.live[heap] = bp.live[heap].saturating_sub(bytes);
        }
        if shrunk > 0 {
            self.sub_reserved(st, heap, shrunk);
            // A destroyed block's handle may be reused by the driver for a new block.
            st.prioritized.clear();
        }
    }

    fn release_live(st: &mut CategoryState, heap: usize, bytes: u64) {
        st.live_bytes -= bytes;
        st.live_by_heap[heap] -= bytes;
        st.allocations -= 1;
    }

    /// Allocates for a freshly created handle and binds it; on any failure calls `destroy` and
    /// frees what was allocated, so nothing is left behind.
    #[allow(clippy::too_many_arguments)]
    fn allocate_and_bind(
        &self,
        category: Category,
        name: &str,
        req: vk::MemoryRequirements,
        (location, linear, handle, placement): (MemoryLocation, bool, Dedicated, Placement),
        bind_call: &'static str,
        bind: impl FnOnce(&Allocation) -> std::result::Result<(), vk::Result>,
        destroy: impl FnOnce(),
    ) -> Result<(Allocation, Meta)> {
        let (allocation, heap, pool) =
            match self.allocate(category, name, req, location, linear, handle, placement) {
                Ok(a) => a,
                Err(e) => {
                    destroy();
                    return Err(e);
                }
            };
        let meta = Meta {
            name: name.into(),
            category,
            heap,
            bytes: allocation.size(),
            owner: self.id,
            pool,
        };
        if let Err(e) = bind(&allocation) {
            destroy();
            let mut st = lock(&self.categories[category as usize]);
            Self::release_live(&mut st, heap, meta.bytes);
            self.free_locked(&mut st, heap, pool, allocation);
            return Err(Error::vk(bind_call, e));
        }
        Ok((allocation, meta))
    }

    /// Creates a buffer bound to a sub-allocation (or reuses a cached one of the same size class).
    /// Typed errors: zero size, size over the heap, [`Error::OverBudget`], out of memory.
    pub(crate) fn create_buffer(
        &self,
        shared: &Arc<Shared>,
        desc: &BufferDesc<'_>,
    ) -> Result<Buffer> {
        self.create_buffer_placed(shared, desc, Placement::Auto)
    }

    /// As [`Memory::create_buffer`], placed as asked (a relocation never comes from the cache).
    pub(crate) fn create_buffer_placed(
        &self,
        shared: &Arc<Shared>,
        desc: &BufferDesc<'_>,
        placement: Placement,
    ) -> Result<Buffer> {
        if desc.size == 0 {
            return Err(Error::InvalidInput(format!(
                "buffer {:?}: size 0",
                desc.name
            )));
        }
        if desc.usage.is_empty() {
            return Err(Error::InvalidInput(format!(
                "buffer {:?}: no usage flags",
                desc.name
            )));
        }
        // Round to a size class only where released buffers are cached for reuse.
        let class = self
            .cache_class(desc.category, desc.size)
            .unwrap_or(desc.size);
        let key = CacheKey {
            usage: desc.usage,
            location: location_id(desc.location),
            class_bytes: class,
        };
        if placement == Placement::Auto {
            if let Some(b) = self.take_cached(shared, desc, key) {
                return Ok(b);
            }
        }
        let info = vk::BufferCreateInfo::default()
            .size(class)
            .usage(desc.usage)
            .sharing_mode(vk::SharingMode::EXCLUSIVE);
        // SAFETY: valid create info; the device is alive.
        let raw =
            unsafe { self.device.create_buffer(&info, None) }.map_err(vk_err("vkCreateBuffer"))?;
        // SAFETY: raw was just created from this device.
        let req = unsafe { self.device.get_buffer_memory_requirements(raw) };
        let (allocation, meta) = self.allocate_and_bind(
            desc.category,
            desc.name,
            req,
            (desc.location, true, Dedicated::Buffer(raw), placement),
            "vkBindBufferMemory",
            // SAFETY: the allocation satisfies the buffer's requirements and is unbound
            // (VUID-vkBindBufferMemory-memory-01035, -memoryOffset-01036).
            |a| unsafe { self.device.bind_buffer_memory(raw, a.memory(), a.offset()) },
            // SAFETY: unbound or failed to bind, never used.
            || unsafe { self.device.destroy_buffer(raw, None) },
        )?;
        Ok(Buffer {
            raw,
            allocation: Some(allocation),
            size: desc.size,
            usage: desc.usage,
            location: desc.location,
            meta,
            id: NEXT_RESOURCE_ID.fetch_add(1, Ordering::Relaxed),
            last_use: AtomicU64::new(0),
            shared: shared.clone(),
        })
    }

    fn take_cached(
        &self,
        shared: &Arc<Shared>,
        desc: &BufferDesc<'_>,
        key: CacheKey,
    ) -> Option<Buffer> {
        if self.config.cache_bytes[desc.category] == 0 {
            return None;
        }
        let mut st = lock(&self.categories[desc.category as usize]);
        let (raw, mut allocation, mut meta) = st.cache.get_mut(&key)?.pop()?;
        st.cached_bytes -= meta.bytes;
        // Leak reports name the new owner.
        let allocator = match meta.pool {
            Pool::Dedicated => st.dedicated.as_mut(),
            p => st.pools[p as usize].allocator.as_mut(),
        };
        if let Some(a) = allocator {
            let _ = a.rename_allocation(&mut allocation, desc.name);
        }
        drop(st);
        meta.name = desc.name.into();
        self.allocations_total.fetch_add(1, Ordering::Relaxed);
        self.cache_hits.fetch_add(1, Ordering::Relaxed);
        Some(Buffer {
            raw,
            allocation: Some(allocation),
            size: desc.size,
            usage: desc.usage,
            location: desc.location,
            meta,
            id: NEXT_RESOURCE_ID.fetch_add(1, Ordering::Relaxed),
            last_use: AtomicU64::new(0),
            shared: shared.clone(),
        })
    }

    /// Creates a 2D optimal-tiling image in device-local memory.
    pub(crate) fn create_image(&self, shared: &Arc<Shared>, desc: &ImageDesc<'_>) -> Result<Image> {
        if desc.extent.width == 0 || desc.extent.height == 0 || desc.mip_levels == 0 {
            return Err(Error::InvalidInput(format!(
                "image {:?}: extent {}x{} with {} mips",
                desc.name, desc.extent.width, desc.extent.height, desc.mip_levels
            )));
        }
        let max_mips = 32 - desc.extent.width.max(desc.extent.height).leading_zeros();
        if desc.mip_levels > max_mips {
            return Err(Error::InvalidInput(format!(
                "image {:?}: {} mips, at most {max_mips} for {}x{}",
                desc.name, desc.mip_levels, desc.extent.width, desc.extent.height
            )));
        }
        let info = vk::ImageCreateInfo::default()
            .image_type(vk::ImageType::TYPE_2D)
            .format(desc.format)
            .extent(vk::Extent3D {
                width: desc.extent.width,
                height: desc.extent.height,
                depth: 1,
            })
            .mip_levels(desc.mip_levels)
            .array_layers(1)
            .samples(vk::SampleCountFlags::TYPE_1)
            .tiling(vk::ImageTiling::OPTIMAL)
            .usage(desc.usage)
            .sharing_mode(vk::SharingMode::EXCLUSIVE)
            .initial_layout(vk::ImageLayout::UNDEFINED);
        // SAFETY: valid create info (format support is the caller's choice; errors are mapped).
        let raw =
            unsafe { self.device.create_image(&info, None) }.map_err(vk_err("vkCreateImage"))?;
        // SAFETY: raw was just created.
        let req = unsafe { self.device.get_image_memory_requirements(raw) };
        let (allocation, meta) = self.allocate_and_bind(
            desc.category,
            desc.name,
            req,
            (
                MemoryLocation::GpuOnly,
                false,
                Dedicated::Image(raw),
                Placement::Auto,
            ),
            "vkBindImageMemory",
            // SAFETY: the allocation satisfies the image's requirements and is unbound.
            |a| unsafe { self.device.bind_image_memory(raw, a.memory(), a.offset()) },
            // SAFETY: unbound or failed to bind, never used.
            || unsafe { self.device.destroy_image(raw, None) },
        )?;
        Ok(Image {
            raw,
            allocation: Some(allocation),
            extent: desc.extent,
            format: desc.format,
            mip_levels: desc.mip_levels,
            usage: desc.usage,
            meta,
            id: NEXT_RESOURCE_ID.fetch_add(1, Ordering::Relaxed),
            last_use: AtomicU64::new(0),
            shared: shared.clone(),
        })
    }

    /// Queues a resource to be freed once the GPU has completed frame `last_used`.
    fn retire_resource(&self, resource: Resource, last_used: u64) {
        let (heap, bytes, category) = resource.held();
        let mut q = lock(&self.retire);
        q.1[heap] += bytes;
        q.0.retire(resource, last_used, bytes, category);
        self.retired_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Queues a Vulkan object (null handles are ignored).
    pub(crate) fn retire_object(&self, object: RawObject, last_used: u64) {
        if !object.is_null() {
            self.retire_resource(Resource::Object(object), last_used);
        }
    }

    /// Frees everything whose frame the GPU has completed. Returns how many were freed.
    pub(crate) fn collect(&self, completed: u64) -> usize {
        let freed = {
            let mut q = lock(&self.retire);
            let freed = q.0.collect(completed);
            for r in &freed {
                let (heap, bytes, _) = r.resource.held();
                q.1[heap] -= bytes;
            }
            freed
        };
        let n = freed.len();
        let comfortable = !self.headroom_low();
        self.free_resources(freed, comfortable);
        n
    }

    /// Destroys resources' handles and frees their memory (or caches buffers for reuse), taking
    /// each category's lock once per batch.
    fn free_resources(&self, resources: Vec<Retired<Resource>>, may_cache: bool) {
        if resources.is_empty() {
            return;
        }
        // Every category lock at once, always in index order (other paths hold at most one),
        // so the batch is walked once with no regrouping copies.
        let mut guards: Vec<MutexGuard<'_, CategoryState>> =
            self.categories.iter().map(lock).collect();
        for r in resources {
            let c = r.resource.held().2 as usize;
            self.free_one(&mut guards[c], r.resource, may_cache);
        }
    }

    fn free_one(&self, st: &mut CategoryState, resource: Resource, may_cache: bool) {
        match resource {
            Resource::Buffer {
                raw,
                allocation,
                meta,
                key,
            } => {
                if let Some(key) = key {
                    // Memory of its own is never kept for reuse: a cached one would hold a
                    // whole allocation (the driver's granularity) for a few bytes.
                    if may_cache
                        && meta.pool != Pool::Dedicated
                        && st.cached_bytes + meta.bytes <= self.config.cache_bytes[meta.category]
                    {
                        st.cached_bytes += meta.bytes;
                        st.cache
                            .entry(key)
                            .or_default()
                            .push((raw, allocation, meta));
                        return;
                    }
                }
                // SAFETY: the GPU has completed every use (retire contract) and nothing else
                // holds the handle.
                unsafe { self.device.destroy_buffer(raw, None) };
                Self::release_live(st, meta.heap, meta.bytes);
                self.free_locked(st, meta.heap, meta.pool, allocation);
            }
            Resource::Image {
                raw,
                allocation,
                meta,
            } => {
                // SAFETY: as above.
                unsafe { self.device.destroy_image(raw, None) };
                Self::release_live(st, meta.heap, meta.bytes);
                self.free_locked(st, meta.heap, meta.pool, allocation);
            }
            // SAFETY: as above; objects in the queue belong to this device (the constructors
            // and `Context::retire_object` see to it).
            Resource::Object(o) => unsafe { o.destroy(&self.device) },
        }
    }

    /// Whether any heap's headroom is below the configured share of its budget.
    fn headroom_low(&self) -> bool {
        (0..self.heaps.len()).any(|h| {
            let (budget, usage) = self.heap_usage_now(h);
            budget != u64::MAX
                && (budget.saturating_sub(usage) as f64)
                    < budget as f64 * self.config.release_below_headroom_fraction
        })
    }

    /// Frees every cached buffer. Returns bytes freed from live allocations.
    pub fn flush_cache(&self) -> u64 {
        Category::ALL.iter().map(|c| self.flush_cache_of(*c)).sum()
    }

    /// Frees the cached buffers of one category. Returns bytes freed from live allocations.
    pub fn flush_cache_of(&self, category: Category) -> u64 {
        let mut freed = 0;
        let mut st = lock(&self.categories[category as usize]);
        let cache = std::mem::take(&mut st.cache);
        st.cached_bytes = 0;
        for (raw, allocation, meta) in cache.into_values().flatten() {
            // SAFETY: cached buffers were retired and their values completed.
            unsafe { self.device.destroy_buffer(raw, None) };
            freed += meta.bytes;
            Self::release_live(&mut st, meta.heap, meta.bytes);
            self.free_locked(&mut st, meta.heap, meta.pool, allocation);
        }
        freed
    }

    /// Returns the block gpu-allocator keeps empty, for every block allocator of every
    /// category that holds no sub-allocation, by dropping and recreating it (memory of its
    /// own is in another allocator and stays). Returns bytes given back to the driver.
    pub fn release_empty_blocks(&self) -> Result<u64> {
        let mut released = 0;
        for c in Category::ALL {
            released += self.release_empty_blocks_of(c)?;
        }
        Ok(released)
    }

    /// As [`Memory::release_empty_blocks`], for one category.
    pub fn release_empty_blocks_of(&self, category: Category) -> Result<u64> {
        let mut released = 0;
        {
            let mut st = lock(&self.categories[category as usize]);
            for pool in [Pool::Blocks, Pool::Small] {
                let bp = &st.pools[pool as usize];
                let reserved: u64 = bp.reserved.iter().sum();
                if bp.allocations > 0 || reserved == 0 {
                    continue;
                }
                let fresh = if pool == Pool::Small {
                    self.small_allocator()?
                } else {
                    self.new_allocator()?
                };
                drop(st.pools[pool as usize].allocator.replace(fresh));
                for h in 0..st.reserved_by_heap.len() {
                    let r = std::mem::take(&mut st.pools[pool as usize].reserved[h]);
                    self.sub_reserved(&mut st, h, r);
                }
                st.prioritized.clear();
                released += reserved;
            }
        }
        if released > 0 {
            self.block_releases.fetch_add(1, Ordering::Relaxed);
            log::debug!("released {released} bytes of empty blocks");
        }
        Ok(released)
    }

    /// Reads the budget source (once a frame) and reports every heap. When headroom is low,
    /// flushes the buffer cache and releases empty blocks first.
    pub fn refresh_budget(&self) -> Result<Vec<HeapReport>> {
        if !lock(&self.budget).last.is_empty() && self.headroom_low() {
            self.flush_cache();
            self.release_empty_blocks()?;
        }
        let ours: Vec<u64> = self
            .reserved_total_by_heap
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
        let snapshot = {
            let mut b = lock(&self.budget);
            // A source that fails, or reports other heaps than the device has, must not stop
            // the frame loop: its numbers are replaced by the labelled estimate (logged once).
            let last = match b.heaps.refresh(&ours) {
                Ok(h) if h.len() == self.heaps.len() => h.to_vec(),
                got => {
                    let why = match got {
                        Ok(h) => {
                            format!("{} heaps for a device with {}", h.len(), self.heaps.len())
                        }
                        Err(e) => e.to_string(),
                    };
                    if !self.source_failed.swap(true, Ordering::Relaxed) {
                        log::warn!("budget source: {why}; using the estimate until it recovers");
                    }
                    let raw: Vec<RawHeap> = self
                        .heaps
                        .iter()
                        .map(|info| RawHeap {
                            info: *info,
                            driver: None,
                        })
                        .collect();
                    resolve(&raw, &ours)
                }
            };
            for (h, l) in last.iter().zip(&self.limits) {
                l.budget.store(h.budget, Ordering::Relaxed);
                l.usage_at_refresh.store(h.usage, Ordering::Relaxed);
                l.ours_at_refresh.store(
                    ours.get(h.index as usize).copied().unwrap_or(0),
                    Ordering::Relaxed,
                );
                l.ext.store(h.source == Source::Ext, Ordering::Relaxed);
            }
            b.last = last.clone();
            last
        };
        let by_category: Vec<Vec<u64>> = self
            .categories
            .iter()
            .map(|c| lock(c).reserved_by_heap.clone())
            .collect();
        let pending = lock(&self.retire).1.clone();
        Ok(snapshot
            .into_iter()
            .enumerate()
            .map(|(h, budget)| {
                let mut per = PerCategory::<u64>::default();
                for c in Category::ALL {
                    per[c] = by_category[c as usize].get(h).copied().unwrap_or(0);
                }
                let ours_total = ours.get(h).copied().unwrap_or(0);
                HeapReport {
                    foreign: match budget.source {
                        Source::Ext if !budget.usage_estimated => {
                            budget.usage.saturating_sub(ours_total)
                        }
                        _ => budget.declared_foreign,
                    },
                    budget,
                    ours: per,
                    ours_total,
                    pending: pending.get(h).copied().unwrap_or(0),
                }
            })
            .collect())
    }

    /// The last budget read, without reading the driver.
    pub fn last_budget(&self) -> Vec<HeapBudget> {
        lock(&self.budget).last.clone()
    }

    /// Statistics now.
    pub fn stats(&self) -> MemoryStats {
        let (pending_bytes, pending_count) = {
            let q = lock(&self.retire);
            (q.0.pending_bytes(), q.0.pending_count())
        };
        let frees_completed = lock(&self.retire).0.freed_total();
        let mut categories = PerCategory::<CategoryStats>::default();
        for c in Category::ALL {
            let st = lock(&self.categories[c as usize]);
            categories[c] = CategoryStats {
                live_bytes: st.live_bytes,
                reserved_bytes: st.reserved_by_heap.iter().sum(),
                peak_live_bytes: st.peak_live_bytes,
                allocations: st.allocations,
                cap_bytes: self.config.cap_bytes[c],
                pending_bytes: pending_bytes[c],
                pending_count: pending_count[c],
                cached_bytes: st.cached_bytes,
            };
        }
        MemoryStats {
            categories,
            allocations_total: self.allocations_total.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            frees_completed,
            retired_total: self.retired_total.load(Ordering::Relaxed),
            refused_over_budget: self.refused.load(Ordering::Relaxed),
            block_releases: self.block_releases.load(Ordering::Relaxed),
            dedicated_allocations: self.dedicated.load(Ordering::Relaxed),
        }
    }

    /// The allocations still alive, as leaks (name, category, bytes).
    pub(crate) fn live_allocations(&self) -> Vec<Leak> {
        let mut leaks = Vec::new();
        for c in Category::ALL {
            let st = lock(&self.categories[c as usize]);
            let [blocks, small] = &st.pools;
            for a in [&blocks.allocator, &small.allocator, &st.dedicated]
                .into_iter()
                .flatten()
            {
                leaks.extend(
                    a.generate_report()
                        .allocations
                        .into_iter()
                        .map(|alloc| Leak {
                            name: alloc.name,
                            category: c,
                            bytes: alloc.size,
                        }),
                );
            }
        }
        leaks
    }

    /// Frees everything in the retire queue, whatever its value, and every cached buffer.
    /// Returns how many were freed.
    ///
    /// # Safety
    /// The GPU must have completed every submission that used them.
    pub(crate) unsafe fn drain(&self) -> u64 {
        let drained = {
            let mut q = lock(&self.retire);
            let all = q.0.drain();
            q.1.iter_mut().for_each(|p| *p = 0);
            all
        };
        let n = drained.len() as u64;
        self.free_resources(drained, false);
        self.flush_cache();
        n
    }

    /// The end: frees what remains and drops the allocators (every block goes back).
    ///
    /// # Safety
    /// The GPU must be idle and no [`Buffer`] or [`Image`] of this memory may exist (they keep
    /// the shared state, and so this memory, alive).
    pub(crate) unsafe fn teardown(&self) {
        // SAFETY: forwarded contract.
        unsafe { self.drain() };
        for c in Category::ALL {
            let mut st = lock(&self.categories[c as usize]);
            for a in st.take_allocators() {
                for alloc in a.generate_report().allocations {
                    log::error!(
                        "leak: {:?} ({c}, {} bytes) still allocated at teardown",
                        alloc.name,
                        alloc.size
                    );
                }
            }
            for h in 0..st.reserved_by_heap.len() {
                let r = st.reserved_by_heap[h];
                self.sub_reserved(&mut st, h, r);
            }
        }
    }

    /// The GPU may still use everything: keeps every block and handle (leaked on purpose)
    /// rather than free memory in use.
    pub(crate) fn leak_everything(&self) {
        let queued = {
            let mut q = lock(&self.retire);
            q.0.drain()
        };
        log::error!(
            "GPU not known idle: {} queued resources and every memory block are leaked, not freed in use",
            queued.len()
        );
        std::mem::forget(queued);
        for c in &self.categories {
            let mut st = lock(c);
            std::mem::forget(std::mem::take(&mut st.cache));
            for a in st.take_allocators() {
                std::mem::forget(a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_round_up_by_at_most_a_quarter() {
        assert_eq!(size_class(1), 256);
        assert_eq!(size_class(256), 256);
        assert_eq!(size_class(257), 320);
        assert_eq!(size_class(1000), 1024);
        assert_eq!(size_class(1024), 1024);
        assert_eq!(size_class(1025), 1280);
        assert_eq!(size_class(1 << 20), 1 << 20);
        for s in [300u64, 5_000, 77_777, 1 << 30, (1 << 40) + 3] {
            let c = size_class(s);
            assert!(c >= s && c as f64 <= s as f64 * 1.25 + 1.0, "{s} -> {c}");
            assert_eq!(size_class(c), c, "classes are fixed points");
        }
    }

    #[test]
    fn default_config_is_valid_and_bad_ones_are_typed_errors() {
        MemoryConfig::default().validate().unwrap();
        let bad = MemoryConfig {
            device_block_min_bytes: 3 * MIB,
            ..Default::default()
        };
        assert!(matches!(bad.validate(), Err(Error::InvalidInput(_))));
        let bad = MemoryConfig {
            priority: PerCategory([2.0, 0.0, 0.0, 0.0, 0.0]),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }
}
