//! The device context: either created by understory, or wrapped around a host engine's own
//! instance, device and queue.
//!
//! # The host contract
//! - **Frames.** [`Context::begin_frame`] opens a frame and hands out its value. Everything
//!   recorded for the frame (understory's recording functions take `&Frame`) is kept alive
//!   until the GPU has completed that frame. The frame ends with a submission: understory's
//!   ([`Context::submit_frame`], [`FrameRing::submit`](crate::gpu::frame::FrameRing::submit),
//!   [`Context::submit_and_wait`]) or the host's own, announced with
//!   [`Context::frame_submitted`] and a [`FrameSignal`]: understory's timeline semaphore, the
//!   host's timeline semaphore, or completion the host reports with
//!   [`Context::frames_completed`]. One frame is open at a time, and understory signals its
//!   semaphore only in a frame's own submission, so a value handed out is never overtaken.
//! - **One queue.** Every frame's submission goes to the context's queue
//!   ([`HostHandles::queue`]), made while holding [`Context::queue`]'s lock, before the next
//!   frame begins: so frames reach the GPU in value order, their signals of understory's
//!   timeline execute in increasing order (`VUID-VkSubmitInfo-pSignalSemaphores-03242`), and
//!   work recorded for one frame is ordered after the frames before it (understory's barriers
//!   assume that order, and its resources are `VK_SHARING_MODE_EXCLUSIVE` to the queue's
//!   family). The host's other work may use other queues, as long as it does not touch
//!   understory's resources.
//! - **Freeing.** Dropping a resource or a pass retires it at the last frame that used it; it
//!   is freed by a later [`Context::collect`] (or `begin_frame`) once that frame completed.
//! - **Waiting.** understory waits only for its own frames, on their semaphores, never with
//!   `vkDeviceWaitIdle` or `vkQueueWaitIdle`. A wait that runs out of time is
//!   [`Error::Timeout`], and nothing it guarded is destroyed.
//! - **Shutdown.** [`Context::shutdown`] takes the context: no frame can begin after it. It
//!   waits for the last frame, frees everything retired, and reports what is still alive.
//!   Objects still alive keep the shared state (and the device) alive until they are dropped.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ash::vk;

use crate::error::{Error, Result, vk_err};
use crate::gpu::adapter::{self, Adapter, DeviceFeatures, DeviceSelector};
use crate::gpu::budget::{DriverBudget, HeapBudgets};
use crate::gpu::debug::Canary;
use crate::gpu::instance::{Instance, InstanceOptions};
use crate::gpu::memory::{
    Buffer, BufferDesc, HeapReport, Image, ImageDesc, Memory, MemoryConfig, RawObject,
    ShutdownReport,
};
use crate::gpu::requirements::{Capabilities, DeviceRequirements};
use crate::gpu::timeline::{Clock, FrameSignal, Submitted};

/// Buffer usage bits of core Vulkan 1.0; the others need extensions or features understory
/// does not enable.
const CORE_BUFFER_USAGE: vk::BufferUsageFlags = vk::BufferUsageFlags::from_raw(
    vk::BufferUsageFlags::TRANSFER_SRC.as_raw()
        | vk::BufferUsageFlags::TRANSFER_DST.as_raw()
        | vk::BufferUsageFlags::UNIFORM_TEXEL_BUFFER.as_raw()
        | vk::BufferUsageFlags::STORAGE_TEXEL_BUFFER.as_raw()
        | vk::BufferUsageFlags::UNIFORM_BUFFER.as_raw()
        | vk::BufferUsageFlags::STORAGE_BUFFER.as_raw()
        | vk::BufferUsageFlags::INDEX_BUFFER.as_raw()
        | vk::BufferUsageFlags::VERTEX_BUFFER.as_raw()
        | vk::BufferUsageFlags::INDIRECT_BUFFER.as_raw(),
);

/// Image usage bits of core Vulkan 1.0.
const CORE_IMAGE_USAGE: vk::ImageUsageFlags = vk::ImageUsageFlags::from_raw(
    vk::ImageUsageFlags::TRANSFER_SRC.as_raw()
        | vk::ImageUsageFlags::TRANSFER_DST.as_raw()
        | vk::ImageUsageFlags::SAMPLED.as_raw()
        | vk::ImageUsageFlags::STORAGE.as_raw()
        | vk::ImageUsageFlags::COLOR_ATTACHMENT.as_raw()
        | vk::ImageUsageFlags::DEPTH_STENCIL_ATTACHMENT.as_raw()
        | vk::ImageUsageFlags::TRANSIENT_ATTACHMENT.as_raw()
        | vk::ImageUsageFlags::INPUT_ATTACHMENT.as_raw(),
);

/// Core Vulkan 1.0's formats up to the last uncompressed one (`R4G4_UNORM_PACK8` ..=
/// `D32_SFLOAT_S8_UINT`): compressed formats need texture-compression features understory does
/// not enable, and later formats need extensions or newer versions.
const CORE_UNCOMPRESSED_FORMATS: std::ops::RangeInclusive<i32> =
    vk::Format::R4G4_UNORM_PACK8.as_raw()..=vk::Format::D32_SFLOAT_S8_UINT.as_raw();

/// Most frames the CPU may record ahead of the GPU.
pub const MAX_FRAMES_IN_FLIGHT: u32 = 4;

/// How long `begin_frame` waits for the GPU before giving up with [`Error::Timeout`].
pub const THROTTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`Context::shutdown`] waits for the last frame.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`Context::submit_and_wait`] waits for its submission.
pub const ONE_SHOT_TIMEOUT: Duration = Duration::from_secs(60);

/// How to build a [`Context`].
#[derive(Clone, Debug)]
pub struct ContextOptions {
    /// Instance and validation settings (used by [`Context::new`] only; a host's instance is its
    /// own).
    pub instance: InstanceOptions,
    /// Which device ([`Context::new`] only); `None` picks the best (discrete > integrated >
    /// virtual > CPU).
    pub device: Option<DeviceSelector>,
    /// Memory caps, block sizes, priorities.
    pub memory: MemoryConfig,
    /// Frames the CPU may run ahead of the GPU, 1..=4 (default 2): `begin_frame` waits for the
    /// GPU beyond that (only for frames it can wait on; see [`FrameSignal::HostReported`]).
    pub frames_in_flight: u32,
    /// The host makes every submission to the queue, and understory never submits to it:
    /// [`Context::submit_frame`], [`FrameRing::submit`](crate::gpu::frame::FrameRing::submit)
    /// and [`Context::submit_and_wait`] return [`Error::Unsupported`]. For hosts whose queue
    /// submissions cannot take [`Context::queue`]'s lock (wgpu submits from inside its own
    /// `Queue::submit`): the frames are still announced with [`Context::frame_submitted`].
    /// Default `false`.
    pub host_submits_only: bool,
}

impl Default for ContextOptions {
    fn default() -> Self {
        Self {
            instance: InstanceOptions::default(),
            device: None,
            memory: MemoryConfig::default(),
            frames_in_flight: 2,
            host_submits_only: false,
        }
    }
}

impl ContextOptions {
    /// Applies `UNDERSTORY_VALIDATION`, `UNDERSTORY_SYNC_VALIDATION` and `UNDERSTORY_DEVICE`.
    pub fn with_env(mut self) -> Result<Self> {
        self.instance = self.instance.with_env()?;
        if let Ok(v) = std::env::var("UNDERSTORY_DEVICE") {
            self.device = Some(DeviceSelector::parse(&v)?);
        }
        Ok(self)
    }
}

