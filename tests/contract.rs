//! The host contract's soundness holes found in review, each as a regression test: what a
//! sequence of safe calls (or unsafe calls whose contract is honoured) must not do. Each test
//! fails on the code before its fix. Where a fix is by types, a compile-fail doctest next to
//! the type shows what no longer compiles.

mod common;

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ash::vk;
use understory::Error;
use understory::gpu::compute::memory_barrier;
use understory::gpu::context::{Context, Frame};
use understory::gpu::debug::Canary;
use understory::gpu::frame::{FrameRing, RingCommand};
use understory::gpu::memory::{Buffer, BufferDesc, ImageDesc, MemoryLocation};
use understory::gpu::scan::BlockScan;
use understory::gpu::timeline::FrameSignal;
use understory::policy::category::Category;

/// The GPU tests of this file run one at a time: the two races below measure timing, and a
/// 2-core machine running several lavapipe contexts at once blurs it.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Drains the canary, printing what it held; returns how many messages there were.
fn messages(canary: &Arc<Canary>, what: &str) -> usize {
    let msgs = canary.drain();
    for m in &msgs {
        eprintln!("[{what}] VALIDATION: {m}");
    }
    msgs.len()
}

fn buffer(ctx: &Context, name: &str, size: u64, usage: vk::BufferUsageFlags) -> Buffer {
    ctx.create_buffer(&BufferDesc {
        name,
        size,
        usage,
        location: MemoryLocation::GpuOnly,
        category: Category::Other,
    })
    .expect("buffer")
}

fn timeline_semaphore(d: &ash::Device) -> vk::Semaphore {
    let mut ty = vk::SemaphoreTypeCreateInfo::default()
        .semaphore_type(vk::SemaphoreType::TIMELINE)
        .initial_value(0);
    let info = vk::SemaphoreCreateInfo::default().push_next(&mut ty);
    // SAFETY: the context's device has timelineSemaphore enabled.
    unsafe { d.create_semaphore(&info, None) }.expect("semaphore")
}

// ---- 1. shutdown racing a submission on another thread ------------------------------------

const RACE_DISPATCHES: usize = 1500;

/// Records a heavy frame into `ring` and drops what it used (retired at the frame).
fn heavy_frame<'r>(ctx: &Context, ring: &'r FrameRing) -> (Frame, RingCommand<'r>) {
    let scan = BlockScan::new(ctx).unwrap();
    let b = |name| buffer(ctx, name, 1024, vk::BufferUsageFlags::STORAGE_BUFFER);
    let (input, out, sums) = (b("in"), b("out"), b("sums"));
    let frame = ctx.begin_frame().unwrap();
    let cmd = ring.begin(&frame).unwrap();
    for _ in 0..RACE_DISPATCHES {
        // SAFETY: the ring's recording command buffer for `frame`, offered as its submission;
        // the barrier orders each dispatch's writes before the next one.
        unsafe {
            scan.record(&frame, cmd.raw(), &input, &out, &sums, 256)
                .unwrap();
            memory_barrier(
                ctx.device(),
                cmd.raw(),
                (
                    vk::PipelineStageFlags::COMPUTE_SHADER,
                    vk::AccessFlags::SHADER_WRITE,
                ),
                (
                    vk::PipelineStageFlags::COMPUTE_SHADER,
                    vk::AccessFlags::SHADER_READ | vk::AccessFlags::SHADER_WRITE,
                ),
            );
        }
    }
    drop((scan, input, out, sums));
    (frame, cmd)
}

