//! The LM training loop and mixed precision: gradient accumulation equals one big batch (f64),
//! the GradScaler skips and backs off on inf, grows after its interval and unscales to the fp32
//! gradients, the non-finite check names the poisoned parameter, resume is exact, and the token
//! files round-trip.

use course::data::lm::LmData;
use course::data::lm::{self as lmdata, BatchSource, Split, TokenizerChoice};
use course::models::gpt::{Gpt, GptConfig, Preset};
use course::ops::IGNORE_INDEX;
use course::sys::rng::Rng;
use course::train::amp::{GradScaler, Precision, ScalerConfig};
use course::train::lm::{self as lmtrain, Inject, LmTrainConfig, NoHooks, OnNonFinite, TrainOptions};
use std::path::PathBuf;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("course-lmtrain-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A token stream with structure (a noisy repeating pattern) so the loss can fall.
fn tokens(n: usize, vocab: u64, seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let v: Vec<i16> =
        (0..n).map(|i| if rng.below(10) == 0 { rng.below(vocab) as i16 } else { (i as u64 % vocab) as i16 }).collect();
    Tensor::from_slice(&v)
}

fn config(steps: usize) -> LmTrainConfig {
    LmTrainConfig {
        steps,
        batch_size: 4,
        grad_accum: 1,
        block_size: 16,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup: 2,
        weight_decay: 0.1,
        beta1: 0.9,
        beta2: 0.99,
        grad_clip: 1.0,
        eval_interval: 0,
        eval_iters: 2,
        log_interval: 1,
        checkpoint_interval: 0,
        precision: Precision::Fp32,
        on_nonfinite: OnNonFinite::Stop,
        fused_loss: false,
        max_time: None,
        seed: 7,
        cuda_graph: false,
    }
}

fn model(kind: Kind) -> (VarStore, Gpt) {
    tch::manual_seed(0);
    let mut vs = VarStore::new(Device::Cpu);
    let cfg = GptConfig { block_size: 16, ..Preset::Tiny.config(12) };
    let m = Gpt::new(&vs.root(), &cfg).unwrap();
    if kind == Kind::Double {
        vs.double();
    }
    (vs, m)
}

fn opts(dir: &std::path::Path, m: &Gpt) -> TrainOptions<'static> {
    TrainOptions {
        dir: dir.to_path_buf(),
        resume: false,
        model_config: serde_json::to_value(&m.cfg).unwrap(),
        name: "test",
        inject: None,
        stop_after: None,
    }
}

