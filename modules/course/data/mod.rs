//! Data: where the data sets live (`registry`), readers of their formats, the `DataLoader`, and
//! the task-specific sets — images (`vision`), text classification (`text`), tokenizers
//! (`tokenize`), language-model token files (`lm`) and instruction-tuning conversations (`sft`). Knows no models and no training.

pub mod idx;
pub mod lm;
pub mod loader;
pub mod registry;
pub mod sft;
pub mod text;
pub mod tokenize;
pub mod vision;
