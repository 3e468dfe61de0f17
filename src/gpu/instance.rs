//! The Vulkan instance: loader, validation layer, messenger.

use std::ffi::{CStr, CString};
use std::sync::Arc;

use ash::vk;

use crate::error::{Error, Result, vk_err};
use crate::gpu::adapter::Adapter;
use crate::gpu::debug::{Canary, Messenger, messenger_create_info};

/// The Khronos validation layer's name.
pub const VALIDATION_LAYER: &CStr = c"VK_LAYER_KHRONOS_validation";

/// Whether to run under the Khronos validation layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validation {
    /// Never load the layer.
    Off,
    /// Load it when installed; run without it otherwise (logged).
    IfAvailable,
    /// Fail with [`Error::ValidationUnavailable`] when it is not installed.
    Required,
}

impl Validation {
    /// Parses `UNDERSTORY_VALIDATION`'s value: `0`/`off`, `1`/`on`, `required`, or
    /// `gpu-assisted` (required, with GPU-assisted validation: see
    /// [`Validation::parse_env`]).
    pub fn parse(s: &str) -> Result<Self> {
        Self::parse_env(s).map(|(v, _)| v)
    }

    /// As [`Validation::parse`], and whether the value asks for GPU-assisted validation.
    pub fn parse_env(s: &str) -> Result<(Self, bool)> {
        match s.trim().to_ascii_lowercase().as_str() {
            "0" | "off" | "false" | "no" => Ok((Self::Off, false)),
            "1" | "on" | "true" | "yes" => Ok((Self::IfAvailable, false)),
            "required" | "require" | "2" => Ok((Self::Required, false)),
            "gpu-assisted" | "gpu_assisted" | "gpuav" => Ok((Self::Required, true)),
            other => Err(Error::InvalidInput(format!(
                "UNDERSTORY_VALIDATION={other:?}: expected 0, 1, required or gpu-assisted"
            ))),
        }
    }
}

/// Instance settings. `Default` turns validation on (if installed) in debug builds only.
#[derive(Clone, Debug)]
pub struct InstanceOptions {
    /// Application name reported to the driver.
    pub app_name: String,
    /// Validation layer policy.
    pub validation: Validation,
    /// Also enable synchronization validation (needs the layer; slower).
    pub sync_validation: bool,
    /// Also enable GPU-assisted validation (`VK_VALIDATION_FEATURE_ENABLE_GPU_ASSISTED_EXT`):
    /// the layer instruments shaders to check what the GPU itself reads, such as indirect
    /// arguments and descriptor indices (needs the layer; much slower).
    pub gpu_assisted: bool,
}

impl Default for InstanceOptions {
    fn default() -> Self {
        Self {
            app_name: "understory".into(),
            validation: if cfg!(debug_assertions) {
                Validation::IfAvailable
            } else {
                Validation::Off
            },
            sync_validation: false,
            gpu_assisted: false,
        }
    }
}

impl InstanceOptions {
    /// Applies `UNDERSTORY_VALIDATION=0|1|required|gpu-assisted` and
    /// `UNDERSTORY_SYNC_VALIDATION=0|1`, which override what the code asked for. A malformed
    /// value is an error, not ignored.
    pub fn with_env(mut self) -> Result<Self> {
        if let Ok(v) = std::env::var("UNDERSTORY_VALIDATION") {
            let (validation, gpu_assisted) = Validation::parse_env(&v)?;
            self.validation = validation;
            self.gpu_assisted |= gpu_assisted;
        }
        if let Ok(v) = std::env::var("UNDERSTORY_SYNC_VALIDATION") {
            self.sync_validation = match v.trim() {
                "0" | "" | "off" => false,
                "1" | "on" => true,
                other => {
                    return Err(Error::InvalidInput(format!(
                        "UNDERSTORY_SYNC_VALIDATION={other:?}: expected 0 or 1"
                    )));
                }
            };
        }
        Ok(self)
    }
}

/// Loads the Vulkan loader, mapping failure to a message that says what to install.
pub fn load_entry() -> Result<ash::Entry> {
    // SAFETY: loading libvulkan runs its initialisers; the Vulkan loader is designed for that.
    unsafe { ash::Entry::load() }.map_err(|e| Error::LoaderMissing {
        reason: e.to_string(),
    })
}