/// `shutdown` on one thread while another is inside `FrameRing::submit`: the submission is
/// either made and waited for, or refused; never made after shutdown freed what it uses.
#[test]
fn shutdown_never_frees_what_a_racing_submission_uses() {
    let _serial = serial();
    let Some(ctx) = common::context("shutdown race calibrate") else {
        return;
    };
    let ring = FrameRing::new(&ctx).unwrap();
    let (frame, cmd) = heavy_frame(&ctx, &ring);
    let t = Instant::now();
    let s = ring.submit(frame, cmd).unwrap();
    let submit_time = t.elapsed();
    ctx.wait(s.value(), Duration::from_secs(60)).unwrap();
    drop(ring);
    common::finish(ctx, "shutdown race calibrate");

    let trials = 16u32;
    for trial in 0..trials {
        let ctx = common::context("shutdown race").unwrap();
        let canary = ctx.canary().clone();
        let ring = FrameRing::new(&ctx).unwrap();
        let (frame, cmd) = heavy_frame(&ctx, &ring);
        let delay = submit_time.mul_f64(0.05 + 0.9 * f64::from(trial) / f64::from(trials));
        let (submitted, report) = std::thread::scope(|s| {
            let (go_tx, go_rx) = mpsc::channel();
            let ring = &ring;
            let submitter = s.spawn(move || {
                go_tx.send(()).unwrap();
                ring.submit(frame, cmd).map(|s| s.value())
            });
            go_rx.recv().unwrap();
            let t = Instant::now();
            while t.elapsed() < delay {
                std::hint::spin_loop();
            }
            let report = ctx.shutdown();
            (submitter.join().unwrap(), report)
        });
        drop(ring);
        eprintln!(
            "trial {trial}: delay {delay:?}: submit -> {submitted:?}, shutdown -> {:?}",
            report.as_ref().map(|r| (r.drained, r.leaks.len()))
        );
        let report = report.expect("shutdown waits for a submission that went out");
        match &submitted {
            // Submitted before the close: waited for and freed.
            Ok(_) => assert!(report.leaks.is_empty(), "leaks: {:?}", report.leaks),
            // Refused: the frame was open at shutdown, so what it used is freed only once the
            // ring (the last holder of the context) goes, below.
            Err(e) => assert!(
                matches!(e, Error::Lifecycle(_)),
                "refused as Lifecycle: {e}"
            ),
        }
        assert_eq!(messages(&canary, "shutdown race"), 0, "trial {trial}");
    }
}

/// After shutdown, a ring refuses to submit (the frame it was begun for can never complete).
#[test]
fn ring_submit_after_shutdown_is_refused() {
    let _serial = serial();
    let Some(ctx) = common::context("ring_submit_after_shutdown") else {
        return;
    };
    let canary = ctx.canary().clone();
    let ring = FrameRing::new(&ctx).unwrap();
    let frame = ctx.begin_frame().unwrap();
    let cmd = ring.begin(&frame).unwrap();
    let report = ctx.shutdown().unwrap();
    assert!(report.leaks.is_empty());
    let r = ring.submit(frame, cmd);
    assert!(matches!(r, Err(Error::Lifecycle(_))), "{r:?}");
    drop(ring);
    assert_eq!(messages(&canary, "ring after shutdown"), 0);
}

// ---- 2. ComputePipeline::new is unsafe (compile-fail doctest); the crate's own use -------

/// The crate's own pipeline (through the unsafe constructor, with its true interface) builds
/// and runs with no validation message, and a hand-made one with the same interface too.
#[test]
fn compute_pipelines_with_their_true_interface_are_clean() {
    let _serial = serial();
    let Some(ctx) = common::context("compute_pipelines_clean") else {
        return;
    };
    let canary = ctx.canary().clone();
    let scan = BlockScan::new(&ctx).unwrap();
    let raw = common::block_scan_by_hand(&ctx, "block scan by hand");
    let b = |name| buffer(&ctx, name, 1024, vk::BufferUsageFlags::STORAGE_BUFFER);
    let (input, out, sums) = (b("in"), b("out"), b("sums"));
    ctx.submit_and_wait(|frame, cmd| {
        // SAFETY: submit_and_wait's recording command buffer for `frame`; the sizes cover the
        // 256 elements the shader touches.
        unsafe {
            scan.record(frame, cmd, &input, &out, &sums, 256)?;
            memory_barrier(
                ctx.device(),
                cmd,
                (
                    vk::PipelineStageFlags::COMPUTE_SHADER,
                    vk::AccessFlags::SHADER_WRITE,
                ),
                (
                    vk::PipelineStageFlags::COMPUTE_SHADER,
                    vk::AccessFlags::SHADER_READ | vk::AccessFlags::SHADER_WRITE,
                ),
            );
            raw.record_dispatch(
                frame,
                cmd,
                &[&input, &out, &sums],
                &256u32.to_le_bytes(),
                [1, 1, 1],
            )
        }
    })
    .unwrap();
    drop((scan, raw, input, out, sums));
    assert_eq!(messages(&canary, "compute"), 0);
    common::finish(ctx, "compute_pipelines_clean");
}