/// A host engine's Vulkan objects, handed to [`Context::from_raw`].
pub struct HostHandles {
    /// The loader the host uses.
    pub entry: ash::Entry,
    /// The host's instance.
    pub instance: ash::Instance,
    /// `VkApplicationInfo::apiVersion` the instance was created with (>= 1.2; the draw pass
    /// needs 1.3).
    pub instance_api_version: u32,
    /// Whether `VK_EXT_debug_utils` is enabled on the instance. If so, understory attaches its
    /// own messenger, and its canary counts validation messages.
    pub debug_utils_enabled: bool,
    /// The physical device the device was created from.
    pub physical_device: vk::PhysicalDevice,
    /// The host's device.
    pub device: ash::Device,
    /// Family of `queue`.
    pub queue_family_index: u32,
    /// The context's queue: understory submits to it (one-shot work, [`FrameRing`]
    /// submissions, [`Context::submit_frame`]), and the host submits every frame it announces
    /// with [`Context::frame_submitted`] to it as well, holding [`Context::queue`]'s lock (see
    /// the module's host contract: one queue, frames in value order). The host's other work may
    /// use other queues.
    ///
    /// [`FrameRing`]: crate::gpu::frame::FrameRing
    pub queue: vk::Queue,
    /// Which of understory's extensions and features the host enabled on the device (see
    /// [`DeviceRequirements`]).
    pub enabled: DeviceFeatures,
    /// What the host will ask understory to do: `from_raw` returns [`Error::Unsupported`]
    /// naming everything these need that `enabled`, the API versions or the queue lack.
    pub capabilities: Capabilities,
}

/// Everything the context's objects share. Each buffer, image, pass and frame holds it, so the
/// device, the allocators and the retire queue outlive every object made from them.
pub(crate) struct Shared {
    pub(crate) device: ash::Device,
    pub(crate) adapter: Adapter,
    pub(crate) features: DeviceFeatures,
    pub(crate) queue: Mutex<vk::Queue>,
    /// The [`thread_token`] of the thread holding `queue`'s lock through a [`QueueGuard`]
    /// (0: none), so that a submission on that thread fails instead of deadlocking.
    queue_owner: AtomicU64,
    pub(crate) queue_family: u32,
    pub(crate) queue_flags: vk::QueueFlags,
    pub(crate) frames_in_flight: u32,
    /// [`ContextOptions::host_submits_only`].
    host_submits_only: bool,
    /// The physical device's limits (images are checked against them).
    limits: vk::PhysicalDeviceLimits,
    pub(crate) memory: Memory,
    pub(crate) clock: Clock,
    one_shot_pool: Mutex<vk::CommandPool>,
    /// A wait timed out (or could not be made) at shutdown: leak rather than destroy.
    stuck: AtomicBool,
    owns_device: bool,
    /// What the host asked to keep alive as long as anything made through the context
    /// ([`Context::keep_alive`]): dropped after the memory (and so after every free).
    host_keep: Mutex<Vec<Arc<dyn std::any::Any + Send + Sync>>>,
    /// Dropped last: the messenger and (if ours) the instance go after the device. Shared with
    /// budget sources handed out, which may outlive the rest.
    pub(crate) instance: Arc<Instance>,
}

impl Shared {
    /// The context's id (the same as its memory's).
    pub(crate) fn id(&self) -> u64 {
        self.memory.id
    }

    /// Creates a buffer of this context.
    pub(crate) fn create_buffer(self: &Arc<Self>, desc: &BufferDesc<'_>) -> Result<Buffer> {
        self.memory.create_buffer(self, desc)
    }

    /// Creates an image of this context.
    pub(crate) fn create_image(self: &Arc<Self>, desc: &ImageDesc<'_>) -> Result<Image> {
        self.memory.create_image(self, desc)
    }

    /// `Unsupported` naming every feature of `needed` that is not enabled, and the queue flags.
    pub(crate) fn require(
        &self,
        who: &str,
        needed: &DeviceFeatures,
        queue: vk::QueueFlags,
    ) -> Result<()> {
        let mut missing: Vec<String> = needed
            .missing_from(&self.features)
            .into_iter()
            .map(String::from)
            .collect();
        if !self.queue_flags.contains(queue) {
            missing.push(format!(
                "a {queue:?} queue (understory's queue family {} has {:?})",
                self.queue_family, self.queue_flags
            ));
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(Error::Unsupported(format!(
                "{who} needs {}",
                missing.join(", ")
            )))
        }
    }

    /// Retires a Vulkan object at frame `last_use`.
    pub(crate) fn retire_object(&self, object: RawObject, last_use: u64) {
        self.memory.retire_object(object, last_use);
    }

    /// Locks the queue. [`Error::Lifecycle`] if this thread already holds the lock through
    /// [`Context::queue`] (waiting would never end).
    pub(crate) fn lock_queue(&self) -> Result<QueueGuard<'_>> {
        let me = thread_token();
        if self.queue_owner.load(Ordering::Relaxed) == me {
            return Err(Error::Lifecycle(
                "this thread holds Context::queue()'s guard: drop it before calling anything that submits (it would deadlock)".into(),
            ));
        }
        Ok(self.lock_queue_blocking())
    }

    /// Locks the queue, blocking even if this thread holds it already (a deadlock).
    fn lock_queue_blocking(&self) -> QueueGuard<'_> {
        let guard = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        // Only the thread that holds the lock writes its own token, so a thread that reads
        // its own token in `lock_queue` is the one holding it.
        self.queue_owner.store(thread_token(), Ordering::Relaxed);
        QueueGuard {
            queue: guard,
            owner: &self.queue_owner,
        }
    }

    /// Submits `command_buffers` for the open `frame`, signalling understory's timeline at its
    /// value, plus the host's extra waits and signals.
    ///
    /// # Safety
    /// As [`Context::submit_frame`].
    pub(crate) unsafe fn submit_frame(
        &self,
        frame: Frame,
        command_buffers: &[vk::CommandBuffer],
        sync: &SubmitSync<'_>,
    ) -> Result<Submitted> {
        // SAFETY: forwarded contract.
        unsafe { self.submit_frame_then(frame, command_buffers, sync, || Ok(())) }
    }

    /// As [`Shared::submit_frame`], running `prepare` (ending the command buffers, say) once
    /// the frame is known to be submittable, in the same critical section as the submission:
    /// after shutdown, what the frame recorded may be destroyed, and `prepare` does not run.
    ///
    /// # Safety
    /// As [`Context::submit_frame`], for the command buffers as `prepare` leaves them.
    pub(crate) unsafe fn submit_frame_then(
        &self,
        mut frame: Frame,
        command_buffers: &[vk::CommandBuffer],
        sync: &SubmitSync<'_>,
        prepare: impl FnOnce() -> Result<()>,
    ) -> Result<Submitted> {
        frame.check(self, "submit_frame")?;
        if self.host_submits_only {
            return Err(Error::Unsupported(
                "this context was built with host_submits_only: the host submits every frame (announce it with Context::frame_submitted)".into(),
            ));
        }
        if sync.wait_semaphores.len() != sync.wait_values.len()
            || sync.wait_semaphores.len() != sync.wait_stages.len()
            || sync.signal_semaphores.len() != sync.signal_values.len()
        {
            return Err(Error::InvalidInput(
                "SubmitSync: every wait needs a value and a stage, every signal a value".into(),
            ));
        }
        // One critical section with `shutdown`'s close (made under the same lock): the frame
        // is checked open, submitted and recorded, or refused; never submitted after shutdown
        // waited for the last frame.
        let queue = self.lock_queue()?;
        self.clock
            .check_submission(frame.value, FrameSignal::Timeline)?;
        prepare()?;
        let mut signals = vec![self.clock.semaphore()];
        signals.extend_from_slice(sync.signal_semaphores);
        let mut signal_values = vec![frame.value];
        signal_values.extend_from_slice(sync.signal_values);
        let mut tl = vk::TimelineSemaphoreSubmitInfo::default()
            .signal_semaphore_values(&signal_values)
            .wait_semaphore_values(sync.wait_values);
        let submit = vk::SubmitInfo::default()
            .command_buffers(command_buffers)
            .wait_semaphores(sync.wait_semaphores)
            .wait_dst_stage_mask(sync.wait_stages)
            .signal_semaphores(&signals)
            .push_next(&mut tl);
        // SAFETY: the queue is locked (external synchronization, VUID-vkQueueSubmit-queue-00893
        // for understory's own submissions; the host takes the same lock); the caller vouches
        // for the command buffers and the extra semaphores; the frame's value is above every
        // value signalled before (one open frame, values handed out in order:
        // VUID-VkSubmitInfo-pSignalSemaphores-03242).
        unsafe { self.device.queue_submit(*queue, &[submit], sync.fence) }
            .map_err(vk_err("vkQueueSubmit"))?;
        // Infallible: once submitted, the frame is tracked (and waited for at shutdown).
        let submitted = self
            .clock
            .record_submitted(frame.value, FrameSignal::Timeline);
        drop(queue);
        frame.end(FrameFate::Submitted);
        Ok(submitted)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Every object made from the context is gone. Free what remains if the GPU is known to
        // be done with it; otherwise leak everything rather than destroy it in use.
        let last = self.clock.last_submitted();
        let idle =
            !self.stuck.load(Ordering::Acquire) && self.clock.completed().is_ok_and(|c| c >= last);
        if idle {
            // SAFETY: every frame completed; no Buffer or Image exists (each holds this
            // shared state); nothing else uses the pool or the semaphore.
            unsafe {
                self.memory.teardown();
                let pool = self
                    .one_shot_pool
                    .get_mut()
                    .unwrap_or_else(|p| p.into_inner());
                self.device.destroy_command_pool(*pool, None);
                self.clock.destroy();
            }
            if self.owns_device {
                // SAFETY: idle, and every child object understory created is destroyed.
                unsafe { self.device.destroy_device(None) };
            }
        } else {
            self.memory.leak_everything();
            log::error!(
                "context dropped while the GPU may still run frame {last}: its memory, semaphore, pools{} are leaked",
                if self.owns_device { " and device" } else { "" }
            );
        }
    }
}

