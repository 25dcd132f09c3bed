//! The Llama decoder (Touvron et al. 2023) as Hugging Face's `LlamaForCausalLM` computes it, with
//! its parameter names: RMSNorm, rotary position embeddings in the half-split layout, grouped-query
//! attention through libtorch's SDPA, the SwiGLU MLP, and (for SmolLM2) the head tied to the
//! token embeddings. Loads from a GGUF (dequantized to f32 or bf16, Q and K un-permuted from
//! llama.cpp's interleaved RoPE layout) or from a model directory, and saves to one.
//!
//! Shapes, for SmolLM2-135M: hidden C = 576, 9 query heads and 3 key/value heads of 64, MLP
//! 576 -> 1536 -> 576, 30 blocks, vocabulary 49152. A block is
//! `x + o(attn(rope(q(n1(x))), rope(k(n1(x))), v(n1(x))))`, then `x + down(silu(gate(n2 x)) · up(n2 x))`.

use crate::io::gguf::GgufFile;
use crate::io::hf::{self, ModelDir};
use crate::io::peft::{Adapter, AdapterConfig, TargetMatcher};
use crate::nn::lora::{Lora, LoraSpec};
use crate::nn::norm::{rms_norm, RmsNorm};
use crate::nn::quant::{ggml_weight, Int8Weight, Nf4Weight, QFormat, QTensors};
use crate::ops;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

fn yes() -> bool {
    true
}
fn silu() -> String {
    "silu".into()
}

/// The model's shape, with Hugging Face's `LlamaConfig` field names (what `config.json` holds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    /// Per-head width; Hugging Face's default is `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<i64>,
    pub max_position_embeddings: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<i64>,
    #[serde(default = "silu")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub architectures: Vec<String>,
}

impl LlamaConfig {
    pub const MODEL_TYPE: &'static str = "llama";

    pub fn head_dim(&self) -> i64 {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    pub fn check(&self) -> Result<()> {
        let c = self;
        let dims = [c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads];
        if dims.iter().any(|&d| d < 1) || c.num_key_value_heads < 1 || c.max_position_embeddings < 1 {
            bail!("Llama config: every size must be positive: {c:?}");
        }
        if c.num_attention_heads % c.num_key_value_heads != 0 {
            bail!(
                "Llama config: num_attention_heads {} is not a multiple of num_key_value_heads {}",
                c.num_attention_heads,
                c.num_key_value_heads
            );
        }
        if c.head_dim() % 2 != 0 || c.head_dim() < 2 {
            bail!("Llama config: head_dim {} must be even for rotary embeddings", c.head_dim());
        }
        if c.hidden_act != "silu" || c.attention_bias || c.mlp_bias {
            bail!("Llama config: only hidden_act \"silu\" without attention/MLP biases is built here, got {c:?}");
        }
        if !(c.rms_norm_eps > 0.0 && c.rope_theta > 0.0) {
            bail!("Llama config: rms_norm_eps and rope_theta must be positive");
        }
        Ok(())
    }

    /// The config a llama-architecture GGUF describes (`llama.*` keys).
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let arch = f.require_str("general.architecture")?;
        if arch != "llama" {
            bail!("{}: general.architecture is {arch:?}; this loader builds \"llama\"", f.path().display());
        }
        let n = |k: &str| f.require_u64(&format!("llama.{k}")).map(|v| v as i64);
        let hidden = n("embedding_length")?;
        let heads = n("attention.head_count")?;
        let vocab = match f.get("llama.vocab_size").and_then(|v| v.as_u64()) {
            Some(v) => v as i64,
            None => f.require_strings("tokenizer.ggml.tokens")?.len() as i64,
        };
        let id = |k: &str| f.get(&format!("tokenizer.ggml.{k}_token_id")).and_then(|v| v.as_u64()).map(|v| v as i64);
        let c = LlamaConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: n("feed_forward_length")?,
            num_hidden_layers: n("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: f
                .get("llama.attention.head_count_kv")
                .and_then(|v| v.as_u64())
                .map_or(heads, |v| v as i64),
            head_dim: f.get("llama.rope.dimension_count").and_then(|v| v.as_u64()).map(|v| v as i64),
            max_position_embeddings: n("context_length")?,
            rms_norm_eps: f.require_f64("llama.attention.layer_norm_rms_epsilon")?,
            rope_theta: f.get("llama.rope.freq_base").and_then(|v| v.as_f64()).unwrap_or(10_000.0),
            tie_word_embeddings: f.tensor("output.weight").is_none(),
            bos_token_id: id("bos"),
            eos_token_id: id("eos"),
            pad_token_id: id("padding"),
            hidden_act: silu(),
            attention_bias: false,
            mlp_bias: false,
            architectures: vec!["LlamaForCausalLM".into()],
        };
        // Round f32 metadata the way Python prints it (9.999999747378752e-06 -> 1e-05), as
        // transformers' GGUF loader does, so config.json reads like the original.
        let c = LlamaConfig {
            rms_norm_eps: format!("{}", c.rms_norm_eps as f32).parse().unwrap_or(c.rms_norm_eps),
            rope_theta: format!("{}", c.rope_theta as f32).parse().unwrap_or(c.rope_theta),
            ..c
        };
        c.check().with_context(|| f.path().display().to_string())?;
        Ok(c)
    }

    /// Parameters, the tied head once.
    pub fn num_params(&self) -> i64 {
        let (c, f, l, v) = (self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size);
        let (hd, h, kv) = (self.head_dim(), self.num_attention_heads, self.num_key_value_heads);
        let attn = c * h * hd * 2 + c * kv * hd * 2;
        let head = if self.tie_word_embeddings { 0 } else { v * c };
        v * c + l * (attn + 3 * c * f + 2 * c) + c + head
    }
}

/// Rotary tables `cos`, `sin` of shape `(positions, head_dim)` in fp32, Hugging Face's layout:
/// frequency `i` at columns `i` and `i + head_dim/2`.
#[derive(Debug)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(c: &LlamaConfig, device: Device) -> Self {
        let hd = c.head_dim();
        let inv = Tensor::arange_start_step(0, hd, 2, (Kind::Int64, device)).to_kind(Kind::Float) / hd as f64;
        let inv_freq = Tensor::from(c.rope_theta).to_kind(Kind::Float).to_device(device).pow(&inv).reciprocal();
        let pos = Tensor::arange(c.max_position_embeddings, (Kind::Float, device));
        let freqs = pos.outer(&inv_freq); // (P, hd/2)
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        Rope { cos: emb.cos(), sin: emb.sin() }
    }

    /// The tables in the model's dtype, once (Hugging Face casts them at every call).
    fn cast(&mut self, kind: Kind) {
        self.cos = self.cos.to_kind(kind);
        self.sin = self.sin.to_kind(kind);
    }

    /// `x` `(B, H, T, hd)` rotated to positions `start..start+T`.
    fn apply(&self, x: &Tensor, start: i64) -> Tensor {
        let t = x.size()[2];
        let (cos, sin) =
            (self.cos.narrow(0, start, t).to_kind(x.kind()), self.sin.narrow(0, start, t).to_kind(x.kind()));
        let half = x.size()[3] / 2;
        let (x1, x2) = (x.narrow(-1, 0, half), x.narrow(-1, half, half));
        let rotated = Tensor::cat(&[&(-&x2), &x1], -1);
        x * cos + rotated * sin
    }
}

/// Keys and values of every layer for the positions seen so far, preallocated to `capacity`.
#[derive(Debug)]
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    len: i64,
    capacity: i64,
}

impl KvCache {
    /// Number of positions held.
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    /// Forgets every position (the memory stays allocated).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Bytes held by the keys and values.
    pub fn bytes(&self) -> i64 {
        self.k.iter().chain(&self.v).map(|t| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64).sum()
    }
}

/// A KV cache for independent sequences decoded together (continuous batching): its batch rows
/// are slots, each holding one sequence with a length of its own. [`Llama::prefill_slot`] fills
/// a slot with a prompt; [`Llama::decode_slots`] adds one token to each of several slots in one
/// pass over the weights.
#[derive(Debug)]
pub struct SlotCache {
    cache: KvCache,
    lens: Vec<i64>,
}

