//! `understory-peers`: understory side by side with the stacks an engine programmer would
//! otherwise pick — wgpu (Bevy), vk-mem (VMA, most ash users) and raw gpu-allocator — on one
//! device, in one run, with one identical workload.
//!
//! # Methodology
//! Every stack gets a Vulkan instance and device of its own (created and destroyed around its
//! run, one stack at a time), on the same physical device: understory's choice (discrete >
//! integrated > virtual > CPU), or `--device`. Validation is off everywhere.
//!
//! 1. **Churn.** For `--frames` frames: wait until at most 2 frames are in flight (each stack's
//!    own mechanism), let the stack free what the GPU finished with, create `--buffers` new
//!    instance buffers of mixed sizes (256 B–1 MiB, log-uniform from a fixed xorshift seed, the
//!    same sizes in the same order for every stack), fill each from the CPU, record one
//!    256-byte `vkCmdCopyBuffer`/`copy_buffer_to_buffer` per new buffer into a per-frame copy
//!    target (so the GPU really reads each one), submit, then release the `--release` oldest
//!    buffers (never fewer than `--keep` live). Releasing is each stack's natural way:
//!    understory `Context::retire` at the submission's timeline value (freed in the next
//!    `begin_frame`); vk-mem and gpu-allocator a hand-rolled free list per frame slot, freed
//!    after that slot's fence; wgpu `drop` (freed by wgpu inside `Device::poll`).
//!    - Filling: the ash stacks (understory, vk-mem, gpu-allocator) write through a persistent
//!      mapping of the memory type gpu-allocator's `CpuToGpu` picks (device-local + host-visible
//!      where there is one: lavapipe's only type, ReBAR on NVIDIA); VMA is pinned to that same
//!      type. wgpu decides itself: GPU-only buffers, `Queue::write_buffer` through its staging
//!      buffers (an extra copy on the GPU timeline).
//!    - Times: CPU wall time of each frame (throttle wait included) and of the stack's
//!      allocation and release calls alone; median and p99 over the frames after `--warmup`.
//!    - Peak reserved: the bytes the stack's allocator holds in `VkDeviceMemory`, sampled after
//!      every frame outside the timing (understory `Memory::stats`, gpu-allocator
//!      `Allocator::capacity`, VMA `vmaGetHeapBudgets` block bytes, wgpu
//!      `Device::generate_allocator_report`). The copy targets use memory of their own, outside
//!      the allocator under test, except in wgpu (2 × `--buffers` × 256 B).
//! 2. **Budget.** A budget B (`--budget` MiB) is injected where the stack allows it, and
//!    `1 MiB` buffers are created until the stack refuses or 2×B is reached (a hard stop, so the
//!    real device is never exhausted). understory: instances cap = B (`Error::OverBudget`).
//!    vk-mem: `heap_size_limits` = B, alone and with `WITHIN_BUDGET`. gpu-allocator and wgpu:
//!    nothing to inject.
//! 3. **Leak check.** After the churn every buffer is released the normal way and the device is
//!    waited idle: bytes each allocator still holds, and (with `VK_EXT_memory_budget`) the
//!    driver's `heapUsage` change since the stack started, before and after the stack's
//!    teardown, read through a separate instance.
//!
//! Output: one markdown table per device (ratios to understory), or `--json`; `--json-out FILE`
//! writes the JSON document as well.

mod common;
mod raw;
mod report;
mod stack_gpu_allocator;
mod stack_understory;
mod stack_vkmem;
mod stack_wgpu;

use anyhow::{Context as _, Result, anyhow};
use clap::Parser;
use understory::gpu::adapter::{self, DeviceSelector};
use understory::gpu::instance::{Instance, InstanceOptions, Validation};

use crate::common::{BudgetResult, ChurnResult, MIB, Probe, StackReport, Workload};
use crate::report::Report;