// ---- 3. a RingCommand cannot outlive its ring (compile-fail doctest); runtime rules ------

/// One command buffer of a ring is out at a time; a command of one ring is refused by
/// another; dropping an unsubmitted command and then its ring frees the pool with no
/// validation message.
#[test]
fn ring_commands_are_one_at_a_time_and_stay_with_their_ring() {
    let _serial = serial();
    let Some(ctx) = common::context("ring_commands") else {
        return;
    };
    let canary = ctx.canary().clone();
    let a = FrameRing::new(&ctx).unwrap();
    let b = FrameRing::new(&ctx).unwrap();
    let frame = ctx.begin_frame().unwrap();
    let cmd = a.begin(&frame).unwrap();
    let again = a.begin(&frame);
    assert!(matches!(again, Err(Error::Lifecycle(_))), "{again:?}");
    drop(again);
    // Another ring's command is refused (and goes back to its ring).
    let r = b.submit(frame, cmd);
    assert!(matches!(r, Err(Error::Lifecycle(_))), "{r:?}");
    let frame = ctx.begin_frame().unwrap();
    // Dropped unsubmitted: the ring hands out its next command buffer.
    let cmd = a.begin(&frame).unwrap();
    drop(cmd);
    drop(a);
    assert!(ctx.collect().unwrap() >= 1, "ring a's pool is freed");
    // A command begun for a frame that was then dropped: the next frame has the same value,
    // but the command is not its (its recording was for the dropped frame).
    let stale = b.begin(&frame).unwrap();
    let value = frame.value();
    drop(frame);
    let frame = ctx.begin_frame().unwrap();
    assert_eq!(frame.value(), value, "a dropped frame's value is reused");
    let r = b.submit(frame, stale);
    assert!(
        matches!(&r, Err(Error::Lifecycle(m)) if m.contains("dropped since")),
        "{r:?}"
    );
    let frame = ctx.begin_frame().unwrap();
    let cmd = b.begin(&frame).unwrap();
    let s = b.submit(frame, cmd).unwrap();
    ctx.wait(s.value(), Duration::from_secs(10)).unwrap();
    drop(b);
    assert_eq!(messages(&canary, "rings"), 0);
    common::finish(ctx, "ring_commands");
}

// ---- 5. create_image / create_buffer validate their descriptions --------------------------

