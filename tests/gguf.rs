//! `io::gguf` against gguf-py, ggml's own GGUF package (tests/fixtures/gguf_py.py runs it):
//! every metadata value and every tensor of the shipped SmolLM2 file (raw bytes and dequantized
//! values, by sha256), a file our writer makes read back by gguf-py with our quantizers equal to
//! its quantizers byte for byte, the 4-bit block layout by hand, and one clear error per kind
//! of bad file.

use course::io::gguf::{dequantize, quantize, GgmlType, GgufFile, GgufWriter, Value, ValueType};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const MODEL: &str = "data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn sha(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn gguf_py(file: &Path, requantize: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(".venv/bin/python")
        .arg("tests/fixtures/gguf_py.py")
        .arg(file)
        .arg("--requantize")
        .args(requantize)
        .output()
        .expect("running .venv/bin/python (run python3 scripts/setup.py)");
    assert!(out.status.success(), "gguf_py.py failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("gguf_py.py prints JSON")
}

/// Our value against gguf-py's `contents()` (f32 metadata compared at f32 precision).
fn same_value(ours: &Value, theirs: &serde_json::Value) -> bool {
    match (ours, theirs) {
        (Value::F32(a), t) => t.as_f64().is_some_and(|b| (*a as f64 - b).abs() <= 1e-7 * b.abs().max(1e-30)),
        (Value::F64(a), t) => t.as_f64() == Some(*a),
        (Value::Array(_, items), serde_json::Value::Array(t)) => {
            items.len() == t.len() && items.iter().zip(t).all(|(a, b)| same_value(a, b))
        }
        (o, t) => &o.to_json() == t,
    }
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("course-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn the_shipped_model_reads_as_gguf_py_reads_it() {
    let f = GgufFile::open(Path::new(MODEL)).unwrap();
    let py = gguf_py(Path::new(MODEL), &[]);
    assert_eq!(f.version as u64, py["version"].as_u64().unwrap());
    assert_eq!(f.alignment, py["alignment"].as_u64().unwrap());
    assert_eq!(f.data_offset, py["data_offset"].as_u64().unwrap());
    let meta = py["metadata"].as_object().unwrap();
    assert_eq!(f.metadata.len(), meta.len(), "metadata key count");
    for (k, v) in &f.metadata {
        let theirs = meta.get(k).unwrap_or_else(|| panic!("gguf-py has no key {k}"));
        assert!(same_value(v, &theirs["value"]), "metadata {k}: ours {v} vs gguf-py {}", theirs["value"]);
    }
    let tensors = py["tensors"].as_array().unwrap();
    assert_eq!(f.tensors.len(), tensors.len());
    let mut counts = std::collections::BTreeMap::new();
    for (t, p) in f.tensors.iter().zip(tensors) {
        assert_eq!(t.name, p["name"].as_str().unwrap());
        assert_eq!(t.ty.name(), p["type"].as_str().unwrap(), "{}", t.name);
        let shape: Vec<i64> = p["shape"].as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect();
        assert_eq!(t.shape(), shape, "{}", t.name);
        assert_eq!(f.data_offset + t.offset, p["offset"].as_u64().unwrap(), "{}", t.name);
        assert_eq!(sha(f.raw(t)), p["raw_sha256"].as_str().unwrap(), "{}: raw bytes", t.name);
        let values = dequantize(t.ty, f.raw(t), t.numel() as usize).unwrap();
        assert_eq!(sha(&f32_bytes(&values)), p["values_sha256"].as_str().unwrap(), "{}: dequantized values", t.name);
        *counts.entry(t.ty.name()).or_insert(0) += 1;
    }
    // The facts the course relies on.
    assert_eq!(counts, [("F32", 61), ("Q4_1", 210), ("Q8_0", 1)].into_iter().collect());
    assert_eq!(f.require_tensor("blk.0.attn_k.weight").unwrap().shape(), [192, 576]);
    assert!(f.tensor("output.weight").is_none(), "the head is tied");
    // dequantize() through the file gives the same values as a tch tensor of the torch shape.
    let t = f.dequantize("blk.3.ffn_down.weight", Kind::Float).unwrap();
    assert_eq!(t.size(), [576, 1536]);
    let info = f.require_tensor("blk.3.ffn_down.weight").unwrap();
    let direct = dequantize(info.ty, f.raw(info), info.numel() as usize).unwrap();
    assert_eq!(Vec::<f32>::try_from(t.view([-1])).unwrap(), direct);
}

#[test]
fn gguf_py_reads_what_we_write_and_our_quantizers_are_ggmls() {
    tch::manual_seed(3);
    // Rows with an outlier, a constant block and zeros: the quantizers' edge cases.
    let src = Tensor::randn([16, 64], (Kind::Float, Device::Cpu)) * 0.3;
    let _ = src.get(2).narrow(0, 0, 32).fill_(0.25);
    let _ = src.get(3).narrow(0, 0, 32).fill_(0.0);
    let _ = src.get(4).get(5).fill_(7.5);
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::Str("test".into())).unwrap();
    w.set("test.u8", Value::U8(200)).unwrap();
    w.set("test.i8", Value::I8(-100)).unwrap();
    w.set("test.u16", Value::U16(60000)).unwrap();
    w.set("test.i16", Value::I16(-30000)).unwrap();
    w.set("test.u32", Value::U32(4_000_000_000)).unwrap();
    w.set("test.i32", Value::I32(-2_000_000_000)).unwrap();
    w.set("test.f32", Value::F32(1.5e-5)).unwrap();
    w.set("test.bool", Value::Bool(true)).unwrap();
    w.set("test.str", Value::Str("héllo, 世界 🦀".into())).unwrap();
    w.set("test.u64", Value::U64(1 << 40)).unwrap();
    w.set("test.i64", Value::I64(-(1 << 40))).unwrap();
    w.set("test.f64", Value::F64(std::f64::consts::PI)).unwrap();
    w.set("test.strings", Value::Array(ValueType::Str, vec![Value::Str("a b".into()), Value::Str("".into())])).unwrap();
    w.set("test.ints", Value::Array(ValueType::I32, (0..5).map(|i| Value::I32(i * -3)).collect())).unwrap();
    w.add_tensor("src", &src, GgmlType::F32).unwrap();
    for ty in [GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
        w.add_tensor(&format!("src.{ty}"), &src, ty).unwrap();
    }
    w.add_tensor("vector", &Tensor::arange(96, (Kind::Float, Device::Cpu)), GgmlType::Q8_0).unwrap();
    let path = temp("written.gguf");
    w.write(&path).unwrap();

    let py = gguf_py(&path, &["src:F16", "src:BF16", "src:Q8_0", "src:Q4_0", "src:Q4_1"]);
    let ours = GgufFile::open(&path).unwrap();
    let meta = py["metadata"].as_object().unwrap();
    assert_eq!(ours.metadata.len(), meta.len());
    for (k, v) in &ours.metadata {
        assert!(same_value(v, &meta[k]["value"]), "{k}: ours {v} vs gguf-py {}", meta[k]["value"]);
    }
    assert_eq!(meta["test.strings"]["value"], serde_json::json!(["a b", ""]));
    for (t, p) in ours.tensors.iter().zip(py["tensors"].as_array().unwrap()) {
        assert_eq!((t.name.as_str(), t.ty.name()), (p["name"].as_str().unwrap(), p["type"].as_str().unwrap()));
        let values = dequantize(t.ty, ours.raw(t), t.numel() as usize).unwrap();
        assert_eq!(sha(&f32_bytes(&values)), p["values_sha256"].as_str().unwrap(), "{}: values", t.name);
        if let Some(ty) = t.name.strip_prefix("src.") {
            let want = &py["requantized"][format!("src:{ty}")];
            assert_eq!(sha(ours.raw(t)), want.as_str().unwrap(), "{}: our {ty} bytes differ from gguf-py's", t.name);
        }
    }
    // Values survive as the type allows: F32 exactly, Q8_0 within half a step of its scale.
    let back = ours.dequantize("src", Kind::Float).unwrap();
    assert!(back.equal(&src));
    let q8 = ours.dequantize("src.Q8_0", Kind::Float).unwrap();
    let err = (&q8 - &src).abs().max().double_value(&[]);
    assert!(err <= 7.5 / 127.0 / 2.0 + 1e-6, "Q8_0 error {err}");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn four_bit_blocks_put_element_j_low_and_j_plus_16_high() {
    // Q4_1: d = 0.5, m = -1, byte j = (j % 16) | ((15 - j) << 4).
    let mut block = vec![];
    block.extend_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
    block.extend_from_slice(&half::f16::from_f32(-1.0).to_le_bytes());
    block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let v = dequantize(GgmlType::Q4_1, &block, 32).unwrap();
    for j in 0..16 {
        assert_eq!(v[j], 0.5 * j as f32 - 1.0);
        assert_eq!(v[j + 16], 0.5 * (15 - j) as f32 - 1.0);
    }
    // Q4_0: x = d (q - 8).
    let mut block = half::f16::from_f32(2.0).to_le_bytes().to_vec();
    block.extend((0..16u8).map(|j| j | (j << 4)));
    let v = dequantize(GgmlType::Q4_0, &block, 32).unwrap();
    assert_eq!((v[0], v[15], v[16], v[31]), (-16.0, 14.0, -16.0, 14.0));
    // A quantize/dequantize round trip stays within half a step.
    let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
    let back = dequantize(GgmlType::Q4_1, &quantize(GgmlType::Q4_1, &x).unwrap(), 64).unwrap();
    let worst = x.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= 2.0 / 15.0 / 2.0 + 1e-3, "Q4_1 round trip error {worst}");
}

