//! Pre-splitting documents into chunks (the linear scanner for SPLIT_PATTERN, fancy-regex for any
//! other pattern) and counting the distinct chunks, in parallel over the documents of a batch.

use fancy_regex::Regex;
use rayon::prelude::*;
use rustc_hash::FxHashMap;

use crate::{gpt4split, TrainError};

/// SPEC §5: GPT-4's pattern with numbers in groups of 1-2 digits.
pub const SPLIT_PATTERN: &str =
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// Documents longer than this are cut into pieces so that one enormous document still spreads
/// over all cores (SPLIT_PATTERN only: `segments` is exact for it, not for any pattern).
const SEGMENT_BYTES: usize = 1 << 20;

/// Accumulates chunk -> count over every batch of documents it is given.
pub struct ChunkCounter {
    splitter: Splitter,
    counts: FxHashMap<String, u64>,
}

enum Splitter {
    Spec,         // SPLIT_PATTERN itself: the linear hand-written scanner
    Regex(Regex), // any other pattern
}

impl ChunkCounter {
    pub fn new(pattern: &str) -> Result<Self, TrainError> {
        let splitter = if pattern == SPLIT_PATTERN {
            Splitter::Spec
        } else {
            Splitter::Regex(Regex::new(pattern).map_err(|e| TrainError::BadPattern(format!("{pattern:?}: {e}")))?)
        };
        Ok(Self { splitter, counts: FxHashMap::default() })
    }

    /// Split and count one batch of documents on all cores, then fold it into the totals.
    pub fn add_batch<S: AsRef<str> + Sync>(&mut self, docs: &[S]) -> Result<(), TrainError> {
        let splitter = &self.splitter;
        let target = if matches!(splitter, Splitter::Spec) { SEGMENT_BYTES } else { usize::MAX };
        let segments: Vec<&str> = docs.iter().flat_map(|d| segments(d.as_ref(), target)).collect();
        // Keys borrow from the batch: no allocation per chunk while counting.
        let local = segments
            .par_iter()
            .try_fold(FxHashMap::<&str, u64>::default, |mut map, seg| {
                match splitter {
                    Splitter::Spec => {
                        for chunk in gpt4split::split(seg) {
                            *map.entry(chunk).or_insert(0) += 1;
                        }
                    }
                    Splitter::Regex(regex) => {
                        for m in regex.find_iter(seg) {
                            let m = m.map_err(|e| TrainError::Regex(e.to_string()))?;
                            *map.entry(m.as_str()).or_insert(0) += 1;
                        }
                    }
                }
                Ok(map)
            })
            .try_reduce(FxHashMap::default, |a, b| {
                let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
                for (k, v) in small {
                    *big.entry(k).or_insert(0) += v;
                }
                Ok(big)
            })?;
        for (chunk, n) in local {
            match self.counts.get_mut(chunk) {
                Some(c) => *c += n,
                None => {
                    self.counts.insert(chunk.to_owned(), n);
                }
            }
        }
        Ok(())
    }

    pub fn into_counts(self) -> FxHashMap<String, u64> {
        self.counts
    }
}

/// Cut `doc` into pieces of at least `target` bytes, only right after a '\n' that is followed by
/// a non-whitespace character. No alternative of the split pattern can match across such a point
/// and none behaves differently when the text ends there, so splitting the pieces separately gives
/// exactly the chunks of splitting the whole document.
pub fn segments(doc: &str, target: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    while doc.len() - start > target {
        let mut cut = None;
        let mut from = start + target;
        while let Some(i) = doc.as_bytes()[from..].iter().position(|&b| b == b'\n') {
            let p = from + i + 1;
            match doc[p..].chars().next() {
                Some(c) if !c.is_whitespace() => {
                    cut = Some(p);
                    break;
                }
                Some(_) => from = p,
                None => break,
            }
        }
        let Some(p) = cut else { break };
        out.push(&doc[start..p]);
        start = p;
    }
    out.push(&doc[start..]);
    out
}
