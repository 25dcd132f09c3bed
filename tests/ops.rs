//! The fused bias+GELU op against its plain-tch reference: values and both gradients on fresh
//! random inputs for f32, f64 and bf16, with dtype-dependent tolerances, and its error messages.

use course::ops::{bias_gelu, bias_gelu_backward, bias_gelu_forward, bias_gelu_reference};
use course::rng::Rng;
use tch::{Device, Kind, Tensor};

/// The CPU, plus CUDA device 0 where one is visible (and the CUDA kernels are built).
fn devices() -> Vec<Device> {
    let mut d = vec![Device::Cpu];
    if tch::Cuda::is_available() && course::CUDA_KERNELS {
        d.push(Device::Cuda(0));
    }
    d
}

/// |a - b| <= atol + rtol |b| everywhere; on failure, report the worst element.
fn assert_close(what: &str, a: &Tensor, b: &Tensor, atol: f64, rtol: f64) {
    assert_eq!(a.size(), b.size(), "{what}: shapes differ");
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let excess = (&a - &b).abs() - (b.abs() * rtol + atol);
    let worst = excess.max().double_value(&[]);
    let max_abs = (&a - &b).abs().max().double_value(&[]);
    assert!(worst <= 0.0, "{what}: max |diff| = {max_abs:e} exceeds atol {atol:e} + rtol {rtol:e} |ref|");
}

/// (atol, rtol) for values; bf16 keeps 8 significant bits, so its output rounding alone is 2^-8.
fn tol(kind: Kind) -> (f64, f64) {
    match kind {
        Kind::Double => (1e-12, 1e-12),
        Kind::Float => (1e-6, 1e-5),
        _ => (1e-2, 1.6e-2),
    }
}

const SHAPES: &[&[i64]] = &[&[7, 33], &[4, 5, 64], &[300, 1000], &[2, 1]];

/// Normal values from the course RNG (not torch's global generator, which parallel tests share).
fn randn(shape: &[i64], scale: f64, rng: &mut Rng) -> Tensor {
    let n: i64 = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.normal() * scale).collect();
    Tensor::from_slice(&v).view(shape)
}

fn inputs(shape: &[i64], kind: Kind, seed: u64, device: Device) -> (Tensor, Tensor) {
    let mut rng = Rng::new(seed);
    let n = *shape.last().unwrap();
    // Scale 3 reaches the tails where tanh saturates and the gradient changes sign.
    let x = randn(shape, 3.0, &mut rng).to_kind(kind).to_device(device);
    let b = randn(&[n], 1.0, &mut rng).to_kind(kind).to_device(device);
    (x, b)
}

#[test]
fn forward_matches_reference_for_every_dtype() {
    for device in devices() {
        for (i, kind) in [Kind::Float, Kind::Double, Kind::BFloat16].into_iter().enumerate() {
            for (j, shape) in SHAPES.iter().enumerate() {
                let (x, b) = inputs(shape, kind, (10 * i + j) as u64, device);
                // Reference in f64 from the same (already rounded) inputs.
                let want = bias_gelu_reference(
                    &x.to_kind(Kind::Double).to_device(Device::Cpu),
                    &b.to_kind(Kind::Double).to_device(Device::Cpu),
                );
                let got = bias_gelu(&x, &b).unwrap();
                assert_eq!(got.kind(), kind);
                let (atol, rtol) = tol(kind);
                assert_close(&format!("forward {device:?} {kind:?} {shape:?}"), &got, &want, atol, rtol);
                let raw = bias_gelu_forward(&x, &b).unwrap();
                assert!(raw.equal(&got), "raw kernel and autograd path differ");
            }
        }
    }
}

#[test]
fn gradients_match_reference_for_every_dtype() {
    for device in devices() {
        for (i, kind) in [Kind::Float, Kind::Double, Kind::BFloat16].into_iter().enumerate() {
            for (j, shape) in SHAPES.iter().enumerate() {
                let seed = (100 + 10 * i + j) as u64;
                let (x, b) = inputs(shape, kind, seed, device);
                let g = randn(shape, 1.0, &mut Rng::new(seed + 1000)).to_kind(kind).to_device(device);
                // Fused, through autograd.
                let xf = x.detach().set_requires_grad(true);
                let bf = b.detach().set_requires_grad(true);
                let y = bias_gelu(&xf, &bf).unwrap();
                (y * &g).sum(Kind::Double).backward();
                // Reference in f64 through tch autograd.
                let xr = x.to_kind(Kind::Double).to_device(Device::Cpu).set_requires_grad(true);
                let br = b.to_kind(Kind::Double).to_device(Device::Cpu).set_requires_grad(true);
                (bias_gelu_reference(&xr, &br) * g.to_kind(Kind::Double).to_device(Device::Cpu))
                    .sum(Kind::Double)
                    .backward();
                // Gradients carry |g| (up to ~4 here) times a few ulps of the derivative.
                let (atol, rtol) = if kind == Kind::Float { (1e-5, 1e-5) } else { tol(kind) };
                assert_close(&format!("grad input {device:?} {kind:?} {shape:?}"), &xf.grad(), &xr.grad(), atol, rtol);
                // The bias gradient sums M rows: its rounding error grows like sqrt(M) in bf16.
                let m = x.numel() as f64 / *shape.last().unwrap() as f64;
                let batol = if kind == Kind::BFloat16 { 2e-2 * m.sqrt() } else { atol * m };
                assert_close(&format!("grad bias {device:?} {kind:?} {shape:?}"), &bf.grad(), &br.grad(), batol, rtol);
                // The raw backward kernel gives the same as autograd.
                let (gx, gb) = bias_gelu_backward(&g, &x, &b).unwrap();
                assert!(gx.equal(&xf.grad()) && gb.equal(&bf.grad()), "raw backward differs from autograd path");
            }
        }
    }
}

