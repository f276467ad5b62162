//! Gradient checkpointing (`policy.gradient_checkpointing`): a decoder layer runs forward
//! without keeping its activations, and runs again in backward to get its gradients.
//!
//! Why: candle keeps every intermediate of the forward pass until backward (attention scores,
//! the feed-forward's `[tokens, intermediate]` products, norms), which grows with batch × length
//! and dominates memory on long sequences. Checkpointed, a layer keeps only its input; backward
//! pays one more forward per layer (about a third more compute).
//!
//! How, within candle: a custom op over the layer's input and the concatenation of the layer's
//! trainable tensors (LoRA A/B, or every weight in full fine-tuning). Before the op, the layer
//! runs once on the input detached; its output is detached too, which drops the graph that run
//! built, and the op's forward hands over that output's storage on whatever device it lives
//! (CPU, CUDA, Metal). Its backward runs the layer again on the input as a variable, takes the
//! gradient of `⟨output, dy⟩`, and returns the input's gradient and the trainable tensors'
//! gradients concatenated in the same order, which candle's `cat` backward hands to each
//! variable. The layer must be deterministic (no dropout): the second run must be the first one.
//! The layer runs through `crate::kernels`, so on a GPU both runs take candle's ops and the
//! device-fused kernels, on the CPU the fused CPU kernels.

use std::sync::{Arc, Mutex};

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, DType, Layout, MetalStorage, Result, Shape, Storage,
    Tensor, Var, bail,
};

/// A block of the model to checkpoint: input hidden states to output hidden states.
pub type Block = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// `block(x)` with none of the block's activations kept for backward; `params` are the
/// trainable tensors the block reads (their gradients come back through the recomputation).
pub fn checkpointed(block: Block, x: &Tensor, params: Vec<Tensor>) -> Result<Tensor> {
    if params.is_empty() && !x.track_op() {
        // Nothing to differentiate: no graph is kept anyway.
        return block(x);
    }
    // The output's values; detaching it frees every intermediate of this run at once.
    let output = block(&x.detach())?.detach();
    let flat = if params.is_empty() {
        Tensor::zeros(1, DType::F32, x.device())?
    } else {
        let parts = params
            .iter()
            .map(Tensor::flatten_all)
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)?
    };
    x.contiguous()?.apply_op2(
        &flat,
        Recompute {
            block,
            params,
            output: Mutex::new(Some(output)),
        },
    )
}

struct Recompute {
    block: Block,
    params: Vec<Tensor>,
    /// The first run's output until the op's forward takes it: the op keeps no copy of it for
    /// backward (the graph holds the op, and with it everything the op holds).
    output: Mutex<Option<Tensor>>,
}

impl Recompute {
    /// The first run's output, taken out of the op, copied into a contiguous storage of the
    /// backend `S` (the op's output; the first run's tensor is dropped).
    fn take_output<S>(&self, backend: impl Fn(&Storage) -> Option<&S>) -> Result<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
    {
        let output = self
            .output
            .lock()
            .map_err(|_| candle_core::Error::Msg("recomputed block: poisoned output".into()))?
            .take();
        let Some(output) = output else {
            bail!("recomputed block: the forward ran twice");
        };
        let (storage, layout) = output.storage_and_layout();
        let Some(storage) = backend(&storage) else {
            bail!("recomputed block: the output is on another device than the input");
        };
        let mut copy = storage
            .device()
            .zeros_impl(layout.shape(), storage.dtype())?;
        storage.copy_strided_src(&mut copy, 0, layout)?;
        Ok((copy, layout.shape().clone()))
    }
}

/// The op's forward on each backend: the first run's output, whatever the inputs hold.
macro_rules! forward_hands_over_output {
    ($($fwd:ident: $storage:ident => $variant:ident),*) => {$(
        fn $fwd(
            &self,
            _: &$storage,
            _: &Layout,
            _: &$storage,
            _: &Layout,
        ) -> Result<($storage, Shape)> {
            self.take_output(|s| match s {
                Storage::$variant(s) => Some(s),
                _ => None,
            })
        }
    )*};
}

impl CustomOp2 for Recompute {
    fn name(&self) -> &'static str {
        "recomputed-block"
    }

    forward_hands_over_output!(
        cpu_fwd: CpuStorage => Cpu,
        cuda_fwd: CudaStorage => Cuda,
        metal_fwd: MetalStorage => Metal
    );

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
