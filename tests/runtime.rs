//! The runtime shim against libtorch's own behaviour: autocast on the CPU, determinism,
//! inference mode, memory statistics and versions.

use course::sys::runtime::{self, autocast, autocast_state};
use tch::{Device, Kind, Tensor};

#[test]
fn cpu_autocast_runs_matmul_in_the_chosen_dtype_and_restores_state() {
    // Deterministic inputs: this binary's only user of torch's global generator is the
    // generator-state test below, which would race with parallel draws.
    let a = (Tensor::arange(128, (Kind::Float, Device::Cpu)).view([8, 16]) * 0.37).sin();
    let b = (Tensor::arange(64, (Kind::Float, Device::Cpu)).view([16, 4]) * 0.11).cos();
    assert_eq!(a.matmul(&b).kind(), Kind::Float);
    {
        let _g = autocast(Device::Cpu, Kind::BFloat16, true).unwrap();
        assert_eq!(autocast_state(Device::Cpu).unwrap(), (true, Kind::BFloat16));
        let y = a.matmul(&b);
        assert_eq!(y.kind(), Kind::BFloat16, "matmul is on autocast's lower-precision list");
        // The value equals the matmul of the bf16-rounded inputs.
        let want = a.to_kind(Kind::BFloat16).matmul(&b.to_kind(Kind::BFloat16));
        assert!(y.equal(&want));
        // mse_loss is on CPU autocast's fp32 list: a bf16 input is computed in f32 (as in
        // Python: torch.autocast("cpu", torch.bfloat16) gives mse_loss float32, softmax bfloat16).
        assert_eq!(y.mse_loss(&y.zeros_like(), tch::Reduction::Mean).kind(), Kind::Float);
        assert_eq!(y.softmax(-1, None::<Kind>).kind(), Kind::BFloat16);
        {
            let _off = autocast(Device::Cpu, Kind::BFloat16, false).unwrap();
            assert_eq!(a.matmul(&b).kind(), Kind::Float, "nested disabled region");
            let _half = autocast(Device::Cpu, Kind::Half, true).unwrap();
            assert_eq!(a.matmul(&b).kind(), Kind::Half, "nested fp16 region");
        }
        assert_eq!(
            autocast_state(Device::Cpu).unwrap(),
            (true, Kind::BFloat16),
            "inner regions restored the outer one"
        );
    }
    assert!(!autocast_state(Device::Cpu).unwrap().0);
    assert_eq!(a.matmul(&b).kind(), Kind::Float);
}

#[test]
fn autocast_rejects_unsupported_dtypes() {
    let err = autocast(Device::Cpu, Kind::Int64, true).err().expect("int64 autocast must fail").to_string();
    assert!(err.contains("supports float16 and bfloat16"), "{err}");
    assert!(!autocast_state(Device::Cpu).unwrap().0, "a failed enter leaves autocast off");
}

#[test]
fn determinism_switch_round_trips() {
    runtime::set_deterministic(true, false);
    assert!(runtime::deterministic());
    runtime::set_deterministic(false, false);
    assert!(!runtime::deterministic());
}

#[test]
fn inference_mode_marks_tensors_and_no_grad_does_not() {
    let w = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let a = {
        let _g = runtime::inference_mode();
        &w * 2.0
    };
    let b = tch::no_grad(|| &w * 2.0);
    assert!(runtime::is_inference(&a) && !runtime::is_inference(&b));
    assert!(!a.requires_grad() && !b.requires_grad());
    let c = &w * 2.0;
    assert!(c.requires_grad() && !runtime::is_inference(&c), "the guard ended with its scope");
}

#[test]
fn peak_rss_covers_a_tensor_larger_than_the_previous_peak() {
    // Whatever ran before (tests share the process), a touched tensor bigger than the old peak
    // forces the peak above its own size.
    let before = runtime::peak_rss_bytes();
    let size = before as i64 + (64 << 20);
    let t = Tensor::ones([size], (Kind::Uint8, Device::Cpu));
    let after = runtime::peak_rss_bytes();
    assert!(after >= size as u64, "peak {before} -> {after}, tensor {size}");
    assert!(runtime::current_rss_bytes() >= size as u64);
    drop(t);
}

#[test]
fn versions_report_the_loaded_libtorch() {
    let v = runtime::versions();
    assert!(v.torch.starts_with("2.11.0"), "{}", v.torch);
    assert_eq!(v.cuda_devices, tch::Cuda::device_count() as usize);
    assert!(
        ["DEFAULT", "AVX2", "AVX512", "AVX512_VNNI", "ZVECTOR", "SVE256", "SVE128", "VSX"]
            .iter()
            .any(|c| v.cpu_capability.starts_with(c)),
        "{}",
        v.cpu_capability
    );
    if v.cuda_devices == 0 {
        assert!(runtime::cuda_memory(0).unwrap_err().to_string().contains("no CUDA device 0"));
    } else {
        let t = Tensor::ones([1 << 20], (Kind::Float, Device::Cuda(0)));
        let s = runtime::cuda_memory(0).unwrap();
        assert!(s.allocated >= 4 << 20 && s.allocated_peak >= s.allocated);
        drop(t);
    }
}

#[test]
fn thread_count_is_set_and_clamped() {
    let n = runtime::threads();
    runtime::set_threads(1);
    assert_eq!(runtime::threads(), 1);
    runtime::set_threads(0); // clamped to 1, not a libtorch error
    assert_eq!(runtime::threads(), 1);
    runtime::set_threads(n);
    assert_eq!(runtime::threads(), n);
}

#[test]
fn generator_state_round_trips_and_replays_dropout() {
    let state = runtime::generator_state(Device::Cpu).unwrap();
    let x = Tensor::ones([1000], (Kind::Float, Device::Cpu));
    let a = x.dropout(0.5, true);
    runtime::set_generator_state(Device::Cpu, &state).unwrap();
    let b = x.dropout(0.5, true);
    assert!(a.equal(&b), "restored generator must replay the same dropout mask");
    let c = x.dropout(0.5, true);
    assert!(!a.equal(&c));
    let err = runtime::set_generator_state(Device::Cpu, &Tensor::zeros([3], (Kind::Uint8, Device::Cpu)))
        .unwrap_err()
        .to_string();
    assert!(!err.is_empty() && !err.contains("Exception raised from"), "{err}");
}

/// Minor page faults taken by the calling thread (field 10 of /proc/thread-self/stat).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn thread_minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    after_name.split(' ').nth(7).unwrap().parse().unwrap()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn retained_memory_is_reused_without_page_faults() {
    // A 48 MiB block is above glibc's largest mmap threshold (32 MiB), so by default freeing it
    // unmaps it and the next one faults in all 12,288 pages again. Once freed memory is kept,
    // the second block reuses the first one's pages. (Test threads are not the main thread:
    // their arena's heaps hold at most 64 MiB, and glibc still maps larger blocks there.)
    const PAGES: usize = 12_288;
    let touch = || {
        let mut v: Vec<u8> = Vec::with_capacity(PAGES * 4096);
        let p = v.as_mut_ptr();
        let before = thread_minor_faults();
        for i in 0..PAGES {
            unsafe { std::ptr::write_volatile(p.add(i * 4096), 1) };
        }
        let faults = thread_minor_faults() - before;
        drop(v);
        faults
    };
    assert!(course::sys::runtime::retain_freed_memory(), "mallopt refused");
    let first = touch();
    let second = touch();
    assert!(second < PAGES as u64 / 8, "second 48 MiB block took {second} page faults (first {first})");
}
