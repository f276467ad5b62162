//! PPO step time at the shape: SmolLM2-135M-Instruct with LoRA (r 16, α 32 on
//! q/k/v/o, as `configs/smollm2-demo.yaml`), 8 prompts per step, 32 new tokens, 4 PPO epochs
//! over one minibatch (TRL's defaults), f32 on the CPU (or CUDA: `DEVICE=cuda` on a
//! `--features cuda` build).
//!
//! The step is the trainer's own: `train_ppo` runs rollout generation, the policy's old
//! log-probs and values, the reference log-probs, reward scoring, rewards + GAE, and the PPO
//! epochs' forward, backward and AdamW, and books each phase's wall time in
//! `TrainOutcome::phase_seconds`, which this bench prints. The reward model is the same
//! SmolLM2 body as a sequence classifier (`score` head freshly initialised): a reward model of
//! the policy's size, which is what scoring costs in a real run. Generation stops at EOS as in
//! training, so a step may produce fewer than 32 tokens per row; the bench prints how many.
//!
//! Run: `cargo bench --bench ppo_step` (env: `STEPS`, default 2: the first is reported
//! separately as warm-up; `DEVICE`, default cpu; `MODEL_DIR`, an HF directory instead of the
//! GGUF). Needs the GGUF (see `fetch-models.sh`; `RLHF_MODELS_DIR`), else
//! prints "skipped".

use std::time::Instant;

use anyhow::{Context, Result};
use rlhf_bot::run::outputs::PolicyAlgo;
use rlhf_bot::train::policy_common::{Policy, PolicyTrainOptions, PpoOptions};
use rlhf_bot::train::policy_eval::RewardScorer;
use rlhf_bot::train::ppo_trainer::train_ppo;

mod common;
use common::{chat_prompts, policy_step_options, smollm2_hf_dir, start_bench};

fn options(steps: u64) -> PolicyTrainOptions {
    PolicyTrainOptions {
        max_steps: Some(steps),
        ppo: PpoOptions {
            rollouts_per_step: 8,
            ppo_epochs: 4,
            num_minibatches: 1,
            ..PpoOptions::default()
        },
        ..policy_step_options(PolicyAlgo::Ppo, 32)
    }
}

fn main() -> Result<()> {
    start_bench();
    let steps: u64 = std::env::var("STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2)
        .max(1);
    let tmp = tempfile::tempdir().context("creating a scratch directory")?;
    let t0 = Instant::now();
    let Some(dir) = smollm2_hf_dir(tmp.path())? else {
        return Ok(());
    };
    let prompts = chat_prompts(&dir)?;
    let dev = rlhf_bot::train::device::DeviceChoice::open_from_env("DEVICE")?;
    let opts = options(steps);
    let rm = RewardScorer::load(&dir, &dev)?;
    let mut policy = Policy::load(&dir, opts.lora.as_ref(), opts.seed, &dev)?;
    println!(
        "PPO step, SmolLM2-135M-Instruct + LoRA r16 q/k/v/o, reward model SmolLM2-135M: {} prompts x {} new tokens, {} PPO epochs; threads {}; loaded in {:.1} s",
        opts.ppo.rollouts_per_step,
        opts.max_completion_len,
        opts.ppo.ppo_epochs,
        candle_core::utils::get_num_threads(),
        t0.elapsed().as_secs_f64()
    );

    // Step 1 (warm-up: allocator pools, lazily built tables) and the remaining steps are timed
    // as two runs of the trainer; the second resumes from the first's checkpoint.
    let out = tmp.path().join("run");
    let mut first = opts.clone();
    first.max_steps = Some(1);
    let warm = train_ppo(&mut policy, &rm, &prompts, &first, &out)?;
    report("warm-up step", &warm, 1);
    if steps > 1 {
        let rest = train_ppo(&mut policy, &rm, &prompts, &opts, &out)?;
        report("steady step", &rest, steps - 1);
    }
    Ok(())
}

/// Prints each phase's mean seconds per step and the total.
fn report(label: &str, o: &rlhf_bot::train::dpo_trainer::TrainOutcome, steps: u64) {
    let n = steps as f64;
    let total: f64 = o.phase_seconds.iter().map(|(_, s)| s).sum();
    println!(
        "{label} ({steps} step(s), {:.1} new tokens per row):",
        o.tokens as f64 / (8.0 * n)
    );
    for (name, s) in &o.phase_seconds {
        println!("  {name:<26} {:>7.3} s", s / n);
    }
    println!("  {:<26} {:>7.3} s", "total", total / n);
}