/// Side-by-side benchmark: understory vs wgpu vs vk-mem (VMA) vs raw gpu-allocator.
#[derive(Parser, Debug)]
#[command(name = "understory-peers", version)]
struct Args {
    /// Frames of churn.
    #[arg(long, default_value_t = 1000)]
    frames: usize,
    /// First frames left out of the timing statistics.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// New instance buffers per frame (N).
    #[arg(long, default_value_t = 64)]
    buffers: usize,
    /// Oldest buffers released per frame (M).
    #[arg(long, default_value_t = 64)]
    release: usize,
    /// Live buffers never released during the churn (the resident set).
    #[arg(long, default_value_t = 192)]
    keep: usize,
    /// Injected budget for the budget workload, MiB.
    #[arg(long, default_value_t = 256)]
    budget: u64,
    /// Seed of the size sequence.
    #[arg(long, default_value_t = 0x9E37_79B9_7F4A_7C15)]
    seed: u64,
    /// Device: enumeration index or case-insensitive name substring (default: understory's
    /// choice, `UNDERSTORY_DEVICE` honoured).
    #[arg(long)]
    device: Option<String>,
    /// Stacks to run, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "understory,wgpu,vk-mem,gpu-allocator"
    )]
    stacks: Vec<String>,
    /// Rounds of the churn workload; each runs every stack once, in a rotated order, and the
    /// frames of all rounds are pooled.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Skip the budget workload.
    #[arg(long)]
    skip_budget: bool,
    /// Print JSON instead of the markdown table.
    #[arg(long, conflicts_with = "markdown")]
    json: bool,
    /// Print the markdown table (the default).
    #[arg(long)]
    markdown: bool,
    /// Also write the JSON document to this file.
    #[arg(long, value_name = "FILE")]
    json_out: Option<std::path::PathBuf>,
}

const KNOWN: [&str; 4] = [
    stack_understory::NAME,
    stack_wgpu::NAME,
    stack_vkmem::NAME,
    stack_gpu_allocator::NAME,
];

/// The device every stack will use, as understory picks it.
struct Chosen {
    name: String,
    device_type: String,
    driver: String,
    api_version: String,
}

fn choose(selector: Option<&str>) -> Result<Chosen> {
    let instance = Instance::new(&InstanceOptions {
        validation: Validation::Off,
        ..Default::default()
    })
    .map_err(|e| anyhow!("Vulkan instance: {e}"))?;
    let adapters = instance.adapters().map_err(|e| anyhow!("adapters: {e}"))?;
    let env = std::env::var("UNDERSTORY_DEVICE").ok();
    let selector = selector
        .or(env.as_deref())
        .map(DeviceSelector::parse)
        .transpose()
        .map_err(|e| anyhow!("--device: {e}"))?;
    let i = adapter::select(&adapters, selector.as_ref()).map_err(|e| anyhow!("device: {e}"))?;
    let a = &adapters[i];
    Ok(Chosen {
        name: a.name.clone(),
        device_type: format!("{:?}", a.device_type),
        driver: a.driver.clone(),
        api_version: adapter::format_version(a.api_version),
    })
}

/// One round of the churn workload for one stack.
fn run_churn(
    stack: &str,
    entry: &ash::Entry,
    chosen: &Chosen,
    w: &Workload,
    probe: Option<&Probe>,
) -> Result<ChurnResult> {
    let name = chosen.name.as_str();
    match stack {
        stack_understory::NAME => stack_understory::churn(name, w, probe),
        stack_wgpu::NAME => stack_wgpu::churn(name, w, probe),
        stack_vkmem::NAME => stack_vkmem::churn(entry, name, w, probe),
        _ => stack_gpu_allocator::churn(entry, name, w, probe),
    }
}

