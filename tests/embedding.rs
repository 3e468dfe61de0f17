//! Embedding, done the way a host engine would: the host creates its own instance and device,
//! hands them to understory, runs a dispatch through it, tears understory down, then destroys its
//! own objects, with zero validation messages. The code is `examples/embed.rs`.

mod common;

#[path = "../examples/embed.rs"]
mod embed;

#[test]
fn host_owned_device_runs_understory_with_zero_validation_messages() {
    let test = "host_owned_device_runs_understory";
    // The same checks as the harness: is there a device and a validation layer at all?
    let Some(probe) = common::context(test) else {
        return;
    };
    drop(probe);
    let outcome = embed::run(true).expect("embedded run");
    assert!(
        outcome.scan_matches,
        "GPU scan differs from the CPU reference"
    );
    assert_eq!(outcome.understory_messages, 0, "understory's canary");
    assert_eq!(
        outcome.host_messages, 0,
        "the host's canary, teardown included"
    );
}