/// A Vulkan instance with an optional validation messenger and its canary.
pub struct Instance {
    pub(crate) entry: ash::Entry,
    pub(crate) raw: ash::Instance,
    messenger: Option<Messenger>,
    canary: Arc<Canary>,
    validation: bool,
    api_version: u32,
    owned: bool,
}

impl Instance {
    /// Creates an instance at Vulkan 1.3 where the loader has it, else 1.2.
    pub fn new(options: &InstanceOptions) -> Result<Self> {
        let entry = load_entry()?;
        // SAFETY: a global query on a loaded entry.
        let loader_version = unsafe { entry.try_enumerate_instance_version() }
            .map_err(vk_err("vkEnumerateInstanceVersion"))?
            .unwrap_or(vk::API_VERSION_1_0);
        if loader_version < vk::API_VERSION_1_2 {
            return Err(Error::Unsupported(format!(
                "the Vulkan loader is {}, understory needs 1.2",
                crate::gpu::adapter::format_version(loader_version)
            )));
        }
        let api_version = loader_version.min(vk::API_VERSION_1_3);

        // SAFETY: global queries on a loaded entry.
        let layers = unsafe { entry.enumerate_instance_layer_properties() }
            .map_err(vk_err("vkEnumerateInstanceLayerProperties"))?;
        let have_layer = layers
            .iter()
            .any(|l| l.layer_name_as_c_str() == Ok(VALIDATION_LAYER));
        let validation = match (options.validation, have_layer) {
            (Validation::Off, _) => false,
            (_, true) => true,
            (Validation::IfAvailable, false) => {
                log::warn!(
                    "validation requested but VK_LAYER_KHRONOS_validation is not installed; running without it"
                );
                false
            }
            (Validation::Required, false) => return Err(Error::ValidationUnavailable),
        };
        // SAFETY: as above.
        let exts = unsafe { entry.enumerate_instance_extension_properties(None) }
            .map_err(vk_err("vkEnumerateInstanceExtensionProperties"))?;
        let has_debug_utils = exts
            .iter()
            .any(|e| e.extension_name_as_c_str() == Ok(ash::ext::debug_utils::NAME));
        let debug_utils = validation && has_debug_utils;
        if validation && !debug_utils {
            return Err(Error::Unsupported(
                "validation needs VK_EXT_debug_utils, which the loader does not offer".into(),
            ));
        }

        let app_name = CString::new(options.app_name.replace('\0', "")).unwrap_or_default();
        let app = vk::ApplicationInfo::default()
            .application_name(&app_name)
            .engine_name(c"understory")
            .engine_version(vk::make_api_version(0, 0, 1, 0))
            .api_version(api_version);
        let layer_names = if validation {
            vec![VALIDATION_LAYER.as_ptr()]
        } else {
            vec![]
        };
        let mut ext_names = vec![];
        if debug_utils {
            ext_names.push(ash::ext::debug_utils::NAME.as_ptr());
        }
        let canary = Canary::new();
        let mut dbg = messenger_create_info(&canary);
        let mut enables = Vec::new();
        if options.sync_validation {
            enables.push(vk::ValidationFeatureEnableEXT::SYNCHRONIZATION_VALIDATION);
        }
        if options.gpu_assisted {
            enables.push(vk::ValidationFeatureEnableEXT::GPU_ASSISTED);
        }
        let mut features =
            vk::ValidationFeaturesEXT::default().enabled_validation_features(&enables);
        let features_on = validation && !enables.is_empty();
        if features_on {
            // VK_EXT_validation_features is provided by the layer itself.
            ext_names.push(ash::ext::validation_features::NAME.as_ptr());
        }
        let mut info = vk::InstanceCreateInfo::default()
            .application_info(&app)
            .enabled_layer_names(&layer_names)
            .enabled_extension_names(&ext_names);
        if debug_utils {
            info = info.push_next(&mut dbg);
        }
        if features_on {
            info = info.push_next(&mut features);
        }
        // SAFETY: every pointer in `info` refers to locals alive for the call; the messenger
        // info's user data is the canary, which this Instance keeps alive.
        let raw = unsafe { entry.create_instance(&info, None) }.map_err(|e| match e {
            vk::Result::ERROR_INCOMPATIBLE_DRIVER => Error::NoDevice {
                detail: "vkCreateInstance: no compatible driver (VK_ERROR_INCOMPATIBLE_DRIVER)"
                    .into(),
            },
            e => Error::vk("vkCreateInstance", e),
        })?;
        let messenger = if debug_utils {
            // SAFETY: debug_utils was enabled on `raw`; destroyed in Drop before the instance.
            match unsafe { Messenger::new(&entry, &raw, &canary) } {
                Ok(m) => Some(m),
                Err(e) => {
                    // SAFETY: nothing was created from `raw` yet.
                    unsafe { raw.destroy_instance(None) };
                    return Err(e);
                }
            }
        } else {
            None
        };
        log::debug!(
            "Vulkan instance {} (validation {}, sync validation {}, GPU-assisted {})",
            crate::gpu::adapter::format_version(api_version),
            validation,
            validation && options.sync_validation,
            validation && options.gpu_assisted
        );
        Ok(Self {
            entry,
            raw,
            messenger,
            canary,
            validation,
            api_version,
            owned: true,
        })
    }

