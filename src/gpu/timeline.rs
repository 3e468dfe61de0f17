//! The frame clock: every frame gets the next value of one sequence (1, 2, 3, …), and the GPU's
//! progress is the highest value below which every frame is known complete.
//!
//! A frame's submission is tracked by the signal the host chose for it ([`FrameSignal`]):
//! understory's timeline semaphore at the frame's value, the host's own timeline semaphore at a
//! value of the host's, or completion the host reports itself. Frames may mix these; a frame
//! counts as complete only once it and every frame before it are observed complete.
//!
//! At most one frame is open (begun, not yet submitted) at a time, and understory signals its
//! semaphore only for that frame's own submission, so a value handed to the host can never be
//! overtaken. Every frame's submission goes to the context's one queue, so the frames' signals
//! of understory's semaphore execute in value order. A frame dropped without being submitted gives its value back: the next frame
//! gets it, so everything recorded against it is freed only after a real submission of that
//! value completes.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ash::vk;

use crate::error::{Error, Result, vk_err};

/// How a frame's submission lets understory see that the GPU finished it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameSignal {
    /// The submission signals understory's timeline semaphore
    /// ([`Context::timeline_semaphore`](crate::gpu::context::Context::timeline_semaphore)) with
    /// the frame's value. understory reads and waits on it.
    Timeline,
    /// The submission signals the host's own timeline semaphore with `value`. understory reads
    /// it to learn what completed and may wait on it for this frame's value (never for others).
    ///
    /// understory stops using the semaphore once it reports the frame complete:
    /// [`Context::completed_value`](crate::gpu::context::Context::completed_value) (or a later
    /// frame's [`Frame::completed`](crate::gpu::context::Frame::completed)) at or above the
    /// frame's value, or [`Context::shutdown`](crate::gpu::context::Context::shutdown) returning
    /// `Ok`. A [`Context::wait`](crate::gpu::context::Context::wait) that is waiting on the
    /// semaphore holds the frame back (it is not reported complete until that wait is done), so
    /// the semaphore can be destroyed as soon as the frame is reported complete.
    HostTimeline {
        /// A timeline semaphore of the context's device.
        semaphore: vk::Semaphore,
        /// The value the submission signals.
        value: u64,
    },
    /// The host reports completion itself with
    /// [`Context::frames_completed`](crate::gpu::context::Context::frames_completed), e.g. after
    /// waiting on its own fence. understory never waits for such a frame: where it would have
    /// to, it returns [`Error::NotReady`].
    HostReported,
}

/// Proof that a frame was submitted: returned only by the calls that submit one, and not
/// made any other way:
///
/// ```compile_fail,E0451
/// let forged = understory::gpu::timeline::Submitted { value: 7 };
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Submitted {
    value: u64,
}

impl Submitted {
    /// The frame's value; [`Context::wait`](crate::gpu::context::Context::wait) takes it.
    pub fn value(&self) -> u64 {
        self.value
    }
}

/// A submitted frame not yet observed complete.
struct InFlight {
    value: u64,
    signal: FrameSignal,
    /// Waits now using the host's semaphore of a [`FrameSignal::HostTimeline`] frame: while any
    /// is running, the frame is not reported complete (the host may destroy the semaphore once
    /// it is).
    waiters: u32,
}

#[derive(Default)]
struct ClockState {
    /// Highest value submitted.
    last_submitted: u64,
    /// Whether a frame (value `last_submitted + 1`) is open.
    open: bool,
    /// Submitted frames not yet observed complete, oldest first.
    in_flight: VecDeque<InFlight>,
    /// Highest value the host reported complete (`HostReported` frames).
    reported: u64,
    /// No more frames: the context was shut down.
    closed: bool,
}

/// The frame clock of one context. Owns understory's timeline semaphore.
pub(crate) struct Clock {
    device: ash::Device,
    semaphore: vk::Semaphore,
    state: Mutex<ClockState>,
    /// Highest value every frame up to which is known complete (a cache of `poll`).
    completed: AtomicU64,
}

/// One thing to wait on for a frame: a semaphore and a value (and, for a host's semaphore, the
/// frame it holds back), or nothing to wait on.
enum WaitOn {
    Semaphore(vk::Semaphore, u64, Option<u64>),
    Reported(u64),
}

