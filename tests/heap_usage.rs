//! The driver's real heapUsage against understory's allocations. In a test binary of its own:
//! heapUsage is process-wide, so any other test allocating at the same time (libtest runs the
//! tests of one binary in parallel) would move it.

mod common;

use common::{context_with_memory as context_with, no_cache, storage_desc as desc};
use understory::gpu::memory::Buffer;
use understory::policy::category::Category;

const MIB: u64 = 1 << 20;

/// On a driver with `VK_EXT_memory_budget` (the NVIDIA GPU machine): 1 GiB in the instances
/// category shows up in the driver's real heapUsage, and goes back once retired, collected and
/// its blocks let go.
#[test]
fn one_gib_moves_the_drivers_heap_usage_and_comes_back() {
    let test = "one_gib_moves_the_drivers_heap_usage";
    let cfg = no_cache();
    let Some(ctx) = context_with(test, cfg) else {
        return;
    };
    if !ctx.features().memory_budget {
        common::finish(ctx, test);
        return common::skip(
            test,
            "needs VK_EXT_memory_budget (real heapUsage); lavapipe has none",
        );
    }
    let mem = ctx.memory();
    let heap = mem
        .heaps()
        .iter()
        .position(|h| h.device_local)
        .expect("device-local heap");
    let usage = |label: &str| {
        let h = &mem.refresh_budget().unwrap()[heap];
        eprintln!(
            "{label:>28}: heapUsage {:>12} B  heapBudget {:>14} B  ours {:>12} B  foreign {:>10} B",
            h.budget.usage, h.budget.budget, h.ours_total, h.foreign
        );
        h.budget.usage
    };
    let before = usage("before");
    let buffers: Vec<Buffer> = (0..256)
        .map(|i| {
            ctx.create_buffer(&desc(&format!("gib-{i}"), 4 * MIB, Category::Instances))
                .unwrap()
        })
        .collect();
    let st = mem.stats().categories[Category::Instances];
    eprintln!(
        "allocated 256 x 4 MiB: live {} B, reserved {} B",
        st.live_bytes, st.reserved_bytes
    );
    let during = usage("with 1 GiB of instances");
    assert!(
        during >= before + (1 << 30),
        "heapUsage rose by {} B, expected >= 1 GiB",
        during - before
    );
    drop(buffers);
    let pending = usage("retired, not yet collected");
    assert!(
        pending >= before + (1 << 30),
        "nothing is freed before collect"
    );
    let freed = ctx.collect().unwrap();
    let collected = usage("collected");
    let released = mem.release_empty_blocks().unwrap();
    let after = usage("empty blocks released");
    eprintln!("freed {freed} buffers; released {released} B of kept blocks");
    let block = mem.config().device_block_max_bytes;
    assert!(
        collected <= before + block,
        "collect leaves at most one kept block"
    );
    assert!(
        after <= before + block,
        "heapUsage back within one block: {after} vs {before}"
    );
    common::finish(ctx, test);
}
