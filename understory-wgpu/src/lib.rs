//! understory under wgpu: one `VkDevice` for a wgpu renderer and understory's vegetation, the
//! real VRAM budget for a wgpu device, and the forest drawn into the app's own `wgpu::Texture`s.
//!
//! ```no_run
//! use understory_wgpu::{Forest, ForestDesc, ForestView, SharedDevice, SharedDeviceDesc};
//! # fn f() -> understory::Result<()> {
//! let shared = SharedDevice::new(&SharedDeviceDesc::from_env()?)?;
//! println!("{}", shared.budget()?); // the real heap budget, and what wgpu and understory hold
//! let mut forest = Forest::new(&shared, &ForestDesc::default())?;
//! // forest.vegetation_mut().register_species(..)? and spawn(..)? the trees, then each frame:
//! # let (color, depth, view): (wgpu::Texture, wgpu::Texture, ForestView) = todo!();
//! let mut frame = shared.begin_frame()?;
//! // SAFETY: no other thread destroys the targets or the args buffer meanwhile.
//! unsafe { forest.render(&mut frame, &view, &color, &depth) }?; // update, uploads, cull, draw
//! let app_pass: Vec<wgpu::CommandBuffer> = vec![]; // the app's own work before and after
//! shared.submit(frame, app_pass, [])?;
//! # drop(forest);
//! let report = shared.shutdown()?; // waits for the last frame, drains, reports leaks
//! assert!(report.leaks.is_empty());
//! # Ok(()) }
//! ```
//!
//! # How the device is shared
//! [`SharedDevice::new`] creates the Vulkan instance (with the Khronos layer and
//! synchronization validation when asked) and the device itself, with the union of what wgpu
//! needs (`wgpu_hal::vulkan::Adapter::required_device_extensions` and
//! `physical_device_features`) and what understory needs
//! ([`DeviceRequirements`]). wgpu gets it
//! through `device_from_raw` and `Adapter::create_device_from_hal` and owns it; understory wraps
//! the same device and queue with `Context::from_raw`, and keeps the wgpu device alive for as
//! long as anything of understory's lives ([`Context::keep_alive`]).
//!
//! # Synchronization: recorded into wgpu's submissions
//! understory never submits (the context is built with
//! [`ContextOptions::host_submits_only`]): wgpu's `Queue::submit` is the only submitter on the
//! shared queue, so no lock is needed between them. Each frame ([`WgpuFrame`]) records
//! understory's work into a raw-only wgpu command encoder (`CommandEncoder::as_hal_mut`),
//! preceded by wgpu-API command buffers that move the app's targets into the states
//! understory draws in (`transition_resources`, validated by wgpu when made, so a resource
//! of another device or a destroyed one is a typed error before anything is recorded).
//! [`SharedDevice::submit`] hands them to `Queue::submit` between the app's own command
//! buffers (a submission wgpu refuses ran nothing: the frame is dropped and the error
//! returned), then registers `Queue::on_submitted_work_done`:
//! when wgpu reports that submission (or a later one) done, the frame is reported complete to
//! understory ([`FrameSignal::HostReported`]), and only then are its frees carried out. The
//! wgpu resources a frame drew into are held until then too: wgpu does not see the raw
//! encoder's uses.
//!
//! A host that submits itself (Bevy) takes the frame's command buffers with
//! [`SharedDevice::finish`] and announces the frame with [`SharedDevice::host_submitted`]
//! after its own `Queue::submit`. Where the cull and the draws are separate steps of the host's
//! frame, [`Forest::cull`] goes into one part, [`SharedDevice::resume`] reopens the frame,
//! and [`Forest::draw`] goes into the next ([`Forest::render`] is both).
//!
//! The alternative, understory submitting its own command buffers with semaphores between
//! them and wgpu's, needs both to lock the one `VkQueue` around every submission; wgpu takes no
//! lock of ours, so that would be undefined behaviour as soon as two threads submit.
//!
//! # The budget
//! wgpu-hal has its own allocator (gpu-allocator) on the same heaps. With
//! `VK_EXT_memory_budget` the driver's `heapUsage` counts wgpu's bytes with ours, and
//! understory sees them as foreign (`usage − ours`). Without it (lavapipe) understory declares
//! the bytes wgpu's allocator report holds (`Device::generate_allocator_report`) as foreign on
//! the device-local heap ([`HeapBudget::declared_foreign`]); the report does not name heaps,
//! and on lavapipe there is one. Either way the vegetation budget follows when wgpu allocates
//! more: `min(cap, share × (heap budget − foreign))`.
//!
//! [`Context::keep_alive`]: understory::gpu::context::Context::keep_alive
//! [`ContextOptions::host_submits_only`]: understory::gpu::context::ContextOptions::host_submits_only
//! [`FrameSignal::HostReported`]: understory::gpu::timeline::FrameSignal::HostReported
//! [`HeapBudget::declared_foreign`]: understory::gpu::budget::HeapBudget::declared_foreign

#![warn(missing_docs)]

use std::collections::VecDeque;
use std::ffi::CStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ash::vk;
use glam::{Mat4, Vec3};
use understory::error::{Error, Result};
use understory::gpu::adapter::{Adapter, DeviceType};
use understory::gpu::budget::{BudgetSource, DriverBudget, HeapBudgets, RawHeap, Source};
use understory::gpu::context::{Context, ContextOptions, Frame, FrameTag, HostHandles};
use understory::gpu::cull::{Compaction, CullDesc, CullPass, CullView, WIDE_SOURCES_PER_DISPATCH};
use understory::gpu::debug::{Canary, messenger_create_info};
use understory::gpu::draw::{DrawFrame, DrawOptions, DrawPass, Meshes, TreeMeshes};
use understory::gpu::instance::{VALIDATION_LAYER, Validation};
use understory::gpu::memory::{HeapReport, ShutdownReport};
use understory::gpu::requirements::{Capabilities, DeviceRequirements};
use understory::gpu::timeline::FrameSignal;
use understory::vegetation::{SpeciesId, UpdateReport, Vegetation, VegetationConfig, Viewer};

pub use understory;
pub use wgpu;
pub use wgpu_hal;

type Vulkan = wgpu_hal::api::Vulkan;

/// The wgpu version this crate is built against (`Cargo.toml` pins it, in one place).
pub const WGPU_VERSION: &str = "29.0.4";

/// How long [`SharedDevice::begin_frame`] waits for wgpu to finish the frame
/// `frames_in_flight` back, and [`SharedDevice::shutdown`] for the last one.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(30);

/// How to build a [`SharedDevice`].
#[derive(Clone, Debug)]
pub struct SharedDeviceDesc {
    /// understory's options: validation (`instance`: the layer, synchronization and
    /// GPU-assisted validation apply to wgpu's work as well), memory caps, frames in flight.
    /// `host_submits_only` is always set.
    pub context: ContextOptions,
    /// wgpu features the app needs on top of understory's.
    pub features: wgpu::Features,
    /// wgpu limits the app needs.
    pub limits: wgpu::Limits,
    /// Pick the first adapter whose name contains this (case-insensitive); `None` prefers a
    /// discrete GPU, then integrated, virtual, CPU.
    pub adapter_name: Option<String>,
}

impl Default for SharedDeviceDesc {
    fn default() -> Self {
        Self {
            context: ContextOptions::default(),
            features: wgpu::Features::empty(),
            limits: wgpu::Limits::default(),
            adapter_name: None,
        }
    }
}

impl SharedDeviceDesc {
    /// Defaults with `UNDERSTORY_VALIDATION`, `UNDERSTORY_SYNC_VALIDATION` and
    /// `UNDERSTORY_DEVICE` (a name substring) applied.
    pub fn from_env() -> Result<Self> {
        let mut context = ContextOptions::default().with_env()?;
        context.device = None;
        Ok(Self {
            context,
            adapter_name: std::env::var("UNDERSTORY_DEVICE").ok(),
            ..Default::default()
        })
    }
}

/// Frames submitted and not yet reported complete, with what they keep alive.
#[derive(Default)]
struct InFlight {
    frames: VecDeque<(u64, wgpu::SubmissionIndex, Vec<Keep>)>,
    /// The highest value reported to the context as complete.
    reported: u64,
}

/// A wgpu object a frame's raw commands use (wgpu does not see those uses).
#[allow(dead_code)] // held for their drop only
enum Keep {
    Texture(wgpu::Texture),
    View(wgpu::TextureView),
    Buffer(wgpu::Buffer),
}

/// Validation messages and wgpu errors seen so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Messages {
    /// Khronos-layer messages (errors and warnings) from the messenger this crate installs on
    /// the instance: wgpu's and understory's Vulkan calls alike.
    pub layer: u64,
    /// wgpu's own validation errors (the device's uncaptured-error handler).
    pub wgpu: u64,
    /// The texts, at most 64 of each.
    pub texts: Vec<String>,
}

/// Validation counts that outlive the [`SharedDevice`] ([`SharedDevice::message_log`]).
#[derive(Clone)]
pub struct MessageLog {
    canary: Arc<Canary>,
    wgpu: Arc<Mutex<WgpuErrors>>,
}

impl std::fmt::Debug for MessageLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageLog")
            .field("now", &self.read())
            .finish()
    }
}

impl MessageLog {
    /// The counts now, and the texts not read before.
    pub fn read(&self) -> Messages {
        let w = self.wgpu.lock().unwrap_or_else(|p| p.into_inner());
        let mut texts: Vec<String> = self
            .canary
            .drain()
            .into_iter()
            .take(64)
            .map(|m| m.to_string())
            .collect();
        texts.extend(w.texts.iter().cloned());
        Messages {
            layer: self.canary.total(),
            wgpu: w.count,
            texts,
        }
    }
}

#[derive(Default)]
struct WgpuErrors {
    count: u64,
    texts: Vec<String>,
}

/// One `VkDevice` shared by wgpu and understory. See the crate docs.
pub struct SharedDevice {
    /// Unique per shared device (a forest checks that a frame is of its device).
    id: u64,
    // Dropped first: understory's context (its objects keep the wgpu device alive themselves).
    ctx: Option<Context>,
    in_flight: Mutex<InFlight>,
    limbo: Limbo,
    done: Arc<AtomicU64>,
    wgpu_errors: Arc<Mutex<WgpuErrors>>,
    canary: Arc<Canary>,
    device_local_heap: usize,
    color_formats: FormatMap,
    queue: wgpu::Queue,
    device: wgpu::Device,
    adapter: wgpu::Adapter,
    instance: wgpu::Instance,
}

/// Vulkan formats of the wgpu formats a forest draws into.
#[derive(Clone, Debug)]
struct FormatMap(Vec<(wgpu::TextureFormat, vk::Format)>);

impl FormatMap {
    fn get(&self, f: wgpu::TextureFormat) -> Option<vk::Format> {
        self.0.iter().find(|(w, _)| *w == f).map(|(_, v)| *v)
    }
}

/// The formats a [`Forest`] can draw into.
pub const COLOR_FORMATS: [wgpu::TextureFormat; 4] = [
    wgpu::TextureFormat::Rgba8Unorm,
    wgpu::TextureFormat::Rgba8UnormSrgb,
    wgpu::TextureFormat::Bgra8Unorm,
    wgpu::TextureFormat::Bgra8UnormSrgb,
];

/// The depth formats a [`Forest`] can draw with.
pub const DEPTH_FORMATS: [wgpu::TextureFormat; 1] = [wgpu::TextureFormat::Depth32Float];

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

fn wgpu_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Unsupported(format!("wgpu: {what}: {e}"))
}