/// The `HostTimeline` frames whose semaphores a wait has yet to finish with: each is held back
/// (not reported complete) until released; dropping this releases the rest.
struct HeldFrames<'a> {
    clock: &'a Clock,
    values: Vec<u64>,
}

impl HeldFrames<'_> {
    /// The wait is done with frame `value`'s semaphore: release it, and (in the same critical
    /// section) pop what completed, so the host sees it complete only once nothing uses it.
    fn release(&mut self, value: u64) -> Result<()> {
        self.values.retain(|v| *v != value);
        let mut s = self.clock.lock();
        if let Some(f) = s.in_flight.iter_mut().find(|f| f.value == value) {
            f.waiters = f.waiters.saturating_sub(1);
        }
        self.clock.poll(&mut s).map(drop)
    }
}

impl Drop for HeldFrames<'_> {
    fn drop(&mut self) {
        if self.values.is_empty() {
            return;
        }
        let mut s = self.clock.lock();
        for f in s.in_flight.iter_mut() {
            if self.values.contains(&f.value) {
                f.waiters = f.waiters.saturating_sub(1);
            }
        }
    }
}

impl Clock {
    /// # Safety
    /// `device` must be live with `timelineSemaphore` enabled, and outlive this object, which
    /// must be destroyed with [`Clock::destroy`].
    pub(crate) unsafe fn new(device: &ash::Device) -> Result<Self> {
        let mut ty = vk::SemaphoreTypeCreateInfo::default()
            .semaphore_type(vk::SemaphoreType::TIMELINE)
            .initial_value(0);
        let info = vk::SemaphoreCreateInfo::default().push_next(&mut ty);
        // SAFETY: timelineSemaphore is enabled (caller); the info is valid
        // (VUID-VkSemaphoreTypeCreateInfo-timelineSemaphore-03252).
        let semaphore =
            unsafe { device.create_semaphore(&info, None) }.map_err(vk_err("vkCreateSemaphore"))?;
        Ok(Self {
            device: device.clone(),
            semaphore,
            state: Mutex::new(ClockState::default()),
            completed: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ClockState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// understory's timeline semaphore.
    pub(crate) fn semaphore(&self) -> vk::Semaphore {
        self.semaphore
    }

    /// Highest value submitted.
    pub(crate) fn last_submitted(&self) -> u64 {
        self.lock().last_submitted
    }

    /// Opens the next frame and returns its value.
    pub(crate) fn open(&self) -> Result<u64> {
        let mut s = self.lock();
        if s.closed {
            return Err(Error::Lifecycle(
                "the context was shut down: no more frames".into(),
            ));
        }
        if s.open {
            return Err(Error::Lifecycle(format!(
                "frame {} is still open: submit it or drop it before beginning another",
                s.last_submitted + 1
            )));
        }
        let value = s.last_submitted + 1;
        // Buffers keep the last frame's value in 48 bits of their use word (memory.rs).
        if value > crate::gpu::memory::MAX_FRAME_VALUE {
            return Err(Error::Lifecycle(format!(
                "frame values are used up ({} at most)",
                crate::gpu::memory::MAX_FRAME_VALUE
            )));
        }
        s.open = true;
        Ok(value)
    }

    /// The open frame was dropped without being submitted: its value goes to the next frame.
    pub(crate) fn abandon(&self, value: u64) {
        let mut s = self.lock();
        if s.open && s.last_submitted + 1 == value {
            s.open = false;
        }
    }

    /// Why frame `value` cannot be submitted with `signal` now, if it cannot.
    fn refuse(&self, s: &ClockState, value: u64, signal: FrameSignal) -> Result<()> {
        if s.closed {
            return Err(Error::Lifecycle(
                "the context was shut down: no more submissions".into(),
            ));
        }
        if !(s.open && s.last_submitted + 1 == value) {
            return Err(Error::Lifecycle(format!(
                "frame {value} is not the open frame"
            )));
        }
        if let FrameSignal::HostTimeline { semaphore, .. } = signal {
            if semaphore == vk::Semaphore::null() || semaphore == self.semaphore {
                return Err(Error::InvalidInput(
                    "FrameSignal::HostTimeline needs the host's own timeline semaphore".into(),
                ));
            }
        }
        Ok(())
    }

    fn record(s: &mut ClockState, value: u64, signal: FrameSignal) -> Submitted {
        if s.last_submitted < value {
            s.open = false;
            s.last_submitted = value;
        }
        s.in_flight.push_back(InFlight {
            value,
            signal,
            waiters: 0,
        });
        Submitted { value }
    }

    /// Checks that `value` is the open frame and `signal` usable for it, before a submission
    /// that signals it. The caller holds the queue lock from here to
    /// [`Clock::record_submitted`], and [`Clock::close`] is called under the same lock, so the
    /// frame is still open when it is recorded.
    pub(crate) fn check_submission(&self, value: u64, signal: FrameSignal) -> Result<()> {
        self.refuse(&self.lock(), value, signal)
    }

    /// Records that frame `value` was submitted with `signal`. Never fails: a submission that
    /// went out is tracked (and waited for at shutdown) whatever the state says.
    pub(crate) fn record_submitted(&self, value: u64, signal: FrameSignal) -> Submitted {
        let mut s = self.lock();
        if let Err(e) = self.refuse(&s, value, signal) {
            log::error!("frame {value} was submitted, but {e}; it is tracked anyway");
        }
        Self::record(&mut s, value, signal)
    }

    /// Records that the open frame `value` was submitted with `signal` (the host submitted it).
    /// On error nothing is recorded and the frame is still open.
    pub(crate) fn submitted(&self, value: u64, signal: FrameSignal) -> Result<Submitted> {
        let mut s = self.lock();
        self.refuse(&s, value, signal)?;
        Ok(Self::record(&mut s, value, signal))
    }

    /// The host reports every `HostReported` frame up to `value` complete.
    pub(crate) fn report(&self, value: u64) -> Result<()> {
        let mut s = self.lock();
        if value > s.last_submitted {
            return Err(Error::Lifecycle(format!(
                "frames up to {value} reported complete, but only {} were submitted",
                s.last_submitted
            )));
        }
        s.reported = s.reported.max(value);
        Ok(())
    }

    /// No more frames or submissions. The caller holds the queue lock, so no submission is
    /// between its check and its record. Returns whether a frame was open (it may still be
    /// being recorded, and will never be submitted).
    pub(crate) fn close(&self) -> bool {
        let mut s = self.lock();
        let was_open = s.open && !s.closed;
        s.closed = true;
        s.open = false;
        was_open
    }

    fn counter(&self, semaphore: vk::Semaphore) -> Result<u64> {
        // SAFETY: a live timeline semaphore of this device: ours, or one the host vouched for
        // in `Context::frame_submitted` until understory reports the frame that names it
        // complete, which it does only under the state lock after its last read of it.
        unsafe { self.device.get_semaphore_counter_value(semaphore) }
            .map_err(vk_err("vkGetSemaphoreCounterValue"))
    }

    /// Pops the frames observed complete, oldest first; stops at a frame whose host semaphore
    /// a wait is using.
    fn poll(&self, s: &mut ClockState) -> Result<u64> {
        let mut own = None;
        while let Some(front) = s.in_flight.front() {
            if front.waiters > 0 {
                break;
            }
            let value = front.value;
            let done = match front.signal {
                FrameSignal::Timeline => {
                    let v = match own {
                        Some(v) => v,
                        None => *own.insert(self.counter(self.semaphore)?),
                    };
                    v >= value
                }
                FrameSignal::HostTimeline {
                    semaphore,
                    value: v,
                } => self.counter(semaphore)? >= v,
                FrameSignal::HostReported => s.reported >= value,
            };
            if !done {
                break;
            }
            s.in_flight.pop_front();
            self.completed.store(value, Ordering::Release);
        }
        if s.in_flight.is_empty() {
            self.completed.store(s.last_submitted, Ordering::Release);
        }
        Ok(self.completed.load(Ordering::Acquire))
    }

    /// Reads the GPU's progress without blocking: the highest value up to which every submitted
    /// frame is complete.
    pub(crate) fn completed(&self) -> Result<u64> {
        self.poll(&mut self.lock())
    }

    /// Waits until every frame up to `value` is complete. A value never submitted is a
    /// [`Error::Lifecycle`]; a frame the host reports itself and has not reported is
    /// [`Error::NotReady`]; running out of time is [`Error::Timeout`].
    ///
    /// While it waits on a host's semaphore, that frame is not reported complete (see
    /// [`FrameSignal::HostTimeline`]): the host may destroy the semaphore once it is.
    pub(crate) fn wait(&self, value: u64, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        let (waits, held) = {
            let mut s = self.lock();
            if value > s.last_submitted {
                return Err(Error::Lifecycle(format!(
                    "wait for frame {value}, but only {} were submitted",
                    s.last_submitted
                )));
            }
            let mut waits = Vec::new();
            let mut held = Vec::new();
            for f in s.in_flight.iter_mut().take_while(|f| f.value <= value) {
                waits.push(match f.signal {
                    FrameSignal::Timeline => WaitOn::Semaphore(self.semaphore, f.value, None),
                    FrameSignal::HostTimeline { semaphore, value } => {
                        f.waiters += 1;
                        held.push(f.value);
                        WaitOn::Semaphore(semaphore, value, Some(f.value))
                    }
                    FrameSignal::HostReported => WaitOn::Reported(f.value),
                });
            }
            (waits, held)
        };
        let mut held = HeldFrames {
            clock: self,
            values: held,
        };
        for w in waits {
            match w {
                WaitOn::Semaphore(semaphore, v, frame) => {
                    let left = timeout.saturating_sub(started.elapsed());
                    if !self.wait_semaphore(semaphore, v, left)? {
                        return Err(Error::Timeout {
                            what: format!("frame {value}"),
                            waited_ms: started.elapsed().as_millis() as u64,
                        });
                    }
                    if let Some(frame) = frame {
                        held.release(frame)?;
                    }
                }
                WaitOn::Reported(v) => {
                    if self.lock().reported < v {
                        return Err(Error::NotReady(format!(
                            "frame {v} signals completion through the host (FrameSignal::HostReported) and has not been reported complete"
                        )));
                    }
                }
            }
        }
        drop(held);
        self.completed()?;
        Ok(())
    }

    /// After a successful wait for every submitted frame (shutdown): forgets every frame once
    /// no wait uses a host's semaphore any more, so that understory never reads one again.
    /// False if a wait still held one after `timeout`.
    pub(crate) fn settle(&self, timeout: Duration) -> Result<bool> {
        let started = Instant::now();
        loop {
            {
                let mut s = self.lock();
                self.poll(&mut s)?;
                if s.in_flight.is_empty() {
                    return Ok(true);
                }
            }
            if started.elapsed() >= timeout {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Whether `value` of `semaphore` was reached within `timeout`.
    fn wait_semaphore(
        &self,
        semaphore: vk::Semaphore,
        value: u64,
        timeout: Duration,
    ) -> Result<bool> {
        let semaphores = [semaphore];
        let values = [value];
        let info = vk::SemaphoreWaitInfo::default()
            .semaphores(&semaphores)
            .values(&values);
        let nanos = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
        // SAFETY: a live timeline semaphore of this device (see `counter`); waiting on it is
        // not a device- or queue-wide wait.
        match unsafe { self.device.wait_semaphores(&info, nanos) } {
            Ok(()) => Ok(true),
            Err(vk::Result::TIMEOUT) => Ok(false),
            Err(e) => Err(Error::vk("vkWaitSemaphores", e)),
        }
    }

    /// Whether a wait for `value` could block only on semaphores (no frame the host reports).
    pub(crate) fn waitable(&self, value: u64) -> bool {
        let s = self.lock();
        s.in_flight
            .iter()
            .take_while(|f| f.value <= value)
            .all(|f| f.signal != FrameSignal::HostReported || s.reported >= f.value)
    }

    /// # Safety
    /// The GPU must no longer wait on or signal the semaphore.
    pub(crate) unsafe fn destroy(&mut self) {
        // SAFETY: caller guarantees the semaphore is idle.
        unsafe { self.device.destroy_semaphore(self.semaphore, None) };
        self.semaphore = vk::Semaphore::null();
    }
}
