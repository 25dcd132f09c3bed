//! The GPT of course::models::gpt: logits, loss and every gradient equal a PyTorch nanoGPT-style model
//! (tests/fixtures/gpt.json, made by make_gpt_fixture.py), causality, both attention paths,
//! GPT-2 initialisation, a save/load round trip, overfitting one batch, and the sampler.

use course::infer::{generate, sample, Sampling};
use course::models::gpt::{AttentionImpl, Gpt, GptConfig, Preset};
use course::sys::rng::Rng;
use tch::nn::{self, OptimizerConfig, VarStore};
use tch::{Device, Kind, Tensor};

fn fixture() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read("tests/fixtures/gpt.json").unwrap()).unwrap()
}

fn tensor(v: &serde_json::Value, shape: &[i64]) -> Tensor {
    let data: Vec<f64> = v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    Tensor::from_slice(&data).view(shape)
}

fn ids(v: &serde_json::Value) -> Tensor {
    let rows: Vec<Tensor> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Tensor::from_slice(&r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect::<Vec<_>>()))
        .collect();
    Tensor::stack(&rows, 0)
}

fn tiny(vocab: i64) -> GptConfig {
    Preset::Tiny.config(vocab)
}

#[test]
fn logits_loss_and_gradients_equal_pytorch_nanogpt() {
    let fx = fixture();
    let cfg: GptConfig = serde_json::from_value(fx["config"].clone()).unwrap();
    for imp in [AttentionImpl::Sdpa, AttentionImpl::Scratch] {
        let cfg = GptConfig { attention: imp, ..cfg.clone() };
        let mut vs = VarStore::new(Device::Cpu);
        let model = Gpt::new(&vs.root(), &cfg).unwrap();
        vs.double();
        let vars = vs.variables();
        assert_eq!(
            vars.len(),
            fx["weights"].as_object().unwrap().len(),
            "one tensor per PyTorch parameter (tied head once)"
        );
        tch::no_grad(|| {
            for (name, w) in fx["weights"].as_object().unwrap() {
                let shape: Vec<i64> =
                    fx["shapes"][name].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
                let mut v = vars.get(name).unwrap_or_else(|| panic!("no variable {name}")).shallow_clone();
                v.copy_(&tensor(w, &shape));
            }
        });
        let (x, y) = (ids(&fx["idx"]), ids(&fx["targets"]));
        let logits = model.forward(&x, false);
        let want = tensor(&fx["logits"], &logits.size());
        let diff = (&logits - &want).abs().max().double_value(&[]);
        assert!(diff < 1e-10, "{imp:?}: logits differ by {diff}");
        let loss = model.loss(&x, &y, true, false);
        assert!((loss.double_value(&[]) - fx["loss"].as_f64().unwrap()).abs() < 1e-12, "{imp:?}: loss {loss:?}");
        loss.backward();
        for (name, g) in fx["grads"].as_object().unwrap() {
            let got = vars[name].grad();
            let d = (&got - tensor(g, &got.size())).abs().max().double_value(&[]);
            assert!(d < 1e-10, "{imp:?}: gradient of {name} differs by {d}");
        }
    }
}

#[test]
fn fp32_with_the_lesson_kernels_matches_pytorch_nanogpt() {
    // m04's default kernels (oneDNN linear, fused bias + GELU) on the fixture's weights in fp32:
    // logits, loss and every gradient within fp32 rounding of PyTorch's f64 values.
    use course::models::gpt::Kernels;
    let fx = fixture();
    let cfg: GptConfig = serde_json::from_value(fx["config"].clone()).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let mut model = Gpt::new(&vs.root(), &cfg).unwrap();
    model.kernels = Kernels { onednn_linear: true, fused_bias_gelu: true, ..Kernels::default() };
    let vars = vs.variables();
    tch::no_grad(|| {
        for (name, w) in fx["weights"].as_object().unwrap() {
            let shape: Vec<i64> = fx["shapes"][name].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
            vars[name].shallow_clone().copy_(&tensor(w, &shape).to_kind(Kind::Float));
        }
    });
    let (x, y) = (ids(&fx["idx"]), ids(&fx["targets"]));
    assert!(course::ops::linear_uses_onednn(&Tensor::zeros([1, 1], (Kind::Float, Device::Cpu))));
    let close = |what: &str, got: &Tensor, want: &Tensor| {
        let d = (got.to_kind(Kind::Double) - want).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]).max(1e-3);
        assert!(d <= 1e-5 * scale + 1e-7, "{what}: fp32 differs from PyTorch's f64 by {d:e} (scale {scale:e})");
    };
    let logits = model.forward(&x, false);
    close("logits", &logits, &tensor(&fx["logits"], &logits.size()));
    let loss = model.loss(&x, &y, true, false);
    close("loss", &loss, &Tensor::from(fx["loss"].as_f64().unwrap()));
    loss.backward();
    for (name, g) in fx["grads"].as_object().unwrap() {
        let got = vars[name].grad();
        close(&format!("gradient of {name}"), &got, &tensor(g, &got.size()));
    }
}

