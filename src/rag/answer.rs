//! Pure answer-building: the prompt and the extractive fallback.
//! No I/O here, so every rule is unit-tested directly.

use std::fmt::Write as _;

use super::text::{script_of, words, Language, Stems};
use super::Hit;

/// The system prompt: answer from the numbered passages only, cite them, in the question's
/// language. The citation rule comes with an example: a small model copies a pattern it was
/// shown far more reliably than it follows a rule.
pub fn system_prompt(language: Language) -> String {
    let language = language_name(language);
    format!(
        "You answer questions for the colleagues of an organisation using only the numbered passages \
         from its documents. After each sentence, put the number of the passage it comes from in \
         square brackets, for example: \"Workers are reloaded with the HUP signal [2].\" If the \
         passages do not contain the answer, say so briefly instead of guessing. Answer in \
         {language}, concisely, and stop when the question is answered."
    )
}

fn language_name(language: Language) -> &'static str {
    match language {
        Language::Russian => "Russian",
        Language::English => "English",
    }
}

/// The user message: numbered passages, each labelled once (`[n] title`, then its text without
/// a leading heading that only repeats the title), then the question and a reminder of the
/// language and the citations (small models heed the end of the prompt most).
pub fn user_prompt(question: &str, hits: &[Hit], language: Language) -> String {
    let mut out = String::from("Passages:\n");
    for (i, hit) in hits.iter().enumerate() {
        let _ = writeln!(
            out,
            "\n[{}] {}\n{}",
            i + 1,
            hit.title.trim(),
            without_title_heading(&hit.text, &hit.title)
        );
    }
    let _ = write!(
        out,
        "\nQuestion: {}\n\nAnswer in {}, citing the passages as [n].",
        question.trim(),
        language_name(language)
    );
    out
}

/// `text` trimmed, minus a first line that is a Markdown heading saying only `title`.
fn without_title_heading<'a>(text: &'a str, title: &str) -> &'a str {
    let text = text.trim();
    let (first, rest) = text.split_once('\n').unwrap_or((text, ""));
    let heading = first.trim_start_matches('#');
    if heading.len() < first.len() && heading.trim() == title.trim() {
        rest.trim()
    } else {
        text
    }
}

/// Up to `n` passages for an extractive answer, those in the question's language first (each
/// keeps its number, so `[n]` still names its source): an English question does not open
/// with a Russian passage because its translation ranked first.
fn extract_order(hits: &[Hit], language: Language, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..hits.len()).collect();
    order.sort_by_key(|&i| (script_of(&hits[i].text).is_some_and(|s| s != language), i));
    order.truncate(n);
    order
}

/// Why there is no generated answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtractiveReason {
    /// No language model is configured.
    NoLlm,
    /// The language model could not be reached or failed.
    LlmDown,
    /// The server runs but does not have this model; `pull`: an Ollama server (say how).
    ModelMissing { model: String, pull: bool },
}

/// An answer made of the best passages' best sentences, matched words in **bold**, labelled.
pub fn extractive_answer(
    question: &str,
    hits: &[Hit],
    stems: &Stems,
    why: ExtractiveReason,
    language: Language,
) -> String {
    let query: Vec<String> = stems.query_stems(question);
    let mut out = String::new();
    let missing;
    let label = match (language, &why) {
        (Language::Russian, ExtractiveReason::ModelMissing { model, pull }) => {
            let how = if *pull {
                format!(" (ollama pull {model})")
            } else {
                String::new()
            };
            missing = format!(
                "Языковой модели {model} нет на её сервере{how}, поэтому вот самые подходящие фрагменты документов:"
            );
            missing.as_str()
        }
        (Language::English, ExtractiveReason::ModelMissing { model, pull }) => {
            let how = if *pull {
                format!(" (it is not pulled: ollama pull {model})")
            } else {
                String::new()
            };
            missing = format!(
                "The language model {model} is not available on its server{how}, so here are the most relevant passages:"
            );
            missing.as_str()
        }
        (Language::Russian, ExtractiveReason::NoLlm) => {
            "Языковая модель не настроена, поэтому вот самые подходящие фрагменты документов:"
        }
        (Language::Russian, ExtractiveReason::LlmDown) => {
            "Языковая модель сейчас недоступна, поэтому вот самые подходящие фрагменты документов:"
        }
        (Language::English, ExtractiveReason::NoLlm) => {
            "No language model is configured, so here are the most relevant passages:"
        }
        (Language::English, ExtractiveReason::LlmDown) => {
            "The language model is unavailable right now, so here are the most relevant passages:"
        }
    };
    out.push_str(label);
    out.push('\n');
    if hits.is_empty() {
        out.push('\n');
        out.push_str(nothing_found(language));
        return out;
    }
    for i in extract_order(hits, language, 3) {
        let hit = &hits[i];
        let excerpt = best_excerpt(&hit.text, &query, stems, 320);
        let _ = write!(
            out,
            "\n[{}] {}\n",
            i + 1,
            highlight(&excerpt, &query, stems)
        );
    }
    out
}

/// What to say when no passage matches the question.
pub fn nothing_found(language: Language) -> &'static str {
    match language {
        Language::Russian => "Ничего подходящего в документах не нашлось.",
        Language::English => "Nothing in the documents matches the question.",
    }
}

