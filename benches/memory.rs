//! Buffer churn: understory's allocator against raw gpu-allocator and raw `vkAllocateMemory`, on
//! the same device in the same run.
//!
//! `create_bind_free_1000`: one iteration creates and binds 1000 storage buffers of mixed sizes
//! (256 B to 1 MiB, log-uniform from a fixed xorshift seed, so every stack gets the same sizes)
//! and then releases all of them. The stacks:
//! - `understory_cache_on`: `Memory::create_buffer` with the default config (size-class cache
//!   on, caps raised so 1000 buffers fit), `Context::retire` at timeline value 0 (nothing was
//!   submitted, so 0 is complete) and one `Context::collect`. In steady state the buffers that
//!   fit the cache are reused without any Vulkan call.
//! - `understory_cache_off`: the same with `cache_bytes` zero, so every release reaches
//!   `vkDestroyBuffer` and gpu-allocator's `free`.
//! - `gpu_allocator`: `vkCreateBuffer` + gpu-allocator `allocate` (GPU only, linear,
//!   allocator-managed) + `vkBindBufferMemory`, then `vkDestroyBuffer` + `free`, with the same
//!   block sizes as understory's default config.
//! - `vk_allocate_memory`: one dedicated `vkAllocateMemory` per buffer, device-local type.
//!
//! Note: understory rounds each buffer up to its size class (at most 25% larger); the raw
//! stacks create exactly the requested size.
//!
//! `collect_10000`: 10,000 small buffers (256 B to 4 KiB, cache off) are created and retired
//! outside the timing; the time reported is one `Memory::collect` that frees all of them.
//!
//! Run with `cargo bench --bench memory`. The device is picked as in the app
//! (`UNDERSTORY_DEVICE` honoured); validation is off. Without a usable Vulkan device the bench
//! prints `*** SKIPPED memory bench ... ***` and exits successfully.

use std::hint::black_box;
use std::time::{Duration, Instant};

use ash::vk;
use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use gpu_allocator::vulkan::{
    Allocation, AllocationCreateDesc, AllocationScheme, Allocator, AllocatorCreateDesc,
};
use gpu_allocator::{AllocationSizes, AllocatorDebugSettings};
use understory::gpu::context::{Context, ContextOptions};
use understory::gpu::instance::{InstanceOptions, Validation};
use understory::gpu::memory::{Buffer, BufferDesc, MemoryConfig, MemoryLocation};
use understory::policy::category::{CATEGORIES, Category, PerCategory};

/// Buffers per iteration of `create_bind_free_1000`.
const N: usize = 1000;
/// Buffers retired before the timed collect of `collect_10000`.
const COLLECT_N: usize = 10_000;
const USAGE: vk::BufferUsageFlags = vk::BufferUsageFlags::STORAGE_BUFFER;
const NAME: &str = "bench";

/// `n` sizes, log-uniform in `min..=max`, from a fixed xorshift64 seed.
fn sizes(n: usize, min: u64, max: u64, seed: u64) -> Vec<u64> {
    let mut state = seed;
    let ratio = (max as f64 / min as f64).ln();
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // 53 random bits -> [0, 1).
            let u = (state >> 11) as f64 / (1u64 << 53) as f64;
            ((min as f64 * (u * ratio).exp()).round() as u64).clamp(min, max)
        })
        .collect()
}

/// A standalone context without validation; caps raised so the workloads fit.
fn context(cache: bool) -> understory::Result<Context> {
    let defaults = MemoryConfig::default();
    let cache_bytes = if cache {
        defaults.cache_bytes
    } else {
        PerCategory([0; CATEGORIES])
    };
    context_from(MemoryConfig {
        cap_bytes: PerCategory([u64::MAX; CATEGORIES]),
        cache_bytes,
        ..defaults
    })
}

fn context_with_cache(instances_cache_bytes: u64) -> understory::Result<Context> {
    let mut memory = MemoryConfig {
        cap_bytes: PerCategory([u64::MAX; CATEGORIES]),
        ..Default::default()
    };
    memory.cache_bytes[Category::Instances] = instances_cache_bytes;
    context_from(memory)
}

fn context_from(memory: MemoryConfig) -> understory::Result<Context> {
    Context::new(
        &ContextOptions {
            instance: InstanceOptions {
                validation: Validation::Off,
                ..Default::default()
            },
            memory,
            ..Default::default()
        }
        .with_env()?,
    )
}

fn desc(size: u64) -> BufferDesc<'static> {
    BufferDesc {
        name: NAME,
        size,
        usage: USAGE,
        location: MemoryLocation::GpuOnly,
        category: Category::Instances,
    }
}

/// understory: create all, retire all at value 0, one collect.
fn understory_round(ctx: &Context, sizes: &[u64], live: &mut Vec<Buffer>) {
    for &size in sizes {
        live.push(ctx.create_buffer(&desc(size)).expect("create_buffer"));
    }
    // Never used by a frame: dropped, each waits for nothing, so the next collect frees it.
    live.clear();
    let freed = ctx.collect().expect("collect");
    assert_eq!(freed, sizes.len());
}