#[test]
fn a_token_never_sees_the_future() {
    let vs = VarStore::new(Device::Cpu);
    let model = Gpt::new(&vs.root(), &tiny(13)).unwrap();
    let mut rng = Rng::new(1);
    let a: Vec<i64> = (0..16).map(|_| rng.below(13) as i64).collect();
    let mut b = a.clone();
    b[10] = (b[10] + 1) % 13;
    let la = model.forward(&Tensor::from_slice(&a).unsqueeze(0), false);
    let lb = model.forward(&Tensor::from_slice(&b).unsqueeze(0), false);
    let before = (la.narrow(1, 0, 10) - lb.narrow(1, 0, 10)).abs().max().double_value(&[]);
    let after = (la.narrow(1, 10, 6) - lb.narrow(1, 10, 6)).abs().max().double_value(&[]);
    assert!(before < 1e-6, "positions before the change moved by {before}");
    assert!(after > 1e-4, "positions from the change on should move, moved {after}");
    assert_eq!(la.size(), [1, 16, 13]);
}

#[test]
fn gpt2_initialisation_and_parameter_count() {
    let vs = VarStore::new(Device::Cpu);
    let cfg = GptConfig { n_layer: 4, n_embd: 256, n_head: 4, ..tiny(65) };
    let _m = Gpt::new(&vs.root(), &cfg).unwrap();
    let vars = vs.variables();
    let total: i64 = vars.values().map(|t| t.numel() as i64).sum();
    assert_eq!(cfg.num_params(), total);
    let std = |n: &str| f64::try_from(vars[n].std(true)).unwrap();
    // Residual projections: 0.02 / sqrt(2 * n_layer) = 0.00707; the rest 0.02.
    assert!((std("transformer.h.0.attn.c_proj.weight") - 0.02 / 8f64.sqrt()).abs() < 0.0004);
    assert!((std("transformer.h.3.mlp.c_proj.weight") - 0.02 / 8f64.sqrt()).abs() < 0.0004);
    assert!((std("transformer.h.1.mlp.c_fc.weight") - 0.02).abs() < 0.0006);
    assert!((std("transformer.wte.weight") - 0.02).abs() < 0.001);
    assert_eq!(f64::try_from(vars["transformer.h.2.attn.c_attn.bias"].abs().sum(Kind::Double)).unwrap(), 0.0);
    assert!(vars["transformer.ln_f.weight"].eq(1.0).all().int64_value(&[]) == 1);
    assert!(!vars.contains_key("lm_head.weight"), "the head is tied to wte");
}

