//! Trainer tests: hand-checked merges, agreement with a naive BPE, determinism, errors, and the
//! document segmentation used for enormous documents.

use _rustbpe::split::segments;
use _rustbpe::{train, ChunkCounter, TrainError, SPLIT_PATTERN};
use fancy_regex::Regex;
use std::collections::HashMap;

fn learned(tokens: &[Vec<u8>]) -> Vec<&str> {
    tokens[256..].iter().map(|t| std::str::from_utf8(t).unwrap()).collect()
}

#[test]
fn hand_checked_single_word() {
    // "aaabdaaabac": aa occurs 4 times (overlapping) -> first; encoding left to right gives
    // [aa a b d aa a b a c], where (a,b) and (aa,a) both occur twice and (a,b) has the smaller ids;
    // then [aa ab d aa ab a c] makes (aa,ab) the only pair seen twice.
    let tokens = train(&["aaabdaaabac"], 259, SPLIT_PATTERN).unwrap();
    assert_eq!(learned(&tokens), ["aa", "ab", "aaab"]);
    assert_eq!(&tokens[..256], &(0..=255u8).map(|b| vec![b]).collect::<Vec<_>>()[..]);
}

#[test]
fn hand_checked_counts_across_chunks() {
    // Chunks "ab", " ab", " ab", " cd": (a,b) x3, then (' ',ab) x2, then the tie (' ',c) vs (c,d)
    // at 1 goes to the smaller ids (32 < 99), then (" c", d).
    let tokens = train(&["ab ab ab cd"], 260, SPLIT_PATTERN).unwrap();
    assert_eq!(learned(&tokens), ["ab", " ab", " c", " cd"]);
    // Nothing is left to merge: asking for one more is a clear error.
    assert_eq!(train(&["ab ab ab cd"], 261, SPLIT_PATTERN), Err(TrainError::NotEnoughText { learned: 4, wanted: 5 }));
    // An absurd vocab_size is the same clear error, not an allocation failure.
    let huge = 1usize << 40;
    assert_eq!(
        train(&["ab ab ab cd"], huge, SPLIT_PATTERN),
        Err(TrainError::NotEnoughText { learned: 4, wanted: huge - 256 })
    );
}

#[test]
fn chunks_never_merge_across_the_split() {
    // Chunks "a", "12", " a", "12": no pair (a,1) exists; "12" occurs twice, " a" once.
    let tokens = train(&["a12 a12"], 258, SPLIT_PATTERN).unwrap();
    assert_eq!(learned(&tokens), ["12", " a"]);
}

/// Transparent O(words x merges) BPE: recount every pair each step, merge left to right.
fn naive_bpe(docs: &[String], num_merges: usize) -> Vec<Vec<u8>> {
    let re = Regex::new(SPLIT_PATTERN).unwrap();
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for d in docs {
        for m in re.find_iter(d) {
            *counts.entry(m.unwrap().as_str()).or_default() += 1;
        }
    }
    let mut words: Vec<(Vec<u32>, i64)> =
        counts.into_iter().map(|(w, n)| (w.bytes().map(u32::from).collect(), n)).collect();
    let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for _ in 0..num_merges {
        let mut pairs: HashMap<(u32, u32), i64> = HashMap::new();
        for (w, n) in &words {
            for p in w.windows(2) {
                *pairs.entry((p[0], p[1])).or_default() += n;
            }
        }
        let Some((&best, _)) = pairs.iter().max_by_key(|(&p, &c)| (c, std::cmp::Reverse(p))) else { break };
        let id = tokens.len() as u32;
        let mut t = tokens[best.0 as usize].clone();
        t.extend_from_slice(&tokens[best.1 as usize]);
        tokens.push(t);
        for (w, _) in words.iter_mut() {
            let mut out = Vec::with_capacity(w.len());
            let mut i = 0;
            while i < w.len() {
                if i + 1 < w.len() && (w[i], w[i + 1]) == best {
                    out.push(id);
                    i += 2;
                } else {
                    out.push(w[i]);
                    i += 1;
                }
            }
            *w = out;
        }
    }
    tokens
}

