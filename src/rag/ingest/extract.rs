//! Text extraction: the bytes of one format -> (title, text).
//!
//! Owns decoding (UTF-8, with or without a byte-order mark; UTF-16 with one), line-ending
//! normalisation, HTML to text (scripts, styles and `<head>` dropped) and PDF text layers. It
//! must not touch the file system: callers read the bytes and enforce the size limit.
//!
//! The third-party parsers (html5ever via html2text, lopdf via pdf-extract) are not trusted
//! with a serving process: [`super::sandbox`] runs [`text_of`] for HTML and PDF in a helper
//! process under resource limits. Here they still run under `catch_unwind` (a panic becomes
//! an error), the PDF text is written through a capped writer (extraction stops at the cap
//! instead of filling memory), and HTML is flattened below [`MAX_HTML_DEPTH`] first: the HTML5
//! tree builder scans its stack of open elements for every tag, so 100k nested `<div>`s cost
//! quadratic time.

use std::borrow::Cow;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use super::{Format, IngestError};

/// Elements nested deeper than this are dropped from HTML before parsing (their text stays).
/// Browsers do the same (Blink caps its parser's tree depth at 512).
pub const MAX_HTML_DEPTH: usize = 512;

/// (title, text) of `bytes` in `format`, the text at most `max_text` bytes. The one entry
/// point for every format, in process or in the sandbox helper.
pub fn text_of(
    name: &str,
    bytes: &[u8],
    format: Format,
    max_text: usize,
) -> Result<(Option<String>, String), IngestError> {
    let (title, text) = match format {
        Format::Markdown => {
            let text = decode_text(name, bytes)?;
            (markdown_title(&text), text)
        }
        Format::Text => (None, decode_text(name, bytes)?),
        Format::Html => html(name, bytes)?,
        Format::Pdf => pdf(name, bytes, max_text)?,
    };
    if text.len() > max_text {
        return Err(IngestError::TextTooLarge {
            name: name.to_string(),
            limit: max_text,
        });
    }
    Ok((title, text))
}

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
    let source = flatten_html(&source, MAX_HTML_DEPTH);
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

/// Void elements: never closed, never nested.
const VOID_ELEMENTS: &[&str] = &[
    "area", "base", "br", "col", "embed", "hr", "img", "input", "keygen", "link", "meta", "param",
    "source", "track", "wbr",
];
/// Elements whose content is raw text up to their end tag (no tags inside).
const RAW_TEXT_ELEMENTS: &[&str] = &[
    "script", "style", "textarea", "title", "xmp", "iframe", "noembed", "noframes", "noscript",
];
/// Elements that an open one of the same name implicitly closes (`<p>a<p>b`, `<li>`s).
const SELF_CLOSING_SIBLINGS: &[&str] = &[
    "p", "li", "dt", "dd", "option", "tr", "td", "th", "rt", "rp",
];
/// How far up the stack an implicitly closed sibling is looked for.
const SIBLING_LOOKBACK: usize = 8;

/// Drops the start and end tags of elements nested deeper than `max_depth`, keeping their text,
/// in one linear pass. A document that never goes that deep comes back unchanged (borrowed).
///
/// The nesting is estimated with a small tag scanner, not the HTML5 algorithm: void elements
/// and raw-text elements (`<script>`...) do not nest, a `<p>`/`<li>`/... closes an open sibling
/// of its name, an end tag closes up to its element. Where it overestimates (misnested tags),
/// the only cost is a page's deepest tags, never its text.
pub fn flatten_html(source: &str, max_depth: usize) -> Cow<'_, str> {
    let bytes = source.as_bytes();
    let mut out: Option<String> = None;
    // Kept open elements (at most max_depth), how many of each name are on it, and how many
    // start tags of each name were dropped (their end tags are dropped too).
    let mut stack: Vec<String> = Vec::new();
    let mut open: HashMap<String, usize> = HashMap::new();
    let mut dropped: HashMap<String, usize> = HashMap::new();
    // Bytes before `copied` are in `out` (or unchanged, while `out` is None).
    let mut copied = 0;
    let mut i = 0;
    while let Some(found) = source[i..].find('<') {
        let start = i + found;
        i = start + 1;
        let rest = &bytes[start..];
        if rest.starts_with(b"<!--") {
            i = source[start + 4..]
                .find("-->")
                .map_or(bytes.len(), |end| start + 4 + end + 3);
            continue;
        }
        let (closing, name_at) = match rest.get(1) {
            Some(b'/') => (true, start + 2),
            Some(b'!' | b'?') => {
                i = source[start..]
                    .find('>')
                    .map_or(bytes.len(), |end| start + end + 1);
                continue;
            }
            _ => (false, start + 1),
        };
        let name_len = bytes[name_at..]
            .iter()
            .position(|b| !b.is_ascii_alphanumeric() && *b != b'-' && *b != b':')
            .unwrap_or(bytes.len() - name_at);
        if name_len == 0 || !bytes[name_at].is_ascii_alphabetic() {
            continue; // a literal `<`
        }
        let name = source[name_at..name_at + name_len].to_ascii_lowercase();
        let end = tag_end(bytes, name_at + name_len);
        i = end;
        let self_closing = bytes[..end].ends_with(b"/>");
        let keep = if closing {
            match dropped.get_mut(&name) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    false
                }
                _ => {
                    if open.get(&name).copied().unwrap_or(0) > 0 {
                        pop_to(&mut stack, &mut open, &name);
                    }
                    true
                }
            }
        } else if RAW_TEXT_ELEMENTS.contains(&name.as_str()) {
            // Skip the raw text up to `</name`, matched case-insensitively; the tags stay.
            let close = format!("</{name}");
            i = find_ascii_ci(bytes, end, close.as_bytes()).unwrap_or(bytes.len());
            true
        } else if self_closing || VOID_ELEMENTS.contains(&name.as_str()) {
            true
        } else {
            if SELF_CLOSING_SIBLINGS.contains(&name.as_str())
                && stack
                    .iter()
                    .rev()
                    .take(SIBLING_LOOKBACK)
                    .any(|n| *n == name)
            {
                pop_to(&mut stack, &mut open, &name);
            }
            if stack.len() < max_depth {
                *open.entry(name.clone()).or_default() += 1;
                stack.push(name);
                true
            } else {
                *dropped.entry(name).or_default() += 1;
                false
            }
        };
        if !keep {
            let out = out.get_or_insert_with(|| String::with_capacity(source.len()));
            out.push_str(&source[copied..start]);
            copied = end;
        }
    }
    match out {
        None => Cow::Borrowed(source),
        Some(mut out) => {
            out.push_str(&source[copied..]);
            Cow::Owned(out)
        }
    }
}