impl SlotCache {
    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.lens.len()
    }

    /// Positions held by `slot` (0 for a free or unknown one).
    pub fn len(&self, slot: usize) -> i64 {
        self.lens.get(slot).copied().unwrap_or(0)
    }

    /// Positions each slot can hold.
    pub fn capacity(&self) -> i64 {
        self.cache.capacity
    }

    /// Forgets `slot`'s sequence (the memory stays allocated).
    pub fn clear(&mut self, slot: usize) {
        if let Some(l) = self.lens.get_mut(slot) {
            *l = 0;
        }
    }

    /// Bytes held by the keys and values of all slots.
    pub fn bytes(&self) -> i64 {
        self.cache.bytes()
    }

    fn check(&self, slot: usize, new: i64, what: &str) -> Result<()> {
        if slot >= self.lens.len() {
            bail!("{what}: slot {slot} does not exist (the cache has {} slots)", self.lens.len());
        }
        if self.lens[slot] + new > self.cache.capacity {
            bail!(
                "{what}: slot {slot} holds {} positions; {new} more exceed its capacity of {}",
                self.lens[slot],
                self.cache.capacity
            );
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Layer {
    input_layernorm: RmsNorm,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    post_attention_layernorm: RmsNorm,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    /// q, k and v stacked (rows q, then k, then v) and gate over up, once [`Llama::pack`] ran:
    /// the named weights are views into these.
    qkv: Option<Tensor>,
    gate_up: Option<Tensor>,
    /// LoRA updates by projection, in [`LORA_TARGETS`]' order (see [`Llama::add_lora`]).
    lora: [Option<Lora>; 7],
    /// The four products' weights stored quantized, once [`Llama::quantize`] or
    /// [`Llama::from_gguf_as`] replaced the dense ones (which are then empty).
    quant: Option<QuantLayer>,
}

/// A layer's stacked weights, quantized: q|k|v, o, gate|up, down.
#[derive(Debug)]
struct QuantLayer {
    qkv: QTensors,
    o: QTensors,
    gate_up: QTensors,
    down: QTensors,
}

/// A layer's four matrix products (the stacked ones once packed).
#[derive(Clone, Copy, Debug)]
enum Product {
    Qkv,
    O,
    GateUp,
    Down,
}

/// How the Llama's weights are stored. `Dense` is the VarStore's dtype (f32 or bf16); the others
/// store every layer's four matrix products quantized and the tied embedding / head in 8 bits:
/// int8 per row under `Int8` and `Nf4`, the file's own Q8_0 blocks under `Q4_1`. Norms stay
/// dense (30 x 2 x 576 numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    Dense,
    /// int8 with one scale per output row (absmax), quantized from the dense weights.
    Int8,
    /// NF4, 64-number blocks, double-quantized absmaxes (QLoRA's), quantized from the dense weights.
    Nf4,
    /// GGUF's Q4_1 blocks exactly as the file holds them (no re-quantization); needs a Q4_1 GGUF.
    Q4_1,
}

impl WeightFormat {
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::Dense => "dense",
            WeightFormat::Int8 => "int8",
            WeightFormat::Nf4 => "nf4",
            WeightFormat::Q4_1 => "q4_1",
        }
    }
}

/// A named way to run the Llama, as m06's comparison and m07's server spell it: the weights'
/// storage, the dtype of everything else, whether decoding quantizes the activations to int8
/// (`_x8`: VNNI byte dot products, llama.cpp's route; Q4_1's tiles take every row count that
/// way, prefill too, NF4's only up to 8 rows), and whether
/// NF4's codes are chosen by GPTQ against calibration inputs (`nf4_gptq`, which needs them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunFormat {
    pub name: &'static str,
    pub weights: WeightFormat,
    pub kind: Kind,
    pub act8: bool,
    pub gptq: bool,
}

const fn run_format(name: &'static str, weights: WeightFormat, kind: Kind, act8: bool, gptq: bool) -> RunFormat {
    RunFormat { name, weights, kind, act8, gptq }
}

/// Every [`RunFormat`], in the order tables list them.
pub const RUN_FORMATS: &[RunFormat] = &[
    run_format("f32", WeightFormat::Dense, Kind::Float, false, false),
    run_format("bf16", WeightFormat::Dense, Kind::BFloat16, false, false),
    run_format("int8", WeightFormat::Int8, Kind::Float, false, false),
    run_format("nf4", WeightFormat::Nf4, Kind::Float, false, false),
    run_format("nf4_gptq", WeightFormat::Nf4, Kind::Float, false, true),
    run_format("q4_1", WeightFormat::Q4_1, Kind::Float, false, false),
    run_format("nf4_x8", WeightFormat::Nf4, Kind::Float, true, false),
    run_format("q4_1_x8", WeightFormat::Q4_1, Kind::Float, true, false),
];

impl RunFormat {
    /// The format called `name`, or an error listing the names (`gptq`: whether GPTQ's are allowed).
    pub fn find(name: &str, gptq: bool) -> Result<RunFormat> {
        let known = || RUN_FORMATS.iter().filter(|f| gptq || !f.gptq).map(|f| f.name).collect::<Vec<_>>().join(", ");
        match RUN_FORMATS.iter().find(|f| f.name == name) {
            Some(f) if f.gptq && !gptq => {
                bail!("format {name:?} needs calibration data (m06_lora_quant compare runs it); use one of {}", known())
            }
            Some(f) => Ok(*f),
            None => bail!("format {name:?} is not one of {}", known()),
        }
    }
}

/// The Llama's linear layers that LoRA can adapt, by peft's names, in [`Layer`]'s order.
pub const LORA_TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

/// The module name of layer `l`'s projection `p` (an index into [`LORA_TARGETS`]), as Hugging
/// Face names it: `model.layers.3.self_attn.q_proj`.
fn module_name(l: usize, p: usize) -> String {
    let block = if p <= O { "self_attn" } else { "mlp" };
    format!("model.layers.{l}.{block}.{}", LORA_TARGETS[p])
}

/// What [`Llama::add_lora`] adapted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoraSummary {
    /// Module names of the adapted layers.
    pub modules: Vec<String>,
    /// Numbers in A and B.
    pub trainable: i64,
    /// Numbers in the base model.
    pub base: i64,
}

impl LoraSummary {
    /// Trainable share of all numbers (base + adapter), in percent, as peft's
    /// `print_trainable_parameters` reports it.
    pub fn trainable_pct(&self) -> f64 {
        100.0 * self.trainable as f64 / (self.base + self.trainable) as f64
    }
}

impl std::fmt::Display for LoraSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {:.4} ({} layers adapted)",
            self.trainable,
            self.base + self.trainable,
            self.trainable_pct(),
            self.modules.len()
        )
    }
}

/// `base_out` plus the update of `lora` for the input `x`, when there is one.
fn adapt(base_out: Tensor, lora: Option<&Lora>, x: &Tensor, train: bool) -> Tensor {
    match lora {
        Some(l) => l.add_to(&base_out, x, train),
        None => base_out,
    }
}

/// `x @ w.T` through `ops::linear`: oneDNN for fp32 GEMMs, the few-row kernel when decoding,
/// tch's linear elsewhere. Shapes are right by construction, so an error is a bug.
fn lin(x: &Tensor, w: &Tensor) -> Tensor {
    crate::ops::linear(x, w, None).unwrap_or_else(|e| panic!("Llama linear: {e:#}"))
}

fn weight(vs: nn::Path, out: i64, inp: i64) -> Tensor {
    vs.var("weight", &[out, inp], init())
}