/// A Vulkan device ready for understory: instance, device, one queue, frame clock, allocator.
///
/// `Context` is the one handle to the context's shared state; buffers, images, passes and
/// frames hold that state too (so an engine can keep them side by side in one struct), and
/// [`Context::shutdown`] consumes the handle.
pub struct Context {
    shared: Arc<Shared>,
    shut_down: bool,
}

/// The context's queue, locked: [`Context::queue`]. Dereferences to the `vk::Queue`; the lock
/// is released when it is dropped. It stays on the thread that locked it (which is how
/// understory knows that a submission on that thread would deadlock):
///
/// ```compile_fail,E0277
/// # fn f(ctx: &understory::gpu::context::Context) {
/// let guard = ctx.queue();
/// std::thread::scope(|s| {
///     s.spawn(move || drop(guard)); // `MutexGuard<'_, ash::vk::Queue>` cannot be sent
/// });
/// # }
/// ```
pub struct QueueGuard<'a> {
    queue: MutexGuard<'a, vk::Queue>,
    owner: &'a AtomicU64,
}

impl std::ops::Deref for QueueGuard<'_> {
    type Target = vk::Queue;
    fn deref(&self) -> &vk::Queue {
        &self.queue
    }
}

impl std::fmt::Debug for QueueGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("QueueGuard").field(&*self.queue).finish()
    }
}

impl Drop for QueueGuard<'_> {
    fn drop(&mut self) {
        // Before the mutex guard (a field) unlocks.
        self.owner.store(0, Ordering::Relaxed);
    }
}

/// A number for the calling thread, unique in the process and never 0.
fn thread_token() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static TOKEN: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    TOKEN.with(|t| *t)
}

/// Options that shape `vkQueueSubmit` besides the frame's own signal: the swapchain's acquire
/// semaphore, the host's render-finished semaphore, a fence. Binary semaphores take value 0.
#[derive(Clone, Copy, Debug, Default)]
pub struct SubmitSync<'a> {
    /// Semaphores to wait on.
    pub wait_semaphores: &'a [vk::Semaphore],
    /// Their values (0 for binary semaphores).
    pub wait_values: &'a [u64],
    /// The stages that wait.
    pub wait_stages: &'a [vk::PipelineStageFlags],
    /// Extra semaphores to signal (understory's timeline is always signalled).
    pub signal_semaphores: &'a [vk::Semaphore],
    /// Their values (0 for binary semaphores).
    pub signal_values: &'a [u64],
    /// A fence to signal, or null.
    pub fence: vk::Fence,
}

/// An open frame: its value, and what [`Context::begin_frame`] found. Recording functions take
/// `&Frame`; a submission consumes it. Dropped unsubmitted, it gives its value back.
///
/// Commands recorded for a frame run only as that frame: submitted through it
/// ([`FrameRing::submit`](crate::gpu::frame::FrameRing::submit), [`Context::submit_frame`]), or by
/// the host and then reported with [`Context::frame_submitted`]. A frame that is dropped
/// instead must have none of its commands submitted, ever (the `unsafe` recording functions
/// require it through "recorded for `frame`"): what was retired at its value is freed once
/// the frames before it complete, since nothing waits for a frame that was never submitted.
///
/// A frame cannot be copied, so a submission consumes the only one, and nothing can be recorded
/// for a frame after its submission:
///
/// ```compile_fail,E0382
/// # fn f(ctx: &understory::gpu::context::Context, ring: &mut understory::gpu::frame::FrameRing,
/// #      buffer: &understory::gpu::memory::Buffer) -> understory::Result<()> {
/// let frame = ctx.begin_frame()?;
/// let cmd = ring.begin(&frame)?;
/// ring.submit(frame, cmd)?;
/// buffer.used_in(&frame)?; // use of moved value: the frame was submitted
/// # Ok(()) }
/// ```
///
/// ```compile_fail,E0599
/// # fn f(ctx: &understory::gpu::context::Context) -> understory::Result<()> {
/// let frame = ctx.begin_frame()?;
/// let again = frame.clone(); // no Clone: one frame, one submission
/// # Ok(()) }
/// ```
///
/// One frame is open at a time:
///
/// ```no_run
/// # fn f(ctx: &understory::gpu::context::Context) -> understory::Result<()> {
/// let a = ctx.begin_frame()?;
/// assert!(ctx.begin_frame().is_err()); // Error::Lifecycle: frame a is open
/// drop(a);
/// let b = ctx.begin_frame()?; // gets a's value
/// # Ok(()) }
/// ```
#[must_use = "a frame is submitted or dropped"]
pub struct Frame {
    shared: Arc<Shared>,
    value: u64,
    /// What became of the frame: [`FrameFate`] as u8, shared with whoever recorded into it.
    fate: Arc<AtomicU8>,
    completed: u64,
    freed: usize,
    heaps: Vec<HeapReport>,
    done: bool,
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frame")
            .field("value", &self.value)
            .field("completed", &self.completed)
            .field("freed", &self.freed)
            .finish()
    }
}

impl Frame {
    /// The frame's value: what its submission signals on understory's timeline.
    pub fn value(&self) -> u64 {
        self.value
    }
    /// The value up to which the GPU had completed every frame when this one began.
    pub fn completed(&self) -> u64 {
        self.completed
    }
    /// Resources freed by the retire queue when this frame began.
    pub fn freed(&self) -> usize {
        self.freed
    }
    /// Every heap's budget, usage and understory's share, read when this frame began.
    pub fn heaps(&self) -> &[HeapReport] {
        &self.heaps
    }
    /// What becomes of this frame (open, then submitted or dropped): recorders that keep
    /// work until its submission is known hold it.
    pub(crate) fn fate(&self) -> Arc<AtomicU8> {
        self.fate.clone()
    }
    /// This frame's identity, for state kept from one recording call to the next within a
    /// frame: a dropped frame's value is given to the next frame, its tag is not.
    pub fn tag(&self) -> FrameTag {
        FrameTag {
            value: self.value,
            fate: self.fate.clone(),
        }
    }
    fn end(&mut self, fate: FrameFate) {
        self.done = true;
        self.fate.store(fate as u8, Ordering::Release);
    }
    /// `Lifecycle` unless this frame is of `shared`'s context.
    pub(crate) fn check(&self, shared: &Shared, what: &str) -> Result<()> {
        if self.shared.id() != shared.id() {
            return Err(Error::Lifecycle(format!(
                "{what}: frame {} is of another context",
                self.value
            )));
        }
        Ok(())
    }
}

