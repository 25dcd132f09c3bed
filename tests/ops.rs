//! The fused bias+GELU op against its plain-tch reference: values and both gradients on fresh
//! random inputs for f32, f64 and bf16, with dtype-dependent tolerances, and its error messages.
//! The same for the fused softmax cross-entropy (f32, f64, bf16, f16; ignored rows; logits of
//! +-1e4; a finite-difference check in f64). And the counter-based dropout: its mask against the
//! same hash computed in tch's int64 ops, its backward against the reference's autograd, and the
//! share it drops against p.

use course::ops::{bias_gelu, bias_gelu_backward, bias_gelu_forward, bias_gelu_reference};
use course::ops::{cross_entropy, cross_entropy_backward, cross_entropy_forward, cross_entropy_reference};
use course::sys::rng::Rng;
use tch::{Device, Kind, Tensor};

mod common;
use common::run_under_every_cpu_variant;

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
    run_under_every_cpu_variant(&[
        "forward_matches_reference_for_every_dtype",
        "gradients_match_reference_for_every_dtype",
        "dropout_equals_its_reference_forward_and_backward",
    ]);
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

// ---- Fused softmax cross-entropy ----

/// Logits `(n, v)` (normal, scale 3: rows from nearly one-hot to nearly flat) and targets in
/// `[0, v)` with every `ignore_every`-th row set to -100 (0: none), from the course RNG.
fn ce_inputs(n: i64, v: i64, kind: Kind, seed: u64, ignore_every: i64, device: Device) -> (Tensor, Tensor) {
    let mut rng = Rng::new(seed);
    let x = (rng.normal_tensor(&[n, v]) * 3.0).to_kind(kind).to_device(device);
    let t: Vec<i64> =
        (0..n)
            .map(|i| {
                if ignore_every > 0 && i % ignore_every == ignore_every - 1 {
                    -100
                } else {
                    rng.below(v as u64) as i64
                }
            })
            .collect();
    (x, Tensor::from_slice(&t).to_device(device))
}

/// Loss and logits gradient of the reference in f64 on the CPU, from the same (rounded) logits.
fn ce_reference_f64(x: &Tensor, t: &Tensor) -> (Tensor, Tensor) {
    let xr = x.to_kind(Kind::Double).to_device(Device::Cpu).set_requires_grad(true);
    let loss = cross_entropy_reference(&xr, &t.to_device(Device::Cpu));
    loss.backward();
    (loss.detach(), xr.grad())
}

/// ((atol, rtol) of the loss, (atol, rtol) of the gradient), for a gradient whose entries are at
/// most `scale` = 1 / (counted rows). The loss is accumulated in fp32 for every dtype but f64:
/// ATen's exp_u20 (<= 2.4e-6 relative) and fp32's rounding of a logsumexp near 10 (1e-6) set its
/// bound. The gradient is rounded once to the logits' dtype: 2^-8 relative in bf16, 2^-11 in
/// fp16, whose subnormals are 6e-8 apart.
fn ce_tol(kind: Kind, scale: f64) -> ((f64, f64), (f64, f64)) {
    match kind {
        Kind::Double => ((1e-12, 1e-12), (1e-14 * scale, 1e-10)),
        Kind::Float => ((2e-5, 1e-5), (1e-6 * scale, 2e-5)),
        Kind::BFloat16 => ((2e-5, 1e-5), (1e-6 * scale, 8e-3)),
        _ => ((2e-5, 1e-5), ((1e-6 * scale).max(6e-8), 2e-3)),
    }
}

/// Counted rows (target != -100).
fn ce_count(t: &Tensor) -> f64 {
    t.ne(-100).sum(Kind::Int64).int64_value(&[]) as f64
}

// (N, V): a tail shorter than one vector, V = 65 (the character-level vocabulary of m04),
// several rows per parallel task, rows spanning 3 online-softmax blocks of 2048, a single class.
const CE_SHAPES: &[(i64, i64)] = &[(7, 33), (64, 65), (300, 1000), (6, 5000), (3, 2049), (1, 1)];

