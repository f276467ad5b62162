//! One post-norm BERT encoder layer as a single candle custom op with a hand-written backward:
//! packed Q/K/V projection, attention, output projection, residual add + layer norm, GELU
//! feed-forward, residual add + layer norm.
//!
//! Built from separate ops, a layer leaves about fifteen backward nodes, and candle's backward
//! gives every node input a zero-filled gradient buffer plus an allocating add (GUIDE §4); the
//! layer input alone collects four gradients (query, key, value, residual) one allocating add at
//! a time. Here the layer is one node. Its sixteen parameters travel as one flat vector (a
//! `Tensor::cat` of the HF-named tensors, so each still receives its own gradient and checkpoints
//! keep HF's separate query/key/value tensors), Q, K and V come from one `[3h, h]` gemm that
//! attention reads by strides, the residual adds are folded into the buffers the layer norms read,
//! residual gradients are accumulated by the gemms that produce the other branch, and every
//! parameter gradient is written straight into its slot of one flat gradient.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, bail};

use super::attention::{self, Geom};
use super::cpu::{f32_slice, with_f32};
use super::linear::{affine, affine_backward, affine_plus, gelu, gelu_backward_in_place};
use super::norm::{layer_norm_backward, layer_norm_forward};
use super::scratch::{overwritable, recycle};

/// Number of parameter tensors of a layer, in the order [`part_sizes`] lists them.
pub const PARTS: usize = 16;

/// Sizes of the flat parameter vector's parts for hidden size `h` and feed-forward size `f`, in
/// the order query, key, value weights; query, key, value biases (so that the three weights form
/// one `[3h, h]` matrix and the biases one `[3h]` vector); attention output weight, bias; its
/// layer norm weight, bias; intermediate weight, bias; output weight, bias; its layer norm
/// weight, bias.
pub fn part_sizes(h: usize, f: usize) -> [usize; PARTS] {
    [
        h * h,
        h * h,
        h * h,
        h,
        h,
        h,
        h * h,
        h,
        h,
        h,
        f * h,
        f,
        h * f,
        h,
        h,
        h,
    ]
}

/// The flat vector's parts as the layer uses them (Q/K/V weights and biases merged).
fn slot_sizes(h: usize, f: usize) -> [usize; 12] {
    [3 * h * h, 3 * h, h * h, h, h, h, f * h, f, h * f, h, h, h]
}

fn split<const N: usize>(mut s: &[f32], sizes: [usize; N]) -> [&[f32]; N] {
    std::array::from_fn(|i| {
        let (a, rest) = s.split_at(sizes[i]);
        s = rest;
        a
    })
}

fn split_mut<const N: usize>(mut s: &mut [f32], sizes: [usize; N]) -> [&mut [f32]; N] {
    std::array::from_fn(|i| {
        let (a, rest) = std::mem::take(&mut s).split_at_mut(sizes[i]);
        s = rest;
        a
    })
}

/// What the forward pass keeps for the backward.
struct Saved {
    /// `[rows, 3h]` packed projections.
    qkv: Vec<f32>,
    /// `[b, heads, t, t]` attention probabilities.
    probs: Vec<f32>,
    /// `[rows, h]` attention context.
    ctx: Vec<f32>,
    /// `[rows, h]` attention output + layer input (the first layer norm's input) and its stats.
    s1: Vec<f32>,
    stats1: Vec<f32>,
    /// `[rows, h]` first layer norm's output.
    x1: Vec<f32>,
    /// `[rows, f]` feed-forward pre-activation and activation.
    z: Vec<f32>,
    act: Vec<f32>,
    /// `[rows, h]` feed-forward output + `x1` (the second layer norm's input) and its stats.
    s2: Vec<f32>,
    stats2: Vec<f32>,
}

pub struct EncoderLayerOp {
    heads: usize,
    ffn: usize,
    eps: f32,
    /// `[b, t]` additive bias per key (0, or a large negative number for padding).
    mask_bias: Vec<f32>,
    saved: Mutex<Option<Saved>>,
}

impl EncoderLayerOp {
    pub fn new(heads: usize, ffn: usize, eps: f32, mask_bias: Vec<f32>) -> Self {
        Self {
            heads,
            ffn,
            eps,
            mask_bias,
            saved: Mutex::new(None),
        }
    }

    /// `(b, t, h)` from the input layout, after checking every shape.
    fn dims(&self, lx: &Layout, params: usize) -> Result<(usize, usize, usize)> {
        let (b, t, h) =
            attention::check_input("fused encoder layer", lx, self.heads, self.mask_bias.len())?;
        let want: usize = part_sizes(h, self.ffn).iter().sum();
        if params != want {
            bail!(
                "fused encoder layer: {params} parameters, expected {want} for hidden {h} and \
                 feed-forward {}",
                self.ffn
            );
        }
        Ok((b, t, h))
    }

    fn geom(&self, t: usize, h: usize) -> Geom {
        let d = h / self.heads;
        Geom {
            t,
            heads: self.heads,
            d,
            ld: 3 * h,
            scale: 1.0 / (d as f32).sqrt(),
        }
    }

