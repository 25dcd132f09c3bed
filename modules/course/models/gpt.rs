//! A decoder-only GPT, the nanoGPT model (Karpathy, `model.py`) in tch: token and position
//! embeddings, pre-LayerNorm blocks of causal multi-head attention and a GELU MLP, a final
//! LayerNorm, and an output head tied to the token embedding. GPT-2 initialisation: N(0, 0.02)
//! everywhere, residual projections scaled by 1/√(2·layers) (Radford et al. 2019, §2.3).
//!
//! Parameter names are nanoGPT's (`transformer.h.0.attn.c_attn.weight`, ...), so its checkpoints
//! map one to one. Shapes: `B` batch, `T` tokens, `C` width, `H` heads, `V` vocabulary.

use crate::nn::attention::{attention, causal_mask, merge_heads, split_heads};
use crate::nn::norm::{layer_norm, LayerNorm};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// Which attention implementation the blocks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "snake_case")]
pub enum AttentionImpl {
    /// libtorch's `scaled_dot_product_attention` (flash attention on CPU and CUDA).
    #[default]
    Sdpa,
    /// The from-scratch attention of course::attention: `softmax(q kᵀ/√d + mask) v` by hand.
    Scratch,
}

/// The model's shape; saved as `config.json` beside the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptConfig {
    pub vocab_size: i64,
    /// Context length: the most tokens the model sees at once (`n_positions` in Hugging Face's
    /// GPT-2 config, the name config.json uses).
    #[serde(rename = "n_positions", alias = "block_size")]
    pub block_size: i64,
    pub n_layer: i64,
    pub n_head: i64,
    pub n_embd: i64,
    pub dropout: f64,
    /// Biases in the Linear layers and LayerNorms (GPT-2 has them; without is a bit faster).
    pub bias: bool,
    #[serde(default)]
    pub attention: AttentionImpl,
}

/// Named configurations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// Seconds per run: tests and `--quick`.
    Tiny,
    /// The laptop-CPU default: 4 layers, 4 heads, 256 wide, 64-token context (3.2M
    /// parameters). nanoGPT's CPU recipe for Shakespeare is the same at 128 wide; twice the width
    /// learns more per token, and its 256-wide matmuls are where bf16 pays off on a CPU (at 128
    /// wide bf16 is no faster than fp32 here).
    Cpu,
    /// GPT-2 small (124M): 12 layers, 12 heads, 768 wide, 1024 tokens; for GPUs.
    Gpt2,
}

impl Preset {
    pub fn config(self, vocab_size: i64) -> GptConfig {
        let (block_size, n_layer, n_head, n_embd, dropout) = match self {
            Preset::Tiny => (32, 2, 2, 32, 0.0),
            Preset::Cpu => (64, 4, 4, 256, 0.0),
            Preset::Gpt2 => (1024, 12, 12, 768, 0.0),
        };
        GptConfig {
            vocab_size,
            block_size,
            n_layer,
            n_head,
            n_embd,
            dropout,
            bias: true,
            attention: AttentionImpl::Sdpa,
        }
    }
}

impl Kernels {
    /// What m04 runs by default: the fused bias + GELU (measured faster on the CPUs the course
    /// met; notes/m04_amp.md), activations kept, and fp32 attention under CPU autocast unless the
    /// CPU has AMX-BF16 (where oneDNN's bf16 kernels are fast; not measured here).
    pub fn lesson_default() -> Self {
        Kernels {
            fused_bias_gelu: true,
            recompute: false,
            fp32_cpu_attention: !crate::sys::device::cpu_has("amx_bf16"),
            onednn_linear: crate::sys::device::cpu_has("avx512f"),
        }
    }
}

impl GptConfig {
    /// The `model_type` of a saved GPT directory. Not Hugging Face's "gpt2": the weights are
    /// nanoGPT's `nn.Linear` layout (GPT-2's `Conv1D` stores them transposed).
    pub const MODEL_TYPE: &'static str = "nanogpt";

