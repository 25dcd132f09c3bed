//! Benchmark (not a test): the quantized-weight kernels (`course::ops::qlinear`) against fp32
//! (tch's `linear`, MKL) and torch's own quantized CPU ops (`_weight_int8pack_mm`, int8 per
//! row; `_weight_int4pack_mm_for_cpu`, 4-bit with a scale and zero per group of 32), at 4096 x
//! 4096 and at SmolLM2-135M's shapes. One token (M = 1, decoding: bound by reading W), also with
//! int8 activations ("x8": VNNI byte dot products, where the CPU has them); a prefill of 128
//! tokens and a training batch of 1,536 (the GEMM path), also with bf16 x through torch's bf16
//! linear and our kernels with the AMX tiles on and off.
//!
//! `cargo bench --bench qmatmul [-- --rounds N] [-- --threads N] [-- --dram-only]`
//!
//! Every contender runs once per round, in turn, and each cell is a median over rounds; "x f32"
//! is the median of the per-round ratios to fp32. GB/s counts the weight's bytes read per call
//! (x and y are a few KB); "% roof" compares that with a 256 MiB fp32 copy measured in the same
//! run (read + write counted, as the copy roof is quoted elsewhere in the project).
//!
//! A cache as large as some of these machines have (the Intel Xeon's L3 is 300 MB) holds even
//! the 64 MB fp32 4096 x 4096 weight, so a GEMV timed on one weight reads it from cache, not
//! from memory, and "bound by reading W" no longer holds. The 4096 x 4096 decode is therefore
//! timed twice: once on one weight (warm), and once "from DRAM": every contender cycles through
//! enough copies of its weight (deep copies, each its own storage) that they span at least
//! twice the last-level cache and 512 MB, so each call reads its weight from memory, as a
//! model larger than the cache does on every token.

use anyhow::Result;
mod benchkit;
use course::nn::quant::{ggml_weight, Int8Weight, Nf4Weight};
use course::ops::qmatmul::{
    amx, int8_activations_supported, prefetch, qlinear, qlinear_int8_activations, set_amx, set_prefetch, Prefetch,
    QFormat, QTensors,
};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// (M rows of x, K in, N out); the first is timed warm and from DRAM.
const SHAPES: &[(i64, i64, i64)] = &[
    (1, 4096, 4096),
    (1, 576, 576),
    (1, 576, 1536),
    (1, 1536, 576),
    (1, 576, 49152),
    (128, 576, 1536),
    (1536, 576, 1536),
];

fn time_ms(mut f: impl FnMut()) -> f64 {
    // About 40 ms per timed group, at least 3 calls.
    let t = Instant::now();
    f();
    let once = t.elapsed().as_secs_f64() * 1e3;
    let reps = ((40.0 / once.max(1e-3)) as usize).clamp(3, 2000);
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    t.elapsed().as_secs_f64() * 1e3 / reps as f64
}

fn copy_roof() -> f64 {
    let src = Tensor::randn([1 << 26], (Kind::Float, Device::Cpu));
    let mut dst = src.empty_like();
    dst.copy_(&src);
    let ms = benchkit::median((0..5).map(|_| time_ms(|| dst.copy_(&src))).collect());
    2.0 * (1u64 << 26) as f64 * 4.0 / (ms * 1e-3) / 1e9
}

struct Contender {
    name: String,
    bytes: i64,
    run: Box<dyn Fn()>,
}

/// The last-level cache in bytes (sysfs; 32 MiB where it cannot be read).
fn llc_bytes() -> i64 {
    (0..8)
        .filter_map(|i| std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu0/cache/index{i}/size")).ok())
        .filter_map(|s| {
            let s = s.trim();
            let (num, mul) = match s.chars().last() {
                Some('K') => (&s[..s.len() - 1], 1i64 << 10),
                Some('M') => (&s[..s.len() - 1], 1 << 20),
                _ => (s, 1),
            };
            num.parse::<i64>().ok().map(|v| v * mul)
        })
        .max()
        .unwrap_or(32 << 20)
}

/// How many copies of a weight of `bytes` make the working set `span` bytes (1 when warm).
fn copies(bytes: i64, span: i64) -> usize {
    ((span + bytes - 1) / bytes).max(1) as usize
}

/// A closure that runs `f` on `items` in turn, one per call.
fn rotating<T: 'static>(items: Vec<T>, f: impl Fn(&T) + 'static) -> Box<dyn Fn()> {
    let next = std::cell::Cell::new(0usize);
    Box::new(move || {
        let i = next.get();
        next.set((i + 1) % items.len());
        f(&items[i])
    })
}

fn deep(t: &Tensor) -> Tensor {
    t.copy()
}