/// gpu-allocator with understory's default block sizes, on the context's device.
fn raw_allocator(ctx: &Context) -> Allocator {
    let d = MemoryConfig::default();
    let allocation_sizes = AllocationSizes::new(d.device_block_min_bytes, d.host_block_min_bytes)
        .with_max_device_memblock_size(d.device_block_max_bytes)
        .with_max_host_memblock_size(d.host_block_max_bytes);
    let mut debug_settings = AllocatorDebugSettings::default();
    debug_settings.log_leaks_on_shutdown = false;
    Allocator::new(&AllocatorCreateDesc {
        instance: ctx.instance().clone(),
        device: ctx.device().clone(),
        physical_device: ctx.adapter().handle,
        debug_settings,
        buffer_device_address: false,
        allocation_sizes,
    })
    .expect("gpu-allocator")
}

fn buffer_info(size: u64) -> vk::BufferCreateInfo<'static> {
    vk::BufferCreateInfo::default()
        .size(size)
        .usage(USAGE)
        .sharing_mode(vk::SharingMode::EXCLUSIVE)
}

/// Raw gpu-allocator: create + allocate + bind all, then destroy + free all.
fn gpu_allocator_round(
    device: &ash::Device,
    allocator: &mut Allocator,
    sizes: &[u64],
    live: &mut Vec<(vk::Buffer, Allocation)>,
) {
    for &size in sizes {
        // SAFETY: valid create info (non-zero size, one usage flag); the device is alive.
        let buffer =
            unsafe { device.create_buffer(&buffer_info(size), None) }.expect("vkCreateBuffer");
        // SAFETY: the buffer was just created from this device.
        let requirements = unsafe { device.get_buffer_memory_requirements(buffer) };
        let allocation = allocator
            .allocate(&AllocationCreateDesc {
                name: NAME,
                requirements,
                location: MemoryLocation::GpuOnly,
                linear: true,
                allocation_scheme: AllocationScheme::GpuAllocatorManaged,
            })
            .expect("gpu-allocator allocate");
        // SAFETY: the allocation is live, from this device, and satisfies the buffer's
        // requirements (size, alignment, type bits); the buffer has never been bound.
        unsafe { device.bind_buffer_memory(buffer, allocation.memory(), allocation.offset()) }
            .expect("vkBindBufferMemory");
        live.push((buffer, allocation));
    }
    for (buffer, allocation) in live.drain(..) {
        // SAFETY: the buffer was never used by the GPU; nothing else holds the handle.
        unsafe { device.destroy_buffer(buffer, None) };
        allocator.free(allocation).expect("gpu-allocator free");
    }
}

/// One dedicated `vkAllocateMemory` per buffer, then destroy + free all.
fn vk_allocate_round(
    device: &ash::Device,
    props: &vk::PhysicalDeviceMemoryProperties,
    sizes: &[u64],
    live: &mut Vec<(vk::Buffer, vk::DeviceMemory)>,
) {
    let types = props.memory_types_as_slice();
    for &size in sizes {
        // SAFETY: valid create info; the device is alive.
        let buffer =
            unsafe { device.create_buffer(&buffer_info(size), None) }.expect("vkCreateBuffer");
        // SAFETY: the buffer was just created from this device.
        let req = unsafe { device.get_buffer_memory_requirements(buffer) };
        let type_index = (0..types.len() as u32)
            .find(|&i| {
                req.memory_type_bits & (1 << i) != 0
                    && types[i as usize]
                        .property_flags
                        .contains(vk::MemoryPropertyFlags::DEVICE_LOCAL)
            })
            .expect("no device-local memory type for a storage buffer");
        let info = vk::MemoryAllocateInfo::default()
            .allocation_size(req.size)
            .memory_type_index(type_index);
        // SAFETY: the type index is one the buffer allows, from this device's properties; the
        // size is the buffer's requirement (non-zero).
        let memory = unsafe { device.allocate_memory(&info, None) }.expect("vkAllocateMemory");
        // SAFETY: fresh memory of an allowed type and exactly the required size, offset 0
        // (always aligned); the buffer has never been bound.
        unsafe { device.bind_buffer_memory(buffer, memory, 0) }.expect("vkBindBufferMemory");
        live.push((buffer, memory));
    }
    for (buffer, memory) in live.drain(..) {
        // SAFETY: never used by the GPU; the buffer goes first, then the memory bound to it, and
        // nothing else holds either handle.
        unsafe {
            device.destroy_buffer(buffer, None);
            device.free_memory(memory, None);
        }
    }
}