fn vk_fail(call: &'static str) -> impl Fn(vk::Result) -> Error {
    move |r| match r {
        vk::Result::ERROR_OUT_OF_DEVICE_MEMORY => Error::OutOfDeviceMemory { call },
        vk::Result::ERROR_OUT_OF_HOST_MEMORY => Error::OutOfHostMemory { call },
        vk::Result::ERROR_DEVICE_LOST => Error::DeviceLost { call },
        other => Error::Unsupported(format!("{call}: {other:?}")),
    }
}

/// The instance this crate creates, before wgpu owns it.
struct RawInstance {
    entry: ash::Entry,
    instance: ash::Instance,
    api_version: u32,
    extensions: Vec<&'static CStr>,
    messenger: Option<(ash::ext::debug_utils::Instance, vk::DebugUtilsMessengerEXT)>,
    flags: wgpu::InstanceFlags,
}

fn create_instance(options: &ContextOptions, canary: &Arc<Canary>) -> Result<RawInstance> {
    let entry = understory::gpu::instance::load_entry()?;
    // SAFETY: a global query.
    let loader = unsafe { entry.try_enumerate_instance_version() }
        .map_err(vk_fail("vkEnumerateInstanceVersion"))?
        .unwrap_or(vk::API_VERSION_1_0);
    if loader < vk::API_VERSION_1_3 {
        return Err(Error::Unsupported(format!(
            "the Vulkan loader is {}.{}: understory's draw pass needs 1.3",
            vk::api_version_major(loader),
            vk::api_version_minor(loader)
        )));
    }
    let api_version = vk::API_VERSION_1_3;
    // SAFETY: a global query.
    let layers = unsafe { entry.enumerate_instance_layer_properties() }
        .map_err(vk_fail("vkEnumerateInstanceLayerProperties"))?;
    let has_layer = layers
        .iter()
        .any(|l| l.layer_name_as_c_str() == Ok(VALIDATION_LAYER));
    let io = &options.instance;
    let validation = match io.validation {
        Validation::Off => false,
        Validation::IfAvailable => {
            if !has_layer {
                log::warn!(
                    "validation requested but VK_LAYER_KHRONOS_validation is not installed; running without it"
                );
            }
            has_layer
        }
        Validation::Required if !has_layer => return Err(Error::ValidationUnavailable),
        Validation::Required => true,
    };
    let flags = if validation {
        // Not DEBUG: with it naga writes an `OpSource` language the installed layer (1.3.239)
        // reports as invalid SPIR-V in every app shader.
        wgpu::InstanceFlags::VALIDATION
    } else {
        wgpu::InstanceFlags::empty()
    };
    let mut extensions = wgpu_hal::vulkan::Instance::desired_extensions(&entry, api_version, flags)
        .map_err(|e| wgpu_err("instance extensions", e))?;
    if validation {
        for e in [
            ash::ext::debug_utils::NAME,
            ash::ext::validation_features::NAME,
        ] {
            if !extensions.contains(&e) {
                extensions.push(e);
            }
        }
    }
    let names: Vec<_> = extensions.iter().map(|e| e.as_ptr()).collect();
    let layer_names = [VALIDATION_LAYER.as_ptr()];
    let app = vk::ApplicationInfo::default()
        .application_name(c"understory-wgpu")
        .engine_name(c"wgpu")
        .api_version(api_version);
    let mut dbg = messenger_create_info(canary);
    let mut enables = Vec::new();
    if io.sync_validation {
        enables.push(vk::ValidationFeatureEnableEXT::SYNCHRONIZATION_VALIDATION);
    }
    if io.gpu_assisted {
        enables.push(vk::ValidationFeatureEnableEXT::GPU_ASSISTED);
    }
    let mut vf = vk::ValidationFeaturesEXT::default().enabled_validation_features(&enables);
    let mut info = vk::InstanceCreateInfo::default()
        .application_info(&app)
        .enabled_extension_names(&names);
    if validation {
        info = info
            .enabled_layer_names(&layer_names)
            .push_next(&mut dbg)
            .push_next(&mut vf);
    }
    // SAFETY: every extension is one wgpu-hal found supported, or debug utils and validation
    // features, which the installed layer provides; the canary outlives the instance (the
    // drop callback below holds it).
    let instance =
        unsafe { entry.create_instance(&info, None) }.map_err(vk_fail("vkCreateInstance"))?;
    let messenger = if validation {
        let loader = ash::ext::debug_utils::Instance::new(&entry, &instance);
        // SAFETY: debug utils is enabled; the messenger is destroyed before the instance.
        match unsafe { loader.create_debug_utils_messenger(&messenger_create_info(canary), None) } {
            Ok(m) => Some((loader, m)),
            Err(e) => {
                // SAFETY: nothing was created from the instance.
                unsafe { instance.destroy_instance(None) };
                return Err(vk_fail("vkCreateDebugUtilsMessengerEXT")(e));
            }
        }
    } else {
        None
    };
    Ok(RawInstance {
        entry,
        instance,
        api_version,
        extensions,
        messenger,
        flags,
    })
}

/// The understory budget source for a wgpu device: the driver's numbers, and where the driver
/// has no `VK_EXT_memory_budget`, wgpu's allocator bytes declared as foreign.
struct WgpuBudget {
    driver: DriverBudget,
    device: wgpu::Device,
    heap: usize,
    heaps: usize,
    /// Whether the last query had a heap without driver numbers.
    estimated: bool,
}

impl BudgetSource for WgpuBudget {
    fn query(&mut self) -> Result<Vec<RawHeap>> {
        let raw = self.driver.query()?;
        self.heaps = raw.len();
        self.estimated = raw.iter().any(|h| h.driver.is_none());
        Ok(raw)
    }

    fn declared_foreign(&mut self) -> Option<Vec<u64>> {
        // Only heaps without driver numbers use it: with VK_EXT_memory_budget, skip wgpu's
        // report (it lists every allocation) on this once-a-frame path.
        if !self.estimated {
            return None;
        }
        let report = self.device.generate_allocator_report()?;
        let mut v = vec![0; self.heaps.max(self.heap + 1)];
        v[self.heap] = report.total_reserved_bytes;
        Some(v)
    }
}

/// What [`SharedDevice::budget`] reports.
#[derive(Clone, Debug)]
pub struct Budget {
    /// The adapter's name.
    pub device: String,
    /// Every heap: budget, usage, understory's bytes, foreign bytes.
    pub heaps: Vec<HeapReport>,
    /// The device-local heap vegetation lives in.
    pub device_local_heap: usize,
    /// Bytes wgpu's allocator holds (blocks reserved; `None` where wgpu gives no report).
    pub wgpu_reserved: Option<u64>,
    /// Bytes wgpu's live allocations take inside those blocks.
    pub wgpu_allocated: Option<u64>,
    /// Bytes of memory blocks understory holds, pending frees included.
    pub understory_held: u64,
}

impl Budget {
    /// The device-local heap's report.
    pub fn heap(&self) -> Option<&HeapReport> {
        self.heaps.get(self.device_local_heap)
    }
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const MIB: f64 = (1u64 << 20) as f64;
        let mib = |b: u64| b as f64 / MIB;
        match self.heap() {
            Some(h) => write!(
                f,
                "{}: heap {} budget {:.1} MiB ({}), usage {:.1} MiB, foreign {:.1} MiB",
                self.device,
                self.device_local_heap,
                mib(h.budget.budget),
                h.budget.source,
                mib(h.budget.usage),
                mib(h.foreign)
            )?,
            None => write!(f, "{}: no device-local heap", self.device)?,
        }
        write!(
            f,
            "; wgpu holds {}, understory holds {:.1} MiB",
            match (self.wgpu_reserved, self.wgpu_allocated) {
                (Some(r), Some(a)) => format!("{:.1} MiB ({:.1} MiB allocated)", mib(r), mib(a)),
                _ => "? (no allocator report)".into(),
            },
            mib(self.understory_held)
        )
    }
}

/// The process's one Vulkan and wgpu instance: every [`SharedDevice`] uses it, so that wgpu
/// resources of one shared device given to another are wgpu validation errors (one registry),
/// not lookups in another instance's registry. Made by the first [`SharedDevice::new`] and
/// never destroyed (a program creates its instance once; NVIDIA's driver leaks static TLS
/// each time the loader unloads it).
struct ProcessInstance {
    entry: ash::Entry,
    instance: ash::Instance,
    api_version: u32,
    validation: bool,
    /// The validation settings it was made with.
    settings: (bool, bool, bool),
    canary: Arc<Canary>,
    wgpu: wgpu::Instance,
}

static PROCESS_INSTANCE: Mutex<Option<Arc<ProcessInstance>>> = Mutex::new(None);

impl ProcessInstance {
    fn get(options: &ContextOptions) -> Result<Arc<Self>> {
        let io = &options.instance;
        let settings = (
            io.validation != Validation::Off,
            io.sync_validation,
            io.gpu_assisted,
        );
        let mut slot = PROCESS_INSTANCE.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = slot.as_ref() {
            if p.settings != settings {
                return Err(Error::InvalidInput(format!(
                    "this process's instance was made with (validation, sync, gpu-assisted) = {:?}; every SharedDevice shares it, and {settings:?} differs",
                    p.settings
                )));
            }
            return Ok(p.clone());
        }
        let canary = Canary::new();
        let raw = create_instance(options, &canary)?;
        let RawInstance {
            entry,
            instance,
            api_version,
            extensions,
            messenger,
            flags,
        } = raw;
        let validation = messenger.is_some();
        // The callback holds the loader too: wgpu-hal may drop its own `Entry` (and with the
        // last one, libvulkan) before it calls the callback.
        let (ash_instance, keep_canary, keep_entry) =
            (instance.clone(), canary.clone(), entry.clone());
        let drop_instance: wgpu_hal::DropCallback = Box::new(move || {
            // SAFETY: wgpu calls this once, after its last use of the instance (every adapter,
            // device and surface of it is gone); the messenger is ours and goes first.
            unsafe {
                if let Some((loader, m)) = messenger {
                    loader.destroy_debug_utils_messenger(m, None);
                }
                ash_instance.destroy_instance(None);
            }
            drop(keep_canary);
            drop(keep_entry);
        });
        // SAFETY: the instance was created from `entry` with `api_version`, `extensions` (a
        // superset of wgpu-hal's desired extensions for `flags`) and, with validation, the
        // layer `flags` says; the drop callback destroys it once wgpu is done with it.
        let hal_instance = unsafe {
            wgpu_hal::vulkan::Instance::from_raw(
                entry.clone(),
                instance.clone(),
                api_version,
                0,
                None,
                extensions,
                flags,
                wgpu::MemoryBudgetThresholds::default(),
                false,
                Some(drop_instance),
            )
        }
        .map_err(|e| wgpu_err("Instance::from_raw", e))?;
        // SAFETY: a Vulkan hal instance, given up to wgpu.
        let wgpu = unsafe { wgpu::Instance::from_hal::<Vulkan>(hal_instance) };
        let p = Arc::new(Self {
            entry,
            instance,
            api_version,
            validation,
            settings,
            canary,
            wgpu,
        });
        *slot = Some(p.clone());
        Ok(p)
    }
}