impl Drop for Frame {
    fn drop(&mut self) {
        if !self.done {
            self.end(FrameFate::Dropped);
            self.shared.clock.abandon(self.value);
        }
    }
}

/// A frame that [`Context::frame_submitted`] refused, handed back still open with the reason.
/// Nothing was recorded: announce the frame again with a correct call. Dropping the frame gives
/// its value to the next one, so do that only if no submission signals understory's timeline
/// with it; converting this into an [`Error`] (`?`) drops it.
#[must_use = "the frame is still open: announce it again, or drop it only if nothing signals its value"]
pub struct Rejected {
    frame: Frame,
    error: Error,
}

impl Rejected {
    /// Why it was refused.
    pub fn error(&self) -> &Error {
        &self.error
    }
    /// The frame, still open, and why it was refused.
    pub fn into_parts(self) -> (Frame, Error) {
        (self.frame, self.error)
    }
    /// The frame, still open.
    pub fn into_frame(self) -> Frame {
        self.frame
    }
}

impl std::fmt::Debug for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rejected")
            .field("frame", &self.frame.value)
            .field("error", &self.error)
            .finish()
    }
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "frame {} refused: {}", self.frame.value, self.error)
    }
}

impl std::error::Error for Rejected {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl From<Rejected> for Error {
    /// The error; the frame is dropped (its value goes to the next frame).
    fn from(r: Rejected) -> Self {
        r.error
    }
}

/// Which frame something was recorded for: its value and its identity (the frame's fate,
/// kept alive by the tag, so no later frame can have it). For state a host keeps from one
/// recording call to the next within a frame ([`Frame::tag`]).
#[derive(Clone, Debug)]
pub struct FrameTag {
    value: u64,
    fate: Arc<AtomicU8>,
}

impl FrameTag {
    /// Whether this is `frame`'s tag (not that of a dropped frame with the same value).
    pub fn is(&self, frame: &Frame) -> bool {
        self.value == frame.value && Arc::ptr_eq(&self.fate, &frame.fate)
    }

    /// Whether the frame was dropped without being submitted.
    pub(crate) fn dropped(&self) -> bool {
        FrameFate::of(&self.fate) == FrameFate::Dropped
    }

    /// The frame's value.
    pub fn value(&self) -> u64 {
        self.value
    }
}

/// What became of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum FrameFate {
    Open = 0,
    Submitted = 1,
    Dropped = 2,
}

impl FrameFate {
    pub(crate) fn of(fate: &AtomicU8) -> Self {
        match fate.load(Ordering::Acquire) {
            0 => FrameFate::Open,
            1 => FrameFate::Submitted,
            _ => FrameFate::Dropped,
        }
    }
}

impl Context {
    /// Creates an instance and device of understory's own, with every extension and feature of
    /// [`DeviceRequirements`] the device supports.
    pub fn new(options: &ContextOptions) -> Result<Self> {
        let instance = Instance::new(&options.instance)?;
        let adapters = instance.adapters()?;
        let chosen = adapter::select(&adapters, options.device.as_ref())?;
        let adapter = adapters[chosen].clone();
        let family = adapter
            .queue_family
            .ok_or_else(|| Error::Unsupported("no compute queue".into()))?;

        let mut features = adapter.supported;
        features.memory_priority &= adapter.memory_priority_feature;
        features.pageable_device_local_memory &=
            features.memory_priority && adapter.pageable_feature;
        // Core 1.3 functionality is usable only when the instance asked for 1.3 as well.
        features.dynamic_rendering &= instance.api_version() >= vk::API_VERSION_1_3;
        let ext_names: Vec<_> = features
            .extension_names()
            .iter()
            .map(|n| n.as_ptr())
            .collect();

        let priorities = [1.0f32];
        let queue_info = [vk::DeviceQueueCreateInfo::default()
            .queue_family_index(family)
            .queue_priorities(&priorities)];
        let mut core = vk::PhysicalDeviceFeatures::default();
        let mut v12 = vk::PhysicalDeviceVulkan12Features::default();
        let mut v13 = vk::PhysicalDeviceVulkan13Features::default();
        let wanted = DeviceRequirements::for_capabilities(Capabilities {
            cull: features.storage_buffer_array_dynamic_indexing,
            draw: features.dynamic_rendering,
            ..Capabilities::BUDGET
        });
        wanted.features.enable(&mut core, &mut v12, &mut v13);
        let mut prio = vk::PhysicalDeviceMemoryPriorityFeaturesEXT::default().memory_priority(true);
        let mut page = vk::PhysicalDevicePageableDeviceLocalMemoryFeaturesEXT::default()
            .pageable_device_local_memory(true);
        let mut info = vk::DeviceCreateInfo::default()
            .queue_create_infos(&queue_info)
            .enabled_extension_names(&ext_names)
            .enabled_features(&core)
            .push_next(&mut v12);
        if features.memory_priority {
            info = info.push_next(&mut prio);
        }
        if features.pageable_device_local_memory {
            info = info.push_next(&mut page);
        }
        if features.dynamic_rendering {
            info = info.push_next(&mut v13);
        }
        // SAFETY: the adapter is suitable (1.2, timeline feature, compute family); every feature
        // chained is supported, every extension listed is supported; pointers live for the call.
        let device = unsafe { instance.raw.create_device(adapter.handle, &info, None) }
            .map_err(vk_err("vkCreateDevice"))?;
        // SAFETY: family/index 0 was requested above.
        let queue = unsafe { device.get_device_queue(family, 0) };
        log::info!(
            "device #{} {} ({:?}, Vulkan {}, {}); memory_budget={} memory_priority={} pageable={}",
            adapter.index,
            adapter.name,
            adapter.device_type,
            adapter::format_version(adapter.api_version),
            adapter.driver,
            features.memory_budget,
            features.memory_priority,
            features.pageable_device_local_memory
        );
        // SAFETY: device was just created with what finish() needs and is owned by us.
        unsafe {
            Self::finish(
                instance,
                adapter,
                DeviceParts {
                    device,
                    queue,
                    queue_family: family,
                    features,
                    owns_device: true,
                },
                options,
            )
        }
    }

    /// Shorthand: [`Context::new`] with default options and the environment applied.
    pub fn from_env() -> Result<Self> {
        Self::new(&ContextOptions::default().with_env()?)
    }

    /// What to enable on a device for `capabilities`, before creating it: see
    /// [`DeviceRequirements`].
    pub fn requirements(capabilities: Capabilities) -> DeviceRequirements {
        DeviceRequirements::for_capabilities(capabilities)
    }

