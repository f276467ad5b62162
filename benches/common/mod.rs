//! What several benches share: the chat questions that generation-heavy benches turn into
//! prompts, so `generate`, `ppo_step` and `group_rl_step` measure the same workload, and the
//! start-up they all make (process tuning, finding SmolLM2: its GGUF, or `MODEL_DIR`).

/// Eight different user questions, one per line (batch 8 uses all of them, batch 1 the first).
/// A text file rather than a Rust list because `scripts/bench-pytorch.py` reads the same file,
/// so the PyTorch comparison runs on exactly these prompts.
const QUESTIONS_FILE: &str = include_str!("questions.txt");

/// The SmolLM2-135M-Instruct GGUF (`fetch-models.sh`, `RLHF_MODELS_DIR`), or `None` after
/// printing why the bench is skipped.
pub fn smollm2_gguf() -> Option<std::path::PathBuf> {
    let found = rlhf_bot::model::gguf::find_gguf("SmolLM2-135M-Instruct");
    if found.is_none() {
        println!(
            "skipped: SmolLM2-135M-Instruct GGUF not found under {:?}",
            rlhf_bot::model::gguf::models_dir()
        );
    }
    found
}

/// The questions, in file order.
pub fn questions() -> Vec<&'static str> {
    QUESTIONS_FILE
        .lines()
        .map(str::trim)
        .filter(|q| !q.is_empty())
        .collect()
}

/// Tunes the process as the binary does: the allocator, and subnormals flushed on every compute
/// thread.
pub fn start_bench() {
    rlhf_bot::kernels::tune_allocator();
    let _ = rlhf_bot::kernels::init_compute_threads(None);
}

/// SmolLM2-135M-Instruct as an HF directory: `MODEL_DIR` when set (an HF directory of the same
/// shape; scripts/gpu-bench.sh makes a randomly initialised one where the 98 MB GGUF cannot be
/// carried), else the fetched GGUF converted into `scratch/smollm2`; `None` (after printing
/// "skipped") when neither is there.
#[allow(dead_code)] // `generate` reads the GGUF itself
pub fn smollm2_hf_dir(scratch: &std::path::Path) -> anyhow::Result<Option<std::path::PathBuf>> {
    if let Some(dir) = std::env::var_os("MODEL_DIR") {
        return Ok(Some(dir.into()));
    }
    let Some(gguf) = smollm2_gguf() else {
        return Ok(None);
    };
    let dir = scratch.join("smollm2");
    rlhf_bot::model::gguf::convert_gguf_to_hf_dir(&gguf, &dir)?;
    Ok(Some(dir))
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

/// The questions as user turns rendered with the chat template of the HF directory `dir`.
#[allow(dead_code)] // `generate` renders with its own template
pub fn chat_prompts(dir: &std::path::Path) -> anyhow::Result<Vec<String>> {
    use rlhf_bot::model::chat_template::{ChatMessage, ChatTemplate};
    let template = ChatTemplate::from_hf_dir(dir)?;
    Ok(questions()
        .into_iter()
        .map(|q| template.render(&[ChatMessage::user(q)], true))
        .collect::<Result<_, _>>()?)
}
