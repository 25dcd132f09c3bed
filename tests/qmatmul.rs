//! The quantized-weight kernels (`ops::qmatmul`) against their references: W decoded in plain
//! tch ops then a matmul in fp32, over shapes that are not multiples of the blocks, every row
//! count of the GEMV and the GEMM path, fp32 and bf16 inputs, each instruction set; the backward
//! against the reference's autograd; int8 against torch's own `_weight_int8pack_mm`; the Q4_1
//! and Q8_0 decoding of SmolLM2's GGUF against the GGUF reader's dequantizer (itself checked
//! against gguf-py); and the errors.

mod common;

use common::run_under_every_cpu_variant;
use course::io::gguf::GgufFile;
use course::nn::quant::{ggml_weight, Int8Weight, Nf4Weight};
use course::ops::qmatmul::{
    int8_activations_supported, qdequantize, qdequantize_reference, qlinear, qlinear_int8_activations,
    qlinear_int8_activations_reference, qlinear_reference, set_prefetch, Prefetch, QFormat, QTensors,
};
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn cpu(kind: Kind) -> (Kind, Device) {
    (kind, Device::Cpu)
}

/// A ggml weight built by our own quantizer (io::gguf::quantize) from random numbers.
fn ggml_random(format: QFormat, n: i64, k: i64) -> QTensors {
    let w = Tensor::randn([n, k], cpu(Kind::Float)) * 0.05;
    let v: Vec<f32> = Vec::try_from(w.reshape([-1])).unwrap();
    let ty = match format {
        QFormat::Q4_1 => course::io::gguf::GgmlType::Q4_1,
        _ => course::io::gguf::GgmlType::Q8_0,
    };
    let bytes = course::io::gguf::quantize(ty, &v).unwrap();
    ggml_weight(format, Tensor::from_slice(&bytes), n, k).unwrap()
}

fn weights(n: i64, k: i64) -> Vec<QTensors> {
    let w = Tensor::randn([n, k], cpu(Kind::Float)) * 0.05;
    let mut out = vec![Int8Weight::quantize(&w).unwrap().tensors()];
    if k % 2 == 0 && (n * k) % 64 == 0 {
        out.push(Nf4Weight::quantize(&w).unwrap().tensors());
    }
    if k % 32 == 0 {
        for f in [QFormat::Q4_1, QFormat::Q8_0] {
            let w = ggml_random(f, n, k);
            // The same blocks in row-interleaved tiles too, where they apply (n % 16 == 0 and a
            // CPU with the int8-activation path): the tile GEMV must meet every check the row
            // one does.
            let mut t = w.shallow_clone();
            let tiled = t.add_tiles().unwrap();
            assert_eq!(tiled, n % 16 == 0 && int8_activations_supported(f, k), "{f:?} ({n}, {k}) tiles");
            out.push(w);
            if tiled {
                out.push(t);
            }
        }
    }
    out
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Float);
    let b = b.to_kind(Kind::Float);
    let scale = b.abs().max().double_value(&[]).max(1e-6);
    (a - b).abs().max().double_value(&[]) / scale
}

#[test]
fn decoding_equals_the_reference_in_every_format() {
    tch::manual_seed(1);
    // (24, 40): NF4 blocks straddle rows; (37, 77): int8 only, odd sizes; (9, 96), (3, 576).
    for (n, k) in [(24, 40), (37, 77), (9, 96), (3, 576), (130, 64)] {
        for w in weights(n, k) {
            let r = qdequantize_reference(&w).unwrap();
            let d = qdequantize(&w, Kind::Float).unwrap();
            assert_eq!(d.size(), [n, k]);
            let e = max_rel(&d, &r);
            assert!(e < 1e-6, "{} ({n}, {k}): dequantize differs by {e}", w.format.name());
            let b = qdequantize(&w, Kind::BFloat16).unwrap();
            assert_eq!(b.kind(), Kind::BFloat16);
            assert!(max_rel(&b, &r) < 8e-3, "{} bf16", w.format.name());
        }
    }
}