    /// Wraps a host engine's own Vulkan objects. understory never destroys what it did not
    /// create, and never waits on the host's device or queue as a whole.
    ///
    /// Checks what it can: the API versions, that the physical device belongs to the instance
    /// and supports everything `enabled` claims, that the queue family exists, and that
    /// `enabled` and the queue cover `capabilities` ([`Error::Unsupported`] names each missing
    /// extension, feature or queue flag).
    ///
    /// # Safety
    /// The caller must guarantee that:
    /// - `instance` was created from `entry` with `apiVersion = instance_api_version` (>= 1.2),
    ///   and `VK_EXT_debug_utils` is enabled on it if `debug_utils_enabled` is true;
    /// - `device` was created from `physical_device` of `instance` with the Vulkan 1.2 feature
    ///   `timelineSemaphore` enabled, and with every extension and feature `enabled` names
    ///   (with `memory_priority` the `memoryPriority` feature, with
    ///   `pageable_device_local_memory` the `pageableDeviceLocalMemory` feature);
    /// - `queue` was obtained from `device` in family `queue_family_index`;
    /// - the host never submits to `queue` while understory may: it holds [`Context::queue`]'s
    ///   lock around its own submissions to that queue (external synchronization), or builds
    ///   the context with [`ContextOptions::host_submits_only`] (understory never submits) and
    ///   externally synchronizes its own submissions among themselves; and it submits
    ///   every frame it announces with [`Context::frame_submitted`] to that queue (see the
    ///   module's host contract);
    /// - the instance, the device and the queue outlive the context **and every object made
    ///   through it** (buffers, images, passes, frames, rings, vegetation): drop those first
    ///   ([`Context::shutdown`]'s report lists allocations still alive).
    pub unsafe fn from_raw(host: HostHandles, options: &ContextOptions) -> Result<Self> {
        if host.instance_api_version < vk::API_VERSION_1_2 {
            return Err(Error::Unsupported(format!(
                "host instance is Vulkan {}, understory needs 1.2",
                adapter::format_version(host.instance_api_version)
            )));
        }
        // SAFETY: the caller guarantees the instance and its debug-utils state.
        let instance = unsafe {
            Instance::from_raw(
                host.entry,
                host.instance,
                host.instance_api_version,
                host.debug_utils_enabled,
            )
        }?;
        let adapters = instance.adapters()?;
        let adapter = adapters
            .into_iter()
            .find(|a| a.handle == host.physical_device)
            .ok_or_else(|| {
                Error::InvalidInput("physical_device does not belong to the host instance".into())
            })?;
        if let Some(why) = adapter.unsuitable_because() {
            return Err(Error::Unsupported(format!(
                "host device {}: {why}",
                adapter.name
            )));
        }
        if adapter
            .queue_families
            .get(host.queue_family_index as usize)
            .is_none()
        {
            return Err(Error::InvalidInput(format!(
                "queue family {} does not exist (the device has {})",
                host.queue_family_index,
                adapter.queue_families.len()
            )));
        }
        let claimed_unsupported = host.enabled.missing_from(&adapter.supported);
        if !claimed_unsupported.is_empty() {
            return Err(Error::InvalidInput(format!(
                "HostHandles::enabled names {} but {} does not support {}",
                claimed_unsupported.join(", "),
                adapter.name,
                if claimed_unsupported.len() == 1 {
                    "it"
                } else {
                    "them"
                }
            )));
        }
        if host.enabled.dynamic_rendering && host.instance_api_version < vk::API_VERSION_1_3 {
            return Err(Error::InvalidInput(
                "dynamicRendering is core 1.3 functionality: the instance must be created with apiVersion 1.3".into(),
            ));
        }
        let req = DeviceRequirements::for_capabilities(host.capabilities);
        let mut missing = req.unsupported_by_adapter(&adapter, Some(host.queue_family_index));
        missing.extend(
            req.device_features
                .missing_from(&host.enabled)
                .into_iter()
                .map(|m| format!("{m} (not enabled)")),
        );
        if host.instance_api_version < req.api_version {
            missing.push(format!(
                "an instance of Vulkan {}",
                adapter::format_version(req.api_version)
            ));
        }
        missing.dedup();
        if !missing.is_empty() {
            return Err(Error::Unsupported(format!(
                "{} for {:?}: missing {}",
                adapter.name,
                host.capabilities,
                missing.join(", ")
            )));
        }
        // SAFETY: the caller guarantees the device contract above; we do not own the device.
        unsafe {
            Self::finish(
                instance,
                adapter,
                DeviceParts {
                    device: host.device,
                    queue: host.queue,
                    queue_family: host.queue_family_index,
                    features: host.enabled,
                    owns_device: false,
                },
                options,
            )
        }
    }

    /// # Safety
    /// `device` must satisfy [`Context::from_raw`]'s contract; if `owns_device`, it is destroyed
    /// by this context (also on the error path here).
    unsafe fn finish(
        instance: Instance,
        adapter: Adapter,
        parts: DeviceParts,
        options: &ContextOptions,
    ) -> Result<Self> {
        let DeviceParts {
            device,
            queue,
            queue_family,
            features,
            owns_device,
        } = parts;
        let destroy_device = |device: &ash::Device| {
            if owns_device {
                // SAFETY: nothing else was created from it that is still alive.
                unsafe { device.destroy_device(None) };
            }
        };
        if !(1..=MAX_FRAMES_IN_FLIGHT).contains(&options.frames_in_flight) {
            destroy_device(&device);
            return Err(Error::InvalidInput(format!(
                "frames_in_flight {} (1..={MAX_FRAMES_IN_FLIGHT})",
                options.frames_in_flight
            )));
        }
        // SAFETY: device has timeline semaphores (contract).
        let mut clock = match unsafe { Clock::new(&device) } {
            Ok(t) => t,
            Err(e) => {
                destroy_device(&device);
                return Err(e);
            }
        };
        let pool_info = vk::CommandPoolCreateInfo::default()
            .queue_family_index(queue_family)
            .flags(vk::CommandPoolCreateFlags::TRANSIENT);
        // SAFETY: valid info for this device.
        let pool = match unsafe { device.create_command_pool(&pool_info, None) } {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: never used.
                unsafe { clock.destroy() };
                destroy_device(&device);
                return Err(Error::vk("vkCreateCommandPool", e));
            }
        };
        // SAFETY: the physical device belongs to the instance, which outlives the source.
        let source = unsafe {
            DriverBudget::new(instance.raw.clone(), adapter.handle, features.memory_budget)
        };
        // SAFETY: the handles are live and related; pageable is only set when enabled.
        let memory = match unsafe {
            Memory::new(
                &instance.raw,
                &device,
                adapter.handle,
                options.memory.clone(),
                HeapBudgets::new(Box::new(source)),
                features.pageable_device_local_memory,
            )
        } {
            Ok(m) => m,
            Err(e) => {
                // SAFETY: never used.
                unsafe {
                    device.destroy_command_pool(pool, None);
                    clock.destroy();
                }
                destroy_device(&device);
                return Err(e);
            }
        };
        let queue_flags = adapter
            .queue_families
            .get(queue_family as usize)
            .copied()
            .unwrap_or_default();
        // SAFETY: the physical device belongs to the live instance.
        let limits = unsafe { instance.raw.get_physical_device_properties(adapter.handle) }.limits;
        Ok(Self {
            shared: Arc::new(Shared {
                device,
                adapter,
                features,
                queue: Mutex::new(queue),
                queue_owner: AtomicU64::new(0),
                queue_family,
                queue_flags,
                frames_in_flight: options.frames_in_flight,
                host_submits_only: options.host_submits_only,
                limits,
                memory,
                clock,
                one_shot_pool: Mutex::new(pool),
                stuck: AtomicBool::new(false),
                owns_device,
                host_keep: Mutex::new(Vec::new()),
                instance: Arc::new(instance),
            }),
            shut_down: false,
        })
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The ash device.
    pub fn device(&self) -> &ash::Device {
        &self.shared.device
    }

    /// The ash instance.
    pub fn instance(&self) -> &ash::Instance {
        self.shared.instance.raw()
    }

    /// The physical device and what it offers.
    pub fn adapter(&self) -> &Adapter {
        &self.shared.adapter
    }

    /// The extensions and features enabled on the device that understory uses.
    pub fn features(&self) -> DeviceFeatures {
        self.shared.features
    }

    /// Whether validation messages reach [`Context::canary`].
    pub fn validation_enabled(&self) -> bool {
        self.shared.instance.validation_enabled()
    }

