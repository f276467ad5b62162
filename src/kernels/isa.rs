//! Runtime choice of the instruction set for the element-wise kernels (GELU, layer norm, softmax,
//! AdamW, …).
//!
//! The crate is built for the x86-64 baseline so that one binary runs on every runner, which
//! leaves the loops the compiler vectorises at SSE2's four lanes. gemm picks AVX2 or AVX-512 at
//! run time; without the same for the rest, a BERT step on an AVX-512 machine spent about a tenth
//! of its time in element-wise loops a quarter as wide as the machine allows. [`multiversion!`]
//! compiles one loop body three times (baseline, x86-64-v3: AVX2 + FMA, x86-64-v4: AVX-512) and
//! calls the widest one the CPU has, found once per process. Results agree between versions to
//! rounding (wider lanes change the order of some sums); tests run every supported version
//! through `<name>_on` ([`supported`]).

use std::sync::OnceLock;

/// An instruction-set level a [`multiversion!`] function can be compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Whatever the build targets (x86-64: SSE2).
    Baseline,
    /// x86-64-v3: AVX2, FMA, BMI1/2 (Haswell, Zen 1 and later).
    X86V3,
    /// x86-64-v4: AVX-512 F/BW/DQ/VL on top of v3 (Skylake-SP, Ice Lake, Zen 4 and later).
    X86V4,
}

/// The widest level this CPU runs, detected once.
pub fn detected() -> Isa {
    static DETECTED: OnceLock<Isa> = OnceLock::new();
    *DETECTED.get_or_init(detect)
}

/// Every level this CPU runs, narrowest first: what the tests compare.
#[cfg_attr(not(test), allow(dead_code))]
pub fn supported() -> Vec<Isa> {
    [Isa::Baseline, Isa::X86V3, Isa::X86V4]
        .into_iter()
        .filter(|&isa| isa <= detected())
        .collect()
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Isa {
    use std::arch::is_x86_feature_detected as has;
    let v3 = has!("avx2") && has!("fma") && has!("bmi1") && has!("bmi2");
    let v4 = v3 && has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl");
    match (v3, v4) {
        (_, true) => Isa::X86V4,
        (true, false) => Isa::X86V3,
        _ => Isa::Baseline,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Isa {
    Isa::Baseline
}

/// Defines `fn $name(args)` that runs `body` compiled for the widest [`Isa`] this CPU has, and
/// `fn ${name}_on(isa, args)` that runs it compiled for `isa` (panicking if the CPU lacks it).
/// The body is inlined into each version, so everything it calls must be `#[inline]` generic
/// or `#[inline(always)]` to be compiled with the wider instructions too.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)?
        $body:block) => {
        paste::paste! {
            $(#[$meta])*
            $vis fn $name($($arg: $ty),*) $(-> $ret)? {
                [<$name _on>]($crate::kernels::isa::detected(), $($arg),*)
            }

            #[doc = concat!("[`", stringify!($name), "`] compiled for `isa`.")]
            #[allow(unsafe_code, dead_code)]
            $vis fn [<$name _on>](
                isa: $crate::kernels::isa::Isa,
                $($arg: $ty),*
            ) $(-> $ret)? {
                #[inline(always)]
                fn body($($arg: $ty),*) $(-> $ret)? $body
                assert!(
                    isa <= $crate::kernels::isa::detected(),
                    "{isa:?} is not supported by this CPU"
                );
                #[cfg(target_arch = "x86_64")]
                {
                    #[target_feature(
                        enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi1,bmi2"
                    )]
                    fn v4($($arg: $ty),*) $(-> $ret)? {
                        body($($arg),*)
                    }
                    #[target_feature(enable = "avx2,fma,bmi1,bmi2")]
                    fn v3($($arg: $ty),*) $(-> $ret)? {
                        body($($arg),*)
                    }
                    match isa {
                        // SAFETY: the assertion above checked that the CPU has every feature
                        // the chosen version was compiled with.
                        $crate::kernels::isa::Isa::X86V4 => return unsafe { v4($($arg),*) },
                        $crate::kernels::isa::Isa::X86V3 => return unsafe { v3($($arg),*) },
                        $crate::kernels::isa::Isa::Baseline => {}
                    }
                }
                body($($arg),*)
            }
        }
    };
}

pub(crate) use multiversion;

/// Test support: deterministic values in `[-range, range)` and a check that every supported
/// version of a kernel agrees with the baseline one.
#[cfg(test)]
pub(crate) mod testing {
    use super::{Isa, supported};

    /// `n` values spread over `[-range, range)` from a fixed linear congruential sequence.
    pub fn values(n: usize, seed: u64, range: f32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * range
            })
            .collect()
    }

    /// Runs `kernel` compiled for every level this CPU has and asserts that each output is
    /// within `tol` (relative to the larger magnitude, or absolute below 1) of the baseline's.
    pub fn every_isa_agrees(what: &str, tol: f32, kernel: impl Fn(Isa) -> Vec<f32>) {
        let want = kernel(Isa::Baseline);
        assert!(
            want.iter().all(|v| v.is_finite()),
            "{what}: baseline not finite"
        );
        for isa in supported() {
            let got = kernel(isa);
            assert_eq!(got.len(), want.len(), "{what} on {isa:?}");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let scale = g.abs().max(w.abs()).max(1.0);
                assert!(
                    (g - w).abs() <= tol * scale,
                    "{what} on {isa:?}: element {i} is {g}, baseline {w}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    multiversion! {
        /// A loop the compiler vectorises: the same sums at every width.
        fn scaled_sum(x: &[f32], by: f32) -> f32 {
            x.iter().map(|v| v * by).sum()
        }
    }

    #[test]
    fn every_supported_version_computes_the_same_and_the_default_is_the_widest() {
        let x: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        let want = scaled_sum_on(Isa::Baseline, &x, 2.0);
        assert_eq!(want, 499_500.0);
        for isa in supported() {
            assert_eq!(scaled_sum_on(isa, &x, 2.0), want, "{isa:?}");
        }
        assert_eq!(supported().last(), Some(&detected()));
        assert_eq!(scaled_sum(&x, 2.0), want);
    }
}
