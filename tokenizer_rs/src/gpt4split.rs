//! A hand-written scanner that splits text exactly as `SPLIT_PATTERN` does, in one linear pass.
//!
//! fancy-regex runs this pattern on a backtracking VM: it is the slow part of training, and it
//! fails outright ("max stack size exceeded") on runs of about a million letters or spaces. The
//! scanner below follows the pattern's alternatives in order (leftmost-first semantics) with the
//! same Unicode tables; tests check it against fancy-regex on random text.
//!
//! Every character starts a match (a letter, a number, whitespace or "other" always matches some
//! alternative), so the matches tile the text and the scanner only decides where each one ends.

use std::sync::OnceLock;

use regex_syntax::hir::{Class as HirClass, HirKind};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Class {
    Letter,  // \p{L}
    Number,  // \p{N}
    Newline, // \r or \n
    Space,   // any other \s
    Other,   // [^\s\p{L}\p{N}]
}

struct Tables {
    ascii: [Class; 128],
    letter: Vec<(char, char)>,
    number: Vec<(char, char)>,
    space: Vec<(char, char)>,
}

fn unicode_ranges(class: &str) -> Vec<(char, char)> {
    let hir = regex_syntax::Parser::new().parse(class).expect("valid class");
    match hir.kind() {
        HirKind::Class(HirClass::Unicode(c)) => c.ranges().iter().map(|r| (r.start(), r.end())).collect(),
        _ => unreachable!("{class} is a Unicode class"),
    }
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let mut t = Tables {
            ascii: [Class::Other; 128],
            letter: unicode_ranges(r"\p{L}"),
            number: unicode_ranges(r"\p{N}"),
            space: unicode_ranges(r"\s"),
        };
        for b in 0..128u8 {
            t.ascii[b as usize] = classify_slow(&t, b as char);
        }
        t
    })
}

fn in_ranges(ranges: &[(char, char)], c: char) -> bool {
    ranges
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                std::cmp::Ordering::Less
            } else if lo > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

fn classify_slow(t: &Tables, c: char) -> Class {
    if c == '\r' || c == '\n' {
        Class::Newline
    } else if in_ranges(&t.space, c) {
        Class::Space
    } else if in_ranges(&t.letter, c) {
        Class::Letter
    } else if in_ranges(&t.number, c) {
        Class::Number
    } else {
        Class::Other
    }
}

pub fn classify(c: char) -> Class {
    let t = tables();
    if c.is_ascii() {
        t.ascii[c as usize]
    } else {
        classify_slow(t, c)
    }
}

/// The character at byte `i` with its class and UTF-8 length, if any.
fn at(text: &str, i: usize) -> Option<(char, Class, usize)> {
    let c = text[i..].chars().next()?;
    Some((c, classify(c), c.len_utf8()))
}

fn class_at(text: &str, i: usize) -> Option<Class> {
    at(text, i).map(|(_, cls, _)| cls)
}

/// End of the run of characters of class `cls` starting at byte `i`.
fn skip(text: &str, mut i: usize, cls: Class) -> usize {
    while let Some((_, c, n)) = at(text, i) {
        if c != cls {
            break;
        }
        i += n;
    }
    i
}

/// Case-insensitive matches of the contraction letters; 'ſ' (long s) folds to 's'.
pub fn folds_to(c: char, lower: char) -> bool {
    c.to_ascii_lowercase() == lower || (lower == 's' && c == 'ſ')
}

/// `'(?i:[sdmt]|ll|ve|re)` with the quote already at `i - 1`: the end of the match, if any.
fn contraction(text: &str, i: usize) -> Option<usize> {
    let mut cs = text[i..].chars();
    let c1 = cs.next()?;
    if ['s', 'd', 'm', 't'].iter().any(|&l| folds_to(c1, l)) {
        return Some(i + c1.len_utf8());
    }
    let c2 = cs.next()?;
    let two = [('l', 'l'), ('v', 'e'), ('r', 'e')];
    two.iter().any(|&(a, b)| folds_to(c1, a) && folds_to(c2, b)).then(|| i + c1.len_utf8() + c2.len_utf8())
}

/// Whitespace starting at `i` (no letter follows a non-newline first character):
/// `\s*[\r\n]` up to the run's last newline, else `\s+(?!\S)` leaving the run's last character
/// to the next token, else `\s+`.
fn whitespace(text: &str, i: usize) -> usize {
    let (mut j, mut last_newline_end, mut last_start) = (i, None, i);
    while let Some((_, cls, n)) = at(text, j) {
        match cls {
            Class::Newline => last_newline_end = Some(j + n),
            Class::Space => {}
            _ => break,
        }
        last_start = j;
        j += n;
    }
    if let Some(end) = last_newline_end {
        end
    } else if j == text.len() || last_start == i {
        j
    } else {
        last_start
    }
}

/// End (byte offset) of the match starting at byte `i < text.len()`.
fn match_end(text: &str, i: usize) -> usize {
    let (c, cls, n) = at(text, i).expect("i inside text");
    let j = i + n;
    if c == '\'' {
        if let Some(end) = contraction(text, j) {
            return end;
        }
    }
    // `[^\r\n\p{L}\p{N}]?+\p{L}+`
    if cls == Class::Letter {
        return skip(text, j, Class::Letter);
    }
    if matches!(cls, Class::Space | Class::Other) && class_at(text, j) == Some(Class::Letter) {
        return skip(text, j, Class::Letter);
    }
    match cls {
        // `\p{N}{1,2}`
        Class::Number => match at(text, j) {
            Some((_, Class::Number, n2)) => j + n2,
            _ => j,
        },
        // ` ?[^\s\p{L}\p{N}]++[\r\n]*`
        Class::Other => skip(text, skip(text, j, Class::Other), Class::Newline),
        Class::Space if c == ' ' && class_at(text, j) == Some(Class::Other) => {
            skip(text, skip(text, j, Class::Other), Class::Newline)
        }
        _ => whitespace(text, i),
    }
}

/// The chunks of `text`, in order.
pub fn split(text: &str) -> impl Iterator<Item = &str> {
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= text.len() {
            return None;
        }
        let end = match_end(text, i);
        let chunk = &text[i..end];
        i = end;
        Some(chunk)
    })
}
