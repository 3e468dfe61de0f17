//! Budget-aware sub-allocation and frame-fenced frees on the real driver, under validation.

mod common;

use common::{context_with_memory as context_with, no_cache, storage_desc as desc};
use std::panic::AssertUnwindSafe;

use ash::vk;
use proptest::prelude::*;
use understory::Error;
use understory::gpu::budget::{BudgetSource, DriverNumbers, HeapBudgets, RawHeap};
use understory::gpu::context::{Context, ContextOptions};
use understory::gpu::memory::{Buffer, BufferDesc, ImageDesc, MemoryConfig, MemoryLocation};
use understory::policy::category::Category;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

#[test]
fn accounting_follows_allocate_retire_and_collect() {
    let Some(ctx) = context_with("accounting", no_cache()) else {
        return;
    };
    let mem = ctx.memory();
    let a = mem
        .create_buffer(&desc("a", 100 * KIB, Category::Instances))
        .unwrap();
    let b = mem
        .create_buffer(&desc("b", 3 * MIB, Category::Instances))
        .unwrap();
    let s = mem
        .create_buffer(&BufferDesc {
            location: MemoryLocation::CpuToGpu,
            usage: vk::BufferUsageFlags::TRANSFER_SRC,
            ..desc("staging", 64 * KIB, Category::Staging)
        })
        .unwrap();
    let st = mem.stats();
    let inst = st.categories[Category::Instances];
    assert_eq!(inst.allocations, 2);
    assert_eq!(inst.live_bytes, a.bytes() + b.bytes());
    assert!(a.bytes() >= 100 * KIB && b.bytes() >= 3 * MIB);
    assert!(inst.reserved_bytes >= inst.live_bytes);
    assert_eq!(st.categories[Category::Staging].allocations, 1);
    assert_eq!(st.categories[Category::Atlas].allocations, 0);
    assert_eq!(st.categories[Category::Atlas].reserved_bytes, 0);

    let heaps = mem.refresh_budget().unwrap();
    let ours: u64 = heaps.iter().map(|h| h.ours_total).sum();
    let reserved: u64 = st.categories.iter().map(|(_, c)| c.reserved_bytes).sum();
    assert_eq!(
        ours, reserved,
        "per-heap ours adds up to per-category reserved"
    );
    for h in &heaps {
        assert_eq!(h.ours.total(), h.ours_total);
        if !ctx.extensions().memory_budget {
            assert_eq!(h.budget.usage, h.ours_total, "estimate: usage is ours");
            assert_eq!(h.foreign, 0);
        }
    }

    // Reserve a value the "GPU" has not reached; retire at it; nothing may be freed yet.
    let v = ctx.timeline().reserve();
    let (a_bytes, b_bytes) = (a.bytes(), b.bytes());
    ctx.retire(a, v).unwrap();
    ctx.retire(b, v).unwrap();
    assert_eq!(
        ctx.collect().unwrap(),
        0,
        "value {v} not completed: nothing freed"
    );
    let st = mem.stats().categories[Category::Instances];
    assert_eq!((st.pending_count, st.pending_bytes), (2, a_bytes + b_bytes));
    assert_eq!(
        st.live_bytes,
        a_bytes + b_bytes,
        "pending bytes are still held"
    );
    let pending: u64 = mem
        .refresh_budget()
        .unwrap()
        .iter()
        .map(|h| h.pending)
        .sum();
    assert_eq!(pending, a_bytes + b_bytes);

    ctx.timeline().signal(v).unwrap();
    assert_eq!(ctx.collect().unwrap(), 2);
    let st = mem.stats();
    let inst = st.categories[Category::Instances];
    assert_eq!(
        (inst.allocations, inst.live_bytes, inst.pending_bytes),
        (0, 0, 0)
    );
    assert_eq!(inst.peak_live_bytes, a_bytes + b_bytes);
    assert_eq!(st.frees_completed, 2);
    ctx.retire(s, ctx.timeline().last_submitted()).unwrap();
    common::finish(ctx, "accounting");
}