    pub fn check(&self) -> Result<()> {
        let c = self;
        if c.vocab_size < 1 || c.block_size < 1 || c.n_layer < 1 || c.n_head < 1 || c.n_embd < 1 {
            bail!("GPT config: vocab_size, block_size, n_layer, n_head and n_embd must be positive: {c:?}");
        }
        if c.n_embd % c.n_head != 0 {
            bail!("GPT config: n_embd {} is not a multiple of n_head {}", c.n_embd, c.n_head);
        }
        if !(0.0..1.0).contains(&c.dropout) {
            bail!("GPT config: dropout must be in [0, 1), got {}", c.dropout);
        }
        Ok(())
    }

    /// Reads and checks a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let c: GptConfig =
            serde_json::from_str(&text).with_context(|| format!("{} is not a GPT config", path.display()))?;
        c.check().with_context(|| path.display().to_string())?;
        Ok(c)
    }

    /// Parameters, counting the tied head once (nanoGPT's `get_num_params(non_embedding=False)`).
    pub fn num_params(&self) -> i64 {
        let (c, l, v, t) = (self.n_embd, self.n_layer, self.vocab_size, self.block_size);
        let b = i64::from(self.bias);
        let ln = c + b * c;
        let block = 2 * ln + (c * 3 * c + b * 3 * c) + (c * c + b * c) + (c * 4 * c + b * 4 * c) + (4 * c * c + b * c);
        v * c + t * c + l * block + ln
    }

    /// GPT-2's init std of the projections that write into the residual stream: each block adds
    /// two of them, so 0.02 shrinks by √(2·n_layer) to keep the residual's variance flat in depth.
    pub fn residual_std(&self) -> f64 {
        0.02 / ((2 * self.n_layer) as f64).sqrt()
    }

    /// Training FLOPs per token, forward and backward (6 per parameter, plus attention's
    /// `6·L·T·C` for `q kᵀ` and `att v`: PaLM, Chowdhery et al. 2022, appendix B).
    pub fn flops_per_token(&self) -> f64 {
        let n = (self.num_params() - self.block_size * self.n_embd) as f64;
        6.0 * n + 6.0 * (self.n_layer * self.block_size * self.n_embd) as f64
    }
}

/// Speed options that change how a forward pass runs, not what it computes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kernels {
    /// The MLP's bias + GELU through the fused kernel in kernels/ (course::ops::bias_gelu).
    pub fused_bias_gelu: bool,
    /// Recompute each block's activations in backward instead of keeping them
    /// (`sys::recompute::recompute`): less memory, one more forward per block.
    pub recompute: bool,
    /// Under bf16/fp16 autocast on the CPU, run the attention kernel in fp32 (q, k, v cast up,
    /// the output cast back). libtorch's CPU flash attention is slower in bf16 than in fp32
    /// without AMX: on a 2-core Zen 4 its bf16 backward took 6.6 ms against 1.5 ms in fp32 (m04's
    /// `cpu` preset, `--profile`), a fifth of the whole bf16 step. fp32 attention is also the
    /// more accurate one.
    #[serde(default)]
    pub fp32_cpu_attention: bool,
    /// The linear layers through `ops::linear`: oneDNN's GEMM for the forward and the input
    /// gradient on the CPU in fp32 (elsewhere it is tch's `linear`). On by default where the CPU
    /// has AVX-512, where oneDNN's JIT GEMM beat MKL's at these shapes (2-core Zen 4: 1.05-1.12x
    /// forward, 1.07-1.11x input gradient; `cargo bench --bench linear`).
    #[serde(default)]
    pub onednn_linear: bool,
}

