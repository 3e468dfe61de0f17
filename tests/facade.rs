//! A state machine of random public calls, the way a host engine might make them in any order:
//! spawn, despawn, cap changes, frames begun and dropped, update or not, record or not, submit
//! or not, completion reported late, shutdown. The test is the host: it submits with its own
//! command buffers and fences and reports completion only after its fence signalled
//! (`FrameSignal::HostReported`), so the Khronos layer, which tracks those fences, reports any
//! object destroyed while a submission that uses it is pending
//! (VUID-vkDestroyBuffer-buffer-00922 and kin). Invariants after every step: no validation
//! message, no panic, no error; at the end nothing leaks.

mod common;

use std::collections::VecDeque;

use ash::vk;
use glam::{Mat4, Vec2, Vec3};
use proptest::prelude::*;
use understory::gpu::context::{Context, Frame};
use understory::gpu::cull::{Compaction, CullPass, CullView};
use understory::gpu::timeline::FrameSignal;
use understory::vegetation::{
    PatchDesc, PatchId, SpeciesDesc, SpeciesId, Vegetation, VegetationConfig,
};
use understory::world::instance::Instance;

#[derive(Clone, Debug)]
enum Op {
    Spawn { tile: (u8, u8), n: u16 },
    Despawn { pick: usize },
    Cap { mib: u8 },
    Begin,
    Update { x: i16, z: i16 },
    Record { cull: bool },
    Submit,
    DropFrame,
    Complete,
    Collect,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => ((0u8..8, 0u8..8), 1u16..400).prop_map(|(tile, n)| Op::Spawn { tile, n }),
        3 => any::<usize>().prop_map(|pick| Op::Despawn { pick }),
        1 => (1u8..24).prop_map(|mib| Op::Cap { mib }),
        4 => Just(Op::Begin),
        3 => (-200i16..200, -200i16..200).prop_map(|(x, z)| Op::Update { x, z }),
        3 => any::<bool>().prop_map(|cull| Op::Record { cull }),
        3 => Just(Op::Submit),
        1 => Just(Op::DropFrame),
        2 => Just(Op::Complete),
        1 => Just(Op::Collect),
    ]
}

/// The host's command buffers and fences: one per submission in flight, at most `SLOTS`.
struct Host {
    device: ash::Device,
    pool: vk::CommandPool,
    free: Vec<(vk::CommandBuffer, vk::Fence)>,
    /// Submitted, not yet known complete: (command buffer, fence, frame value).
    in_flight: VecDeque<(vk::CommandBuffer, vk::Fence, u64)>,
}

impl Host {
    const SLOTS: usize = 3;

    fn new(ctx: &Context) -> Self {
        let device = ctx.device().clone();
        let info = vk::CommandPoolCreateInfo::default()
            .queue_family_index(ctx.queue_family())
            .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER);
        // SAFETY: the host's own pool on the context's device.
        let pool = unsafe { device.create_command_pool(&info, None) }.unwrap();
        let alloc = vk::CommandBufferAllocateInfo::default()
            .command_pool(pool)
            .level(vk::CommandBufferLevel::PRIMARY)
            .command_buffer_count(Self::SLOTS as u32);
        // SAFETY: the pool is the host's.
        let cmds = unsafe { device.allocate_command_buffers(&alloc) }.unwrap();
        let free = cmds
            .into_iter()
            .map(|c| {
                // SAFETY: valid info.
                let f =
                    unsafe { device.create_fence(&vk::FenceCreateInfo::default(), None) }.unwrap();
                (c, f)
            })
            .collect();
        Self {
            device,
            pool,
            free,
            in_flight: VecDeque::new(),
        }
    }

    /// Waits for the oldest submission's fence and reports its frame complete.
    fn complete_oldest(&mut self, ctx: &Context) {
        let Some((cmd, fence, value)) = self.in_flight.pop_front() else {
            return;
        };
        // SAFETY: the host's fence of a real submission.
        unsafe {
            self.device
                .wait_for_fences(&[fence], true, 10_000_000_000)
                .unwrap();
            self.device.reset_fences(&[fence]).unwrap();
        }
        // SAFETY: the fence of the submission that carried frame `value` (and, the host
        // submitting in order on one queue, every earlier one) has signalled.
        unsafe { ctx.frames_completed(value) }.unwrap();
        self.free.push((cmd, fence));
    }

    fn finish(&mut self, ctx: &Context) {
        while !self.in_flight.is_empty() {
            self.complete_oldest(ctx);
        }
    }
}

