//! The test is the host engine: its own instance, device, queue, command buffers, fences,
//! semaphores and render targets; understory through `Context::from_raw`; 240 frames with
//! churn, a budget squeeze and draws inside the engine's rendering scope, in each of the three
//! ways an engine can synchronize. Zero validation messages (the engine's messenger and
//! understory's), nothing leaked, and the engine's objects work after understory is gone.
//! The code is `examples/host_engine.rs`.

mod common;

#[path = "../examples/host_engine.rs"]
mod host_engine;

use host_engine::{Options, Sync, run};

fn check(sync: Sync, frames: u32) {
    let test = format!("host_engine_{sync:?}");
    // The same checks as the harness: is there a device and a validation layer at all?
    let Some(probe) = common::context(&test) else {
        return;
    };
    drop(probe);
    let gpu_assisted = common::options().instance.gpu_assisted;
    let outcome = run(&Options {
        frames,
        sync,
        validation: true,
        gpu_assisted,
        ..Options::default()
    })
    .expect("the engine's run");
    eprintln!("{test}: {outcome:?}");
    assert_eq!(outcome.frames, frames);
    assert_eq!(
        outcome.host_messages, 0,
        "the engine's messenger, teardown included"
    );
    assert_eq!(outcome.understory_messages, 0, "understory's canary");
    assert_eq!(outcome.leaks, 0, "nothing alive at shutdown");
    assert!(outcome.churned >= u64::from(frames) * 4);
    assert!(outcome.deferred_frees > 0, "despawned patches were freed");
    assert_eq!(
        outcome.over_budget_frames, 0,
        "held within the squeezed budget once settled ({} bytes)",
        outcome.squeezed_budget
    );
    assert!(
        outcome.drawn_pixels > 1000,
        "trees and ground drawn into the engine's image: {} pixels",
        outcome.drawn_pixels
    );
    assert!(
        outcome.host_usable_after,
        "the engine's device works after understory"
    );
}

#[test]
fn an_engine_reporting_completion_from_its_fences() {
    check(Sync::Fence, 240);
}

#[test]
fn an_engine_signalling_its_own_timeline() {
    check(Sync::HostTimeline, 60);
}

#[test]
fn an_engine_signalling_understorys_timeline() {
    check(Sync::Timeline, 60);
}