/// `x @ l.wsᵀ (+ l.bs)`, through `ops::linear` when the kernels ask for it. `with_bias: false`
/// leaves the bias for a fused epilogue (bias + GELU).
fn project(l: &nn::Linear, x: &Tensor, k: Kernels, with_bias: bool) -> Tensor {
    let b = if with_bias { l.bs.as_ref() } else { None };
    if k.onednn_linear {
        // Shapes and dtypes are right by construction: an error here is a bug.
        return crate::ops::linear(x, &l.ws, b).unwrap_or_else(|e| panic!("linear: {e:#}"));
    }
    match b {
        Some(b) => x.linear(&l.ws, Some(b)),
        None => x.matmul(&l.ws.tr()),
    }
}

fn linear(vs: nn::Path, i: i64, o: i64, bias: bool, std: f64) -> nn::Linear {
    let c = nn::LinearConfig {
        ws_init: nn::Init::Randn { mean: 0.0, stdev: std },
        bs_init: bias.then_some(nn::Init::Const(0.0)),
        bias,
    };
    nn::linear(vs, i, o, c)
}

/// Causal self-attention with one `C -> 3C` projection for q, k and v.
#[derive(Debug)]
pub struct CausalSelfAttention {
    c_attn: nn::Linear,
    c_proj: nn::Linear,
    n_head: i64,
    dropout: f64,
    imp: AttentionImpl,
}

/// Whether this attention call runs in fp32: asked for, on the CPU, with bf16/fp16 inputs.
fn attention_in_fp32(k: Kernels, q: &Tensor) -> bool {
    k.fp32_cpu_attention && q.device() == Device::Cpu && matches!(q.kind(), Kind::BFloat16 | Kind::Half)
}

impl CausalSelfAttention {
    fn new(vs: &nn::Path, c: &GptConfig) -> Self {
        Self {
            c_attn: linear(vs / "c_attn", c.n_embd, 3 * c.n_embd, c.bias, 0.02),
            c_proj: linear(vs / "c_proj", c.n_embd, c.n_embd, c.bias, c.residual_std()),
            n_head: c.n_head,
            dropout: c.dropout,
            imp: c.attention,
        }
    }

    /// # Shapes
    /// `x`: `(B, T, C)` -> `(B, T, C)`
    pub fn forward(&self, x: &Tensor, train: bool, kernels: Kernels) -> Tensor {
        let qkv = project(&self.c_attn, x, kernels, true).chunk(3, -1);
        // (B, T, C) -> (B, H, T, C/H) each
        let (q, k, v) =
            (split_heads(&qkv[0], self.n_head), split_heads(&qkv[1], self.n_head), split_heads(&qkv[2], self.n_head));
        let p = if train { self.dropout } else { 0.0 };
        let y = match self.imp {
            // is_causal: the kernel skips the masked upper triangle instead of reading a mask.
            AttentionImpl::Sdpa if attention_in_fp32(kernels, &q) => {
                // Autocast would cast fp32 inputs straight back down: leave it for this one call.
                let low = q.kind();
                let _off = crate::sys::runtime::autocast(Device::Cpu, low, false)
                    .unwrap_or_else(|e| panic!("leaving CPU autocast around attention: {e:#}"));
                let f = |t: &Tensor| t.to_kind(Kind::Float);
                Tensor::scaled_dot_product_attention(&f(&q), &f(&k), &f(&v), None::<&Tensor>, p, true, None, false)
                    .to_kind(low)
            }
            AttentionImpl::Sdpa => {
                Tensor::scaled_dot_product_attention(&q, &k, &v, None::<&Tensor>, p, true, None, false)
            }
            AttentionImpl::Scratch => {
                let t = x.size()[1];
                attention(&q, &k, &v, Some(&causal_mask(t, x.device())), p, train).0
            }
        };
        project(&self.c_proj, &merge_heads(&y), kernels, true).dropout(self.dropout, train)
        // (B, T, C)
    }
}