/// Deterministic pseudo-random text over a small alphabet, with repeats, spaces, digits, newlines.
fn random_docs(n_docs: usize, len: usize, seed: u64) -> Vec<String> {
    let alphabet: Vec<char> = "aaabbcde  \n12'sé.".chars().collect();
    let mut x = seed;
    (0..n_docs)
        .map(|_| {
            (0..len)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    alphabet[(x >> 33) as usize % alphabet.len()]
                })
                .collect()
        })
        .collect()
}

#[test]
fn matches_naive_bpe() {
    let docs = random_docs(40, 300, 7);
    let fast = train(&docs, 256 + 150, SPLIT_PATTERN).unwrap();
    assert_eq!(fast, naive_bpe(&docs, 150));
}

#[test]
fn matches_naive_bpe_on_one_long_chunk() {
    // One long run of letters: one chunk whose pairs overlap heavily ("aaaa", "abab").
    let doc: String = random_docs(1, 3000, 3)[0].chars().filter(|c| c.is_alphabetic()).collect();
    let docs = vec![doc];
    let fast = train(&docs, 256 + 120, SPLIT_PATTERN).unwrap();
    assert_eq!(fast, naive_bpe(&docs, 120));
}

#[test]
fn deterministic_across_order_and_batching() {
    let docs = random_docs(60, 200, 11);
    let once = train(&docs, 400, SPLIT_PATTERN).unwrap();
    assert_eq!(once, train(&docs, 400, SPLIT_PATTERN).unwrap());
    let mut reversed = docs.clone();
    reversed.reverse();
    let mut counter = ChunkCounter::new(SPLIT_PATTERN).unwrap();
    for batch in reversed.chunks(7) {
        counter.add_batch(batch).unwrap();
    }
    assert_eq!(once, _rustbpe::finish(counter, 400).unwrap());
}

#[test]
fn errors() {
    assert_eq!(train(&["hello"], 255, SPLIT_PATTERN), Err(TrainError::VocabTooSmall(255)));
    let empty: [&str; 0] = [];
    assert_eq!(train(&empty, 300, SPLIT_PATTERN), Err(TrainError::EmptyInput));
    assert_eq!(train(&["", ""], 300, SPLIT_PATTERN), Err(TrainError::EmptyInput));
    let bad = train(&["hello"], 300, "(unclosed");
    assert!(matches!(bad, Err(TrainError::BadPattern(_))), "{bad:?}");
    assert!(bad.unwrap_err().to_string().contains("(unclosed"));
}

#[test]
fn segmenting_keeps_the_chunks() {
    let doc = "Hello world!\n  indented line\nnext's 123456 line\r\n\nx  \n\ty\n.\n end".repeat(50);
    let re = Regex::new(SPLIT_PATTERN).unwrap();
    let whole: Vec<&str> = re.find_iter(&doc).map(|m| m.unwrap().as_str()).collect();
    for target in [1, 5, 17, 100] {
        let pieces = segments(&doc, target);
        assert!(pieces.len() > 1);
        assert_eq!(pieces.concat(), doc);
        let split: Vec<&str> = pieces.iter().flat_map(|p| re.find_iter(p).map(|m| m.unwrap().as_str())).collect();
        assert_eq!(split, whole, "target {target}");
    }
}

#[test]
fn custom_pattern_failing_on_long_runs_is_an_error_not_a_panic() {
    // fancy-regex cannot backtrack through a million-letter run with this (non-SPEC) pattern.
    let r = train(&["x".repeat(1 << 20)], 300, r"\p{L}+(?!\d)|\s+");
    assert!(matches!(r, Err(TrainError::Regex(_))), "{r:?}");
}

#[test]
fn enormous_document() {
    // 4 MB in one document: a long unbroken run of letters, long whitespace runs, and many lines.
    let mut doc = random_docs(1, 1 << 20, 5)[0].clone();
    doc.push_str(&"x".repeat(1 << 20));
    doc.push_str(&" ".repeat(1 << 20));
    doc.push_str("end\n");
    let tokens = train(&[doc], 256 + 300, SPLIT_PATTERN).unwrap();
    assert_eq!(tokens.len(), 556);
    assert!(tokens.iter().any(|t| t.len() >= 64 && t.iter().all(|&b| b == b'x')));
}
