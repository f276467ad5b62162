//! Trainable candle models and their Hugging Face plumbing.
//!
//! One decoder (`llama`) runs every supported family (`family`: Llama, Mistral, Qwen2/2.5,
//! Qwen3, Gemma 2/3) with the RoPE scalings of `rope`.
//!
//! Everything here can be trained: models are built from ops with a backward pass (GUIDE §4),
//! parameters carry their HF tensor names so checkpoints load and save without renaming, and
//! the tokenizer wrapper produces the padded batches the trainers feed in. Around the decoder:
//! GGUF import into the HF layout, chat templates, sampling, KV-cache generation and LoRA
//! adapters; serving formats out (`export`). Losses live in `train`, not here.

pub mod bert;
pub mod chat_template;
pub mod checkpoint_io;
pub mod export;
pub mod family;
pub mod generate;
pub mod gguf;
pub mod gguf_lora;
pub mod gguf_vocab;
pub mod llama;
pub mod lora;
pub mod ops;
pub mod recompute;
pub mod rope;
pub mod sampling;
pub mod tokenizer;
