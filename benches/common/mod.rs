//! What several benches share: the chat questions that generation-heavy benches turn into
//! prompts, so `generate` and `ppo_step` measure the same workload.

/// Eight different user questions (batch 8 uses all of them, batch 1 the first).
pub const QUESTIONS: [&str; 8] = [
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "Give me three tips for writing clear emails.",
    "Why is the sky blue?",
    "What does a carbon tax do to emissions?",
    "Write a haiku about autumn rain.",
    "How do vaccines train the immune system?",
    "Summarise the plot of Romeo and Juliet.",
];