#[test]
fn invalid_image_and_buffer_descriptions_are_typed_errors() {
    let _serial = serial();
    let Some(ctx) = common::context("invalid_descriptions") else {
        return;
    };
    let canary = ctx.canary().clone();
    let max_2d = {
        // SAFETY: the context's physical device of its live instance.
        let p = unsafe {
            ctx.instance()
                .get_physical_device_properties(ctx.adapter().handle)
        };
        p.limits.max_image_dimension2_d
    };
    let image = |name, width, height, format, mips, usage| {
        ctx.create_image(&ImageDesc {
            name,
            extent: vk::Extent2D { width, height },
            format,
            mip_levels: mips,
            usage,
            category: Category::Other,
        })
    };
    let rgba = vk::Format::R8G8B8A8_UNORM;
    let sampled = vk::ImageUsageFlags::SAMPLED;
    let invalid: [(&str, Result<_, Error>); 7] = [
        (
            "format UNDEFINED",
            image("a", 64, 64, vk::Format::UNDEFINED, 1, sampled),
        ),
        (
            "no usage",
            image("b", 64, 64, rgba, 1, vk::ImageUsageFlags::empty()),
        ),
        (
            "beyond maxImageDimension2D",
            image("c", max_2d + 1, 1, rgba, 1, sampled),
        ),
        ("zero extent", image("d", 0, 64, rgba, 1, sampled)),
        ("zero mips", image("e", 64, 64, rgba, 0, sampled)),
        (
            "more mips than the chain",
            image("f", 64, 64, rgba, 8, sampled),
        ),
        (
            "transient with a sampled usage",
            image(
                "t",
                64,
                64,
                rgba,
                1,
                sampled | vk::ImageUsageFlags::TRANSIENT_ATTACHMENT,
            ),
        ),
    ];
    for (what, r) in invalid {
        eprintln!("create_image {what} -> {:?}", r.as_ref().map(|_| ()));
        assert!(matches!(r, Err(Error::InvalidInput(_))), "{what}");
        assert_eq!(messages(&canary, what), 0, "{what}");
    }
    let unsupported = [
        (
            "depth format as a colour attachment",
            image(
                "g",
                64,
                64,
                vk::Format::D32_SFLOAT,
                1,
                vk::ImageUsageFlags::COLOR_ATTACHMENT,
            ),
        ),
        (
            "compressed format",
            image("h", 64, 64, vk::Format::BC1_RGBA_UNORM_BLOCK, 1, sampled),
        ),
        (
            "format from an extension",
            image("i", 64, 64, vk::Format::A4R4G4B4_UNORM_PACK16, 1, sampled),
        ),
        (
            "usage from an extension",
            image(
                "j",
                64,
                64,
                rgba,
                1,
                sampled | vk::ImageUsageFlags::FRAGMENT_SHADING_RATE_ATTACHMENT_KHR,
            ),
        ),
    ];
    for (what, r) in unsupported {
        eprintln!("create_image {what} -> {:?}", r.as_ref().map(|_| ()));
        assert!(matches!(r, Err(Error::Unsupported(_))), "{what}");
        assert_eq!(messages(&canary, what), 0, "{what}");
    }
    let buf = |name, size, usage| {
        ctx.create_buffer(&BufferDesc {
            name,
            size,
            usage,
            location: MemoryLocation::GpuOnly,
            category: Category::Other,
        })
    };
    let storage = vk::BufferUsageFlags::STORAGE_BUFFER;
    for (what, r) in [
        ("size 0", buf("k", 0, storage)),
        ("no usage", buf("l", 256, vk::BufferUsageFlags::empty())),
        ("larger than every heap", buf("m", u64::MAX, storage)),
    ] {
        eprintln!("create_buffer {what} -> {:?}", r.as_ref().map(|_| ()));
        assert!(matches!(r, Err(Error::InvalidInput(_))), "{what}");
        assert_eq!(messages(&canary, what), 0, "{what}");
    }
    let r = buf(
        "device address",
        256,
        vk::BufferUsageFlags::SHADER_DEVICE_ADDRESS | storage,
    );
    eprintln!(
        "create_buffer SHADER_DEVICE_ADDRESS -> {:?}",
        r.as_ref().map(|_| ())
    );
    assert!(matches!(r, Err(Error::Unsupported(_))));
    // What is valid still works.
    let ok = image(
        "n",
        64,
        32,
        rgba,
        7,
        sampled | vk::ImageUsageFlags::TRANSFER_DST,
    )
    .unwrap();
    let ok_buf = buf("o", 256, storage).unwrap();
    drop((ok, ok_buf));
    ctx.collect().unwrap();
    assert_eq!(messages(&canary, "valid"), 0);
    common::finish(ctx, "invalid_descriptions");
}

// ---- 7. buffers bound as storage need STORAGE_BUFFER usage ---------------------------------

#[test]
fn storage_bindings_need_storage_usage() {
    let _serial = serial();
    let Some(ctx) = common::context("storage_usage") else {
        return;
    };
    let canary = ctx.canary().clone();
    let scan = BlockScan::new(&ctx).unwrap();
    let raw = common::block_scan_by_hand(&ctx, "scan by hand");
    let vertex = buffer(
        &ctx,
        "vertex only",
        1024,
        vk::BufferUsageFlags::VERTEX_BUFFER,
    );
    let storage = |name| buffer(&ctx, name, 1024, vk::BufferUsageFlags::STORAGE_BUFFER);
    let (out, sums) = (storage("out"), storage("sums"));
    let mut refused = Vec::new();
    ctx.submit_and_wait(|frame, cmd| {
        // SAFETY: submit_and_wait's recording command buffer for `frame`; both calls refuse
        // before recording anything, so the submission is empty.
        unsafe {
            refused.push(scan.record(frame, cmd, &vertex, &out, &sums, 256));
            refused.push(raw.record_dispatch(
                frame,
                cmd,
                &[&out, &vertex, &sums],
                &256u32.to_le_bytes(),
                [1, 1, 1],
            ));
        }
        Ok(())
    })
    .unwrap();
    eprintln!("scan.record, record_dispatch with a VERTEX_BUFFER buffer -> {refused:?}");
    assert!(
        refused
            .iter()
            .all(|r| matches!(r, Err(Error::InvalidInput(_))))
    );
    drop((scan, raw, vertex, out, sums));
    ctx.collect().unwrap();
    assert_eq!(messages(&canary, "storage usage"), 0);
    common::finish(ctx, "storage_usage");
}

