//! Test harness: a context under the Khronos validation layer (required), whose canary must be
//! empty after every test; loud skips that `UNDERSTORY_REQUIRE_GPU=1` turns into failures.
#![allow(dead_code)]

use std::sync::Arc;

use understory::Error;
use understory::gpu::context::{Context, ContextOptions};
use understory::gpu::debug::Canary;
use understory::gpu::instance::{InstanceOptions, Validation};

/// Whether skips are failures (set on the GPU machine).
pub fn require_gpu() -> bool {
    matches!(
        std::env::var("UNDERSTORY_REQUIRE_GPU").as_deref(),
        Ok("1") | Ok("true") | Ok("yes")
    )
}

/// Prints a loud skip line, or panics when skips are not allowed.
pub fn skip(test: &str, reason: &str) {
    if require_gpu() {
        panic!("{test}: would be SKIPPED ({reason}), but UNDERSTORY_REQUIRE_GPU=1");
    }
    // Straight to the stream: libtest captures eprintln!, and a skip must be seen.
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED {test}: {reason} ***\n");
}

/// Options for a validated test context: validation required, synchronization validation on
/// unless `UNDERSTORY_SYNC_VALIDATION=0`, GPU-assisted validation with
/// `UNDERSTORY_VALIDATION=gpu-assisted`; `UNDERSTORY_DEVICE` respected.
pub fn options() -> ContextOptions {
    let sync = std::env::var("UNDERSTORY_SYNC_VALIDATION").map_or(true, |v| v != "0");
    let gpu_assisted = std::env::var("UNDERSTORY_VALIDATION")
        .ok()
        .and_then(|v| Validation::parse_env(&v).ok())
        .is_some_and(|(_, g)| g);
    let device = std::env::var("UNDERSTORY_DEVICE")
        .ok()
        .map(|v| understory::gpu::adapter::DeviceSelector::parse(&v).expect("UNDERSTORY_DEVICE"));
    ContextOptions {
        instance: InstanceOptions {
            app_name: "understory tests".into(),
            validation: Validation::Required,
            sync_validation: sync,
            gpu_assisted,
        },
        device,
        ..Default::default()
    }
}

fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
    static ANCHOR: std::sync::Once = std::sync::Once::new();
    ANCHOR.call_once(anchor_driver);
}

/// Keeps one bare Vulkan instance (with the validation layer when installed) alive for the
/// whole test process, so that the loader does not unload and reload the driver and the layer
/// with every context. On the NVIDIA machine each reload takes static TLS
/// (`libnvidia-tls.so`) that glibc never gives back: after about 30 contexts in one process
/// `vkCreateInstance` failed with "cannot allocate memory in static TLS block", and parallel
/// test binaries sometimes died with SIGSEGV. Real programs create their instance once.
/// Deliberately never destroyed; without a loader this does nothing.
fn anchor_driver() {
    // SAFETY: loading the system Vulkan loader; the entry is leaked with the instance.
    let Ok(entry) = (unsafe { ash::Entry::load() }) else {
        return;
    };
    let layer = understory::gpu::instance::VALIDATION_LAYER;
    // SAFETY: a plain query on a loaded entry.
    let has_layer = unsafe { entry.enumerate_instance_layer_properties() }
        .is_ok_and(|ls| ls.iter().any(|l| l.layer_name_as_c_str() == Ok(layer)));
    let layers = if has_layer {
        vec![layer.as_ptr()]
    } else {
        vec![]
    };
    let app = ash::vk::ApplicationInfo::default().api_version(ash::vk::API_VERSION_1_2);
    let info = ash::vk::InstanceCreateInfo::default()
        .application_info(&app)
        .enabled_layer_names(&layers);
    // SAFETY: valid create info; the instance is never used for anything else.
    if unsafe { entry.create_instance(&info, None) }.is_ok() {
        // ash::Instance has no Drop: the VkInstance stays alive. The entry would unload the
        // loader library when dropped, so it is leaked too.
        std::mem::forget(entry);
    }
}

/// Makes the calling test run alone among this process's tests that call it: takes a
/// process-wide lock and holds it until the test's thread ends (threads the test spawns, which
/// have no name, take nothing, so they cannot wait on their own test).
///
/// For binaries whose tests each bring up a wgpu instance and device beside understory's on
/// lavapipe: CI once saw `wgpu_host` die with SIGSEGV while two such tests ran in parallel,
/// which 140 runs here (gdb, fresh shader caches, 1 to 9 test threads) and one valgrind run
/// (no invalid access) never reproduced. The crashing thread is not known; lavapipe compiles
/// pipelines with LLVM on its own threads, and Bevy's CI saw llvmpipe segfault when LLVM was
/// driven from several threads at once (bevyengine/bevy#20195). Real engines have one device;
/// tests of several threads inside one test keep their threads.
pub fn alone() {
    use std::cell::RefCell;
    use std::sync::{Mutex, MutexGuard, PoisonError};
    static LOCK: Mutex<()> = Mutex::new(());
    thread_local! {
        static HELD: RefCell<Option<MutexGuard<'static, ()>>> = const { RefCell::new(None) };
    }
    if std::thread::current().name().is_none() {
        return;
    }
    HELD.with(|held| {
        let mut held = held.borrow_mut();
        if held.is_none() {
            *held = Some(LOCK.lock().unwrap_or_else(PoisonError::into_inner));
        }
    });
}

