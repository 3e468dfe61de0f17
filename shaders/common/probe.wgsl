// Push constants of the cull benchmark's bandwidth yardsticks (copy_vec4, read_probe): elements,
// vec4s between reads (read_probe only), unused, threads per row of the 2D dispatch.
struct ProbePush {
    count: u32,
    base: u32,
    unused: u32,
    row: u32,
}