#[test]
fn qlinear_equals_the_reference_for_every_row_count_and_dtype() {
    tch::manual_seed(2);
    for (n, k) in [(24, 40), (37, 77), (70, 96), (5, 576), (300, 128)] {
        for w in weights(n, k) {
            // 1-8 rows: the GEMV (two passes of 4 past 4 rows); 9, 17, 2x9: the GEMM path (panels).
            for shape in [
                vec![1, k],
                vec![2, k],
                vec![3, k],
                vec![4, k],
                vec![5, k],
                vec![8, k],
                vec![9, k],
                vec![17, k],
                vec![2, 9, k],
            ] {
                let x = Tensor::randn(shape.as_slice(), cpu(Kind::Float));
                let want = qlinear_reference(&x, &w).unwrap();
                let got = qlinear(&x, &w).unwrap();
                assert_eq!(got.size(), want.size());
                let e = max_rel(&got, &want);
                assert!(e < 2e-5, "{} ({n}, {k}) rows {shape:?}: fp32 differs by {e}", w.format.name());
                let xb = x.to_kind(Kind::BFloat16);
                let gb = qlinear(&xb, &w).unwrap();
                assert_eq!(gb.kind(), Kind::BFloat16);
                let wb = qlinear_reference(&xb, &w).unwrap();
                let e = max_rel(&gb, &wb);
                assert!(e < 3e-2, "{} ({n}, {k}) rows {shape:?}: bf16 differs by {e}", w.format.name());
            }
        }
    }
}

#[test]
fn the_backward_to_the_input_equals_the_references_autograd() {
    tch::manual_seed(3);
    for w in weights(48, 96) {
        for rows in [3, 40] {
            let mut x = Tensor::randn([rows, 96], cpu(Kind::Float)).set_requires_grad(true);
            let g = Tensor::randn([rows, 48], cpu(Kind::Float));
            (qlinear(&x, &w).unwrap() * &g).sum(Kind::Float).backward();
            let ours = x.grad().copy();
            x.zero_grad();
            (qlinear_reference(&x, &w).unwrap() * &g).sum(Kind::Float).backward();
            let e = max_rel(&ours, &x.grad());
            assert!(e < 2e-5, "{} rows {rows}: input gradient differs by {e}", w.format.name());
        }
    }
}

#[test]
fn int8_equals_torchs_own_int8_pack_mm() {
    tch::manual_seed(4);
    let w = Tensor::randn([96, 256], cpu(Kind::Float));
    let q = Int8Weight::quantize(&w).unwrap();
    for rows in [1, 7] {
        let x = Tensor::randn([rows, 256], cpu(Kind::Float));
        let torch = x.internal_weight_int8pack_mm(&q.q, &q.scale);
        let ours = qlinear(&x, &q.tensors()).unwrap();
        let e = max_rel(&ours, &torch);
        assert!(e < 2e-5, "rows {rows}: differs from torch's _weight_int8pack_mm by {e}");
    }
}

