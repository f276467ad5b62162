//! The dataset's fingerprint: example counts and sha256 digests of the canonical serialisation of
//! the train and eval sets. The registry records it beside a trained model, so a model can be
//! traced to the exact data it saw, and two runs can tell cheaply whether their data differ.
//!
//! Canonical serialisation: the sorted [`Examples`] as compact JSON (serde_json, fields in
//! declaration order, maps sorted by key, floats in shortest round-trip form). Building is
//! deterministic, so the same store and options always give the same digests.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::examples::{ExampleCounts, Examples};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub train: ExampleCounts,
    pub eval: ExampleCounts,
    pub train_sha256: String,
    pub eval_sha256: String,
    /// Over both: sha256("train\n" ‖ train_sha256 ‖ "\neval\n" ‖ eval_sha256).
    pub sha256: String,
}

impl Fingerprint {
    pub fn of(train: &Examples, eval: &Examples) -> Self {
        let train_sha256 = digest(train);
        let eval_sha256 = digest(eval);
        let mut both = Sha256::new();
        both.update(b"train\n");
        both.update(train_sha256.as_bytes());
        both.update(b"\neval\n");
        both.update(eval_sha256.as_bytes());
        Self {
            train: train.counts(),
            eval: eval.counts(),
            train_sha256,
            eval_sha256,
            sha256: hex::encode(both.finalize()),
        }
    }

    /// The first 12 hex digits: enough to tell datasets apart in a report or a branch name.
    pub fn short(&self) -> &str {
        &self.sha256[..12]
    }
}

/// sha256 of the canonical serialisation of one example set.
pub fn digest(examples: &Examples) -> String {
    let mut hasher = Sha256::new();
    // Streaming into the hasher avoids holding the whole serialisation in memory. It cannot fail
    // for these types (string map keys, derived serialisers); the fallback only keeps it
    // panic-free, and it cannot collide with a real hex digest.
    if serde_json::to_writer(HashWriter(&mut hasher), examples).is_err() {
        return "unserialisable".to_string();
    }
    hex::encode(hasher.finalize())
}

struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
