//! With the `cuda` feature, compiles the paged attention and fused decode kernels
//! (`kernels/paged_attention.cu`) to PTX (see `../models/cuda/ptx_build.rs`).
#[path = "../models/cuda/ptx_build.rs"]
mod ptx_build;

fn main() {
    ptx_build::compile("kernels/paged_attention.cu", "paged_attention.ptx");
}