    /// Counts validation warnings and errors (empty when validation is off).
    pub fn canary(&self) -> &Arc<Canary> {
        self.shared.instance.canary()
    }

    /// The context's queue, locked. Hold the guard while submitting to it from outside
    /// understory (every frame the host submits goes to this queue: see the module's host
    /// contract).
    ///
    /// Drop the guard before calling anything of understory's that submits
    /// ([`FrameRing::submit`](crate::gpu::frame::FrameRing::submit),
    /// [`Context::submit_frame`], [`Context::submit_and_wait`], ...): on the thread holding the
    /// guard those return [`Error::Lifecycle`] instead of waiting for a lock that thread holds
    /// (they would deadlock). Calling `queue()` again on the same thread while holding the guard
    /// deadlocks, as with any `Mutex`.
    pub fn queue(&self) -> QueueGuard<'_> {
        self.shared.lock_queue_blocking()
    }

    /// The queue family index.
    pub fn queue_family(&self) -> u32 {
        self.shared.queue_family
    }

    /// The queue family's flags.
    pub fn queue_flags(&self) -> vk::QueueFlags {
        self.shared.queue_flags
    }

    /// Keeps `owner` alive as long as the context or anything made through it lives: it is
    /// dropped after understory's last use of the device (every free done). A host whose
    /// device is destroyed by another object's drop (wgpu's device, say) hands that object
    /// here, so the device outlives understory however the host orders its drops.
    pub fn keep_alive(&self, owner: Arc<dyn std::any::Any + Send + Sync>) {
        self.shared
            .host_keep
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(owner);
    }

    /// understory's timeline semaphore: a host submission of frame `f` signals it with
    /// `f.value()` ([`FrameSignal::Timeline`]). Signal it in no other way.
    pub fn timeline_semaphore(&self) -> vk::Semaphore {
        self.shared.clock.semaphore()
    }

    /// The allocator: statistics, budgets, caches.
    pub fn memory(&self) -> &Memory {
        &self.shared.memory
    }

    /// Creates a buffer bound to a sub-allocation (see [`Memory`] for caps and budgets).
    ///
    /// [`Error::InvalidInput`] for size 0, a size larger than every memory heap, or no usage;
    /// [`Error::Unsupported`] for a usage bit beyond core Vulkan 1.0's (e.g.
    /// `SHADER_DEVICE_ADDRESS`: those need extensions or features understory does not enable).
    pub fn create_buffer(&self, desc: &BufferDesc<'_>) -> Result<Buffer> {
        self.check_buffer_desc(desc)?;
        self.shared.create_buffer(desc)
    }

    /// Creates a 2D optimal-tiling image in device-local memory.
    ///
    /// [`Error::InvalidInput`] for a zero extent or mip count, format `UNDEFINED`, no usage, or
    /// an extent or mip count beyond what the device allows for this format and usage
    /// (`vkGetPhysicalDeviceImageFormatProperties`, `maxImageDimension2D`,
    /// `maxFramebufferWidth`/`Height` for attachments); [`Error::Unsupported`] for a format
    /// beyond core Vulkan 1.0's uncompressed formats, a usage bit beyond core 1.0's, or a
    /// format the device does not support with that usage.
    pub fn create_image(&self, desc: &ImageDesc<'_>) -> Result<Image> {
        self.check_image_desc(desc)?;
        self.shared.create_image(desc)
    }

    fn check_buffer_desc(&self, desc: &BufferDesc<'_>) -> Result<()> {
        let name = desc.name;
        if desc.size == 0 {
            return Err(Error::InvalidInput(format!("buffer {name:?}: size 0")));
        }
        let largest_heap = self.shared.memory.heaps().iter().map(|h| h.size).max();
        if largest_heap.is_some_and(|h| desc.size > h) {
            return Err(Error::InvalidInput(format!(
                "buffer {name:?}: {} bytes, larger than every memory heap",
                desc.size
            )));
        }
        if desc.usage.is_empty() {
            // VUID-VkBufferCreateInfo-usage-requiredbitmask
            return Err(Error::InvalidInput(format!(
                "buffer {name:?}: no usage flags"
            )));
        }
        let beyond = desc.usage & !CORE_BUFFER_USAGE;
        if !beyond.is_empty() {
            return Err(Error::Unsupported(format!(
                "buffer {name:?}: usage {beyond:?} needs an extension or feature understory does not enable"
            )));
        }
        Ok(())
    }

    fn check_image_desc(&self, desc: &ImageDesc<'_>) -> Result<()> {
        let name = desc.name;
        let vk::Extent2D { width, height } = desc.extent;
        if width == 0 || height == 0 || desc.mip_levels == 0 {
            // VUID-VkImageCreateInfo-extent-00944, -00945, VUID-VkImageCreateInfo-mipLevels-00947
            return Err(Error::InvalidInput(format!(
                "image {name:?}: extent {width}x{height} with {} mips",
                desc.mip_levels
            )));
        }
        if desc.format == vk::Format::UNDEFINED {
            // VUID-VkImageCreateInfo-format-00943
            return Err(Error::InvalidInput(format!(
                "image {name:?}: format UNDEFINED"
            )));
        }
        if !CORE_UNCOMPRESSED_FORMATS.contains(&desc.format.as_raw()) {
            return Err(Error::Unsupported(format!(
                "image {name:?}: format {:?} (understory creates images of core Vulkan 1.0 uncompressed formats)",
                desc.format
            )));
        }
        if desc.usage.is_empty() {
            // VUID-VkImageCreateInfo-usage-requiredbitmask
            return Err(Error::InvalidInput(format!(
                "image {name:?}: no usage flags"
            )));
        }
        let beyond = desc.usage & !CORE_IMAGE_USAGE;
        if !beyond.is_empty() {
            return Err(Error::Unsupported(format!(
                "image {name:?}: usage {beyond:?} needs an extension or feature understory does not enable"
            )));
        }
        let attachment = vk::ImageUsageFlags::COLOR_ATTACHMENT
            | vk::ImageUsageFlags::DEPTH_STENCIL_ATTACHMENT
            | vk::ImageUsageFlags::INPUT_ATTACHMENT;
        if desc
            .usage
            .contains(vk::ImageUsageFlags::TRANSIENT_ATTACHMENT)
            && (!desc.usage.intersects(attachment)
                || desc
                    .usage
                    .intersects(!(attachment | vk::ImageUsageFlags::TRANSIENT_ATTACHMENT)))
        {
            // VUID-VkImageCreateInfo-usage-00963, -00966
            return Err(Error::InvalidInput(format!(
                "image {name:?}: TRANSIENT_ATTACHMENT goes with attachment usages only, and with at least one ({:?})",
                desc.usage
            )));
        }
        // SAFETY: the physical device belongs to the live instance; format is a core 1.0
        // value, usage non-empty core 1.0 bits, tiling, type and flags valid
        // (VUID-vkGetPhysicalDeviceImageFormatProperties-*-parameter, -usage-requiredbitmask).
        let props = match unsafe {
            self.shared
                .instance
                .raw
                .get_physical_device_image_format_properties(
                    self.shared.adapter.handle,
                    desc.format,
                    vk::ImageType::TYPE_2D,
                    vk::ImageTiling::OPTIMAL,
                    desc.usage,
                    vk::ImageCreateFlags::empty(),
                )
        } {
            Ok(p) => p,
            Err(vk::Result::ERROR_FORMAT_NOT_SUPPORTED) => {
                return Err(Error::Unsupported(format!(
                    "image {name:?}: {:?} with usage {:?} is not supported by {}",
                    desc.format, desc.usage, self.shared.adapter.name
                )));
            }
            Err(e) => return Err(Error::vk("vkGetPhysicalDeviceImageFormatProperties", e)),
        };
        let limits = &self.shared.limits;
        // VUID-VkImageCreateInfo-extent-02252, -02253, VUID-VkImageCreateInfo-imageType-00956
        let mut max_w = props.max_extent.width.min(limits.max_image_dimension2_d);
        let mut max_h = props.max_extent.height.min(limits.max_image_dimension2_d);
        if desc
            .usage
            .intersects(attachment | vk::ImageUsageFlags::TRANSIENT_ATTACHMENT)
        {
            // VUID-VkImageCreateInfo-usage-00964, -00965
            max_w = max_w.min(limits.max_framebuffer_width);
            max_h = max_h.min(limits.max_framebuffer_height);
        }
        if width > max_w || height > max_h {
            return Err(Error::InvalidInput(format!(
                "image {name:?}: {width}x{height}, at most {max_w}x{max_h} for {:?} with usage {:?} on {}",
                desc.format, desc.usage, self.shared.adapter.name
            )));
        }
        // VUID-VkImageCreateInfo-mipLevels-00958, -02255
        let chain = 32 - width.max(height).leading_zeros();
        let max_mips = chain.min(props.max_mip_levels);
        if desc.mip_levels > max_mips {
            return Err(Error::InvalidInput(format!(
                "image {name:?}: {} mips, at most {max_mips} for {width}x{height} {:?}",
                desc.mip_levels, desc.format
            )));
        }
        // One layer, one sample (VUID-VkImageCreateInfo-arrayLayers-02256, -samples-02258).
        if props.max_array_layers < 1 || !props.sample_counts.contains(vk::SampleCountFlags::TYPE_1)
        {
            return Err(Error::Unsupported(format!(
                "image {name:?}: {:?} with usage {:?}: no single-layer, single-sample images on {}",
                desc.format, desc.usage, self.shared.adapter.name
            )));
        }
        Ok(())
    }

    /// A budget source reading this device's heaps. It keeps the context's instance (not the
    /// device) alive for as long as it lives.
    pub fn budget_source(&self) -> DriverBudget {
        // SAFETY: the physical device belongs to our instance, which the source keeps alive;
        // memory_budget is only set when enabled.
        let source = unsafe {
            DriverBudget::new(
                self.shared.instance.raw.clone(),
                self.shared.adapter.handle,
                self.shared.features.memory_budget,
            )
        };
        source.keeping(self.shared.instance.clone())
    }

    /// A refreshable per-heap budget for this device.
    pub fn heap_budgets(&self) -> HeapBudgets {
        HeapBudgets::new(Box::new(self.budget_source()))
    }

    /// Frames the CPU may run ahead of the GPU.
    pub fn frames_in_flight(&self) -> u32 {
        self.shared.frames_in_flight
    }

    /// The highest frame value submitted.
    pub fn last_submitted(&self) -> u64 {
        self.shared.clock.last_submitted()
    }

    /// The value up to which the GPU has completed every frame. Never blocks.
    pub fn completed_value(&self) -> Result<u64> {
        self.shared.clock.completed()
    }

    /// Waits until the GPU has completed every frame up to `value`: [`Error::Timeout`] when
    /// `timeout` runs out, [`Error::NotReady`] for a host-reported frame not yet reported,
    /// [`Error::Lifecycle`] for a value never submitted. While it waits on a host's semaphore
    /// ([`FrameSignal::HostTimeline`]), that frame is not reported complete (by
    /// [`Context::completed_value`] or anything else) on any thread: the host may destroy the
    /// semaphore as soon as it is.
    pub fn wait(&self, value: u64, timeout: Duration) -> Result<()> {
        self.shared.clock.wait(value, timeout)
    }

    /// Frees what the GPU has finished with. Never blocks. Returns how many were freed.
    pub fn collect(&self) -> Result<usize> {
        let completed = self.shared.clock.completed()?;
        Ok(self.shared.memory.collect(completed))
    }

    /// Opens the next frame: waits only if the CPU is more than `frames_in_flight` frames
    /// ahead (and only on frames it can wait on), frees what the GPU has finished with, and
    /// reads the budget once. [`Error::Lifecycle`] while another frame is open or after
    /// shutdown.
    pub fn begin_frame(&self) -> Result<Frame> {
        let value = self.shared.clock.open()?;
        let mut frame = Frame {
            shared: self.shared.clone(),
            value,
            fate: Arc::new(AtomicU8::new(FrameFate::Open as u8)),
            completed: 0,
            freed: 0,
            heaps: Vec::new(),
            done: false,
        };
        let clock = &self.shared.clock;
        let must_have = value.saturating_sub(u64::from(self.shared.frames_in_flight));
        if must_have > 0 && clock.completed()? < must_have && clock.waitable(must_have) {
            clock.wait(must_have, THROTTLE_TIMEOUT)?;
        }
        frame.completed = clock.completed()?;
        frame.freed = self.shared.memory.collect(frame.completed);
        frame.heaps = self.shared.memory.refresh_budget()?;
        Ok(frame)
    }

    /// Submits the host's command buffers as `frame`'s submission on understory's queue,
    /// signalling understory's timeline at the frame's value, plus `sync`'s extra waits,
    /// signals and fence.
    ///
    /// # Safety
    /// - the command buffers are of this device, executable, recorded for `frame` (every
    ///   command in them that uses understory's objects was recorded for `frame` or marked
    ///   with `used_in(&frame)`), and may be submitted to understory's queue family;
    /// - `sync`'s semaphores and fence are of this device and valid to wait on or signal as
    ///   the Vulkan rules for `vkQueueSubmit` require.
    pub unsafe fn submit_frame(
        &self,
        frame: Frame,
        command_buffers: &[vk::CommandBuffer],
        sync: &SubmitSync<'_>,
    ) -> Result<Submitted> {
        // SAFETY: forwarded contract.
        unsafe { self.shared.submit_frame(frame, command_buffers, sync) }
    }

    /// Announces that the host submitted `frame` itself, with `signal` telling how its
    /// completion shows.
    ///
    /// On error (a frame of another context: [`Error::Lifecycle`]; a `HostTimeline` signal
    /// naming a null semaphore or understory's own: [`Error::InvalidInput`]) nothing is
    /// recorded and the frame comes back, still open, in the [`Rejected`] error: announce it
    /// again correctly. Dropping it gives its value to the next frame, so drop it only if no
    /// submission signals understory's timeline with that value (converting the error into
    /// [`Error`], e.g. with `?`, drops it).
    ///
    /// # Safety
    /// - every command recorded for `frame` was submitted, to the context's queue
    ///   ([`HostHandles::queue`], under [`Context::queue`]'s lock unless the context was built
    ///   with [`ContextOptions::host_submits_only`]), before this call, and the
    ///   signal operation `signal` names happens after all of them complete (same batch, or a
    ///   later batch on the same queue);
    /// - [`FrameSignal::Timeline`]: that submission signals [`Context::timeline_semaphore`]
    ///   with `frame.value()`;
    /// - [`FrameSignal::HostTimeline`]: `semaphore` is a timeline semaphore of this device that
    ///   the submission signals with `value`, and it stays alive until understory reports the
    ///   frame complete: [`Context::completed_value`] (or a later frame's
    ///   [`Frame::completed`]) returns at least the frame's value, or [`Context::shutdown`]
    ///   returns `Ok` (if shutdown fails: until every object made through the context is
    ///   dropped). A [`Context::wait`] running on another thread does not break this: while it
    ///   waits on the semaphore, the frame is not reported complete;
    /// - [`FrameSignal::HostReported`]: the host will call [`Context::frames_completed`] only
    ///   once the GPU finished the frame.
    pub unsafe fn frame_submitted(
        &self,
        mut frame: Frame,
        signal: FrameSignal,
    ) -> Result<Submitted, Rejected> {
        if let Err(error) = frame.check(&self.shared, "frame_submitted") {
            return Err(Rejected { frame, error });
        }
        match self.shared.clock.submitted(frame.value, signal) {
            Ok(s) => {
                frame.end(FrameFate::Submitted);
                Ok(s)
            }
            Err(error) => Err(Rejected { frame, error }),
        }
    }

    /// Reports that the GPU finished every frame up to `value` that was submitted with
    /// [`FrameSignal::HostReported`] (e.g. after the host waited on its fence).
    ///
    /// # Safety
    /// The GPU must really have finished them: understory then frees what they used.
    pub unsafe fn frames_completed(&self, value: u64) -> Result<()> {
        self.shared.clock.report(value)
    }

    /// Records with `record` into a fresh primary command buffer as a frame of its own,
    /// submits it on understory's timeline and waits for it (up to [`ONE_SHOT_TIMEOUT`]). For
    /// set-up and tests; the frame loop records into the host's buffers. [`Error::Lifecycle`]
    /// while another frame is open. On [`Error::Timeout`] the command buffer and everything the
    /// frame used stay alive.
    pub fn submit_and_wait(
        &self,
        record: impl FnOnce(&Frame, vk::CommandBuffer) -> Result<()>,
    ) -> Result<Submitted> {
        if self.shared.host_submits_only {
            return Err(Error::Unsupported(
                "submit_and_wait: this context was built with host_submits_only (understory never submits)".into(),
            ));
        }
        let frame = self.begin_frame()?;
        let pool = self
            .shared
            .one_shot_pool
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let alloc = vk::CommandBufferAllocateInfo::default()
            .command_pool(*pool)
            .level(vk::CommandBufferLevel::PRIMARY)
            .command_buffer_count(1);
        // SAFETY: the pool is ours and locked.
        let cmd = unsafe { self.device().allocate_command_buffers(&alloc) }
            .map_err(vk_err("vkAllocateCommandBuffers"))?[0];
        let free = || {
            // SAFETY: cmd is not pending (never submitted, or its submission completed); the
            // pool is locked.
            unsafe { self.device().free_command_buffers(*pool, &[cmd]) }
        };
        let recorded = (|| {
            let begin = vk::CommandBufferBeginInfo::default()
                .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT);
            // SAFETY: a fresh command buffer in the initial state.
            unsafe { self.device().begin_command_buffer(cmd, &begin) }
                .map_err(vk_err("vkBeginCommandBuffer"))?;
            record(&frame, cmd)?;
            // SAFETY: recording.
            unsafe { self.device().end_command_buffer(cmd) }.map_err(vk_err("vkEndCommandBuffer"))
        })();
        if let Err(e) = recorded {
            free();
            return Err(e);
        }
        // SAFETY: cmd is executable, of this device and family, and recorded for `frame`.
        let submitted = match unsafe {
            self.shared
                .submit_frame(frame, &[cmd], &SubmitSync::default())
        } {
            Ok(s) => s,
            Err(e) => {
                free();
                return Err(e);
            }
        };
        match self.wait(submitted.value(), ONE_SHOT_TIMEOUT) {
            Ok(()) => {
                free();
                Ok(submitted)
            }
            Err(e) => {
                log::error!(
                    "submit_and_wait: frame {}: {e}; its command buffer is kept",
                    submitted.value()
                );
                Err(e)
            }
        }
    }

    /// Queues a Vulkan object the host made on this device to be destroyed once the GPU has
    /// completed frame `last_use` (e.g. an image view used by its draws). Null handles are
    /// ignored.
    ///
    /// # Safety
    /// The object is of this device, nothing else destroys it, and no command recorded for a
    /// frame after `last_use` (or outside frames) uses it.
    pub unsafe fn retire_object(&self, object: RawObject, last_use: u64) -> Result<()> {
        let limit = self.last_submitted() + 1;
        if last_use > limit {
            return Err(Error::Lifecycle(format!(
                "retire at frame {last_use}, but the next frame is {limit}"
            )));
        }
        self.shared.retire_object(object, last_use);
        Ok(())
    }

    /// Ends the context: no frame begins after it, and no submission (a ring's on another
    /// thread, say) goes out after it. Waits (up to [`SHUTDOWN_TIMEOUT`]) for the last frame,
    /// frees everything retired, and reports allocations still alive as leaks (a clean shutdown
    /// has none: drop passes, rings, vegetation and buffers first, and submit or drop the open
    /// frame). If a frame is still open, what was retired at its value may be in a command
    /// buffer still being recorded: it is freed (and listed in `leaks` until then) once the
    /// last object holding the context is dropped.
    ///
    /// [`Error::Timeout`] (or [`Error::NotReady`] for a host-reported frame not reported) when
    /// the GPU is not known to be done: then nothing is freed, and the memory, semaphore and
    /// (if understory's) device are leaked rather than destroyed in use.
    ///
    /// ```compile_fail,E0382
    /// # fn f(ctx: understory::gpu::context::Context) {
    /// let report = ctx.shutdown();
    /// let _ = ctx.begin_frame(); // use of moved value
    /// # }
    /// ```
    pub fn shutdown(mut self) -> Result<ShutdownReport> {
        self.shut_down = true;
        self.shared.shutdown()
    }
}

