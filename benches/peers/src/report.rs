//! The per-device table (markdown) and the JSON document.

use std::fmt::Write as _;

use serde::Serialize;

use crate::common::{MIB, StackReport, Workload};

/// One table cell: its text, and the number a ratio to understory is computed from.
type Cell = Option<(String, Option<f64>)>;

/// Everything one run measured on one device.
#[derive(Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub device: String,
    pub device_type: String,
    pub driver: String,
    pub api_version: String,
    pub memory_budget_ext: bool,
    pub workload: Workload,
    pub stacks: Vec<StackReport>,
}

/// `12.3 MiB`, `4.0 KiB`, `17 B`.
pub fn bytes(b: u64) -> String {
    let b = b as f64;
    if b >= MIB as f64 {
        format!("{:.1} MiB", b / MIB as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b} B")
    }
}

/// Signed, with an explicit `+`.
fn sbytes(b: i64) -> String {
    if b < 0 {
        format!("−{}", bytes(b.unsigned_abs()))
    } else if b == 0 {
        "0".into()
    } else {
        format!("+{}", bytes(b as u64))
    }
}

fn ms(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.1} ms")
    } else if v >= 0.1 {
        format!("{v:.2} ms")
    } else {
        format!("{:.1} µs", v * 1e3)
    }
}

