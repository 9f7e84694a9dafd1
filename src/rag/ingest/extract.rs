//! Text extraction: the bytes of one format -> (title, text).
//!
//! Owns decoding (UTF-8, with or without a byte-order mark; UTF-16 with one), line-ending
//! normalisation, HTML to text (scripts, styles and `<head>` dropped) and PDF text layers. It
//! must not touch the file system: callers read the bytes and enforce the size limit. Parsers
//! of untrusted input that may panic (pdf-extract) run under `catch_unwind`, so a hostile PDF
//! becomes an error, not a dead worker.

use std::panic::{catch_unwind, AssertUnwindSafe};

use super::{Format, IngestError};

/// HTML is rendered without wrapping: a line break in the middle of a sentence would become a
/// preferred place for the chunker to cut.
const HTML_RENDER_WIDTH: usize = 10_000;

/// Longest title kept, in characters; a longer "title" is probably a paragraph.
const MAX_TITLE_CHARS: usize = 200;

/// Decodes text bytes: UTF-8 (a byte-order mark is dropped), or UTF-16 when it starts with a
/// byte-order mark. Line endings become `\n`.
pub fn decode_text(name: &str, bytes: &[u8]) -> Result<String, IngestError> {
    let text = if let Some(rest) = bytes.strip_prefix(b"\xEF\xBB\xBF") {
        utf8(name, rest, 3)?
    } else if let Some(rest) = bytes.strip_prefix(b"\xFF\xFE") {
        utf16(name, rest, u16::from_le_bytes)?
    } else if let Some(rest) = bytes.strip_prefix(b"\xFE\xFF") {
        utf16(name, rest, u16::from_be_bytes)?
    } else {
        utf8(name, bytes, 0)?
    };
    Ok(normalise_newlines(&text))
}

fn utf8(name: &str, bytes: &[u8], skipped: usize) -> Result<String, IngestError> {
    match std::str::from_utf8(bytes) {
        Ok(text) => Ok(text.to_string()),
        Err(e) => Err(IngestError::NotUtf8 {
            name: name.to_string(),
            offset: skipped + e.valid_up_to(),
        }),
    }
}

fn utf16(name: &str, bytes: &[u8], unit: fn([u8; 2]) -> u16) -> Result<String, IngestError> {
    let not_utf16 = |offset: usize| IngestError::NotUtf8 {
        name: name.to_string(),
        offset,
    };
    if bytes.len() % 2 != 0 {
        return Err(not_utf16(bytes.len() + 1));
    }
    let units = bytes.chunks_exact(2).map(|pair| unit([pair[0], pair[1]]));
    let mut text = String::with_capacity(bytes.len() / 2);
    for (i, c) in char::decode_utf16(units).enumerate() {
        text.push(c.map_err(|_| not_utf16(2 + 2 * i))?);
    }
    Ok(text)
}

/// `\r\n` and lone `\r` become `\n`.
pub fn normalise_newlines(text: &str) -> String {
    if !text.contains('\r') {
        return text.to_string();
    }
    text.replace("\r\n", "\n").replace('\r', "\n")
}

