//! The plugin in a headless Bevy app on lavapipe, under the Khronos layer with
//! synchronization validation (`UNDERSTORY_VALIDATION=gpu-assisted` adds GPU-assisted): patch
//! entities spawned and despawned every frame, a budget squeeze, and the exit report. The app
//! is `examples/forest.rs`. One test per process: Bevy's logger is process-wide.

#[path = "../../tests/common/mod.rs"]
mod common;

#[path = "../examples/forest.rs"]
mod forest;

#[test]
fn patch_entities_churn_under_a_squeeze_and_exit_clean() {
    let test = "bevy_plugin";
    let Some(probe) = common::context(test) else {
        return;
    };
    drop(probe);
    let frames = 60;
    let churn = 40;
    let o = forest::run(&forest::Options {
        frames,
        trees: 20_000,
        width: 320,
        height: 180,
        churn,
        squeeze_to: Some(4 << 20),
        shared: understory_wgpu::SharedDeviceDesc {
            context: understory::gpu::context::ContextOptions {
                device: None,
                ..common::options()
            },
            ..Default::default()
        },
        ..Default::default()
    })
    .expect("the Bevy app's run");
    eprintln!("{test}: {o:?}");
    assert!(
        o.churned >= u64::from(frames) * churn as u64,
        "{} churned",
        o.churned
    );
    assert_eq!(
        o.budget.patches, o.live_entities,
        "understory holds a patch per live entity"
    );
    assert!(
        o.squeezed.0 > 0 && o.squeezed.0 <= 4 << 20,
        "squeezed to {}",
        o.squeezed.0
    );
    assert_eq!(o.squeezed.1, 0, "held ≤ budget once the squeeze settled");
    assert_eq!(o.budget.errors, 0, "the render world logged no errors");
    assert!(
        o.budget.drawn.iter().sum::<u64>() > 0,
        "the GPU drew trees: {:?}",
        o.budget.drawn
    );
    assert!(
        o.drawn_pixels > 1000,
        "the screenshot shows the forest and the ground"
    );
    assert!(o.exit.error.is_none(), "{:?}", o.exit.error);
    assert!(o.exit.leaks.is_empty(), "{:?}", o.exit.leaks);
    assert_eq!(
        o.exit.messages.layer + o.exit.messages.wgpu,
        0,
        "{:?}",
        o.exit.messages.texts
    );
}