#[test]
fn cross_entropy_matches_reference_for_every_dtype() {
    for device in devices() {
        for (i, kind) in [Kind::Float, Kind::Double, Kind::BFloat16, Kind::Half].into_iter().enumerate() {
            for (j, &(n, v)) in CE_SHAPES.iter().enumerate() {
                let what = format!("{device:?} {kind:?} ({n}, {v})");
                let (x, t) = ce_inputs(n, v, kind, (200 + 10 * i + j) as u64, 4, device);
                let (want, want_grad) = ce_reference_f64(&x, &t);
                let xf = x.detach().set_requires_grad(true);
                let loss = cross_entropy(&xf, &t).unwrap();
                let acc = if kind == Kind::Double { Kind::Double } else { Kind::Float };
                assert_eq!((loss.kind(), loss.dim()), (acc, 0), "{what}: loss must be a 0-dim {acc:?}");
                loss.backward();
                let grad = xf.grad();
                assert_eq!(grad.kind(), kind, "{what}: the gradient keeps the logits' dtype");
                let ((la, lr), (ga, gr)) = ce_tol(kind, 1.0 / ce_count(&t));
                assert_close(&format!("loss {what}"), &loss, &want, la, lr);
                assert_close(&format!("grad {what}"), &grad, &want_grad, ga, gr);
                // Ignored rows get exactly zero gradient.
                let ignored = t.eq(-100).nonzero().squeeze_dim(1);
                if ignored.numel() > 0 {
                    assert_eq!(grad.index_select(0, &ignored).abs().max().double_value(&[]), 0.0, "{what}");
                }
                // The raw kernels give what autograd gave, bit for bit.
                let (raw, lse) = cross_entropy_forward(&x, &t).unwrap();
                assert!(raw.equal(&loss.detach()), "{what}: raw forward differs from the autograd path");
                assert_eq!((lse.size(), lse.kind()), (vec![n], acc), "{what}: lse");
                let gx = cross_entropy_backward(&raw.ones_like(), &x, &t, &lse).unwrap();
                assert!(gx.equal(&grad), "{what}: raw backward differs from the autograd path");
                // And an upstream gradient other than 1 scales the result.
                let gx3 = cross_entropy_backward(&(raw.ones_like() * 3.0), &x, &t, &lse).unwrap();
                assert_close(&format!("3x grad {what}"), &gx3, &(&want_grad * 3.0), 3.0 * ga, gr);
            }
        }
    }
}

#[test]
fn cross_entropy_agrees_with_tch_f32() {
    // The comparison a user makes: same dtype, tch's own cross_entropy_for_logits (no ignored rows,
    // since it uses PyTorch's default ignore_index of -100).
    let (x, t) = ce_inputs(64, 65, Kind::Float, 9, 0, Device::Cpu);
    assert_close("f32 vs tch", &cross_entropy(&x, &t).unwrap(), &x.cross_entropy_for_logits(&t), 2e-6, 2e-6);
}

#[test]
fn cross_entropy_ignored_rows_leave_the_mean() {
    // Half the rows ignored: the mean divides by the 8 counted rows, as F.cross_entropy does.
    let (x, t) = ce_inputs(16, 10, Kind::Double, 3, 2, Device::Cpu);
    let keep = t.ne(-100).nonzero().squeeze_dim(1);
    let counted_only = cross_entropy(&x.index_select(0, &keep), &t.index_select(0, &keep)).unwrap();
    assert_close("ignored rows", &cross_entropy(&x, &t).unwrap(), &counted_only, 1e-14, 1e-14);
    // Every row ignored: 0 / 0 = NaN like PyTorch, and every gradient exactly 0.
    let x = x.set_requires_grad(true);
    let loss = cross_entropy(&x, &t.full_like(-100)).unwrap();
    assert!(loss.double_value(&[]).is_nan(), "all-ignored loss must be NaN");
    assert!(cross_entropy_reference(&x, &t.full_like(-100)).double_value(&[]).is_nan());
    loss.backward();
    assert_eq!(x.grad().abs().max().double_value(&[]), 0.0);
}