fn deep_q(q: &QTensors) -> QTensors {
    let o = |t: &Option<Tensor>| t.as_ref().map(deep);
    QTensors {
        format: q.format,
        n: q.n,
        k: q.k,
        data: deep(&q.data),
        scale: o(&q.scale),
        absmax_q: o(&q.absmax_q),
        code8: o(&q.code8),
        code16: o(&q.code16),
        offset: q.offset,
        tiles: o(&q.tiles),
    }
}

fn ggml(format: QFormat, w: &Tensor) -> QTensors {
    let s = w.size();
    let v: Vec<f32> = Vec::try_from(w.reshape([-1])).unwrap();
    let ty = if format == QFormat::Q4_1 { course::io::gguf::GgmlType::Q4_1 } else { course::io::gguf::GgmlType::Q8_0 };
    ggml_weight(format, Tensor::from_slice(&course::io::gguf::quantize(ty, &v).unwrap()), s[0], s[1]).unwrap()
}

/// Every contender at one shape; `span` > 0 makes each cycle through copies of its weight
/// spanning that many bytes (the "from DRAM" timing).
fn contenders(m: i64, k: i64, n: i64, span: i64) -> Vec<Contender> {
    let x = Tensor::randn([m, k], (Kind::Float, Device::Cpu));
    let w = Tensor::randn([n, k], (Kind::Float, Device::Cpu)) * (k as f64).powf(-0.5);
    let mut out = Vec::new();
    {
        let x = x.shallow_clone();
        let ws: Vec<Tensor> = (0..copies(n * k * 4, span)).map(|_| deep(&w)).collect();
        out.push(Contender {
            name: "f32 (tch)".into(),
            bytes: n * k * 4,
            run: rotating(ws, move |w| drop(x.linear::<Tensor>(w, None))),
        });
    }
    let i8w = Int8Weight::quantize(&w).unwrap();
    {
        let x = x.shallow_clone();
        let qs: Vec<(Tensor, Tensor)> =
            (0..copies(n * k + 4 * n, span)).map(|_| (deep(&i8w.q), deep(&i8w.scale))).collect();
        out.push(Contender {
            name: "int8 torch".into(),
            bytes: n * k + 4 * n,
            run: rotating(qs, move |(q, s)| drop(x.internal_weight_int8pack_mm(q, s))),
        });
    }
    // torch's int4 pack: values 0..15 with (q - 8) * scale + zero per group of 32 (Q4_1-like).
    if k % 32 == 0 && n % 16 == 0 {
        let g = w.view([n, k / 32, 32]);
        let lo = g.amin([2], true);
        let hi = g.amax([2], true);
        let scale = ((&hi - &lo) / 15.0).clamp_min(1e-8);
        let q = ((&g - &lo) / &scale).round().clamp(0, 15);
        let zero = &lo + &scale * 8.0; // (q - 8) s + z = q s + lo
        let packed = q.view([n, k]).to_kind(Kind::Int).internal_convert_weight_to_int4pack_for_cpu(1);
        let sz = Tensor::stack(&[scale.squeeze_dim(2), zero.squeeze_dim(2)], 2).transpose(0, 1).contiguous();
        let x = x.shallow_clone();
        let bytes = n * k / 2 + n * (k / 32) * 8;
        let ps: Vec<(Tensor, Tensor)> = (0..copies(bytes, span)).map(|_| (deep(&packed), deep(&sz))).collect();
        out.push(Contender {
            name: "int4 torch".into(),
            bytes,
            run: rotating(ps, move |(p, sz)| drop(x.internal_weight_int4pack_mm_for_cpu(p, 32, sz))),
        });
    }
    let mut ours = vec![("int8 ours", i8w.tensors())];
    if (n * k) % 64 == 0 {
        ours.push(("nf4 ours", Nf4Weight::quantize(&w).unwrap().tensors()));
    }
    if k % 32 == 0 {
        ours.push(("q4_1 ours", ggml(QFormat::Q4_1, &w)));
        ours.push(("q8_0 ours", ggml(QFormat::Q8_0, &w)));
    }
    let gemm = m > 4;
    for (name, q) in ours {
        if gemm && (name.starts_with("int8") || name.starts_with("q4_1")) {
            bf16_contenders(&mut out, name, &x, &w, &q);
        }
        type Op = fn(&Tensor, &QTensors) -> Result<Tensor>;
        let mut ops: Vec<(String, Op)> = vec![];
        if !gemm && int8_activations_supported(q.format, k) {
            let label = match q.format {
                QFormat::Q4_1 => "q4_1 x8 ours",
                QFormat::Q8_0 => "q8_0 x8 ours",
                _ => "nf4 x8 ours",
            };
            ops.push((label.into(), qlinear_int8_activations));
        }
        ops.push((name.into(), qlinear));
        for (label, op) in ops {
            for (suffix, pf) in prefetches(k) {
                let x = x.shallow_clone();
                let qs: Vec<QTensors> = (0..copies(q.bytes(), span)).map(|_| deep_q(&q)).collect();
                out.push(Contender {
                    name: format!("{label}{suffix}"),
                    bytes: q.bytes(),
                    run: rotating(qs, move |q| {
                        set_prefetch(pf);
                        drop(op(&x, q).unwrap())
                    }),
                });
            }
        }
    }
    out
}

