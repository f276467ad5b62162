//! Gradient checkpointing (`policy.gradient_checkpointing`): a decoder layer runs forward
//! without keeping its activations, and runs again in backward to get its gradients.
//!
//! Why: candle keeps every intermediate of the forward pass until backward (attention scores,
//! the feed-forward's `[tokens, intermediate]` products, norms), which grows with batch × length
//! and dominates memory on long sequences. Checkpointed, a layer keeps only its input; backward
//! pays one more forward per layer (about a third more compute).
//!
//! How, within candle: a custom op over the layer's input and the concatenation of the layer's
//! trainable tensors (LoRA A/B, or every weight in full fine-tuning). Its forward runs the
//! layer on a copy of the input and keeps the output only. Its backward runs the layer again on
//! the input as a variable, takes the gradient of `⟨output, dy⟩`, and returns the input's
//! gradient and the trainable tensors' gradients concatenated in the same order, which candle's
//! `cat` backward hands to each variable. The layer must be deterministic (no dropout): the
//! second run must be the first one. CPU only: running a model inside an op needs tensors made
//! from the op's storage, which candle exposes for the CPU.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, Var, bail};

use crate::kernels::cpu::f32_slice;

/// A block of the model to checkpoint: input hidden states to output hidden states.
pub type Block = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// `block(x)` with none of the block's activations kept for backward; `params` are the
/// trainable tensors the block reads (their gradients come back through the recomputation).
pub fn checkpointed(block: Block, x: &Tensor, params: Vec<Tensor>) -> Result<Tensor> {
    if params.is_empty() && !x.track_op() {
        // Nothing to differentiate: no graph is kept anyway.
        return block(x);
    }
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        bail!(
            "gradient checkpointing runs on f32 CPU tensors only (got {:?} on {:?})\nhint: \
             set policy.gradient_checkpointing: false on this device",
            x.dtype(),
            x.device()
        );
    }
    let flat = if params.is_empty() {
        Tensor::zeros(1, DType::F32, x.device())?
    } else {
        let parts = params
            .iter()
            .map(Tensor::flatten_all)
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)?
    };
    x.contiguous()?
        .apply_op2(&flat, Recompute { block, params })
}

struct Recompute {
    block: Block,
    params: Vec<Tensor>,
}

impl CustomOp2 for Recompute {
    fn name(&self) -> &'static str {
        "recomputed-block"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = Tensor::from_slice(f32_slice(s1, l1, self.name())?, l1.shape(), &Device::Cpu)?;
        // The graph this run builds (through the trainable tensors) is dropped with `y`.
        let y = (self.block)(&x)?;
        let shape = y.shape().clone();
        let values = y.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(values), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _flat: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let input = Var::from_tensor(&x.detach())?;
        let y = (self.block)(input.as_tensor())?;
        let grads = (y * dy.detach())?.sum_all()?.backward()?;
        let dx = match grads.get(input.as_tensor()) {
            Some(g) => g.clone(),
            None => x.zeros_like()?,
        };
        let dparams = if self.params.is_empty() {
            None
        } else {
            let parts = self
                .params
                .iter()
                .map(|p| match grads.get(p) {
                    Some(g) => g.flatten_all(),
                    None => Tensor::zeros(p.elem_count(), p.dtype(), p.device()),
                })
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&parts, 0)?)
        };
        Ok((Some(dx), dparams))
    }
}