#[test]
fn cross_entropy_large_logits_do_not_overflow() {
    // Logits of +-1e4: exp(1e4) overflows every float type, so only a max-subtracted softmax
    // stays finite. Rows: mixed, all equal (lse = 1e4 + log 8), all -1e4, and a target 2e4 below
    // the max (loss 2e4, exactly representable).
    let rows: [[f64; 8]; 4] = [
        [1e4, -1e4, 0.0, 1e4 - 1.0, 5.0, -3.0, 1e4, 2.0],
        [1e4; 8],
        [-1e4; 8],
        [-1e4, -1e4, -1e4, -1e4, -1e4, -1e4, -1e4, 1e4],
    ];
    let flat: Vec<f64> = rows.iter().flatten().copied().collect();
    let t = Tensor::from_slice(&[3i64, 5, 0, 0]);
    for kind in [Kind::Float, Kind::Double, Kind::BFloat16, Kind::Half] {
        let x = Tensor::from_slice(&flat).view([4, 8]).to_kind(kind).set_requires_grad(true);
        let loss = cross_entropy(&x, &t).unwrap();
        loss.backward();
        let (want, want_grad) = ce_reference_f64(&x.detach(), &t);
        assert!(loss.double_value(&[]).is_finite(), "{kind:?}: loss overflowed");
        assert!(x.grad().isfinite().all().int64_value(&[]) == 1, "{kind:?}: gradient overflowed");
        let ((la, lr), (ga, gr)) = ce_tol(kind, 0.25);
        assert_close(&format!("loss {kind:?}"), &loss, &want, la, lr);
        // Backward's exp(x - lse) inherits the rounding of the saved fp32 lse, |lse| * 2^-24
        // relative (6e-4 here); the loss does not (forward computes it as (m - x_t) + log s).
        let gr = if kind == Kind::Double { gr } else { gr.max(2.0 * 1e4 * 2f64.powi(-24)) };
        assert_close(&format!("grad {kind:?}"), &x.grad(), &want_grad, ga, gr);
    }
}

#[test]
fn cross_entropy_gradient_matches_finite_differences() {
    // Central differences of the fused forward itself in f64 (error ~h^2 + 1e-16 / h ~ 1e-10),
    // against the fused backward: checks the kernel's calculus, not only its agreement with tch.
    let (x, t) = ce_inputs(5, 9, Kind::Double, 11, 3, Device::Cpu);
    let xg = x.detach().set_requires_grad(true);
    cross_entropy(&xg, &t).unwrap().backward();
    let grad = Vec::<f64>::try_from(xg.grad().flatten(0, -1)).unwrap();
    let base = Vec::<f64>::try_from(x.flatten(0, -1)).unwrap();
    let h = 1e-5;
    let loss_at = |v: &[f64]| cross_entropy(&Tensor::from_slice(v).view([5, 9]), &t).unwrap().double_value(&[]);
    for i in 0..base.len() {
        let (mut up, mut down) = (base.clone(), base.clone());
        up[i] += h;
        down[i] -= h;
        let fd = (loss_at(&up) - loss_at(&down)) / (2.0 * h);
        assert!((fd - grad[i]).abs() < 1e-9, "element {i}: finite difference {fd:e}, backward {:e}", grad[i]);
    }
}

#[test]
fn cross_entropy_double_backward_is_refused() {
    let (x, t) = ce_inputs(3, 4, Kind::Double, 1, 0, Device::Cpu);
    let x = x.set_requires_grad(true);
    let loss = cross_entropy(&x, &t).unwrap();
    let err = Tensor::f_run_backward(&[loss], &[&x], true, true).err().expect("create_graph must fail").to_string();
    assert!(err.contains("double backward"), "{err}");
}

#[test]
fn cross_entropy_every_cpu_kernel_variant_agrees() {
    run_under_every_cpu_variant(&[
        "cross_entropy_matches_reference_for_every_dtype",
        "cross_entropy_large_logits_do_not_overflow",
    ]);
}

#[test]
fn cross_entropy_bad_arguments_give_clear_errors() {
    let (x, t) = ce_inputs(4, 8, Kind::Float, 5, 0, Device::Cpu);
    let err = |r: anyhow::Result<Tensor>| format!("{:#}", r.unwrap_err());
    let e = err(cross_entropy(&x, &t.to_kind(Kind::Float)));
    assert!(e.contains("targets dtype must be int64") && e.contains("Float"), "{e}");
    let e = err(cross_entropy(&x.to_kind(Kind::Int64), &t));
    assert!(e.contains("logits dtype must be float32, float64, bfloat16 or float16"), "{e}");
    let e = err(cross_entropy(&x, &t.narrow(0, 0, 3)));
    assert!(e.contains("targets have 3 rows but logits have 4"), "{e}");
    let e = err(cross_entropy(&x.view([2, 2, 8]), &t));
    assert!(e.contains("logits must be 2-D (N, V)"), "{e}");
    let e = err(cross_entropy(&x, &t.view([2, 2])));
    assert!(e.contains("targets must be 1-D"), "{e}");
    let e = err(cross_entropy(&x, &Tensor::from_slice(&[0i64, 8, 1, 2])));
    assert!(e.contains("targets[1] = 8 is out of range [0, 8)"), "{e}");
    let e = err(cross_entropy(&x, &Tensor::from_slice(&[0i64, 1, -2, 2])));
    assert!(e.contains("targets[2] = -2 is out of range"), "{e}");
    assert!(!e.contains("Exception raised from"), "C++ backtrace leaked: {e}");
    // The raw backward checks what autograd would have passed consistently.
    let (loss, lse) = cross_entropy_forward(&x, &t).unwrap();
    let e = err(cross_entropy_backward(&Tensor::ones([2], (Kind::Float, Device::Cpu)), &x, &t, &lse));
    assert!(e.contains("grad must be the loss's 0-dim gradient"), "{e}");
    let e = err(cross_entropy_backward(&loss, &x, &t, &lse.narrow(0, 0, 3)));
    assert!(e.contains("lse must have shape (4)"), "{e}");
    if tch::Cuda::is_available() {
        let e = err(cross_entropy(&x.to_device(Device::Cuda(0)), &t));
        assert!(e.contains("logits are on cuda:0 but targets are on cpu"), "{e}");
    }
}