/// The sentence run (up to `max_chars`) with the most query stems.
fn best_excerpt(text: &str, query: &[String], stems: &Stems, max_chars: usize) -> String {
    let sentences: Vec<&str> = sentences(text)
        // Markdown heading markers and list bullets are layout, not words.
        .map(|s| s.trim().trim_start_matches(['#', '-', '*', '>']).trim())
        .filter(|s| !s.is_empty())
        .collect();
    let score = |s: &str| {
        words(s)
            .filter(|(_, w)| query.contains(&stems.stem(w)))
            .count()
    };
    let best = (0..sentences.len())
        .max_by_key(|&i| (score(sentences[i]), usize::MAX - i))
        .unwrap_or(0);
    let mut excerpt = String::new();
    for sentence in sentences.iter().skip(best) {
        if !excerpt.is_empty() && excerpt.chars().count() + sentence.chars().count() > max_chars {
            break;
        }
        if !excerpt.is_empty() {
            excerpt.push(' ');
        }
        excerpt.push_str(sentence);
    }
    if excerpt.chars().count() > max_chars {
        excerpt = excerpt.chars().take(max_chars).collect::<String>() + "…";
    }
    excerpt
}

/// Splits after `.`, `!` or `?` followed by white space, and at line ends, so `backup.sh` and
/// `3.5` stay whole.
fn sentences(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut chars = rest.char_indices().peekable();
        let mut end = rest.len();
        while let Some((i, c)) = chars.next() {
            let next_is_space = chars.peek().is_none_or(|(_, n)| n.is_whitespace());
            if c == '\n' || (matches!(c, '.' | '!' | '?') && next_is_space) {
                end = i + c.len_utf8();
                break;
            }
        }
        let (sentence, tail) = rest.split_at(end);
        rest = tail;
        Some(sentence)
    })
}

/// Wraps every word whose stem is in the query in `**`.
pub fn highlight(text: &str, query: &[String], stems: &Stems) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut last = 0;
    for (start, word) in words(text) {
        if query.contains(&stems.stem(word)) {
            out.push_str(&text[last..start]);
            out.push_str("**");
            out.push_str(word);
            out.push_str("**");
            last = start + word.len();
        }
    }
    out.push_str(&text[last..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(doc: &str, position: usize, text: &str) -> Hit {
        Hit {
            document_id: doc.into(),
            title: format!("Title {doc}"),
            source: format!("{doc}.md"),
            position,
            text: text.into(),
            score: 1.0,
        }
    }

    #[test]
    fn sentences_keep_file_names_and_numbers_whole() {
        let found: Vec<&str> = sentences("Run backup.sh nightly. Version 3.5 works!\nNext line")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        assert_eq!(
            found,
            vec!["Run backup.sh nightly.", "Version 3.5 works!", "Next line"]
        );
    }

    #[test]
    fn prompt_numbers_passages_and_names_the_language() {
        let hits = vec![
            hit("a", 0, "Send HUP to reload."),
            hit("b", 1, "TERM stops."),
        ];
        let user = user_prompt("How do I reload?", &hits, Language::English);
        assert!(user.contains("[1] Title a\nSend HUP to reload."), "{user}");
        assert!(user.contains("[2] Title b\nTERM stops."), "{user}");
        assert!(user.contains("Question: How do I reload?"));
        assert!(user.ends_with("Answer in English, citing the passages as [n]."));
        assert!(system_prompt(Language::Russian).contains("Answer in Russian"));
        assert!(system_prompt(Language::English).contains("[2]"));
    }

    #[test]
    fn a_passage_is_labelled_once() {
        let hits = vec![
            hit("a", 0, "# Title a\n\nSend HUP to reload."),
            hit("b", 0, "## Signals\nTERM stops."),
        ];
        let user = user_prompt("q", &hits, Language::English);
        assert_eq!(user.matches("Title a").count(), 1, "{user}");
        assert!(user.contains("[1] Title a\nSend HUP to reload."), "{user}");
        // A heading that says more than the title stays.
        assert!(
            user.contains("[2] Title b\n## Signals\nTERM stops."),
            "{user}"
        );
    }

    #[test]
    fn extractive_answers_start_with_passages_in_the_question_language() {
        let stems = Stems::default();
        let hits = vec![
            hit("ru", 0, "Сигнал HUP перезагружает воркеры."),
            hit("en", 0, "The HUP signal reloads the workers."),
        ];
        let answer = extractive_answer(
            "how do I reload the workers?",
            &hits,
            &stems,
            ExtractiveReason::NoLlm,
            Language::English,
        );
        let en = answer
            .find("[2] The HUP")
            .expect("the English passage, numbered as its source");
        let ru = answer.find("[1] Сигнал").expect("the Russian one after it");
        assert!(en < ru, "{answer}");
    }

    #[test]
    fn extractive_answer_highlights_word_forms_and_is_labelled() {
        let stems = Stems::default();
        let hits = vec![hit(
            "a",
            0,
            "Вступление. Чтобы перезагрузить воркеры, отправьте мастеру сигнал HUP. Прочее.",
        )];
        let answer = extractive_answer(
            "как перезагрузить воркер?",
            &hits,
            &stems,
            ExtractiveReason::LlmDown,
            Language::Russian,
        );
        assert!(
            answer.starts_with("Языковая модель сейчас недоступна"),
            "{answer}"
        );
        assert!(answer.contains("**перезагрузить** **воркеры**"), "{answer}");
        assert!(
            answer.contains("[1] Чтобы"),
            "best sentence first: {answer}"
        );
        let none = extractive_answer("q", &[], &stems, ExtractiveReason::NoLlm, Language::English);
        assert!(none.contains("Nothing in the documents matches"));
        let missing = extractive_answer(
            "q",
            &[],
            &stems,
            ExtractiveReason::ModelMissing {
                model: "qwen3".into(),
                pull: true,
            },
            Language::English,
        );
        assert!(
            missing.starts_with("The language model qwen3 is not available")
                && missing.contains("ollama pull qwen3"),
            "{missing}"
        );
    }
}