#[test]
fn released_buffers_are_reused_from_the_cache() {
    let Some(ctx) = context_with("cache", MemoryConfig::default()) else {
        return;
    };
    let mem = ctx.memory();
    let first = mem
        .create_buffer(&desc("first", 200 * KIB, Category::Instances))
        .unwrap();
    let raw = first.raw();
    ctx.retire(first, 0).unwrap();
    ctx.collect().unwrap();
    let st = mem.stats();
    assert!(st.categories[Category::Instances].cached_bytes > 0);
    // Same size class (200 KiB and 210 KiB both round to 224 KiB): reused, no Vulkan call.
    let again = mem
        .create_buffer(&desc("again", 210 * KIB, Category::Instances))
        .unwrap();
    assert_eq!(again.raw(), raw);
    assert_eq!(again.name(), "again");
    assert_eq!(again.size(), 210 * KIB);
    assert_eq!(mem.stats().cache_hits, 1);
    ctx.retire(again, 0).unwrap();
    ctx.collect().unwrap();
    assert!(mem.flush_cache() > 0);
    assert_eq!(mem.stats().categories[Category::Instances].live_bytes, 0);
    common::finish(ctx, "cache");
}

#[test]
fn category_cap_refuses_with_over_budget_and_allocates_nothing() {
    let mut cfg = no_cache();
    cfg.cap_bytes[Category::Instances] = MIB;
    let Some(ctx) = context_with("category_cap", cfg) else {
        return;
    };
    let mem = ctx.memory();
    let a = mem
        .create_buffer(&desc("fits", 768 * KIB, Category::Instances))
        .unwrap();
    let before = mem.stats();
    let err = mem
        .create_buffer(&desc("too much", 512 * KIB, Category::Instances))
        .unwrap_err();
    match &err {
        Error::OverBudget {
            requested,
            available,
            ..
        } => {
            assert!(*requested >= 512 * KIB);
            assert_eq!(*available, MIB - a.bytes());
        }
        e => panic!("expected OverBudget, got {e}"),
    }
    let after = mem.stats();
    assert_eq!(
        after.categories, before.categories,
        "nothing allocated on refusal"
    );
    assert_eq!(after.refused_over_budget, 1);
    // Other categories are not affected by the instances cap.
    let o = mem
        .create_buffer(&desc("other", 2 * MIB, Category::Other))
        .unwrap();
    ctx.retire(a, 0).unwrap();
    ctx.retire(o, 0).unwrap();
    common::finish(ctx, "category cap");
}

/// Reports the real heaps with the budget set to what is used now plus `headroom`.
struct Tight {
    heaps: Vec<understory::gpu::adapter::HeapInfo>,
    usage: std::sync::Arc<std::sync::atomic::AtomicU64>,
    headroom: u64,
}
impl BudgetSource for Tight {
    fn query(&mut self) -> understory::Result<Vec<RawHeap>> {
        let used = self.usage.load(std::sync::atomic::Ordering::Relaxed);
        Ok(self
            .heaps
            .iter()
            .map(|&info| RawHeap {
                info,
                driver: Some(DriverNumbers {
                    budget: (used + self.headroom).min(info.size),
                    usage: used,
                }),
            })
            .collect())
    }
}

#[test]
fn heap_budget_refuses_before_the_driver_would_fail() {
    let Some(ctx) = context_with("heap_budget", no_cache()) else {
        return;
    };
    let mem = ctx.memory();
    let usage = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let tight = Tight {
        heaps: mem.heaps().to_vec(),
        usage: usage.clone(),
        headroom: 20 * MIB,
    };
    mem.set_budget_source(HeapBudgets::new(Box::new(tight)))
        .unwrap();
    // 8 MiB fits in the 20 MiB headroom (one 16 MiB block).
    let small = mem
        .create_buffer(&desc("small", 8 * MIB, Category::Other))
        .unwrap();
    // 100 MiB would need a block of its own: refused, nothing allocated.
    let before = mem.stats();
    let err = mem
        .create_buffer(&desc("big", 100 * MIB, Category::Other))
        .unwrap_err();
    assert!(matches!(err, Error::OverBudget { .. }), "{err}");
    assert_eq!(mem.stats().categories, before.categories);
    ctx.retire(small, 0).unwrap();
    common::finish(ctx, "heap budget");
}