/// `c_proj(gelu(c_fc(x)))`, 4× wide. GELU is the tanh approximation, as in GPT-2 and as the
/// fused kernel computes it.
#[derive(Debug)]
pub struct Mlp {
    c_fc: nn::Linear,
    c_proj: nn::Linear,
    dropout: f64,
}

impl Mlp {
    fn new(vs: &nn::Path, c: &GptConfig) -> Self {
        Self {
            c_fc: linear(vs / "c_fc", c.n_embd, 4 * c.n_embd, c.bias, 0.02),
            c_proj: linear(vs / "c_proj", 4 * c.n_embd, c.n_embd, c.bias, c.residual_std()),
            dropout: c.dropout,
        }
    }

    /// # Shapes
    /// `x`: `(B, T, C)` -> `(B, T, C)`
    pub fn forward(&self, x: &Tensor, train: bool, k: Kernels) -> Tensor {
        let h = match (&self.c_fc.bs, k.fused_bias_gelu) {
            (Some(b), true) => {
                // (B, T, 4C), in the autocast dtype if any; the kernel takes one dtype, so the
                // bias follows the matmul's.
                let h = project(&self.c_fc, x, k, false);
                match h.kind() {
                    // The kernel has no fp16 path (fp16 autocast): the unfused pair.
                    Kind::Half => (&h + b.to_kind(Kind::Half)).gelu("tanh"),
                    // Shapes and dtypes are right by construction: an error here is a bug.
                    _ => crate::ops::bias_gelu(&h, &b.to_kind(h.kind())).expect("fused bias + GELU"),
                }
            }
            _ => project(&self.c_fc, x, k, true).gelu("tanh"),
        };
        project(&self.c_proj, &h, k, true).dropout(self.dropout, train)
    }
}

/// `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
#[derive(Debug)]
pub struct Block {
    ln_1: LayerNorm,
    attn: CausalSelfAttention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn new(vs: &nn::Path, c: &GptConfig) -> Self {
        Self {
            ln_1: layer_norm(vs / "ln_1", c.n_embd, c.bias),
            attn: CausalSelfAttention::new(&(vs / "attn"), c),
            ln_2: layer_norm(vs / "ln_2", c.n_embd, c.bias),
            mlp: Mlp::new(&(vs / "mlp"), c),
        }
    }

    /// # Shapes
    /// `x`: `(B, T, C)` -> `(B, T, C)`
    pub fn forward(&self, x: &Tensor, train: bool, k: Kernels) -> Tensor {
        let x = x + self.attn.forward(&self.ln_1.forward(x), train, k);
        &x + self.mlp.forward(&self.ln_2.forward(&x), train, k)
    }

    /// The block's trainable tensors (for recomputation, which must hand them to autograd).
    fn parameters(&self) -> Vec<Tensor> {
        let mut v = vec![];
        for l in [&self.attn.c_attn, &self.attn.c_proj, &self.mlp.c_fc, &self.mlp.c_proj] {
            v.push(l.ws.shallow_clone());
            v.extend(l.bs.as_ref().map(|b| b.shallow_clone()));
        }
        for ln in [&self.ln_1, &self.ln_2] {
            v.push(ln.ws.shallow_clone());
            v.extend(ln.bs.as_ref().map(|b| b.shallow_clone()));
        }
        v
    }
}

/// A block shared with the recompute closure, which autograd may call on its device thread.
struct SharedBlock(Arc<Block>);
// SAFETY: a Block is only read (its forward), and libtorch tensors may be read from several
// threads at once (their refcounts are atomic); tch marks Tensor Send but not Sync only
// because it cannot know what callers do with `&mut` methods, which Block never calls.
unsafe impl Send for SharedBlock {}

impl SharedBlock {
    fn forward(&self, x: &Tensor, k: Kernels) -> Tensor {
        self.0.forward(x, true, k)
    }
}

