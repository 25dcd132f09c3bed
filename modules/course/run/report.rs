//! The environment report: what libtorch, which CPU features, how many threads, which GPUs.
//! Printed by `course doctor` and at the top of m01.

use crate::sys::device::cpu_has;
use crate::sys::runtime;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct EnvReport {
    pub torch: String,
    pub tch_crate: &'static str,
    pub cpu_model: String,
    pub logical_cpus: usize,
    /// The CPU flags that matter for deep learning kernels, as /proc/cpuinfo names them.
    pub cpu_features: Vec<String>,
    /// The kernel family ATen dispatches to (DEFAULT, AVX2, AVX512).
    pub cpu_capability: String,
    pub threads: usize,
    pub cuda_devices: usize,
    pub cuda_runtime: String,
    pub cudnn: String,
    pub os: String,
}

/// Flags worth reporting, in this order.
const INTERESTING: &[&str] = &[
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_fp16",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "sve",
    "bf16",
];

fn cpuinfo() -> (String, Vec<String>) {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = text
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let feats = INTERESTING.iter().filter(|f| cpu_has(f)).map(|s| s.to_string()).collect();
    (model, feats)
}

/// Whether the CPU does fp16 arithmetic natively (AVX512-FP16 or AMX-FP16). Without it libtorch
/// emulates fp16 matmuls at well under 1 GFLOP/s.
pub fn cpu_has_native_fp16() -> bool {
    cpu_has("avx512_fp16") || cpu_has("amx_fp16")
}

fn version_string(v: i64, div: i64) -> String {
    // CUDA reports 13000 for 13.0; cuDNN 91900 for 9.19.0.
    if v <= 0 {
        return "none".into();
    }
    if div == 1000 {
        format!("{}.{}", v / 1000, (v % 1000) / 10)
    } else {
        format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100)
    }
}

pub fn env_report() -> EnvReport {
    let v = runtime::versions();
    let (cpu_model, cpu_features) = cpuinfo();
    EnvReport {
        torch: v.torch,
        tch_crate: "0.24.0",
        cpu_model,
        logical_cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        cpu_features,
        cpu_capability: v.cpu_capability,
        threads: runtime::threads(),
        cuda_devices: v.cuda_devices,
        cuda_runtime: version_string(v.cuda_runtime, 1000),
        cudnn: version_string(v.cudnn, 10000),
        os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
    }
}

impl std::fmt::Display for EnvReport {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        writeln!(f, "libtorch      {} (tch {})", self.torch, self.tch_crate)?;
        writeln!(
            f,
            "cpu           {} ({} logical CPUs, {} torch threads)",
            self.cpu_model, self.logical_cpus, self.threads
        )?;
        writeln!(
            f,
            "cpu features  {} -> ATen kernels: {}",
            if self.cpu_features.is_empty() { "-".into() } else { self.cpu_features.join(" ") },
            self.cpu_capability
        )?;
        write!(f, "cuda          {} device(s), runtime {}, cuDNN {}", self.cuda_devices, self.cuda_runtime, self.cudnn)
    }
}