/// Trims the end of every line and keeps at most one blank line in a row: extracted HTML and
/// PDF text is full of padding that only costs chunk space.
pub fn tidy(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank_run = 0;
    for line in text.lines() {
        let line = line.trim_end();
        if line.is_empty() {
            blank_run += 1;
            if blank_run > 1 || out.is_empty() {
                continue;
            }
        } else {
            blank_run = 0;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.truncate(out.trim_end().len());
    out
}

/// The first level-1 ATX heading (`# Title`) outside fenced code blocks.
pub fn markdown_title(text: &str) -> Option<String> {
    let mut fence: Option<&str> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        for marker in ["```", "~~~"] {
            if trimmed.starts_with(marker) {
                match fence {
                    None => fence = Some(marker),
                    Some(open) if open == marker => fence = None,
                    Some(_) => {}
                }
            }
        }
        if fence.is_some() || indent > 3 {
            continue;
        }
        let heading = trimmed
            .strip_prefix("# ")
            .or_else(|| trimmed.strip_prefix("#\t"));
        if let Some(heading) = heading {
            // A closing sequence of #s is not part of the title ("# Title ##").
            let heading = heading.trim().trim_end_matches('#').trim_end();
            if let Some(title) = clean_title(heading) {
                return Some(title);
            }
        }
    }
    None
}

/// Runs of whitespace (line breaks included) become one space; the ends are trimmed.
pub fn collapse_whitespace(raw: &str) -> String {
    raw.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A title found in a document, whitespace collapsed; `None` when nothing is left or it is too
/// long to be a title.
pub fn clean_title(raw: &str) -> Option<String> {
    let title = collapse_whitespace(raw);
    let chars = title.chars().count();
    (chars > 0 && chars <= MAX_TITLE_CHARS).then_some(title)
}

/// HTML -> (title from `<title>` or the first `<h1>`, text without scripts, styles or `<head>`).
pub fn html(name: &str, bytes: &[u8]) -> Result<(Option<String>, String), IngestError> {
    let source = decode_text(name, bytes)?;
    let text = html_to_text(&source).map_err(|reason| IngestError::Malformed {
        name: name.to_string(),
        format: Format::Html,
        reason,
    })?;
    let title = ["title", "h1"]
        .iter()
        .filter_map(|tag| element_inner(&source, tag))
        .find_map(|inner| html_to_text(&format!("<p>{inner}</p>")).ok())
        .and_then(|t| clean_title(&t));
    Ok((title, tidy(&text)))
}

fn html_to_text(source: &str) -> Result<String, String> {
    html2text::config::with_decorator(html2text::render::text_renderer::TrivialDecorator::new())
        .no_table_borders()
        .string_from_read(source.as_bytes(), HTML_RENDER_WIDTH)
        .map_err(|e| e.to_string())
}

/// The raw inner HTML of the first `<tag ...>...</tag>`, matched case-insensitively.
fn element_inner<'a>(source: &'a str, tag: &str) -> Option<&'a str> {
    // ASCII lower-casing keeps every byte offset, so positions found in `lower` index `source`.
    let lower = source.to_ascii_lowercase();
    let open = format!("<{tag}");
    let mut from = 0;
    while let Some(found) = lower[from..].find(&open) {
        let start = from + found;
        let after_name = start + open.len();
        let next = lower[after_name..].chars().next()?;
        if next == '>' || next.is_ascii_whitespace() || next == '/' {
            let body = after_name + lower[after_name..].find('>')? + 1;
            let end = body + lower[body..].find(&format!("</{tag}"))?;
            return Some(&source[body..end]);
        }
        from = after_name;
    }
    None
}

/// PDF -> (title from the document information dictionary, text of the text layer).
pub fn pdf(name: &str, bytes: &[u8]) -> Result<(Option<String>, String), IngestError> {
    let malformed = |reason: String| IngestError::Malformed {
        name: name.to_string(),
        format: Format::Pdf,
        reason,
    };
    let parsed = catch_unwind(AssertUnwindSafe(|| extract_pdf(bytes)));
    let (title, text) = match parsed {
        Ok(result) => result.map_err(malformed)?,
        Err(panic) => {
            let detail = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            return Err(malformed(format!(
                "the PDF parser gave up on it ({detail})"
            )));
        }
    };
    let text = tidy(&normalise_newlines(&text));
    if text.is_empty() {
        return Err(IngestError::NoTextLayer {
            name: name.to_string(),
        });
    }
    Ok((title, text))
}

fn extract_pdf(bytes: &[u8]) -> Result<(Option<String>, String), String> {
    let mut doc = pdf_extract::Document::load_mem(bytes).map_err(|e| e.to_string())?;
    if doc.is_encrypted() && doc.decrypt("").is_err() {
        return Err("it is encrypted with a password".to_string());
    }
    let title = pdf_title(&doc);
    let mut text = String::new();
    let mut output = pdf_extract::PlainTextOutput::new(&mut text);
    pdf_extract::output_doc(&doc, &mut output).map_err(|e| e.to_string())?;
    Ok((title, text))
}

/// `/Title` of the trailer's `/Info` dictionary, if there is a usable one.
fn pdf_title(doc: &pdf_extract::Document) -> Option<String> {
    let info = match doc.trailer.get(b"Info").ok()? {
        pdf_extract::Object::Reference(id) => doc.get_object(*id).ok()?,
        other => other,
    };
    let raw = info.as_dict().ok()?.get(b"Title").ok()?.as_str().ok()?;
    clean_title(&pdf_text_string(raw))
}

/// A PDF text string: UTF-16BE with a byte-order mark, else PDFDocEncoding (read as Latin-1,
/// which it matches for printable ASCII and most letters).
fn pdf_text_string(raw: &[u8]) -> String {
    match raw.strip_prefix(b"\xFE\xFF") {
        Some(rest) => {
            let units = rest
                .chunks_exact(2)
                .map(|pair| u16::from_be_bytes([pair[0], pair[1]]));
            char::decode_utf16(units)
                .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
                .collect()
        }
        None => raw.iter().map(|&b| char::from(b)).collect(),
    }
}