fn weights(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn k_micro_batches_of_b_equal_one_batch_of_k_times_b() {
    let (train, val) = (tokens(4000, 12, 1), tokens(500, 12, 2));
    let data = LmData { train: &train, val: &val };
    let mut results = vec![];
    for (b, k) in [(12, 1), (4, 3), (1, 12)] {
        let (vs, m) = model(Kind::Double);
        let dir = tmp(&format!("accum-{b}-{k}"));
        let cfg = LmTrainConfig { batch_size: b, grad_accum: k, steps: 3, ..config(3) };
        let out = lmtrain::train(&vs, &m, &data, &cfg, &opts(&dir, &m), &mut NoHooks).unwrap();
        results.push((weights(&vs), out.progress.logs.iter().map(|l| (l.loss, l.grad_norm)).collect::<Vec<_>>()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let (w0, l0) = &results[0];
    for (w, l) in &results[1..] {
        for ((name, a), (_, b)) in w0.iter().zip(w) {
            let d = (a - b).abs().max().double_value(&[]);
            assert!(d < 1e-12, "{name} differs by {d} after 3 steps");
        }
        for ((la, ga), (lb, gb)) in l0.iter().zip(l) {
            assert!((la - lb).abs() < 1e-12 && (ga - gb).abs() < 1e-10, "loss/grad-norm logs differ: {l0:?} vs {l:?}");
        }
    }
    // And the weights did move.
    let (vs, _) = model(Kind::Double);
    let moved = (&weights(&vs)[0].1 - &w0[0].1).abs().max().double_value(&[]);
    assert!(moved > 1e-4, "{moved}");
}

#[test]
fn an_inf_gradient_skips_the_step_and_halves_the_scale() {
    let t = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let w_before = t.copy();
    let mut s = GradScaler::new(ScalerConfig::default(), true, Device::Cpu).unwrap();
    let loss = (&t * Tensor::from_slice(&[1.0f32, f32::INFINITY, 2.0])).sum(Kind::Float);
    s.scale(&loss).backward();
    assert!(s.unscale(&[t.shallow_clone()]).unwrap(), "inf found");
    assert!(!s.should_step());
    s.update().unwrap();
    assert_eq!(s.scale_value(), 32768.0);
    assert_eq!(s.growth_tracker(), 0);
    assert!(t.equal(&w_before));
    // A NaN does the same.
    let mut g = t.grad();
    let _ = g.fill_(f64::NAN);
    assert!(s.unscale(&[t.shallow_clone()]).unwrap());
    s.update().unwrap();
    assert_eq!(s.scale_value(), 16384.0);
}

#[test]
fn the_scale_grows_after_the_growth_interval() {
    let cfg = ScalerConfig { init_scale: 8.0, growth_interval: 3, ..Default::default() };
    let mut s = GradScaler::new(cfg, true, Device::Cpu).unwrap();
    let t = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let mut scales = vec![];
    for _ in 0..7 {
        s.scale(&t.sum(Kind::Float)).backward();
        assert!(!s.unscale(&[t.shallow_clone()]).unwrap());
        // The unscaled gradient is the true one: d(sum)/dt = 1.
        assert!(t.grad().eq(1.0).all().int64_value(&[]) == 1, "{:?}", t.grad());
        s.update().unwrap();
        scales.push(s.scale_value());
        course::sys::runtime::clear_grad(&t);
    }
    assert_eq!(scales, [8.0, 8.0, 16.0, 16.0, 16.0, 32.0, 32.0]);
    // State round trip (what checkpoints keep).
    let mut back = GradScaler::new(ScalerConfig::default(), false, Device::Cpu).unwrap();
    back.load_state(&s.state()).unwrap();
    assert_eq!((back.scale_value(), back.growth_tracker(), back.enabled()), (32.0, 1, true));
    assert!(back.load_state(&serde_json::json!({"enabled": true})).unwrap_err().to_string().contains("growth_factor"));
}

#[test]
fn unscaled_fp16_gradients_equal_fp32_gradients() {
    let (train, _) = (tokens(2000, 12, 3), ());
    let (x, y) = lmdata::sample_batch(&train, 4, 16, &mut Rng::new(5), Device::Cpu).unwrap();
    let (vs, m) = model(Kind::Float);
    m.loss(&x, &y, true, false).backward();
    let want: Vec<Tensor> = weights(&vs).iter().map(|(_, t)| t.grad().copy()).collect();
    for (_, t) in weights(&vs) {
        course::sys::runtime::clear_grad(&t);
    }
    // Same fp32 forward, loss scaled by 2^16 then unscaled: equal up to fp32 rounding.
    let mut s = GradScaler::new(ScalerConfig::default(), true, Device::Cpu).unwrap();
    s.scale(&m.loss(&x, &y, true, false)).backward();
    let params: Vec<Tensor> = weights(&vs).iter().map(|(_, t)| t.shallow_clone()).collect();
    assert!(!s.unscale(&params).unwrap());
    for ((name, t), w) in weights(&vs).iter().zip(&want) {
        let d = (t.grad() - w).abs().max().double_value(&[]);
        let scale = w.abs().max().double_value(&[]).max(1e-6);
        assert!(d / scale < 1e-5, "{name}: relative difference {}", d / scale);
    }
}

#[test]
fn fp16_training_with_the_scaler_tracks_fp32() {
    let (train, val) = (tokens(4000, 12, 1), tokens(500, 12, 2));
    let data = LmData { train: &train, val: &val };
    let mut finals = vec![];
    for p in [Precision::Fp32, Precision::Bf16, Precision::Fp16] {
        let (vs, m) = model(Kind::Float);
        let dir = tmp(&format!("prec-{}", p.name()));
        let cfg = LmTrainConfig { precision: p, steps: 30, ..config(30) };
        let mut o = opts(&dir, &m);
        // An inf at step 4 in fp16: the scaler skips that step and halves its scale.
        if p == Precision::Fp16 {
            o.inject = Some(Inject { step: 4, param: "transformer.h.1.mlp.c_fc.weight".into(), value: f64::INFINITY });
        }
        let out = lmtrain::train(&vs, &m, &data, &cfg, &o, &mut NoHooks).unwrap();
        let logs = &out.progress.logs;
        if p == Precision::Fp16 {
            assert_eq!(out.progress.skipped.len(), 1, "{:?}", out.progress.skipped);
            assert_eq!((out.progress.skipped[0].step, out.progress.skipped[0].reason.as_str()), (4, "scaler"));
            assert_eq!(logs[4].scale, 65536.0);
            assert_eq!(logs[5].scale, 32768.0);
        } else {
            assert!(out.progress.skipped.is_empty());
            assert!(logs.iter().all(|l| l.scale == 1.0));
        }
        finals.push(out.final_val_loss);
        std::fs::remove_dir_all(&dir).unwrap();
    }
    assert!(finals[0] < 12f64.ln() - 0.5, "fp32 learned something: {finals:?}");
    for f in &finals[1..] {
        assert!((f / finals[0] - 1.0).abs() < 0.05, "lower precisions track fp32: {finals:?}");
    }
}

#[test]
fn a_nan_gradient_is_named_and_stops_or_is_skipped() {
    let (train, val) = (tokens(4000, 12, 1), tokens(500, 12, 2));
    let data = LmData { train: &train, val: &val };
    let (vs, m) = model(Kind::Float);
    let dir = tmp("nan-stop");
    let mut o = opts(&dir, &m);
    o.inject = Some(Inject { step: 2, param: "transformer.h.1.attn.c_proj.weight".into(), value: f64::NAN });
    let e = lmtrain::train(&vs, &m, &data, &config(5), &o, &mut NoHooks).unwrap_err().to_string();
    assert!(
        e.contains("step 2") && e.contains("first non-finite gradient in 'transformer.h.1.attn.c_proj.weight'"),
        "{e}"
    );
    assert!(e.contains("grad norm NaN") && e.contains("--on-nonfinite skip"), "{e}");

    let (vs, m) = model(Kind::Float);
    let cfg = LmTrainConfig { on_nonfinite: OnNonFinite::Skip, ..config(5) };
    let out = lmtrain::train(&vs, &m, &data, &cfg, &o, &mut NoHooks).unwrap();
    assert_eq!(out.progress.skipped.len(), 1);
    assert_eq!((out.progress.skipped[0].step, out.progress.skipped[0].reason.as_str()), (2, "nonfinite"));
    assert!(out.progress.skipped[0].detail.contains("transformer.h.1.attn.c_proj.weight"));
    for (name, t) in weights(&vs) {
        assert!(t.isfinite().all().int64_value(&[]) == 1, "{name} stayed finite");
    }
    let bad = Inject { step: 1, param: "nope".into(), value: f64::NAN };
    o.inject = Some(bad);
    assert!(lmtrain::train(&vs, &m, &data, &cfg, &o, &mut NoHooks)
        .unwrap_err()
        .to_string()
        .contains("no trainable parameter named 'nope'"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resume_continues_exactly() {
    let (train, val) = (tokens(4000, 12, 1), tokens(500, 12, 2));
    let data = LmData { train: &train, val: &val };
    let cfg = LmTrainConfig { precision: Precision::Bf16, ..config(8) };
    let (vs, m) = model(Kind::Float);
    let dir = tmp("straight");
    let straight = lmtrain::train(&vs, &m, &data, &cfg, &opts(&dir, &m), &mut NoHooks).unwrap();
    let want = weights(&vs);

    let dir2 = tmp("resumed");
    let (vs2, m2) = model(Kind::Float);
    let mut o = opts(&dir2, &m2);
    o.stop_after = Some(3);
    lmtrain::train(&vs2, &m2, &data, &cfg, &o, &mut NoHooks).unwrap();
    let (vs3, m3) = model(Kind::Float);
    tch::manual_seed(99); // resume must restore torch's generator itself
    let mut o = opts(&dir2, &m3);
    o.resume = true;
    let resumed = lmtrain::train(&vs3, &m3, &data, &cfg, &o, &mut NoHooks).unwrap();
    for ((name, a), (_, b)) in want.iter().zip(weights(&vs3)) {
        assert!(a.equal(&b), "{name} differs after resume");
    }
    assert_eq!(straight.final_val_loss, resumed.final_val_loss);
    assert_eq!(resumed.progress.step, 8);
    // A different precision refuses to resume.
    let (vs4, m4) = model(Kind::Float);
    let e = lmtrain::train(&vs4, &m4, &data, &config(8), &o, &mut NoHooks).unwrap_err().to_string();
    assert!(e.contains("precision bf16") && e.contains("asked for fp32"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&dir2).unwrap();
}

#[test]
fn the_time_budget_stops_training_cleanly() {
    let (train, val) = (tokens(4000, 12, 1), tokens(500, 12, 2));
    let data = LmData { train: &train, val: &val };
    let (vs, m) = model(Kind::Float);
    let dir = tmp("time");
    let cfg = LmTrainConfig { max_time: Some(1e-9), ..config(1000) };
    let out = lmtrain::train(&vs, &m, &data, &cfg, &opts(&dir, &m), &mut NoHooks).unwrap();
    assert!(out.stopped_by_time);
    assert_eq!(out.progress.step, 1, "one step runs, then the budget is spent");
    assert!(out.final_val_loss.is_finite());
    assert!(dir.join("last/model.safetensors").is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cuda_graphs_refuse_a_cpu_model() {
    let (train, val) = (tokens(4000, 12, 1), tokens(500, 12, 2));
    let data = LmData { train: &train, val: &val };
    let (vs, m) = model(Kind::Float);
    let dir = tmp("graph-cpu");
    let cfg = LmTrainConfig { cuda_graph: true, ..config(2) };
    let e = lmtrain::train(&vs, &m, &data, &cfg, &opts(&dir, &m), &mut NoHooks).unwrap_err().to_string();
    assert_eq!(e, "CUDA graphs need a CUDA device (--device cuda)");
    assert!(!dir.join("last").exists(), "refused before training");
    // Checkpoints written before the flag existed still load (as false).
    let mut saved = serde_json::to_value(config(2)).unwrap();
    saved.as_object_mut().unwrap().remove("cuda_graph");
    assert!(!serde_json::from_value::<LmTrainConfig>(saved).unwrap().cuda_graph);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// CUDA graphs change how kernels are launched, not what they compute: 5 steps whose
/// micro-batches replay a graph end on the eager run's weights, in fp32 and in fp16 (where the
/// graph multiplies by the scaler's tensor). Needs a GPU and a `--features cuda` build; anywhere
/// else it returns at once, passing without checking anything.
#[test]
fn cuda_graph_steps_equal_eager_steps_on_a_gpu() {
    if !tch::Cuda::is_available() || !course::CUDA_KERNELS {
        eprintln!("cuda_graph_steps_equal_eager_steps_on_a_gpu: no GPU or no --features cuda, nothing checked");
        return;
    }
    let (train, val) = (tokens(4000, 12, 1), tokens(500, 12, 2));
    let data = LmData { train: &train, val: &val };
    for p in [Precision::Fp32, Precision::Fp16] {
        let mut runs = vec![];
        for graph in [false, true] {
            tch::manual_seed(0);
            let vs = VarStore::new(Device::Cuda(0));
            let m = Gpt::new(&vs.root(), &GptConfig { block_size: 16, ..Preset::Tiny.config(12) }).unwrap();
            let dir = tmp(&format!("graph-{}-{graph}", p.name()));
            // Two micro-batches per step: the graph must add into .grad, not overwrite it. Step 0
            // runs eagerly, step 1 captures, steps 2-4 replay.
            let cfg = LmTrainConfig { precision: p, grad_accum: 2, cuda_graph: graph, ..config(5) };
            let out = lmtrain::train(&vs, &m, &data, &cfg, &opts(&dir, &m), &mut NoHooks).unwrap();
            runs.push((weights(&vs), out.progress.logs.iter().map(|l| (l.loss, l.scale)).collect::<Vec<_>>()));
            std::fs::remove_dir_all(&dir).unwrap();
        }
        let ((w_eager, l_eager), (w_graph, l_graph)) = (&runs[0], &runs[1]);
        for ((name, a), (_, b)) in w_eager.iter().zip(w_graph) {
            let d = (a - b).abs().max().double_value(&[]);
            assert!(d < 1e-5, "{}: {name} differs by {d} after 5 steps", p.name());
        }
        for ((la, sa), (lb, sb)) in l_eager.iter().zip(l_graph) {
            assert!((la - lb).abs() < 1e-4 && sa == sb, "{}: logs differ: {l_eager:?} vs {l_graph:?}", p.name());
        }
    }
}

#[test]
fn token_files_round_trip_and_are_reused() {
    let root = tmp("tokens");
    let text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n".repeat(20);
    let d = lmdata::prepare(&root, "toy", &text, TokenizerChoice::Char, 0).unwrap();
    let (train_text, val_text) = lmdata::split_text(&text);
    assert_eq!(d.meta.train_tokens as usize, train_text.chars().count());
    assert_eq!(d.meta.dtype, "int16");
    let back: Vec<i64> = Vec::try_from(d.train.to_kind(Kind::Int64)).unwrap();
    assert_eq!(d.tokenizer.decode(&back), train_text);
    let back: Vec<i64> = Vec::try_from(d.val.to_kind(Kind::Int64)).unwrap();
    assert_eq!(d.tokenizer.decode(&back), val_text);
    // Batches: targets are the inputs shifted by one, windows of the training text.
    let (x, y) = lmdata::sample_batch(&d.train, 5, 10, &mut Rng::new(1), Device::Cpu).unwrap();
    assert_eq!(x.size(), [5, 10]);
    assert!(x.narrow(1, 1, 9).equal(&y.narrow(1, 0, 9)));
    for r in 0..5 {
        let row: Vec<i64> = Vec::try_from(x.get(r)).unwrap();
        assert!(train_text.contains(&d.tokenizer.decode(&row)));
    }
    // A second prepare reuses the files; a changed text rebuilds them.
    let stamp = std::fs::metadata(d.dir.join("train.bin")).unwrap().modified().unwrap();
    let again = lmdata::prepare(&root, "toy", &text, TokenizerChoice::Char, 0).unwrap();
    assert_eq!(std::fs::metadata(again.dir.join("train.bin")).unwrap().modified().unwrap(), stamp);
    let other = lmdata::prepare(&root, "toy", &(text.clone() + "Zounds!"), TokenizerChoice::Char, 0).unwrap();
    assert_eq!(other.meta.source_bytes, text.len() + 7);
    // A truncated token file is reported, not misread.
    let f = other.dir.join("val.bin");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 2]).unwrap();
    let e = format!("{:#}", lmdata::map_tokens(&f, "int16", other.meta.val_tokens).unwrap_err());
    assert!(e.contains("val.bin") && e.contains("meta.json says"), "{e}");
    assert!(lmdata::sample_batch(&d.val, 1, 10_000, &mut Rng::new(0), Device::Cpu)
        .unwrap_err()
        .to_string()
        .contains("too few"));
    std::fs::remove_dir_all(&root).unwrap();
}

/// Instruction-tuning-shaped batches: a token stream whose first `prompt` target positions of
/// every row are masked with -100 (as m06 masks prompts).
struct MaskedPrompt<'a> {
    inner: LmData<'a>,
    prompt: i64,
}

impl BatchSource for MaskedPrompt<'_> {
    fn batch(
        &self,
        split: Split,
        rows: i64,
        block: i64,
        rng: &mut Rng,
        device: Device,
    ) -> anyhow::Result<(Tensor, Tensor)> {
        let (x, y) = self.inner.batch(split, rows, block, rng, device)?;
        let _ = y.narrow(1, 0, self.prompt).fill_(IGNORE_INDEX);
        Ok((x, y))
    }
}

/// The masked mean written out: log-softmax, gather at the targets, mean over unmasked positions.
fn masked_nll(logits: &Tensor, y: &Tensor) -> f64 {
    let v = logits.size()[2];
    let (lp, y) = (logits.log_softmax(-1, Kind::Double).view([-1, v]), y.reshape([-1]));
    let keep = y.ne(IGNORE_INDEX).nonzero().squeeze_dim(1);
    let picked = lp.index_select(0, &keep).gather(1, &y.index_select(0, &keep).unsqueeze(1), false);
    -picked.mean(Kind::Double).double_value(&[])
}

#[test]
fn the_loop_trains_on_masked_batches_fused_and_unfused() {
    let (train, val) = (tokens(4000, 12, 1), tokens(500, 12, 2));
    let data = MaskedPrompt { inner: LmData { train: &train, val: &val }, prompt: 10 };
    for fused in [false, true] {
        let (vs, m) = model(Kind::Double);
        let cfg = LmTrainConfig { fused_loss: fused, steps: 3, ..config(3) };
        // The first training batch the loop draws, and the loss the model gives it before any step.
        let (x, y) =
            data.batch(Split::Train, cfg.batch_size, cfg.block_size, &mut Rng::new(cfg.seed), Device::Cpu).unwrap();
        let want = tch::no_grad(|| masked_nll(&m.forward(&x, true), &y));
        let dir = tmp(&format!("masked{fused}"));
        let out = lmtrain::train(&vs, &m, &data, &cfg, &opts(&dir, &m), &mut NoHooks).unwrap();
        let got = out.progress.logs[0].loss;
        assert!((got - want).abs() < 1e-10, "fused {fused}: step-0 loss {got} vs masked NLL {want}");
        assert!(out.progress.logs[2].loss < got, "the masked loss falls: {:?}", out.progress.logs);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