// ---- 8. atlas arithmetic ------------------------------------------------------------------

#[test]
fn atlas_padding_overflow_is_an_error_not_a_panic() {
    use understory::world::atlas::AtlasPacker;
    let r = std::panic::catch_unwind(|| AtlasPacker::new(64, 0x8000_0000).map(|_| ()));
    assert!(matches!(r, Ok(Err(Error::InvalidInput(_)))), "{r:?}");
    let r = std::panic::catch_unwind(|| {
        let mut p = AtlasPacker::new(64, 4).unwrap();
        p.allocate(u32::MAX, 1).map(|_| ())
    });
    assert!(matches!(r, Ok(Err(Error::InvalidInput(_)))), "{r:?}");
}

// ---- 9. submitting while this thread holds the queue guard ---------------------------------

/// Every call that submits, made on the thread that holds `ctx.queue()`, returns `Lifecycle`
/// instead of deadlocking; another thread simply waits for the guard.
#[test]
fn submitting_under_the_queue_guard_is_an_error_not_a_deadlock() {
    let _serial = serial();
    let Some(ctx) = common::context("queue_guard") else {
        return;
    };
    let ctx = Arc::new(ctx);
    let (tx, rx) = mpsc::channel();
    let worker = {
        let ctx = ctx.clone();
        std::thread::spawn(move || {
            let ring = FrameRing::new(&ctx).unwrap();
            let guard = ctx.queue();
            let frame = ctx.begin_frame().unwrap();
            let cmd = ring.begin(&frame).unwrap();
            let ring_submit = ring.submit(frame, cmd).map(|_| ());
            let one_shot = ctx.submit_and_wait(|_, _| Ok(())).map(|_| ());
            let frame = ctx.begin_frame().unwrap();
            // SAFETY: no command buffers, no extra semaphores.
            let submit_frame =
                unsafe { ctx.submit_frame(frame, &[], &Default::default()) }.map(|_| ());
            drop(guard);
            // Without the guard, the same calls go through.
            let frame = ctx.begin_frame().unwrap();
            let cmd = ring.begin(&frame).unwrap();
            let after = ring.submit(frame, cmd).map(|s| s.value());
            let _ = tx.send((ring_submit, one_shot, submit_frame, after));
            ring
        })
    };
    let got = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("deadlock: a submission under the queue guard never returned");
    eprintln!("under the guard: {got:?}");
    let (ring_submit, one_shot, submit_frame, after) = got;
    assert!(matches!(ring_submit, Err(Error::Lifecycle(_))));
    assert!(matches!(one_shot, Err(Error::Lifecycle(_))));
    assert!(matches!(submit_frame, Err(Error::Lifecycle(_))));
    let value = after.expect("submits once the guard is dropped");
    ctx.wait(value, Duration::from_secs(10)).unwrap();
    drop(worker.join().unwrap());

    // Another thread holding the guard only makes this one wait.
    let ring = FrameRing::new(&ctx).unwrap();
    let frame = ctx.begin_frame().unwrap();
    let cmd = ring.begin(&frame).unwrap();
    let (locked_tx, locked_rx) = mpsc::channel();
    let holder = {
        let ctx = ctx.clone();
        std::thread::spawn(move || {
            let guard = ctx.queue();
            locked_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            drop(guard);
        })
    };
    locked_rx.recv().unwrap();
    let t = Instant::now();
    let s = ring
        .submit(frame, cmd)
        .expect("waits for the other thread's guard");
    assert!(t.elapsed() >= Duration::from_millis(100), "it waited");
    ctx.wait(s.value(), Duration::from_secs(10)).unwrap();
    holder.join().unwrap();
    drop(ring);
    let ctx = Arc::into_inner(ctx).unwrap();
    common::finish(ctx, "queue_guard");
}

// ---- 11. a HostTimeline semaphore is not used after the frame is reported complete --------