thread_local! {
    /// Set while a loader builds the model: its weights are overwritten at once, so they start as
    /// zeros instead of drawing 135M normal samples.
    static LOADING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn init() -> nn::Init {
    if LOADING.with(|l| l.get()) {
        nn::Init::Const(0.0)
    } else {
        nn::Init::Randn { mean: 0.0, stdev: 0.02 }
    }
}

/// `Llama::new` with zero-initialised weights, for loaders that overwrite them.
fn new_for_loading(vs: &nn::Path, cfg: &LlamaConfig) -> Result<Llama> {
    LOADING.with(|l| l.set(true));
    let m = Llama::new(vs, cfg);
    LOADING.with(|l| l.set(false));
    m
}

impl Layer {
    fn new(vs: &nn::Path, c: &LlamaConfig) -> Self {
        let (h, hd, kv, d, f) =
            (c.num_attention_heads, c.head_dim(), c.num_key_value_heads, c.hidden_size, c.intermediate_size);
        let a = vs / "self_attn";
        let m = vs / "mlp";
        Layer {
            input_layernorm: rms_norm(vs / "input_layernorm", d, c.rms_norm_eps),
            q: weight(&a / "q_proj", h * hd, d),
            k: weight(&a / "k_proj", kv * hd, d),
            v: weight(&a / "v_proj", kv * hd, d),
            o: weight(&a / "o_proj", d, h * hd),
            post_attention_layernorm: rms_norm(vs / "post_attention_layernorm", d, c.rms_norm_eps),
            gate: weight(&m / "gate_proj", f, d),
            up: weight(&m / "up_proj", f, d),
            down: weight(&m / "down_proj", d, f),
            qkv: None,
            gate_up: None,
            lora: Default::default(),
            quant: None,
        }
    }
}

/// The Llama causal LM.
#[derive(Debug)]
pub struct Llama {
    pub cfg: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Option<Tensor>,
    rope: Rope,
    device: Device,
    /// Take the fused CPU ops of `ops::llama` where they apply (see [`Llama::set_fused`]).
    fused: bool,
    /// The LoRA adapter's config, once [`Llama::add_lora`] ran.
    adapter: Option<AdapterConfig>,
    /// The updates are folded into the base weights ([`Llama::merge_lora`]): the forward skips them.
    lora_merged: bool,
    /// How the weights are stored ([`Llama::quantize`]).
    format: WeightFormat,
    /// The tied embedding / head, quantized (then `embed` is empty).
    head_q: Option<QTensors>,
    /// Decoding multiplies quantized weights with int8 activations ([`Llama::set_int8_activations`]).
    int8_activations: bool,
    /// While [`Llama::calibrate`] runs: each layer's four products' `Σ xᵀx` so far.
    calib: std::sync::Mutex<Option<Vec<[Option<Tensor>; 4]>>>,
}

/// Each layer's matrix products' input second moments `Σ xᵀx` over calibration tokens, in the
/// order q|k|v, o, gate|up, down (fp32; GPTQ's Hessians up to a factor): what
/// [`Llama::quantize_gptq`] needs. From [`Llama::calibrate`].
#[derive(Debug)]
pub struct Calibration {
    pub hessians: Vec<[Tensor; 4]>,
    /// The token positions that went through each product.
    pub tokens: i64,
}

impl Llama {
    /// Builds the model under `vs` (randomly initialised, std 0.02).
    pub fn new(vs: &nn::Path, cfg: &LlamaConfig) -> Result<Self> {
        cfg.check()?;
        let m = vs / "model";
        Ok(Llama {
            embed: (&m / "embed_tokens").var("weight", &[cfg.vocab_size, cfg.hidden_size], init()),
            layers: (0..cfg.num_hidden_layers).map(|i| Layer::new(&(&m / "layers" / i), cfg)).collect(),
            norm: rms_norm(&m / "norm", cfg.hidden_size, cfg.rms_norm_eps),
            lm_head: (!cfg.tie_word_embeddings).then(|| weight(vs / "lm_head", cfg.vocab_size, cfg.hidden_size)),
            rope: Rope::new(cfg, vs.device()),
            device: vs.device(),
            fused: true,
            adapter: None,
            lora_merged: false,
            format: WeightFormat::Dense,
            head_q: None,
            int8_activations: false,
            calib: std::sync::Mutex::new(None),
            cfg: cfg.clone(),
        })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The dtype of the weights.
    pub fn kind(&self) -> Kind {
        self.embed.kind()
    }

    /// The dtype the KV cache keeps, and attention over it runs in: the weights' dtype, except
    /// bf16/fp16 on a CPU without AMX, where libtorch's low-precision attention is slow (one
    /// decoded token's bf16 SDPA took 86 µs per layer on the Zen 4 against 16 µs in fp32) and
    /// fp32 is the more accurate anyway. The values stored are the same numbers, widened.
    pub fn cache_kind(&self) -> Kind {
        let low = matches!(self.kind(), Kind::BFloat16 | Kind::Half);
        if low && self.device == Device::Cpu && !crate::sys::device::cpu_has("amx_bf16") {
            Kind::Float
        } else {
            self.kind()
        }
    }

    /// An empty cache for `batch` sequences of up to `capacity` positions, in [`Self::cache_kind`].
    pub fn new_cache(&self, batch: i64, capacity: i64) -> KvCache {
        let c = &self.cfg;
        let capacity = capacity.min(c.max_position_embeddings);
        let shape = [batch, c.num_key_value_heads, capacity, c.head_dim()];
        let z = || Tensor::zeros(shape, (self.cache_kind(), self.device));
        KvCache {
            k: (0..c.num_hidden_layers).map(|_| z()).collect(),
            v: (0..c.num_hidden_layers).map(|_| z()).collect(),
            len: 0,
            capacity,
        }
    }

    /// The LoRA update of layer `l`'s projection `p`, unless there is none or it is merged.
    fn lora(&self, l: usize, p: usize) -> Option<&Lora> {
        if self.lora_merged {
            None
        } else {
            self.layers[l].lora[p].as_ref()
        }
    }

    /// The stacked product `x [W_1; W_2; ...]ᵀ` (`widths` its column blocks) with each block's
    /// LoRA update `projs[i]` added.
    fn adapt_stacked(&self, l: usize, out: Tensor, x: &Tensor, projs: &[usize], widths: &[i64], train: bool) -> Tensor {
        if projs.iter().all(|&p| self.lora(l, p).is_none()) {
            return out;
        }
        let mut parts = Vec::with_capacity(projs.len());
        let mut at = 0;
        for (&p, &w) in projs.iter().zip(widths) {
            parts.push(adapt(out.narrow(-1, at, w), self.lora(l, p), x, train));
            at += w;
        }
        Tensor::cat(&parts, -1)
    }

    fn attention(&self, l: usize, x: &Tensor, start: i64, cache: Option<&mut KvCache>, train: bool) -> Tensor {
        let c = &self.cfg;
        let layer = &self.layers[l];
        let (b, t) = (x.size()[0], x.size()[1]);
        let hd = c.head_dim();
        let (h, kv) = (c.num_attention_heads, c.num_key_value_heads);
        let stacked = layer.quant.is_some() || (layer.qkv.is_some() && !layer.q.requires_grad());
        let (q, k, v) = match stacked {
            // One product for q, k and v, and one rotation for q and k together.
            true => {
                let qkv = self.product(l, Product::Qkv, x);
                let all = self.adapt_stacked(l, qkv, x, &[Q, K, V], &[h * hd, kv * hd, kv * hd], train);
                let all = all.view([b, t, h + 2 * kv, hd]).transpose(1, 2);
                let qk = self.rope.apply(&all.narrow(1, 0, h + kv), start);
                (qk.narrow(1, 0, h), qk.narrow(1, h, kv), all.narrow(1, h + kv, kv))
            }
            false => {
                let heads = |w: &Tensor, p: usize, n: i64| {
                    adapt(lin(x, w), self.lora(l, p), x, train).view([b, t, n, hd]).transpose(1, 2)
                };
                let q = self.rope.apply(&heads(&layer.q, Q, h), start);
                (q, self.rope.apply(&heads(&layer.k, K, kv), start), heads(&layer.v, V, kv))
            }
        };
        // Causal: a query at position start+i sees keys 0..=start+i. With no earlier positions
        // that is SDPA's is_causal over this chunk alone; one new token sees everything; a chunk
        // after a prefix needs the mask spelled out.
        let sdpa = |q: &Tensor, k: &Tensor, v: &Tensor| {
            if start == 0 && t > 1 {
                Tensor::scaled_dot_product_attention(q, k, v, None::<&Tensor>, 0.0, true, None, true)
            } else if t == 1 {
                Tensor::scaled_dot_product_attention(q, k, v, None::<&Tensor>, 0.0, false, None, true)
            } else {
                let rows = Tensor::arange_start(start, start + t, (Kind::Int64, self.device)).unsqueeze(1);
                let cols = Tensor::arange(start + t, (Kind::Int64, self.device)).unsqueeze(0);
                let mask = cols.le_tensor(&rows);
                Tensor::scaled_dot_product_attention(q, k, v, Some(&mask), 0.0, false, None, true)
            }
        };
        let y = match cache {
            Some(cache) => {
                cache.k[l].narrow(2, start, t).copy_(&k);
                cache.v[l].narrow(2, start, t).copy_(&v);
                if start == 0 {
                    // The prompt attends only to itself: use this chunk's keys as computed.
                    sdpa(&q, &k, &v)
                } else {
                    let (ck, cv) = (cache.k[l].narrow(2, 0, start + t), cache.v[l].narrow(2, 0, start + t));
                    sdpa(&q.to_kind(ck.kind()), &ck, &cv).to_kind(q.kind())
                }
            }
            None => sdpa(&q, &k, &v),
        };
        let y = y.transpose(1, 2).contiguous().view([b, t, c.num_attention_heads * hd]);
        adapt(self.product(l, Product::O, &y), self.lora(l, O), &y, train)
    }

    /// Layer `l`'s matrix product `which` of `x`: through `ops::qlinear` when the layer is
    /// quantized, `ops::linear` over the dense (stacked, for q|k|v and gate|up) weight otherwise.
    fn product(&self, l: usize, which: Product, x: &Tensor) -> Tensor {
        if let Ok(mut g) = self.calib.lock() {
            if let Some(acc) = g.as_mut() {
                let k = x.size().last().copied().unwrap_or(0);
                let x2 = x.reshape([-1, k]).to_kind(Kind::Float);
                let slot = &mut acc[l][which as usize];
                match slot {
                    Some(a) => {
                        let _ = a.addmm_(&x2.tr(), &x2);
                    }
                    None => *slot = Some(x2.tr().matmul(&x2)),
                }
            }
        }
        let layer = &self.layers[l];
        if let Some(q) = &layer.quant {
            let w = match which {
                Product::Qkv => &q.qkv,
                Product::O => &q.o,
                Product::GateUp => &q.gate_up,
                Product::Down => &q.down,
            };
            return self.qlin(x, w).unwrap_or_else(|e| panic!("Llama quantized linear: {e:#}"));
        }
        let w = match which {
            Product::Qkv => layer.qkv.as_ref().expect("a stacked product needs a packed model"),
            Product::O => &layer.o,
            Product::GateUp => layer.gate_up.as_ref().expect("a stacked product needs a packed model"),
            Product::Down => &layer.down,
        };
        lin(x, w)
    }

    /// Token embeddings `(B, T, C)` of `ids` `(B, T)`, in the weights' dtype.
    fn embed_tokens(&self, ids: &Tensor) -> Tensor {
        let Some(q) = &self.head_q else {
            return Tensor::embedding(&self.embed, ids, -1, false, false);
        };
        // The selected rows of the quantized table, decoded (rows are whole blocks in both
        // int8 and Q8_0).
        let flat = ids.reshape([-1]);
        let rows = q.data.view([q.n, -1]).index_select(0, &flat);
        let sub = QTensors {
            format: q.format,
            n: flat.size()[0],
            k: q.k,
            data: rows.contiguous(),
            scale: q.scale.as_ref().map(|s| s.index_select(0, &flat)),
            absmax_q: None,
            code8: None,
            code16: None,
            offset: 0.0,
            tiles: None,
        };
        let mut shape = ids.size();
        shape.push(q.k);
        let kind = if self.kind() == Kind::BFloat16 { Kind::BFloat16 } else { Kind::Float };
        ops::qdequantize(&sub, kind).unwrap_or_else(|e| panic!("Llama embedding: {e:#}")).view(shape.as_slice())
    }

    /// Final hidden states `(B, T, C)` for `ids` `(B, T)`. With a cache the tokens continue the
    /// cached positions and their keys and values are added to it.
    pub fn hidden(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.hidden_t(ids, cache, false)
    }

    /// [`Self::hidden`], with LoRA's dropout on when `train` is set.
    fn hidden_t(&self, ids: &Tensor, mut cache: Option<&mut KvCache>, train: bool) -> Result<Tensor> {
        let t = ids.size()[1];
        let start = cache.as_ref().map_or(0, |c| c.len);
        let limit = cache.as_ref().map_or(self.cfg.max_position_embeddings, |c| c.capacity);
        if start + t > limit {
            bail!(
                "Llama: {} positions ({start} cached + {t} new) exceed the {} the {} holds",
                start + t,
                limit,
                if cache.is_some() { "KV cache" } else { "model" }
            );
        }
        let mut x = self.embed_tokens(ids); // (B, T, C), the weights' dtype
        if self.fused_applies(&x)? {
            return self.hidden_fused(x, start, cache, None);
        }
        for l in 0..self.layers.len() {
            let layer = &self.layers[l];
            let a = self.attention(l, &layer.input_layernorm.forward(&x), start, cache.as_deref_mut(), train);
            x = x + a;
            let h = layer.post_attention_layernorm.forward(&x);
            let f = self.cfg.intermediate_size;
            let stacked = layer.quant.is_some() || (layer.gate_up.is_some() && !layer.gate.requires_grad());
            let g = match stacked {
                true => {
                    let gu = self.product(l, Product::GateUp, &h);
                    let gu = self.adapt_stacked(l, gu, &h, &[GATE, UP], &[f, f], train);
                    gu.narrow(-1, 0, f).silu() * gu.narrow(-1, f, f)
                }
                false => {
                    let gate = adapt(lin(&h, &layer.gate), self.lora(l, GATE), &h, train);
                    gate.silu() * adapt(lin(&h, &layer.up), self.lora(l, UP), &h, train)
                }
            };
            x = &x + adapt(self.product(l, Product::Down, &g), self.lora(l, DOWN), &g, train);
        }
        if let Some(c) = cache {
            c.len = start + t;
        }
        Ok(self.norm.forward(&x))
    }

    /// Switches the fused CPU ops (`ops::llama`: RMSNorm with the residual add, SwiGLU, and a
    /// new token's RoPE + cache write + attention in one op each) on or off. On by default; they
    /// apply on the CPU in fp32 or bf16 to a packed model whose weights are frozen, outside
    /// autocast. Off, the model runs the plain tch ops they replace (their references).
    pub fn set_fused(&mut self, on: bool) {
        self.fused = on;
    }

    /// Decode (at most 8 rows a product) through `ops::qlinear_int8_activations`: x quantized to
    /// int8 blocks and VNNI byte dot products against Q4_1, Q8_0 or NF4 weights, llama.cpp's
    /// route. Off by default; it changes nothing for dense or int8 weights, for prefill and
    /// training (more rows), or on a CPU without AVX-512 VNNI.
    pub fn set_int8_activations(&mut self, on: bool) {
        self.int8_activations = on;
        if on {
            // Q4_1 / Q8_0 weights gain their row-interleaved tiles for the GEMV (a second copy
            // of their bytes; prefill reads the blocks).
            for l in &mut self.layers {
                if let Some(q) = &mut l.quant {
                    for w in [&mut q.qkv, &mut q.o, &mut q.gate_up, &mut q.down] {
                        w.add_tiles().unwrap_or_else(|e| panic!("Llama: tiling a weight: {e:#}"));
                    }
                }
            }
            if let Some(h) = &mut self.head_q {
                h.add_tiles().unwrap_or_else(|e| panic!("Llama: tiling the head: {e:#}"));
            }
        }
    }

    fn qlin(&self, x: &Tensor, w: &QTensors) -> Result<Tensor> {
        if self.int8_activations {
            ops::qlinear_int8_activations(x, w)
        } else {
            ops::qlinear(x, w)
        }
    }

    fn fused_applies(&self, x: &Tensor) -> Result<bool> {
        let lora_active = self.adapter.is_some() && !self.lora_merged;
        if !self.fused
            || lora_active
            || self.device != Device::Cpu
            || !matches!(self.kind(), Kind::Float | Kind::BFloat16)
        {
            return Ok(false);
        }
        let frozen = |t: &Tensor| !t.requires_grad();
        let layers_ok = self.layers.iter().all(|l| {
            (l.quant.is_some() || (l.qkv.is_some() && l.gate_up.is_some()))
                && [
                    &l.q,
                    &l.k,
                    &l.v,
                    &l.o,
                    &l.gate,
                    &l.up,
                    &l.down,
                    &l.input_layernorm.ws,
                    &l.post_attention_layernorm.ws,
                ]
                .into_iter()
                .all(frozen)
        });
        Ok(layers_ok && frozen(&self.norm.ws) && frozen(x) && !crate::sys::runtime::autocast_state(self.device)?.0)
    }

    /// [`Self::hidden`] through `ops::llama`: per layer two fused norms, SwiGLU, and for single
    /// new tokens over a cache the fused attention, between the four matrix products. Prompts
    /// (several new tokens) keep SDPA for their attention.
    ///
    /// `slots`: one new token per sequence, each at its own position (`positions`) in its own
    /// row (`rows`) of `cache` (continuous batching); the cache's length is then the caller's.
    fn hidden_fused(
        &self,
        mut x: Tensor,
        start: i64,
        mut cache: Option<&mut KvCache>,
        slots: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (b, t) = (x.size()[0], x.size()[1]);
        let (h, kv, eps) = (c.num_attention_heads, c.num_key_value_heads, c.rms_norm_eps);
        let positions = match slots {
            Some((p, _)) => p.shallow_clone(),
            None => Tensor::full([b], start, (Kind::Int64, Device::Cpu)),
        };
        let one_token = t == 1 && cache.is_some();
        let mut pending: Option<Tensor> = None; // the last MLP output, not yet added to x
        for (l, layer) in self.layers.iter().enumerate() {
            let hn = match pending.take() {
                None => ops::rms_norm(&x, &layer.input_layernorm.ws, eps)?,
                Some(d) => ops::add_rms_norm_(&mut x, &d, &layer.input_layernorm.ws, eps)?,
            };
            let a = if one_token {
                let cache = cache.as_deref_mut().expect("one_token implies a cache");
                let qkv = self.product(l, Product::Qkv, &hn);
                let (cos, sin) = (&self.rope.cos, &self.rope.sin);
                let (ck, cv) = (&mut cache.k[l], &mut cache.v[l]);
                let rows = slots.map(|(_, r)| r);
                let y = ops::decode_attention_rows(&qkv, cos, sin, ck, cv, &positions, rows, h, kv)?;
                self.product(l, Product::O, &y)
            } else {
                self.attention(l, &hn, start, cache.as_deref_mut(), false)
            };
            let hn = ops::add_rms_norm_(&mut x, &a, &layer.post_attention_layernorm.ws, eps)?;
            let gu = self.product(l, Product::GateUp, &hn);
            pending = Some(self.product(l, Product::Down, &ops::swiglu(&gu)?));
        }
        if let (Some(c), None) = (cache, slots) {
            c.len = start + t;
        }
        match pending {
            Some(d) => ops::add_rms_norm_(&mut x, &d, &self.norm.ws, eps),
            None => ops::rms_norm(&x, &self.norm.ws, eps),
        }
    }

    /// Logits `(..., V)` of hidden states `(..., C)`.
    pub fn head(&self, h: &Tensor) -> Tensor {
        if let Some(q) = &self.head_q {
            return self.qlin(h, q).unwrap_or_else(|e| panic!("Llama head: {e:#}"));
        }
        lin(h, self.lm_head.as_ref().unwrap_or(&self.embed))
    }

    /// Logits `(B, T, V)` of every position, without a cache.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_t(ids, false)
    }

    /// [`Self::forward`], with LoRA's dropout on when `train` is set.
    pub fn forward_t(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.head(&self.hidden_t(ids, None, train)?))
    }

    /// Runs `ids` `(B, T)` through the model on top of `cache` and returns the logits of the
    /// last position, `(B, V)`: prefill (the prompt) and decode (one token) alike.
    pub fn step(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let h = self.hidden(ids, Some(cache))?;
        Ok(self.head(&h.select(1, -1)))
    }

    /// A [`SlotCache`] of `slots` sequences of up to `capacity` positions each.
    pub fn new_slot_cache(&self, slots: usize, capacity: i64) -> SlotCache {
        SlotCache { cache: self.new_cache(slots as i64, capacity), lens: vec![0; slots] }
    }

    /// Runs `ids` into `slot` after the positions it holds (none for a new sequence) and returns
    /// the logits of the last, `(V)`. The other slots are untouched.
    pub fn prefill_slot(&self, ids: &[i64], cache: &mut SlotCache, slot: usize) -> Result<Tensor> {
        if ids.is_empty() {
            bail!("prefill_slot: no tokens for slot {slot}");
        }
        cache.check(slot, ids.len() as i64, "prefill_slot")?;
        let s = slot as i64;
        let inner = &cache.cache;
        let mut view = KvCache {
            k: inner.k.iter().map(|t| t.narrow(0, s, 1)).collect(),
            v: inner.v.iter().map(|t| t.narrow(0, s, 1)).collect(),
            len: cache.lens[slot],
            capacity: inner.capacity,
        };
        let x = Tensor::from_slice(ids).to_device(self.device).unsqueeze(0);
        let logits = self.step(&x, &mut view)?;
        cache.lens[slot] = view.len;
        Ok(logits.squeeze_dim(0))
    }

    /// One new token for each of `slots` (distinct), each at its own slot's next position, in one
    /// pass over the weights: the logits `(B, V)` in `slots`' order. Each row's numbers are those
    /// of the same token decoded alone (the products and the attention work row by row), so a
    /// sequence's greedy answer does not depend on its batch. Where the fused CPU ops do not apply
    /// (an unmerged adapter, CUDA, training), the slots are stepped one at a time.
    pub fn decode_slots(&self, tokens: &[i64], cache: &mut SlotCache, slots: &[usize]) -> Result<Tensor> {
        if tokens.len() != slots.len() || tokens.is_empty() {
            bail!("decode_slots: {} tokens for {} slots (one each, at least one)", tokens.len(), slots.len());
        }
        for (i, &s) in slots.iter().enumerate() {
            cache.check(s, 1, "decode_slots")?;
            if slots[..i].contains(&s) {
                bail!("decode_slots: slot {s} is given twice");
            }
        }
        let vocab = self.cfg.vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t < 0 || t >= vocab) {
            bail!("decode_slots: token {bad} is outside the vocabulary of {vocab}");
        }
        let ids = Tensor::from_slice(tokens).to_device(self.device).unsqueeze(1); // (B, 1)
        let x = self.embed_tokens(&ids);
        if !self.fused_applies(&x)? {
            let rows: Result<Vec<Tensor>> =
                tokens.iter().zip(slots).map(|(&t, &s)| self.prefill_slot(&[t], cache, s)).collect();
            return Ok(Tensor::stack(&rows?, 0));
        }
        let lens: Vec<i64> = slots.iter().map(|&s| cache.lens[s]).collect();
        let rows: Vec<i64> = slots.iter().map(|&s| s as i64).collect();
        let (positions, rows) = (Tensor::from_slice(&lens), Tensor::from_slice(&rows));
        let h = self.hidden_fused(x, 0, Some(&mut cache.cache), Some((&positions, &rows)))?;
        for &s in slots {
            cache.lens[s] += 1;
        }
        Ok(self.head(&h.select(1, 0)))
    }

    /// Loads a model from a GGUF into `vs` (on its device), in `kind` (Float or BFloat16).
    pub fn from_gguf(vs: &mut VarStore, f: &GgufFile, kind: Kind) -> Result<Self> {
        let cfg = LlamaConfig::from_gguf(f)?;
        let mut model = new_for_loading(&vs.root(), &cfg)?;
        let vars = vs.variables();
        let load = |hf: &str, gguf: &str, permute_heads: Option<i64>| -> Result<()> {
            let mut w = f.dequantize(gguf, Kind::Float)?;
            if let Some(h) = permute_heads {
                w = unpermute_rope_rows(&w, h).with_context(|| format!("{}: tensor {gguf:?}", f.path().display()))?;
            }
            let mut var = vars.get(hf).with_context(|| format!("the model has no variable {hf}"))?.shallow_clone();
            if var.size() != w.size() {
                bail!(
                    "{}: tensor {gguf:?} has shape {:?}, {hf} expects {:?}",
                    f.path().display(),
                    w.size(),
                    var.size()
                );
            }
            tch::no_grad(|| var.copy_(&w.to_device(var.device())));
            Ok(())
        };
        for (hf, gguf, heads) in gguf_names(&cfg) {
            load(&hf, &gguf, heads)?;
        }
        set_kind(vs, kind)?;
        model.rope.cast(kind);
        model.pack();
        Ok(model)
    }

    /// Stacks each layer's q, k, v weights into one tensor and gate, up into another, and turns
    /// the named variables into views of them (no extra memory): decoding a token then runs two
    /// matrix products per layer fewer. The stacked path is taken when the weights are frozen
    /// (inference, or LoRA on a frozen base); trained weights go through the named ones.
    pub fn pack(&mut self) {
        let _g = tch::no_grad_guard();
        for l in &mut self.layers {
            let qkv = Tensor::cat(&[&l.q, &l.k, &l.v], 0);
            let (nq, nk) = (l.q.size()[0], l.k.size()[0]);
            l.q.set_data(&qkv.narrow(0, 0, nq));
            l.k.set_data(&qkv.narrow(0, nq, nk));
            l.v.set_data(&qkv.narrow(0, nq + nk, nk));
            let gu = Tensor::cat(&[&l.gate, &l.up], 0);
            let f = l.gate.size()[0];
            l.gate.set_data(&gu.narrow(0, 0, f));
            l.up.set_data(&gu.narrow(0, f, f));
            l.qkv = Some(qkv);
            l.gate_up = Some(gu);
        }
    }

    /// How the weights are stored.
    pub fn format(&self) -> WeightFormat {
        self.format
    }

    /// Bytes of every weight the model holds: dense parameters in their dtype plus the quantized
    /// tensors (blocks, scales, codes).
    pub fn weight_bytes(&self) -> i64 {
        let dense = |t: &Tensor| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        let mut n = dense(&self.embed) + dense(&self.norm.ws) + self.lm_head.as_ref().map_or(0, dense);
        n += self.head_q.as_ref().map_or(0, |q| q.bytes());
        for l in &self.layers {
            n += dense(&l.input_layernorm.ws) + dense(&l.post_attention_layernorm.ws);
            match &l.quant {
                Some(q) => n += q.qkv.bytes() + q.o.bytes() + q.gate_up.bytes() + q.down.bytes(),
                None => {
                    n += [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down].into_iter().map(dense).sum::<i64>();
                }
            }
        }
        n
    }

    /// Replaces the dense weights of every layer's four products with `format` (`Int8` or
    /// `Nf4`) quantized from them, and the tied embedding / head with int8 per row; the dense
    /// tensors are freed (and the quantized ones never train). The model must be packed, without an adapter: a
    /// LoRA adapter added afterwards (QLoRA) trains over the quantized base. For `Q4_1` load with
    /// [`Self::from_gguf_as`], which keeps the file's blocks.
    pub fn quantize(&mut self, format: WeightFormat) -> Result<()> {
        self.quantize_with(format, None)
    }

    /// `quantize` for `Int8` / `Nf4`, each product rounded to nearest, or (with `calib`, NF4 only)
    /// by GPTQ against that product's `Σ xᵀx`.
    fn quantize_with(&mut self, format: WeightFormat, calib: Option<&Calibration>) -> Result<()> {
        if !matches!(format, WeightFormat::Int8 | WeightFormat::Nf4) {
            bail!("Llama::quantize: {} weights come from a GGUF (from_gguf_as), not from dense ones", format.name());
        }
        self.check_quantizable()?;
        if let Some(c) = calib {
            if c.hessians.len() != self.layers.len() {
                bail!(
                    "Llama::quantize_gptq: the calibration covers {} layers, the model has {}",
                    c.hessians.len(),
                    self.layers.len()
                );
            }
        }
        let _g = tch::no_grad_guard();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let q = |w: &Tensor, p: usize, what: &str| -> Result<QTensors> {
                let t = match (format, calib) {
                    (WeightFormat::Int8, _) => Int8Weight::quantize(w)?.tensors(),
                    (_, None) => Nf4Weight::quantize(w)?.tensors(),
                    (_, Some(c)) => Nf4Weight::quantize_gptq(w, &c.hessians[i][p])
                        .with_context(|| format!("layer {i}'s {what}"))?
                        .tensors(),
                };
                Ok(t)
            };
            let (qkv, gu) = (l.qkv.as_ref().expect("packed"), l.gate_up.as_ref().expect("packed"));
            l.quant = Some(QuantLayer {
                qkv: q(qkv, 0, "q|k|v")?,
                o: q(&l.o, 1, "o_proj")?,
                gate_up: q(gu, 2, "gate|up")?,
                down: q(&l.down, 3, "down_proj")?,
            });
        }
        if self.cfg.tie_word_embeddings {
            self.head_q = Some(Int8Weight::quantize(&self.embed)?.tensors());
        }
        self.drop_dense();
        self.format = format;
        Ok(())
    }

    /// Runs `batches` of token ids `(B, T)` through the model (no cache, no gradient) and returns
    /// every layer's products' `Σ xᵀx` over those tokens ([`Calibration`], for
    /// [`Self::quantize_gptq`]). The model must be dense, packed and frozen, as the loaders give
    /// it (so that every product is one stacked matrix product).
    pub fn calibrate(&self, batches: &[Tensor]) -> Result<Calibration> {
        self.check_quantizable()?;
        if batches.is_empty() {
            bail!("Llama::calibrate: no calibration batches");
        }
        if self.layers.iter().any(|l| l.q.requires_grad()) {
            bail!("Llama::calibrate: freeze the model first (its weights require gradients)");
        }
        *self.calib.lock().map_err(|_| anyhow::anyhow!("Llama::calibrate: a poisoned lock"))? =
            Some((0..self.layers.len()).map(|_| [None, None, None, None]).collect());
        let mut tokens = 0;
        let ran = tch::no_grad(|| -> Result<()> {
            for ids in batches {
                let _ = self.hidden(ids, None)?;
                tokens += ids.numel() as i64;
            }
            Ok(())
        });
        let acc = self.calib.lock().map_err(|_| anyhow::anyhow!("Llama::calibrate: a poisoned lock"))?.take();
        ran?;
        let names = ["q|k|v", "o", "gate|up", "down"];
        let mut hessians = Vec::with_capacity(self.layers.len());
        for (l, slots) in acc.unwrap_or_default().into_iter().enumerate() {
            let hs = slots
                .into_iter()
                .zip(names)
                .map(|(h, name)| {
                    h.with_context(|| format!("Llama::calibrate: layer {l}'s {name} product saw no input"))
                })
                .collect::<Result<Vec<_>>>()?;
            hessians.push(<[Tensor; 4]>::try_from(hs).expect("four products a layer"));
        }
        Ok(Calibration { hessians, tokens })
    }

    /// [`Self::quantize`] to NF4 with GPTQ's rounding ([`Nf4Weight::quantize_gptq`]): each
    /// product's codes chosen against its inputs' second moments from `calib`, the same format
    /// and kernels as round-to-nearest NF4. The tied embedding / head is int8 per row, as in
    /// [`Self::quantize`].
    pub fn quantize_gptq(&mut self, calib: &Calibration) -> Result<()> {
        self.quantize_with(WeightFormat::Nf4, Some(calib))
    }

    fn check_quantizable(&self) -> Result<()> {
        if self.format != WeightFormat::Dense {
            bail!("the model's weights are already {}", self.format.name());
        }
        if self.device != Device::Cpu {
            bail!("quantized weights run on the CPU (this build's kernels), the model is on {:?}", self.device);
        }
        if self.adapter.is_some() {
            bail!("quantize the base before adding a LoRA adapter (QLoRA trains the adapter over the quantized base)");
        }
        if self.layers.iter().any(|l| l.qkv.is_none()) {
            bail!("quantize needs a packed model (as the loaders give it)");
        }
        Ok(())
    }

    /// Frees the dense tensors that quantized ones replaced (kept as empty tensors, so the
    /// VarStore's variables and their dtype stay).
    fn drop_dense(&mut self) {
        let kind = self.kind();
        let empty = || Tensor::empty([0], (kind, Device::Cpu));
        for l in &mut self.layers {
            for w in [&mut l.q, &mut l.k, &mut l.v, &mut l.o, &mut l.gate, &mut l.up, &mut l.down] {
                w.set_data(&empty());
            }
            l.qkv = None;
            l.gate_up = None;
        }
        if self.head_q.is_some() {
            self.embed.set_data(&empty());
        }
    }

    /// [`Self::from_gguf`], then the weights stored as `format`: `Dense` as `kind`; `Int8` and
    /// `Nf4` quantized from the dequantized file ([`Self::quantize`]); `Q4_1` the file's own
    /// blocks (every layer's projections must be Q4_1 in it, the embedding Q8_0 or Q4_1), Q and
    /// K rows moved whole from llama.cpp's RoPE order — no number is re-quantized. `kind` is then
    /// the dtype of everything else (norms, activations).
    pub fn from_gguf_as(vs: &mut VarStore, f: &GgufFile, kind: Kind, format: WeightFormat) -> Result<Self> {
        let mut m = Self::from_gguf(vs, f, kind)?;
        match format {
            WeightFormat::Dense => {}
            WeightFormat::Int8 | WeightFormat::Nf4 => m.quantize(format)?,
            WeightFormat::Q4_1 => {
                m.check_quantizable()?;
                let c = m.cfg.clone();
                let blocks = |name: &str, want: &[crate::io::gguf::GgmlType]| -> Result<(Tensor, i64, i64)> {
                    let info = f.require_tensor(name)?;
                    if !want.contains(&info.ty) {
                        bail!(
                            "{}: tensor {name:?} is {}, and q4_1 keeps the file's blocks: it needs {}",
                            f.path().display(),
                            info.ty.name(),
                            want.iter().map(|t| t.name()).collect::<Vec<_>>().join(" or ")
                        );
                    }
                    let s = info.shape();
                    Ok((Tensor::from_slice(f.raw(info)).view([s[0], -1]), s[0], s[1]))
                };
                use crate::io::gguf::GgmlType::{Q4_1, Q8_0};
                let q4 = |t: (Tensor, i64, i64)| ggml_weight(QFormat::Q4_1, t.0, t.1, t.2);
                for l in 0..m.layers.len() {
                    let name = |t: &str| format!("blk.{l}.{t}.weight");
                    let (wq, nq, kq) = blocks(&name("attn_q"), &[Q4_1])?;
                    let (wk, nk, _) = blocks(&name("attn_k"), &[Q4_1])?;
                    let (wv, nv, _) = blocks(&name("attn_v"), &[Q4_1])?;
                    // Whole rows (each a run of blocks) move back to Hugging Face's RoPE order.
                    let wq = unpermute_rope_rows(&wq, c.num_attention_heads)?;
                    let wk = unpermute_rope_rows(&wk, c.num_key_value_heads)?;
                    let qkv = Tensor::cat(&[wq, wk, wv], 0);
                    let (wg, ng, kg) = blocks(&name("ffn_gate"), &[Q4_1])?;
                    let (wu, nu, _) = blocks(&name("ffn_up"), &[Q4_1])?;
                    let gu = Tensor::cat(&[wg, wu], 0);
                    m.layers[l].quant = Some(QuantLayer {
                        qkv: ggml_weight(QFormat::Q4_1, qkv.reshape([-1]), nq + nk + nv, kq)?,
                        o: q4(blocks(&name("attn_output"), &[Q4_1])?)?,
                        gate_up: ggml_weight(QFormat::Q4_1, gu.reshape([-1]), ng + nu, kg)?,
                        down: q4(blocks(&name("ffn_down"), &[Q4_1])?)?,
                    });
                }
                if c.tie_word_embeddings {
                    let info = f.require_tensor("token_embd.weight")?;
                    let fmt = match info.ty {
                        Q8_0 => QFormat::Q8_0,
                        _ => QFormat::Q4_1,
                    };
                    let (t, n, k) = blocks("token_embd.weight", &[Q8_0, Q4_1])?;
                    m.head_q = Some(ggml_weight(fmt, t.reshape([-1]), n, k)?);
                }
                m.drop_dense();
                m.format = WeightFormat::Q4_1;
            }
        }
        Ok(m)
    }

    /// `(out, in)` of projection `p` (an index into [`LORA_TARGETS`]).
    fn proj_shape(&self, p: usize) -> [i64; 2] {
        let c = &self.cfg;
        let (q, kv, d, f) = (
            c.num_attention_heads * c.head_dim(),
            c.num_key_value_heads * c.head_dim(),
            c.hidden_size,
            c.intermediate_size,
        );
        [[q, d], [kv, d], [kv, d], [d, q], [f, d], [f, d], [d, f]][p]
    }

    /// Layer `l`'s base weight of projection `p` (`(out, in)`).
    fn base_weight(&self, l: usize, p: usize) -> &Tensor {
        let x = &self.layers[l];
        [&x.q, &x.k, &x.v, &x.o, &x.gate, &x.up, &x.down][p]
    }

    /// Adds a LoRA update to every linear layer that `cfg.target_modules` names (peft's rule,
    /// e.g. `q_proj,v_proj` or `all-linear`), its A and B created under `vs` by peft's keys
    /// (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`) and initialised as
    /// peft does (B = 0: the model is unchanged until B trains). Put `vs` in a VarStore of its own
    /// (fp32, the base frozen apart from it): its variables are then exactly the adapter.
    pub fn add_lora(&mut self, vs: &nn::Path, cfg: &AdapterConfig) -> Result<LoraSummary> {
        cfg.check("LoRA config")?;
        if self.adapter.is_some() {
            bail!("the model already has a LoRA adapter (one at a time)");
        }
        let matcher = TargetMatcher::new(&cfg.target_modules)?;
        if matcher.matches("lm_head", true)
            && !matches!(&cfg.target_modules, crate::io::peft::TargetModules::Pattern(p) if p == "all-linear")
        {
            bail!(
                "target_modules {:?} names lm_head: the output head is tied to the embeddings here and is not adapted",
                cfg.target_modules
            );
        }
        let spec = LoraSpec { r: cfg.r, alpha: cfg.lora_alpha, dropout: cfg.lora_dropout, rslora: cfg.use_rslora };
        let root = vs / "base_model" / "model";
        let mut modules = vec![];
        let mut trainable = 0;
        for l in 0..self.layers.len() {
            for p in 0..LORA_TARGETS.len() {
                let name = module_name(l, p);
                if !matcher.matches(&name, false) {
                    continue;
                }
                let w = self.proj_shape(p);
                let path = name.split('.').fold(root.clone(), |path, part| &path / part);
                let lora = Lora::new(&path, w[1], w[0], spec);
                trainable += lora.num_params();
                self.layers[l].lora[p] = Some(lora);
                modules.push(name);
            }
        }
        if modules.is_empty() {
            bail!(
                "target_modules {:?} matched no linear layer of the Llama (its layers are {}, as in {})",
                cfg.target_modules,
                LORA_TARGETS.join(", "),
                module_name(0, 0)
            );
        }
        self.adapter = Some(cfg.clone());
        let base = self.cfg.num_params();
        Ok(LoraSummary { modules, trainable, base })
    }

    /// Adds the adapter read from a peft folder (`io::peft::read_adapter`) under `vs` and copies
    /// its A and B in, strictly: a missing, extra or misshapen tensor is an error naming it.
    pub fn load_adapter(&mut self, vs: &mut VarStore, adapter: &Adapter, source: &str) -> Result<LoraSummary> {
        let summary = self.add_lora(&vs.root(), &adapter.config)?;
        crate::io::safetensors::copy_strict(vs, &adapter.tensors, &[], source)?;
        Ok(summary)
    }

    /// The adapter's config, once one was added.
    pub fn adapter(&self) -> Option<&AdapterConfig> {
        self.adapter.as_ref()
    }

    /// Folds each update into its base weight (`W += B A · s`), so the forward costs what the
    /// base model's does; [`Self::unmerge_lora`] takes it out again. Merging into bf16 weights
    /// rounds, so unmerging gives the base back only to bf16's precision (as in peft).
    pub fn merge_lora(&mut self) -> Result<()> {
        self.fold_lora(1.0, true)
    }

    /// Undoes [`Self::merge_lora`].
    pub fn unmerge_lora(&mut self) -> Result<()> {
        self.fold_lora(-1.0, false)
    }

    /// Folds the adapter into the weights for good and drops it, as peft's `merge_and_unload()`:
    /// the model is then a plain dense one with the tuned weights (which may be quantized).
    pub fn merge_and_unload(&mut self) -> Result<()> {
        if self.adapter.is_none() {
            bail!("the model has no LoRA adapter to merge");
        }
        if !self.lora_merged {
            self.merge_lora()?;
        }
        for l in &mut self.layers {
            l.lora = Default::default();
        }
        self.adapter = None;
        self.lora_merged = false;
        Ok(())
    }

    /// Takes the adapter off (unmerging it first if it was merged): the base model again, as
    /// peft's `unload()`. The adapter's variables stay in their VarStore.
    pub fn remove_lora(&mut self) -> Result<()> {
        if self.adapter.is_none() {
            bail!("the model has no LoRA adapter to remove");
        }
        if self.lora_merged {
            self.unmerge_lora()?;
        }
        for l in &mut self.layers {
            l.lora = Default::default();
        }
        self.adapter = None;
        Ok(())
    }

    fn fold_lora(&mut self, sign: f64, merge: bool) -> Result<()> {
        if self.adapter.is_none() {
            bail!("the model has no LoRA adapter to {}", if merge { "merge" } else { "unmerge" });
        }
        if self.lora_merged == merge {
            bail!("the LoRA adapter is already {}", if merge { "merged" } else { "unmerged" });
        }
        if self.format != WeightFormat::Dense {
            // Folding B A into 4- or 8-bit weights would re-quantize them and lose most of the
            // update (a rank-8 change is far below one quantization step of most weights).
            bail!(
                "merging a LoRA adapter into {} weights is refused: it would re-quantize them; load the base dense (f32 or bf16), merge there, then quantize the merged model",
                self.format.name()
            );
        }
        let _g = tch::no_grad_guard();
        for l in 0..self.layers.len() {
            for p in 0..LORA_TARGETS.len() {
                if let Some(lora) = &self.layers[l].lora[p] {
                    let mut w = self.base_weight(l, p).shallow_clone();
                    let d = (lora.dense() * sign).to_kind(w.kind());
                    let _ = w.g_add_(&d);
                }
            }
        }
        self.lora_merged = merge;
        Ok(())
    }

    /// Loads a model directory written by [`Llama::save`] (or any Hugging Face Llama folder with
    /// `model.safetensors`) into `vs`, in `kind`.
    pub fn from_dir(vs: &mut VarStore, dir: &Path, kind: Kind) -> Result<Self> {
        let d = ModelDir::open(dir)?;
        d.expect_type(&[LlamaConfig::MODEL_TYPE])?;
        let cfg: LlamaConfig = d.config_as()?;
        let mut model = new_for_loading(&vs.root(), &cfg)?;
        crate::io::safetensors::load_into(vs, &d.weights())?;
        set_kind(vs, kind)?;
        model.rope.cast(kind);
        model.pack();
        Ok(model)
    }

    /// The model's `config.json` (tagged `"model_type": "llama"`).
    pub fn config_json(&self, kind: Kind) -> Result<serde_json::Value> {
        let mut v = hf::tagged_config(LlamaConfig::MODEL_TYPE, &self.cfg)?;
        let dtype = match kind {
            Kind::BFloat16 => "bfloat16",
            Kind::Half => "float16",
            _ => "float32",
        };
        v["torch_dtype"] = dtype.into();
        Ok(v)
    }
}