impl SharedDevice {
    /// Creates the shared device (see the crate docs), on the process's one instance: the
    /// first call makes it with `desc.context.instance`'s validation settings, and later calls
    /// must ask for the same ([`Error::InvalidInput`] otherwise). Validation messages are
    /// counted per instance, so [`SharedDevice::messages`] counts every shared device's.
    pub fn new(desc: &SharedDeviceDesc) -> Result<Self> {
        let process = ProcessInstance::get(&desc.context)?;
        let ProcessInstance {
            ref entry,
            ref instance,
            api_version,
            validation,
            ref canary,
            wgpu: ref wgpu_instance,
            ..
        } = *process;
        let (entry, instance, canary, wgpu_instance) = (
            entry.clone(),
            instance.clone(),
            canary.clone(),
            wgpu_instance.clone(),
        );
        let adapters = block_on(wgpu_instance.enumerate_adapters(wgpu::Backends::VULKAN));
        let req = DeviceRequirements::for_capabilities(Capabilities::ALL);
        let mut candidates = Vec::new();
        let mut rejected = Vec::new();
        for a in adapters {
            // SAFETY: only the physical device handle is read.
            let pd = match unsafe { a.as_hal::<Vulkan>() } {
                Some(h) => h.raw_physical_device(),
                None => continue,
            };
            // SAFETY: pd belongs to the live instance (>= 1.3).
            let ours = unsafe { Adapter::query(&instance, 0, pd) }?;
            if let Some(name) = &desc.adapter_name {
                if !ours
                    .name
                    .to_ascii_lowercase()
                    .contains(&name.to_ascii_lowercase())
                {
                    continue;
                }
            }
            // SAFETY: as above.
            let missing = unsafe { req.unsupported_by(&instance, pd) }?;
            let family = ours
                .queue_families
                .iter()
                .position(|f| f.contains(vk::QueueFlags::GRAPHICS | vk::QueueFlags::COMPUTE));
            match family {
                Some(fam) if missing.is_empty() => candidates.push((a, ours, pd, fam as u32)),
                _ => rejected.push(format!("{} (missing {missing:?})", ours.name)),
            }
        }
        let rank = |t: DeviceType| match t {
            DeviceType::Discrete => 0,
            DeviceType::Integrated => 1,
            DeviceType::Virtual => 2,
            DeviceType::Cpu => 3,
            _ => 4,
        };
        candidates.sort_by_key(|c| rank(c.1.device_type));
        let Some((wgpu_adapter, ours, pd, family)) = candidates.into_iter().next() else {
            return Err(Error::NoDevice {
                detail: format!(
                    "no Vulkan adapter wgpu exposes has what understory needs{}: {}",
                    desc.adapter_name
                        .as_ref()
                        .map(|n| format!(" (named like {n:?})"))
                        .unwrap_or_default(),
                    rejected.join("; ")
                ),
            });
        };
        let plan = req.plan(&ours);
        let mut enabled = plan.enabled;
        enabled.memory_priority = ours.supported.memory_priority && ours.memory_priority_feature;
        enabled.pageable_device_local_memory = enabled.memory_priority
            && ours.supported.pageable_device_local_memory
            && ours.pageable_feature;
        let features = desc.features;
        let limits = desc.limits.clone();
        // Refused here, before vkCreateDevice: wgpu would grant features and limits the adapter
        // lacks when the device comes from raw handles.
        if !wgpu_adapter.features().contains(features) {
            return Err(Error::Unsupported(format!(
                "{}: wgpu features {:?} are not supported",
                ours.name,
                features - wgpu_adapter.features()
            )));
        }
        let mut over = Vec::new();
        limits.check_limits_with_fail_fn(&wgpu_adapter.limits(), false, |name, want, have| {
            over.push(format!("{name} {want} (the adapter allows {have})"));
        });
        if !over.is_empty() {
            return Err(Error::Unsupported(format!(
                "{}: wgpu limits beyond the adapter: {}",
                ours.name,
                over.join(", ")
            )));
        }
        let (raw_device, device_extensions, open) = {
            // SAFETY: the hal adapter is read while the wgpu adapter lives.
            let hal = unsafe { wgpu_adapter.as_hal::<Vulkan>() }
                .ok_or_else(|| Error::Unsupported("wgpu adapter is not Vulkan".into()))?;
            let mut exts = hal.required_device_extensions(features);
            for e in enabled.extension_names() {
                if !exts.contains(&e) {
                    exts.push(e);
                }
            }
            let mut phd = hal.physical_device_features(&exts, features);
            let mut core = phd.get_core();
            let mut v12 = vk::PhysicalDeviceVulkan12Features::default();
            let mut v13 = vk::PhysicalDeviceVulkan13Features::default();
            plan.features.enable(&mut core, &mut v12, &mut v13);
            let mut dynamic = vk::PhysicalDeviceDynamicRenderingFeatures::default()
                .dynamic_rendering(v13.dynamic_rendering == vk::TRUE);
            let mut prio =
                vk::PhysicalDeviceMemoryPriorityFeaturesEXT::default().memory_priority(true);
            let mut page = vk::PhysicalDevicePageableDeviceLocalMemoryFeaturesEXT::default()
                .pageable_device_local_memory(true);
            let names: Vec<_> = exts.iter().map(|e| e.as_ptr()).collect();
            let priorities = [1.0f32];
            let queues = [vk::DeviceQueueCreateInfo::default()
                .queue_family_index(family)
                .queue_priorities(&priorities)];
            let info = vk::DeviceCreateInfo::default()
                .queue_create_infos(&queues)
                .enabled_extension_names(&names);
            // wgpu's feature structs (timeline semaphores among them), then understory's:
            // dynamic rendering (wgpu chains no Vulkan 1.3 struct), memory priority and paging,
            // and the core features on top of wgpu's.
            let mut info = phd.add_to_device_create(info).push_next(&mut dynamic);
            if enabled.memory_priority {
                info = info.push_next(&mut prio);
            }
            if enabled.pageable_device_local_memory {
                info = info.push_next(&mut page);
            }
            let info = info.enabled_features(&core);
            // SAFETY: every extension is supported (wgpu-hal's list is filtered to what the
            // device supports; understory's was checked by `unsupported_by`), every feature
            // chained is supported, and no feature struct appears twice.
            let device = unsafe { instance.create_device(pd, &info, None) }
                .map_err(vk_fail("vkCreateDevice"))?;
            // SAFETY: created from this adapter with `exts` (a superset of wgpu's required
            // extensions for `features`) and `physical_device_features(exts, features)`, on
            // `family`; wgpu-hal takes ownership (no drop callback).
            let open = unsafe {
                hal.device_from_raw(
                    device.clone(),
                    None,
                    &exts,
                    features,
                    &limits,
                    &wgpu::MemoryHints::default(),
                    family,
                    0,
                )
            };
            match open {
                Ok(o) => (device, exts, o),
                Err(e) => {
                    // SAFETY: wgpu did not take the device; nothing was created from it.
                    unsafe { device.destroy_device(None) };
                    return Err(wgpu_err("device_from_raw", e));
                }
            }
        };
        log::debug!("shared device extensions: {device_extensions:?}");
        // SAFETY: the hal device was opened from this adapter with exactly these features.
        let (device, queue) = unsafe {
            wgpu_adapter.create_device_from_hal::<Vulkan>(
                open,
                &wgpu::DeviceDescriptor {
                    label: Some("understory-wgpu shared device"),
                    required_features: features,
                    required_limits: limits,
                    ..Default::default()
                },
            )
        }
        .map_err(|e| wgpu_err("create_device_from_hal", e))?;
        let wgpu_errors = Arc::new(Mutex::new(WgpuErrors::default()));
        let sink = wgpu_errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
            s.count += 1;
            if s.texts.len() < 64 {
                s.texts.push(e.to_string());
            }
            log::error!("wgpu: {e}");
        }));
        // SAFETY: family/index 0 were created above.
        let raw_queue = unsafe { raw_device.get_device_queue(family, 0) };
        let mut options = desc.context.clone();
        options.host_submits_only = true;
        // SAFETY: the instance and device were created above as the handles say (the
        // extensions and features of `enabled` are enabled, the instance is 1.3 with debug
        // utils when validating); understory never submits (host_submits_only), and wgpu is
        // the only other submitter, so the queue needs no lock of ours; every frame is
        // submitted by `SharedDevice::submit` to this queue; the instance and the device live
        // until the wgpu device is gone, which the context keeps alive (below) as long as
        // anything made through it lives.
        let ctx = unsafe {
            Context::from_raw(
                HostHandles {
                    entry,
                    instance: instance.clone(),
                    instance_api_version: api_version,
                    debug_utils_enabled: validation,
                    physical_device: pd,
                    device: raw_device,
                    queue_family_index: family,
                    queue: raw_queue,
                    enabled,
                    capabilities: Capabilities::ALL,
                },
                &options,
            )
        }?;
        ctx.keep_alive(Arc::new(device.clone()));
        let device_local_heap = ctx.memory().device_local_heap();
        let source = WgpuBudget {
            driver: ctx.budget_source(),
            device: device.clone(),
            heap: device_local_heap,
            heaps: 0,
            estimated: true,
        };
        ctx.memory()
            .set_budget_source(HeapBudgets::new(Box::new(source)))?;
        let color_formats = {
            // SAFETY: format mapping only.
            let hal = unsafe { wgpu_adapter.as_hal::<Vulkan>() }
                .ok_or_else(|| Error::Unsupported("wgpu adapter is not Vulkan".into()))?;
            FormatMap(
                COLOR_FORMATS
                    .iter()
                    .chain(DEPTH_FORMATS.iter())
                    .map(|f| (*f, hal.texture_format_as_raw(*f)))
                    .collect(),
            )
        };
        log::info!(
            "shared device: {} (wgpu {WGPU_VERSION}, queue family {family}), validation {}",
            ours.name,
            if validation { "on" } else { "off" }
        );
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Ok(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            ctx: Some(ctx),
            in_flight: Mutex::new(InFlight::default()),
            limbo: Limbo::default(),
            done: Arc::new(AtomicU64::new(0)),
            wgpu_errors,
            canary,
            device_local_heap,
            color_formats,
            queue,
            device,
            adapter: wgpu_adapter,
            instance: wgpu_instance,
        })
    }

    fn ctx(&self) -> &Context {
        // Infallible: `ctx` is only taken by `shutdown`, which consumes `self`.
        self.ctx.as_ref().unwrap_or_else(|| unreachable!())
    }

    /// understory's context on the shared device. Its own submissions are refused
    /// ([`ContextOptions::host_submits_only`]); record through [`WgpuFrame::record`].
    ///
    /// [`ContextOptions::host_submits_only`]: understory::gpu::context::ContextOptions::host_submits_only
    pub fn context(&self) -> &Context {
        self.ctx()
    }

    /// The wgpu device (clone it freely: it stays valid after understory is gone).
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The wgpu queue: submit frames through [`SharedDevice::submit`]; other work as usual.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// The wgpu adapter.
    pub fn adapter(&self) -> &wgpu::Adapter {
        &self.adapter
    }

    /// The wgpu instance.
    pub fn instance(&self) -> &wgpu::Instance {
        &self.instance
    }

    /// Validation messages so far: the Khronos layer's (wgpu's and understory's Vulkan calls)
    /// and wgpu's own validation errors.
    pub fn messages(&self) -> Messages {
        self.message_log().read()
    }

    /// A handle to the same counts that outlives the shared device: read it after
    /// [`SharedDevice::shutdown`] and after the app dropped its wgpu handles, to see teardown
    /// messages too.
    pub fn message_log(&self) -> MessageLog {
        MessageLog {
            canary: self.canary.clone(),
            wgpu: self.wgpu_errors.clone(),
        }
    }

    /// The real heap budgets now (the driver's, or the labelled estimate with wgpu's bytes
    /// declared), and what wgpu and understory each hold.
    pub fn budget(&self) -> Result<Budget> {
        let ctx = self.ctx();
        let heaps = ctx.memory().refresh_budget()?;
        let report = self.device.generate_allocator_report();
        let stats = ctx.memory().stats();
        Ok(Budget {
            device: ctx.adapter().name.clone(),
            heaps,
            device_local_heap: self.device_local_heap,
            wgpu_reserved: report.as_ref().map(|r| r.total_reserved_bytes),
            wgpu_allocated: report.as_ref().map(|r| r.total_allocated_bytes),
            understory_held: stats.categories.iter().map(|(_, c)| c.reserved_bytes).sum(),
        })
    }

    /// A command buffer in which wgpu moves these resources into these states, validated by
    /// wgpu now (a resource of another device, say, is [`Error::InvalidInput`]).
    fn transitions(
        &self,
        buffers: &[(&wgpu::Buffer, wgpu::BufferUses)],
        textures: &[(&wgpu::Texture, wgpu::TextureUses)],
    ) -> Result<wgpu::CommandBuffer> {
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("understory: transitions"),
            });
        enc.transition_resources(
            buffers
                .iter()
                .map(|(buffer, state)| wgpu::BufferTransition {
                    buffer: *buffer,
                    state: *state,
                }),
            textures
                .iter()
                .map(|(texture, state)| wgpu::TextureTransition {
                    texture: *texture,
                    selector: None,
                    state: *state,
                }),
        );
        let cb = enc.finish();
        match block_on(scope.pop()) {
            None => Ok(cb),
            Some(e) => Err(Error::InvalidInput(format!(
                "wgpu refused the resources (of another device?): {e}"
            ))),
        }
    }

    /// Reports to the context every frame wgpu has finished, and releases what they kept.
    fn pump(&self, fl: &mut InFlight) -> Result<()> {
        let done = self.done.load(Ordering::Acquire);
        if done > fl.reported {
            // SAFETY: `done` is only raised by `on_submitted_work_done` callbacks registered
            // after the submission carrying that frame: wgpu calls them once that submission
            // (or a later one on the same queue) has completed on the GPU.
            unsafe { self.ctx().frames_completed(done) }?;
            fl.reported = done;
        }
        while fl.frames.front().is_some_and(|(v, _, _)| *v <= fl.reported) {
            fl.frames.pop_front();
        }
        Ok(())
    }

    /// Waits (wgpu's `PollType::Wait` on that frame's own submission, never the whole device)
    /// until frame `value` is done, then reports it.
    fn wait_for(&self, fl: &mut InFlight, value: u64, timeout: Duration) -> Result<()> {
        if value <= fl.reported {
            return Ok(());
        }
        let Some((found, index, _)) = fl.frames.iter().find(|(v, _, _)| *v >= value) else {
            return Ok(());
        };
        let (value, index) = (*found, index.clone());
        let started = std::time::Instant::now();
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(index),
                timeout: Some(timeout),
            })
            .map_err(|e| match e {
                wgpu::PollError::Timeout => Error::Timeout {
                    what: format!("wgpu submission of frame {value}"),
                    waited_ms: started.elapsed().as_millis() as u64,
                },
                other => wgpu_err("poll", other),
            })?;
        // That submission carried the frame (and every earlier one): it is done, whatever
        // later submission the callback waits for.
        self.done.fetch_max(value, Ordering::AcqRel);
        self.pump(fl)
    }

    /// Opens the next frame. Reports finished frames to understory first (so their frees
    /// run), and waits for wgpu to finish the frame `frames_in_flight` back.
    pub fn begin_frame(&self) -> Result<WgpuFrame<'_>> {
        let ctx = self.ctx();
        self.announce_limbo()?;
        {
            let mut fl = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            // Callbacks run inside wgpu's maintenance: a non-blocking poll runs them.
            let _ = self.device.poll(wgpu::PollType::Poll);
            self.pump(&mut fl)?;
            let next = ctx.last_submitted() + 1;
            let must = next.saturating_sub(u64::from(ctx.frames_in_flight()));
            if must > fl.reported {
                self.wait_for(&mut fl, must, WAIT_TIMEOUT)?;
            }
        }
        let frame = ctx.begin_frame()?;
        let raw = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("understory: frame"),
            });
        Ok(WgpuFrame {
            shared: self,
            frame: Some(frame),
            prep: Vec::new(),
            raw: Some(raw),
            keep: Vec::new(),
            poisoned: None,
            resumed: false,
        })
    }

    /// Opens the frame of a [`HostFrame`] again, to record more of it into new command buffers
    /// (the next part, e.g. the draws after [`Forest::cull`]), which a later
    /// [`SharedDevice::finish`] returns with a new `HostFrame`. The command buffers the host
    /// already has from the earlier `finish` stay part of the frame: they must be submitted
    /// before the new ones (queue order) and before the new `HostFrame` is announced.
    ///
    /// A resumed frame cannot be given to [`SharedDevice::submit`] (understory would announce
    /// it before the host submitted the earlier part): [`Error::Lifecycle`]. Dropped, refused
    /// or failed, it is announced at the next [`SharedDevice::begin_frame`] as submitted by
    /// then, as a dropped `HostFrame` is.
    pub fn resume(&self, mut host: HostFrame) -> Result<WgpuFrame<'_>> {
        if host.device_id != self.id {
            return Err(Error::Lifecycle(
                "SharedDevice::resume: a frame of another shared device".into(),
            ));
        }
        let Some((frame, keep)) = host.frame.take() else {
            return Err(Error::Lifecycle("HostFrame already announced".into()));
        };
        let raw = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("understory: frame (resumed)"),
            });
        Ok(WgpuFrame {
            shared: self,
            frame: Some(frame),
            prep: Vec::new(),
            raw: Some(raw),
            keep,
            poisoned: None,
            resumed: true,
        })
    }

    /// The frame's command buffers (transitions, then understory's), checked: a frame of
    /// another device, one whose recording failed, or one whose targets were destroyed is an
    /// error (the frame is dropped and its command buffers discarded).
    fn finish_frame(
        &self,
        mut frame: WgpuFrame<'_>,
    ) -> Result<(Frame, Vec<wgpu::CommandBuffer>, Vec<Keep>)> {
        if !std::ptr::eq(frame.shared, self) {
            return Err(Error::Lifecycle(
                "SharedDevice::submit: a frame of another shared device".into(),
            ));
        }
        // On every error below, dropping `frame` drops it (or, resumed, sends it to limbo).
        if let Some(e) = &frame.poisoned {
            return Err(Error::Lifecycle(format!(
                "the frame's recording failed, so it was not submitted: {e}"
            )));
        }
        let keep = &frame.keep;
        // A texture or buffer the raw commands use, destroyed since they were recorded, made
        // the command buffer invalid: it is discarded (never ended, never submitted).
        // SAFETY (each `as_hal`): only whether the hal object still exists is read, one guard
        // at a time.
        let destroyed = keep.iter().any(|k| match k {
            Keep::Texture(t) => unsafe { t.as_hal::<Vulkan>() }.is_none(),
            Keep::View(v) => unsafe { v.as_hal::<Vulkan>() }.is_none(),
            Keep::Buffer(b) => unsafe { b.as_hal::<Vulkan>() }.is_none(),
        });
        if destroyed {
            return Err(Error::InvalidInput(
                "a target or buffer of the frame was destroyed before submit: the frame was dropped (nothing of it ran)".into(),
            ));
        }
        let (Some(f), Some(raw)) = (frame.frame.take(), frame.raw.take()) else {
            return Err(Error::Lifecycle("the frame was finished already".into()));
        };
        let mut cmds = std::mem::take(&mut frame.prep);
        cmds.push(raw.finish());
        Ok((f, cmds, std::mem::take(&mut frame.keep)))
    }

    /// Announces a submitted frame: completion comes from wgpu's callback on the latest
    /// submission, which is `index` or later.
    ///
    /// # Safety
    /// Every command buffer of `frame` was submitted to the shared queue (or dropped
    /// unsubmitted) at or before the submission `index`.
    unsafe fn announce(
        &self,
        fl: &mut InFlight,
        frame: Frame,
        index: wgpu::SubmissionIndex,
        keep: Vec<Keep>,
    ) -> Result<()> {
        let value = frame.value();
        let done = self.done.clone();
        // Registered after the submit: wgpu calls it once the latest submission (ours, or a
        // later one from another thread) has completed.
        self.queue.on_submitted_work_done(move || {
            done.fetch_max(value, Ordering::AcqRel);
        });
        // SAFETY: every command recorded for `frame` was submitted to the context's queue at
        // or before `index` (the caller's promise; wgpu's queue is that VkQueue; understory
        // never submits, so no lock is needed); completion is reported only by `pump`, from
        // the callback above, or after waiting on `index`.
        unsafe { self.ctx().frame_submitted(frame, FrameSignal::HostReported) }
            .map_err(Error::from)?;
        fl.frames.push_back((value, index, keep));
        Ok(())
    }

    /// Submits the frame to wgpu's queue, between the app's command buffers (`before`: e.g. a
    /// pass that clears the targets; `after`: e.g. a readback), in one `Queue::submit`, and
    /// announces it to understory. Returns wgpu's submission index.
    ///
    /// A frame whose recording failed is not submitted: its error comes back, the app's
    /// command buffers are dropped unsubmitted, and the frame is dropped. So is a frame wgpu
    /// refuses (it validates every command buffer before it submits any: nothing ran).
    pub fn submit(
        &self,
        frame: WgpuFrame<'_>,
        before: impl IntoIterator<Item = wgpu::CommandBuffer>,
        after: impl IntoIterator<Item = wgpu::CommandBuffer>,
    ) -> Result<wgpu::SubmissionIndex> {
        if frame.resumed {
            // Dropped here: announced at the next begin_frame, after the host's submit.
            return Err(Error::Lifecycle(
                "SharedDevice::submit: a resumed frame's earlier part is the host's to submit: finish it instead".into(),
            ));
        }
        let (frame, ours, keep) = self.finish_frame(frame)?;
        let mut fl = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let cmds: Vec<wgpu::CommandBuffer> = before.into_iter().chain(ours).chain(after).collect();
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let index = self.queue.submit(cmds);
        if let Some(e) = block_on(scope.pop()) {
            drop((frame, keep));
            return Err(Error::InvalidInput(format!(
                "wgpu refused the frame's submission (nothing of it ran; the frame was dropped): {e}"
            )));
        }
        // SAFETY: the frame's command buffers are in submission `index`.
        unsafe { self.announce(&mut fl, frame, index.clone(), keep) }?;
        Ok(index)
    }

    /// For a host that submits itself (Bevy's renderer submits every command buffer of a
    /// frame at once): the frame's command buffers, in order (wgpu transitions, then
    /// understory's), to put in the host's submission after the commands that drew the
    /// targets, and the frame to hand to [`SharedDevice::host_submitted`] once submitted.
    /// The frame stays open until then: no next frame begins.
    ///
    /// # Safety
    /// Each returned command buffer is passed to `Queue::submit` of this device's queue, or
    /// dropped, before the returned [`HostFrame`] is handed to
    /// [`SharedDevice::host_submitted`] or dropped (either announces the frame as submitted;
    /// completion is then taken from a submission made after that moment). After
    /// [`SharedDevice::resume`], the same holds for the `HostFrame` a later `finish` of the
    /// frame returns (or the resumed frame's drop), and the earlier part's command buffers are
    /// submitted before the later part's.
    pub unsafe fn finish(
        &self,
        frame: WgpuFrame<'_>,
    ) -> Result<(Vec<wgpu::CommandBuffer>, HostFrame)> {
        let (frame, cmds, keep) = self.finish_frame(frame)?;
        Ok((
            cmds,
            HostFrame {
                device_id: self.id,
                frame: Some((frame, keep)),
                limbo: self.limbo.clone(),
            },
        ))
    }

    /// Announces a frame of [`SharedDevice::finish`] after the host's `Queue::submit`.
    /// Returns the index of an empty submission made here, after the host's (waiting on it
    /// waits for the frame). If wgpu refused the host's submission, nothing of it ran, which
    /// is safe, but the frame counts as run and its uploads are lost: watch the host's wgpu
    /// errors.
    pub fn host_submitted(&self, mut frame: HostFrame) -> Result<wgpu::SubmissionIndex> {
        if frame.device_id != self.id {
            return Err(Error::Lifecycle(
                "SharedDevice::host_submitted: a frame of another shared device".into(),
            ));
        }
        let Some((frame, keep)) = frame.frame.take() else {
            return Err(Error::Lifecycle("HostFrame already announced".into()));
        };
        let mut fl = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        // An empty submission: queue order puts it after the host's, so its completion (and
        // the callback's) means the frame's.
        let index = self.queue.submit(std::iter::empty());
        // SAFETY: `finish`'s contract: the frame's command buffers were submitted (or
        // dropped) before the HostFrame came back here.
        unsafe { self.announce(&mut fl, frame, index.clone(), keep) }?;
        Ok(index)
    }

    /// Announces [`HostFrame`]s dropped without [`SharedDevice::host_submitted`], as if
    /// submitted when dropped (`finish`'s contract).
    fn announce_limbo(&self) -> Result<()> {
        let dropped: Vec<_> =
            std::mem::take(&mut *self.limbo.lock().unwrap_or_else(|p| p.into_inner()));
        for (frame, keep) in dropped {
            let mut fl = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            let index = self.queue.submit(std::iter::empty());
            // SAFETY: `finish`'s contract: its command buffers were submitted (or dropped)
            // before the HostFrame was dropped.
            unsafe { self.announce(&mut fl, frame, index, keep) }?;
        }
        Ok(())
    }

    /// Waits for the last frame (on its wgpu submission, at most [`WAIT_TIMEOUT`]), drains
    /// understory's frees and reports what is still alive (drop every [`Forest`] and
    /// understory object first: a clean shutdown has no leaks). The wgpu device, queue and
    /// adapter stay usable through the clones the app holds.
    pub fn shutdown(mut self) -> Result<ShutdownReport> {
        self.announce_limbo()?;
        {
            let mut fl = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            let last = self.ctx().last_submitted();
            self.wait_for(&mut fl, last, WAIT_TIMEOUT)?;
        }
        let ctx = self
            .ctx
            .take()
            .ok_or_else(|| Error::Lifecycle("shut down twice".into()))?;
        ctx.shutdown()
    }
}

