//! `--device auto|cpu|cuda|cuda:N`: parsing, and resolving to a tch `Device` with a clear error
//! when the asked-for GPU is not there.

use anyhow::{bail, Result};
use std::fmt;
use std::str::FromStr;
use tch::Device;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA device 0 when one is visible, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("unknown device '{s}': expected auto, cpu, cuda or cuda:N");
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Self::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceChoice {
    /// The device to use; asking for a GPU that is not visible is an error, not a silent fallback.
    pub fn resolve(self) -> Result<Device> {
        let n = tch::Cuda::device_count().max(0) as usize;
        match self {
            Self::Auto => Ok(if n > 0 { Device::Cuda(0) } else { Device::Cpu }),
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(i) if i < n => Ok(Device::Cuda(i)),
            Self::Cuda(i) => {
                bail!("--device cuda:{i} asked for, but {n} CUDA device(s) are visible (try --device cpu or auto)")
            }
        }
    }
}

/// The name written to metrics.json and manifests: "cpu", "cuda:0", ...
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// The CPU's feature flags as Linux reports them (`flags` in /proc/cpuinfo, `Features` on Arm);
/// empty where there is no /proc/cpuinfo. Read once.
pub fn cpu_flags() -> &'static [String] {
    static FLAGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    FLAGS.get_or_init(|| {
        std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("flags").or_else(|| l.strip_prefix("Features")))
            .map(|r| r.trim_start_matches([' ', '\t', ':']).split_whitespace().map(String::from).collect())
            .unwrap_or_default()
    })
}

/// Whether the CPU reports feature `flag` (e.g. "avx512_bf16", "amx_bf16").
pub fn cpu_has(flag: &str) -> bool {
    cpu_flags().iter().any(|f| f == flag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_and_rejects_junk() {
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!("CPU".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!("cuda".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(3));
        let err = "tpu".parse::<DeviceChoice>().unwrap_err();
        assert!(err.contains("'tpu'") && err.contains("cuda:N"), "{err}");
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn missing_gpu_is_an_error_naming_the_flag() {
        let n = tch::Cuda::device_count() as usize;
        let err = DeviceChoice::Cuda(n + 1).resolve().unwrap_err().to_string();
        assert!(err.contains(&format!("cuda:{}", n + 1)) && err.contains("visible"), "{err}");
        assert_eq!(DeviceChoice::Cpu.resolve().unwrap(), Device::Cpu);
    }
}