#[test]
fn bad_requests_are_typed_errors() {
    let Some(ctx) = context_with("bad_requests", no_cache()) else {
        return;
    };
    let mem = ctx.memory();
    let err = mem
        .create_buffer(&desc("zero", 0, Category::Other))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    let heap = mem.heaps().iter().map(|h| h.size).max().unwrap();
    let err = mem
        .create_buffer(&desc("huge", heap + 1, Category::Other))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidInput(_) | Error::Vulkan { .. } | Error::OutOfDeviceMemory { .. }
        ),
        "{err}"
    );
    let image = |w, h, mips| ImageDesc {
        name: "page",
        extent: vk::Extent2D {
            width: w,
            height: h,
        },
        format: vk::Format::R8G8B8A8_UNORM,
        mip_levels: mips,
        usage: vk::ImageUsageFlags::SAMPLED | vk::ImageUsageFlags::TRANSFER_DST,
        category: Category::Atlas,
    };
    assert!(matches!(
        mem.create_image(&image(0, 16, 1)),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        mem.create_image(&image(16, 16, 6)),
        Err(Error::InvalidInput(_))
    ));
    let page = mem
        .create_image(&image(2048, 2048, 12))
        .expect("a 2048² atlas page with mips");
    assert!(page.bytes() >= 2048 * 2048 * 4);
    assert_eq!(mem.stats().categories[Category::Atlas].allocations, 1);
    ctx.retire(page, 0).unwrap();

    // A value that was never submitted: an error, but the buffer is queued safely.
    let b = mem
        .create_buffer(&desc("future", KIB, Category::Other))
        .unwrap();
    let err = ctx.retire(b, 99).unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    assert_eq!(mem.stats().categories[Category::Other].pending_count, 1);
    common::finish(ctx, "bad requests");
}

#[test]
fn retiring_into_another_context_is_an_error_and_the_owner_frees_it() {
    let Some(owner) = context_with("foreign_owner", no_cache()) else {
        return;
    };
    let Some(other) = context_with("foreign_other", no_cache()) else {
        return;
    };
    let b = owner
        .memory()
        .create_buffer(&desc("mine", KIB, Category::Other))
        .unwrap();
    let err = other.retire(b, 0).unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    assert_eq!(
        other.memory().stats().categories[Category::Other].pending_count,
        0
    );
    owner.collect().unwrap();
    let st = owner.memory().stats();
    assert_eq!(
        st.categories[Category::Other].allocations,
        0,
        "the owner freed it"
    );
    common::finish(other, "foreign other");
    common::finish(owner, "foreign owner");
}

#[test]
fn dropped_without_retire_is_caught_and_freed_safely() {
    let Some(ctx) = context_with("dropped_without_retire", no_cache()) else {
        return;
    };
    let b = ctx
        .memory()
        .create_buffer(&desc("forgotten", KIB, Category::Instances))
        .unwrap();
    let dropped = std::panic::catch_unwind(AssertUnwindSafe(|| drop(b)));
    assert_eq!(
        dropped.is_err(),
        cfg!(debug_assertions),
        "debug builds assert"
    );
    // Not freed at drop: it waits for the newest submission, like a retire.
    assert_eq!(
        ctx.memory().stats().categories[Category::Instances].allocations,
        1
    );
    ctx.collect().unwrap();
    let st = ctx.memory().stats();
    assert_eq!(st.dropped_without_retire, 1);
    assert_eq!(st.categories[Category::Instances].allocations, 0);
    common::finish(ctx, "dropped without retire");
}

