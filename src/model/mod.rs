//! Trainable candle models and their Hugging Face plumbing.
//!
//! Everything here can be trained: models are built from ops with a backward pass (GUIDE §4),
//! parameters carry their HF tensor names so checkpoints load and save without renaming, and
//! the tokenizer wrapper produces the padded batches the trainers feed in. Losses live in
//! `train`, not here.

pub mod bert;
pub mod checkpoint_io;
pub mod fused;
pub mod llama;
pub mod ops;
pub mod tokenizer;
