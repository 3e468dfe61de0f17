//! A timeline semaphore: every submission signals the next value; the GPU's progress is one
//! number that can be read without blocking.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ash::vk;

use crate::error::{Error, Result, vk_err};

/// The timeline of one queue.
pub struct Timeline {
    device: ash::Device,
    semaphore: vk::Semaphore,
    /// Last value handed out to a submission; written under `order`, read without a lock.
    last_submitted: AtomicU64,
    /// Serializes handing out values with the submissions that signal them.
    order: Mutex<()>,
}

impl Timeline {
    /// # Safety
    /// `device` must be live with `timelineSemaphore` enabled, and outlive this object, which must
    /// be destroyed with [`Timeline::destroy`].
    pub(crate) unsafe fn new(device: &ash::Device) -> Result<Self> {
        let mut ty = vk::SemaphoreTypeCreateInfo::default()
            .semaphore_type(vk::SemaphoreType::TIMELINE)
            .initial_value(0);
        let info = vk::SemaphoreCreateInfo::default().push_next(&mut ty);
        // SAFETY: timelineSemaphore is enabled (caller); the info is valid.
        let semaphore =
            unsafe { device.create_semaphore(&info, None) }.map_err(vk_err("vkCreateSemaphore"))?;
        Ok(Self {
            device: device.clone(),
            semaphore,
            last_submitted: AtomicU64::new(0),
            order: Mutex::new(()),
        })
    }

    /// The semaphore, for hosts that signal it in their own submissions (see
    /// [`Timeline::reserve`]).
    pub fn semaphore(&self) -> vk::Semaphore {
        self.semaphore
    }

    /// The highest value the GPU has signalled. Never blocks.
    pub fn completed_value(&self) -> Result<u64> {
        // SAFETY: the semaphore is a live timeline semaphore of this device.
        unsafe { self.device.get_semaphore_counter_value(self.semaphore) }
            .map_err(vk_err("vkGetSemaphoreCounterValue"))
    }

    /// The last value handed to a submission.
    pub fn last_submitted(&self) -> u64 {
        self.last_submitted.load(Ordering::Acquire)
    }

    /// Hands out the next value for a submission the caller makes itself; that submission must
    /// signal this semaphore with exactly this value, in reservation order.
    pub fn reserve(&self) -> u64 {
        let _order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        self.last_submitted.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Signals `value` from the host: for values handed out by [`Timeline::reserve`] that the
    /// host completes itself (and for tests). `value` must be reserved and above the current one.
    pub fn signal(&self, value: u64) -> Result<()> {
        let current = self.completed_value()?;
        if value <= current || value > self.last_submitted() {
            return Err(Error::InvalidInput(format!(
                "signal {value}: must be above the completed value {current} and at most the last reserved {}",
                self.last_submitted()
            )));
        }
        let info = vk::SemaphoreSignalInfo::default()
            .semaphore(self.semaphore)
            .value(value);
        // SAFETY: a live timeline semaphore; value is greater than its current value
        // (VUID-VkSemaphoreSignalInfo-value-03258).
        unsafe { self.device.signal_semaphore(&info) }.map_err(vk_err("vkSignalSemaphore"))
    }

    /// Waits until the GPU reaches `value`. Returns `Ok(false)` on timeout. Waiting for a value
    /// never handed out is an error (it would never complete).
    pub fn wait(&self, value: u64, timeout: Duration) -> Result<bool> {
        if value > self.last_submitted() {
            return Err(Error::InvalidInput(format!(
                "wait for timeline value {value}, but only {} was submitted",
                self.last_submitted()
            )));
        }
        let semaphores = [self.semaphore];
        let values = [value];
        let info = vk::SemaphoreWaitInfo::default()
            .semaphores(&semaphores)
            .values(&values);
        let nanos = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
        // SAFETY: a live timeline semaphore of this device.
        match unsafe { self.device.wait_semaphores(&info, nanos) } {
            Ok(()) => Ok(true),
            Err(vk::Result::TIMEOUT) => Ok(false),
            Err(e) => Err(Error::vk("vkWaitSemaphores", e)),
        }
    }

    /// Submits `command_buffers` to `queue`, signalling the next value, which is returned.
    ///
    /// # Safety
    /// `queue` must belong to this device and be externally synchronized by the caller; the
    /// command buffers must be executable and everything they reference alive until the value
    /// completes.
    pub(crate) unsafe fn submit(
        &self,
        queue: vk::Queue,
        command_buffers: &[vk::CommandBuffer],
    ) -> Result<u64> {
        // Hold the order lock across the submit so values reach the queue in order.
        let _order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        let value = self.last_submitted.load(Ordering::Acquire) + 1;
        let signal_values = [value];
        let signals = [self.semaphore];
        let mut tl =
            vk::TimelineSemaphoreSubmitInfo::default().signal_semaphore_values(&signal_values);
        let submit = vk::SubmitInfo::default()
            .command_buffers(command_buffers)
            .signal_semaphores(&signals)
            .push_next(&mut tl);
        // SAFETY: the caller owns queue synchronization and the command buffers' validity; the
        // signal value is strictly greater than any earlier one (VUID-VkSubmitInfo-pSignalSemaphores-03242).
        unsafe {
            self.device
                .queue_submit(queue, &[submit], vk::Fence::null())
        }
        .map_err(vk_err("vkQueueSubmit"))?;
        self.last_submitted.store(value, Ordering::Release);
        Ok(value)
    }

    /// # Safety
    /// The GPU must no longer wait on or signal the semaphore.
    pub(crate) unsafe fn destroy(&mut self) {
        // SAFETY: caller guarantees the semaphore is idle.
        unsafe { self.device.destroy_semaphore(self.semaphore, None) };
        self.semaphore = vk::Semaphore::null();
    }
}