impl Drop for SharedDevice {
    fn drop(&mut self) {
        // Without shutdown: wait for what is in flight so that the context frees instead of
        // leaking (a timeout leaks, never frees in use).
        if self.ctx.is_some() {
            if let Err(e) = self.announce_limbo() {
                log::error!("SharedDevice dropped: a dropped HostFrame: {e}");
            }
            let mut fl = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            let last = self.ctx().last_submitted();
            if let Err(e) = self.wait_for(&mut fl, last, WAIT_TIMEOUT) {
                log::error!("SharedDevice dropped while frames were in flight: {e}");
            }
        }
    }
}

impl std::fmt::Debug for SharedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedDevice")
            .field(
                "device",
                &self.ctx.as_ref().map(|c| c.adapter().name.clone()),
            )
            .finish_non_exhaustive()
    }
}

/// A frame whose command buffers the host submits ([`SharedDevice::finish`]); hand it to
/// [`SharedDevice::host_submitted`] after the submit. Dropped instead, it is announced at the
/// next [`SharedDevice::begin_frame`] (or shutdown) as submitted when dropped.
pub struct HostFrame {
    device_id: u64,
    frame: Option<(Frame, Vec<Keep>)>,
    limbo: Limbo,
}

/// Frames of [`HostFrame`]s dropped without [`SharedDevice::host_submitted`].
type Limbo = Arc<Mutex<Vec<(Frame, Vec<Keep>)>>>;

