//! The course's modules, in order. `course list`, `course tour` and the gallery read this table;
//! a new module joins the course by adding its line here (and its `[[bin]]` in Cargo.toml).

#[derive(Debug, Clone, Copy)]
pub struct ModuleInfo {
    /// Binary name and folder under `outputs/`.
    pub name: &'static str,
    pub title: &'static str,
    pub teaches: &'static str,
    /// The headline target, as the README states it.
    pub target: &'static str,
    /// Default run time on a 2-core laptop-class CPU, as measured (or budgeted, before it exists).
    pub time_2core: &'static str,
    /// Flags the tour adds to the module's run (m07 would otherwise serve until Ctrl-C).
    pub tour_args: &'static [&'static str],
}

pub const MODULES: &[ModuleInfo] = &[
    ModuleInfo { name: "m01_basics", title: "Basics and reproducibility", teaches: "tensors, autograd, no_grad vs inference mode, seeds and determinism, memory; linear regression three ways", target: "bit-identical reruns; 3 regressions recover the true weights", time_2core: "~10 s", tour_args: &[] },
    ModuleInfo { name: "m02_data", title: "Data pipelines", teaches: "Dataset/DataLoader, initialisation, optimizers, schedulers, early stopping, resumable checkpoints, TensorBoard", target: "MNIST MLP >= 97.5%, CNN >= 99%; exact resume", time_2core: "~2.5 min", tour_args: &[] },
    ModuleInfo { name: "m03_transformer", title: "Transformer classification", teaches: "attention from scratch, tokenizers, encoder classifier, fine-tuning MiniLM", target: "BBC macro-F1 >= 0.95 (MiniLM), >= 0.90 (scratch); spam F1 >= 0.95", time_2core: "~9 min", tour_args: &[] },
    ModuleInfo { name: "m04_amp", title: "Mixed precision", teaches: "a GPT on Shakespeare, autocast bf16/fp16, GradScaler, clipping, accumulation, NaN checks, fused kernels, recomputation, profiling", target: "char val loss <= 1.90 in <= 10 min; --compare: bf16 >= 1.3x fp32", time_2core: "~7 min", tour_args: &[] },
    ModuleInfo { name: "m05_ddp", title: "Distributed data parallel", teaches: "c10d (Gloo/NCCL), torchrun-compatible launch, bucketed allreduce, DistributedSampler", target: "N=2 x batch b equals N=1 x batch 2b to 1e-5; DDP CNN >= 99% on MNIST", time_2core: "~3 min", tour_args: &[] },
    ModuleInfo { name: "m06_lora_quant", title: "LoRA and quantization", teaches: "SmolLM2 from its GGUF; LoRA and QLoRA instruction tuning with peft's files; int8, NF4 (round-to-nearest and GPTQ) and Q4_1 weight kernels compared", target: "new name on >= 80% of held-out identity questions; held-out loss below the base; LoRA < 2% of the numbers; perplexity vs f32: int8 <= +1%, NF4 (GPTQ) and Q4_1 <= +10%", time_2core: "~15 min", tour_args: &[] },
    ModuleInfo { name: "m07_serving", title: "Serving", teaches: "a continuous-batching engine over KV-cache slots, sampling, an OpenAI-compatible server with a streaming chat page", target: "batched greedy == solo; 0 failed requests in the load sweep; 8 streams >= 4x one stream's tokens/s", time_2core: "~1 min", tour_args: &["--no-serve"] },
    ModuleInfo { name: "m08_rag", title: "Retrieval-augmented generation", teaches: "embeddings, vector search, grounded answers", target: "planned", time_2core: "planned", tour_args: &[] },
];

pub fn find(name: &str) -> Option<&'static ModuleInfo> {
    MODULES.iter().find(|m| m.name == name)
}