/// At 4096 x 4096 (one token) our GEMVs run once per software prefetch of W's rows (none,
/// non-temporal, streamed: `ops::qmatmul::Prefetch`); elsewhere with the default.
fn prefetches(k: i64) -> Vec<(&'static str, Prefetch)> {
    if k == 4096 {
        vec![(" -pf", Prefetch::Off), (" nta", Prefetch::NonTemporal), (" st", Prefetch::Stream)]
    } else {
        vec![("", prefetch())]
    }
}

/// For the GEMM shapes (more than 8 rows): bf16 x through torch's own bf16 linear (oneDNN) and
/// through our kernels with the AMX tiles on and off (where the CPU has none, both run the
/// AVX-512 panels + ATen path).
fn bf16_contenders(out: &mut Vec<Contender>, name: &'static str, x: &Tensor, w: &Tensor, q: &QTensors) {
    let xb = x.to_kind(Kind::BFloat16);
    if name.starts_with("int8") {
        let (xb, wb) = (xb.shallow_clone(), w.to_kind(Kind::BFloat16));
        out.push(Contender {
            name: "bf16 (tch)".into(),
            bytes: wb.numel() as i64 * 2,
            run: Box::new(move || drop(xb.linear::<Tensor>(&wb, None))),
        });
    }
    let (amx_name, aten_name) = if name.starts_with("int8") {
        ("int8 bf16 amx", "int8 bf16 aten")
    } else {
        ("q4_1 bf16 amx", "q4_1 bf16 aten")
    };
    for (label, on) in [(amx_name, true), (aten_name, false)] {
        let (xb, q) = (xb.shallow_clone(), q.shallow_clone());
        out.push(Contender {
            name: label.into(),
            bytes: q.bytes(),
            run: Box::new(move || {
                set_amx(on);
                drop(qlinear(&xb, &q).unwrap())
            }),
        });
    }
}

fn main() -> Result<()> {
    let b = benchkit::BenchArgs::from_env(7);
    let rounds = b.rounds;
    let roof = tch::no_grad(copy_roof);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .unwrap_or_default();
    println!(
        "{cpu}; {} threads; ATen CPU capability {}; copy roof {roof:.1} GB/s (256 MiB fp32, read + write)\n",
        b.threads,
        course::sys::runtime::versions().cpu_capability
    );
    println!("AMX GEMM: {} (the bench switches it per contender)", amx().1);
    let pf = prefetch();
    println!("GEMV prefetch by default: {pf:?} (at 4096 x 4096 each of ours runs with -pf none, nta and l2)\n");
    println!(
        "{:>22} {:>20} {:>10} {:>9} {:>8} {:>7}   (medians of {rounds} rounds)",
        "M x K -> N", "contender", "ms/call", "GB/s", "% roof", "x f32"
    );
    tch::manual_seed(0);
    tch::no_grad(|| -> Result<()> {
        let span = (2 * llc_bytes()).max(512 << 20);
        println!("(\"DRAM\": each contender cycles through copies of its weight spanning {} MB, twice the {} MB last-level cache or 512 MB)\n", span >> 20, llc_bytes() >> 20);
        let mut runs: Vec<(i64, i64, i64, i64)> = vec![(1, 4096, 4096, span)];
        runs.extend(SHAPES.iter().map(|&(m, k, n)| (m, k, n, 0)));
        if b.flag("--dram-only") {
            runs.truncate(1);
        }
        for (m, k, n, span) in runs {
            set_prefetch(pf); // the default again for the shapes that do not switch it
            let cs = contenders(m, k, n, span);
            let mut ms: Vec<Vec<f64>> = vec![Vec::new(); cs.len()];
            for c in &cs {
                (c.run)(); // warm-up
            }
            for _ in 0..rounds {
                for (i, c) in cs.iter().enumerate() {
                    ms[i].push(time_ms(|| (c.run)()));
                }
            }
            for (i, c) in cs.iter().enumerate() {
                let med = benchkit::median(ms[i].clone());
                let ratio = benchkit::median(ms[0].iter().zip(&ms[i]).map(|(f, o)| f / o).collect());
                let gbs = c.bytes as f64 / (med * 1e-3) / 1e9;
                println!(
                    "{:>22} {:>20} {:>10.4} {:>9.1} {:>7.0}% {:>6.2}x",
                    format!("{m} x {k} -> {n}{}", if span > 0 { " DRAM" } else { "" }),
                    c.name,
                    med,
                    gbs,
                    100.0 * gbs / roof,
                    ratio
                );
            }
            println!();
        }
        Ok(())
    })
}