/// `value (×ratio)` against understory's value.
fn with_ratio(text: String, value: f64, reference: Option<f64>, is_reference: bool) -> String {
    match reference {
        Some(r) if !is_reference && r > 0.0 => format!("{text} ({:.2}×)", value / r),
        _ => text,
    }
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let w = &self.workload;
        let _ = writeln!(
            out,
            "### {} ({}, {}, Vulkan {})\n",
            self.device, self.device_type, self.driver, self.api_version
        );
        let _ = writeln!(
            out,
            "Churn: {} frames ({} warm-up frames not timed), {} new instance buffers a frame \
             (256 B–1 MiB log-uniform, {} a frame on average), the {} oldest released a frame \
             (never below {} live), 2 frames in flight, one submitted copy per new buffer. \
             Budget: B = {}, {} buffers until the stack refuses or 2×B. heapUsage: {}.\n",
            w.frames,
            w.warmup,
            w.buffers,
            bytes(w.mean_bytes_per_frame),
            w.release,
            w.keep,
            bytes(w.budget),
            bytes(w.budget_step),
            if self.memory_budget_ext {
                "VK_EXT_memory_budget, all heaps, change since the stack started"
            } else {
                "n/a (no VK_EXT_memory_budget)"
            }
        );
        let stacks = &self.stacks;
        let _ = write!(out, "| |");
        for s in stacks {
            let _ = write!(out, " {} {} |", s.stack, s.version);
        }
        let _ = write!(out, "\n|---|");
        for _ in stacks {
            let _ = write!(out, "---|");
        }
        out.push('\n');

        let reference = stacks
            .iter()
            .position(|s| s.stack == crate::stack_understory::NAME);
        // One row: `cell(stack) -> Option<(text, numeric value for the ratio)>`.
        let mut row = |label: &str, cell: &dyn Fn(&StackReport) -> Cell| {
            let ref_value = reference.and_then(|i| cell(&stacks[i])).and_then(|c| c.1);
            let _ = write!(out, "| {label} |");
            for (i, s) in stacks.iter().enumerate() {
                let text = match cell(s) {
                    Some((text, Some(v))) => with_ratio(text, v, ref_value, Some(i) == reference),
                    Some((text, None)) => text,
                    None => "n/a".into(),
                };
                let _ = write!(out, " {text} |");
            }
            out.push('\n');
        };
        let churn_time = |pick: fn(&crate::common::ChurnResult) -> f64| {
            move |s: &StackReport| -> Cell {
                match (&s.churn, &s.churn_error) {
                    (Some(c), _) => Some((ms(pick(c)), Some(pick(c)))),
                    (None, Some(e)) => Some((format!("error: {e}"), None)),
                    (None, None) => None,
                }
            }
        };
        row(
            "**churn**: frame CPU time (wait excluded), median",
            &churn_time(|c| c.frame.median_ms),
        );
        row("frame CPU time, p99", &churn_time(|c| c.frame.p99_ms));
        row(
            "frame wall time incl. throttle wait, median",
            &churn_time(|c| c.wall.median_ms),
        );
        row("throttle wait, median", &churn_time(|c| c.wait.median_ms));
        row(
            "alloc + release calls a frame, median",
            &churn_time(|c| c.alloc.median_ms),
        );
        row(
            "alloc + release calls a frame, p99",
            &churn_time(|c| c.alloc.p99_ms),
        );
        let churn_bytes = |pick: fn(&crate::common::ChurnResult) -> Option<u64>| {
            move |s: &StackReport| -> Cell {
                let v = pick(s.churn.as_ref()?)?;
                Some((bytes(v), Some(v as f64)))
            }
        };
        let churn_delta = |pick: fn(&crate::common::ChurnResult) -> Option<i64>| {
            move |s: &StackReport| -> Cell {
                let v = pick(s.churn.as_ref()?)?;
                Some((sbytes(v), None))
            }
        };
        row(
            "peak reserved (allocator's blocks)",
            &churn_bytes(|c| c.peak_reserved),
        );
        row(
            "peak heapUsage Δ (driver)",
            &churn_delta(|c| c.peak_driver_delta),
        );
        row(
            "**leak check**: reserved after release, idle",
            &churn_bytes(|c| c.reserved_after_release),
        );
        row(
            "… after flush_cache + release_empty_blocks",
            &|s: &StackReport| {
                let v = s.churn.as_ref()?.reserved_after_trim?;
                Some((bytes(v), None))
            },
        );
        row(
            "heapUsage Δ after release, idle",
            &churn_delta(|c| c.driver_delta_after_release),
        );
        row(
            "heapUsage Δ after teardown",
            &churn_delta(|c| c.driver_delta_after_teardown),
        );
        row("objects the stack reports leaked", &|s: &StackReport| {
            let v = s.churn.as_ref()?.leaked_objects?;
            Some((v.to_string(), None))
        });
        let budget = w.budget;
        for k in 0..stacks
            .iter()
            .map(|s| s.budget.len())
            .max()
            .unwrap_or(0)
            .max(1)
        {
            let suffix = if k == 0 {
                String::new()
            } else {
                format!(" (variant {})", k + 1)
            };
            row(
                &format!("**budget**{suffix}: setting"),
                &|s: &StackReport| match (s.budget.get(k), &s.budget_error) {
                    (Some(b), _) => Some((b.variant.clone(), None)),
                    (None, Some(e)) if k == 0 => Some((format!("error: {e}"), None)),
                    _ => Some(("—".into(), None)),
                },
            );
            row(&format!("outcome{suffix}"), &|s: &StackReport| {
                let b = s.budget.get(k)?;
                Some((b.outcome.clone(), None))
            });
            row(
                &format!("allocated at the stop{suffix}"),
                &|s: &StackReport| {
                    let b = s.budget.get(k)?;
                    Some((bytes(b.allocated), None))
                },
            );
            row(
                &format!("reserved at the stop{suffix}"),
                &|s: &StackReport| {
                    let b = s.budget.get(k)?;
                    Some((bytes(b.reserved?), None))
                },
            );
            row(&format!("past B{suffix}"), &|s: &StackReport| {
                let b = s.budget.get(k)?;
                let past = b.past(budget);
                let pct = past as f64 * 100.0 / budget.max(1) as f64;
                Some((
                    if past > 0 {
                        format!("{} (+{pct:.0}%)", sbytes(past))
                    } else {
                        format!("no ({} under)", bytes(past.unsigned_abs()))
                    },
                    None,
                ))
            });
            row(
                &format!("heapUsage Δ at the stop{suffix}"),
                &|s: &StackReport| {
                    let b = s.budget.get(k)?;
                    Some((sbytes(b.driver_delta?), None))
                },
            );
        }
        let _ = writeln!(
            out,
            "\nRatios are to understory (×, lower is better for every row).\n"
        );
        for s in stacks {
            if let Some(c) = &s.churn {
                let _ = writeln!(out, "- {}: memory {}.", s.stack, c.memory);
                for n in &c.notes {
                    let _ = writeln!(out, "  - {n}");
                }
            }
            for b in &s.budget {
                if let Some(e) = &b.error {
                    let _ = writeln!(out, "  - budget ({}): error returned: `{e}`", b.variant);
                }
            }
        }
        out
    }
}
