//! A ring of primary command buffers, one per frame in flight, for tools, tests and the demo
//! (an engine records into its own).

use std::sync::{Arc, Mutex, MutexGuard};

use ash::vk;

use crate::error::{Error, Result, vk_err};
use crate::gpu::context::{Context, Frame, FrameTag, Shared, SubmitSync, THROTTLE_TIMEOUT};
use crate::gpu::memory::RawObject;
use crate::gpu::timeline::Submitted;

/// Command buffers reused round-robin. Each remembers the frame that last submitted it, and
/// [`FrameRing::begin`] resets one only once the GPU has completed that frame. Dropping the
/// ring retires its pool (and with it every buffer) at the last frame it submitted.
///
/// One command buffer of a ring is out at a time: [`FrameRing::begin`] hands out a
/// [`RingCommand`] that borrows the ring, so the ring (and its pool) outlives it, and `begin`
/// refuses ([`Error::Lifecycle`]) while the last one is neither submitted nor dropped. So the
/// pool is only ever used through that one command buffer (its external synchronization).
pub struct FrameRing {
    shared: Arc<Shared>,
    pool: vk::CommandPool,
    state: Mutex<RingState>,
}

struct RingState {
    /// Each buffer and the frame that last submitted it (0: never).
    buffers: Vec<(vk::CommandBuffer, u64)>,
    next: usize,
    last_use: u64,
    /// A [`RingCommand`] of this ring is alive.
    out: bool,
}

/// A ring's command buffer, begun for one frame: record into [`RingCommand::raw`], then hand it
/// to [`FrameRing::submit`] with that frame. Submitting consumes it:
///
/// ```compile_fail,E0382
/// # fn f(ctx: &understory::gpu::context::Context, ring: &understory::gpu::frame::FrameRing)
/// #     -> understory::Result<()> {
/// let frame = ctx.begin_frame()?;
/// let cmd = ring.begin(&frame)?;
/// ring.submit(frame, cmd)?;
/// let next = ctx.begin_frame()?;
/// ring.submit(next, cmd)?; // use of moved value: a command buffer is submitted once
/// # Ok(()) }
/// ```
///
/// It borrows its ring, so the ring (whose pool owns the command buffer) cannot be dropped,
/// or moved away, while it lives:
///
/// ```compile_fail,E0505
/// # fn f(ctx: &understory::gpu::context::Context) -> understory::Result<()> {
/// use understory::gpu::frame::FrameRing;
/// let frame = ctx.begin_frame()?;
/// let ring = FrameRing::new(ctx)?;
/// let cmd = ring.begin(&frame)?;
/// drop(ring); // cannot move out of `ring` because it is borrowed
/// let other = FrameRing::new(ctx)?;
/// other.submit(frame, cmd)?;
/// # Ok(()) }
/// ```
#[must_use = "a begun command buffer is submitted with its frame"]
pub struct RingCommand<'ring> {
    ring: &'ring FrameRing,
    cmd: vk::CommandBuffer,
    slot: usize,
    /// The frame it was begun for (a dropped frame's value is reused by the next; its tag is
    /// not).
    frame: FrameTag,
}

impl RingCommand<'_> {
    /// The command buffer, in the recording state.
    pub fn raw(&self) -> vk::CommandBuffer {
        self.cmd
    }
    /// The value of the frame it was begun for.
    pub fn frame(&self) -> u64 {
        self.frame.value()
    }
}

impl std::fmt::Debug for RingCommand<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingCommand")
            .field("cmd", &self.cmd)
            .field("slot", &self.slot)
            .field("frame", &self.frame)
            .finish()
    }
}