fn memory(c: &mut Criterion) {
    let (cached, uncached) = match context(true).and_then(|a| Ok((a, context(false)?))) {
        Ok(pair) => pair,
        Err(e) => {
            eprintln!("*** SKIPPED memory bench: {e} ***");
            return;
        }
    };
    let adapter = cached.adapter();
    println!(
        "memory bench on {} ({}); budget source: {}",
        adapter.name,
        adapter.driver,
        if cached.features().memory_budget {
            "VK_EXT_memory_budget"
        } else {
            "estimated (no VK_EXT_memory_budget)"
        }
    );

    let churn_sizes = sizes(N, 256, 1 << 20, 0x9E37_79B9_7F4A_7C15);
    let total: u64 = churn_sizes.iter().sum();
    println!(
        "create_bind_free_1000: {N} buffers, {:.1} MiB in all per iteration",
        total as f64 / (1 << 20) as f64
    );

    let mut group = c.benchmark_group("create_bind_free_1000");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));

    let mut live = Vec::with_capacity(N);
    group.bench_function("understory_cache_on", |b| {
        b.iter(|| understory_round(&cached, &churn_sizes, &mut live))
    });
    group.bench_function("understory_cache_off", |b| {
        b.iter(|| understory_round(&uncached, &churn_sizes, &mut live))
    });

    // Raw stacks on the cache-off context's device (the one whose allocator stays idle here).
    let device = uncached.device().clone();
    let mut allocator = raw_allocator(&uncached);
    let mut raw_live = Vec::with_capacity(N);
    group.bench_function("gpu_allocator", |b| {
        b.iter(|| gpu_allocator_round(&device, &mut allocator, &churn_sizes, &mut raw_live))
    });
    // Returns its kept blocks before the context (and its device) go away.
    drop(allocator);

    // SAFETY: the physical device belongs to the context's instance, which is alive.
    let props = unsafe {
        uncached
            .instance()
            .get_physical_device_memory_properties(uncached.adapter().handle)
    };
    let mut dedicated_live = Vec::with_capacity(N);
    group.bench_function("vk_allocate_memory", |b| {
        b.iter(|| vk_allocate_round(&device, &props, &churn_sizes, &mut dedicated_live))
    });
    group.finish();

    let stats = cached.memory().stats();
    println!(
        "understory_cache_on: {} of {} buffer creations were cache hits",
        stats.cache_hits, stats.allocations_total
    );

    // One collect that frees 10,000 retired buffers (cache off: every one is destroyed and
    // returned to gpu-allocator). Setup is outside the timing.
    let small_sizes = sizes(COLLECT_N, 256, 4096, 0xD1B5_4A32_D192_ED03);
    let mut group = c.benchmark_group("collect_10000");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(1));
    let mut small_live = Vec::with_capacity(COLLECT_N);
    group.bench_function("understory_cache_off", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                for &size in &small_sizes {
                    small_live.push(uncached.create_buffer(&desc(size)).expect("create_buffer"));
                }
                small_live.clear();
                let start = Instant::now();
                let freed = black_box(uncached.collect().expect("collect"));
                timed += start.elapsed();
                assert_eq!(freed, COLLECT_N);
            }
            timed
        })
    });
    // The same collect when released buffers go to the size-class cache (64 MiB for this
    // group, so all 10,000 fit): no Vulkan call on the frame thread.
    let big_cache = context_with_cache(64 << 20).expect("context");
    group.bench_function("understory_cache_on", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                for &size in &small_sizes {
                    small_live.push(big_cache.create_buffer(&desc(size)).expect("create_buffer"));
                }
                small_live.clear();
                let start = Instant::now();
                let freed = black_box(big_cache.collect().expect("collect"));
                timed += start.elapsed();
                assert_eq!(freed, COLLECT_N);
            }
            timed
        })
    });
    group.finish();
    let report = big_cache.shutdown().expect("shutdown");
    assert!(
        report.leaks.is_empty(),
        "understory (64 MiB cache) leaked: {:?}",
        report.leaks
    );

    for (label, ctx) in [("cache on", cached), ("cache off", uncached)] {
        let report = ctx.shutdown().expect("shutdown");
        assert!(
            report.leaks.is_empty(),
            "understory ({label}) leaked: {:?}",
            report.leaks
        );
    }
}

/// The retire queue's own share of a collect: ordering and accounting of 10,000 retirements,
/// with no Vulkan call (the pure `policy::retire::RetireQueue` that `Memory` uses).
fn retire_queue(c: &mut Criterion) {
    use understory::policy::category::Category;
    use understory::policy::retire::RetireQueue;
    let mut group = c.benchmark_group("retire_queue_10000");
    group.bench_function("retire_then_collect", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut q = RetireQueue::new();
                for i in 0..10_000u64 {
                    q.retire(i, i / 100, 256 + i, Category::Instances);
                }
                let start = Instant::now();
                let freed = q.collect(u64::MAX);
                total += start.elapsed();
                assert_eq!(black_box(freed).len(), 10_000);
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, memory, retire_queue);
criterion_main!(benches);