/// The GPT language model.
#[derive(Debug)]
pub struct Gpt {
    pub cfg: GptConfig,
    pub kernels: Kernels,
    wte: nn::Embedding,
    wpe: nn::Embedding,
    h: Vec<Arc<Block>>,
    ln_f: LayerNorm,
}

impl Gpt {
    /// Builds the model under `vs` with GPT-2 initialisation.
    pub fn new(vs: &nn::Path, cfg: &GptConfig) -> Result<Self> {
        cfg.check()?;
        let t = vs / "transformer";
        let emb = nn::EmbeddingConfig { ws_init: nn::Init::Randn { mean: 0.0, stdev: 0.02 }, ..Default::default() };
        Ok(Self {
            wte: nn::embedding(&t / "wte", cfg.vocab_size, cfg.n_embd, emb),
            wpe: nn::embedding(&t / "wpe", cfg.block_size, cfg.n_embd, emb),
            h: (0..cfg.n_layer).map(|i| Arc::new(Block::new(&(&t / "h" / i), cfg))).collect(),
            ln_f: layer_norm(&t / "ln_f", cfg.n_embd, cfg.bias),
            cfg: cfg.clone(),
            kernels: Kernels::default(),
        })
    }

    /// Final hidden states.
    ///
    /// # Shapes
    /// `idx`: `(B, T)` int64 token ids with `T <= block_size` -> `(B, T, C)`
    pub fn hidden(&self, idx: &Tensor, train: bool) -> Tensor {
        let t = idx.size()[1];
        assert!(
            t <= self.cfg.block_size,
            "sequence of {t} tokens is longer than the block size {}",
            self.cfg.block_size
        );
        let pos = Tensor::arange(t, (Kind::Int64, idx.device()));
        let mut x = (self.wte.forward(idx) + self.wpe.forward(&pos)).dropout(self.cfg.dropout, train); // (B, T, C)
        for b in &self.h {
            x = if self.kernels.recompute && train && x.requires_grad() {
                let (blk, k) = (SharedBlock(Arc::clone(b)), self.kernels);
                crate::sys::recompute::recompute(move |x: &Tensor| blk.forward(x, k), &x, &b.parameters())
                    .expect("a recomputed block runs as the plain one does")
            } else {
                b.forward(&x, train, self.kernels)
            };
        }
        self.ln_f.forward(&x)
    }

    /// # Shapes
    /// `idx`: `(B, T)` -> logits `(B, T, V)`; the head is the token embedding, transposed (tying).
    pub fn forward(&self, idx: &Tensor, train: bool) -> Tensor {
        let h = self.hidden(idx, train);
        if self.kernels.onednn_linear {
            return crate::ops::linear(&h, &self.wte.ws, None).unwrap_or_else(|e| panic!("linear head: {e:#}"));
        }
        h.linear::<Tensor>(&self.wte.ws, None)
    }

    /// Mean next-token cross-entropy of `idx` against `targets` (both `(B, T)`), in fp32 under
    /// autocast (f64 for an f64 model). With `fused`, through the fused softmax-cross-entropy kernel.
    pub fn loss(&self, idx: &Tensor, targets: &Tensor, train: bool, fused: bool) -> Tensor {
        // Under autocast the logits are bf16/fp16; the softmax and the mean run in fp32.
        crate::nn::loss::next_token_loss(&self.forward(idx, train), targets, fused)
    }
}

impl super::LanguageModel for Gpt {
    fn loss(&self, x: &Tensor, y: &Tensor, train: bool, fused_loss: bool) -> Tensor {
        Gpt::loss(self, x, y, train, fused_loss)
    }
}

impl super::CausalLm for Gpt {
    fn vocab_size(&self) -> i64 {
        self.cfg.vocab_size
    }
    fn context_len(&self) -> i64 {
        self.cfg.block_size
    }
    fn device(&self) -> Device {
        self.wte.ws.device()
    }
    fn logits(&self, ids: &Tensor) -> Tensor {
        self.forward(ids, false)
    }
}
