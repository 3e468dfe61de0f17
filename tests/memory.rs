//! Budget-aware sub-allocation and frame-fenced frees on the real driver, under validation.

mod common;

use common::{context_with_memory as context_with, no_cache, storage_desc as desc};

use ash::vk;
use proptest::prelude::*;
use understory::Error;
use understory::gpu::budget::{BudgetSource, DriverNumbers, HeapBudgets, RawHeap};
use understory::gpu::context::{Context, ContextOptions, Frame, SubmitSync};
use understory::gpu::frame::FrameRing;
use understory::gpu::memory::{
    Buffer, BufferDesc, ImageDesc, MemoryConfig, MemoryLocation, RawObject,
};
use understory::gpu::timeline::FrameSignal;
use understory::policy::category::Category;

/// Ends `frame` with no commands, its completion reported by the host (the test).
fn submit_reported(ctx: &Context, frame: Frame) -> u64 {
    // SAFETY: nothing was recorded for the frame; its completion is reported only by
    // `report`, below, when nothing can be running.
    unsafe { ctx.frame_submitted(frame, FrameSignal::HostReported) }
        .unwrap()
        .value()
}

/// Reports every host-reported frame up to `value` complete.
fn report(ctx: &Context, value: u64) {
    // SAFETY: those frames recorded no commands.
    unsafe { ctx.frames_completed(value) }.unwrap();
}

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

#[test]
fn accounting_follows_allocate_retire_and_collect() {
    let Some(ctx) = context_with("accounting", no_cache()) else {
        return;
    };
    let mem = ctx.memory();
    let a = ctx
        .create_buffer(&desc("a", 100 * KIB, Category::Instances))
        .unwrap();
    let b = ctx
        .create_buffer(&desc("b", 3 * MIB, Category::Instances))
        .unwrap();
    let s = ctx
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
        if !ctx.features().memory_budget {
            assert_eq!(h.budget.usage, h.ours_total, "estimate: usage is ours");
            assert_eq!(h.foreign, 0);
        }
    }

    // Used by a frame the "GPU" has not finished; dropped; nothing may be freed yet.
    let frame = ctx.begin_frame().unwrap();
    let v = frame.value();
    a.used_in(&frame).unwrap();
    b.used_in(&frame).unwrap();
    let (a_bytes, b_bytes) = (a.bytes(), b.bytes());
    drop((a, b));
    assert_eq!(
        ctx.collect().unwrap(),
        0,
        "frame {v} still open: nothing freed"
    );
    assert_eq!(submit_reported(&ctx, frame), v);
    assert_eq!(ctx.collect().unwrap(), 0, "frame {v} not reported complete");
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

    report(&ctx, v);
    assert_eq!(ctx.collect().unwrap(), 2);
    let st = mem.stats();
    let inst = st.categories[Category::Instances];
    assert_eq!(
        (inst.allocations, inst.live_bytes, inst.pending_bytes),
        (0, 0, 0)
    );
    assert_eq!(inst.peak_live_bytes, a_bytes + b_bytes);
    assert_eq!(st.frees_completed, 2);
    drop(s);
    common::finish(ctx, "accounting");
}

#[test]
fn released_buffers_are_reused_from_the_cache() {
    let Some(ctx) = context_with("cache", MemoryConfig::default()) else {
        return;
    };
    let mem = ctx.memory();
    let first = ctx
        .create_buffer(&desc("first", 200 * KIB, Category::Instances))
        .unwrap();
    let raw = first.raw();
    drop(first);
    ctx.collect().unwrap();
    let st = mem.stats();
    assert!(st.categories[Category::Instances].cached_bytes > 0);
    // Same size class (200 KiB and 210 KiB both round to 224 KiB): reused, no Vulkan call.
    let again = ctx
        .create_buffer(&desc("again", 210 * KIB, Category::Instances))
        .unwrap();
    assert_eq!(again.raw(), raw);
    assert_eq!(again.name(), "again");
    assert_eq!(again.size(), 210 * KIB);
    assert_eq!(mem.stats().cache_hits, 1);
    drop(again);
    ctx.collect().unwrap();
    assert!(mem.flush_cache() > 0);
    assert_eq!(mem.stats().categories[Category::Instances].live_bytes, 0);
    common::finish(ctx, "cache");
}