/// The budget workload for one stack.
fn run_budget(
    stack: &str,
    entry: &ash::Entry,
    chosen: &Chosen,
    w: &Workload,
    probe: Option<&Probe>,
) -> Result<Vec<BudgetResult>> {
    let name = chosen.name.as_str();
    match stack {
        stack_understory::NAME => stack_understory::budget(name, w, probe).map(|b| vec![b]),
        stack_wgpu::NAME => stack_wgpu::budget(name, w, probe).map(|b| vec![b]),
        stack_vkmem::NAME => stack_vkmem::budget(entry, name, w, probe),
        _ => stack_gpu_allocator::budget(entry, name, w, probe).map(|b| vec![b]),
    }
}

fn version(stack: &str) -> &'static str {
    match stack {
        stack_understory::NAME => stack_understory::VERSION,
        stack_wgpu::NAME => stack_wgpu::VERSION,
        stack_vkmem::NAME => stack_vkmem::VERSION,
        _ => stack_gpu_allocator::VERSION,
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.frames == 0 || args.buffers == 0 || args.budget == 0 || args.rounds == 0 {
        return Err(anyhow!(
            "--frames, --buffers, --budget and --rounds must be positive"
        ));
    }
    for s in &args.stacks {
        if !KNOWN.contains(&s.as_str()) {
            return Err(anyhow!("unknown stack {s:?} (known: {})", KNOWN.join(", ")));
        }
    }
    let chosen = choose(args.device.as_deref())?;
    eprintln!(
        "[peers] device: {} ({}, {}, Vulkan {})",
        chosen.name, chosen.device_type, chosen.driver, chosen.api_version
    );
    // SAFETY: loads the system's Vulkan loader; nothing else in the process unloads it.
    let entry = unsafe { ash::Entry::load() }.context("loading the Vulkan loader")?;
    let probe = Probe::new(&entry, &chosen.name)?;
    let w = Workload::new(
        args.frames,
        args.warmup,
        args.buffers,
        args.release,
        args.keep,
        args.budget * MIB,
        args.seed,
    );
    let selected: Vec<&str> = KNOWN
        .iter()
        .copied()
        .filter(|k| args.stacks.iter().any(|s| s == k))
        .collect();
    // Rounds rotate the order, so that no stack always runs first (or right after another).
    let mut rounds: Vec<Vec<ChurnResult>> = vec![Vec::new(); selected.len()];
    let mut errors: Vec<Option<String>> = vec![None; selected.len()];
    for r in 0..args.rounds {
        for k in 0..selected.len() {
            let i = (k + r) % selected.len();
            let stack = selected[i];
            if errors[i].is_some() {
                continue;
            }
            eprintln!(
                "[peers] round {}/{}: {stack} churn ({} frames)",
                r + 1,
                args.rounds,
                w.frames
            );
            match run_churn(stack, &entry, &chosen, &w, probe.as_ref()) {
                Ok(c) => rounds[i].push(c),
                Err(e) => {
                    eprintln!("[peers] {stack}: churn failed: {e:#}");
                    errors[i] = Some(format!("{e:#}"));
                }
            }
        }
    }
    let mut stacks = Vec::new();
    for (i, (stack, churns)) in selected.iter().zip(rounds).enumerate() {
        let (budget, budget_error) = if args.skip_budget {
            (Vec::new(), Some("skipped".to_string()))
        } else {
            eprintln!("[peers] {stack}: budget");
            match run_budget(stack, &entry, &chosen, &w, probe.as_ref()) {
                Ok(b) => (b, None),
                Err(e) => (Vec::new(), Some(format!("{e:#}"))),
            }
        };
        let churn_error = errors[i].take();
        stacks.push(StackReport {
            stack: stack.to_string(),
            version: version(stack).to_string(),
            churn: if churn_error.is_some() {
                None
            } else {
                ChurnResult::merge(churns)
            },
            churn_error,
            budget,
            budget_error,
        });
    }
    let report = Report {
        schema: "understory.peers/1",
        device: chosen.name,
        device_type: chosen.device_type,
        driver: chosen.driver,
        api_version: chosen.api_version,
        memory_budget_ext: probe.is_some(),
        workload: w,
        stacks,
    };
    drop(probe);
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.markdown());
    }
    Ok(())
}
