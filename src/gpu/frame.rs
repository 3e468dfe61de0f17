//! A ring of primary command buffers, one per frame in flight, for tools, tests and the demo
//! (an engine records into its own).

use ash::vk;

use crate::error::{Result, vk_err};
use crate::gpu::context::Context;

/// Command buffers reused every `frames_in_flight` frames. [`Context::begin_frame`]'s throttle
/// guarantees the buffer being reset has finished executing.
pub struct FrameRing {
    pool: vk::CommandPool,
    buffers: Vec<vk::CommandBuffer>,
    next: usize,
}

impl FrameRing {
    /// One command buffer per frame in flight, from a pool of the context's queue family.
    pub fn new(ctx: &Context) -> Result<Self> {
        let info = vk::CommandPoolCreateInfo::default()
            .queue_family_index(ctx.queue_family())
            .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER);
        // SAFETY: valid create info for this device.
        let pool = unsafe { ctx.device().create_command_pool(&info, None) }
            .map_err(vk_err("vkCreateCommandPool"))?;
        let alloc = vk::CommandBufferAllocateInfo::default()
            .command_pool(pool)
            .level(vk::CommandBufferLevel::PRIMARY)
            .command_buffer_count(ctx.frames_in_flight());
        // SAFETY: the pool is new and ours.
        match unsafe { ctx.device().allocate_command_buffers(&alloc) } {
            Ok(buffers) => Ok(Self {
                pool,
                buffers,
                next: 0,
            }),
            Err(e) => {
                // SAFETY: nothing was allocated from it.
                unsafe { ctx.device().destroy_command_pool(pool, None) };
                Err(crate::Error::vk("vkAllocateCommandBuffers", e))
            }
        }
    }

    /// Resets and begins the next command buffer. Call after [`Context::begin_frame`], which
    /// waits until the submission that last used this buffer has completed.
    pub fn begin(&mut self, ctx: &Context) -> Result<vk::CommandBuffer> {
        let cmd = self.buffers[self.next];
        self.next = (self.next + 1) % self.buffers.len();
        // SAFETY: begin_frame's throttle means the last submission of cmd (frames_in_flight
        // frames ago) has completed, so it is not pending (VUID-vkResetCommandBuffer-commandBuffer-00045).
        unsafe {
            ctx.device()
                .reset_command_buffer(cmd, vk::CommandBufferResetFlags::empty())
        }
        .map_err(vk_err("vkResetCommandBuffer"))?;
        let begin = vk::CommandBufferBeginInfo::default()
            .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT);
        // SAFETY: reset above; now in the initial state.
        unsafe { ctx.device().begin_command_buffer(cmd, &begin) }
            .map_err(vk_err("vkBeginCommandBuffer"))?;
        Ok(cmd)
    }

    /// Ends and submits `cmd`, returning the timeline value it signals.
    pub fn submit(&self, ctx: &Context, cmd: vk::CommandBuffer) -> Result<u64> {
        // SAFETY: cmd was begun by `begin` and recorded by the caller.
        unsafe { ctx.device().end_command_buffer(cmd) }.map_err(vk_err("vkEndCommandBuffer"))?;
        // SAFETY: executable; what it references is retired with the returned value by callers.
        unsafe { ctx.submit(&[cmd]) }
    }

    /// Destroys the pool after waiting for the context's last submission.
    pub fn destroy(self, ctx: &Context) -> Result<()> {
        let last = ctx.timeline().last_submitted();
        ctx.timeline()
            .wait(last, std::time::Duration::from_secs(30))?;
        // SAFETY: every submission from this pool has completed.
        unsafe { ctx.device().destroy_command_pool(self.pool, None) };
        Ok(())
    }
}