/// A buffer whose size class would not fit its category's cache can never be cached: it is made
/// at its own size, not rounded up by as much as a quarter (a 20 MiB + 1 B instance buffer holds
/// about 20 MiB, not its 24 MiB class), and `predicted_bytes` says so. Smaller ones keep their
/// class.
#[test]
fn buffers_too_large_to_cache_are_made_at_their_own_size() {
    let Some(ctx) = context_with("own_size", MemoryConfig::default()) else {
        return;
    };
    let mem = ctx.memory();
    let cache = MemoryConfig::default().cache_bytes[Category::Instances];
    assert_eq!(cache, 16 * MIB);
    for (size, most) in [(20 * MIB + 1, 20 * MIB + 64 * KIB), (1000, 1024)] {
        let b = ctx
            .create_buffer(&desc("sized", size, Category::Instances))
            .unwrap();
        let predicted = mem.predicted_bytes(Category::Instances, size);
        assert!(b.bytes() >= size && predicted >= size, "{size}");
        assert!(predicted <= most, "{size}: predicted {predicted}");
        assert!(
            b.bytes() <= most.max(64 * KIB),
            "{size}: holds {}",
            b.bytes()
        );
        drop(b);
    }
    ctx.collect().unwrap();
    assert_eq!(
        mem.stats().categories[Category::Instances].cached_bytes,
        1024,
        "only the small one is cached"
    );
    mem.flush_cache();
    common::finish(ctx, "own_size");
}

#[test]
fn a_cap_on_a_vegetation_category_is_refused_the_budget_is_the_one_cap() {
    let mut cfg = no_cache();
    cfg.cap_bytes[Category::Instances] = MIB;
    let mut options = common::options();
    options.memory = cfg;
    match understory::gpu::context::Context::new(&options) {
        Err(Error::InvalidInput(m)) => assert!(m.contains("one cap"), "{m}"),
        Err(Error::LoaderMissing { .. } | Error::NoDevice { .. }) => {}
        other => panic!("expected InvalidInput, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn category_cap_refuses_with_over_budget_and_allocates_nothing() {
    let mut cfg = no_cache();
    cfg.cap_bytes[Category::Other] = MIB;
    let Some(ctx) = context_with("category_cap", cfg) else {
        return;
    };
    let mem = ctx.memory();
    let a = ctx
        .create_buffer(&desc("fits", 768 * KIB, Category::Other))
        .unwrap();
    let before = mem.stats();
    let err = ctx
        .create_buffer(&desc("too much", 512 * KIB, Category::Other))
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
    // Other categories are not affected by that cap.
    let o = ctx
        .create_buffer(&desc("staging", 2 * MIB, Category::Staging))
        .unwrap();
    drop((a, o));
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
    let small = ctx
        .create_buffer(&desc("small", 8 * MIB, Category::Other))
        .unwrap();
    // 100 MiB would need a block of its own: refused, nothing allocated.
    let before = mem.stats();
    let err = ctx
        .create_buffer(&desc("big", 100 * MIB, Category::Other))
        .unwrap_err();
    assert!(matches!(err, Error::OverBudget { .. }), "{err}");
    assert_eq!(mem.stats().categories, before.categories);
    drop(small);
    common::finish(ctx, "heap budget");
}

#[test]
fn bad_requests_are_typed_errors() {
    let Some(ctx) = context_with("bad_requests", no_cache()) else {
        return;
    };
    let mem = ctx.memory();
    let err = ctx
        .create_buffer(&desc("zero", 0, Category::Other))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    let heap = mem.heaps().iter().map(|h| h.size).max().unwrap();
    let err = ctx
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
        ctx.create_image(&image(0, 16, 1)),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        ctx.create_image(&image(16, 16, 6)),
        Err(Error::InvalidInput(_))
    ));
    let page = ctx
        .create_image(&image(2048, 2048, 12))
        .expect("a 2048² atlas page with mips");
    assert!(page.bytes() >= 2048 * 2048 * 4);
    assert_eq!(mem.stats().categories[Category::Atlas].allocations, 1);
    drop(page);

    // An object retired at a frame that cannot come next: refused.
    // SAFETY: a null handle; nothing would be destroyed.
    let err =
        unsafe { ctx.retire_object(RawObject::Sampler(vk::Sampler::null()), 99) }.unwrap_err();
    assert!(matches!(err, Error::Lifecycle(_)), "{err}");
    common::finish(ctx, "bad requests");
}