#[test]
fn shutdown_reports_live_allocations_as_leaks_by_name() {
    let Some(mut ctx) = context_with("shutdown_leaks", no_cache()) else {
        return;
    };
    let held = ctx
        .memory()
        .create_buffer(&desc("still held", 4 * KIB, Category::Atlas))
        .unwrap();
    let retired = ctx
        .memory()
        .create_buffer(&desc("retired", 4 * KIB, Category::Atlas))
        .unwrap();
    let v = ctx.timeline().reserve();
    ctx.retire(retired, v).unwrap();
    ctx.timeline().signal(v).unwrap();
    let report = ctx.shutdown();
    assert_eq!(report.drained, 1, "the retire queue is drained at shutdown");
    assert_eq!(report.leaks.len(), 1);
    assert_eq!(report.leaks[0].name, "still held");
    assert_eq!(report.leaks[0].category, Category::Atlas);
    let canary = ctx.canary().clone();
    // The leaked handle is dropped after shutdown: logged, asserted in debug, destroyed with the
    // context so that no Vulkan object outlives the device.
    let _ = std::panic::catch_unwind(AssertUnwindSafe(|| drop(held)));
    drop(ctx);
    common::assert_clean(&canary, "shutdown leaks");
}

#[test]
fn injected_faults_give_typed_errors_and_leak_nothing() {
    let mut cfg = no_cache();
    cfg.fail_every_nth_allocation = std::num::NonZeroU64::new(3);
    let Some(ctx) = context_with("faults", cfg) else {
        return;
    };
    let mem = ctx.memory();
    let mut held: Vec<Buffer> = Vec::new();
    let mut images = Vec::new();
    let (mut ok, mut failed) = (0, 0);
    for i in 0..60u64 {
        let r = if i % 5 == 0 {
            mem.create_image(&ImageDesc {
                name: "fault page",
                extent: vk::Extent2D {
                    width: 64,
                    height: 64,
                },
                format: vk::Format::R8G8B8A8_UNORM,
                mip_levels: 1,
                usage: vk::ImageUsageFlags::SAMPLED,
                category: Category::Atlas,
            })
            .map(|img| images.push(img))
        } else {
            mem.create_buffer(&desc("fault buffer", (i + 1) * KIB, Category::Instances))
                .map(|b| held.push(b))
        };
        match r {
            Ok(()) => ok += 1,
            Err(Error::OutOfDeviceMemory { .. }) => failed += 1,
            Err(e) => panic!("unexpected error {e}"),
        }
        let st = mem.stats();
        let live: u64 = held.iter().map(|b| b.bytes()).sum();
        assert_eq!(
            st.categories[Category::Instances].live_bytes,
            live,
            "exact after every step"
        );
        assert_eq!(
            st.categories[Category::Instances].allocations,
            held.len() as u64
        );
        assert_eq!(
            st.categories[Category::Atlas].allocations,
            images.len() as u64
        );
    }
    assert_eq!(failed, 20, "every third allocation failed");
    assert_eq!(ok, 40);
    for b in held {
        ctx.retire(b, 0).unwrap();
    }
    for img in images {
        ctx.retire(img, 0).unwrap();
    }
    ctx.collect().unwrap();
    assert_eq!(
        mem.stats()
            .categories
            .iter()
            .map(|(_, c)| c.live_bytes)
            .sum::<u64>(),
        0
    );
    common::finish(ctx, "faults");
}

#[test]
fn begin_frame_throttles_collects_and_reports_heaps() {
    let Some(ctx) = context_with("begin_frame", no_cache()) else {
        return;
    };
    let mem = ctx.memory();
    for frame in 0..6u64 {
        let start = ctx.begin_frame().unwrap();
        assert!(!start.heaps.is_empty());
        assert!(
            ctx.timeline().last_submitted() - start.completed < u64::from(ctx.frames_in_flight())
        );
        let b = mem
            .create_buffer(&desc(
                "per-frame",
                (frame + 1) * 4 * KIB,
                Category::Instances,
            ))
            .unwrap();
        let cmd_value = ctx
            .submit_and_wait(|cmd| {
                // SAFETY: recording; the buffer is retired with this submission's value.
                unsafe {
                    ctx.device()
                        .cmd_fill_buffer(cmd, b.raw(), 0, vk::WHOLE_SIZE, frame as u32)
                };
                Ok(())
            })
            .unwrap();
        ctx.retire(b, cmd_value).unwrap();
    }
    let start = ctx.begin_frame().unwrap();
    assert!(start.freed >= 1);
    assert_eq!(mem.stats().frees_completed, 6);
    common::finish(ctx, "begin_frame");
}

