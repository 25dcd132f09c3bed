//! LoRA on the Llama against Hugging Face peft, both ways (tests/fixtures/peft_check.py, run at
//! test time): peft loads the adapter folder we write onto SmolLM2 and its logits equal ours in
//! fp32; we load the adapter peft saved and reproduce its logits. And on a tiny Llama: peft's
//! initialisation, the trainable share, merge and unmerge, dropout, gradients reaching only A and
//! B, and the errors for configs and files we do not handle.

use course::infer::ChatModel;
use course::io::peft::{read_adapter, write_adapter, AdapterConfig, TargetModules, KEY_PREFIX};
use course::io::safetensors::named_tensors;
use course::models::llama::{Llama, LORA_TARGETS};
use course::models::LanguageModel;
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

mod common;
use common::tiny_llama as tiny;

const MODEL: &str = "data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn temp_dir(what: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("course-lora-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn read_f32(path: &Path, rows: i64) -> Tensor {
    let raw = std::fs::read(path).unwrap();
    let v: Vec<f32> = raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    Tensor::from_slice(&v).view([rows, -1])
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// Every lora_B drawn from a seeded normal: peft's zero B would make any adapter a no-op.
fn randomise_b(vs: &VarStore, seed: i64) {
    tch::manual_seed(seed);
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            if name.contains("lora_B") {
                t.copy_(&(Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.02));
            }
        }
    });
}

