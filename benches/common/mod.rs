//! What several benches share: the chat questions that generation-heavy benches turn into
//! prompts, so `generate`, `ppo_step` and `group_rl_step` measure the same workload, and the
//! start-up they all make (process tuning, finding SmolLM2's GGUF).

/// Eight different user questions, one per line (batch 8 uses all of them, batch 1 the first).
/// A text file rather than a Rust list because `scripts/bench-pytorch.py` reads the same file,
/// so the PyTorch comparison runs on exactly these prompts.
const QUESTIONS_FILE: &str = include_str!("questions.txt");

/// The questions, in file order.
pub fn questions() -> Vec<&'static str> {
    QUESTIONS_FILE
        .lines()
        .map(str::trim)
        .filter(|q| !q.is_empty())
        .collect()
}

/// Tunes the process as the binary does (allocator, subnormals flushed on every compute thread)
/// and finds SmolLM2-135M-Instruct's GGUF; `None` (after printing "skipped") when it is absent.
pub fn start_smollm2_bench() -> Option<std::path::PathBuf> {
    rlhf_bot::kernels::tune_allocator();
    let _ = rlhf_bot::kernels::init_compute_threads(None);
    let found = rlhf_bot::model::gguf::find_gguf("SmolLM2-135M-Instruct");
    if found.is_none() {
        println!(
            "skipped: SmolLM2-135M-Instruct GGUF not found under {:?}",
            rlhf_bot::model::gguf::models_dir()
        );
    }
    found
}

/// What the policy-step benches share: LoRA r 16, α 32 on q/k/v/o (as
/// `configs/smollm2-demo.yaml`), lr 1e-4, prompts up to 128 tokens, and no KL ceiling (a random
/// score head can make any KL look large; the benches measure time, not safety).
#[allow(dead_code)] // `generate` samples without training
pub fn policy_step_options(
    algo: rlhf_bot::run::outputs::PolicyAlgo,
    new_tokens: usize,
) -> rlhf_bot::train::policy_common::PolicyTrainOptions {
    use rlhf_bot::train::policy_common::{LoraOptions, PolicyTrainOptions};
    PolicyTrainOptions {
        algo,
        lr: 1e-4,
        max_prompt_len: 128,
        max_completion_len: new_tokens,
        lora: Some(LoraOptions {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec(),
        }),
        kl_ceiling: 1e9,
        checkpoint_every: 1_000_000,
        ..PolicyTrainOptions::default()
    }
}

/// Unpacks SmolLM2's GGUF into an HF directory `dir` and renders the questions as user turns with
/// its chat template: the prompts the policy-step benches sample from.
#[allow(dead_code)] // `generate` reads the GGUF itself
pub fn smollm2_prompts(
    gguf: &std::path::Path,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<String>> {
    use rlhf_bot::model::chat_template::{ChatMessage, ChatTemplate};
    rlhf_bot::model::gguf::convert_gguf_to_hf_dir(gguf, dir)?;
    let template = ChatTemplate::from_hf_dir(dir)?;
    Ok(questions()
        .into_iter()
        .map(|q| template.render(&[ChatMessage::user(q)], true))
        .collect::<Result<_, _>>()?)
}