impl Drop for HostFrame {
    fn drop(&mut self) {
        // Announced at the next begin_frame (or shutdown), as submitted by now.
        if let Some(f) = self.frame.take() {
            self.limbo.lock().unwrap_or_else(|p| p.into_inner()).push(f);
        }
    }
}

impl std::fmt::Debug for HostFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostFrame")
            .field("value", &self.frame.as_ref().map(|(f, _)| f.value()))
            .finish_non_exhaustive()
    }
}

/// Raw Vulkan handles of a colour and a depth target for one frame, in the layouts
/// understory draws in: `COLOR_ATTACHMENT_OPTIMAL` and `DEPTH_STENCIL_ATTACHMENT_OPTIMAL`
/// (wgpu's `COLOR_TARGET` and `DEPTH_STENCIL_WRITE`).
#[derive(Clone, Copy, Debug)]
pub struct RawTargets {
    /// Colour image, view and Vulkan format.
    pub color: (vk::Image, vk::ImageView, vk::Format),
    /// Depth image, view and Vulkan format.
    pub depth: (vk::Image, vk::ImageView, vk::Format),
    /// Their size.
    pub extent: vk::Extent2D,
}

/// One frame of the shared device: understory's frame, and the wgpu encoders its commands go
/// into. Submit it with [`SharedDevice::submit`]; dropped instead, nothing of it reaches the
/// GPU (a resumed frame, [`SharedDevice::resume`], is announced instead: part of it is the
/// host's).
pub struct WgpuFrame<'d> {
    shared: &'d SharedDevice,
    /// `Some` from `begin_frame` or `resume` until `finish_frame` (which consumes the frame)
    /// or `drop` takes it.
    frame: Option<Frame>,
    /// Transition command buffers, each validated by wgpu when made.
    prep: Vec<wgpu::CommandBuffer>,
    /// `Some` as `frame`.
    raw: Option<wgpu::CommandEncoder>,
    keep: Vec<Keep>,
    poisoned: Option<String>,
    /// An earlier part went to the host ([`SharedDevice::resume`]).
    resumed: bool,
}

impl Drop for WgpuFrame<'_> {
    fn drop(&mut self) {
        if !self.resumed {
            return; // the frame is dropped: nothing of it was given out
        }
        // Its earlier part is the host's: announced at the next begin_frame (or shutdown), as
        // submitted by then (`finish`'s contract), like a dropped HostFrame.
        if let Some(f) = self.frame.take() {
            let keep = std::mem::take(&mut self.keep);
            self.shared
                .limbo
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((f, keep));
        }
    }
}

impl std::fmt::Debug for WgpuFrame<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuFrame")
            .field("value", &self.frame.as_ref().map(Frame::value))
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl WgpuFrame<'_> {
    /// understory's frame.
    pub fn frame(&self) -> &Frame {
        // Only `finish_frame` (which consumes `self`) and `drop` take it.
        self.frame
            .as_ref()
            .expect("a WgpuFrame holds its frame until it is finished or dropped")
    }

    /// Takes a colour and a depth texture of the app's for this frame: checks them, has wgpu
    /// move them into the attachment states before understory's commands (in the frame's
    /// transition encoder), holds them until the GPU is done with the frame, and returns
    /// their raw handles.
    pub fn targets(&mut self, color: &wgpu::Texture, depth: &wgpu::Texture) -> Result<RawTargets> {
        let check = |t: &wgpu::Texture, what: &str, formats: &[wgpu::TextureFormat]| {
            if t.dimension() != wgpu::TextureDimension::D2
                || t.depth_or_array_layers() != 1
                || t.sample_count() != 1
            {
                return Err(Error::InvalidInput(format!(
                    "{what} target: a 2D texture of one layer and one sample, not {:?} × {} layers × {} samples",
                    t.dimension(),
                    t.depth_or_array_layers(),
                    t.sample_count()
                )));
            }
            if !t.usage().contains(wgpu::TextureUsages::RENDER_ATTACHMENT) {
                return Err(Error::InvalidInput(format!(
                    "{what} target: needs TextureUsages::RENDER_ATTACHMENT (has {:?})",
                    t.usage()
                )));
            }
            if !formats.contains(&t.format()) {
                return Err(Error::InvalidInput(format!(
                    "{what} target: format {:?} (one of {formats:?})",
                    t.format()
                )));
            }
            Ok(())
        };
        check(color, "colour", &COLOR_FORMATS)?;
        check(depth, "depth", &DEPTH_FORMATS)?;
        if color.size() != depth.size() {
            return Err(Error::InvalidInput(format!(
                "colour target {:?} and depth target {:?} differ in size",
                color.size(),
                depth.size()
            )));
        }
        // A destroyed texture has no hal texture (checked before anything is recorded).
        let image_of = |t: &wgpu::Texture, what: &str| -> Result<vk::Image> {
            // SAFETY: only the handle is read, with no other guard held.
            unsafe { t.as_hal::<Vulkan>().map(|h| h.raw_handle()) }.ok_or_else(|| {
                Error::InvalidInput(format!(
                    "{what} target: destroyed (or not a Vulkan texture)"
                ))
            })
        };
        let ci = image_of(color, "colour")?;
        let di = image_of(depth, "depth")?;
        // wgpu moves them into the attachment states in a command buffer of their own, which
        // it validates now: a texture of another device is refused here, not at submit.
        let transitions = self.shared.transitions(
            &[],
            &[
                (color, wgpu::TextureUses::COLOR_TARGET),
                (depth, wgpu::TextureUses::DEPTH_STENCIL_WRITE),
            ],
        )?;
        let view_desc = wgpu::TextureViewDescriptor {
            label: Some("understory target view"),
            base_mip_level: 0,
            mip_level_count: Some(1),
            ..Default::default()
        };
        let cv = color.create_view(&view_desc);
        let dv = depth.create_view(&view_desc);
        let view_of = |v: &wgpu::TextureView| -> Result<vk::ImageView> {
            // SAFETY: only the handle is read, with no other guard held; the view is held
            // until the GPU is done with the frame (`keep`).
            unsafe { v.as_hal::<Vulkan>().map(|h| h.raw_handle()) }
                .ok_or_else(|| Error::InvalidInput("target destroyed".into()))
        };
        let cvk = view_of(&cv)?;
        let dvk = view_of(&dv)?;
        let formats = &self.shared.color_formats;
        let cf = formats
            .get(color.format())
            .ok_or_else(|| Error::InvalidInput(format!("format {:?}", color.format())))?;
        let df = formats
            .get(depth.format())
            .ok_or_else(|| Error::InvalidInput(format!("format {:?}", depth.format())))?;
        self.prep.push(transitions);
        self.keep.extend([
            Keep::Texture(color.clone()),
            Keep::Texture(depth.clone()),
            Keep::View(cv),
            Keep::View(dv),
        ]);
        Ok(RawTargets {
            color: (ci, cvk, cf),
            depth: (di, dvk, df),
            extent: vk::Extent2D {
                width: color.width(),
                height: color.height(),
            },
        })
    }

    /// Takes a wgpu buffer of the app's for this frame's raw commands to write with copies:
    /// wgpu moves it into the `COPY_DST` state in a transition command buffer submitted before
    /// the frame's (so wgpu's next use of it waits for transfer writes, and the submission is
    /// refused as a whole if the app destroys the buffer before it), and the buffer is held
    /// until the GPU is done with the frame. A destroyed buffer, or one of another device, is
    /// [`Error::InvalidInput`].
    pub fn copy_target(&mut self, buffer: &wgpu::Buffer) -> Result<()> {
        if !buffer.usage().contains(wgpu::BufferUsages::COPY_DST) {
            return Err(Error::InvalidInput(format!(
                "copy target: needs BufferUsages::COPY_DST (has {:?})",
                buffer.usage()
            )));
        }
        // SAFETY: only whether the hal buffer still exists is read.
        if unsafe { buffer.as_hal::<Vulkan>() }.is_none() {
            return Err(Error::InvalidInput(
                "copy target: destroyed (or not a Vulkan buffer)".into(),
            ));
        }
        let transitions = self
            .shared
            .transitions(&[(buffer, wgpu::BufferUses::COPY_DST)], &[])?;
        self.prep.push(transitions);
        self.keep.push(Keep::Buffer(buffer.clone()));
        Ok(())
    }

    /// Records raw Vulkan commands into the frame's command buffer (wgpu's, through
    /// `CommandEncoder::as_hal_mut`): understory's recording functions take the frame and the
    /// command buffer. If `record` fails, the frame is poisoned: [`SharedDevice::submit`]
    /// refuses it, and nothing of it reaches the GPU.
    ///
    /// # Safety
    /// - Everything recorded is valid Vulkan for a primary command buffer in the recording
    ///   state, of the shared device and queue family, and leaves it recording (no
    ///   `vkEndCommandBuffer`, no open rendering scope or query at return);
    /// - understory objects are recorded only through their functions taking this frame;
    /// - wgpu resources are used only as returned by [`WgpuFrame::targets`] (in those
    ///   layouts, which it must leave them in) or [`WgpuFrame::copy_target`] (written only by
    ///   transfer commands), with
    ///   the barriers their use needs against work before and after the frame (wgpu does not
    ///   see these commands; [`Forest::render`] shows the barriers);
    /// - no other object is destroyed while this frame may run on the GPU.
    pub unsafe fn record<R>(
        &mut self,
        record: impl FnOnce(&Frame, vk::CommandBuffer) -> Result<R>,
    ) -> Result<R> {
        if let Some(e) = &self.poisoned {
            return Err(Error::Lifecycle(format!(
                "the frame's recording already failed: {e}"
            )));
        }
        let (Some(frame), Some(raw)) = (&self.frame, &mut self.raw) else {
            return Err(Error::Lifecycle("the frame was finished already".into()));
        };
        // SAFETY: the raw encoder is used only through as_hal_mut (never the wgpu API, so
        // wgpu's "no mixing" rule holds); its command buffer is open and not ended here; the
        // caller vouches for what is recorded.
        let out = unsafe {
            raw.as_hal_mut::<Vulkan, _, _>(|enc| match enc {
                Some(enc) => {
                    let cmd = enc.raw_handle();
                    record(frame, cmd)
                }
                None => Err(Error::Unsupported(
                    "wgpu command encoder is not Vulkan".into(),
                )),
            })
        };
        if let Err(e) = &out {
            self.poisoned = Some(e.to_string());
        }
        out
    }
}

