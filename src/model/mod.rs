//! Trainable language models and what surrounds them: loading (HF directories, GGUF import),
//! tokenisation and chat templates, sampling and generation, LoRA adapters.
pub mod chat_template;
pub mod generate;
pub mod gguf;
pub mod lora;
pub mod sampling;
