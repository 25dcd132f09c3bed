//! Formats people already use, with no training knowledge: safetensors (named tensors, strict
//! loading), Hugging Face model directories (`config.json` + weights + tokenizer), and GGUF
//! (llama.cpp's single-file format: reader, dequantization, writer, and its tokenizer rebuilt), and
//! peft's LoRA adapter folders.

pub mod gguf;
pub mod gguf_tokenizer;
pub mod hf;
pub mod peft;
pub mod safetensors;
