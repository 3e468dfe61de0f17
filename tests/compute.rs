//! A real compute dispatch (block scan) with readback, checked against the CPU reference.

mod common;

use ash::vk;
use understory::gpu::compute::memory_barrier;
use understory::gpu::context::Context;
use understory::gpu::memory::{Buffer, BufferDesc, MemoryLocation};
use understory::gpu::scan::{BlockScan, SCAN_BLOCK, block_scan_cpu};
use understory::policy::category::Category;

fn buffer(ctx: &Context, name: &str, bytes: u64, location: MemoryLocation) -> Buffer {
    ctx.create_buffer(&BufferDesc {
        name,
        size: bytes.max(4),
        usage: vk::BufferUsageFlags::STORAGE_BUFFER,
        location,
        category: Category::Other,
    })
    .expect("buffer")
}

fn read_u32(b: &Buffer, n: usize) -> Vec<u32> {
    bytemuck::cast_slice(&b.mapped().expect("host visible")[..n * 4]).to_vec()
}

/// Runs the scan on the GPU and returns (output, block sums).
fn gpu_scan(ctx: &Context, scan: &BlockScan, input: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let n = input.len();
    let blocks = n.div_ceil(SCAN_BLOCK as usize);
    let mut inp = buffer(ctx, "scan input", n as u64 * 4, MemoryLocation::CpuToGpu);
    let out = buffer(ctx, "scan output", n as u64 * 4, MemoryLocation::GpuToCpu);
    let sums = buffer(
        ctx,
        "scan sums",
        blocks as u64 * 4,
        MemoryLocation::GpuToCpu,
    );
    inp.mapped_mut().unwrap()[..n * 4].copy_from_slice(bytemuck::cast_slice(input));
    ctx.submit_and_wait(|frame, cmd| {
        // SAFETY: cmd is recording for `frame`; the scan marks the buffers used by it.
        unsafe { scan.record(frame, cmd, &inp, &out, &sums, n as u32) }?;
        // SAFETY: recording; makes the shader writes visible to the host read after the wait.
        unsafe {
            memory_barrier(
                ctx.device(),
                cmd,
                (
                    vk::PipelineStageFlags::COMPUTE_SHADER,
                    vk::AccessFlags::SHADER_WRITE,
                ),
                (vk::PipelineStageFlags::HOST, vk::AccessFlags::HOST_READ),
            )
        };
        Ok(())
    })
    .expect("submit");
    let result = (read_u32(&out, n), read_u32(&sums, blocks));
    drop((inp, out, sums));
    ctx.collect().unwrap();
    result
}

/// xorshift: deterministic test data without a dependency.
fn pseudo_random(n: usize, seed: u64) -> Vec<u32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 32) as u32
        })
        .collect()
}

#[test]
fn block_scan_matches_cpu_reference() {
    let Some(ctx) = common::context("block_scan_matches_cpu_reference") else {
        return;
    };
    let scan = BlockScan::new(&ctx).expect("pipeline");
    let cases: Vec<Vec<u32>> = vec![
        vec![7],
        (0..255).collect(),
        (0..256).map(|_| 1).collect(),
        (0..257).collect(),
        pseudo_random(100_003, 42)
            .into_iter()
            .map(|v| v % 1000)
            .collect(),
        // Large values: the sums wrap, on both sides alike.
        pseudo_random(4096, 7),
    ];
    for input in &cases {
        let (gpu_out, gpu_sums) = gpu_scan(&ctx, &scan, input);
        let (cpu_out, cpu_sums) = block_scan_cpu(input);
        assert_eq!(gpu_out, cpu_out, "scan of {} elements", input.len());
        assert_eq!(gpu_sums, cpu_sums, "block sums of {} elements", input.len());
    }
    drop(scan);
    common::finish(ctx, "block_scan_matches_cpu_reference");
}

#[test]
fn zero_elements_record_nothing_and_bad_sizes_are_typed_errors() {
    let Some(ctx) = common::context("zero_elements_record_nothing") else {
        return;
    };
    let scan = BlockScan::new(&ctx).expect("pipeline");
    let small = buffer(&ctx, "small", 16, MemoryLocation::CpuToGpu);
    let err = ctx
        .submit_and_wait(|frame, cmd| {
            // SAFETY: recording for `frame`; the sizes are checked before anything is recorded.
            unsafe { scan.record(frame, cmd, &small, &small, &small, 1000) }
        })
        .unwrap_err();
    assert!(matches!(err, understory::Error::InvalidInput(_)), "{err}");
    ctx.submit_and_wait(|frame, cmd| {
        // SAFETY: recording; nothing is dispatched for zero elements.
        unsafe { scan.record(frame, cmd, &small, &small, &small, 0) }
    })
    .expect("empty submit");
    let zero = ctx.create_buffer(&BufferDesc {
        name: "zero",
        size: 0,
        usage: vk::BufferUsageFlags::STORAGE_BUFFER,
        location: MemoryLocation::GpuOnly,
        category: Category::Other,
    });
    assert!(matches!(zero, Err(understory::Error::InvalidInput(_))));
    drop((small, scan));
    common::finish(ctx, "zero_elements_record_nothing");
}
