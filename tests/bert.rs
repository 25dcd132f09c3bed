//! MiniLM (all-MiniLM-L6-v2) through our BERT against Hugging Face's: token ids and sentence
//! embeddings equal to tests/fixtures/minilm.json (made by make_minilm_fixture.py with
//! transformers' BertModel); strict loading; tokenizer test vectors from llama.cpp and GPT-2.

use course::data::tokenize;
use course::models::bert::{self, Bert, BertConfig, Pretrained};
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Device, Tensor};

fn minilm_dir() -> PathBuf {
    course::data::registry::require("minilm", "").expect("python3 scripts/setup.py installs all-MiniLM-L6-v2")
}

fn fixture() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read("tests/fixtures/minilm.json").unwrap()).unwrap()
}

#[test]
fn tokenizer_and_embeddings_equal_hugging_face() {
    let p = Pretrained::at(&minilm_dir()).unwrap();
    let tok = tokenize::load(&p.tokenizer).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let model = Bert::new(&vs.root(), &p.cfg).unwrap();
    bert::load_hf(&vs, &p.weights, &p.cfg, &[]).unwrap();
    let fx = fixture();
    let sentences = fx["sentences"].as_array().unwrap();
    assert!(sentences.len() >= 20);
    let texts: Vec<&str> = sentences.iter().map(|s| s["text"].as_str().unwrap()).collect();
    let ids = tokenize::encode_all(&tok, &texts, 128).unwrap();
    for (s, ours) in sentences.iter().zip(&ids) {
        let want: Vec<i64> = s["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        assert_eq!(ours, &want, "token ids of {:?}", s["text"]);
    }
    // One padded batch: padding must not change any sentence's embedding.
    let refs: Vec<&[i64]> = ids.iter().map(|v| v.as_slice()).collect();
    let (x, m) = tokenize::pad_batch(&refs, 0);
    let emb = tch::no_grad(|| model.embed(&x, &m));
    let mut worst = 1.0f64;
    for (i, s) in sentences.iter().enumerate() {
        let want: Vec<f32> = s["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let want = Tensor::from_slice(&want);
        let cos = (emb.get(i as i64) * &want).sum(tch::Kind::Double).double_value(&[]) / want.norm().double_value(&[]);
        worst = worst.min(cos);
    }
    println!("lowest cosine to Hugging Face's embedding over {} sentences: {worst:.7}", sentences.len());
    assert!(worst >= 0.9999, "lowest cosine to Hugging Face's embedding: {worst}");
}

#[test]
fn strict_loading_names_the_missing_and_the_unexpected_tensor() {
    let p = Pretrained::at(&minilm_dir()).unwrap();
    // A model with one layer fewer: the checkpoint's layer 5 is unexpected.
    let short = BertConfig { num_hidden_layers: 5, ..p.cfg.clone() };
    let vs = VarStore::new(Device::Cpu);
    Bert::new(&vs.root(), &short).unwrap();
    let e = format!("{:#}", bert::load_hf(&vs, &p.weights, &short, &[]).unwrap_err());
    assert!(e.contains("unexpected tensor 'encoder.layer.5."), "{e}");
    // One layer more: layer 6 is missing.
    let long = BertConfig { num_hidden_layers: 7, ..p.cfg.clone() };
    let vs = VarStore::new(Device::Cpu);
    Bert::new(&vs.root(), &long).unwrap();
    let e = format!("{:#}", bert::load_hf(&vs, &p.weights, &long, &[]).unwrap_err());
    assert!(e.contains("missing tensor 'encoder.layer.6."), "{e}");
    // A wider model: a shape mismatch names the tensor and both shapes.
    let wide = BertConfig { intermediate_size: 1024, ..p.cfg.clone() };
    let vs = VarStore::new(Device::Cpu);
    Bert::new(&vs.root(), &wide).unwrap();
    let e = format!("{:#}", bert::load_hf(&vs, &p.weights, &wide, &[]).unwrap_err());
    assert!(e.contains("intermediate.dense.") && e.contains("has shape [1536") && e.contains("expects [1024"), "{e}");
    // A classifier's head is skipped by prefix; everything else must load.
    let vs = VarStore::new(Device::Cpu);
    bert::BertClassifier::new(&vs.root(), &p.cfg, 5).unwrap();
    bert::load_hf(&vs, &p.weights, &p.cfg, &[bert::HEAD]).unwrap();
    assert!(bert::load_hf(&vs, &p.weights, &p.cfg, &[])
        .unwrap_err()
        .to_string()
        .contains("missing tensor 'classifier."));
}

#[test]
fn bad_config_files_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("course-bert-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base: serde_json::Value =
        serde_json::from_slice(&std::fs::read(minilm_dir().join("config.json")).unwrap()).unwrap();
    let write = |v: &serde_json::Value| -> PathBuf {
        let p = dir.join("config.json");
        std::fs::write(&p, v.to_string()).unwrap();
        p
    };
    let mut v = base.clone();
    v["hidden_act"] = "relu".into();
    let e = format!("{:#}", BertConfig::from_file(&write(&v)).unwrap_err());
    assert!(e.contains("config.json") && e.contains("hidden_act 'relu'"), "{e}");
    let mut v = base.clone();
    v["num_attention_heads"] = 5.into();
    let e = format!("{:#}", BertConfig::from_file(&write(&v)).unwrap_err());
    assert!(e.contains("not a multiple of num_attention_heads 5"), "{e}");
    let mut v = base;
    v.as_object_mut().unwrap().remove("vocab_size");
    let e = format!("{:#}", BertConfig::from_file(&write(&v)).unwrap_err());
    assert!(e.contains("vocab_size"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// llama.cpp's tokenizer test vectors: `.inp` texts separated by `__ggml_vocab_test__` lines,
/// `.out` one line of ids per text.
fn vectors(name: &str) -> Vec<(String, Vec<u32>)> {
    let dir = course::data::registry::require("tokenizer-vectors", "").expect("python3 scripts/setup.py installs them");
    let inp = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.out"))).unwrap();
    let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let ids: Vec<&str> = out.split('\n').collect();
    assert_eq!(texts.len(), ids.len());
    texts
        .iter()
        .zip(ids)
        .filter(|(t, _)| !t.is_empty())
        .map(|(t, i)| (t.to_string(), i.split_whitespace().map(|x| x.parse().unwrap()).collect()))
        .collect()
}

#[test]
fn gpt2_bpe_matches_llama_cpp_vectors() {
    let dir = course::data::registry::require("gpt2-tokenizer", "").expect("python3 scripts/setup.py installs it");
    let tok = tokenize::gpt2(&dir.join("vocab.json"), &dir.join("merges.txt")).unwrap();
    let hello = tok.encode("Hello world", false).unwrap();
    assert_eq!(hello.get_ids(), [15496, 995]);
    let v = vectors("gpt-2");
    assert!(v.len() >= 40);
    for (text, want) in &v {
        let got = tok.encode(text.as_str(), false).unwrap();
        assert_eq!(got.get_ids(), want.as_slice(), "{text:?}");
        assert_eq!(tok.decode(got.get_ids(), false).unwrap(), *text, "round trip of {text:?}");
    }
}

#[test]
fn minilm_wordpiece_matches_llama_cpp_bert_vectors() {
    // bge-small and MiniLM share bert-base-uncased's WordPiece vocabulary; llama.cpp's vectors
    // leave out [CLS]/[SEP].
    let tok = tokenize::load(&minilm_dir().join("tokenizer.json")).unwrap();
    for (text, want) in vectors("bert-bge") {
        let got = tok.encode(text.as_str(), false).unwrap();
        assert_eq!(got.get_ids(), want.as_slice(), "{text:?}");
    }
}

#[test]
fn trained_tokenizers_round_trip_and_save() {
    let corpus: Vec<String> = (0..200)
        .map(|i| format!("the market rallied {i} points while the striker scored twice in the final minutes"))
        .collect();
    let dir = std::env::temp_dir().join(format!("course-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for kind in [tokenize::TokenizerKind::Wordpiece, tokenize::TokenizerKind::Bpe] {
        let tok = tokenize::train(kind, corpus.iter(), 400, 2).unwrap();
        assert_eq!(tok.token_to_id("[PAD]"), Some(0));
        assert!(tok.get_vocab_size(true) <= 400);
        let ids = tokenize::encode_all(&tok, &["the striker scored"], 64).unwrap();
        assert_eq!(ids[0][0], tok.token_to_id("[CLS]").unwrap() as i64);
        assert_eq!(*ids[0].last().unwrap(), tok.token_to_id("[SEP]").unwrap() as i64);
        // Frequent words become single tokens: "striker" appears 200 times.
        assert_eq!(ids[0].len(), 5, "{kind:?}: {:?}", ids[0]);
        // Truncation keeps [CLS] ... [SEP].
        let cut = tokenize::encode_all(&tok, &[corpus[0].as_str()], 6).unwrap();
        assert_eq!(cut[0].len(), 6);
        assert_eq!(*cut[0].last().unwrap(), tok.token_to_id("[SEP]").unwrap() as i64);
        let path = dir.join("tokenizer.json");
        tokenize::save(&tok, &path).unwrap();
        let back = tokenize::load(&path).unwrap();
        assert_eq!(tokenize::encode_all(&back, &["the striker scored"], 64).unwrap(), ids);
    }
    let e = tokenize::load(Path::new("/nonexistent/tokenizer.json")).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/tokenizer.json"), "{e}");
    std::fs::write(dir.join("bad.json"), "{not json").unwrap();
    let e = tokenize::load(&dir.join("bad.json")).unwrap_err().to_string();
    assert!(e.contains("bad.json") && e.contains("not a valid tokenizer.json"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pad_batch_pads_to_the_longest_with_a_mask() {
    let (ids, mask) = tokenize::pad_batch(&[&[5, 6, 7], &[8]], 0);
    assert_eq!(Vec::<i64>::try_from(ids.flatten(0, -1)).unwrap(), [5, 6, 7, 8, 0, 0]);
    assert_eq!(Vec::<i64>::try_from(mask.flatten(0, -1)).unwrap(), [1, 1, 1, 1, 0, 0]);
}
