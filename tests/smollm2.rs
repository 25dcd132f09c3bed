//! SmolLM2-135M-Instruct in the library against Hugging Face transformers on the same GGUF
//! (tests/fixtures/smollm2.json and smollm2_logits.bin, made by make_smollm2_fixture.py): token
//! ids, chat prompts, every logit in fp32, the top-1 in bf16, greedy answers; generation with the
//! KV cache against generation without it; streaming text; the model directory round trip; and
//! the Llama block on a tiny config (shapes, save/load, overfitting a batch). The 93 MB model is
//! loaded once per precision for the whole binary.

use course::infer::generate::{apply_repetition_penalty, generate_cached, FinishReason, GenerateConfig, TextStream};
use course::infer::{generate, ChatModel, Message, Sampling};
use course::models::llama::{permute_rope_rows, unpermute_rope_rows, Llama};
use course::models::LanguageModel;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use tch::nn::{OptimizerConfig, VarStore};
use tch::{Device, Kind, Tensor};

mod common;
use common::tiny_llama as tiny;

const MODEL: &str = "data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn model(kind: Kind) -> std::sync::MutexGuard<'static, ChatModel> {
    static F32: OnceLock<Mutex<ChatModel>> = OnceLock::new();
    static BF16: OnceLock<Mutex<ChatModel>> = OnceLock::new();
    let cell = if kind == Kind::BFloat16 { &BF16 } else { &F32 };
    cell.get_or_init(|| Mutex::new(ChatModel::load(Path::new(MODEL), kind, Device::Cpu).expect("loading SmolLM2")))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

fn fixture() -> &'static serde_json::Value {
    static FX: OnceLock<serde_json::Value> = OnceLock::new();
    FX.get_or_init(|| serde_json::from_slice(&std::fs::read("tests/fixtures/smollm2.json").unwrap()).unwrap())
}

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