/// Frames B and C, each completed through a host timeline semaphore: B's after a chain of
/// dispatches (the GPU signals it), C's with no commands (the host signals it at once). A
/// thread waits for C in `Context::wait`, which waits on B's semaphore and then on C's. As soon
/// as `completed_value()` reaches C, the host destroys both semaphores, as the contract allows.
/// Before the fix, the frames were reported complete as soon as B finished, and the waiter then
/// called `vkWaitSemaphores` on C's destroyed semaphore (the layer reports the handle); after
/// it, C is held back until the wait is done with its semaphore.
#[test]
fn host_semaphore_is_not_used_after_its_frame_is_reported_complete() {
    let _serial = serial();
    let Some(ctx) = common::context("host_timeline_race") else {
        return;
    };
    let ctx = Arc::new(ctx);
    let canary = ctx.canary().clone();
    let d = ctx.device().clone();
    let scan = BlockScan::new(&ctx).unwrap();
    let b = |name| buffer(&ctx, name, 1 << 16, vk::BufferUsageFlags::STORAGE_BUFFER);
    let (input, out, sums) = (b("in"), b("out"), b("sums"));
    let pool_info = vk::CommandPoolCreateInfo::default()
        .queue_family_index(ctx.queue_family())
        .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER);
    // SAFETY: valid create info for the context's device.
    let pool = unsafe { d.create_command_pool(&pool_info, None) }.unwrap();
    let alloc = vk::CommandBufferAllocateInfo::default()
        .command_pool(pool)
        .level(vk::CommandBufferLevel::PRIMARY)
        .command_buffer_count(1);
    // SAFETY: the pool is the test's own.
    let cmd = unsafe { d.allocate_command_buffers(&alloc) }.unwrap()[0];
    for trial in 0..10 {
        let (sem_b, sem_c) = (timeline_semaphore(&d), timeline_semaphore(&d));
        let frame_b = ctx.begin_frame().unwrap();
        // SAFETY: the test's command buffer, idle (the previous trial's frames completed); the
        // buffers hold the 16384 elements; barriers order the dispatches.
        unsafe {
            d.reset_command_buffer(cmd, vk::CommandBufferResetFlags::empty())
                .unwrap();
            d.begin_command_buffer(cmd, &vk::CommandBufferBeginInfo::default())
                .unwrap();
            for _ in 0..20 {
                scan.record(&frame_b, cmd, &input, &out, &sums, 1 << 14)
                    .unwrap();
                memory_barrier(
                    &d,
                    cmd,
                    (
                        vk::PipelineStageFlags::COMPUTE_SHADER,
                        vk::AccessFlags::SHADER_WRITE,
                    ),
                    (
                        vk::PipelineStageFlags::COMPUTE_SHADER,
                        vk::AccessFlags::SHADER_READ | vk::AccessFlags::SHADER_WRITE,
                    ),
                );
            }
            d.end_command_buffer(cmd).unwrap();
        }
        {
            let cmds = [cmd];
            let signals = [sem_b];
            let signal_values = [1u64];
            let mut tl =
                vk::TimelineSemaphoreSubmitInfo::default().signal_semaphore_values(&signal_values);
            let submit = vk::SubmitInfo::default()
                .command_buffers(&cmds)
                .signal_semaphores(&signals)
                .push_next(&mut tl);
            let q = ctx.queue();
            // SAFETY: the context's queue, locked; an executable command buffer recorded for
            // frame B; a fresh timeline semaphore signalled with 1.
            unsafe { d.queue_submit(*q, &[submit], vk::Fence::null()) }.unwrap();
        }
        let host_timeline = |semaphore| FrameSignal::HostTimeline {
            semaphore,
            value: 1,
        };
        // SAFETY: the submission above (on the context's queue) carries every command of B
        // and signals sem_b with 1 after them; C has no commands and sem_c is signalled by the
        // host below. Both semaphores live until their frames are reported complete.
        unsafe { ctx.frame_submitted(frame_b, host_timeline(sem_b)) }.unwrap();
        let frame_c = ctx.begin_frame().unwrap();
        let c = frame_c.value();
        // SAFETY: as above.
        unsafe { ctx.frame_submitted(frame_c, host_timeline(sem_c)) }.unwrap();
        let waiter = {
            let ctx = ctx.clone();
            std::thread::spawn(move || ctx.wait(c, Duration::from_secs(10)))
        };
        std::thread::sleep(Duration::from_millis(5)); // the waiter waits on B's semaphore
        let info = vk::SemaphoreSignalInfo::default().semaphore(sem_c).value(1);
        // SAFETY: a host signal of a live timeline semaphore to a higher value (C completes).
        unsafe { d.signal_semaphore(&info) }.unwrap();
        let t = Instant::now();
        while ctx.completed_value().unwrap() < c {
            assert!(t.elapsed() < Duration::from_secs(10));
        }
        // Allowed by frame_submitted's contract: both frames were reported complete.
        // SAFETY: no pending batch uses them any more (the frames completed).
        unsafe {
            d.destroy_semaphore(sem_c, None);
            d.destroy_semaphore(sem_b, None);
        }
        let r = waiter.join().unwrap();
        assert!(r.is_ok(), "trial {trial}: wait -> {r:?}");
        assert_eq!(messages(&canary, "host timeline"), 0, "trial {trial}");
    }
    // SAFETY: the last submission that used the pool completed.
    unsafe { d.destroy_command_pool(pool, None) };
    drop((scan, input, out, sums));
    let ctx = Arc::into_inner(ctx).unwrap();
    common::finish(ctx, "host_timeline_race");
}

