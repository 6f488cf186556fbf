//! With the `cuda` feature, compiles the fused training kernels (`src/cuda/kernels.cu`) to
//! PTX (see `../models/cuda/ptx_build.rs`).
#[path = "../models/cuda/ptx_build.rs"]
mod ptx_build;

fn main() {
    ptx_build::compile("src/cuda/kernels.cu", "kernels.ptx");
}
