//! Byte-level BPE trainer for nanochat_jax: split documents with the SPEC §5 regex, count the
//! chunks in parallel, learn merges incrementally, and hand back tiktoken mergeable ranks.

pub mod bpe;
pub mod gpt4split;
#[cfg(feature = "pyo3")]
mod python;
pub mod split;

use std::fmt;

pub use split::{ChunkCounter, SPLIT_PATTERN};

#[derive(Debug, PartialEq)]
pub enum TrainError {
    VocabTooSmall(usize),
    EmptyInput,
    BadPattern(String),
    Regex(String),
    NotEnoughText { learned: usize, wanted: usize },
    TooLarge(usize),
}

impl fmt::Display for TrainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::VocabTooSmall(n) => write!(f, "vocab_size must be at least 256 (one token per byte), got {n}"),
            Self::EmptyInput => write!(f, "no training text: the documents were empty or there were none"),
            Self::BadPattern(e) => write!(f, "invalid split pattern {e}"),
            Self::Regex(e) => write!(f, "split pattern failed while matching: {e}"),
            Self::NotEnoughText { learned, wanted } => write!(
                f,
                "the training text only supports {learned} merges but vocab_size needs {wanted}: \
                 give more text or a vocab_size of at most {}",
                256 + learned
            ),
            Self::TooLarge(n) => write!(
                f,
                "the distinct chunks of the training text hold {n} bytes, more than the trainer's 2^32 - 1: \
                 train on less text (max_chars)"
            ),
        }
    }
}

impl std::error::Error for TrainError {}

pub fn check_vocab_size(vocab_size: usize) -> Result<(), TrainError> {
    if vocab_size < 256 {
        return Err(TrainError::VocabTooSmall(vocab_size));
    }
    Ok(())
}

/// Learn `vocab_size - 256` merges from the counted chunks; returns the bytes of every token,
/// indexed by rank (= token id).
pub fn finish(counter: ChunkCounter, vocab_size: usize) -> Result<Vec<Vec<u8>>, TrainError> {
    check_vocab_size(vocab_size)?;
    let counts = counter.into_counts();
    if counts.is_empty() {
        return Err(TrainError::EmptyInput);
    }
    let total: usize = counts.keys().map(String::len).sum();
    if total >= u32::MAX as usize {
        return Err(TrainError::TooLarge(total)); // symbol positions are u32
    }
    let wanted = vocab_size - 256;
    let merges = bpe::learn_merges(counts.iter().map(|(k, &n)| (k.as_bytes(), n)), wanted);
    if merges.len() < wanted {
        return Err(TrainError::NotEnoughText { learned: merges.len(), wanted });
    }
    Ok(bpe::token_bytes(&merges))
}

/// Train on documents held in memory (one batch).
pub fn train<S: AsRef<str> + Sync>(docs: &[S], vocab_size: usize, pattern: &str) -> Result<Vec<Vec<u8>>, TrainError> {
    check_vocab_size(vocab_size)?;
    let mut counter = ChunkCounter::new(pattern)?;
    counter.add_batch(docs)?;
    finish(counter, vocab_size)
}