fn set_kind(vs: &mut VarStore, kind: Kind) -> Result<()> {
    match kind {
        Kind::Float => vs.float(),
        Kind::BFloat16 => vs.bfloat16(),
        Kind::Half => vs.half(),
        Kind::Double => vs.double(),
        other => bail!("Llama weights in {other:?}: use Float, BFloat16, Half or Double"),
    }
    Ok(())
}

/// Every weight's Hugging Face name, its GGUF (llama.cpp) name, and for Q and K the head count
/// whose rows llama.cpp stores permuted (see [`unpermute_rope_rows`]).
pub fn gguf_names(cfg: &LlamaConfig) -> Vec<(String, String, Option<i64>)> {
    let mut v = vec![
        ("model.embed_tokens.weight".to_string(), "token_embd.weight".to_string(), None),
        ("model.norm.weight".into(), "output_norm.weight".into(), None),
    ];
    if !cfg.tie_word_embeddings {
        v.push(("lm_head.weight".into(), "output.weight".into(), None));
    }
    for i in 0..cfg.num_hidden_layers {
        let layer: [(&str, &str, Option<i64>); 9] = [
            ("input_layernorm", "attn_norm", None),
            ("self_attn.q_proj", "attn_q", Some(cfg.num_attention_heads)),
            ("self_attn.k_proj", "attn_k", Some(cfg.num_key_value_heads)),
            ("self_attn.v_proj", "attn_v", None),
            ("self_attn.o_proj", "attn_output", None),
            ("post_attention_layernorm", "ffn_norm", None),
            ("mlp.gate_proj", "ffn_gate", None),
            ("mlp.up_proj", "ffn_up", None),
            ("mlp.down_proj", "ffn_down", None),
        ];
        for (hf, gg, heads) in layer {
            v.push((format!("model.layers.{i}.{hf}.weight"), format!("blk.{i}.{gg}.weight"), heads));
        }
    }
    v
}

