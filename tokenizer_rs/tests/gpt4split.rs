//! The hand-written scanner must split exactly like fancy-regex running SPLIT_PATTERN.

use _rustbpe::gpt4split::{classify, folds_to, split, Class};
use _rustbpe::SPLIT_PATTERN;
use fancy_regex::Regex;

fn regex_split(re: &Regex, text: &str) -> Vec<String> {
    re.find_iter(text).map(|m| m.unwrap().as_str().to_owned()).collect()
}

#[test]
fn agrees_with_the_regex_on_random_text() {
    let re = Regex::new(SPLIT_PATTERN).unwrap();
    // Every kind of character the pattern distinguishes, with the awkward ones: quotes and the
    // contraction letters in both cases (and 'ſ', which folds to 's'), \r \n \t, a no-break space,
    // U+2028, non-ASCII letters, a combining accent (not a letter), '²' and 'Ⅳ' (numbers), emoji.
    let alphabet: Vec<char> =
        "''''sSſdDmMtTlLvVeErRxyzé中 \u{a0}\u{2028}\r\n\t  0123²Ⅳ.,!?()-\u{301}😀".chars().collect();
    let mut x: u64 = 1;
    for len in [1usize, 2, 3, 5, 8, 20, 100] {
        for _ in 0..3000 {
            let text: String = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    alphabet[(x >> 33) as usize % alphabet.len()]
                })
                .collect();
            let ours: Vec<&str> = split(&text).collect();
            assert_eq!(ours, regex_split(&re, &text), "text {text:?}");
        }
    }
}

#[test]
fn agrees_with_the_regex_on_prose() {
    let re = Regex::new(SPLIT_PATTERN).unwrap();
    let text = "Hello world! It's 2024, we'LL see: the café's 12345 ½ items.\\n\r\n  \n\tIndented  (paren) \
                ...dots   \n\n\nend 'quote' I'VE we're they'd  \u{a0}trailing   ";
    assert_eq!(split(text).collect::<Vec<_>>(), regex_split(&re, text));
}

#[test]
fn classes_match_the_regex_tables() {
    // Every code point, against the regex engine's own classes.
    let letter = Regex::new(r"^\p{L}$").unwrap();
    let number = Regex::new(r"^\p{N}$").unwrap();
    let space = Regex::new(r"^\s$").unwrap();
    for c in (0..0x11_0000u32).step_by(7).filter_map(char::from_u32) {
        let s = c.to_string();
        let expected = if c == '\r' || c == '\n' {
            Class::Newline
        } else if space.is_match(&s).unwrap() {
            Class::Space
        } else if letter.is_match(&s).unwrap() {
            Class::Letter
        } else if number.is_match(&s).unwrap() {
            Class::Number
        } else {
            Class::Other
        };
        assert_eq!(classify(c), expected, "{c:?} U+{:04X}", c as u32);
    }
}

#[test]
fn contraction_folding_is_complete() {
    // Every code point that the regex's case-insensitive contraction letters accept, and no other.
    for lower in ['s', 'd', 'm', 't', 'l', 'v', 'e', 'r'] {
        let re = Regex::new(&format!("^(?i:{lower})$")).unwrap();
        for c in (0..0x11_0000u32).filter_map(char::from_u32) {
            assert_eq!(folds_to(c, lower), re.is_match(&c.to_string()).unwrap(), "{c:?} vs {lower}");
        }
    }
}

#[test]
fn million_character_runs() {
    // The regex VM gives up on these; the scanner does not.
    assert_eq!(split(&"x".repeat(1 << 20)).count(), 1);
    let spaces = " ".repeat(1 << 20) + "x";
    assert_eq!(split(&spaces).map(str::len).collect::<Vec<_>>(), [(1 << 20) - 1, 2]);
    assert_eq!(split(&"\n".repeat(1 << 20)).count(), 1);
}