#[test]
fn smollm2_blocks_decode_as_the_gguf_reader_decodes_them() {
    let path = Path::new("data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let f = GgufFile::open(path).unwrap();
    for (name, format) in [("blk.0.ffn_down.weight", QFormat::Q4_1), ("token_embd.weight", QFormat::Q8_0)] {
        let info = f.require_tensor(name).unwrap();
        let shape = info.shape(); // (out, in) as the reader gives it
        let (n, k) = (shape[0], shape[1]);
        let bytes = Tensor::from_slice(f.raw(info));
        let w = ggml_weight(format, bytes, n, k).unwrap();
        let ours = qdequantize(&w, Kind::Float).unwrap();
        let reader = f.dequantize(name, Kind::Float).unwrap().view([n, k]);
        let e = (&ours - &reader).abs().max().double_value(&[]);
        assert!(e < 1e-6, "{name}: the kernel's decoding differs from the reader's by {e}");
    }
}

#[test]
fn bad_arguments_are_clear_errors() {
    let w = Int8Weight::quantize(&Tensor::randn([8, 64], cpu(Kind::Float))).unwrap().tensors();
    let err = |r: anyhow::Result<Tensor>| format!("{:#}", r.err().expect("must fail"));
    let m = err(qlinear(&Tensor::randn([2, 64], cpu(Kind::Double)), &w));
    assert!(m.contains("float32 or bfloat16") && m.contains("Double"), "{m}");
    let m = err(qlinear(&Tensor::randn([2, 63], cpu(Kind::Float)), &w));
    assert!(m.contains("last dimension is 63") && m.contains("in_features 64"), "{m}");
    let mut bad = w.shallow_clone();
    bad.data = bad.data.to_kind(Kind::Uint8);
    let m = err(qlinear(&Tensor::randn([2, 64], cpu(Kind::Float)), &bad));
    assert!(m.contains("q must be Char"), "{m}");
    let mut short = w.shallow_clone();
    short.scale = Some(Tensor::ones([7], cpu(Kind::Float)));
    let m = err(qlinear(&Tensor::randn([2, 64], cpu(Kind::Float)), &short));
    assert!(m.contains("scale holds 7 numbers, expected 8"), "{m}");
    let m = format!("{:#}", ggml_weight(QFormat::Q4_1, Tensor::zeros([20], cpu(Kind::Uint8)), 1, 48).err().unwrap());
    assert!(m.contains("not a multiple of ggml's block of 32"), "{m}");
    let m = format!("{:#}", ggml_weight(QFormat::Q4_1, Tensor::zeros([21], cpu(Kind::Uint8)), 1, 32).err().unwrap());
    assert!(m.contains("takes 20 bytes"), "{m}");
    let nf = Nf4Weight::quantize(&Tensor::randn([4, 48], cpu(Kind::Float))).unwrap().tensors();
    let mut odd = nf.shallow_clone();
    odd.absmax_q = None;
    let m = err(qlinear(&Tensor::randn([1, 48], cpu(Kind::Float)), &odd));
    assert!(m.contains("absmax_q is missing"), "{m}");
}

/// The GEMV with int8 activations (VNNI) against its reference (x quantized in tch as the kernel
/// does, W decoded, fp32 matmul): odd and even block counts per row (the 256-bit last block),
/// 1-8 rows, fp32 and bf16 x. Where the path does not apply (no VNNI, a cap below AVX-512, a
/// K off the blocks, more than 8 rows) it must be qlinear exactly.
#[test]
fn int8_activations_equal_their_reference() {
    tch::manual_seed(3);
    for (n, k) in [(24, 64), (37, 96), (16, 576), (70, 1536), (48, 1536), (32, 608), (9, 128), (300, 192), (5, 40)] {
        for w in weights(n, k) {
            let on = int8_activations_supported(w.format, k);
            for rows in [1, 2, 3, 4, 7, 8, 9] {
                let x = Tensor::randn([rows, k], cpu(Kind::Float));
                let got = qlinear_int8_activations(&x, &w).unwrap();
                // With tiles every row count takes the int8 path (in passes of 8 rows).
                if on && (rows <= 8 || w.tiles.is_some()) {
                    let want = qlinear_int8_activations_reference(&x, &w).unwrap();
                    if w.tiles.is_some() && rows <= 8 {
                        // The tiles are read: the sums run in another order than the rows' path,
                        // so over 18 or more blocks some output differs in its last bits.
                        let mut rows_only = w.shallow_clone();
                        rows_only.tiles = None;
                        let r = qlinear_int8_activations(&x, &rows_only).unwrap();
                        assert!(
                            !got.equal(&r) && max_rel(&got, &r) < 1e-5,
                            "{:?} ({n}, {k}): tiles not taken",
                            w.format
                        );
                    }
                    let e = max_rel(&got, &want);
                    assert!(e < 1e-5, "{} ({n}, {k}) rows {rows}: differs from its reference by {e}", w.format.name());
                    // The int8 rounding of x moves the result by about 1 % of its scale, not more.
                    let e = max_rel(&got, &qlinear_reference(&x, &w).unwrap());
                    assert!(
                        e > 1e-7 && e < 3e-2,
                        "{} ({n}, {k}) rows {rows}: {e} from the fp32 reference",
                        w.format.name()
                    );
                    let xb = x.to_kind(Kind::BFloat16);
                    let gb = qlinear_int8_activations(&xb, &w).unwrap();
                    assert_eq!(gb.kind(), Kind::BFloat16);
                    let e = max_rel(&gb, &qlinear_int8_activations_reference(&xb, &w).unwrap());
                    assert!(e < 1e-2, "{} ({n}, {k}) rows {rows}: bf16 differs by {e}", w.format.name());
                } else {
                    let e = max_rel(&got, &qlinear(&x, &w).unwrap());
                    assert!(
                        e == 0.0,
                        "{} ({n}, {k}) rows {rows}: off the int8 path but {e} from qlinear",
                        w.format.name()
                    );
                }
            }
        }
    }
}

#[test]
fn a_rows_gemv_result_does_not_depend_on_the_other_rows() {
    // Continuous batching decodes up to 8 sequences in one GEMV: each row's numbers must be the
    // ones it gets alone, bit for bit, on both paths (so a greedy answer is the same in a batch).
    tch::manual_seed(11);
    // K = 576: NF4's 9 blocks a row end on an odd one; 608 (19 blocks of 32) does for Q4_1, Q8_0.
    for k in [576, 608] {
        let x = Tensor::randn([8, k], cpu(Kind::Float));
        for w in weights(208, k) {
            for int8 in [false, true] {
                let f = |x: &Tensor| if int8 { qlinear_int8_activations(x, &w) } else { qlinear(x, &w) }.unwrap();
                let all = f(&x);
                for rows in [1, 3, 5, 8] {
                    let part = f(&x.narrow(0, 8 - rows, rows));
                    assert!(
                        part.equal(&all.narrow(0, 8 - rows, rows)),
                        "{:?} K {k} int8 {int8} tiles {}: the last {rows} rows differ from the same rows among 8",
                        w.format,
                        w.tiles.is_some()
                    );
                }
            }
        }
    }
}

#[test]
fn every_software_prefetch_gives_the_same_bits() {
    // A prefetch only brings memory in earlier: every mode must give the same numbers.
    let x = Tensor::randn([2, 576], cpu(Kind::Float));
    let ws = weights(300, 576);
    let before = set_prefetch(Prefetch::Off);
    let base: Vec<(Tensor, Tensor)> =
        ws.iter().map(|w| (qlinear(&x, w).unwrap(), qlinear_int8_activations(&x, w).unwrap())).collect();
    for mode in [Prefetch::NonTemporal, Prefetch::Stream] {
        set_prefetch(mode);
        assert_eq!(course::ops::qmatmul::prefetch(), mode);
        for (w, (a, b)) in ws.iter().zip(&base) {
            assert!(qlinear(&x, w).unwrap().equal(a), "{:?} {mode:?}: qlinear changed", w.format);
            assert!(
                qlinear_int8_activations(&x, w).unwrap().equal(b),
                "{:?} {mode:?}: int8 activations changed",
                w.format
            );
        }
    }
    set_prefetch(before);
}

#[test]
fn every_cpu_variant_gives_the_same_values() {
    run_under_every_cpu_variant(&[
        "int8_activations_equal_their_reference",
        "decoding_equals_the_reference_in_every_format",
        "qlinear_equals_the_reference_for_every_row_count_and_dtype",
        "the_backward_to_the_input_equals_the_references_autograd",
    ]);
}

#[test]
fn the_gemm_path_runs_under_inference_mode() {
    // Generation runs under inference mode; the GEMM path's worker threads must write its
    // output (an inference tensor) in that mode too.
    let w = Int8Weight::quantize(&Tensor::randn([64, 96], cpu(Kind::Float))).unwrap().tensors();
    let x = Tensor::randn([9, 96], cpu(Kind::Float));
    let want = qlinear_reference(&x, &w).unwrap();
    let got = {
        let _g = course::sys::runtime::inference_mode();
        qlinear(&x, &w).unwrap()
    };
    assert!(max_rel(&got, &want) < 2e-5);
}

/// The AMX GEMM (bf16, more than 8 rows) in a fresh process, as the tile state must be asked of
/// Linux before any thread touches a tile: a child runs `amx_child` with `COURSE_AMX=1` and one
/// with `COURSE_AMX=0`. Where /proc/cpuinfo lists amx_tile and amx_bf16, the first child must take
/// the AMX path; elsewhere, and under COURSE_AMX=0 everywhere, both must fall back and say why.
/// Both hold the values to the reference.
#[test]
fn the_amx_gemm_runs_in_a_fresh_process_or_falls_back_cleanly() {
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has = |f: &str| flags.lines().any(|l| l.starts_with("flags") && l.split_whitespace().any(|w| w == f));
    let cpu_has = cfg!(target_arch = "x86_64") && has("amx_tile") && has("amx_bf16") && has("avx512f");
    for off in [false, true] {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "amx_child", "--ignored", "--nocapture"]).env_remove("ATEN_CPU_CAPABILITY");
        cmd.env("COURSE_AMX", if off { "0" } else { "1" });
        let out = cmd.output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && text.contains("1 passed"), "COURSE_AMX off={off}:\n{text}");
        let want = if cpu_has && !off { "amx gemm: on" } else { "amx gemm: off" };
        assert!(text.contains(want), "expected `{want}` (cpu has AMX: {cpu_has}, COURSE_AMX=0: {off}):\n{text}");
        if off {
            assert!(text.contains("COURSE_AMX=0") || !cpu_has, "{text}");
        }
    }
}

#[test]
#[ignore = "the child half of the_amx_gemm_runs_in_a_fresh_process_or_falls_back_cleanly"]
fn amx_child() {
    tch::manual_seed(7);
    // Rows, in, out off the tile grid (16 rows, 32 in, 16 out) and on it; several panels.
    for (m, k, n) in [(5, 64, 16), (37, 96, 50), (33, 40, 24), (130, 576, 300), (64, 1536, 576)] {
        for w in weights(n, k) {
            let x = Tensor::randn([m, k], cpu(Kind::BFloat16));
            let want = qlinear_reference(&x, &w).unwrap();
            let got = qlinear(&x, &w).unwrap();
            assert_eq!(got.kind(), Kind::BFloat16);
            let e = max_rel(&got, &want);
            assert!(e < 3e-2, "{} ({m}, {k}, {n}): bf16 differs by {e}", w.format.name());
        }
    }
    let (on, why) = course::ops::qmatmul::amx();
    println!("amx gemm: {} ({why})", if on { "on" } else { "off" });
}
