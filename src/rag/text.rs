//! Words and stems, shared by indexing, querying and highlighting, so all three agree.
//!
//! Russian and English are stemmed with Snowball (rust-stemmers): a Cyrillic word gets the
//! Russian stemmer, anything else the English one, so a mixed document works and
//! "воркеры", "воркеров", "воркер" all meet at one stem.

use rust_stemmers::{Algorithm, Stemmer};

/// The language a question is written in, for the prompt and the UI (declared with the config,
/// whose `[embed] languages` names it).
pub use crate::config::app::Language;

/// Lower-cased words with their byte ranges in `text` (letters and digits; everything else splits).
pub fn words(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(move |w| (w.as_ptr() as usize - text.as_ptr() as usize, w))
}

fn is_cyrillic(word: &str) -> bool {
    word.chars().any(|c| matches!(c, '\u{0400}'..='\u{04FF}'))
}

/// Stems words; holds both stemmers so callers build them once.
pub struct Stems {
    english: Stemmer,
    russian: Stemmer,
}

impl Default for Stems {
    fn default() -> Self {
        Stems {
            english: Stemmer::create(Algorithm::English),
            russian: Stemmer::create(Algorithm::Russian),
        }
    }
}

impl Stems {
    /// The stem of one word (lower-cased; `ё` folded to `е`).
    pub fn stem(&self, word: &str) -> String {
        let lower = word.to_lowercase().replace('ё', "е");
        if is_cyrillic(&lower) {
            self.russian.stem(&lower).into_owned()
        } else {
            self.english.stem(&lower).into_owned()
        }
    }

    /// Every word's stem, space-separated: what the lexical index stores and searches.
    pub fn stem_text(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        for (_, word) in words(text) {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(&self.stem(word));
        }
        out
    }

    /// Distinct stems of a query, minus stop words, in order of appearance.
    pub fn query_stems(&self, query: &str) -> Vec<String> {
        let mut seen = Vec::new();
        for (_, word) in words(query) {
            let lower = word.to_lowercase();
            if is_stop_word(&lower) {
                continue;
            }
            let stem = self.stem(&lower);
            if !stem.is_empty() && !seen.contains(&stem) {
                seen.push(stem);
            }
        }
        seen
    }
}

/// The question's language, from the script of its words outside code and identifiers:
/// `inline code`, fenced blocks, and tokens such as `--sort`, `ls(1)`, `foo.conf`, `snake_case`,
/// `camelCase`, `HUP` or `v2` say nothing about the language the question is written in.
/// Russian questions often name Latin-script commands and products, so a question with any
/// Cyrillic word is Russian unless its Latin words are more than twice as many; no Cyrillic
/// word at all is English.
pub fn detect_language(text: &str) -> Language {
    let (cyrillic, latin) = prose_words(text);
    if cyrillic > 0 && cyrillic * 2 >= latin {
        Language::Russian
    } else {
        Language::English
    }
}

/// The language a passage is mostly written in (by its words' script, code included), or
/// `None` when it has no letters.
pub fn script_of(text: &str) -> Option<Language> {
    let (mut cyrillic, mut latin) = (0usize, 0usize);
    for (_, word) in words(text) {
        if is_cyrillic(word) {
            cyrillic += 1;
        } else if word.chars().any(|c| c.is_ascii_alphabetic()) {
            latin += 1;
        }
    }
    match (cyrillic, latin) {
        (0, 0) => None,
        (c, l) if c >= l => Some(Language::Russian),
        _ => Some(Language::English),
    }
}

/// (Cyrillic, Latin) words of `text` that are prose: outside backticks and not identifiers.
fn prose_words(text: &str) -> (usize, usize) {
    let (mut cyrillic, mut latin) = (0usize, 0usize);
    // Odd pieces between backticks are code (inline spans and fenced blocks alike).
    for (i, piece) in text.split('`').enumerate() {
        if i % 2 == 1 {
            continue;
        }
        for token in piece.split_whitespace() {
            let token = token.trim_matches(|c: char| {
                matches!(
                    c,
                    '.' | ',' | ';' | ':' | '!' | '?' | '"' | '\'' | '«' | '»' | '(' | ')'
                )
            });
            if token.is_empty() || is_identifier(token) {
                continue;
            }
            if is_cyrillic(token) {
                cyrillic += 1;
            } else if token.chars().all(|c| c.is_ascii_alphabetic() || c == '-') {
                latin += 1;
            }
        }
    }
    (cyrillic, latin)
}