#[test]
fn another_contexts_frame_is_a_lifecycle_error() {
    let Some(owner) = context_with("foreign_owner", no_cache()) else {
        return;
    };
    let Some(other) = context_with("foreign_other", no_cache()) else {
        return;
    };
    let b = owner
        .create_buffer(&desc("mine", KIB, Category::Other))
        .unwrap();
    let frame = other.begin_frame().unwrap();
    let err = b.used_in(&frame).unwrap_err();
    assert!(matches!(err, Error::Lifecycle(_)), "{err}");
    assert_eq!(b.last_use(), 0, "not marked");
    drop(frame);
    drop(b);
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
fn a_dropped_buffer_waits_for_its_last_frame_even_an_abandoned_one() {
    let Some(ctx) = context_with("dropped_waits", no_cache()) else {
        return;
    };
    let b = ctx
        .create_buffer(&desc("used", KIB, Category::Instances))
        .unwrap();
    let frame = ctx.begin_frame().unwrap();
    let v = frame.value();
    b.used_in(&frame).unwrap();
    drop(b);
    let allocations =
        |ctx: &Context| ctx.memory().stats().categories[Category::Instances].allocations;
    ctx.collect().unwrap();
    assert_eq!(allocations(&ctx), 1, "frame {v} is open: not freed");
    // The frame is dropped unsubmitted: its value goes to the next frame, and the buffer
    // waits for that one.
    drop(frame);
    ctx.collect().unwrap();
    assert_eq!(allocations(&ctx), 1, "value {v} was never submitted");
    let next = ctx.begin_frame().unwrap();
    assert_eq!(next.value(), v, "the value is handed out again");
    assert!(ctx.begin_frame().is_err(), "one open frame at a time");
    // SAFETY: no command buffers, no extra semaphores.
    let done = unsafe { ctx.submit_frame(next, &[], &SubmitSync::default()) }.unwrap();
    ctx.wait(done.value(), std::time::Duration::from_secs(10))
        .unwrap();
    ctx.collect().unwrap();
    assert_eq!(allocations(&ctx), 0);
    common::finish(ctx, "dropped waits");
}

#[test]
fn shutdown_reports_live_allocations_as_leaks_by_name() {
    let Some(ctx) = context_with("shutdown_leaks", no_cache()) else {
        return;
    };
    let held = ctx
        .create_buffer(&desc("still held", 4 * KIB, Category::Atlas))
        .unwrap();
    let retired = ctx
        .create_buffer(&desc("retired", 4 * KIB, Category::Atlas))
        .unwrap();
    let frame = ctx.begin_frame().unwrap();
    retired.used_in(&frame).unwrap();
    drop(retired);
    let v = submit_reported(&ctx, frame);
    report(&ctx, v);
    let canary = ctx.canary().clone();
    let report = ctx.shutdown().unwrap();
    assert_eq!(report.drained, 1, "the retire queue is drained at shutdown");
    assert_eq!(report.leaks.len(), 1);
    assert_eq!(report.leaks[0].name, "still held");
    assert_eq!(report.leaks[0].category, Category::Atlas);
    // Still alive: the buffer holds the context's memory; dropping it now frees it and, as
    // the last holder, destroys the device, with nothing left behind.
    assert_eq!(held.last_use(), 0);
    drop(held);
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
            ctx.create_image(&ImageDesc {
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
            ctx.create_buffer(&desc("fault buffer", (i + 1) * KIB, Category::Instances))
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
    drop((held, images));
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
    let ring = FrameRing::new(&ctx).unwrap();
    for f in 0..6u64 {
        let frame = ctx.begin_frame().unwrap();
        assert!(!frame.heaps().is_empty());
        assert!(
            frame.value() - 1 - frame.completed() < u64::from(ctx.frames_in_flight()),
            "at most frames_in_flight frames ahead"
        );
        let b = ctx
            .create_buffer(&desc("per-frame", (f + 1) * 4 * KIB, Category::Instances))
            .unwrap();
        let cmd = ring.begin(&frame).unwrap();
        b.used_in(&frame).unwrap();
        // SAFETY: recording for `frame`; the buffer is marked used by it.
        unsafe {
            ctx.device()
                .cmd_fill_buffer(cmd.raw(), b.raw(), 0, vk::WHOLE_SIZE, f as u32)
        };
        ring.submit(frame, cmd).unwrap();
        drop(b);
    }
    let last = ctx.last_submitted();
    ctx.wait(last, std::time::Duration::from_secs(10)).unwrap();
    let frame = ctx.begin_frame().unwrap();
    assert!(frame.freed() >= 1);
    assert_eq!(mem.stats().frees_completed, 6);
    drop((frame, ring));
    common::finish(ctx, "begin_frame");
}

#[derive(Debug, Clone)]
enum Op {
    Alloc { kib: u64, cat: usize },
    Use { pick: usize },
    Drop { pick: usize },
    Begin,
    Abandon,
    Submit,
    Complete,
    Collect,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u64..2048, 0usize..4).prop_map(|(kib, cat)| Op::Alloc { kib, cat }),
        3 => any::<usize>().prop_map(|pick| Op::Use { pick }),
        3 => any::<usize>().prop_map(|pick| Op::Drop { pick }),
        2 => Just(Op::Begin),
        1 => Just(Op::Abandon),
        2 => Just(Op::Submit),
        2 => Just(Op::Complete),
        2 => Just(Op::Collect),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Random allocate / use in a frame / drop / begin / abandon / submit / complete / collect
    /// against a model, on the real allocator and frame clock (completion reported by the
    /// host). Invariant: a buffer is freed exactly when every frame up to its last use is
    /// reported complete, never before.
    #[test]
    fn memory_matches_a_model(ops in proptest::collection::vec(op(), 1..60)) {
        let Some(ctx) = context_with("memory_matches_a_model", no_cache()) else {
            return Ok(());
        };
        let mem = ctx.memory();
        let mut live: Vec<Buffer> = Vec::new();
        // Model: (bytes, category, last use) of everything dropped and not freed.
        let mut pending: Vec<(u64, Category, u64)> = Vec::new();
        let mut open: Option<Frame> = None;
        let mut completed = 0u64;
        let mut freed_total = 0u64;
        for op in ops {
            match op {
                Op::Alloc { kib, cat } => {
                    let c = Category::ALL[cat];
                    live.push(ctx.create_buffer(&desc("prop", kib * KIB, c)).unwrap());
                }
                Op::Use { pick } => {
                    if let (Some(f), false) = (&open, live.is_empty()) {
                        let n = live.len();
                        live[pick % n].used_in(f).unwrap();
                    }
                }
                Op::Drop { pick } => {
                    if live.is_empty() { continue; }
                    let b = live.swap_remove(pick % live.len());
                    pending.push((b.bytes(), b.category(), b.last_use()));
                }
                Op::Begin => {
                    if open.is_none() {
                        let f = ctx.begin_frame().unwrap();
                        prop_assert_eq!(f.value(), ctx.last_submitted() + 1);
                        freed_total += f.freed() as u64;
                        pending.retain(|p| p.2 > completed);
                        open = Some(f);
                    } else {
                        let err = ctx.begin_frame().unwrap_err();
                        prop_assert!(matches!(err, Error::Lifecycle(_)));
                    }
                }
                Op::Abandon => { open = None; }
                Op::Submit => {
                    if let Some(f) = open.take() { submit_reported(&ctx, f); }
                }
                Op::Complete => {
                    let last = ctx.last_submitted();
                    if completed < last {
                        completed += 1;
                        report(&ctx, completed);
                    }
                }
                Op::Collect => {
                    let n = ctx.collect().unwrap() as u64;
                    prop_assert_eq!(ctx.completed_value().unwrap(), completed);
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
        drop(live);
        drop(open);
        // Report everything submitted so shutdown's wait returns at once.
        report(&ctx, ctx.last_submitted());
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