/// How to build a [`Forest`].
#[derive(Clone, Debug)]
pub struct ForestDesc {
    /// The vegetation world (LOD bands, cap, tiles).
    pub config: VegetationConfig,
    /// Colour format of the targets (one of [`COLOR_FORMATS`]).
    pub color_format: wgpu::TextureFormat,
    /// Depth format (one of [`DEPTH_FORMATS`]).
    pub depth_format: wgpu::TextureFormat,
    /// How the draws fit the app's frame: reversed depth (wgpu and Bevy's convention: clear
    /// depth to 0, `ForestView::view_proj` the app's reversed projection) and whether
    /// understory draws its ground. Default: depth 0 near, 1 far; ground drawn.
    pub draw: DrawOptions,
    /// Most entries per LOD list of the cull; the lists follow what is visible (adaptive), so
    /// this bounds them, it is not what they cost. 0 (the default): as many as the device
    /// allows, at most 16M.
    pub cull_capacity: u32,
}

impl Default for ForestDesc {
    fn default() -> Self {
        Self {
            config: VegetationConfig::default(),
            color_format: wgpu::TextureFormat::Rgba8Unorm,
            depth_format: wgpu::TextureFormat::Depth32Float,
            draw: DrawOptions::default(),
            cull_capacity: 0,
        }
    }
}

/// The camera for one frame.
#[derive(Clone, Copy, Debug)]
pub struct ForestView {
    /// Eye position.
    pub eye: Vec3,
    /// Projection × view, Vulkan clip space (y down; depth 0 near, 1 far, or reversed with
    /// [`ForestDesc::draw`]'s `reversed_depth`, where an infinite far plane is fine: the LOD
    /// bands end the view). A wgpu projection (y up) needs `Mat4::from_scale((1, -1, 1))`
    /// in front.
    pub view_proj: Mat4,
    /// Fog distance in metres.
    pub fog_m: f32,
}

/// The indirect arguments of the last frame's draws, as a wgpu buffer: per LOD (full, medium,
/// billboard) and phase, a `DrawIndexedIndirectArgs` (20 bytes; `instance_count` is what the
/// cull kept). Contents are undefined until the first frame completes.
#[derive(Debug)]
pub struct IndirectArgs {
    /// The buffer (`INDIRECT | COPY_SRC | COPY_DST | STORAGE`).
    pub buffer: wgpu::Buffer,
    /// Draws in it.
    pub draws: u32,
}

/// understory's vegetation on the shared device: the world, the GPU cull and the draw pass,
/// recorded into a [`WgpuFrame`] and drawn into the app's textures.
pub struct Forest {
    // Passes before the vegetation (they may hold its atlas page).
    draw: Option<DrawPass>,
    cull: CullPass,
    veg: Vegetation,
    args: IndirectArgs,
    args_raw: vk::Buffer,
    /// Host-readable copies of the indirect args, one per frame in flight and one more, with
    /// the frame each holds: what the GPU drew, read once that frame completed.
    counts: Vec<(understory::gpu::memory::Buffer, Option<u64>)>,
    drawn: Option<(u64, [u64; 3])>,
    /// Mesh sets: understory's conifer (set 0), then [`Forest::add_meshes`]'s.
    mesh_sets: Vec<TreeMeshes>,
    meshes: Meshes,
    /// Species drawn with another set than 0.
    species_meshes: Vec<(SpeciesId, u32)>,
    /// The frame last culled, and whether it was drawn.
    culled: Option<(FrameTag, bool)>,
    /// [`Forest::add_meshes`] changed the sets: the next cull builds the draw pass again.
    rebuild_draw: bool,
    /// The device's `maxStorageBufferRange` (mesh buffers must fit it).
    storage_range: u64,
    device_id: u64,
    color: vk::Format,
    depth: vk::Format,
    desc: ForestDesc,
}

impl std::fmt::Debug for Forest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forest")
            .field("vegetation", &self.veg)
            .finish_non_exhaustive()
    }
}