/// Code-like tokens: options, paths, calls, names with digits or `_`, camelCase, ALLCAPS.
fn is_identifier(token: &str) -> bool {
    let inner = |c: char| {
        matches!(
            c,
            '_' | '.'
                | '/'
                | '\\'
                | '='
                | '('
                | ')'
                | '<'
                | '>'
                | '$'
                | '{'
                | '}'
                | '['
                | ']'
                | '@'
                | '#'
                | ':'
        )
    };
    let letters: Vec<char> = token.chars().filter(|c| c.is_alphabetic()).collect();
    token.starts_with('-')
        || token.chars().any(|c| inner(c) || c.is_ascii_digit())
        || (letters.len() >= 2 && letters.iter().all(|c| c.is_uppercase()))
        || token.chars().skip(1).any(char::is_uppercase) && token.chars().any(char::is_lowercase)
}

/// Very common words that carry no meaning for retrieval.
pub fn is_stop_word(lower: &str) -> bool {
    const EN: &[&str] = &[
        "a", "an", "the", "is", "are", "was", "were", "be", "to", "of", "in", "on", "for", "and",
        "or", "how", "what", "do", "does", "i", "you", "it", "this", "that", "with", "can", "my",
        "me", "by", "at", "as", "from", "which", "who", "why", "when", "where",
    ];
    const RU: &[&str] = &[
        "и",
        "в",
        "во",
        "на",
        "с",
        "со",
        "к",
        "по",
        "о",
        "об",
        "из",
        "у",
        "за",
        "от",
        "до",
        "не",
        "ли",
        "как",
        "что",
        "это",
        "мне",
        "я",
        "ты",
        "вы",
        "он",
        "она",
        "они",
        "а",
        "но",
        "же",
        "для",
        "так",
        "где",
        "когда",
        "почему",
        "какой",
        "какие",
        "можно",
        "ли",
    ];
    EN.contains(&lower) || RU.contains(&lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn russian_word_forms_share_a_stem() {
        let s = Stems::default();
        assert_eq!(s.stem("воркеры"), s.stem("воркеров"));
        assert_eq!(s.stem("перезагрузить"), s.stem("перезагрузите"));
        assert_eq!(s.stem("Ёлка"), s.stem("елки"));
    }

    #[test]
    fn english_word_forms_share_a_stem() {
        let s = Stems::default();
        assert_eq!(s.stem("reloading"), s.stem("reloads"));
        assert_eq!(s.stem("Workers"), s.stem("worker"));
    }

    #[test]
    fn query_stems_drop_stop_words_and_duplicates() {
        let s = Stems::default();
        assert_eq!(
            s.query_stems("How do I reload the workers? reload!"),
            vec![s.stem("reload"), s.stem("workers")]
        );
        assert_eq!(
            s.query_stems("как перезагрузить воркеры"),
            vec![s.stem("перезагрузить"), s.stem("воркеры")]
        );
    }

    #[test]
    fn words_carry_byte_offsets() {
        let text = "Привет, world!";
        let found: Vec<(usize, &str)> = words(text).collect();
        assert_eq!(found, vec![(0, "Привет"), (14, "world")]);
    }

    #[test]
    fn language_detection() {
        assert_eq!(
            detect_language("как перезагрузить воркеры?"),
            Language::Russian
        );
        assert_eq!(
            detect_language("how do I reload the workers?"),
            Language::English
        );
        assert_eq!(detect_language("что такое HUP?"), Language::Russian);
    }

    #[test]
    fn language_detection_ignores_code_and_identifiers() {
        // Latin technical terms in a Russian question.
        assert_eq!(
            detect_language("как настроить nginx reverse proxy для ragpool?"),
            Language::Russian
        );
        assert_eq!(
            detect_language("что делает `ls --sort=time -l /var/log/nginx/access.log`?"),
            Language::Russian
        );
        assert_eq!(
            detect_language("почему SIGHUP и worker_connections не работают в systemd unit"),
            Language::Russian
        );
        // A Russian word quoted in an English question, and English with code.
        assert_eq!(
            detect_language("what does the word «перезагрузка» mean in the manual?"),
            Language::English
        );
        assert_eq!(
            detect_language("how do I run `перезапуск.sh` nightly?"),
            Language::English
        );
        assert_eq!(detect_language("HUP"), Language::English);
    }

    #[test]
    fn a_passage_script_is_its_words_majority() {
        assert_eq!(
            script_of("ls - вывести список файлов, см. --sort"),
            Some(Language::Russian)
        );
        assert_eq!(
            script_of("ls lists files; см. also"),
            Some(Language::English)
        );
        assert_eq!(script_of("12 34 --"), None);
    }
}