    /// The layer's output `[rows, h]` and what the backward needs.
    fn run(
        &self,
        x: &[f32],
        params: &[f32],
        (b, t, h): (usize, usize, usize),
    ) -> (Vec<f32>, Saved) {
        let (rows, f) = (b * t, self.ffn);
        let p = split(params, slot_sizes(h, f));
        // Every buffer below is written whole before it is read, so none needs zeroing.
        let qkv = affine(x, p[0], p[1], (rows, 3 * h, h));
        let mut ctx = overwritable(rows * h);
        let mut probs = overwritable(b * self.heads * t * t);
        attention::forward(
            self.geom(t, h),
            [&qkv, &qkv[h..], &qkv[2 * h..]],
            &self.mask_bias,
            &mut ctx,
            &mut probs,
        );
        let s1 = affine_plus(&ctx, p[2], p[3], Some(x), (rows, h, h));
        let mut x1 = overwritable(rows * h);
        let stats1 = layer_norm_forward(&s1, (p[4], p[5]), self.eps, &mut x1);
        let z = affine(&x1, p[6], p[7], (rows, f, h));
        let act = gelu(&z);
        let s2 = affine_plus(&act, p[8], p[9], Some(&x1), (rows, h, f));
        let mut y = overwritable(rows * h);
        let stats2 = layer_norm_forward(&s2, (p[10], p[11]), self.eps, &mut y);
        let saved = Saved {
            qkv,
            probs,
            ctx,
            s1,
            stats1,
            x1,
            z,
            act,
            s2,
            stats2,
        };
        (y, saved)
    }

    /// Gradients of the input and of the flat parameter vector from the output gradient `dy`.
    fn backward(
        &self,
        x: &[f32],
        params: &[f32],
        saved: Saved,
        dy: &[f32],
        (b, t, h): (usize, usize, usize),
    ) -> (Vec<f32>, Vec<f32>) {
        let (rows, f) = (b * t, self.ffn);
        let sizes = slot_sizes(h, f);
        let p = split(params, sizes);
        // Every buffer below is written whole before it is read (each gradient slot by its
        // gemm or copy), so none needs zeroing; the saved activations go back to the pool.
        let mut dparams = overwritable(params.len());
        let [
            dwqkv,
            dbqkv,
            dwo,
            dbo,
            dn1w,
            dn1b,
            dwi,
            dbi,
            dwo2,
            dbo2,
            dn2w,
            dn2b,
        ] = split_mut(&mut dparams, sizes);
        let Saved {
            qkv,
            probs,
            ctx,
            s1,
            stats1,
            x1,
            mut z,
            act,
            s2,
            stats2,
        } = saved;
        // Second layer norm; its input gradient reaches both the feed-forward output and x1.
        let mut ds2 = overwritable(rows * h);
        let dln = layer_norm_backward(&s2, &stats2, p[10], dy, &mut ds2);
        dn2w.copy_from_slice(&dln[..h]);
        dn2b.copy_from_slice(&dln[h..]);
        let mut dact = overwritable(rows * f);
        affine_backward(
            &act,
            p[8],
            &ds2,
            (rows, h, f),
            (&mut dact, false),
            dwo2,
            dbo2,
        );
        gelu_backward_in_place(&mut z, &dact);
        recycle(dact);
        recycle(act);
        recycle(s2);
        let dz = z;
        // dx1 = ds2 (residual) + dz·W_i.
        let mut dx1 = ds2;
        affine_backward(&x1, p[6], &dz, (rows, f, h), (&mut dx1, true), dwi, dbi);
        recycle(dz);
        recycle(x1);
        // First layer norm; its input gradient reaches the attention output and the layer input.
        let mut ds1 = overwritable(rows * h);
        let dln = layer_norm_backward(&s1, &stats1, p[4], &dx1, &mut ds1);
        recycle(dx1);
        recycle(s1);
        dn1w.copy_from_slice(&dln[..h]);
        dn1b.copy_from_slice(&dln[h..]);
        let mut dctx = overwritable(rows * h);
        affine_backward(&ctx, p[2], &ds1, (rows, h, h), (&mut dctx, false), dwo, dbo);
        recycle(ctx);
        let mut dqkv = overwritable(rows * 3 * h);
        attention::backward(
            self.geom(t, h),
            [&qkv, &qkv[h..], &qkv[2 * h..]],
            &probs,
            &dctx,
            &mut dqkv,
            (3 * h, [0, h, 2 * h]),
        );
        recycle(dctx);
        recycle(probs);
        // dx = ds1 (residual) + dqkv·W_qkv.
        let mut dx = ds1;
        affine_backward(
            x,
            p[0],
            &dqkv,
            (rows, 3 * h, h),
            (&mut dx, true),
            dwqkv,
            dbqkv,
        );
        recycle(dqkv);
        recycle(qkv);
        (dx, dparams)
    }
}

impl CustomOp2 for EncoderLayerOp {
    fn name(&self) -> &'static str {
        "fused-encoder-layer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(l1, l2.shape().elem_count())?;
        let x = f32_slice(s1, l1, self.name())?;
        let p = f32_slice(s2, l2, self.name())?;
        let (y, saved) = self.run(x, p, dims);
        if let Ok(mut slot) = self.saved.lock() {
            *slot = Some(saved);
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dims = self.dims(x.layout(), params.elem_count())?;
        let saved = self.saved.lock().ok().and_then(|mut s| s.take());
        let (dx, dp) = with_f32(x, |x| {
            with_f32(params, |p| {
                with_f32(grad, |g| {
                    // A second backward through the same node recomputes what the first took.
                    let saved = match saved {
                        Some(s) => s,
                        None => self.run(x, p, dims).1,
                    };
                    Ok(self.backward(x, p, saved, g, dims))
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dp, params.shape(), params.device())?),
        ))
    }
}