/// A valid one-tensor file: 24-byte header, one metadata entry, one F32 [32] tensor.
fn small_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::Str("llama".into())).unwrap();
    w.add_tensor("t", &Tensor::ones([32], (Kind::Float, Device::Cpu)), GgmlType::F32).unwrap();
    w.to_bytes()
}

fn open_err(name: &str, bytes: &[u8]) -> String {
    let p = temp(name);
    std::fs::write(&p, bytes).unwrap();
    let e = GgufFile::open(&p).expect_err(name);
    let msg = format!("{e:#}");
    assert!(msg.contains(&p.display().to_string()), "{name}: the error does not name the file: {msg}");
    std::fs::remove_file(&p).unwrap();
    msg
}

#[test]
fn bad_files_name_the_file_the_field_and_the_byte() {
    let good = small_file();
    assert!(GgufFile::open(&{
        let p = temp("good.gguf");
        std::fs::write(&p, &good).unwrap();
        p
    })
    .is_ok());
    // Metadata entry: key "general.architecture" (8 + 20 bytes) at 24, type at 52, value at 56.
    // Tensor info at 56 + 8 + 5 = 69: name (8 + 1), n_dims at 78, extent at 82, type at 90,
    // offset at 94.
    let mut bad = good.clone();
    bad[..4].copy_from_slice(b"GGML");
    let m = open_err("magic.gguf", &bad);
    assert!(m.contains("not a GGUF file") && m.contains("byte 0"), "{m}");

    let mut bad = good.clone();
    bad[4..8].copy_from_slice(&1u32.to_le_bytes());
    let m = open_err("version.gguf", &bad);
    assert!(m.contains("unsupported GGUF version 1") && m.contains("byte 4"), "{m}");

    let m = open_err("truncated.gguf", &good[..20]);
    assert!(m.contains("truncated at byte 16") && m.contains("metadata count"), "{m}");

    let mut bad = good.clone();
    bad[52..56].copy_from_slice(&99u32.to_le_bytes());
    let m = open_err("valuetype.gguf", &bad);
    assert!(m.contains("general.architecture") && m.contains("unknown value type 99") && m.contains("byte 52"), "{m}");

    let mut bad = good.clone();
    bad[94..102].copy_from_slice(&8u64.to_le_bytes());
    let m = open_err("misaligned.gguf", &bad);
    assert!(
        m.contains("\"t\"") && m.contains("data offset 8") && m.contains("byte 94") && m.contains("alignment 32"),
        "{m}"
    );

    let mut bad = good.clone();
    bad[82..90].copy_from_slice(&64u64.to_le_bytes());
    let m = open_err("pastend.gguf", &bad);
    assert!(m.contains("\"t\"") && m.contains("runs past the end of the file"), "{m}");

    let mut bad = good.clone();
    bad[90..94].copy_from_slice(&77u32.to_le_bytes());
    let m = open_err("ggmltype.gguf", &bad);
    assert!(m.contains("unknown ggml type 77") && m.contains("byte 90"), "{m}");

    // A known type without a dequantizer (Q4_K) is refused by name when read.
    let mut w = GgufWriter::new();
    w.add_raw("k", &[256], GgmlType::Q4K, vec![0; 144]).unwrap();
    let p = temp("q4k.gguf");
    w.write(&p).unwrap();
    let f = GgufFile::open(&p).unwrap();
    let m = format!("{:#}", f.dequantize("k", Kind::Float).unwrap_err());
    assert!(m.contains("\"k\"") && m.contains("Q4_K") && m.contains("no dequantizer"), "{m}");
    let m = format!("{:#}", f.dequantize("missing", Kind::Float).unwrap_err());
    assert!(m.contains("no tensor \"missing\""), "{m}");
    std::fs::remove_file(&p).unwrap();
}
