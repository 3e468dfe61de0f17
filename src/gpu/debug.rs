//! Validation messages: a debug-utils messenger that maps severities to `log` levels and feeds a
//! [`Canary`] that tests drain after every GPU operation. Any error or warning is a test failure.

use std::ffi::{CStr, c_void};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use ash::vk;

use crate::error::{Result, vk_err};

/// How severe a recorded message was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// `VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT`.
    Warning,
    /// `VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT`.
    Error,
}

/// One validation (or driver) message of warning or error severity.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ValidationMessage {
    /// Warning or error.
    pub severity: Severity,
    /// The VUID or message-id name, e.g. `VUID-vkCmdDispatch-None-02697`.
    pub id: String,
    /// The full text.
    pub text: String,
}

impl std::fmt::Display for ValidationMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{:?}] {}: {}", self.severity, self.id, self.text)
    }
}

/// Messages that are known to be wrong or outside our control, with the reason. Each entry is a
/// message-id name; a message whose id matches is logged at info level and not counted.
///
/// Empty: nothing has needed suppressing on lavapipe 22.3 + layers 1.3.239 or NVIDIA 580.
pub const SUPPRESSED: &[(&str, &str)] = &[];

/// The most messages kept for inspection; the counters keep counting past it.
const KEPT_MESSAGES: usize = 256;

/// Counts every validation warning and error since it was created, and keeps the first few for
/// inspection. Shared (`Arc`) between the messenger callback and whoever checks it.
///
/// Only a debug-utils messenger feeds it (understory's, or a host's made with
/// [`messenger_create_info`]); messages cannot be forged:
///
/// ```compile_fail,E0624
/// use understory::gpu::debug::{Canary, Severity, ValidationMessage};
/// let canary = Canary::new();
/// canary.record(ValidationMessage { // method `record` is private
///     severity: Severity::Error,
///     id: "forged".into(),
///     text: String::new(),
/// });
/// ```
#[derive(Debug, Default)]
pub struct Canary {
    errors: AtomicU64,
    warnings: AtomicU64,
    messages: Mutex<Vec<ValidationMessage>>,
}

impl Canary {
    /// A fresh, empty canary.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Errors counted since creation (draining does not reset this).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Warnings counted since creation (draining does not reset this).
    pub fn warnings(&self) -> u64 {
        self.warnings.load(Ordering::Relaxed)
    }

    /// Errors plus warnings since creation.
    pub fn total(&self) -> u64 {
        self.errors() + self.warnings()
    }