/// Where a tag that starts before `from` ends: after its `>`, skipping quoted attribute values.
fn tag_end(bytes: &[u8], from: usize) -> usize {
    let mut i = from;
    let mut after_equals = false;
    while i < bytes.len() {
        match bytes[i] {
            b'>' => return i + 1,
            b'=' => after_equals = true,
            quote @ (b'"' | b'\'') if after_equals => {
                i = bytes[i + 1..]
                    .iter()
                    .position(|b| *b == quote)
                    .map_or(bytes.len(), |end| i + 1 + end);
                after_equals = false;
            }
            b if b.is_ascii_whitespace() => {}
            _ => after_equals = false,
        }
        i += 1;
    }
    bytes.len()
}

/// Pops the stack down to and including the topmost `name`.
fn pop_to(stack: &mut Vec<String>, open: &mut HashMap<String, usize>, name: &str) {
    while let Some(top) = stack.pop() {
        if let Some(n) = open.get_mut(&top) {
            *n = n.saturating_sub(1);
        }
        if top == name {
            return;
        }
    }
}

/// The first position at or after `from` where `needle` (ASCII, lower case) starts, ignoring
/// ASCII case.
fn find_ascii_ci(haystack: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle))
        .map(|p| from + p)
}

/// PDF -> (title from the document information dictionary, text of the text layer). The text
/// layer is written through a writer that stops at `max_text` bytes.
pub fn pdf(
    name: &str,
    bytes: &[u8],
    max_text: usize,
) -> Result<(Option<String>, String), IngestError> {
    let malformed = |reason: String| IngestError::Malformed {
        name: name.to_string(),
        format: Format::Pdf,
        reason,
    };
    let mut text = CappedText {
        text: Vec::new(),
        limit: max_text,
        overflowed: false,
    };
    let parsed = catch_unwind(AssertUnwindSafe(|| extract_pdf(bytes, &mut text)));
    if text.overflowed {
        return Err(IngestError::TextTooLarge {
            name: name.to_string(),
            limit: max_text,
        });
    }
    let (title, text) = match parsed {
        // Only whole `str`s were written, so this is UTF-8.
        Ok(result) => (
            result.map_err(malformed)?,
            String::from_utf8_lossy(&text.text).into_owned(),
        ),
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

/// A text sink that refuses to grow past `limit` bytes: pdf-extract stops at the first refusal.
struct CappedText {
    /// pdf-extract writes `str`s through an `io::Write` adapter: UTF-8 bytes.
    text: Vec<u8>,
    limit: usize,
    /// Set when a write was refused: the error is "too much text", not a broken PDF.
    overflowed: bool,
}

impl std::io::Write for CappedText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > self.limit {
            self.overflowed = true;
            return Err(std::io::Error::other("the text limit is reached"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The title; the text goes into `text`.
fn extract_pdf(bytes: &[u8], text: &mut CappedText) -> Result<Option<String>, String> {
    let mut doc = pdf_extract::Document::load_mem(bytes).map_err(|e| e.to_string())?;
    if doc.is_encrypted() && doc.decrypt("").is_err() {
        return Err("it is encrypted with a password".to_string());
    }
    let title = pdf_title(&doc);
    let mut output = pdf_extract::PlainTextOutput::new(text as &mut dyn std::io::Write);
    pdf_extract::output_doc(&doc, &mut output).map_err(|e| e.to_string())?;
    Ok(title)
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