#[test]
fn token_ids_and_decoding_equal_transformers() {
    let m = model(Kind::Float);
    for s in fixture()["strings"].as_array().unwrap() {
        let text = s["text"].as_str().unwrap();
        assert_eq!(m.encode(text).unwrap(), ids(&s["ids"]), "token ids of {text:?}");
        // Special tokens are dropped by decode; everything else round-trips byte for byte.
        if !text.contains("<|") {
            assert_eq!(m.decode(&ids(&s["ids"])).unwrap(), text, "decoding {text:?}");
        }
    }
    assert_eq!(m.tokenizer.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(m.tokenizer.token_to_id("<|im_end|>"), Some(2));
}

#[test]
fn chat_prompts_render_as_transformers_renders_them() {
    let m = model(Kind::Float);
    for c in fixture()["chats"].as_array().unwrap() {
        let msgs: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
        let got = m.template.render(&msgs, c["add_generation_prompt"].as_bool().unwrap()).unwrap();
        assert_eq!(got, c["text"].as_str().unwrap());
    }
    assert!(m.template.source.contains("You are a helpful AI assistant named SmolLM"));
    let e = m.template.render(&[Message::new("tool", "x")], true).unwrap_err().to_string();
    assert!(e.contains("role \"tool\""), "{e}");
}

#[test]
fn fp32_logits_equal_transformers_within_1e_3() {
    let m = model(Kind::Float);
    let fx = fixture();
    let raw = std::fs::read("tests/fixtures/smollm2_logits.bin").unwrap();
    let all: Vec<f32> = raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let mut offset = 0;
    for (p, shape) in fx["prompts"].as_array().unwrap().iter().zip(fx["logits_shapes"].as_array().unwrap()) {
        let (t, v) = (shape[0].as_i64().unwrap(), shape[1].as_i64().unwrap());
        let want = Tensor::from_slice(&all[offset..offset + (t * v) as usize]).view([t, v]);
        offset += (t * v) as usize;
        let prompt = ids(&p["ids"]);
        assert_eq!(m.encode(p["text"].as_str().unwrap()).unwrap(), prompt);
        let got = tch::no_grad(|| m.model.forward(&Tensor::from_slice(&prompt).unsqueeze(0)).unwrap()).squeeze_dim(0);
        let d = (&got - &want).abs().max().double_value(&[]);
        assert!(d <= 1e-3, "{:?}: max |logit difference| {d:e}", p["text"]);
        assert_eq!(Vec::<i64>::try_from(got.argmax(-1, false)).unwrap(), ids(&p["argmax_fp32"]));
    }
    assert_eq!(offset, all.len());
}

#[test]
fn bf16_keeps_the_top_token_at_every_position() {
    let m = model(Kind::BFloat16);
    for p in fixture()["prompts"].as_array().unwrap() {
        let prompt = ids(&p["ids"]);
        let got = tch::no_grad(|| m.model.forward(&Tensor::from_slice(&prompt).unsqueeze(0)).unwrap()).squeeze_dim(0);
        let top = Vec::<i64>::try_from(got.argmax(-1, false)).unwrap();
        assert_eq!(top, ids(&p["argmax_fp32"]), "{:?}: bf16 top-1 against transformers fp32", p["text"]);
    }
}

#[test]
fn greedy_answers_equal_transformers_and_paris_is_the_capital() {
    let m = model(Kind::Float);
    for g in fixture()["greedy"].as_array().unwrap() {
        let prompt = ids(&g["prompt_ids"]);
        let rendered = g["prompt"].as_str().unwrap();
        assert_eq!(m.encode(rendered).unwrap(), prompt);
        let want = ids(&g["new_ids"]);
        let cfg = GenerateConfig { max_new_tokens: want.len(), stop_ids: m.stop_ids.clone(), ..Default::default() };
        let mut streamed = String::new();
        let out = generate_cached(&m.model, &m.tokenizer, &prompt, &cfg, &mut |t| {
            streamed.push_str(t);
            Ok(())
        })
        .unwrap();
        // transformers keeps the EOS it stopped at; ours stops before it.
        let want_tokens: Vec<i64> = want.iter().copied().take_while(|t| !m.stop_ids.contains(t)).collect();
        assert_eq!(out.tokens, want_tokens, "greedy tokens after {rendered:?}");
        assert_eq!(out.text, g["text"].as_str().unwrap().trim_end());
        assert_eq!(streamed, out.text, "the streamed pieces add up to the answer");
    }
    let q = m.template.render(&[Message::user("What is the capital of France?")], true).unwrap();
    let cfg = GenerateConfig { max_new_tokens: 30, stop_ids: m.stop_ids.clone(), ..Default::default() };
    let out = generate_cached(&m.model, &m.tokenizer, &m.encode(&q).unwrap(), &cfg, &mut |_| Ok(())).unwrap();
    assert!(out.text.contains("Paris"), "answer: {:?}", out.text);
    assert_eq!(out.finish, FinishReason::Stop);
    // The answer ends "Paris." and then the stop token: a final "." held back as the possible
    // start of the stop string ".\n" is still streamed when the stop token ends the answer.
    let cfg = GenerateConfig { stop_strings: vec![".\n".into()], ..cfg };
    let mut streamed = String::new();
    let held = generate_cached(&m.model, &m.tokenizer, &m.encode(&q).unwrap(), &cfg, &mut |t| {
        streamed.push_str(t);
        Ok(())
    })
    .unwrap();
    assert!(held.text.ends_with('.'), "{:?}", held.text);
    assert_eq!(streamed, held.text);
}

#[test]
fn the_kv_cache_changes_no_token_and_chunked_prefill_no_logit() {
    let m = model(Kind::Float);
    let prompt = m.encode("Once upon a time, in a small village,").unwrap();
    let greedy = Sampling { temperature: 0.0, top_k: None, top_p: 1.0 };
    let mut rng = course::sys::rng::Rng::new(0);
    let plain = generate(&m.model, &prompt, 12, &greedy, &mut rng).unwrap();
    let cfg = GenerateConfig { max_new_tokens: 12, ..Default::default() };
    let cached = generate_cached(&m.model, &m.tokenizer, &prompt, &cfg, &mut |_| Ok(())).unwrap();
    assert_eq!(cached.tokens, plain[prompt.len()..].to_vec());
    // The prompt in two chunks (the second attends to the first through the cache and a mask)
    // gives the last position's logits of the one-shot prefill.
    tch::no_grad(|| {
        let all = Tensor::from_slice(&prompt).unsqueeze(0);
        let mut c1 = m.model.new_cache(1, 64);
        let one = m.model.step(&all, &mut c1).unwrap();
        let mut c2 = m.model.new_cache(1, 64);
        let k = prompt.len() as i64 / 2;
        let _ = m.model.step(&all.narrow(1, 0, k), &mut c2).unwrap();
        let two = m.model.step(&all.narrow(1, k, prompt.len() as i64 - k), &mut c2).unwrap();
        let d = (&one - &two).abs().max().double_value(&[]);
        assert!(d < 1e-4, "chunked prefill differs by {d}");
        assert_eq!(c2.len(), prompt.len() as i64);
        // A cache that is full refuses more positions with a clear error.
        let mut small = m.model.new_cache(1, 4);
        let e = m.model.step(&all, &mut small).unwrap_err().to_string();
        assert!(e.contains("exceed") && e.contains("KV cache"), "{e}");
    });
}

#[test]
fn sampling_is_seeded_and_penalised_and_stops_on_strings() {
    let m = model(Kind::Float);
    let prompt =
        m.encode(&m.template.render(&[Message::user("Write a short poem about rain.")], true).unwrap()).unwrap();
    let s = Sampling { temperature: 0.9, top_k: Some(40), top_p: 0.95 };
    let cfg = GenerateConfig { sampling: s, max_new_tokens: 16, seed: 7, ..Default::default() };
    let a = generate_cached(&m.model, &m.tokenizer, &prompt, &cfg, &mut |_| Ok(())).unwrap();
    let b = generate_cached(&m.model, &m.tokenizer, &prompt, &cfg, &mut |_| Ok(())).unwrap();
    assert_eq!(a.tokens, b.tokens, "same seed, same tokens");
    // Stop strings: cut the text before them, and nothing of them is streamed.
    let greedy = GenerateConfig { max_new_tokens: 40, ..Default::default() };
    let full = generate_cached(&m.model, &m.tokenizer, &prompt, &greedy, &mut |_| Ok(())).unwrap();
    let words: Vec<&str> = full.text.split_whitespace().collect();
    assert!(words.len() > 4, "{:?}", full.text);
    let stop = format!(" {}", words[3]);
    let cut = full.text.find(&stop).unwrap();
    let mut streamed = String::new();
    let cfg = GenerateConfig { stop_strings: vec![stop.clone()], ..greedy };
    let out = generate_cached(&m.model, &m.tokenizer, &prompt, &cfg, &mut |t| {
        streamed.push_str(t);
        Ok(())
    })
    .unwrap();
    assert_eq!((out.text.as_str(), out.finish), (&full.text[..cut], FinishReason::Stop));
    assert_eq!(streamed, out.text);
    // Repetition penalty as Hugging Face applies it: positive logits divided, negative multiplied.
    let l = Tensor::from_slice(&[2.0f32, -2.0, 1.0]);
    let p = apply_repetition_penalty(&l, &[0, 1, 1], 2.0);
    assert_eq!(Vec::<f32>::try_from(p).unwrap(), vec![1.0, -4.0, 1.0]);
}

#[test]
fn streamed_text_never_splits_a_character() {
    let m = model(Kind::Float);
    let text = "Emoji 🦀🚀👍🏽 and 机器学习 and café";
    let ids = m.encode(text).unwrap();
    let mut s = TextStream::new(&m.tokenizer, &[]);
    let mut pieces = vec![];
    for &id in &ids {
        pieces.push(s.push(id).unwrap().0);
    }
    pieces.push(s.finish());
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    assert_eq!(pieces.concat(), text);
    assert!(pieces.iter().filter(|p| p.is_empty()).count() > 0, "some tokens carry half a character");
}

#[test]
fn the_model_directory_round_trips() {
    let m = model(Kind::Float);
    let dir = std::env::temp_dir().join(format!("course-smollm2-dir-{}", std::process::id()));
    m.save(&dir).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!((cfg["num_key_value_heads"].as_i64(), cfg["rope_theta"].as_f64()), (Some(3), Some(100000.0)));
    let back = ChatModel::load(&dir, Kind::Float, Device::Cpu).unwrap();
    let x = Tensor::from_slice(&m.encode("Round trip").unwrap()).unsqueeze(0);
    let (a, b) = tch::no_grad(|| (m.model.forward(&x).unwrap(), back.model.forward(&x).unwrap()));
    assert!(a.equal(&b), "logits after save and load");
    assert_eq!(back.encode("Straße 1234").unwrap(), m.encode("Straße 1234").unwrap());
    let msgs = [Message::system("s"), Message::user("u")];
    assert_eq!(back.template.render(&msgs, true).unwrap(), m.template.render(&msgs, true).unwrap());
    // transformers loads the folder as a Hugging Face model and answers as we do.
    let q = "What is the capital of France?";
    let hf = hf_greedy(&dir, q, 12);
    let prompt = m.encode(&m.template.render(&[Message::user(q)], true).unwrap()).unwrap();
    assert_eq!(ids(&hf["prompt_ids"]), prompt, "transformers renders and tokenizes the folder's template as we do");
    let cfg = GenerateConfig { max_new_tokens: 12, stop_ids: m.stop_ids.clone(), ..Default::default() };
    let ours = generate_cached(&back.model, &back.tokenizer, &prompt, &cfg, &mut |_| Ok(())).unwrap();
    let theirs: Vec<i64> = ids(&hf["new_ids"]).into_iter().take_while(|t| !m.stop_ids.contains(t)).collect();
    assert_eq!(ours.tokens, theirs);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// transformers' greedy new tokens (and prompt ids) for `q` from a model folder or GGUF file.
fn hf_greedy(path: &Path, q: &str, n: usize) -> serde_json::Value {
    let out = std::process::Command::new(".venv/bin/python")
        .args(["tests/fixtures/hf_generate.py", &path.display().to_string(), q, &n.to_string()])
        .output()
        .expect("running .venv/bin/python");
    assert!(out.status.success(), "hf_generate.py: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_gguf_we_write_is_read_back_by_us_and_by_transformers() {
    use course::io::gguf::{GgmlType, GgufFile};
    let m = model(Kind::Float);
    let dir = std::env::temp_dir().join(format!("course-smollm2-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // F32: lossless, so our reload gives the same logits bit for bit.
    let path = dir.join("smollm2-f32.gguf");
    m.save_gguf(&path, GgmlType::F32).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.require_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.require_strings("tokenizer.ggml.tokens").unwrap().len(), 49152);
    let back = ChatModel::load(&path, Kind::Float, Device::Cpu).unwrap();
    let x = Tensor::from_slice(&m.encode("Written and read back").unwrap()).unsqueeze(0);
    assert!(tch::no_grad(|| m.model.forward(&x).unwrap().equal(&back.model.forward(&x).unwrap())));
    assert_eq!(back.encode("Straße 1234 🦀").unwrap(), m.encode("Straße 1234 🦀").unwrap());
    // transformers reads the file as llama.cpp's converter writes them and answers as we do.
    let q = "What is the capital of France?";
    let hf = hf_greedy(&path, q, 10);
    let prompt = m.encode(&m.template.render(&[Message::user(q)], true).unwrap()).unwrap();
    assert_eq!(ids(&hf["prompt_ids"]), prompt);
    let cfg = GenerateConfig { max_new_tokens: 10, stop_ids: m.stop_ids.clone(), ..Default::default() };
    let ours = generate_cached(&m.model, &m.tokenizer, &prompt, &cfg, &mut |_| Ok(())).unwrap();
    let theirs: Vec<i64> = ids(&hf["new_ids"]).into_iter().take_while(|t| !m.stop_ids.contains(t)).collect();
    assert_eq!(ours.tokens, theirs);
    // Q8_0: a quarter of the size, and the same answer.
    let q8 = dir.join("smollm2-q8_0.gguf");
    m.save_gguf(&q8, GgmlType::Q8_0).unwrap();
    let (a, b) = (std::fs::metadata(&path).unwrap().len(), std::fs::metadata(&q8).unwrap().len());
    assert!((b as f64) < 0.3 * a as f64, "Q8_0 {b} bytes vs F32 {a}");
    let back = ChatModel::load(&q8, Kind::Float, Device::Cpu).unwrap();
    let again = generate_cached(&back.model, &back.tokenizer, &prompt, &cfg, &mut |_| Ok(())).unwrap();
    assert!(again.text.contains("Paris"), "{:?}", again.text);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_tiny_llama_has_the_shapes_saves_and_overfits() {
    tch::manual_seed(0);
    let cfg = tiny();
    let vs = VarStore::new(Device::Cpu);
    let m = Llama::new(&vs.root(), &cfg).unwrap();
    assert_eq!(vs.variables().values().map(|t| t.numel() as i64).sum::<i64>(), cfg.num_params());
    assert!(vs.variables().contains_key("model.layers.1.self_attn.k_proj.weight"));
    assert_eq!(vs.variables()["model.layers.0.self_attn.k_proj.weight"].size(), [16, 32]);
    let x = Tensor::randint(40, [3, 10], (Kind::Int64, Device::Cpu));
    assert_eq!(m.forward(&x).unwrap().size(), [3, 10, 40]);
    // Save and load through safetensors.
    let path = std::env::temp_dir().join(format!("course-tiny-llama-{}.safetensors", std::process::id()));
    course::io::safetensors::write_tensors(&path, &course::io::safetensors::named_tensors(&vs)).unwrap();
    let vs2 = VarStore::new(Device::Cpu);
    let m2 = Llama::new(&vs2.root(), &cfg).unwrap();
    course::io::safetensors::load_into(&vs2, &path).unwrap();
    assert!(tch::no_grad(|| m.forward(&x).unwrap().equal(&m2.forward(&x).unwrap())));
    std::fs::remove_file(&path).unwrap();
    // Overfit one batch.
    let y = x.roll([-1], [1]);
    let mut opt = tch::nn::Adam::default().build(&vs, 3e-3).unwrap();
    let first = m.loss(&x, &y, true, false).double_value(&[]);
    let mut last = first;
    for _ in 0..150 {
        let loss = m.loss(&x, &y, true, false);
        opt.backward_step(&loss);
        last = loss.double_value(&[]);
    }
    assert!(first > 3.0 && last < 0.1, "loss {first} -> {last}");
    // The rope permutation and its inverse.
    let w = Tensor::randn([16, 8], (Kind::Float, Device::Cpu));
    assert!(unpermute_rope_rows(&permute_rope_rows(&w, 2).unwrap(), 2).unwrap().equal(&w));
    // GGUF row 2j + t of a head is HF row j + t d/2: row 1 (j 0, t 1) goes to row 4 of d = 8.
    let u = unpermute_rope_rows(&w, 2).unwrap();
    assert!(u.get(4).equal(&w.get(1)) && u.get(1).equal(&w.get(2)));
}

/// Logits of every step: the prompt through a fresh cache, then `forced` one token at a time.
fn step_logits(m: &ChatModel, prompt: &[i64], forced: &[i64]) -> Vec<Tensor> {
    tch::no_grad(|| {
        let mut cache = m.model.new_cache(1, 64);
        let mut out = vec![m.model.step(&Tensor::from_slice(prompt).unsqueeze(0), &mut cache).unwrap()];
        for &t in forced {
            out.push(m.model.step(&Tensor::from_slice(&[t]).view([1, 1]), &mut cache).unwrap());
        }
        out.into_iter().map(|l| l.to_kind(Kind::Float)).collect()
    })
}

#[test]
fn the_fused_cpu_ops_decode_as_the_plain_ops_do() {
    // ops::llama (fused norms, SwiGLU, decode attention) against the plain tch ops they replace,
    // on the real model: each prompt, then its fp32 greedy answer fed back one token at a time
    // through the cache (the same tokens for every path).
    let questions = [
        "Name three colours.",
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "Explain gravity to a child.",
        "Who wrote Hamlet?",
        "Give me a recipe for pancakes.",
    ];
    let mut cases = vec![]; // (prompt, forced tokens, fp32 logits of the plain ops)
    {
        let mut m = model(Kind::Float);
        for q in questions {
            let prompt = m.encode(&m.template.render(&[Message::user(q)], true).unwrap()).unwrap();
            let cfg = GenerateConfig { max_new_tokens: 8, ..Default::default() };
            let forced = generate_cached(&m.model, &m.tokenizer, &prompt, &cfg, &mut |_| Ok(())).unwrap().tokens;
            let fused = step_logits(&m, &prompt, &forced);
            m.model.set_fused(false);
            let plain = step_logits(&m, &prompt, &forced);
            m.model.set_fused(true);
            for (i, (a, b)) in fused.iter().zip(&plain).enumerate() {
                let d = (a - b).abs().max().double_value(&[]);
                assert!(d <= 1e-3, "fp32 {q:?} step {i}: max |logit difference| {d}");
            }
            cases.push((prompt, forced, plain));
        }
    }
    // bf16: the fused path rounds where the plain ops round, but a sum taken in another order can
    // land on the other side of a bf16 rounding, and 30 layers amplify that into a different
    // error, larger or smaller by up to 1.7x on one prompt (measured). So hold both bf16 paths
    // to the fp32 model over all the prompts: the fused one must be about as close as the plain.
    let mut m = model(Kind::BFloat16);
    let (mut ef, mut ep) = (0.0, 0.0);
    let top = |t: &Tensor| t.argmax(-1, false).int64_value(&[0]);
    let err = |a: &Tensor, b: &Tensor| (a - b).abs().mean(Kind::Double).double_value(&[]);
    for (q, (prompt, forced, reference)) in questions.iter().zip(&cases) {
        let fused = step_logits(&m, prompt, forced);
        m.model.set_fused(false);
        let plain = step_logits(&m, prompt, forced);
        m.model.set_fused(true);
        for (i, ((a, b), r)) in fused.iter().zip(&plain).zip(reference).enumerate() {
            ef += err(a, r);
            ep += err(b, r);
            if top(b) == top(r) {
                assert_eq!(
                    top(a),
                    top(r),
                    "bf16 {q:?} step {i}: the plain ops keep fp32's top token, the fused do not"
                );
            }
        }
    }
    assert!(ef <= 1.3 * ep, "bf16 mean |logit error| against fp32 (sums over prompts): fused {ef:.3}, plain {ep:.3}");
}

#[test]
fn a_conversation_trains_only_on_the_answers_and_their_end_token() {
    // The targets of a training example, decoded, are exactly each assistant answer followed by
    // the template's end-of-turn token; the ids are the tokenization of the whole rendered text.
    let m = model(Kind::Float);
    let msgs = vec![
        Message::system("You are terse."),
        Message::user("Name a colour."),
        Message::assistant("Blue."),
        Message::user("And a number, 1234567?"),
        Message::assistant("Seven: 7 — 七."),
    ];
    let ex = m.encode_for_training(&msgs).unwrap();
    assert_eq!(ex.ids, m.encode(&m.template.render(&msgs, false).unwrap()).unwrap());
    assert_eq!(ex.ids.len(), ex.targets.len());
    // Runs of targeted positions, each decoded with special tokens kept.
    let mut runs: Vec<Vec<u32>> = vec![];
    let mut inside = false;
    for (&id, &t) in ex.ids.iter().zip(&ex.targets) {
        if t != course::data::sft::IGNORE {
            assert_eq!(t, id, "a target is the token at its own position (the loop shifts)");
            if !inside {
                runs.push(vec![]);
            }
            runs.last_mut().unwrap().push(id as u32);
        }
        inside = t != course::data::sft::IGNORE;
    }
    let text: Vec<String> = runs.iter().map(|r| m.tokenizer.decode(r, false).unwrap()).collect();
    assert_eq!(text, vec!["Blue.<|im_end|>".to_string(), "Seven: 7 — 七.<|im_end|>".to_string()]);
    // Without an assistant turn nothing is trained.
    let ex = m.encode_for_training(&msgs[..2]).unwrap();
    assert!(ex.targets.iter().all(|&t| t == course::data::sft::IGNORE));
}
