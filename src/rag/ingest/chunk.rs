//! Chunking: a document's text -> passages of at most `chunk_size` characters, consecutive ones
//! sharing up to `chunk_overlap` characters.
//!
//! Owns how documents are cut. Markdown is cut into sections at its headings first: runs of
//! sections that fit in a chunk are packed by text-splitter's `MarkdownSplitter` (so a short
//! section is never cut in the middle), and a section too long for one chunk is split on its own
//! with its heading repeated at the top of every piece. Other formats go through its
//! `TextSplitter` (paragraphs, lines, sentences, words). Sizes are counted in characters
//! (`char`s), so Cyrillic text gets as much room as Latin. It must not embed or store.

use std::ops::Range;

use text_splitter::{Characters, ChunkConfig, MarkdownSplitter, TextSplitter};

use super::{Format, LoadedDocument};
use crate::config::RagConfig;

/// Splits a document into trimmed, non-empty chunks, in document order.
pub fn chunk(doc: &LoadedDocument, config: &RagConfig) -> Vec<String> {
    let size = config.chunk_size.max(1);
    let pieces = match doc.format {
        Format::Markdown => chunk_markdown(&doc.text, size, config.chunk_overlap),
        Format::Text | Format::Html | Format::Pdf => {
            let splitter = TextSplitter::new(chunk_config(size, config.chunk_overlap));
            splitter.chunks(&doc.text).map(str::to_string).collect()
        }
    };
    pieces
        .iter()
        .map(|piece| piece.trim())
        .filter(|piece| !piece.is_empty())
        .map(str::to_string)
        .collect()
}

/// Runs of sections that fit in a chunk go to `MarkdownSplitter`, which packs them without
/// cutting one. A section too long for one chunk is split on its own, and its heading starts
/// every piece, so no piece loses the words that say what it is about.
fn chunk_markdown(text: &str, size: usize, overlap: usize) -> Vec<String> {
    let mut out = Vec::new();
    // Consecutive sections that each fit in a chunk, as one byte range.
    let mut run: Option<Range<usize>> = None;
    for section in sections(text) {
        if chars(&text[section.range.clone()]) <= size {
            run = Some(match run {
                Some(run) => run.start..section.range.end,
                None => section.range,
            });
            continue;
        }
        if let Some(run) = run.take() {
            pack_sections(&text[run], size, overlap, &mut out);
        }
        split_long_section(text, &section, size, overlap, &mut out);
    }
    if let Some(run) = run {
        pack_sections(&text[run], size, overlap, &mut out);
    }
    out
}

/// Sections that each fit: `MarkdownSplitter` packs as many whole ones per chunk as fit.
fn pack_sections(run: &str, size: usize, overlap: usize, out: &mut Vec<String>) {
    let splitter = MarkdownSplitter::new(chunk_config(size, overlap));
    out.extend(splitter.chunks(run).map(str::to_string));
}

/// One section longer than a chunk: its body is split, and each piece starts with the heading.
fn split_long_section(
    text: &str,
    section: &Section<'_>,
    size: usize,
    overlap: usize,
    out: &mut Vec<String>,
) {
    let heading = section.heading.map(str::trim).unwrap_or_default();
    let prefix = format!("{heading}\n\n");
    // The heading heads every piece, unless it would leave less than half of the room for the
    // body: then the section is split whole, and only its first piece carries the heading.
    if heading.is_empty() || chars(&prefix) > size / 2 {
        let splitter = MarkdownSplitter::new(chunk_config(size, overlap));
        out.extend(
            splitter
                .chunks(&text[section.range.clone()])
                .map(str::to_string),
        );
        return;
    }
    let room = size - chars(&prefix);
    let splitter = MarkdownSplitter::new(chunk_config(room, overlap.min(room / 2)));
    let body = &text[section.body_start..section.range.end];
    out.extend(
        splitter
            .chunks(body)
            .map(|piece| format!("{prefix}{piece}")),
    );
}

/// A heading and the text up to the next heading (of any level), or the text before the first.
struct Section<'a> {
    /// The heading line, if the section has one.
    heading: Option<&'a str>,
    /// Byte range of the whole section in the text, heading included.
    range: Range<usize>,
    /// Where the text after the heading line starts.
    body_start: usize,
}

/// Cuts Markdown at ATX headings (`#` to `######`) outside fenced code blocks.
fn sections(text: &str) -> Vec<Section<'_>> {
    let mut out: Vec<Section<'_>> = Vec::new();
    let mut fence: Option<&str> = None;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        let trimmed = line.trim_start();
        if let Some(marker) = ["```", "~~~"].into_iter().find(|m| trimmed.starts_with(m)) {
            fence = match fence {
                None => Some(marker),
                Some(open) if open == marker => None,
                other => other,
            };
            continue;
        }
        if fence.is_some() || line.len() - trimmed.len() > 3 || !is_heading(trimmed) {
            continue;
        }
        if let Some(last) = out.last_mut() {
            last.range.end = start;
        } else if start > 0 {
            out.push(Section {
                heading: None,
                range: 0..start,
                body_start: 0,
            });
        }
        out.push(Section {
            heading: Some(line),
            range: start..text.len(),
            body_start: offset,
        });
    }
    if out.is_empty() {
        out.push(Section {
            heading: None,
            range: 0..text.len(),
            body_start: 0,
        });
    }
    out
}

/// `# Title` .. `###### Title` (a `#` run of 1 to 6, then whitespace or the end of the line).
fn is_heading(line: &str) -> bool {
    let hashes = line.len() - line.trim_start_matches('#').len();
    (1..=6).contains(&hashes)
        && line[hashes..]
            .chars()
            .next()
            .is_none_or(char::is_whitespace)
}

fn chars(text: &str) -> usize {
    text.chars().count()
}

/// The splitter's settings. `RagConfig` is validated (overlap < size), but this stays total:
/// an overlap the splitter cannot honour is dropped (logged at debug) rather than failing.
fn chunk_config(size: usize, overlap: usize) -> ChunkConfig<Characters> {
    ChunkConfig::new(size)
        .with_overlap(overlap)
        .unwrap_or_else(|_| {
            log::debug!("chunk_overlap {overlap} is not below {size}; chunking without overlap");
            ChunkConfig::new(size)
        })
}
