//! BPE merges learned from chunk counts.
//!
//! Every distinct chunk (a "word", with its count) is laid out once as a doubly linked list of
//! symbols in flat arrays. For each adjacent pair we keep its weighted count and the positions where
//! it occurs, so a merge touches only the occurrences of the merged pair, never whole words: the work
//! is proportional to the number of occurrences, even for one enormous chunk.
//!
//! The next merge comes from a max-heap with lazy invalidation: counts that drop leave stale (too
//! high) entries, which are re-pushed with the current count when they surface.
//!
//! Tie-breaking (deterministic): the highest count wins; among equal counts the pair (left, right)
//! with the smallest token ids wins, compared left id first. Counts do not depend on the order of
//! documents or threads, so the merges are identical from run to run.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rustc_hash::FxHashMap;

const NONE: u32 = u32::MAX;

type Pair = u64; // (left << 32) | right: orders like the tuple (left, right)

fn pair(a: u32, b: u32) -> Pair {
    ((a as u64) << 32) | b as u64
}

#[derive(Default)]
struct PairStats {
    count: i64,
    positions: Vec<u32>, // left-symbol positions, some stale (checked when used)
}

struct Symbols {
    sym: Vec<u32>,
    prev: Vec<u32>,
    next: Vec<u32>,
    word: Vec<u32>,
    word_count: Vec<i64>,
}

/// Learn `num_merges` merges. Returns the merged pairs in order; merge i creates token 256 + i.
/// Stops early when no pair is left (the caller decides whether that is an error).
pub fn learn_merges<'a>(chunks: impl IntoIterator<Item = (&'a [u8], u64)>, num_merges: usize) -> Vec<(u32, u32)> {
    let mut s = Symbols { sym: vec![], prev: vec![], next: vec![], word: vec![], word_count: vec![] };
    for (bytes, n) in chunks {
        if bytes.len() < 2 {
            continue; // no pairs, never changes
        }
        let w = s.word_count.len() as u32;
        s.word_count.push(n as i64);
        let start = s.sym.len() as u32;
        for (i, &b) in bytes.iter().enumerate() {
            let p = start + i as u32;
            s.sym.push(b as u32);
            s.prev.push(if i == 0 { NONE } else { p - 1 });
            s.next.push(if i + 1 == bytes.len() { NONE } else { p + 1 });
            s.word.push(w);
        }
    }
    debug_assert!(s.sym.len() < NONE as usize, "finish() rejects text this large");

    let mut stats: FxHashMap<Pair, PairStats> = FxHashMap::default();
    for p in 0..s.sym.len() {
        let q = s.next[p];
        if q != NONE {
            let e = stats.entry(pair(s.sym[p], s.sym[q as usize])).or_default();
            e.count += s.word_count[s.word[p] as usize];
            e.positions.push(p as u32);
        }
    }
    let mut heap: BinaryHeap<(i64, Reverse<Pair>)> = stats.iter().map(|(&k, v)| (v.count, Reverse(k))).collect();

    // Each merge consumes at least one symbol, so there are never more merges than symbols: a huge
    // num_merges (a mistyped vocab_size) must not reserve memory for merges that cannot happen.
    let mut merges = Vec::with_capacity(num_merges.min(s.sym.len()));
    let mut created: Vec<Pair> = Vec::new();
    while merges.len() < num_merges {
        let Some((count, Reverse(key))) = heap.pop() else { break };
        let current = stats.get(&key).map_or(0, |e| e.count);
        if current <= 0 {
            continue;
        }
        if current != count {
            heap.push((current, Reverse(key)));
            continue;
        }
        let (a, b) = ((key >> 32) as u32, key as u32);
        let new_id = 256 + merges.len() as u32;
        merges.push((a, b));
        let mut positions = stats.remove(&key).unwrap().positions;
        positions.sort_unstable(); // left to right inside each word, as the encoder merges

        created.clear();
        for p in positions {
            let p = p as usize;
            let q = s.next[p];
            // Stale entry: the pair at p changed since it was recorded (ids only grow, so a changed
            // pair never comes back to (a, b)).
            if s.sym[p] != a || q == NONE || s.sym[q as usize] != b {
                continue;
            }
            let q = q as usize;
            let w = s.word_count[s.word[p] as usize];
            let (l, r) = (s.prev[p], s.next[q]);
            if l != NONE {
                decrement(&mut stats, pair(s.sym[l as usize], a), w);
            }
            if r != NONE {
                decrement(&mut stats, pair(b, s.sym[r as usize]), w);
            }
            s.sym[p] = new_id;
            s.sym[q] = NONE;
            s.next[p] = r;
            if r != NONE {
                s.prev[r as usize] = p as u32;
                increment(&mut stats, &mut created, pair(new_id, s.sym[r as usize]), w, p as u32);
            }
            if l != NONE {
                increment(&mut stats, &mut created, pair(s.sym[l as usize], new_id), w, l);
            }
        }
        // New pairs all contain new_id, so their counts only rise during this merge: push each once.
        for &k in &created {
            if let Some(e) = stats.get(&k) {
                heap.push((e.count, Reverse(k)));
            }
        }
    }
    merges
}

fn decrement(stats: &mut FxHashMap<Pair, PairStats>, key: Pair, w: i64) {
    if let Some(e) = stats.get_mut(&key) {
        e.count -= w;
        if e.count <= 0 {
            stats.remove(&key); // frees its positions; a gone pair is skipped when it surfaces
        }
    }
}

fn increment(stats: &mut FxHashMap<Pair, PairStats>, created: &mut Vec<Pair>, key: Pair, w: i64, pos: u32) {
    let e = stats.entry(key).or_default();
    if e.positions.is_empty() {
        created.push(key);
    }
    e.count += w;
    e.positions.push(pos);
}

/// Token bytes for ranks 0..256+len(merges): the 256 single bytes, then each merge's concatenation.
pub fn token_bytes(merges: &[(u32, u32)]) -> Vec<Vec<u8>> {
    let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for &(a, b) in merges {
        let mut t = tokens[a as usize].clone();
        t.extend_from_slice(&tokens[b as usize]);
        tokens.push(t);
    }
    tokens
}