#[test]
fn double_backward_is_refused_not_silently_wrong() {
    let (x, b) = inputs(&[3, 4], Kind::Double, 1, Device::Cpu);
    let x = x.set_requires_grad(true);
    let y = bias_gelu(&x, &b).unwrap().sum(Kind::Double);
    let r = Tensor::f_run_backward(&[y], &[&x], true, true);
    let err = r.err().expect("create_graph through bias_gelu must fail").to_string();
    assert!(err.contains("double backward"), "{err}");
}

#[test]
fn f32_agrees_with_tch_unfused_in_f32() {
    // The comparison a user makes: same dtype, tch's own kernels.
    let (x, b) = inputs(&[64, 768], Kind::Float, 7, Device::Cpu);
    assert_close("f32 vs tch f32", &bias_gelu(&x, &b).unwrap(), &bias_gelu_reference(&x, &b), 2e-6, 1e-5);
}

#[test]
fn every_cpu_kernel_variant_agrees() {
    // ATen's dispatch honours ATEN_CPU_CAPABILITY, read once per process: run the value and
    // gradient tests again in a child process under each capability this CPU supports.
    if std::env::var("COURSE_VARIANT_CHILD").is_ok() {
        return;
    }
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has = |f: &str| flags.lines().any(|l| l.starts_with("flags") && l.split_whitespace().any(|w| w == f));
    let mut caps = vec!["default"];
    if cfg!(target_arch = "x86_64") && has("avx2") && has("fma") {
        caps.push("avx2");
    }
    if cfg!(target_arch = "x86_64") && has("avx512f") && has("avx512bw") && has("avx512vl") && has("avx512dq") {
        caps.push("avx512");
    }
    let exe = std::env::current_exe().unwrap();
    for cap in caps {
        let out = std::process::Command::new(&exe)
            .args(["--exact", "forward_matches_reference_for_every_dtype", "gradients_match_reference_for_every_dtype"])
            .env("ATEN_CPU_CAPABILITY", cap)
            .env("COURSE_VARIANT_CHILD", "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("2 passed"), "capability {cap}:\n{text}");
    }
}

#[test]
fn bad_arguments_give_clear_errors() {
    let x = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
    let err =
        bias_gelu(&x.to_kind(Kind::Int64), &Tensor::zeros([8], (Kind::Int64, Device::Cpu))).unwrap_err().to_string();
    assert!(err.contains("dtype must be float32, float64 or bfloat16"), "{err}");
    let err = bias_gelu(&x, &Tensor::zeros([8], (Kind::Double, Device::Cpu))).unwrap_err().to_string();
    assert!(err.contains("bias dtype") && err.contains("differs"), "{err}");
    let err = bias_gelu(&x, &Tensor::zeros([7], (Kind::Float, Device::Cpu))).unwrap_err().to_string();
    assert!(err.contains("bias has 7 elements") && err.contains("last dimension is 8"), "{err}");
    let err = bias_gelu(&x, &Tensor::zeros([2, 4], (Kind::Float, Device::Cpu))).unwrap_err().to_string();
    assert!(err.contains("bias must be 1-D"), "{err}");
    let err =
        bias_gelu(&Tensor::from(1.0f32), &Tensor::zeros([1], (Kind::Float, Device::Cpu))).unwrap_err().to_string();
    assert!(err.contains("at least one dimension"), "{err}");
    assert!(!err.contains("Exception raised from"), "C++ backtrace leaked: {err}");
    let err = bias_gelu_backward(
        &Tensor::zeros([3, 8], (Kind::Float, Device::Cpu)),
        &x,
        &Tensor::zeros([8], (Kind::Float, Device::Cpu)),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("grad shape"), "{err:#}");
}

#[test]
fn wrong_device_is_an_error() {
    if !tch::Cuda::is_available() {
        // Without a GPU, check the other half of the contract: a CUDA tensor cannot even be
        // created, so the op can only ever see CPU tensors here.
        assert!(Tensor::f_zeros([1], (Kind::Float, Device::Cuda(0))).is_err());
        return;
    }
    let x = Tensor::randn([4, 8], (Kind::Float, Device::Cuda(0)));
    let err = bias_gelu(&x, &Tensor::zeros([8], (Kind::Float, Device::Cpu))).unwrap_err().to_string();
    assert!(err.contains("input is on cuda:0 but bias is on cpu"), "{err}");
}
