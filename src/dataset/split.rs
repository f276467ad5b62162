//! The train/eval split, by conversation. Examples from one conversation share context (and
//! often answers: a pair and a step example can hold the same text), so splitting examples one by
//! one would leak evaluation answers into training; whole conversations go to one side.
//!
//! The side of a conversation depends only on the seed and its id (sha256 → a fraction in
//! [0, 1)), not on what else is in the store: a conversation stays on its side as new feedback
//! arrives, and the evaluation set of one training is still unseen by the next.

use std::collections::BTreeSet;

use sha2::{Digest, Sha256};

use super::examples::Examples;

/// Where a conversation's examples go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitSide {
    Train,
    Eval,
}

/// The conversation's position in [0, 1) for this seed: sha256(seed as 8 little-endian bytes ‖
/// id), its first 8 bytes read big-endian, over 2^64.
pub fn split_fraction(seed: u64, conversation_id: &str) -> f64 {
    let mut hasher = Sha256::new();
    hasher.update(seed.to_le_bytes());
    hasher.update(conversation_id.as_bytes());
    let digest = hasher.finalize();
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    // 53 bits: the most an f64 holds exactly, so the fraction is strictly below 1.
    (u64::from_be_bytes(head) >> 11) as f64 / (1u64 << 53) as f64
}

/// The side of one conversation, before the small-dataset guard of [`split`].
pub fn split_side(seed: u64, eval_fraction: f64, conversation_id: &str) -> SplitSide {
    if split_fraction(seed, conversation_id) < eval_fraction {
        SplitSide::Eval
    } else {
        SplitSide::Train
    }
}

/// Splits examples into (train, eval) by conversation, both sorted.
///
/// Guard for tiny datasets: with two or more conversations and `eval_fraction > 0`, the eval side
/// gets at least one conversation (the one with the lowest fraction) and the train side keeps at
/// least one (the highest), whatever the hash says.
pub fn split(examples: Examples, eval_fraction: f64, seed: u64) -> (Examples, Examples) {
    let mut conversations: Vec<(f64, String)> = super::conversations(&examples)
        .into_keys()
        .map(|id| (split_fraction(seed, id), id.to_string()))
        .collect();
    // Ties in the fraction are astronomically unlikely; the id breaks them anyway.
    conversations.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
    let mut eval: BTreeSet<String> = conversations
        .iter()
        .filter(|(f, _)| *f < eval_fraction)
        .map(|(_, id)| id.clone())
        .collect();
    if eval_fraction > 0.0 && conversations.len() >= 2 {
        if eval.is_empty() {
            eval.insert(conversations[0].1.clone());
        }
        if eval.len() == conversations.len() {
            eval.remove(&conversations[conversations.len() - 1].1);
        }
    }

    let side = |id: &str| eval.contains(id);
    let (eval_pairs, pairs) = examples
        .pairs
        .into_iter()
        .partition(|e| side(&e.conversation_id));
    let (eval_pointwise, pointwise) =
        (examples.pointwise.into_iter()).partition(|e| side(&e.conversation_id));
    let (eval_steps, steps) = examples
        .steps
        .into_iter()
        .partition(|e| side(&e.conversation_id));
    let (eval_aspects, aspects) =
        (examples.aspects.into_iter()).partition(|e| side(&e.conversation_id));
    let mut train_side = Examples {
        pairs,
        pointwise,
        steps,
        aspects,
    };
    let mut eval_side = Examples {
        pairs: eval_pairs,
        pointwise: eval_pointwise,
        steps: eval_steps,
        aspects: eval_aspects,
    };
    train_side.sort();
    eval_side.sort();
    (train_side, eval_side)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_are_stable_and_spread() {
        // Pinned: a change here silently moves conversations between train and eval.
        // The value is computed independently in Python:
        // sha256(struct.pack('<Q', 0) + b'c_001'), first 8 bytes big-endian >> 11, / 2**53.
        let f = split_fraction(0, "c_001");
        assert_eq!(f, 0.27171777203687575);
        assert_ne!(f, split_fraction(1, "c_001"));
        let below: usize = (0..1000)
            .filter(|i| split_fraction(7, &format!("conv-{i}")) < 0.1)
            .count();
        assert!((60..=140).contains(&below), "{below} of 1000 below 0.1");
    }
}
