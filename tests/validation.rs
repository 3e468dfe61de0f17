//! The validation harness itself: a clean context is silent, and a real violation is caught.

mod common;

use ash::vk;

#[test]
fn clean_context_has_zero_validation_messages() {
    let Some(ctx) = common::context("clean_context_has_zero_validation_messages") else {
        return;
    };
    assert!(ctx.validation_enabled());
    let v = ctx.completed_value().expect("timeline");
    assert_eq!(v, 0);
    let done = ctx.submit_and_wait(|_, _| Ok(())).expect("empty submit");
    assert_eq!(done.value(), 1);
    assert!(ctx.completed_value().unwrap() >= 1);
    common::finish(ctx, "clean context");
}

#[test]
fn harness_catches_a_real_violation() {
    let Some(ctx) = common::context("harness_catches_a_real_violation") else {
        return;
    };
    // VUID-VkBufferCreateInfo-usage-requiredbitmask: usage must not be 0. Drivers accept it,
    // so the call is harmless, but the layer must report it.
    let info = vk::BufferCreateInfo::default()
        .size(64)
        .usage(vk::BufferUsageFlags::empty())
        .sharing_mode(vk::SharingMode::EXCLUSIVE);
    // SAFETY: deliberately invalid usage flags; the buffer is destroyed right away.
    let made = unsafe { ctx.device().create_buffer(&info, None) };
    if let Ok(b) = made {
        // SAFETY: never used.
        unsafe { ctx.device().destroy_buffer(b, None) };
    }
    let canary = ctx.canary().clone();
    assert!(canary.errors() >= 1, "the canary missed a validation error");
    let messages = canary.drain();
    assert!(
        messages
            .iter()
            .any(|m| m.id.contains("VkBufferCreateInfo-usage")),
        "expected the usage VUID, got {messages:?}"
    );
    let before = canary.total();
    drop(ctx);
    assert_eq!(canary.total(), before, "teardown itself must be clean");
}

#[test]
fn waiting_for_an_unsubmitted_value_is_a_typed_error() {
    let Some(ctx) = common::context("waiting_for_an_unsubmitted_value") else {
        return;
    };
    let err = ctx
        .wait(5, std::time::Duration::from_millis(1))
        .unwrap_err();
    assert!(matches!(err, understory::Error::Lifecycle(_)), "{err}");
    common::finish(ctx, "unsubmitted wait");
}