    /// Takes the messages kept since the last drain.
    pub fn drain(&self) -> Vec<ValidationMessage> {
        std::mem::take(&mut *self.messages.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Records one message; called by the messenger. Not public, so that only a messenger
    /// (understory's own, or one a host creates from [`messenger_create_info`]) feeds it: a
    /// count of zero means the layer said nothing.
    pub(crate) fn record(&self, message: ValidationMessage) {
        match message.severity {
            Severity::Error => self.errors.fetch_add(1, Ordering::Relaxed),
            Severity::Warning => self.warnings.fetch_add(1, Ordering::Relaxed),
        };
        let mut kept = self.messages.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() < KEPT_MESSAGES {
            kept.push(message);
        }
    }
}

/// The callback. `user_data` is `Arc::as_ptr` of a [`Canary`] that outlives the messenger.
unsafe extern "system" fn callback(
    severity: vk::DebugUtilsMessageSeverityFlagsEXT,
    types: vk::DebugUtilsMessageTypeFlagsEXT,
    data: *const vk::DebugUtilsMessengerCallbackDataEXT<'_>,
    user_data: *mut c_void,
) -> vk::Bool32 {
    // SAFETY: the loader passes a valid callback-data pointer for the duration of the call.
    let Some(data) = (unsafe { data.as_ref() }) else {
        return vk::FALSE;
    };
    // SAFETY: the strings in callback data are null or valid NUL-terminated for the call.
    let id = unsafe { data.message_id_name_as_c_str() }
        .map(CStr::to_string_lossy)
        .unwrap_or_default()
        .into_owned();
    // SAFETY: as above.
    let text = unsafe { data.message_as_c_str() }
        .map(CStr::to_string_lossy)
        .unwrap_or_default()
        .into_owned();
    let level = if severity.contains(vk::DebugUtilsMessageSeverityFlagsEXT::ERROR) {
        log::Level::Error
    } else if severity.contains(vk::DebugUtilsMessageSeverityFlagsEXT::WARNING) {
        log::Level::Warn
    } else if severity.contains(vk::DebugUtilsMessageSeverityFlagsEXT::INFO) {
        log::Level::Debug
    } else {
        log::Level::Trace
    };
    if let Some((_, why)) = SUPPRESSED.iter().find(|(sid, _)| *sid == id) {
        log::info!(target: "understory::vulkan", "suppressed {id} ({why}): {text}");
        return vk::FALSE;
    }
    log::log!(target: "understory::vulkan", level, "{types:?} {id}: {text}");
    let severity = match level {
        log::Level::Error => Severity::Error,
        log::Level::Warn => Severity::Warning,
        _ => return vk::FALSE,
    };
    // SAFETY: user_data is the canary pointer given at messenger creation; the owner keeps the
    // Arc alive until after the messenger (or instance) is destroyed.
    if let Some(canary) = unsafe { (user_data as *const Canary).as_ref() } {
        canary.record(ValidationMessage { severity, id, text });
    }
    vk::FALSE
}

/// Create-info for a messenger that feeds `canary`. understory chains it into
/// `VkInstanceCreateInfo` so that messages from instance creation and destruction are caught; a
/// host can use it for its own messenger. The canary must outlive every messenger made from it.
pub fn messenger_create_info(
    canary: &Arc<Canary>,
) -> vk::DebugUtilsMessengerCreateInfoEXT<'static> {
    vk::DebugUtilsMessengerCreateInfoEXT::default()
        .message_severity(
            vk::DebugUtilsMessageSeverityFlagsEXT::ERROR
                | vk::DebugUtilsMessageSeverityFlagsEXT::WARNING
                | vk::DebugUtilsMessageSeverityFlagsEXT::INFO,
        )
        .message_type(
            vk::DebugUtilsMessageTypeFlagsEXT::GENERAL
                | vk::DebugUtilsMessageTypeFlagsEXT::VALIDATION
                | vk::DebugUtilsMessageTypeFlagsEXT::PERFORMANCE,
        )
        .pfn_user_callback(Some(callback))
        .user_data(Arc::as_ptr(canary) as *mut c_void)
}

/// A debug-utils messenger created by understory, feeding a canary it keeps alive.
pub(crate) struct Messenger {
    loader: ash::ext::debug_utils::Instance,
    handle: vk::DebugUtilsMessengerEXT,
    _canary: Arc<Canary>,
}

impl Messenger {
    /// # Safety
    /// `instance` must have been created with `VK_EXT_debug_utils` enabled and must outlive the
    /// returned messenger, which must be destroyed with [`Messenger::destroy`].
    pub(crate) unsafe fn new(
        entry: &ash::Entry,
        instance: &ash::Instance,
        canary: &Arc<Canary>,
    ) -> Result<Self> {
        let loader = ash::ext::debug_utils::Instance::new(entry, instance);
        let info = messenger_create_info(canary);
        // SAFETY: the caller guarantees VK_EXT_debug_utils is enabled on `instance`; the canary
        // pointer stays valid because we hold an Arc to it for the messenger's lifetime.
        let handle = unsafe { loader.create_debug_utils_messenger(&info, None) }
            .map_err(vk_err("vkCreateDebugUtilsMessengerEXT"))?;
        Ok(Self {
            loader,
            handle,
            _canary: canary.clone(),
        })
    }

    /// # Safety
    /// Must be called before the instance is destroyed, once.
    pub(crate) unsafe fn destroy(&mut self) {
        // SAFETY: the handle was created from this loader's instance, which is still alive.
        unsafe { self.loader.destroy_debug_utils_messenger(self.handle, None) };
        self.handle = vk::DebugUtilsMessengerEXT::null();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canary_counts_and_drains() {
        let c = Canary::new();
        c.record(ValidationMessage {
            severity: Severity::Error,
            id: "VUID-x".into(),
            text: "bad".into(),
        });
        c.record(ValidationMessage {
            severity: Severity::Warning,
            id: "W".into(),
            text: "meh".into(),
        });
        assert_eq!((c.errors(), c.warnings(), c.total()), (1, 1, 2));
        assert_eq!(c.drain().len(), 2);
        assert!(c.drain().is_empty());
        assert_eq!(c.total(), 2, "drain keeps the counters");
    }

    #[test]
    fn canary_keeps_a_bounded_number_of_messages() {
        let c = Canary::new();
        for i in 0..KEPT_MESSAGES + 10 {
            c.record(ValidationMessage {
                severity: Severity::Warning,
                id: i.to_string(),
                text: String::new(),
            });
        }
        assert_eq!(c.warnings() as usize, KEPT_MESSAGES + 10);
        assert_eq!(c.drain().len(), KEPT_MESSAGES);
    }
}
