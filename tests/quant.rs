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
