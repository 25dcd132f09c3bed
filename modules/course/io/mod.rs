//! Formats people already use, with no training knowledge: safetensors (named tensors, strict
//! loading) and Hugging Face model directories (`config.json` + weights + tokenizer).

pub mod hf;
pub mod safetensors;