#[test]
fn peft_reads_our_adapter_and_we_reproduce_peft_s() {
    let mut m = ChatModel::load(Path::new(MODEL), Kind::Float, Device::Cpu).unwrap();
    // The plain tch ops throughout, so that "unchanged" below can mean bit for bit (the fused
    // CPU ops do not apply while an adapter is on).
    m.model.set_fused(false);
    let prompt = m.encode(&m.template.render(&[course::infer::Message::user("Who are you?")], true).unwrap()).unwrap();
    let ids = Tensor::from_slice(&prompt).unsqueeze(0);
    let logits = |m: &ChatModel| tch::no_grad(|| m.model.forward(&ids).unwrap().squeeze_dim(0));
    let base = logits(&m);

    // Ours: every projection, r 8, as m06 trains it.
    let targets = TargetModules::Names(LORA_TARGETS.iter().map(|s| s.to_string()).collect());
    let mut cfg = AdapterConfig::lora(8, 16.0, 0.05, targets, false);
    cfg.base_model_name_or_path = Some("HuggingFaceTB/SmolLM2-135M-Instruct".into());
    let avs = VarStore::new(Device::Cpu);
    let summary = m.model.add_lora(&avs.root(), &cfg).unwrap();
    // 30 layers x r (in + out) over q, k, v, o (576 -> 576, 192, 192, 576) and gate, up, down.
    let per_layer = 8 * ((576 + 576) + 2 * (576 + 192) + (576 + 576) + 2 * (576 + 1536) + (1536 + 576));
    assert_eq!(summary.trainable, 30 * per_layer);
    assert_eq!(summary.modules.len(), 30 * 7);
    assert!(summary.trainable_pct() < 2.0, "{summary}");
    assert!(logits(&m).equal(&base), "B starts at zero: the adapted model is the base model");
    randomise_b(&avs, 1);
    let ours = logits(&m);
    assert!(max_abs(&ours, &base) > 1e-2, "the random B changes the logits");
    let ours_dir = temp_dir("ours");
    write_adapter(&ours_dir, &cfg, &named_tensors(&avs)).unwrap();
    // peft's layout: its keys, and the safetensors header's format tag.
    let bytes = std::fs::read(ours_dir.join("adapter_model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["__metadata__"]["format"], "pt");
    assert_eq!(
        header["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]["shape"],
        serde_json::json!([8, 576])
    );
    assert_eq!(
        header["base_model.model.model.layers.29.mlp.down_proj.lora_B.weight"]["shape"],
        serde_json::json!([576, 8])
    );
    m.model.remove_lora().unwrap();
    assert!(logits(&m).equal(&base));

    let peft_dir = temp_dir("peft");
    let out = temp_dir("out");
    let csv = prompt.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",");
    let run = std::process::Command::new(".venv/bin/python")
        .args(["tests/fixtures/peft_check.py", MODEL])
        .args([&ours_dir, &peft_dir, &out].map(|p| p.display().to_string()))
        .arg(&csv)
        .output()
        .expect("running .venv/bin/python");
    assert!(run.status.success(), "peft_check.py: {}", String::from_utf8_lossy(&run.stderr));
    let t = prompt.len() as i64;
    let d = max_abs(&read_f32(&out.join("ours.f32"), t), &ours);
    assert!(d <= 1e-3, "peft on our adapter: max |logit difference| {d:e}");

    // Theirs: a regular-expression target list, rsLoRA, r 4.
    let adapter = read_adapter(&peft_dir).unwrap();
    assert_eq!(adapter.config.target_modules, TargetModules::Pattern(r".*\.(q_proj|v_proj|down_proj)".into()));
    assert!(adapter.config.use_rslora && adapter.config.r == 4);
    assert!(adapter.tensors.keys().all(|k| k.starts_with(KEY_PREFIX)));
    let mut pvs = VarStore::new(Device::Cpu);
    let summary = m.model.load_adapter(&mut pvs, &adapter, &peft_dir.display().to_string()).unwrap();
    assert_eq!(summary.modules.len(), 30 * 3);
    let d = max_abs(&logits(&m), &read_f32(&out.join("peft.f32"), t));
    assert!(d <= 1e-3, "our load of peft's adapter: max |logit difference| {d:e}");
    // Merged, the same model in one product per layer.
    m.model.merge_lora().unwrap();
    let d = max_abs(&logits(&m), &read_f32(&out.join("peft.f32"), t));
    assert!(d <= 1e-3, "merged: max |logit difference| {d:e}");
    m.model.remove_lora().unwrap();
    assert!(max_abs(&logits(&m), &base) < 1e-4, "unmerged and removed: the base again");
    for d in [ours_dir, peft_dir, out] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

fn names(s: &str) -> TargetModules {
    TargetModules::parse(s).unwrap()
}

#[test]
fn a_tiny_llama_adapts_merges_and_trains_only_the_adapter() {
    tch::manual_seed(0);
    let mut vs = VarStore::new(Device::Cpu);
    let mut m = Llama::new(&vs.root(), &tiny()).unwrap();
    vs.freeze();
    let x = Tensor::randint(40, [2, 9], (Kind::Int64, Device::Cpu));
    let base = tch::no_grad(|| m.forward(&x).unwrap());
    let avs = VarStore::new(Device::Cpu);
    let cfg = AdapterConfig::lora(4, 8.0, 0.0, names("all-linear"), false);
    let s = m.add_lora(&avs.root(), &cfg).unwrap();
    assert_eq!(s.modules.len(), 2 * 7);
    // peft's init: A uniform in ±1/√in (kaiming-uniform, a = √5), B zero.
    for (name, t) in avs.variables() {
        let inp = t.size()[1] as f64;
        let m = t.abs().max().double_value(&[]);
        if name.contains("lora_A") {
            assert!(m <= 1.0 / inp.sqrt() && m > 0.5 / inp.sqrt(), "{name}: max |A| {m}");
        } else {
            assert_eq!(m, 0.0, "{name}: B starts at zero");
        }
    }
    randomise_b(&avs, 2);
    let adapted = tch::no_grad(|| m.forward(&x).unwrap());
    // The update of one layer, by hand: y = x Wᵀ + x Aᵀ Bᵀ · α/r.
    let v = avs.variables();
    let (a, b) = (
        &v["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"],
        &v["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"],
    );
    let w = &vs.variables()["model.layers.0.mlp.up_proj.weight"];
    let h = Tensor::randn([3, 32], (Kind::Float, Device::Cpu));
    let want = h.matmul(&(w + b.matmul(a) * 2.0).tr());
    let got = tch::no_grad(|| h.matmul(&w.tr()) + h.matmul(&a.tr()).matmul(&b.tr()) * 2.0);
    assert!(max_abs(&got, &want) < 1e-5);

    // Merge: the same function in the base weights; unmerge gives the weights back.
    let w0 = w.copy();
    m.merge_lora().unwrap();
    assert!(max_abs(&tch::no_grad(|| m.forward(&x).unwrap()), &adapted) < 1e-5);
    assert!(max_abs(w, &w0) > 1e-4, "merging changed the base weight");
    assert!(m.merge_lora().unwrap_err().to_string().contains("already merged"));
    m.unmerge_lora().unwrap();
    assert!(max_abs(w, &w0) < 1e-6);
    assert!(max_abs(&tch::no_grad(|| m.forward(&x).unwrap()), &adapted) < 1e-5);

    // Training: the gradient reaches A and B only (the base is frozen).
    let y = x.roll([-1], [1]);
    let loss = m.loss(&x, &y, true, false);
    loss.backward();
    for (name, t) in avs.variables() {
        assert!(
            t.grad().defined() && t.grad().abs().sum(Kind::Double).double_value(&[]) > 0.0,
            "{name} has a gradient"
        );
    }
    assert!(vs.variables().values().all(|t| !t.grad().defined()), "no base weight has a gradient");
    m.remove_lora().unwrap();
    // Merging and unmerging rounded the weights once each way: the base again to fp32's precision.
    assert!(max_abs(&tch::no_grad(|| m.forward(&x).unwrap()), &base) < 1e-5);

    // Dropout acts only in training; rsLoRA scales by α/√r.
    let avs = VarStore::new(Device::Cpu);
    let cfg = AdapterConfig::lora(4, 8.0, 0.5, names("q_proj"), true);
    m.add_lora(&avs.root(), &cfg).unwrap();
    randomise_b(&avs, 3);
    let (train, eval) = (m.loss(&x, &y, true, false), m.loss(&x, &y, false, false));
    assert_ne!(train.double_value(&[]), eval.double_value(&[]));
    assert_eq!(eval.double_value(&[]), m.loss(&x, &y, false, false).double_value(&[]));
    m.merge_lora().unwrap();
    let merged = tch::no_grad(|| m.forward(&x).unwrap());
    m.unmerge_lora().unwrap();
    // Merged with the rsLoRA scale 8/√4 = 4: the same as the unmerged forward.
    assert!(max_abs(&merged, &tch::no_grad(|| m.forward(&x).unwrap())) < 1e-5);
    let q = &vs.variables()["model.layers.1.self_attn.q_proj.weight"];
    let v = avs.variables();
    let dense = v["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
        .matmul(&v["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]);
    let q0 = q.copy();
    m.merge_lora().unwrap();
    assert!(max_abs(&(q - &q0), &(dense * 4.0)) < 1e-6, "rsLoRA: W += B A · α/√r");
}

#[test]
fn what_is_not_handled_is_refused_by_name() {
    let vs = VarStore::new(Device::Cpu);
    let mut m = Llama::new(&vs.root(), &tiny()).unwrap();
    let avs = VarStore::new(Device::Cpu);
    let e = m.add_lora(&avs.root(), &AdapterConfig::lora(4, 8.0, 0.0, names("c_attn"), false)).unwrap_err().to_string();
    assert!(e.contains("matched no linear layer") && e.contains("q_proj"), "{e}");
    let e = m
        .add_lora(&avs.root(), &AdapterConfig::lora(4, 8.0, 0.0, names("q_proj,lm_head"), false))
        .unwrap_err()
        .to_string();
    assert!(e.contains("lm_head"), "{e}");
    let e = m.add_lora(&avs.root(), &AdapterConfig::lora(0, 8.0, 0.0, names("q_proj"), false)).unwrap_err().to_string();
    assert!(e.contains("r: 0 must be a positive rank"), "{e}");
    m.add_lora(&avs.root(), &AdapterConfig::lora(2, 4.0, 0.0, names("v_proj"), false)).unwrap();
    let e = m.add_lora(&avs.root(), &AdapterConfig::lora(2, 4.0, 0.0, names("v_proj"), false)).unwrap_err().to_string();
    assert!(e.contains("already has a LoRA adapter"), "{e}");
    let dir = temp_dir("bad");
    write_adapter(&dir, m.adapter().unwrap(), &named_tensors(&avs)).unwrap();
    m.remove_lora().unwrap();
    // A tensor missing from the file is named.
    let mut adapter = read_adapter(&dir).unwrap();
    let k = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";
    adapter.tensors.remove(k);
    let mut fresh = VarStore::new(Device::Cpu);
    let e = m.load_adapter(&mut fresh, &adapter, "adapter.safetensors").unwrap_err().to_string();
    assert!(e.contains("missing tensor") && e.contains(k), "{e}");
    m.remove_lora().unwrap();
    // A config that asks for what we do not implement is refused with the file and the field.
    let cfg_path = dir.join("adapter_config.json");
    let mut j: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    j["use_dora"] = true.into();
    std::fs::write(&cfg_path, j.to_string()).unwrap();
    let e = read_adapter(&dir).err().unwrap().to_string();
    assert!(e.contains("adapter_config.json: use_dora"), "{e}");
    std::fs::remove_file(dir.join("adapter_model.safetensors")).unwrap();
    j["use_dora"] = false.into();
    std::fs::write(&cfg_path, j.to_string()).unwrap();
    let e = read_adapter(&dir).err().unwrap().to_string();
    assert!(e.contains("no adapter_model.safetensors"), "{e}");
    let e = read_adapter(Path::new("/nonexistent")).err().unwrap().to_string();
    assert!(e.contains("not a peft adapter folder"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn merged_exports_reproduce_the_adapter_and_gguf_py_reads_them() {
    let mut m = ChatModel::load(Path::new(MODEL), Kind::Float, Device::Cpu).unwrap();
    let prompt = m.encode(&m.template.render(&[course::infer::Message::user("Who are you?")], true).unwrap()).unwrap();
    let ids = Tensor::from_slice(&prompt).unsqueeze(0);
    let logits = |m: &ChatModel| tch::no_grad(|| m.model.forward(&ids).unwrap().squeeze_dim(0));
    let targets = TargetModules::Names(LORA_TARGETS.iter().map(|s| s.to_string()).collect());
    let cfg = AdapterConfig::lora(8, 16.0, 0.0, targets, false);
    let avs = VarStore::new(Device::Cpu);
    m.model.add_lora(&avs.root(), &cfg).unwrap();
    randomise_b(&avs, 3);
    let adapted = logits(&m);
    m.model.merge_lora().unwrap();
    let dir = temp_dir("merged");
    m.save(&dir.join("folder")).unwrap();
    let gguf = dir.join("merged-f16.gguf");
    m.save_gguf(&gguf, course::io::gguf::GgmlType::F16).unwrap();
    drop(m);
    // The folder, in f32: the adapted model's numbers.
    let f = ChatModel::load(&dir.join("folder"), Kind::Float, Device::Cpu).unwrap();
    let e = max_abs(&logits(&f), &adapted);
    assert!(e < 1e-3, "merged folder vs base + adapter: logits differ by {e}");
    drop(f);
    // The GGUF in F16: within F16's rounding of the merged weights.
    let g = ChatModel::load(&gguf, Kind::Float, Device::Cpu).unwrap();
    let e = max_abs(&logits(&g), &adapted);
    // (No argmax check: A is drawn from the process-wide generator that parallel tests share, so
    // near-ties differ from run to run; the bound on every logit is the check.)
    assert!(e < 0.15, "merged F16 GGUF vs base + adapter: logits differ by {e}");
    // gguf-py (ggml's own reader) reads every tensor, the projections as F16.
    let out =
        std::process::Command::new(".venv/bin/python").arg("tests/fixtures/gguf_py.py").arg(&gguf).output().unwrap();
    assert!(out.status.success(), "gguf_py.py failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tensors = v["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 1 + 30 * 9 + 1, "embedding, 9 tensors a layer, the final norm");
    let q = tensors.iter().find(|t| t["name"] == "blk.0.attn_q.weight").unwrap();
    assert_eq!(q["type"], "F16");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_loss_over_target_rows_only_equals_the_cross_entropy_of_every_logit() {
    // Llama::loss runs the head only where a target is set; the mean over those rows is
    // PyTorch's cross-entropy with ignore_index -100 over all the logits.
    tch::manual_seed(5);
    let vs = VarStore::new(Device::Cpu);
    let m = Llama::new(&vs.root(), &tiny()).unwrap();
    let x = Tensor::randint(40, [2, 9], (Kind::Int64, Device::Cpu));
    let y = x.roll([-1], [1]);
    let _ = y.narrow(1, 0, 4).fill_(-100);
    let ours = m.loss(&x, &y, false, false);
    let logits = m.forward(&x).unwrap();
    let want = logits.view([-1, 40]).cross_entropy_loss::<Tensor>(&y.view([-1]), None, tch::Reduction::Mean, -100, 0.0);
    assert!((ours.double_value(&[]) - want.double_value(&[])).abs() < 1e-6);
    // And the gradients agree.
    ours.backward();
    let g1: Vec<Tensor> = vs.trainable_variables().iter().map(|t| t.grad().copy()).collect();
    for mut t in vs.trainable_variables() {
        t.zero_grad();
    }
    want.backward();
    for (a, t) in g1.iter().zip(vs.trainable_variables()) {
        assert!((a - t.grad()).abs().max().double_value(&[]) < 1e-6);
    }
}
