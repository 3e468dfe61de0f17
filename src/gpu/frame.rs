//! A ring of primary command buffers, one per frame in flight, for tools, tests and the demo
//! (an engine records into its own).

use std::sync::Arc;

use ash::vk;

use crate::error::{Error, Result, vk_err};
use crate::gpu::context::{Context, Frame, Shared, SubmitSync, THROTTLE_TIMEOUT};
use crate::gpu::memory::RawObject;
use crate::gpu::timeline::Submitted;

/// Command buffers reused round-robin. Each remembers the frame that last submitted it, and
/// [`FrameRing::begin`] resets one only once the GPU has completed that frame. Dropping the
/// ring retires its pool (and with it every buffer) at the last frame it submitted.
pub struct FrameRing {
    shared: Arc<Shared>,
    pool: vk::CommandPool,
    /// Each buffer and the frame that last submitted it (0: never).
    buffers: Vec<(vk::CommandBuffer, u64)>,
    next: usize,
    last_use: u64,
}

/// A ring's command buffer, begun for one frame: record into [`RingCommand::raw`], then hand it
/// to [`FrameRing::submit`] with that frame. Submitting consumes it:
///
/// ```compile_fail,E0382
/// # fn f(ctx: &understory::gpu::context::Context, ring: &mut understory::gpu::frame::FrameRing)
/// #     -> understory::Result<()> {
/// let frame = ctx.begin_frame()?;
/// let cmd = ring.begin(&frame)?;
/// ring.submit(frame, cmd)?;
/// let next = ctx.begin_frame()?;
/// ring.submit(next, cmd)?; // use of moved value: a command buffer is submitted once
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "a begun command buffer is submitted with its frame"]
pub struct RingCommand {
    cmd: vk::CommandBuffer,
    slot: usize,
    frame: u64,
    ring: u64,
}

impl RingCommand {
    /// The command buffer, in the recording state.
    pub fn raw(&self) -> vk::CommandBuffer {
        self.cmd
    }
    /// The value of the frame it was begun for.
    pub fn frame(&self) -> u64 {
        self.frame
    }
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
                shared: ctx.shared().clone(),
                pool,
                buffers: buffers.into_iter().map(|b| (b, 0)).collect(),
                next: 0,
                last_use: 0,
            }),
            Err(e) => {
                // SAFETY: nothing was allocated from it.
                unsafe { ctx.device().destroy_command_pool(pool, None) };
                Err(Error::vk("vkAllocateCommandBuffers", e))
            }
        }
    }

    /// Identifies the ring (its pool's handle, unique while the ring lives).
    fn id(&self) -> u64 {
        use ash::vk::Handle;
        self.pool.as_raw()
    }

    /// Resets and begins the next command buffer for `frame`. Waits (up to
    /// [`THROTTLE_TIMEOUT`]) until the GPU has completed the frame that last submitted it;
    /// [`Error::NotReady`] if that frame's completion is the host's to report and it has not.
    pub fn begin(&mut self, frame: &Frame) -> Result<RingCommand> {
        frame.check(&self.shared, "FrameRing::begin")?;
        let slot = self.next;
        let (cmd, last) = self.buffers[slot];
        if last > 0 && self.shared.clock.completed()? < last {
            self.shared.clock.wait(last, THROTTLE_TIMEOUT)?;
        }
        self.next = (self.next + 1) % self.buffers.len();
        let d = &self.shared.device;
        // SAFETY: the frame that last submitted cmd has completed (checked or waited above),
        // so it is not pending (VUID-vkResetCommandBuffer-commandBuffer-00045); the pool was
        // created with RESET_COMMAND_BUFFER.
        unsafe { d.reset_command_buffer(cmd, vk::CommandBufferResetFlags::empty()) }
            .map_err(vk_err("vkResetCommandBuffer"))?;
        let begin = vk::CommandBufferBeginInfo::default()
            .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT);
        // SAFETY: reset above; now in the initial state.
        unsafe { d.begin_command_buffer(cmd, &begin) }.map_err(vk_err("vkBeginCommandBuffer"))?;
        Ok(RingCommand {
            cmd,
            slot,
            frame: frame.value(),
            ring: self.id(),
        })
    }

    /// Ends `cmd` and submits it as `frame`'s submission on understory's queue, signalling
    /// understory's timeline at the frame's value.
    pub fn submit(&mut self, frame: Frame, cmd: RingCommand) -> Result<Submitted> {
        // SAFETY: no extra semaphores or fence.
        unsafe { self.submit_with(frame, cmd, &SubmitSync::default()) }
    }

    /// As [`FrameRing::submit`], with extra waits, signals and a fence (a swapchain's
    /// semaphores, say).
    ///
    /// # Safety
    /// `sync`'s semaphores and fence are of this device and valid to wait on or signal as the
    /// Vulkan rules for `vkQueueSubmit` require.
    pub unsafe fn submit_with(
        &mut self,
        frame: Frame,
        cmd: RingCommand,
        sync: &SubmitSync<'_>,
    ) -> Result<Submitted> {
        if cmd.ring != self.id() || cmd.frame != frame.value() {
            return Err(Error::Lifecycle(format!(
                "command buffer begun for frame {} of {}, submitted with frame {}",
                cmd.frame,
                if cmd.ring == self.id() {
                    "this ring"
                } else {
                    "another ring"
                },
                frame.value()
            )));
        }
        let d = &self.shared.device;
        // SAFETY: begun by `begin` and recorded by the caller.
        unsafe { d.end_command_buffer(cmd.cmd) }.map_err(vk_err("vkEndCommandBuffer"))?;
        // SAFETY: executable, of this device and queue family; recorded for `frame` (the
        // recording functions it went through checked their frame); `sync` is the caller's.
        let submitted = unsafe { self.shared.submit_frame(frame, &[cmd.cmd], sync) }?;
        self.buffers[cmd.slot].1 = submitted.value();
        self.last_use = submitted.value();
        Ok(submitted)
    }
}

impl std::fmt::Debug for FrameRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameRing")
            .field("buffers", &self.buffers.len())
            .field("last_use", &self.last_use)
            .finish()
    }
}

impl Drop for FrameRing {
    fn drop(&mut self) {
        // Destroying the pool frees its buffers: only once the last frame that submitted one
        // has completed.
        self.shared
            .retire_object(RawObject::CommandPool(self.pool), self.last_use);
    }
}
