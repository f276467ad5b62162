//! Trainable model code: candle modules built only from ops that have a backward pass (GUIDE §4),
//! their Hugging Face load/save, and the fused CPU kernels that make training them fast.
pub mod bert;
pub mod fused;
