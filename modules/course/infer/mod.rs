//! Inference: sampling the next token and generating text from a causal language model
//! and the engine that serves many requests at once by continuous batching (`engine`), behind
//! an OpenAI-compatible HTTP server (`serve`).

pub mod chat;
pub mod engine;
pub mod generate;
pub mod loadgen;
pub mod sampling;
pub mod serve;

pub use chat::{ChatModel, ChatTemplate, Message};
pub use engine::{BatchModel, Engine, EngineConfig, Event, Finish, LlamaSlots, Params, Request};
pub use generate::{generate, generate_cached, FinishReason, GenerateConfig, Generated, TextStream};
pub use sampling::{sample, sample_from, Sampling};
