//! The quantization formats of `nn::quant` against an implementation nobody here wrote: NF4 with
//! double quantization against bitsandbytes' own CPU `quantize_4bit` / `dequantize_4bit`
//! (tests/fixtures/bnb_nf4.py, run at test time), on SmolLM2's shapes and on random weights.

use course::nn::quant::{dynamic_map, Nf4Weight};
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

#[test]
fn nf4_equals_bitsandbytes() {
    let dir = std::env::temp_dir().join(format!("course-quant-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    tch::manual_seed(0);
    // SmolLM2's k_proj and down_proj shapes (GGUF-like weights: small and roughly normal), a
    // heavy-tailed one, and one whose block count is not a multiple of 256.
    let weights: Vec<(String, Tensor)> = vec![
        ("k_proj".into(), Tensor::randn([192, 576], (Kind::Float, Device::Cpu)) * 0.04),
        ("down_proj".into(), Tensor::randn([576, 1536], (Kind::Float, Device::Cpu)) * 0.02),
        ("heavy".into(), Tensor::randn([64, 320], (Kind::Float, Device::Cpu)).pow_tensor_scalar(3)),
        ("ragged".into(), Tensor::randn([3, 64 * 5], (Kind::Float, Device::Cpu))),
    ];
    let input = dir.join("in.safetensors");
    let output = dir.join("out.safetensors");
    course::io::safetensors::write_tensors(&input, &weights).unwrap();
    let run = std::process::Command::new(".venv/bin/python")
        .args(["tests/fixtures/bnb_nf4.py"])
        .args([&input, &output])
        .output()
        .expect("running .venv/bin/python");
    assert!(run.status.success(), "bnb_nf4.py: {}", String::from_utf8_lossy(&run.stderr));
    let bnb: BTreeMap<String, Tensor> = course::io::safetensors::read_tensors(&output).unwrap();
    let code = Tensor::from_slice(&dynamic_map());
    for (name, w) in &weights {
        let ours = Nf4Weight::quantize(w).unwrap();
        let get = |k: &str| &bnb[&format!("{name}.{k}")];
        // bitsandbytes' CPU path sets its code's first entry to -1 (its CUDA path keeps
        // -0.99296875); every other entry is the same number.
        let their_code = get("nested_code");
        assert!(max_abs(&their_code.narrow(0, 1, 255), &code.narrow(0, 1, 255)) == 0.0, "{name}: dynamic code");
        assert!((ours.offset as f64 - get("offset").double_value(&[0])).abs() <= 1e-7 * ours.offset.abs() as f64);
        assert!(max_abs(&ours.nested_absmax, get("nested_absmax")) <= 1e-7, "{name}: nested absmax");
        // The nibbles and the absmax bytes: the same but where a number sits on a rounding
        // boundary to within the last bit of a float (the mean is summed in another order).
        let same = |a: &Tensor, b: &Tensor| a.eq_tensor(b).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
        let absmax_same = same(&ours.absmax_q, get("absmax_q"));
        assert!(absmax_same >= 0.999, "{name}: {:.4} of the absmax bytes equal", absmax_same);
        let packed_same = same(&ours.packed, get("packed"));
        assert!(packed_same >= 0.999, "{name}: {:.4} of the packed bytes equal", packed_same);
        // Dequantized: bitsandbytes' own numbers wherever the codes agree (number and block).
        let nibbles = |p: &Tensor| {
            let p = p.to_kind(Kind::Int64);
            Tensor::stack(&[p.floor_divide_scalar(16), p.remainder(16)], 1).reshape([-1])
        };
        let agree = nibbles(&ours.packed)
            .eq_tensor(&nibbles(get("packed")))
            .logical_and(&ours.absmax_q.eq_tensor(get("absmax_q")).repeat_interleave_self_int(64, 0, None));
        let diff = (ours.dequantize(Kind::Float).reshape([-1]) - get("dequant").reshape([-1])).abs();
        let d = diff.masked_select(&agree).max().double_value(&[]);
        let scale = w.abs().max().double_value(&[]);
        assert!(d <= 1e-6 * scale, "{name}: dequantized numbers differ by {d} where the codes agree");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `trace((W - Q) H (W - Q)ᵀ)`: the squared output error on inputs whose `Σ xᵀx` is `h`.
fn output_error(w: &Tensor, q: &Nf4Weight, h: &Tensor) -> f64 {
    let d = (w - q.dequantize(Kind::Float)).to_kind(Kind::Double);
    d.matmul(&h.to_kind(Kind::Double)).multiply(&d).sum(Kind::Double).double_value(&[])
}

#[test]
fn gptq_with_uncorrelated_inputs_is_round_to_nearest_under_its_scales() {
    tch::manual_seed(3);
    let w = Tensor::randn([48, 192], (Kind::Float, Device::Cpu)) * 0.05;
    let h = Tensor::eye(192, (Kind::Float, Device::Cpu)) * 7.0;
    let g = Nf4Weight::quantize_gptq(&w, &h).unwrap();
    // No correlation: no column's error can be absorbed by another, so every number is its own
    // nearest code under the block scale GPTQ fixed (GPTQ's scale search clips within 0.7-1).
    let s = g.absmax().view([-1, 1]);
    let blocks = w.reshape([-1, 64]);
    let scaled = (&blocks / &s).clamp(-1.0, 1.0);
    let code = Tensor::from_slice(&course::nn::quant::NF4_CODE);
    let dist = (scaled.unsqueeze(2) - code.view([1, 1, 16])).abs();
    let nearest = code.index_select(0, &dist.argmin(2, false).reshape([-1])).view([-1, 64]) * &s;
    assert!(max_abs(&g.dequantize(Kind::Float).reshape([-1, 64]), &nearest) < 1e-6);
    let am = blocks.abs().amax([1], true);
    let ratio = (&s / &am).view([-1]);
    assert!(ratio.min().double_value(&[]) >= 0.69 && ratio.max().double_value(&[]) <= 1.01, "{ratio:?}");
}

#[test]
fn gptq_lowers_the_output_error_of_correlated_inputs_below_round_to_nearest() {
    tch::manual_seed(4);
    let (n, k) = (64, 256);
    let w = Tensor::randn([n, k], (Kind::Float, Device::Cpu)) * 0.05;
    // Inputs with strongly correlated features and uneven energy, as a layer's activations are.
    let mix = Tensor::randn([k, k], (Kind::Float, Device::Cpu)) / (k as f64).sqrt()
        + Tensor::eye(k, (Kind::Float, Device::Cpu));
    let x = Tensor::randn([2048, k], (Kind::Float, Device::Cpu)).matmul(&mix)
        * Tensor::linspace(0.2, 3.0, k, (Kind::Float, Device::Cpu));
    let h = x.tr().matmul(&x);
    let rtn = output_error(&w, &Nf4Weight::quantize(&w).unwrap(), &h);
    let g = Nf4Weight::quantize_gptq(&w, &h).unwrap();
    let gptq = output_error(&w, &g, &h);
    assert!(gptq < 0.6 * rtn, "output error: GPTQ {gptq:.4e} vs round-to-nearest {rtn:.4e}");
    // Still NF4: every number is a code times its block's scale, and the kernels read it.
    let xs = Tensor::randn([3, k], (Kind::Float, Device::Cpu));
    let y = course::ops::qmatmul::qlinear(&xs, &g.tensors()).unwrap();
    assert!(max_abs(&y, &xs.matmul(&g.dequantize(Kind::Float).tr())) < 1e-4);
}

#[test]
fn gptq_refuses_what_it_cannot_quantize_by_name() {
    let w = Tensor::zeros([8, 96], (Kind::Float, Device::Cpu));
    let e = format!("{:#}", Nf4Weight::quantize_gptq(&w, &Tensor::eye(96, (Kind::Float, Device::Cpu))).unwrap_err());
    assert!(e.contains("in_features 96") && e.contains("64"), "{e}");
    let w = Tensor::zeros([8, 128], (Kind::Float, Device::Cpu));
    let e = format!("{:#}", Nf4Weight::quantize_gptq(&w, &Tensor::eye(64, (Kind::Float, Device::Cpu))).unwrap_err());
    assert!(e.contains("(128, 128)") && e.contains("[64, 64]"), "{e}");
    let bad = Tensor::eye(128, (Kind::Float, Device::Cpu)) * f64::NAN;
    let e = format!("{:#}", Nf4Weight::quantize_gptq(&w, &bad).unwrap_err());
    assert!(e.contains("NaN"), "{e}");
}