#[test]
fn dropout_equals_its_reference_forward_and_backward() {
    use course::ops::dropout::{dropout_reference, dropout_with_seed};
    for (shape, p, seed) in [(vec![7, 33], 0.05, 1i64), (vec![3, 100_003], 0.1, -42), (vec![1536, 576], 0.5, i64::MAX)]
    {
        for kind in [Kind::Float, Kind::BFloat16] {
            let x = Tensor::randn(shape.as_slice(), (kind, Device::Cpu)).set_requires_grad(true);
            let y = dropout_with_seed(&x, p, seed).unwrap();
            let xr = x.detach().copy().set_requires_grad(true);
            let yr = dropout_reference(&xr, p, seed).unwrap();
            assert_eq!(y.kind(), kind);
            let e = (&y - &yr).abs().max().double_value(&[]);
            assert_eq!(e, 0.0, "{shape:?} p {p} {kind:?}: forward differs from the reference by {e}");
            let g = Tensor::randn(shape.as_slice(), (kind, Device::Cpu));
            (&y * &g).sum(Kind::Float).backward();
            (&yr * &g).sum(Kind::Float).backward();
            let e = (x.grad() - xr.grad()).abs().max().double_value(&[]);
            assert_eq!(e, 0.0, "{shape:?} p {p} {kind:?}: the recomputed mask's gradient differs by {e}");
        }
    }
}

#[test]
fn dropout_drops_p_of_the_numbers_and_a_new_seed_draws_a_new_mask() {
    use course::ops::dropout::{dropout, dropout_with_seed};
    let n = 1 << 22;
    let x = Tensor::ones([n], (Kind::Float, Device::Cpu));
    for p in [0.05, 0.1, 0.5] {
        let y = dropout_with_seed(&x, p, 7).unwrap();
        let dropped = y.eq(0.0).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
        let sigma = (p * (1.0 - p) / n as f64).sqrt();
        assert!((dropped - p).abs() < 5.0 * sigma, "p {p}: dropped {dropped} (5 sigma = {})", 5.0 * sigma);
        // The kept numbers are scaled so that the mean is kept.
        let kept = y.max().double_value(&[]);
        assert!((kept - 1.0 / (1.0 - p)).abs() < 1e-6, "p {p}: kept numbers are {kept}");
    }
    let a = dropout_with_seed(&x, 0.5, 1).unwrap().eq(0.0);
    let b = dropout_with_seed(&x, 0.5, 2).unwrap().eq(0.0);
    let same = a.eq_tensor(&b).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    assert!((same - 0.5).abs() < 0.01, "two seeds' masks agree at {same} of the places, not about half");
    // Off when not training or p = 0; seeded from tch's generator otherwise.
    assert_eq!(dropout(&x, 0.3, false).unwrap().sum(Kind::Double).double_value(&[]), n as f64);
    assert_eq!(dropout(&x, 0.0, true).unwrap().sum(Kind::Double).double_value(&[]), n as f64);
    let err = dropout_with_seed(&x, 1.0, 1).unwrap_err().to_string();
    assert!(err.contains("p = 1") && err.contains("[0, 1)"), "{err}");
    let err = dropout_with_seed(&x.to_kind(Kind::Double), 0.1, 1).unwrap_err().to_string();
    assert!(err.contains("float32 or bfloat16"), "{err}");
}