    /// Wraps a host's instance. When `debug_utils_enabled`, understory adds its own messenger
    /// (destroyed with this object) so that its canary sees the host's validation messages too.
    ///
    /// # Safety
    /// `raw` must be a live instance created from `entry` with `api_version >= 1.2`, outliving
    /// this object; `debug_utils_enabled` must be true only if `VK_EXT_debug_utils` is enabled.
    pub(crate) unsafe fn from_raw(
        entry: ash::Entry,
        raw: ash::Instance,
        api_version: u32,
        debug_utils_enabled: bool,
    ) -> Result<Self> {
        let canary = Canary::new();
        let messenger = if debug_utils_enabled {
            // SAFETY: the caller guarantees debug utils is enabled and the instance outlives us.
            Some(unsafe { Messenger::new(&entry, &raw, &canary) }?)
        } else {
            None
        };
        Ok(Self {
            entry,
            raw,
            validation: messenger.is_some(),
            messenger,
            canary,
            api_version,
            owned: false,
        })
    }

    /// The ash instance.
    pub fn raw(&self) -> &ash::Instance {
        &self.raw
    }

    /// The ash entry (loader).
    pub fn entry(&self) -> &ash::Entry {
        &self.entry
    }

    /// The canary that counts validation warnings and errors.
    pub fn canary(&self) -> &Arc<Canary> {
        &self.canary
    }

    /// Whether the validation layer (or, for a host instance, a debug messenger) is active.
    pub fn validation_enabled(&self) -> bool {
        self.validation
    }

    /// The instance's API version.
    pub fn api_version(&self) -> u32 {
        self.api_version
    }

    /// Every physical device with what it offers, in enumeration order.
    pub fn adapters(&self) -> Result<Vec<Adapter>> {
        // SAFETY: the instance is alive.
        let handles = unsafe { self.raw.enumerate_physical_devices() }.map_err(|e| match e {
            vk::Result::ERROR_INITIALIZATION_FAILED => Error::NoDevice {
                detail: "vkEnumeratePhysicalDevices: VK_ERROR_INITIALIZATION_FAILED".into(),
            },
            e => Error::vk("vkEnumeratePhysicalDevices", e),
        })?;
        handles
            .into_iter()
            .enumerate()
            // SAFETY: handles come from this instance, which is >= 1.2.
            .map(|(i, h)| unsafe { Adapter::query(&self.raw, i, h) })
            .collect()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(m) = self.messenger.as_mut() {
            // SAFETY: the instance is still alive; destroyed once.
            unsafe { m.destroy() };
        }
        if self.owned {
            // SAFETY: we created it, and every child (device, messenger) is gone by now: Context
            // destroys its device before dropping its Instance.
            unsafe { self.raw.destroy_instance(None) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_values() {
        assert_eq!(Validation::parse("0").unwrap(), Validation::Off);
        assert_eq!(Validation::parse("1").unwrap(), Validation::IfAvailable);
        assert_eq!(Validation::parse("Required").unwrap(), Validation::Required);
        assert!(matches!(
            Validation::parse("maybe"),
            Err(Error::InvalidInput(_))
        ));
    }
}