/// A validated context, or `None` after a loud skip when no Vulkan device or validation layer
/// is installed.
pub fn context(test: &str) -> Option<Context> {
    context_with(test, &options())
}

/// As [`context`], with the caller's options (validation is forced to required).
pub fn context_with(test: &str, options: &ContextOptions) -> Option<Context> {
    init_log();
    let mut options = options.clone();
    options.instance.validation = Validation::Required;
    match Context::new(&options) {
        Ok(ctx) => {
            assert!(ctx.validation_enabled(), "validation must be on in tests");
            Some(ctx)
        }
        Err(
            e @ (Error::LoaderMissing { .. }
            | Error::NoDevice { .. }
            | Error::ValidationUnavailable),
        ) => {
            skip(test, &e.to_string());
            None
        }
        Err(e) => panic!("{test}: context creation failed: {e}"),
    }
}

/// Panics with every message if the canary counted any validation warning or error.
pub fn assert_clean(canary: &Arc<Canary>, what: &str) {
    let messages = canary.drain();
    if canary.total() > 0 {
        let list: Vec<String> = messages.iter().map(|m| format!("  {m}")).collect();
        panic!(
            "{what}: {} validation error(s), {} warning(s):\n{}",
            canary.errors(),
            canary.warnings(),
            list.join("\n")
        );
    }
}

/// Tears the context down (wait, free, destroy) and checks: no leaks, no validation messages,
/// including those raised during teardown.
pub fn finish(ctx: Context, what: &str) {
    let canary = ctx.canary().clone();
    let report = ctx.shutdown().expect("shutdown");
    assert!(report.leaks.is_empty(), "{what}: leaked {:?}", report.leaks);
    assert_clean(&canary, what);
}

/// A validated context with this memory configuration.
pub fn context_with_memory(
    test: &str,
    memory: understory::gpu::memory::MemoryConfig,
) -> Option<Context> {
    let mut options = options();
    options.memory = memory;
    context_with(test, &options)
}

/// A device-local storage buffer description (also a transfer destination).
pub fn storage_desc(
    name: &str,
    size: u64,
    category: understory::policy::category::Category,
) -> understory::gpu::memory::BufferDesc<'_> {
    understory::gpu::memory::BufferDesc {
        name,
        size,
        usage: ash::vk::BufferUsageFlags::STORAGE_BUFFER | ash::vk::BufferUsageFlags::TRANSFER_DST,
        location: understory::gpu::memory::MemoryLocation::GpuOnly,
        category,
    }
}

/// The default memory configuration without the size-class cache (every release reaches the
/// allocator).
pub fn no_cache() -> understory::gpu::memory::MemoryConfig {
    understory::gpu::memory::MemoryConfig {
        cache_bytes: understory::policy::category::PerCategory(
            [0; understory::policy::category::CATEGORIES],
        ),
        ..Default::default()
    }
}

/// The crate's block-scan shader as a hand-made `ComputePipeline` (what a host building its own
/// compute pass does).
pub fn block_scan_by_hand(ctx: &Context, name: &str) -> understory::gpu::compute::ComputePipeline {
    // SAFETY: BLOCK_SCAN is the crate's naga-validated shader; entry `main`; set 0 bindings
    // 0..3 storage buffers and a 4-byte push constant, as shaders/block_scan.wgsl declares.
    unsafe {
        understory::gpu::compute::ComputePipeline::new(
            ctx,
            &understory::gpu::compute::ComputePipelineDesc {
                name,
                spirv: understory::gpu::shaders::BLOCK_SCAN,
                entry: c"main",
                storage_buffers: 3,
                push_constant_bytes: 4,
            },
        )
    }
    .expect("the block-scan pipeline")
}

/// One level and one layer of `aspect`: the whole of a test's 2D image.
pub const fn single_range(aspect: ash::vk::ImageAspectFlags) -> ash::vk::ImageSubresourceRange {
    ash::vk::ImageSubresourceRange {
        aspect_mask: aspect,
        base_mip_level: 0,
        level_count: 1,
        base_array_layer: 0,
        layer_count: 1,
    }
}

/// The depth aspect of a test's depth image.
pub const DEPTH_ONLY: ash::vk::ImageSubresourceRange =
    single_range(ash::vk::ImageAspectFlags::DEPTH);