#[test]
fn config_round_trip_and_errors() {
    let dir = std::env::temp_dir().join(format!("course-gpt-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("config.json");
    let cfg = tiny(50);
    std::fs::write(&p, serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(GptConfig::from_file(&p).unwrap(), cfg);
    std::fs::write(&p, serde_json::to_string(&GptConfig { n_head: 3, ..cfg.clone() }).unwrap()).unwrap();
    let e = format!("{:#}", GptConfig::from_file(&p).unwrap_err());
    assert!(e.contains("n_embd 32 is not a multiple of n_head 3") && e.contains("config.json"), "{e}");
    std::fs::write(&p, "{\"vocab_size\": 3}").unwrap();
    assert!(format!("{:#}", GptConfig::from_file(&p).unwrap_err()).contains("is not a GPT config"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn save_and_load_give_the_same_logits() {
    let dir = std::env::temp_dir().join(format!("course-gpt-save-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let m = Gpt::new(&vs.root(), &tiny(20)).unwrap();
    let files = course::train::checkpoint::ModelFiles {
        config: course::io::hf::tagged_config(GptConfig::MODEL_TYPE, &m.cfg).unwrap(),
        generation: None,
        extra: None,
    };
    course::train::checkpoint::save_best(&dir, &vs, &files, None).unwrap();
    // The Hugging Face shape: model_type and GPT-2's name for the context length.
    let md = course::io::hf::ModelDir::open(&dir.join("best")).unwrap();
    assert_eq!((md.model_type(), md.config["n_positions"].as_i64()), ("nanogpt", Some(m.cfg.block_size)));
    let cfg: GptConfig = md.config_as().unwrap();
    assert_eq!(cfg, m.cfg);
    let vs2 = VarStore::new(Device::Cpu);
    let m2 = Gpt::new(&vs2.root(), &cfg).unwrap();
    course::io::safetensors::load_into(&vs2, &md.weights()).unwrap();
    let x = Tensor::from_slice(&[1i64, 5, 7, 19, 0, 3]).unsqueeze(0);
    assert!(m.forward(&x, false).equal(&m2.forward(&x, false)));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn overfits_one_batch() {
    tch::manual_seed(3);
    let vs = VarStore::new(Device::Cpu);
    let m = Gpt::new(&vs.root(), &tiny(16)).unwrap();
    let mut rng = Rng::new(4);
    let data: Vec<i64> = (0..4 * 33).map(|_| rng.below(16) as i64).collect();
    let w = Tensor::from_slice(&data).view([4, 33]);
    let (x, y) = (w.narrow(1, 0, 32), w.narrow(1, 1, 32));
    let mut opt = nn::Adam::default().build(&vs, 3e-3).unwrap();
    let first = m.loss(&x, &y, true, false).double_value(&[]);
    assert!((first - 16f64.ln()).abs() < 0.2, "a fresh model is near uniform: {first}");
    let mut last = first;
    for _ in 0..300 {
        let l = m.loss(&x, &y, true, false);
        opt.backward_step(&l);
        last = l.double_value(&[]);
    }
    assert!(last < 0.05, "loss after 300 steps on one batch: {last}");
}

#[test]
fn generation_is_seeded_and_greedy_at_temperature_zero() {
    let vs = VarStore::new(Device::Cpu);
    let m = Gpt::new(&vs.root(), &tiny(10)).unwrap();
    let s = Sampling { temperature: 1.0, top_k: None, top_p: 1.0 };
    let a = generate(&m, &[1, 2], 40, &s, &mut Rng::new(9)).unwrap();
    let b = generate(&m, &[1, 2], 40, &s, &mut Rng::new(9)).unwrap();
    let c = generate(&m, &[1, 2], 40, &s, &mut Rng::new(10)).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!(a.len(), 42, "the context (32) is cropped, generation goes on");
    assert_eq!(&a[..2], &[1, 2]);
    // Greedy: every new token is the argmax of the model's logits at the previous position.
    let g = generate(&m, &[3], 12, &Sampling { temperature: 0.0, top_k: None, top_p: 1.0 }, &mut Rng::new(0)).unwrap();
    let logits = m.forward(&Tensor::from_slice(&g[..12]).unsqueeze(0), false);
    let want: Vec<i64> = Vec::try_from(logits.squeeze_dim(0).argmax(-1, false)).unwrap();
    assert_eq!(&g[1..], &want[..]);
    // top-k 1 and a tiny top-p are greedy too.
    for s in [
        Sampling { temperature: 1.5, top_k: Some(1), top_p: 1.0 },
        Sampling { temperature: 1.0, top_k: None, top_p: 1e-9 },
    ] {
        assert_eq!(generate(&m, &[3], 12, &s, &mut Rng::new(5)).unwrap(), g);
    }
    assert!(generate(&m, &[], 3, &s, &mut Rng::new(0)).unwrap_err().to_string().contains("prompt is empty"));
    assert!(generate(&m, &[10], 3, &s, &mut Rng::new(0)).unwrap_err().to_string().contains("token 10 is outside"));
    let bad = Sampling { temperature: -1.0, ..s };
    assert!(generate(&m, &[1], 3, &bad, &mut Rng::new(0)).unwrap_err().to_string().contains("temperature"));
}

#[test]
fn the_sampler_draws_from_the_filtered_softmax() {
    let logits = Tensor::from_slice(&[2.0f64, 1.0, 0.5, 0.0, -1.0]);
    let n = 40_000;
    let draw = |s: Sampling| {
        let mut rng = Rng::new(11);
        let mut counts = [0usize; 5];
        for _ in 0..n {
            counts[sample(&logits, &s, &mut rng) as usize] += 1;
        }
        counts.map(|c| c as f64 / n as f64)
    };
    let softmax = |xs: &[f64], t: f64| {
        let e: Vec<f64> = xs.iter().map(|x| (x / t).exp()).collect();
        let z: f64 = e.iter().sum();
        e.into_iter().map(|v| v / z).collect::<Vec<_>>()
    };
    let l = [2.0, 1.0, 0.5, 0.0, -1.0];
    // Temperature 0.7, no filter.
    let f = draw(Sampling { temperature: 0.7, top_k: None, top_p: 1.0 });
    for (a, b) in f.iter().zip(softmax(&l, 0.7)) {
        assert!((a - b).abs() < 0.01, "{f:?}");
    }
    // top-k 2: renormalised over the two best.
    let f = draw(Sampling { temperature: 1.0, top_k: Some(2), top_p: 1.0 });
    let p2 = softmax(&l[..2], 1.0);
    assert!((f[0] - p2[0]).abs() < 0.01 && (f[1] - p2[1]).abs() < 0.01 && f[2..].iter().all(|&x| x == 0.0), "{f:?}");
    // top-p 0.8: the softmax is (0.53, 0.20, 0.12, 0.07, 0.03): the first three reach 0.8.
    let p = softmax(&l, 1.0);
    assert!(p[0] + p[1] < 0.8 && p[0] + p[1] + p[2] >= 0.8);
    let f = draw(Sampling { temperature: 1.0, top_k: None, top_p: 0.8 });
    let p3 = softmax(&l[..3], 1.0);
    for i in 0..3 {
        assert!((f[i] - p3[i]).abs() < 0.01, "{f:?}");
    }
    assert!(f[3] == 0.0 && f[4] == 0.0);
}

#[test]
fn masked_targets_give_the_same_loss_and_gradients_fused_and_unfused() {
    // -100 (PyTorch's and Hugging Face's ignore_index) leaves a position out in both loss paths.
    tch::manual_seed(3);
    let mut vs = VarStore::new(Device::Cpu);
    let m = Gpt::new(&vs.root(), &tiny(11)).unwrap();
    vs.double();
    let x = Tensor::randint(11, [3, 9], (Kind::Int64, Device::Cpu));
    let y = Tensor::randint(11, [3, 9], (Kind::Int64, Device::Cpu));
    let _ = y.narrow(1, 0, 4).fill_(course::ops::IGNORE_INDEX); // a "prompt" of 4 positions per row
    let run = |fused: bool| {
        let vars = vs.variables();
        for t in vars.values() {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let loss = m.loss(&x, &y, true, fused);
        loss.backward();
        let mut g: Vec<(String, Tensor)> = vars.into_iter().map(|(n, t)| (n, t.grad().copy())).collect();
        g.sort_by(|a, b| a.0.cmp(&b.0));
        (loss.double_value(&[]), g)
    };
    let (lu, gu) = run(false);
    let (lf, gf) = run(true);
    // The reference: the mean NLL over the 3 x 5 kept positions only.
    let lp = tch::no_grad(|| m.forward(&x, true).log_softmax(-1, Kind::Double));
    let keep = y.narrow(1, 4, 5);
    let want = -lp.narrow(1, 4, 5).gather(2, &keep.unsqueeze(-1), false).mean(Kind::Double).double_value(&[]);
    assert!((lu - want).abs() < 1e-12 && (lf - want).abs() < 1e-12, "unfused {lu}, fused {lf}, want {want}");
    for ((n, a), (_, b)) in gu.iter().zip(&gf) {
        let d = (a - b).abs().max().double_value(&[]);
        assert!(d < 1e-12, "{n}: fused and unfused gradients differ by {d}");
    }
}

#[test]
fn fp32_attention_under_cpu_autocast_matches_bf16_attention_and_trains() {
    use course::models::gpt::Kernels;
    tch::manual_seed(5);
    let vs = VarStore::new(Device::Cpu);
    let mut m = Gpt::new(&vs.root(), &tiny(13)).unwrap();
    let x = Tensor::randint(13, [2, 16], (Kind::Int64, Device::Cpu));
    let y = Tensor::randint(13, [2, 16], (Kind::Int64, Device::Cpu));
    let full = tch::no_grad(|| m.loss(&x, &y, false, false).double_value(&[]));
    let mut losses = vec![];
    for fp32 in [false, true] {
        m.kernels = Kernels { fp32_cpu_attention: fp32, ..Kernels::default() };
        let _ac = course::sys::runtime::autocast(Device::Cpu, Kind::BFloat16, true).unwrap();
        let loss = m.loss(&x, &y, true, false);
        loss.backward();
        // Autocast is still on after the fp32 attention call.
        assert!(course::sys::runtime::autocast_state(Device::Cpu).unwrap().0);
        let g = vs.variables()["transformer.h.0.attn.c_attn.weight"].grad();
        assert!(g.defined() && g.isfinite().all().int64_value(&[]) == 1, "fp32 {fp32}: no finite gradient");
        losses.push(loss.double_value(&[]));
    }
    // Both within bf16 rounding of the fp32 model; fp32 attention at least as close.
    assert!((losses[0] - full).abs() < 2e-2 && (losses[1] - full).abs() < 2e-2, "{losses:?} vs {full}");
}