impl Drop for RingCommand<'_> {
    fn drop(&mut self) {
        // Submitted or not, the ring may hand out its next command buffer. One never
        // submitted is reset by the `begin` that reaches its slot again.
        self.ring.lock().out = false;
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
                state: Mutex::new(RingState {
                    buffers: buffers.into_iter().map(|b| (b, 0)).collect(),
                    next: 0,
                    last_use: 0,
                    out: false,
                }),
            }),
            Err(e) => {
                // SAFETY: nothing was allocated from it.
                unsafe { ctx.device().destroy_command_pool(pool, None) };
                Err(Error::vk("vkAllocateCommandBuffers", e))
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, RingState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resets and begins the next command buffer for `frame`. Waits (up to
    /// [`THROTTLE_TIMEOUT`]) until the GPU has completed the frame that last submitted it;
    /// [`Error::NotReady`] if that frame's completion is the host's to report and it has not;
    /// [`Error::Lifecycle`] while another command buffer of this ring is out (begun, neither
    /// submitted nor dropped).
    pub fn begin(&self, frame: &Frame) -> Result<RingCommand<'_>> {
        frame.check(&self.shared, "FrameRing::begin")?;
        let mut st = self.lock();
        if st.out {
            return Err(Error::Lifecycle(
                "FrameRing::begin: a command buffer of this ring is still out: submit or drop it first".into(),
            ));
        }
        let slot = st.next;
        let (cmd, last) = st.buffers[slot];
        if last > 0 && self.shared.clock.completed()? < last {
            self.shared.clock.wait(last, THROTTLE_TIMEOUT)?;
        }
        let d = &self.shared.device;
        // SAFETY: the frame that last submitted cmd has completed (checked or waited above),
        // so it is not pending (VUID-vkResetCommandBuffer-commandBuffer-00045); the pool was
        // created with RESET_COMMAND_BUFFER (-00046); no RingCommand of the ring is out, so
        // nothing else records into a buffer of the pool while the ring's lock is held (the
        // host synchronization of the command buffer and its pool).
        unsafe { d.reset_command_buffer(cmd, vk::CommandBufferResetFlags::empty()) }
            .map_err(vk_err("vkResetCommandBuffer"))?;
        let begin = vk::CommandBufferBeginInfo::default()
            .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT);
        // SAFETY: reset above; now in the initial state.
        unsafe { d.begin_command_buffer(cmd, &begin) }.map_err(vk_err("vkBeginCommandBuffer"))?;
        st.next = (st.next + 1) % st.buffers.len();
        st.out = true;
        Ok(RingCommand {
            ring: self,
            cmd,
            slot,
            frame: frame.tag(),
        })
    }

    /// Ends `cmd` and submits it as `frame`'s submission on understory's queue, signalling
    /// understory's timeline at the frame's value.
    pub fn submit(&self, frame: Frame, cmd: RingCommand<'_>) -> Result<Submitted> {
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
        &self,
        frame: Frame,
        cmd: RingCommand<'_>,
        sync: &SubmitSync<'_>,
    ) -> Result<Submitted> {
        // The command borrows its ring, which therefore lives at the address it was begun
        // at: the address identifies the ring.
        let ours = std::ptr::eq(cmd.ring, self);
        if !ours || !cmd.frame.is(&frame) {
            return Err(Error::Lifecycle(format!(
                "command buffer begun for frame {}{} of {}, submitted with frame {}",
                cmd.frame.value(),
                if cmd.frame.dropped() {
                    " (dropped since)"
                } else {
                    ""
                },
                if ours { "this ring" } else { "another ring" },
                frame.value()
            )));
        }
        let d = &self.shared.device;
        let end = || {
            // SAFETY: begun by `begin` and recorded by the caller; the frame is still open and
            // the context not shut down (checked under the queue lock just before, which
            // shutdown's close also takes), so nothing it recorded was destroyed and it is still
            // recording (VUID-vkEndCommandBuffer-commandBuffer-00059); the only command buffer
            // of the pool that is out, and `cmd` is consumed here (pool host synchronization).
            unsafe { d.end_command_buffer(cmd.cmd) }.map_err(vk_err("vkEndCommandBuffer"))
        };
        // SAFETY: executable once `end` ran, of this device and queue family; recorded for
        // `frame` (the recording functions it went through checked their frame); `sync` is the
        // caller's.
        let submitted = unsafe { self.shared.submit_frame_then(frame, &[cmd.cmd], sync, end) }?;
        let mut st = self.lock();
        st.buffers[cmd.slot].1 = submitted.value();
        st.last_use = submitted.value();
        drop(st);
        drop(cmd);
        Ok(submitted)
    }
}

impl std::fmt::Debug for FrameRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("FrameRing")
            .field("buffers", &st.buffers.len())
            .field("last_use", &st.last_use)
            .field("out", &st.out)
            .finish()
    }
}

impl Drop for FrameRing {
    fn drop(&mut self) {
        // Destroying the pool frees its buffers: only once the last frame that submitted one
        // has completed. No RingCommand is alive (each borrows the ring).
        let last_use = self
            .state
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .last_use;
        self.shared
            .retire_object(RawObject::CommandPool(self.pool), last_use);
    }
}