impl Shared {
    fn shutdown(&self) -> Result<ShutdownReport> {
        let frame_open = {
            // Under the queue lock: a submission on another thread (a ring holds the shared
            // state, not the context) is either checked, submitted and recorded before this, or
            // refused after it. Never re-entrant: the context is being consumed, so no
            // `QueueGuard` of it is alive.
            let _queue = self.lock_queue_blocking();
            self.clock.close()
        };
        let last = self.clock.last_submitted();
        let started = std::time::Instant::now();
        let waited = if self.clock.waitable(last) {
            self.clock.wait(last, SHUTDOWN_TIMEOUT).and_then(|()| {
                // Forget every frame (a wait on another thread may still be using a host's
                // semaphore for a moment): after shutdown, understory reads none of them.
                let left = SHUTDOWN_TIMEOUT.saturating_sub(started.elapsed());
                if self.clock.settle(left)? {
                    Ok(())
                } else {
                    Err(Error::Timeout {
                        what: "waits on host semaphores to end".into(),
                        waited_ms: started.elapsed().as_millis() as u64,
                    })
                }
            })
        } else {
            Err(Error::NotReady(format!(
                "shutdown: frames up to {last} were submitted with FrameSignal::HostReported and not all were reported complete"
            )))
        };
        if let Err(e) = waited {
            self.stuck.store(true, Ordering::Release);
            log::error!("shutdown: {e}; nothing is freed");
            return Err(e);
        }
        let drained = if frame_open {
            // A frame was open: another thread may still be recording it (a ring holds the
            // shared state), and what was retired at its value may be in that recording.
            // Destroying it would invalidate the command buffer under the recorder; it is freed
            // with the rest when the last object holding the context goes.
            let freed = self.memory.collect(last) as u64;
            self.memory.flush_cache();
            freed
        } else {
            // SAFETY: every submitted frame completed, and no frame can be submitted any
            // more: what is queued at a higher value was recorded for a frame that was
            // dropped, and nothing records for it.
            unsafe { self.memory.drain() }
        };
        if let Err(e) = self.memory.release_empty_blocks() {
            log::warn!("shutdown: releasing empty blocks: {e}");
        }
        let leaks = self.memory.live_allocations();
        if leaks.is_empty() {
            log::debug!("shutdown: {drained} drained, nothing alive");
        } else {
            log::warn!(
                "shutdown: {} allocation(s) still alive ({}); they are freed when dropped",
                leaks.len(),
                leaks
                    .iter()
                    .take(8)
                    .map(|l| format!("{:?}", l.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(ShutdownReport { drained, leaks })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        if !self.shut_down {
            if let Err(e) = self.shared.shutdown() {
                log::error!("context dropped: {e}");
            }
        }
    }
}

/// The device half of a context under construction.
struct DeviceParts {
    device: ash::Device,
    queue: vk::Queue,
    queue_family: u32,
    features: DeviceFeatures,
    owns_device: bool,
}