#[derive(Debug, Clone)]
enum Op {
    Alloc { kib: u64, cat: usize },
    Retire { pick: usize, ahead: bool },
    Reserve,
    Complete,
    Collect,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u64..2048, 0usize..4).prop_map(|(kib, cat)| Op::Alloc { kib, cat }),
        3 => (any::<usize>(), any::<bool>()).prop_map(|(pick, ahead)| Op::Retire { pick, ahead }),
        2 => Just(Op::Reserve),
        2 => Just(Op::Complete),
        2 => Just(Op::Collect),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Random allocate / retire / submit / complete / collect against a model, on the real
    /// allocator and timeline (values reserved and signalled from the host).
    #[test]
    fn memory_matches_a_model(ops in proptest::collection::vec(op(), 1..60)) {
        let Some(ctx) = context_with("memory_matches_a_model", no_cache()) else {
            return Ok(());
        };
        let mem = ctx.memory();
        let mut live: Vec<Buffer> = Vec::new();
        // Model: (bytes, category, retired at value) of everything retired and not freed.
        let mut pending: Vec<(u64, Category, u64)> = Vec::new();
        let mut freed_total = 0u64;
        for op in ops {
            match op {
                Op::Alloc { kib, cat } => {
                    let c = Category::ALL[cat];
                    live.push(mem.create_buffer(&desc("prop", kib * KIB, c)).unwrap());
                }
                Op::Retire { pick, ahead } => {
                    if live.is_empty() { continue; }
                    let b = live.swap_remove(pick % live.len());
                    let last = ctx.timeline().last_submitted();
                    let value = if ahead { last } else { last.saturating_sub(1) };
                    pending.push((b.bytes(), b.category(), value));
                    ctx.retire(b, value).unwrap();
                }
                Op::Reserve => { ctx.timeline().reserve(); }
                Op::Complete => {
                    let (done, last) = (ctx.timeline().completed_value().unwrap(), ctx.timeline().last_submitted());
                    if last > done { ctx.timeline().signal(done + 1).unwrap(); }
                }
                Op::Collect => {
                    let completed = ctx.timeline().completed_value().unwrap();
                    let n = ctx.collect().unwrap() as u64;
                    let due = pending.iter().filter(|p| p.2 <= completed).count() as u64;
                    prop_assert_eq!(n, due, "exactly the completed ones are freed");
                    pending.retain(|p| p.2 > completed);
                    freed_total += n;
                }
            }
            let st = mem.stats();
            prop_assert_eq!(st.frees_completed, freed_total);
            for c in Category::ALL {
                let held: u64 = live.iter().filter(|b| b.category() == c).map(|b| b.bytes()).sum();
                let waiting: u64 = pending.iter().filter(|p| p.1 == c).map(|p| p.0).sum();
                prop_assert_eq!(st.categories[c].pending_bytes, waiting);
                prop_assert_eq!(st.categories[c].live_bytes, held + waiting);
            }
        }
        for b in live.drain(..) {
            ctx.retire(b, 0).unwrap();
        }
        // Complete everything reserved so shutdown's wait returns at once.
        let last = ctx.timeline().last_submitted();
        if ctx.timeline().completed_value().unwrap() < last {
            ctx.timeline().signal(last).unwrap();
        }
        common::finish(ctx, "memory model");
    }
}

#[test]
fn options_are_validated() {
    let Some(probe) = common::context("options_are_validated") else {
        return;
    };
    drop(probe);
    let mut options = common::options();
    options.frames_in_flight = 5;
    assert!(matches!(
        Context::new(&options),
        Err(Error::InvalidInput(_))
    ));
    let mut options: ContextOptions = common::options();
    options.memory.device_block_max_bytes = 300 * MIB;
    assert!(matches!(
        Context::new(&options),
        Err(Error::InvalidInput(_))
    ));
}
