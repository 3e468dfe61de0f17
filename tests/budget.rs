//! Heap budgets on the real driver: the estimate path on lavapipe, `VK_EXT_memory_budget` where
//! the driver has it, and clamping of bad driver numbers injected through the source trait.

mod common;

use ash::vk;
use understory::gpu::budget::{BudgetSource, Clamp, RawHeap, Source, estimated_budget};
use understory::gpu::memory::{BufferDesc, MemoryLocation};

#[test]
fn budgets_come_from_the_extension_or_are_labelled_estimates() {
    let Some(ctx) = common::context("budgets_come_from_the_extension") else {
        return;
    };
    let adapter = ctx.adapter().clone();
    let mut heaps = ctx.heap_budgets();
    let ours = vec![12_345u64; adapter.heaps.len()];
    let snapshot = heaps.refresh(&ours).expect("refresh").to_vec();
    assert_eq!(snapshot.len(), adapter.heaps.len());
    for (h, info) in snapshot.iter().zip(&adapter.heaps) {
        assert_eq!(h.size, info.size);
        assert_eq!(h.device_local, info.device_local);
        assert!(
            h.budget > 0 && h.budget <= h.size,
            "heap {}: {h:?}",
            h.index
        );
        if ctx.features().memory_budget {
            assert_eq!(h.source, Source::Ext);
        } else {
            assert_eq!(h.source, Source::Estimated);
            assert_eq!(h.budget, estimated_budget(h.size));
            assert_eq!(h.usage, 12_345, "estimate: usage is what understory holds");
            assert_eq!(h.clamped, None);
        }
    }
    eprintln!(
        "budget source on {}: {}",
        adapter.name,
        if ctx.features().memory_budget {
            "VK_EXT_memory_budget"
        } else {
            "estimated"
        }
    );
    common::finish(ctx, "budget sources");
}

/// Wraps the driver and corrupts its numbers the way buggy drivers do: budgets of 0 or three
/// heaps, and (odd heaps) a usage larger than the heap.
struct Corrupt<S>(S);
impl<S: BudgetSource> BudgetSource for Corrupt<S> {
    fn query(&mut self) -> understory::Result<Vec<RawHeap>> {
        let mut heaps = self.0.query()?;
        for (i, h) in heaps.iter_mut().enumerate() {
            let usage = if i % 2 == 0 {
                h.driver.map_or(0, |d| d.usage)
            } else {
                u64::MAX - 7
            };
            h.driver = Some(understory::gpu::budget::DriverNumbers {
                budget: if i % 2 == 0 {
                    0
                } else {
                    h.info.size.saturating_mul(3)
                },
                usage,
            });
        }
        Ok(heaps)
    }
}

#[test]
fn bad_driver_numbers_fall_back_to_the_labelled_estimate() {
    let Some(ctx) = common::context("bad_driver_numbers_are_clamped") else {
        return;
    };
    let mut heaps =
        understory::gpu::budget::HeapBudgets::new(Box::new(Corrupt(ctx.budget_source())));
    for _ in 0..3 {
        let snapshot = heaps.refresh(&[]).expect("refresh").to_vec();
        for h in &snapshot {
            assert_eq!(h.budget, estimated_budget(h.size), "{h:?}");
            let want = if h.index % 2 == 0 {
                Clamp::Zero
            } else {
                Clamp::OverSize
            };
            assert_eq!(h.clamped, Some(want));
            assert_eq!(h.usage_estimated, h.index % 2 == 1, "{h:?}");
            if h.usage_estimated {
                assert!(h.usage <= h.size, "usage replaced by our own bytes: {h:?}");
            }
        }
    }
    assert_eq!(
        heaps.clamp_warnings_logged(),
        ctx.adapter().heaps.len() + ctx.adapter().heaps.len() / 2,
        "each bad number is logged once per heap, not once per refresh"
    );
    common::finish(ctx, "clamping");
}

#[test]
fn driver_usage_follows_our_allocations_where_the_extension_exists() {
    let Some(ctx) = common::context("driver_usage_follows_our_allocations") else {
        return;
    };
    if !ctx.features().memory_budget {
        common::finish(ctx, "usage follows allocations");
        return common::skip(
            "driver_usage_follows_our_allocations",
            "no VK_EXT_memory_budget on this driver (lavapipe): usage is understory's own by definition",
        );
    }
    let mut heaps = ctx.heap_budgets();
    let heap = ctx
        .adapter()
        .heaps
        .iter()
        .position(|h| h.device_local)
        .expect("a device-local heap");
    let before = heaps.refresh(&[]).unwrap()[heap].usage;
    let size = 256u64 << 20;
    let buf = ctx
        .create_buffer(&BufferDesc {
            name: "usage probe",
            size,
            usage: vk::BufferUsageFlags::STORAGE_BUFFER,
            location: MemoryLocation::GpuOnly,
            category: understory::policy::category::Category::Other,
        })
        .expect("256 MiB");
    let during = heaps.refresh(&[]).unwrap()[heap].usage;
    eprintln!("heap {heap} usage: before {before}, with 256 MiB buffer {during}");
    assert!(
        during >= before + size,
        "driver usage rose by {} bytes, expected at least {size}",
        during.saturating_sub(before)
    );
    drop(buf);
    common::finish(ctx, "usage follows allocations");
}
