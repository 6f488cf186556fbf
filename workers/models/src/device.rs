//! Which device a role runs on.

use candle_core::Device;

use crate::ModelError;

/// The device to run on: CUDA or Metal when built with the feature and present, else CPU.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        return d;
    }
    #[cfg(feature = "metal")]
    if let Ok(d) = Device::new_metal(0) {
        return d;
    }
    Device::Cpu
}

/// The device a setting names (`auto`, `cpu`, `cuda`, `metal`); `key` is the setting's
/// name, for the error.
pub fn device_named(name: &str, key: &str) -> Result<Device, ModelError> {
    let unavailable = |hint: &str, source: candle_core::Error| ModelError::Device {
        setting: format!("{key} = \"{name}\""),
        hint: hint.to_string(),
        source: Box::new(source),
    };
    match name {
        "auto" => Ok(default_device()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).map_err(|e| unavailable("build with --features cuda", e)),
        "metal" => {
            Device::new_metal(0).map_err(|e| unavailable("build with --features metal on macOS", e))
        }
        other => Err(ModelError::Setting(format!(
            "{key} `{other}` must be auto, cpu, cuda or metal"
        ))),
    }
}