/// Q and K rows from llama.cpp's interleaved RoPE order back to Hugging Face's half-split
/// order: within each head of `d` rows, GGUF row `2j + t` is HF row `j + t·d/2`
/// (`reshape(heads, d/2, 2, in).transpose(1, 2)`). Whole rows move; nothing is recomputed.
pub fn unpermute_rope_rows(w: &Tensor, heads: i64) -> Result<Tensor> {
    let (rows, cols, d) = head_rows(w, heads)?;
    Ok(w.reshape([heads, d / 2, 2, cols]).transpose(1, 2).reshape([rows, cols]))
}

/// (rows, columns, rows per head) of a Q/K projection split into `heads` heads of even width.
fn head_rows(w: &Tensor, heads: i64) -> Result<(i64, i64, i64)> {
    let (rows, cols) = match w.size()[..] {
        [r, c] => (r, c),
        ref s => bail!("a Q/K projection must be 2-D, got shape {s:?}"),
    };
    if heads < 1 || rows % (2 * heads) != 0 {
        bail!("{rows} rows do not split into {heads} heads of an even width");
    }
    Ok((rows, cols, rows / heads))
}

/// The inverse of [`unpermute_rope_rows`]: Hugging Face's order to llama.cpp's (for writing a
/// GGUF that llama.cpp reads).
pub fn permute_rope_rows(w: &Tensor, heads: i64) -> Result<Tensor> {
    let (rows, cols, d) = head_rows(w, heads)?;
    Ok(w.reshape([heads, 2, d / 2, cols]).transpose(1, 2).reshape([rows, cols]))
}

