//! Shared by the build scripts of the crates with CUDA kernels (the trainer, the inference
//! role), through `#[path]`: with the `cuda` feature, compiles one `.cu` file to PTX in
//! `OUT_DIR` with nvcc (`NVCC` or `nvcc` on the PATH; `CUDA_COMPUTE_CAP`, default 80), with
//! `workers/models/cuda` on the include path for `common.cuh`. The driver compiles the PTX
//! for the GPU it runs on.
use std::process::Command;

/// Compiles `src` (relative to the crate) to `OUT_DIR/<ptx>` when the `cuda` feature is on.
pub fn compile(src: &str, ptx: &str) {
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-changed=../models/cuda/common.cuh");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", "-I", "../models/cuda"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(out.join(ptx))
        .arg(src)
        .status()
        .unwrap_or_else(|e| panic!("running {nvcc} (needed by the `cuda` feature): {e}"));
    assert!(status.success(), "{nvcc} failed on {src}");
}
