//! One budget refresh (`vkGetPhysicalDeviceMemoryProperties2`, with `VK_EXT_memory_budget`
//! chained where present, then clamping/estimating). It runs every frame, so it must stay in
//! microseconds. `cargo bench --bench budget_refresh`; on the GPU machine
//! `.gpu/bin/budget_refresh --bench`.

use criterion::{Criterion, criterion_group, criterion_main};
use understory::gpu::context::{Context, ContextOptions};
use understory::gpu::instance::{InstanceOptions, Validation};

fn refresh(c: &mut Criterion) {
    let options = ContextOptions {
        instance: InstanceOptions {
            validation: Validation::Off,
            ..Default::default()
        },
        ..Default::default()
    }
    .with_env()
    .expect("environment");
    let ctx = match Context::new(&options) {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("*** SKIPPED budget_refresh: {e} ***");
            return;
        }
    };
    let a = ctx.adapter();
    let name = format!(
        "budget_refresh/{} ({})",
        a.name,
        if ctx.features().memory_budget {
            "ext"
        } else {
            "estimated"
        }
    );
    let mut heaps = ctx.heap_budgets();
    let ours = vec![0u64; a.heaps.len()];
    c.bench_function(&name, |b| {
        b.iter(|| {
            let h = heaps.refresh(std::hint::black_box(&ours)).expect("refresh");
            std::hint::black_box(h.len())
        })
    });
    // Raw driver query alone, for comparison with our resolve step.
    let mut source = ctx.budget_source();
    c.bench_function(&format!("{name}/driver query only"), |b| {
        b.iter(|| {
            use understory::gpu::budget::BudgetSource;
            std::hint::black_box(source.query().expect("query").len())
        })
    });
}

criterion_group!(benches, refresh);
criterion_main!(benches);
