//! Outside pressure for `understory soak --pressure`: another process on the same GPU that
//! takes device-local VRAM in the amounts the soak asks for, so the driver's `heapBudget` for
//! the soak falls (and rises again when it gives the memory back). The child is this same
//! binary (`understory pressure-child`); the two talk over its stdin and stdout, one line each
//! way: `hold BYTES` → `held BYTES`, and `exit`.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use ash::vk;
use understory::error::{Error, Result};
use understory::gpu::context::{Context, ContextOptions};

/// Chunks the child allocates while far from its target.
const BIG_CHUNK: u64 = 1 << 30;
/// Chunks near the target (the granularity of what it holds).
const SMALL_CHUNK: u64 = 16 << 20;

/// The other process, seen from the soak.
pub struct PressureChild {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    held: u64,
}

impl PressureChild {
    /// Starts `exe pressure-child` (with `UNDERSTORY_DEVICE`, if set, picking the same GPU).
    pub fn spawn(exe: &Path) -> Result<Self> {
        let io = |e: std::io::Error| Error::InvalidInput(format!("pressure child: {e}"));
        let mut child = Command::new(exe)
            .arg("pressure-child")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(io)?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            return Err(Error::InvalidInput("pressure child: no pipes".into()));
        };
        let mut this = Self {
            child,
            stdin,
            stdout: BufReader::new(stdout),
            held: 0,
        };
        // The child says `held 0` once its device is up.
        this.read_held()?;
        Ok(this)
    }

    fn read_held(&mut self) -> Result<u64> {
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .map_err(|e| Error::InvalidInput(format!("pressure child: {e}")))?;
        let held = line
            .trim()
            .strip_prefix("held ")
            .and_then(|b| b.parse().ok())
            .filter(|_| n > 0)
            .ok_or_else(|| {
                Error::InvalidInput(format!("pressure child: unexpected reply {line:?}"))
            })?;
        self.held = held;
        Ok(held)
    }

    /// Asks the child to hold `bytes` of VRAM (to the nearest 16 MiB); returns what it holds
    /// (less if the driver refused it more).
    pub fn hold(&mut self, bytes: u64) -> Result<u64> {
        writeln!(self.stdin, "hold {bytes}")
            .and_then(|()| self.stdin.flush())
            .map_err(|e| Error::InvalidInput(format!("pressure child: {e}")))?;
        self.read_held()
    }

    /// Bytes the child holds now.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// Lets the child free everything and exit.
    pub fn finish(mut self) -> Result<()> {
        let _ = writeln!(self.stdin, "exit").and_then(|()| self.stdin.flush());
        let status = self
            .child
            .wait()
            .map_err(|e| Error::InvalidInput(format!("pressure child: {e}")))?;
        if status.success() {
            Ok(())
        } else {
            Err(Error::InvalidInput(format!(
                "pressure child exited with {status}"
            )))
        }
    }
}

impl Drop for PressureChild {
    fn drop(&mut self) {
        // Still running only if `finish` was not called (an error path): stop it; the driver
        // frees a dead process's memory.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The child's side: a device of its own on the GPU the options pick, device-local memory
/// allocated and freed in chunks on request, everything freed at `exit` or end of input.
pub fn child_main(options: &ContextOptions) -> Result<()> {
    let ctx = Context::new(options)?;
    let result = serve(&ctx);
    let shutdown = ctx.shutdown();
    result?;
    shutdown.map(|_| ())
}

fn serve(ctx: &Context) -> Result<()> {
    let heap = ctx.memory().device_local_heap();
    // SAFETY: the physical device belongs to the context's live instance.
    let props = unsafe {
        ctx.instance()
            .get_physical_device_memory_properties(ctx.adapter().handle)
    };
    let types = props.memory_types_as_slice();
    let pick = |flags: vk::MemoryPropertyFlags| {
        types.iter().position(|t| {
            t.heap_index as usize == heap
                && t.property_flags
                    .contains(vk::MemoryPropertyFlags::DEVICE_LOCAL)
                && !t.property_flags.intersects(flags)
        })
    };
    let type_index = pick(vk::MemoryPropertyFlags::HOST_VISIBLE)
        .or_else(|| pick(vk::MemoryPropertyFlags::empty()))
        .ok_or_else(|| Error::Unsupported("no device-local memory type".into()))?
        as u32;
    let device = ctx.device();
    let mut chunks: Vec<(vk::DeviceMemory, u64)> = Vec::new();
    let mut held = 0u64;
    let free = |chunks: &mut Vec<(vk::DeviceMemory, u64)>, held: &mut u64| {
        if let Some((m, size)) = chunks.pop() {
            // SAFETY: memory allocated below from this device, never bound or mapped, so no
            // object or command uses it (VUID-vkFreeMemory-memory-00677).
            unsafe { device.free_memory(m, None) };
            *held -= size;
        }
    };
    let mut out = std::io::stdout().lock();
    let reply = |out: &mut std::io::StdoutLock<'_>, held: u64| {
        writeln!(out, "held {held}")
            .and_then(|()| out.flush())
            .map_err(|e| Error::InvalidInput(format!("pressure child: {e}")))
    };
    reply(&mut out, 0)?;
    let stdin = std::io::stdin();
    let outcome = (|| -> Result<()> {
        for line in stdin.lock().lines() {
            let line = line.map_err(|e| Error::InvalidInput(format!("pressure child: {e}")))?;
            let line = line.trim();
            if line == "exit" {
                break;
            }
            let Some(target) = line
                .strip_prefix("hold ")
                .and_then(|b| b.parse::<u64>().ok())
            else {
                return Err(Error::InvalidInput(format!(
                    "pressure child: unknown command {line:?}"
                )));
            };
            while held > target {
                let before = held;
                free(&mut chunks, &mut held);
                if held == before || held + SMALL_CHUNK / 2 < target {
                    break;
                }
            }
            while held + SMALL_CHUNK / 2 < target {
                let size = if target - held >= 2 * BIG_CHUNK {
                    BIG_CHUNK
                } else {
                    SMALL_CHUNK
                };
                let info = vk::MemoryAllocateInfo::default()
                    .allocation_size(size)
                    .memory_type_index(type_index);
                // SAFETY: a memory type of this device and a non-zero size
                // (VUID-vkAllocateMemory-pAllocateInfo-01714); freed before the device is.
                match unsafe { device.allocate_memory(&info, None) } {
                    Ok(m) => {
                        chunks.push((m, size));
                        held += size;
                    }
                    // The driver has no more: say what we got.
                    Err(_) => break,
                }
            }
            reply(&mut out, held)?;
        }
        Ok(())
    })();
    while !chunks.is_empty() {
        free(&mut chunks, &mut held);
    }
    outcome
}
