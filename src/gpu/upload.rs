//! Buffer uploads recorded into the host's command buffer: copies from staging, then the barrier
//! that makes them visible to every shader that reads instances.

use ash::vk;

/// One copy: source buffer, destination buffer, region.
pub(crate) type BufferCopy = (vk::Buffer, vk::Buffer, vk::BufferCopy);

/// Records `copies` and, if there were any, one global barrier from the transfers to the
/// compute (and, on a graphics queue, vertex-input, vertex and fragment) stages.
///
/// # Safety
/// `cmd` must be recording on a queue of `device` with the flags `graphics` describes, outside
/// a render pass; every buffer must be live, of `device`, and kept alive until the submission
/// completes (marked used by its frame); every region must lie inside both buffers, and the
/// source buffers must have `TRANSFER_SRC` and the destinations `TRANSFER_DST` usage.
pub(crate) unsafe fn record_copies(
    device: &ash::Device,
    cmd: vk::CommandBuffer,
    graphics: bool,
    copies: &[BufferCopy],
) {
    if copies.is_empty() {
        return;
    }
    let mut dst_stages = vk::PipelineStageFlags::COMPUTE_SHADER;
    if graphics {
        dst_stages |= vk::PipelineStageFlags::VERTEX_INPUT
            | vk::PipelineStageFlags::VERTEX_SHADER
            | vk::PipelineStageFlags::FRAGMENT_SHADER;
    }
    let barrier = vk::MemoryBarrier::default()
        .src_access_mask(vk::AccessFlags::TRANSFER_WRITE)
        .dst_access_mask(vk::AccessFlags::SHADER_READ | vk::AccessFlags::VERTEX_ATTRIBUTE_READ);
    // SAFETY: as the caller vouched (VUID-vkCmdCopyBuffer-srcBuffer-00118, -dstBuffer-00120,
    // -srcOffset-00113/-dstOffset-00114 for the ranges); the barrier names only stages the
    // queue supports (VUID-vkCmdPipelineBarrier-dstStageMask-06462).
    unsafe {
        for (src, dst, region) in copies {
            device.cmd_copy_buffer(cmd, *src, *dst, &[*region]);
        }
        device.cmd_pipeline_barrier(
            cmd,
            vk::PipelineStageFlags::TRANSFER,
            dst_stages,
            vk::DependencyFlags::empty(),
            &[barrier],
            &[],
            &[],
        );
    }
}
