//! Inference: sampling the next token and generating text from a causal language model
//! (m07 adds the KV-cache engine and the server here).

pub mod chat;
pub mod generate;
pub mod sampling;

pub use chat::{ChatModel, ChatTemplate, Message};
pub use generate::{generate, generate_cached, FinishReason, GenerateConfig, Generated, TextStream};
pub use sampling::{sample, Sampling};