impl Drop for Host {
    /// Also on a failing case's unwind, so the context never outlives the host's objects.
    fn drop(&mut self) {
        // SAFETY: the host's own objects; its fences are waited before anything is destroyed.
        unsafe {
            for (_, f, _) in &self.in_flight {
                let _ = self.device.wait_for_fences(&[*f], true, 10_000_000_000);
            }
            for f in self
                .free
                .iter()
                .map(|s| s.1)
                .chain(self.in_flight.iter().map(|s| s.1))
            {
                self.device.destroy_fence(f, None);
            }
            self.device.destroy_command_pool(self.pool, None);
        }
    }
}

/// A frame in progress: the understory frame and, once recording began, the host's command
/// buffer and fence.
struct Open {
    frame: Frame,
    cmd: Option<(vk::CommandBuffer, vk::Fence)>,
}

fn patch(tile: (u8, u8), n: u16, seed: u64) -> Vec<Instance> {
    let leaf = 32.0;
    let min = Vec2::new(-128.0, -128.0) + Vec2::new(f32::from(tile.0), f32::from(tile.1)) * leaf;
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let a = (s >> 40) as f32 / (1u64 << 24) as f32;
            let b = ((s >> 16) & 0xff_ffff) as f32 / (1u64 << 24) as f32;
            Instance::at(Vec3::new(
                min.x + (0.001 + a * 0.998) * leaf,
                0.0,
                min.y + (0.001 + b * 0.998) * leaf,
            ))
        })
        .collect()
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    // No size-class cache: every free is a real vkDestroyBuffer the layer checks against the
    // submissions it knows are pending.
    let Some(ctx) = common::context_with_memory("facade_state_machine", common::no_cache()) else {
        return Ok(());
    };
    let canary = ctx.canary().clone();
    let mut host = Host::new(&ctx);
    let mut veg = Vegetation::new(
        &ctx,
        VegetationConfig {
            world_origin: Vec2::splat(-128.0),
            world_size_m: 256.0,
            atlas_page_px: 128,
            ..Default::default()
        },
    )
    .unwrap();
    let species: SpeciesId = veg
        .register_species(&SpeciesDesc {
            name: "grass",
            width: 8,
            height: 8,
            rgba8: &[200; 8 * 8 * 4],
        })
        .unwrap();
    let mut cull = CullPass::new(&ctx, Compaction::Atomic, 4096, [Default::default(); 3]).unwrap();
    let mut live: Vec<PatchId> = Vec::new();
    let mut open: Option<Open> = None;
    let mut seed = 1u64;
    let mut camera = Vec3::new(0.0, 10.0, 0.0);
    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Spawn { tile, n } => {
                seed += 1;
                live.push(
                    veg.spawn(&PatchDesc {
                        species,
                        instances: &patch(*tile, *n, seed),
                    })
                    .unwrap(),
                );
            }
            Op::Despawn { pick } => {
                if !live.is_empty() {
                    let id = live.swap_remove(pick % live.len());
                    veg.despawn(id).unwrap();
                }
            }
            Op::Cap { mib } => veg.set_budget_cap(u64::from(*mib) << 20).unwrap(),
            Op::Begin => {
                if open.is_none() {
                    if host.free.is_empty() {
                        host.complete_oldest(&ctx);
                    }
                    open = Some(Open {
                        frame: ctx.begin_frame().unwrap(),
                        cmd: None,
                    });
                } else {
                    prop_assert!(ctx.begin_frame().is_err(), "one open frame at a time");
                }
            }
            Op::Update { x, z } => {
                if let Some(o) = &open {
                    camera = Vec3::new(f32::from(*x), 10.0, f32::from(*z));
                    veg.update(&o.frame, camera).unwrap();
                }
            }
            Op::Record { cull: with_cull } => {
                let Some(o) = open.as_mut() else { continue };
                if o.cmd.is_none() {
                    let (cmd, fence) = host.free.pop().expect("a free slot");
                    // SAFETY: the host's command buffer, not pending (its fence was waited or
                    // never submitted).
                    unsafe {
                        host.device
                            .reset_command_buffer(cmd, vk::CommandBufferResetFlags::empty())
                            .unwrap();
                        host.device
                            .begin_command_buffer(cmd, &vk::CommandBufferBeginInfo::default())
                            .unwrap();
                    }
                    o.cmd = Some((cmd, fence));
                }
                let (cmd, _) = o.cmd.unwrap();
                // SAFETY: cmd is recording for `o.frame`: it is submitted as that frame's
                // submission or, if the frame is dropped, never.
                unsafe { veg.record(&o.frame, cmd).unwrap() };
                if *with_cull {
                    let view = CullView::new(
                        Mat4::perspective_rh(1.2, 1.5, 0.5, 500.0)
                            * Mat4::look_at_rh(camera, camera + Vec3::new(1.0, -0.3, 0.5), Vec3::Y),
                        camera,
                        1.0,
                        &veg.config().lod,
                        1.0,
                    )
                    .unwrap();
                    let sources: Vec<_> = veg.cull_sources().into_iter().map(|(s, _)| s).collect();
                    // SAFETY: as above; after the uploads in submission order.
                    unsafe { cull.record(&o.frame, cmd, &sources, &view).unwrap() };
                }
            }
            Op::Submit => {
                let Some(mut o) = open.take() else { continue };
                let (cmd, fence) = match o.cmd.take() {
                    Some(slot) => slot,
                    None => {
                        let (cmd, fence) = host.free.pop().expect("Begin keeps a slot free");
                        // SAFETY: the host's command buffer, not pending.
                        unsafe {
                            host.device
                                .reset_command_buffer(cmd, vk::CommandBufferResetFlags::empty())
                                .unwrap();
                            host.device
                                .begin_command_buffer(cmd, &vk::CommandBufferBeginInfo::default())
                                .unwrap();
                        }
                        (cmd, fence)
                    }
                };
                let cmds = [cmd];
                let submit = vk::SubmitInfo::default().command_buffers(&cmds);
                // SAFETY: the host's command buffer, recording, ended here.
                unsafe { host.device.end_command_buffer(cmd).unwrap() };
                {
                    let queue = ctx.queue();
                    // SAFETY: the host's executable command buffer; the queue is locked.
                    unsafe { host.device.queue_submit(*queue, &[submit], fence) }.unwrap();
                }
                // SAFETY: every command recorded for the frame is in that submission, whose
                // fence the host waits on before reporting.
                let done =
                    unsafe { ctx.frame_submitted(o.frame, FrameSignal::HostReported) }.unwrap();
                host.in_flight.push_back((cmd, fence, done.value()));
            }
            Op::DropFrame => {
                if let Some(o) = open.take() {
                    if let Some(slot) = o.cmd {
                        // Recorded, never submitted: back to the free list.
                        host.free.push(slot);
                    }
                    drop(o.frame);
                }
            }
            Op::Complete => host.complete_oldest(&ctx),
            Op::Collect => {
                ctx.collect().unwrap();
            }
        }
        let messages = canary.drain();
        prop_assert!(
            canary.total() == 0,
            "step {step} ({op:?}): {} validation message(s): {messages:#?}",
            canary.total()
        );
    }
    if let Some(o) = open.take() {
        if let Some(slot) = o.cmd {
            host.free.push(slot);
        }
    }
    host.finish(&ctx);
    drop((host, veg, cull));
    let report = ctx.shutdown().unwrap();
    prop_assert!(report.leaks.is_empty(), "leaks: {:?}", report.leaks);
    prop_assert_eq!(canary.total(), 0, "{:?}", canary.drain());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_host_calls_never_free_in_use_or_leak(ops in proptest::collection::vec(op(), 1..80)) {
        run(&ops)?;
    }
}