// ---- 12. a refused frame_submitted gives the frame back ------------------------------------

#[test]
fn refused_frame_submitted_gives_the_frame_back() {
    let _serial = serial();
    let Some(ctx) = common::context("frame_submitted_refused") else {
        return;
    };
    let canary = ctx.canary().clone();
    let frame = ctx.begin_frame().unwrap();
    let value = frame.value();
    // SAFETY: nothing was recorded for the frame; the signals are refused before anything is
    // recorded (and HostReported below is reported only once nothing can run).
    let rejected = unsafe {
        ctx.frame_submitted(
            frame,
            FrameSignal::HostTimeline {
                semaphore: vk::Semaphore::null(),
                value: 1,
            },
        )
    }
    .expect_err("a null semaphore is refused");
    assert!(matches!(rejected.error(), Error::InvalidInput(_)));
    let frame = rejected.into_frame();
    assert_eq!(frame.value(), value, "the same frame, still open");
    assert!(ctx.begin_frame().is_err(), "still open");
    // SAFETY: as above.
    let rejected = unsafe {
        ctx.frame_submitted(
            frame,
            FrameSignal::HostTimeline {
                semaphore: ctx.timeline_semaphore(),
                value: 1,
            },
        )
    }
    .expect_err("understory's own semaphore is refused");
    let (frame, error) = rejected.into_parts();
    assert!(matches!(error, Error::InvalidInput(_)));
    // A frame of another context is refused and comes back too.
    let other = common::context("frame_submitted_refused other").unwrap();
    // SAFETY: as above.
    let rejected = unsafe { other.frame_submitted(frame, FrameSignal::HostReported) }
        .expect_err("a frame of another context is refused");
    assert!(matches!(rejected.error(), Error::Lifecycle(_)));
    common::finish(other, "frame_submitted_refused other");
    // SAFETY: nothing recorded; reported complete below.
    let done =
        unsafe { ctx.frame_submitted(rejected.into_frame(), FrameSignal::HostReported) }.unwrap();
    assert_eq!(done.value(), value);
    // SAFETY: the frame recorded no commands.
    unsafe { ctx.frames_completed(value) }.unwrap();
    let next = ctx.begin_frame().unwrap();
    assert_eq!(next.value(), value + 1, "the value was used once");
    drop(next);
    // Converting into an Error (with `?`) is still possible.
    let e: Error = {
        let frame = ctx.begin_frame().unwrap();
        // SAFETY: refused before anything is recorded.
        unsafe {
            ctx.frame_submitted(
                frame,
                FrameSignal::HostTimeline {
                    semaphore: vk::Semaphore::null(),
                    value: 1,
                },
            )
        }
        .unwrap_err()
        .into()
    };
    assert!(matches!(e, Error::InvalidInput(_)));
    assert_eq!(messages(&canary, "frame_submitted refused"), 0);
    common::finish(ctx, "frame_submitted_refused");
}
