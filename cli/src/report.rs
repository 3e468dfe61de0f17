//! The budget report behind `understory budget`: every physical device, every heap, as a table
//! or as JSON (schema `understory.budget/1`, documented in the README).

use serde::Serialize;

use understory::error::Result;
use understory::gpu::adapter::{Adapter, DeviceSelector, DeviceType, format_version};
use understory::gpu::budget::{DriverBudget, HeapBudget, HeapBudgets, Source};
use understory::gpu::instance::Instance;

/// Identifies the JSON layout; bumped on any incompatible change.
pub const SCHEMA: &str = "understory.budget/1";

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct BudgetReport {
    /// Always [`SCHEMA`].
    pub schema: &'static str,
    /// One entry per physical device (or the selected one).
    pub devices: Vec<DeviceBudget>,
}

/// One device's heaps.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceBudget {
    /// Enumeration index (what `--device N` selects).
    pub index: usize,
    /// Device name.
    pub name: String,
    /// Discrete, integrated, virtual, cpu, other.
    #[serde(rename = "type")]
    pub device_type: DeviceType,
    /// Vulkan version, `major.minor.patch`.
    pub api_version: String,
    /// Driver name and version.
    pub driver: String,
    /// Whether `VK_EXT_memory_budget` is supported (budget source `ext`).
    pub memory_budget_ext: bool,
    /// Heaps.
    pub heaps: Vec<HeapBudget>,
}

/// Reads every device's budget (or only the selected one's). Usage without the extension is 0:
/// this process holds nothing.
pub fn budget_report(
    instance: &Instance,
    selector: Option<&DeviceSelector>,
) -> Result<BudgetReport> {
    let adapters = instance.adapters()?;
    let chosen: Vec<&Adapter> = match selector {
        None => adapters.iter().collect(),
        Some(sel) => {
            // Selection among all devices, suitable or not: this is a report, not a context.
            let i = match sel {
                DeviceSelector::Index(i) => adapters.iter().position(|a| a.index == *i),
                DeviceSelector::Name(n) => adapters
                    .iter()
                    .position(|a| a.name.to_lowercase().contains(n.as_str())),
            }
            .ok_or_else(|| {
                understory::Error::InvalidInput(format!(
                    "no device matches {sel:?}; there are {} device(s)",
                    adapters.len()
                ))
            })?;
            vec![&adapters[i]]
        }
    };
    if adapters.is_empty() {
        return Err(understory::Error::NoDevice {
            detail: "the Vulkan loader reports 0 physical devices".into(),
        });
    }
    let mut devices = Vec::new();
    for a in chosen {
        // SAFETY: the adapter comes from this instance, which outlives the source (dropped at
        // the end of this iteration).
        let source = unsafe {
            DriverBudget::new(instance.raw().clone(), a.handle, a.supported.memory_budget)
        };
        let mut hb = HeapBudgets::new(Box::new(source));
        let heaps = hb.refresh(&[])?.to_vec();
        devices.push(DeviceBudget {
            index: a.index,
            name: a.name.clone(),
            device_type: a.device_type,
            api_version: format_version(a.api_version),
            driver: a.driver.clone(),
            memory_budget_ext: a.supported.memory_budget,
            heaps,
        });
    }
    Ok(BudgetReport {
        schema: SCHEMA,
        devices,
    })
}

/// Bytes as MiB below 10 GiB, else GiB, with one decimal.
pub fn human_bytes(b: u64) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    const GIB: f64 = (1u64 << 30) as f64;
    let b = b as f64;
    if b >= 10.0 * GIB {
        format!("{:.1} GiB", b / GIB)
    } else {
        format!("{:.1} MiB", b / MIB)
    }
}

impl BudgetReport {
    /// A human table, one block per device.
    pub fn to_table(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        for d in &self.devices {
            let _ = writeln!(
                s,
                "GPU {}: {} ({:?}, Vulkan {}, {}) — budget source: {}",
                d.index,
                d.name,
                d.device_type,
                d.api_version,
                d.driver,
                if d.memory_budget_ext {
                    "VK_EXT_memory_budget"
                } else {
                    "estimated (no VK_EXT_memory_budget: budget = 80% of size, usage = understory's own)"
                }
            );
            let _ = writeln!(
                s,
                "  {:>4}  {:<12}  {:>12}  {:>12}  {:>12}  {:>12}  {:<9}",
                "heap", "flags", "size", "budget", "usage", "headroom", "source"
            );
            for h in &d.heaps {
                let source = match (h.source, h.clamped, h.usage_estimated) {
                    (Source::Ext, Some(c), u) => format!(
                        "ext (budget {c:?}: estimated{})",
                        if u { ", usage estimated" } else { "" }
                    ),
                    (Source::Ext, None, true) => "ext (usage over size: estimated)".into(),
                    (src, _, _) => src.to_string(),
                };
                let _ = writeln!(
                    s,
                    "  {:>4}  {:<12}  {:>12}  {:>12}  {:>12}  {:>12}  {:<9}",
                    h.index,
                    if h.device_local {
                        "device-local"
                    } else {
                        "host"
                    },
                    human_bytes(h.size),
                    human_bytes(h.budget),
                    human_bytes(h.usage),
                    human_bytes(h.headroom()),
                    source
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0.0 MiB");
        assert_eq!(human_bytes(1 << 20), "1.0 MiB");
        assert_eq!(human_bytes(2 << 30), "2048.0 MiB");
        assert_eq!(human_bytes(140 << 30), "140.0 GiB");
    }
}