impl super::CausalLm for Llama {
    fn vocab_size(&self) -> i64 {
        self.cfg.vocab_size
    }
    fn context_len(&self) -> i64 {
        self.cfg.max_position_embeddings
    }
    fn device(&self) -> Device {
        self.device
    }
    fn logits(&self, ids: &Tensor) -> Tensor {
        self.forward(ids).unwrap_or_else(|e| panic!("Llama forward: {e:#}"))
    }
}

impl super::LanguageModel for Llama {
    /// Mean next-token cross-entropy in fp32; targets of -100 leave the mean (the prompt in
    /// instruction tuning). `train` turns LoRA's dropout on; `fused` selects the fused loss kernel.
    /// The head runs only on the positions that have a target: in instruction tuning most are
    /// the prompt's (-100), and the head (576 -> 49152) is the largest product of the model.
    fn loss(&self, x: &Tensor, y: &Tensor, train: bool, fused: bool) -> Tensor {
        let h = self.hidden_t(x, None, train).unwrap_or_else(|e| panic!("Llama forward: {e:#}"));
        let c = self.cfg.hidden_size;
        let yf = y.reshape([-1]);
        let keep = yf.ne(crate::ops::IGNORE_INDEX).nonzero().squeeze_dim(1);
        let rows = h.reshape([-1, c]).index_select(0, &keep);
        crate::nn::loss::next_token_loss(&self.head(&rows), &yf.index_select(0, &keep), fused)
    }
}
