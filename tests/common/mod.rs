//! Helpers shared by test binaries (each includes this with `mod common;` and uses what it needs).
#![allow(dead_code)]

/// Reruns the named tests in a child process under each CPU capability this machine supports:
/// ATen's dispatch (and ours) reads ATEN_CPU_CAPABILITY once per process.
pub fn run_under_every_cpu_variant(tests: &[&str]) {
    if std::env::var("COURSE_VARIANT_CHILD").is_ok() {
        return;
    }
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has = |f: &str| flags.lines().any(|l| l.starts_with("flags") && l.split_whitespace().any(|w| w == f));
    let mut caps = vec!["default"];
    if cfg!(target_arch = "x86_64") && has("avx2") && has("fma") {
        caps.push("avx2");
    }
    if cfg!(target_arch = "x86_64") && has("avx512f") && has("avx512bw") && has("avx512vl") && has("avx512dq") {
        caps.push("avx512");
    }
    let exe = std::env::current_exe().unwrap();
    for cap in caps {
        let out = std::process::Command::new(&exe)
            .arg("--exact")
            .args(tests)
            .env("ATEN_CPU_CAPABILITY", cap)
            .env("COURSE_VARIANT_CHILD", "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let want = format!("{} passed", tests.len());
        assert!(out.status.success() && text.contains(&want), "capability {cap}:\n{text}");
    }
}

/// A two-layer Llama of width 32 (4 query heads, 2 kv heads) over 40 tokens.
pub fn tiny_llama() -> course::models::llama::LlamaConfig {
    course::models::llama::LlamaConfig {
        vocab_size: 40,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: None,
        max_position_embeddings: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
        pad_token_id: None,
        hidden_act: "silu".into(),
        attention_bias: false,
        mlp_bias: false,
        architectures: vec![],
    }
}
