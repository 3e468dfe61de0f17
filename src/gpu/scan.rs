//! Block scan: exclusive prefix sums of `u32` within blocks of [`SCAN_BLOCK`] elements plus each
//! block's total (`shaders/block_scan.wgsl`). The first pass of a device-wide scan, as used for
//! compaction offsets.

use ash::vk;

use crate::error::{Error, Result};
use crate::gpu::compute::{ComputePipeline, ComputePipelineDesc};
use crate::gpu::context::{Context, Frame};
use crate::gpu::memory::Buffer;
use crate::gpu::shaders;

/// Elements per block (the shader's workgroup size).
pub const SCAN_BLOCK: u32 = 256;

/// The pipeline.
#[derive(Debug)]
pub struct BlockScan {
    pipeline: ComputePipeline,
}

impl BlockScan {
    /// Builds the pipeline.
    pub fn new(ctx: &Context) -> Result<Self> {
        // SAFETY: BLOCK_SCAN is understory's own shader, validated by naga at build time
        // (VUID-VkShaderModuleCreateInfo-pCode-08737), with a compute entry point `main`
        // (VUID-VkPipelineShaderStageCreateInfo-pName-00707) whose interface is set 0,
        // bindings 0..3 storage buffers, and a 4-byte push-constant block (the count)
        // (VUID-VkComputePipelineCreateInfo-layout-07988); `record` keeps its accesses inside
        // the buffers by checking their sizes against the count.
        let pipeline = unsafe {
            ComputePipeline::new(
                ctx,
                &ComputePipelineDesc {
                    name: "block_scan",
                    spirv: shaders::BLOCK_SCAN,
                    entry: c"main",
                    storage_buffers: 3,
                    push_constant_bytes: 4,
                },
            )
        }?;
        Ok(Self { pipeline })
    }

    /// Records the dispatch for `count` elements of `input` into `output` (`count` u32s each)
    /// and `block_sums` (`ceil(count / 256)` u32s), checking their sizes and that each has
    /// `STORAGE_BUFFER` usage ([`Error::InvalidInput`] otherwise); a buffer with a live
    /// [`Mapped`](crate::gpu::memory::Mapped) view is [`Error::Lifecycle`]. Zero elements
    /// record nothing.
    ///
    /// # Safety
    /// As [`ComputePipeline::record_dispatch`]. The caller adds the barriers that order the
    /// input writes before, and the output reads after, this dispatch.
    pub unsafe fn record(
        &self,
        frame: &Frame,
        cmd: vk::CommandBuffer,
        input: &Buffer,
        output: &Buffer,
        block_sums: &Buffer,
        count: u32,
    ) -> Result<()> {
        let need = u64::from(count) * 4;
        let blocks = u64::from(count.div_ceil(SCAN_BLOCK)) * 4;
        if input.size() < need || output.size() < need || block_sums.size() < blocks {
            return Err(Error::InvalidInput(format!(
                "block_scan of {count}: buffers of {}/{}/{} bytes, need {need}/{need}/{blocks}",
                input.size(),
                output.size(),
                block_sums.size()
            )));
        }
        if let Some(b) = [input, output, block_sums]
            .into_iter()
            .find(|b| !b.usage().contains(vk::BufferUsageFlags::STORAGE_BUFFER))
        {
            return Err(Error::InvalidInput(format!(
                "block_scan: buffer {:?} (usage {:?}) lacks STORAGE_BUFFER usage",
                b.name(),
                b.usage()
            )));
        }
        if count == 0 {
            return Ok(());
        }
        let groups = [count.div_ceil(SCAN_BLOCK), 1, 1];
        // SAFETY: forwarded contract.
        unsafe {
            self.pipeline.record_dispatch(
                frame,
                cmd,
                &[input, output, block_sums],
                &count.to_le_bytes(),
                groups,
            )
        }
    }
}

/// The CPU reference: the same result as the shader (wrapping arithmetic).
pub fn block_scan_cpu(input: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let mut out = Vec::with_capacity(input.len());
    let mut sums = Vec::with_capacity(input.len().div_ceil(SCAN_BLOCK as usize));
    for block in input.chunks(SCAN_BLOCK as usize) {
        let mut acc = 0u32;
        for &v in block {
            out.push(acc);
            acc = acc.wrapping_add(v);
        }
        sums.push(acc);
    }
    (out, sums)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_reference_is_an_exclusive_scan_per_block() {
        let input: Vec<u32> = (1..=300).collect();
        let (out, sums) = block_scan_cpu(&input);
        assert_eq!(&out[..4], &[0, 1, 3, 6]);
        assert_eq!(out[256], 0, "each block starts over");
        assert_eq!(out[257], 257);
        assert_eq!(sums, vec![(1..=256).sum(), (257..=300).sum()]);
        assert_eq!(block_scan_cpu(&[]), (vec![], vec![]));
        let (_, s) = block_scan_cpu(&[u32::MAX, 2]);
        assert_eq!(s, vec![1], "wraps like the shader");
    }
}
