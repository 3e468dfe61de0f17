//! The one error type of understory.
//!
//! Variants are ordered by what the caller can do about them: shed load, free memory, rebuild the
//! device, install something, fix the input, or report a driver failure.

use ash::vk;

/// Result with understory's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the Debian/Ubuntu packages are called that bring a Vulkan loader, a CPU driver and the
/// validation layer. Every "not installed" message names them.
pub const INSTALL_HINT: &str = "on Debian/Ubuntu: apt-get install libvulkan1 mesa-vulkan-drivers \
                                vulkan-validationlayers (mesa-vulkan-drivers brings lavapipe, a CPU \
                                driver; a GPU needs its vendor's Vulkan driver)";

/// Everything that can go wrong in understory. New variants may be added in minor releases.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An allocation would push its category over its cap, or its heap over the driver's budget.
    /// Nothing was allocated. Shed load (lower LOD, evict) and try again.
    #[error(
        "over budget: {what} needs {requested} bytes but only {available} bytes are left under the cap"
    )]
    OverBudget {
        /// What was being allocated.
        what: String,
        /// Bytes requested.
        requested: u64,
        /// Bytes still available under the cap or budget.
        available: u64,
    },
    /// The driver refused memory (`VK_ERROR_OUT_OF_DEVICE_MEMORY`).
    #[error("out of device memory in {call}")]
    OutOfDeviceMemory {
        /// The Vulkan call or operation that failed.
        call: &'static str,
    },
    /// The driver ran out of host memory (`VK_ERROR_OUT_OF_HOST_MEMORY`).
    #[error("out of host memory in {call}")]
    OutOfHostMemory {
        /// The Vulkan call that failed.
        call: &'static str,
    },
    /// A wait for the GPU ran out of time. Nothing it guarded was destroyed: those objects stay
    /// alive (and are reported as leaks at shutdown if the GPU never finishes).
    #[error("timed out after {waited_ms} ms waiting for {what}")]
    Timeout {
        /// What was waited for (a timeline value, a one-shot submission, shutdown).
        what: String,
        /// How long the wait lasted.
        waited_ms: u64,
    },
    /// The answer needs GPU progress that understory cannot wait for: a frame whose completion
    /// the host reports itself ([`FrameSignal::HostReported`](crate::gpu::timeline::FrameSignal))
    /// has not been reported yet. Report it, then call again.
    #[error("not ready: {0}")]
    NotReady(String),
    /// The device was lost (`VK_ERROR_DEVICE_LOST`); every object of this context is unusable.
    #[error("device lost in {call}")]
    DeviceLost {
        /// The Vulkan call that reported it.
        call: &'static str,
    },
    /// No Vulkan loader (`libvulkan.so.1`) could be loaded.
    #[error("no Vulkan loader could be loaded ({reason}); {INSTALL_HINT}")]
    LoaderMissing {
        /// Why loading failed, as the dynamic linker put it.
        reason: String,
    },
    /// The loader works but no usable Vulkan device (driver) is present.
    #[error("no usable Vulkan device: {detail}; {INSTALL_HINT}")]
    NoDevice {
        /// What was found and why it did not qualify.
        detail: String,
    },
    /// Validation was required but the Khronos validation layer is not installed.
    #[error(
        "validation was required but VK_LAYER_KHRONOS_validation is not installed; {INSTALL_HINT}"
    )]
    ValidationUnavailable,
    /// The device or driver lacks something understory needs.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The caller passed something that cannot be honoured.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A call out of order: a frame begun while another is open, a submission after
    /// [`Context::shutdown`](crate::gpu::context::Context::shutdown), an object of another
    /// context, a frame value that was never submitted.
    #[error("lifecycle: {0}")]
    Lifecycle(String),
    /// gpu-allocator refused a request for a reason other than memory exhaustion (which is
    /// [`Error::OutOfDeviceMemory`]) or an unusable request (which is [`Error::InvalidInput`]).
    #[error("gpu-allocator: {0}")]
    Allocator(#[source] gpu_allocator::AllocationError),
    /// Any other Vulkan error.
    #[error("{call} failed: {result}")]
    Vulkan {
        /// The Vulkan call that failed.
        call: &'static str,
        /// The code it returned.
        result: vk::Result,
    },
}

impl Error {
    /// Maps a `VkResult` error code from `call` to the most specific variant.
    pub fn vk(call: &'static str, result: vk::Result) -> Self {
        match result {
            vk::Result::ERROR_OUT_OF_DEVICE_MEMORY => Error::OutOfDeviceMemory { call },
            vk::Result::ERROR_OUT_OF_HOST_MEMORY => Error::OutOfHostMemory { call },
            vk::Result::ERROR_DEVICE_LOST => Error::DeviceLost { call },
            result => Error::Vulkan { call, result },
        }
    }
}

/// `map_err` helper: `unsafe { device.create_x(..) }.map_err(vk_err("vkCreateX"))?`.
pub fn vk_err(call: &'static str) -> impl Fn(vk::Result) -> Error {
    move |result| Error::vk(call, result)
}

impl From<gpu_allocator::AllocationError> for Error {
    fn from(e: gpu_allocator::AllocationError) -> Self {
        use gpu_allocator::AllocationError as A;
        match e {
            A::OutOfMemory => Error::OutOfDeviceMemory {
                call: "gpu-allocator allocate",
            },
            A::NoCompatibleMemoryTypeFound => {
                Error::Unsupported("no memory type fits the request".into())
            }
            A::InvalidAllocationCreateDesc => {
                Error::InvalidInput("gpu-allocator: invalid allocation request".into())
            }
            other => Error::Allocator(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vk_codes_map_to_actionable_variants() {
        assert!(matches!(
            Error::vk("x", vk::Result::ERROR_OUT_OF_DEVICE_MEMORY),
            Error::OutOfDeviceMemory { call: "x" }
        ));
        assert!(matches!(
            Error::vk("x", vk::Result::ERROR_DEVICE_LOST),
            Error::DeviceLost { .. }
        ));
        assert!(matches!(
            Error::vk("x", vk::Result::ERROR_INITIALIZATION_FAILED),
            Error::Vulkan { .. }
        ));
    }

    #[test]
    fn install_messages_name_the_packages() {
        let msg = Error::NoDevice {
            detail: "0 physical devices".into(),
        }
        .to_string();
        assert!(msg.contains("mesa-vulkan-drivers"), "{msg}");
        let msg = Error::LoaderMissing {
            reason: "libvulkan.so.1: not found".into(),
        }
        .to_string();
        assert!(msg.contains("libvulkan1"), "{msg}");
    }
}