impl Forest {
    /// An empty forest. Register species and spawn patches through
    /// [`Forest::vegetation_mut`].
    pub fn new(shared: &SharedDevice, desc: &ForestDesc) -> Result<Self> {
        let ctx = shared.context();
        let color = shared
            .color_formats
            .get(desc.color_format)
            .filter(|_| COLOR_FORMATS.contains(&desc.color_format))
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "colour format {:?} (one of {COLOR_FORMATS:?})",
                    desc.color_format
                ))
            })?;
        let depth = shared
            .color_formats
            .get(desc.depth_format)
            .filter(|_| DEPTH_FORMATS.contains(&desc.depth_format))
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "depth format {:?} (one of {DEPTH_FORMATS:?})",
                    desc.depth_format
                ))
            })?;
        let veg = Vegetation::new(ctx, desc.config.clone())?;
        let meshes = Meshes::trees();
        let compaction = if ctx.adapter().subgroup_ballot_arithmetic_in_compute {
            Compaction::Subgroup
        } else {
            Compaction::Atomic
        };
        let max = CullPass::max_capacity(ctx, true).min(16 << 20);
        let capacity = if desc.cull_capacity == 0 {
            max
        } else {
            desc.cull_capacity.min(max)
        };
        let cull = CullPass::from_desc(
            ctx,
            &CullDesc {
                compaction,
                capacity,
                adaptive: true,
                meshes: meshes.lods(),
                records: true,
                max_sources_per_dispatch: WIDE_SOURCES_PER_DISPATCH,
                views: 1,
            },
        )?;
        let args_size = cull.args()?.size();
        let (args, args_raw) = wgpu_args_buffer(shared, args_size)?;
        let counts = (0..=ctx.frames_in_flight())
            .map(|i| {
                ctx.create_buffer(&understory::gpu::memory::BufferDesc {
                    name: &format!("forest drawn counts {i}"),
                    size: args_size,
                    usage: vk::BufferUsageFlags::TRANSFER_DST,
                    location: understory::gpu::memory::MemoryLocation::GpuToCpu,
                    category: understory::policy::category::Category::Outputs,
                })
                .map(|b| (b, None))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            draw: None,
            cull,
            veg,
            args: IndirectArgs {
                buffer: args,
                draws: (args_size / 20) as u32,
            },
            args_raw,
            counts,
            drawn: None,
            mesh_sets: vec![TreeMeshes::conifer()],
            meshes,
            species_meshes: Vec::new(),
            culled: None,
            rebuild_draw: false,
            storage_range: u64::from(ctx.adapter().limits.max_storage_buffer_range),
            device_id: shared.id,
            color,
            depth,
            desc: desc.clone(),
        })
    }

    /// The vegetation world.
    pub fn vegetation(&self) -> &Vegetation {
        &self.veg
    }

    /// The vegetation world, to register species and spawn, despawn and change patches.
    pub fn vegetation_mut(&mut self) -> &mut Vegetation {
        &mut self.veg
    }

    /// Adds a mesh set (full and medium detail, [`TreeMeshes::check`]ed) and returns its
    /// number for [`Forest::set_species_meshes`]. Set 0 is understory's conifer, which every
    /// species draws with until told otherwise. The draw pass is rebuilt at the next
    /// [`Forest::cull`] (the old one retires once its last frame completed; a frame culled
    /// already draws with it). [`Error::InvalidInput`] for a mesh `check` refuses, past
    /// [`MAX_MESH_SETS`](understory::gpu::draw::MAX_MESH_SETS) sets, or mesh buffers past the
    /// device's `maxStorageBufferRange` ([`Meshes::fits`]); nothing changes then.
    pub fn add_meshes(&mut self, meshes: TreeMeshes) -> Result<u32> {
        // Every set so far with the new one, built into a fresh `Meshes`; on error the new set
        // comes off again and nothing changed.
        self.mesh_sets.push(meshes);
        let built = Meshes::new(&self.mesh_sets).and_then(|built| {
            let bytes = built.largest_buffer();
            if bytes > self.storage_range {
                return Err(Error::InvalidInput(format!(
                    "add_meshes: a mesh buffer of {bytes} bytes, past the device's maxStorageBufferRange of {}",
                    self.storage_range
                )));
            }
            Ok(built)
        });
        let built = match built {
            Ok(b) => b,
            Err(e) => {
                self.mesh_sets.pop();
                return Err(e);
            }
        };
        self.cull.set_meshes(built.lods());
        self.meshes = built;
        self.rebuild_draw = true;
        Ok(self.meshes.sets() - 1)
    }

    /// Species `species` draws with mesh set `set` ([`Forest::add_meshes`]) from the next
    /// render on. The choice belongs to the id: a species unregistered through
    /// [`Forest::vegetation_mut`] keeps it for whichever species is registered under its id
    /// next (set it again then). [`Error::InvalidInput`] for a set the forest lacks or a species id past
    /// [`MAX_SPECIES`](understory::gpu::draw::MAX_SPECIES).
    pub fn set_species_meshes(&mut self, species: SpeciesId, set: u32) -> Result<()> {
        if set >= self.meshes.sets()
            || species.index() as usize >= understory::gpu::draw::MAX_SPECIES
        {
            return Err(Error::InvalidInput(format!(
                "species {} with mesh set {set}: the forest has {} sets",
                species.index(),
                self.meshes.sets()
            )));
        }
        // A draw pass to be rebuilt takes the list at the next cull.
        if let (Some(draw), false) = (&self.draw, self.rebuild_draw) {
            draw.set_species_meshes(species, set)?;
        }
        self.species_meshes.retain(|(s, _)| *s != species);
        if set != 0 {
            self.species_meshes.push((species, set));
        }
        Ok(())
    }

    /// The last frame's indirect arguments as a wgpu buffer.
    pub fn indirect_args(&self) -> &IndirectArgs {
        &self.args
    }

    /// What the GPU drew per LOD (full, medium, billboard: instances over every phase) in the
    /// latest frame known complete, and that frame's value; `None` before the first.
    pub fn last_drawn(&mut self) -> Option<(u64, [u64; 3])> {
        self.read_counts();
        self.drawn
    }

    /// Reads the counts of every completed frame (the newest wins).
    fn read_counts(&mut self) {
        for (buffer, frame) in &mut self.counts {
            let Some(value) = *frame else { continue };
            // `mapped` refuses while the GPU may still write the buffer.
            let Ok(bytes) = buffer.mapped() else { continue };
            let mut lods = [0u64; 3];
            for (d, draw) in bytes.chunks_exact(20).enumerate() {
                lods[d % 3] += u64::from(u32::from_le_bytes([draw[4], draw[5], draw[6], draw[7]]));
            }
            drop(bytes);
            *frame = None;
            if self.drawn.is_none_or(|(v, _)| v < value) {
                self.drawn = Some((value, lods));
            }
        }
    }

    /// The draw pass's bounding radius of a tree of scale 1 (for culling the app does itself).
    pub fn radius(&self) -> Option<f32> {
        self.draw.as_ref().map(DrawPass::radius)
    }

    /// One frame: [`Forest::cull`] then [`Forest::draw`]: the budget controller and residency
    /// ([`Vegetation::update`]), uploads, the GPU cull, and the draws into `color` and `depth`
    /// (loaded, not cleared: the app clears or draws them first, in a command buffer submitted
    /// before the frame's), with the indirect arguments copied into
    /// [`Forest::indirect_args`].
    ///
    /// Checked: the frame is of this forest's device; the targets are 2D, one layer, one
    /// sample, `RENDER_ATTACHMENT`, of the forest's formats and one size, alive and of this
    /// device; the view is finite ([`Error::InvalidInput`] or [`Error::Lifecycle`], with
    /// nothing recorded). A target or the args buffer destroyed after this call and before
    /// [`SharedDevice::submit`] makes wgpu refuse the whole submission, which `submit` returns
    /// as an error (the frame is dropped, nothing of it runs).
    ///
    /// # Safety
    /// No other thread destroys (`Texture::destroy`, `Buffer::destroy`) `color`, `depth` or
    /// [`Forest::indirect_args`]'s buffer from this call until the frame is submitted or
    /// dropped: their raw handles are recorded into the frame's command buffer here, and
    /// wgpu's `destroy` frees them at once when no submission uses them yet. On the calling
    /// thread, destroying them in between is safe: [`SharedDevice::submit`] sees it and drops
    /// the frame. (Dropping them is fine: the frame holds clones.)
    pub unsafe fn render(
        &mut self,
        frame: &mut WgpuFrame<'_>,
        view: &ForestView,
        color: &wgpu::Texture,
        depth: &wgpu::Texture,
    ) -> Result<UpdateReport> {
        self.check_targets(frame, color, depth)?;
        // Every target check before anything is recorded.
        let targets = frame.targets(color, depth)?;
        // SAFETY: the caller's promises cover both parts.
        let update = unsafe { self.cull(frame, view) }?;
        // SAFETY: as above; `targets` are this frame's.
        unsafe { self.draw_targets(frame, &targets) }?;
        Ok(update)
    }

    /// The frame's checks of the targets that need no recording.
    fn check_targets(
        &self,
        frame: &WgpuFrame<'_>,
        color: &wgpu::Texture,
        depth: &wgpu::Texture,
    ) -> Result<()> {
        if frame.shared.id != self.device_id {
            return Err(Error::Lifecycle(
                "Forest: a frame of another shared device".into(),
            ));
        }
        if color.format() != self.desc.color_format || depth.format() != self.desc.depth_format {
            return Err(Error::InvalidInput(format!(
                "targets {:?}/{:?}, the forest was made for {:?}/{:?}",
                color.format(),
                depth.format(),
                self.desc.color_format,
                self.desc.depth_format
            )));
        }
        Ok(())
    }

    /// The first part of a frame: the budget controller and residency
    /// ([`Vegetation::update`]), uploads, the GPU cull for `view`, the draw constants, and the
    /// indirect arguments copied into [`Forest::indirect_args`] (and the host-readable copy
    /// [`Forest::last_drawn`] reads). [`Forest::draw`] follows in the same frame, in this
    /// command buffer or a later one of the same submission or a later one
    /// ([`SharedDevice::resume`] after [`SharedDevice::finish`]: a host whose cull and draws
    /// are separate systems). A frame culled and never drawn draws nothing; its uploads count.
    ///
    /// Checked: the frame is of this forest's device, the view is finite, a species is
    /// registered; not culled twice in one frame ([`Error::InvalidInput`] or
    /// [`Error::Lifecycle`], nothing recorded).
    ///
    /// # Safety
    /// No other thread destroys [`Forest::indirect_args`]'s buffer from this call until the
    /// frame is submitted or dropped (see [`Forest::render`]).
    pub unsafe fn cull(
        &mut self,
        frame: &mut WgpuFrame<'_>,
        view: &ForestView,
    ) -> Result<UpdateReport> {
        if frame.shared.id != self.device_id {
            return Err(Error::Lifecycle(
                "Forest::cull: a frame of another shared device".into(),
            ));
        }
        if !(view.eye.is_finite() && view.view_proj.is_finite() && view.fog_m > 0.0) {
            return Err(Error::InvalidInput(format!("view {view:?}")));
        }
        let value = frame.frame().value();
        if self
            .culled
            .as_ref()
            .is_some_and(|(t, _)| t.is(frame.frame()))
        {
            return Err(Error::Lifecycle(
                "Forest::cull: this frame was culled already".into(),
            ));
        }
        // SAFETY: only whether the hal buffer still exists is read.
        if unsafe { self.args.buffer.as_hal::<Vulkan>() }.is_none() {
            return Err(Error::InvalidInput(
                "the forest's indirect-args buffer was destroyed: make a new Forest".into(),
            ));
        }
        if self.rebuild_draw || self.draw.is_none() {
            let page = self.veg.atlas_page(0).ok_or_else(|| {
                Error::Lifecycle("Forest::cull: register a species first (no atlas page)".into())
            })?;
            // The old pass retires at its last frame.
            self.draw = None;
            let draw = DrawPass::with_meshes(
                frame.shared.context(),
                self.color,
                self.depth,
                page,
                0,
                self.desc.draw,
                &self.meshes,
            )?;
            for &(species, set) in &self.species_meshes {
                draw.set_species_meshes(species, set)?;
            }
            self.draw = Some(draw);
            self.rebuild_draw = false;
        }
        self.read_counts();
        let Some(draw) = self.draw.as_ref() else {
            return Err(Error::Lifecycle("no draw pass".into()));
        };
        let update = self
            .veg
            .update(frame.frame(), Viewer::with_view(view.eye, view.view_proj))?;
        let cull_view = CullView::new(
            view.view_proj,
            view.eye,
            draw.radius(),
            &self.veg.config().lod,
            update.decision.quality,
        )?;
        let origin = self.veg.config().world_origin;
        let constants = DrawFrame::new(
            view.view_proj,
            view.eye,
            view.fog_m,
            [origin.x, origin.y, self.veg.config().world_size_m],
            false,
        );
        let regions = self.veg.species_regions();
        frame.copy_target(&self.args.buffer)?;
        let slot = (value % self.counts.len() as u64) as usize;
        // A slot still waiting for its frame is skipped this frame (throttling keeps it free).
        let counts = match self.counts.get_mut(slot) {
            Some((buffer, f)) if f.is_none() => {
                buffer.used_in(frame.frame())?;
                *f = Some(value);
                Some(buffer.raw())
            }
            _ => None,
        };
        let (veg, cull, args_raw) = (&mut self.veg, &mut self.cull, self.args_raw);
        let device = frame.shared.context().device().clone();
        // SAFETY: understory's objects are recorded through their own functions for this
        // frame; the args buffer is alive (checked above; no other thread destroys it during
        // this call: the caller's promise), held for the frame, and copied into after a
        // barrier from the cull's writes; no rendering scope is opened.
        unsafe {
            frame.record(|f, cmd| {
                veg.record(f, cmd)?;
                let sources: Vec<_> = veg.cull_sources().into_iter().map(|(s, _)| s).collect();
                cull.record(f, cmd, &sources, &cull_view)?;
                draw.prepare(f, cmd, cull, &constants, &regions)?;
                // The cull's arguments into the app's wgpu buffer (and the host's copy).
                let args = cull.args()?;
                let mb = [vk::MemoryBarrier::default()
                    .src_access_mask(vk::AccessFlags::SHADER_WRITE)
                    .dst_access_mask(vk::AccessFlags::TRANSFER_READ)];
                device.cmd_pipeline_barrier(
                    cmd,
                    vk::PipelineStageFlags::COMPUTE_SHADER,
                    vk::PipelineStageFlags::TRANSFER,
                    vk::DependencyFlags::empty(),
                    &mb,
                    &[],
                    &[],
                );
                let whole = [vk::BufferCopy {
                    src_offset: 0,
                    dst_offset: 0,
                    size: args.size(),
                }];
                device.cmd_copy_buffer(cmd, args.raw(), args_raw, &whole);
                if let Some(counts) = counts {
                    device.cmd_copy_buffer(cmd, args.raw(), counts, &whole);
                    let host = [vk::MemoryBarrier::default()
                        .src_access_mask(vk::AccessFlags::TRANSFER_WRITE)
                        .dst_access_mask(vk::AccessFlags::HOST_READ)];
                    device.cmd_pipeline_barrier(
                        cmd,
                        vk::PipelineStageFlags::TRANSFER,
                        vk::PipelineStageFlags::HOST,
                        vk::DependencyFlags::empty(),
                        &host,
                        &[],
                        &[],
                    );
                }
                // Anything later (the app's reads of the args buffer) after the copy.
                let after = [vk::MemoryBarrier::default()
                    .src_access_mask(vk::AccessFlags::TRANSFER_WRITE)
                    .dst_access_mask(vk::AccessFlags::MEMORY_READ | vk::AccessFlags::MEMORY_WRITE)];
                device.cmd_pipeline_barrier(
                    cmd,
                    vk::PipelineStageFlags::TRANSFER,
                    vk::PipelineStageFlags::ALL_COMMANDS,
                    vk::DependencyFlags::empty(),
                    &after,
                    &[],
                    &[],
                );
                Ok(())
            })?;
        }
        self.culled = Some((frame.frame().tag(), false));
        Ok(update)
    }

    /// The second part of a frame: the draws of what [`Forest::cull`] kept in this frame into
    /// `color` and `depth` (loaded, not cleared), with the barriers around them.
    ///
    /// Checked: the frame is of this forest's device and was culled ([`Forest::cull`]) and not
    /// drawn yet; the targets as in [`Forest::render`] ([`Error::InvalidInput`] or
    /// [`Error::Lifecycle`], nothing recorded).
    ///
    /// # Safety
    /// No other thread destroys `color` or `depth` from this call until the frame is
    /// submitted or dropped (see [`Forest::render`]).
    pub unsafe fn draw(
        &mut self,
        frame: &mut WgpuFrame<'_>,
        color: &wgpu::Texture,
        depth: &wgpu::Texture,
    ) -> Result<()> {
        self.check_targets(frame, color, depth)?;
        self.check_culled(frame)?;
        let targets = frame.targets(color, depth)?;
        // SAFETY: the caller's promise; `targets` are this frame's.
        unsafe { self.draw_targets(frame, &targets) }
    }

    fn check_culled(&self, frame: &WgpuFrame<'_>) -> Result<()> {
        // The frame's tag, not its value: a dropped frame's value goes to the next frame.
        match &self.culled {
            Some((t, false)) if t.is(frame.frame()) => Ok(()),
            Some((t, true)) if t.is(frame.frame()) => Err(Error::Lifecycle(
                "Forest::draw: this frame was drawn already".into(),
            )),
            _ => Err(Error::Lifecycle(
                "Forest::draw: cull this frame first (Forest::cull)".into(),
            )),
        }
    }

    /// [`Forest::draw`] into targets [`WgpuFrame::targets`] returned for this frame.
    ///
    /// # Safety
    /// As [`Forest::draw`].
    unsafe fn draw_targets(
        &mut self,
        frame: &mut WgpuFrame<'_>,
        targets: &RawTargets,
    ) -> Result<()> {
        self.check_culled(frame)?;
        let targets = *targets;
        let (Some(draw), Some(page)) = (self.draw.as_ref(), self.veg.atlas_page(0)) else {
            return Err(Error::Lifecycle("Forest::draw: no draw pass".into()));
        };
        let cull = &self.cull;
        let device = frame.shared.context().device().clone();
        // SAFETY: understory's objects are recorded through their own functions for this
        // frame, after the cull recorded in it (checked: `culled`); the wgpu targets are used in
        // the layouts `targets` moved them into and left there, with a barrier before (the
        // app's work on them) and after (anything later); no other thread destroys them during
        // this call (the caller's promise); the rendering scope is closed before returning.
        unsafe {
            frame.record(|f, cmd| {
                attachment_barrier(&device, cmd, &targets, Edge::Before);
                let color_att = [vk::RenderingAttachmentInfo::default()
                    .image_view(targets.color.1)
                    .image_layout(vk::ImageLayout::COLOR_ATTACHMENT_OPTIMAL)
                    .load_op(vk::AttachmentLoadOp::LOAD)
                    .store_op(vk::AttachmentStoreOp::STORE)];
                let depth_att = vk::RenderingAttachmentInfo::default()
                    .image_view(targets.depth.1)
                    .image_layout(vk::ImageLayout::DEPTH_STENCIL_ATTACHMENT_OPTIMAL)
                    .load_op(vk::AttachmentLoadOp::LOAD)
                    .store_op(vk::AttachmentStoreOp::STORE);
                let rendering = vk::RenderingInfo::default()
                    .render_area(vk::Rect2D {
                        offset: vk::Offset2D::default(),
                        extent: targets.extent,
                    })
                    .layer_count(1)
                    .color_attachments(&color_att)
                    .depth_attachment(&depth_att);
                device.cmd_begin_rendering(cmd, &rendering);
                let drawn = draw.record(f, cmd, cull, page, targets.extent);
                device.cmd_end_rendering(cmd);
                drawn?;
                attachment_barrier(&device, cmd, &targets, Edge::After);
                Ok(())
            })?;
        }
        if let Some((_, drawn)) = self.culled.as_mut() {
            *drawn = true;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Edge {
    Before,
    After,
}

/// Barriers around understory's commands in a frame: before, from the app's attachment writes
/// (wgpu leaves them unordered with the next pass); after, from everything understory did to
/// anything later (wgpu does not see understory's commands). Layouts stay as they are.
///
/// # Safety
/// `cmd` is recording; the targets are in the layouts [`WgpuFrame::targets`] names.
unsafe fn attachment_barrier(
    device: &ash::Device,
    cmd: vk::CommandBuffer,
    t: &RawTargets,
    edge: Edge,
) {
    let color_range = vk::ImageSubresourceRange {
        aspect_mask: vk::ImageAspectFlags::COLOR,
        base_mip_level: 0,
        level_count: 1,
        base_array_layer: 0,
        layer_count: 1,
    };
    let depth_range = vk::ImageSubresourceRange {
        aspect_mask: vk::ImageAspectFlags::DEPTH,
        ..color_range
    };
    let tests =
        vk::PipelineStageFlags::EARLY_FRAGMENT_TESTS | vk::PipelineStageFlags::LATE_FRAGMENT_TESTS;
    let cw = vk::AccessFlags::COLOR_ATTACHMENT_WRITE;
    let crw = vk::AccessFlags::COLOR_ATTACHMENT_READ | cw;
    let dw = vk::AccessFlags::DEPTH_STENCIL_ATTACHMENT_WRITE;
    let drw = vk::AccessFlags::DEPTH_STENCIL_ATTACHMENT_READ | dw;
    let (src_stage, dst_stage, c_access, d_access, mem) = match edge {
        Edge::Before => (
            vk::PipelineStageFlags::COLOR_ATTACHMENT_OUTPUT | tests,
            vk::PipelineStageFlags::COLOR_ATTACHMENT_OUTPUT | tests,
            (cw, crw),
            (dw, drw),
            None,
        ),
        Edge::After => (
            vk::PipelineStageFlags::ALL_COMMANDS,
            vk::PipelineStageFlags::ALL_COMMANDS,
            (
                cw,
                vk::AccessFlags::MEMORY_READ | vk::AccessFlags::MEMORY_WRITE,
            ),
            (
                dw,
                vk::AccessFlags::MEMORY_READ | vk::AccessFlags::MEMORY_WRITE,
            ),
            Some(
                vk::MemoryBarrier::default()
                    .src_access_mask(vk::AccessFlags::MEMORY_WRITE)
                    .dst_access_mask(vk::AccessFlags::MEMORY_READ | vk::AccessFlags::MEMORY_WRITE),
            ),
        ),
    };
    let image = |img: vk::Image, layout, range, (src, dst): (vk::AccessFlags, vk::AccessFlags)| {
        vk::ImageMemoryBarrier::default()
            .image(img)
            .old_layout(layout)
            .new_layout(layout)
            .src_access_mask(src)
            .dst_access_mask(dst)
            .src_queue_family_index(vk::QUEUE_FAMILY_IGNORED)
            .dst_queue_family_index(vk::QUEUE_FAMILY_IGNORED)
            .subresource_range(range)
    };
    let images = [
        image(
            t.color.0,
            vk::ImageLayout::COLOR_ATTACHMENT_OPTIMAL,
            color_range,
            c_access,
        ),
        image(
            t.depth.0,
            vk::ImageLayout::DEPTH_STENCIL_ATTACHMENT_OPTIMAL,
            depth_range,
            d_access,
        ),
    ];
    let mems: Vec<vk::MemoryBarrier> = mem.into_iter().collect();
    // SAFETY: the caller's promises; the layouts do not change (old = new), and the stages
    // are supported by a graphics queue.
    unsafe {
        device.cmd_pipeline_barrier(
            cmd,
            src_stage,
            dst_stage,
            vk::DependencyFlags::empty(),
            &mems,
            &[],
            &images,
        );
    }
}

/// A device-local buffer of `size` bytes for the indirect arguments, created here and given
/// to wgpu (`Buffer::from_raw_managed`: wgpu destroys it and frees its memory when the
/// `wgpu::Buffer` goes). Its `vkAllocateMemory` is wgpu's from then on (counted by the driver
/// as foreign; a few hundred bytes).
fn wgpu_args_buffer(shared: &SharedDevice, size: u64) -> Result<(wgpu::Buffer, vk::Buffer)> {
    let ctx = shared.context();
    let device = ctx.device();
    let info = vk::BufferCreateInfo::default().size(size).usage(
        vk::BufferUsageFlags::INDIRECT_BUFFER
            | vk::BufferUsageFlags::TRANSFER_SRC
            | vk::BufferUsageFlags::TRANSFER_DST
            | vk::BufferUsageFlags::STORAGE_BUFFER,
    );
    // SAFETY: a valid create info on the live device.
    let buffer = unsafe { device.create_buffer(&info, None) }.map_err(vk_fail("vkCreateBuffer"))?;
    // SAFETY: a live buffer.
    let req = unsafe { device.get_buffer_memory_requirements(buffer) };
    // SAFETY: the physical device of the live instance.
    let props = unsafe {
        ctx.instance()
            .get_physical_device_memory_properties(ctx.adapter().handle)
    };
    let ty = props
        .memory_types_as_slice()
        .iter()
        .enumerate()
        .find(|(i, t)| {
            req.memory_type_bits & (1 << i) != 0
                && t.property_flags
                    .contains(vk::MemoryPropertyFlags::DEVICE_LOCAL)
        })
        .map(|(i, _)| i as u32);
    let Some(ty) = ty else {
        // SAFETY: unused buffer.
        unsafe { device.destroy_buffer(buffer, None) };
        return Err(Error::Unsupported(
            "no device-local memory for a buffer".into(),
        ));
    };
    let alloc = vk::MemoryAllocateInfo::default()
        .allocation_size(req.size)
        .memory_type_index(ty);
    // SAFETY: a valid allocation info.
    let memory = match unsafe { device.allocate_memory(&alloc, None) } {
        Ok(m) => m,
        Err(e) => {
            // SAFETY: unused buffer.
            unsafe { device.destroy_buffer(buffer, None) };
            return Err(vk_fail("vkAllocateMemory")(e));
        }
    };
    // SAFETY: an unbound buffer and memory of a type it allows, at offset 0.
    if let Err(e) = unsafe { device.bind_buffer_memory(buffer, memory, 0) } {
        // SAFETY: unused objects.
        unsafe {
            device.destroy_buffer(buffer, None);
            device.free_memory(memory, None);
        }
        return Err(vk_fail("vkBindBufferMemory")(e));
    }
    // SAFETY: wgpu takes ownership of the buffer and its memory (it destroys and frees them);
    // nothing else frees them; the buffer cannot be mapped by wgpu (no MAP_* usage below).
    let hal = unsafe { wgpu_hal::vulkan::Buffer::from_raw_managed(buffer, memory, 0, req.size) };
    // SAFETY: created on this device, matching the descriptor's size and usages (the Vulkan
    // usages cover INDIRECT, COPY_SRC, COPY_DST and STORAGE); not zero-sized.
    let wb = unsafe {
        shared.device().create_buffer_from_hal::<Vulkan>(
            hal,
            &wgpu::BufferDescriptor {
                label: Some("understory indirect args"),
                size,
                usage: wgpu::BufferUsages::INDIRECT
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST
                    | wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            },
        )
    };
    Ok((wb, buffer))
}

/// The heap sources a budget can come from, for printing.
pub fn source_label(s: Source) -> &'static str {
    match s {
        Source::Ext => "VK_EXT_memory_budget",
        Source::Estimated => "estimate (no VK_EXT_memory_budget)",
    }
}
