//! What several benches share: the chat questions that generation-heavy benches turn into
//! prompts, so `generate` and `ppo_step` measure the same workload.

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