/// A 2D image of one level (category `Other`, the host's) and a view of its `aspect`. The
/// caller destroys the view once no submission uses it.
pub fn image_with_view(
    ctx: &Context,
    name: &str,
    extent: ash::vk::Extent2D,
    format: ash::vk::Format,
    usage: ash::vk::ImageUsageFlags,
    aspect: ash::vk::ImageAspectFlags,
) -> (understory::gpu::memory::Image, ash::vk::ImageView) {
    let image = ctx
        .create_image(&understory::gpu::memory::ImageDesc {
            name,
            extent,
            format,
            mip_levels: 1,
            usage,
            category: understory::policy::category::Category::Other,
        })
        .unwrap();
    let info = ash::vk::ImageViewCreateInfo::default()
        .image(image.raw())
        .view_type(ash::vk::ImageViewType::TYPE_2D)
        .format(format)
        .subresource_range(single_range(aspect));
    // SAFETY: a live 2D image of this device, of this format, one level and layer; the aspect
    // is the format's (the callers pass DEPTH for depth formats, COLOR otherwise).
    let view = unsafe { ctx.device().create_image_view(&info, None) }.unwrap();
    (image, view)
}

// ---------------------------------------------------------------------------------------------
// For the review suites (understory-wgpu/tests/review*.rs, understory-bevy/tests/review.rs).
// A logger that keeps warnings and errors per thread (tests run in parallel).

struct ThreadLog;

std::thread_local! {
    static LOGGED: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl log::Log for ThreadLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let line = format!("[{} {}] {}", r.level(), r.target(), r.args());
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "{line}");
        LOGGED.with(|l| l.borrow_mut().push(line));
    }
    fn flush(&self) {}
}

pub fn install_logger() {
    static LOGGER: ThreadLog = ThreadLog;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if log::set_logger(&LOGGER).is_ok() {
            log::set_max_level(log::LevelFilter::Warn);
        }
    });
}

/// Warnings and errors logged on this thread since the last call (Vulkan layer messages
/// included: the layer calls the messenger on the calling thread).
pub fn take_log() -> Vec<String> {
    LOGGED.with(|l| std::mem::take(&mut *l.borrow_mut()))
}

/// Log lines that mean something went wrong: any error, and any layer warning.
pub fn bad_lines(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.starts_with("[ERROR") || l.contains("understory::vulkan"))
        .cloned()
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Each test runs in a child process of this binary: one that crashes (SIGSEGV in the driver
// or the layer) fails alone, with its output, instead of taking every other test down.

const CHILD: &str = "UNDERSTORY_TEST_CHILD";

/// In the parent: runs test `name` in a child process and checks it passed; returns `true`.
/// In that child: returns `false` (run the body).
pub fn isolated(name: &str) -> bool {
    if std::env::var(CHILD).as_deref() == Ok(name) {
        return false;
    }
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            name,
            "--exact",
            "--nocapture",
            "--test-threads=1",
            "--include-ignored",
        ])
        .env(CHILD, name)
        .output()
        .expect("child test process");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    // "1 passed": the child ran the test (a name that matches none passes with 0).
    if !out.status.success() || !text.contains("1 passed") {
        let mut lines: Vec<String> = Vec::new();
        let mut destroy_device = 0;
        for l in text.lines() {
            if l.contains("XDG_RUNTIME_DIR") || l.trim_start().starts_with("at /") {
                continue;
            }
            if l.contains("VUID-vkDestroyDevice-device-00378") {
                destroy_device += 1;
                continue;
            }
            // Backtrace frames: only ours, wgpu's and understory's.
            let t = l.trim_start();
            if t.split_once(": ")
                .is_some_and(|(n, _)| n.parse::<u32>().is_ok())
                && !(t.contains("understory") || t.contains("wgpu") || t.contains("review"))
            {
                continue;
            }
            let l: String = l.chars().take(700).collect();
            if lines.last() != Some(&l) {
                lines.push(l);
            }
        }
        if destroy_device > 0 {
            lines.push(format!(
                "(+ {destroy_device} x VUID-vkDestroyDevice-device-00378: objects alive when the VkDevice was destroyed)"
            ));
        }
        let keep = lines.len().saturating_sub(90);
        panic!(
            "{name}: child process {}\n{}",
            out.status,
            lines[keep..].join("\n")
        );
    }
    true
}

/// Records a fill of `buffer` with zeros (instances at the origin, of scale 0) and the barrier
/// that makes it visible to compute-shader reads.
///
/// # Safety
/// `cmd` is recording, outside a render pass, for a frame that `buffer` is marked used by.
pub unsafe fn zero_for_compute(
    ctx: &Context,
    cmd: ash::vk::CommandBuffer,
    buffer: &understory::gpu::memory::Buffer,
) {
    use ash::vk;
    // SAFETY: as the caller vouched; `buffer` was created with TRANSFER_DST by the tests.
    unsafe {
        ctx.device()
            .cmd_fill_buffer(cmd, buffer.raw(), 0, vk::WHOLE_SIZE, 0);
        understory::gpu::compute::memory_barrier(
            ctx.device(),
            cmd,
            (
                vk::PipelineStageFlags::TRANSFER,
                vk::AccessFlags::TRANSFER_WRITE,
            ),
            (
                vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::AccessFlags::SHADER_READ,
            ),
        );
    }
}
