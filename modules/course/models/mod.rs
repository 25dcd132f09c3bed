//! The models: m02's MLP and CNN (`mnist`), m03's encoder and BERT, m04's GPT. Each is a struct
//! built on a tch `nn::Path` from its config; none knows how it is trained or distributed.

pub mod bert;
pub mod gpt;
pub mod mnist;
