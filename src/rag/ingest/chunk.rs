//! Chunking: a document's text -> passages of at most `chunk_size` characters, consecutive ones
//! sharing up to `chunk_overlap` characters.
//!
//! Owns how documents are cut. Markdown is cut into sections at its headings first: runs of
//! sections that fit in a chunk are packed by text-splitter's `MarkdownSplitter` (so a short
//! section is never cut in the middle), and a section too long for one chunk is split on its own
//! with its heading repeated at the top of every piece (not the document's title heading: the
//! title travels with every hit and is labelled once in the prompt). Other formats go through its
//! `TextSplitter` (paragraphs, lines, sentences, words). Sizes are counted in characters
//! (`char`s), so Cyrillic text gets as much room as Latin. It must not embed or store.
//!
//! # Linear time
//!
//! text-splitter looks at the rest of its input for every chunk it cuts, which is quadratic
//! when nothing breaks the text up (800 KB without whitespace: seconds to minutes). So the
//! splitters never see more than a window of [`WINDOW_CHUNKS`] chunks: the text is first cut
//! into windows at the best boundary near each window's end (a blank line, else a line break,
//! a sentence end, a space, or any character), each window is split on its own, and the work
//! is proportional to the length of the text. A window boundary is where the splitter would
//! cut anyway in normal prose (a paragraph); only the overlap across it is lost.

use std::ops::Range;

use text_splitter::{Characters, ChunkConfig, MarkdownSplitter, TextSplitter};

use super::{Format, LoadedDocument};
use crate::config::RagConfig;

/// How many chunks' worth of text a splitter sees at once.
const WINDOW_CHUNKS: usize = 8;

/// Splits a document into trimmed, non-empty chunks, in document order.
pub fn chunk(doc: &LoadedDocument, config: &RagConfig) -> Vec<String> {
    let size = config.chunk_size.max(1);
    let pieces = match doc.format {
        Format::Markdown => chunk_markdown(&doc.text, &doc.title, size, config.chunk_overlap),
        Format::Text | Format::Html | Format::Pdf => {
            let splitter = TextSplitter::new(chunk_config(size, config.chunk_overlap));
            windows(&doc.text, size * WINDOW_CHUNKS, config.chunk_overlap)
                .flat_map(|window| {
                    splitter
                        .chunks(window)
                        .map(str::to_string)
                        .collect::<Vec<_>>()
                })
                .collect()
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
fn chunk_markdown(text: &str, title: &str, size: usize, overlap: usize) -> Vec<String> {
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
        split_long_section(text, title, &section, size, overlap, &mut out);
    }
    if let Some(run) = run {
        pack_sections(&text[run], size, overlap, &mut out);
    }
    out
}

/// Sections that each fit: `MarkdownSplitter` packs as many whole ones per chunk as fit.
fn pack_sections(run: &str, size: usize, overlap: usize, out: &mut Vec<String>) {
    let splitter = MarkdownSplitter::new(chunk_config(size, overlap));
    for window in windows(run, size * WINDOW_CHUNKS, overlap) {
        out.extend(splitter.chunks(window).map(str::to_string));
    }
}

/// `text` cut into slices of at most `max_chars` characters, each ending at the best boundary
/// in its second half (see the module doc), and each after the first starting up to `overlap`
/// characters before the previous one ended (at a word start where there is one), so chunks
/// keep their overlap across windows. Linear in the length of `text`; `overlap` must be below
/// `max_chars / 2` (it is below the chunk size, and a window holds [`WINDOW_CHUNKS`] chunks).
fn windows(text: &str, max_chars: usize, overlap: usize) -> impl Iterator<Item = &str> {
    let max_chars = max_chars.max(2);
    let overlap = overlap.min(max_chars / 2 - 1);
    let mut rest = text;
    let mut done = false;
    std::iter::from_fn(move || {
        if done || rest.is_empty() {
            return None;
        }
        // Byte offsets of the window's middle and end (`max_chars` characters in).
        let mut indices = rest.char_indices().map(|(i, _)| i);
        let Some(middle) = indices.nth(max_chars / 2) else {
            done = true;
            return Some(rest);
        };
        let Some(end) = indices.nth(max_chars - max_chars / 2 - 1) else {
            done = true;
            return Some(rest);
        };
        let tail = &rest[middle..end];
        let (cut, boundary) = SEPARATORS
            .iter()
            .find_map(|sep| {
                tail.rfind(sep)
                    .map(|at| (middle + at + sep.len(), Boundary::Separator(sep)))
            })
            .or_else(|| {
                tail.char_indices()
                    .rev()
                    .find(|(_, c)| c.is_whitespace())
                    .map(|(at, c)| (middle + at + c.len_utf8(), Boundary::Word))
            })
            .unwrap_or((end, Boundary::Character));
        let window = &rest[..cut];
        rest = &rest[overlap_start(window, overlap, boundary)..];
        Some(window)
    })
}

/// Where windows are preferably cut, best first: paragraphs, lines, sentences.
const SEPARATORS: [&str; 3] = ["\n\n", "\n", ". "];

/// What a window was cut at, which is what its overlap with the next one starts at.
#[derive(Clone, Copy)]
enum Boundary {
    Separator(&'static str),
    Word,
    Character,
}

/// Where the next window starts: at the earliest boundary of the kind the window was cut at
/// within its last `overlap` characters (whole sentences or words, as the splitter overlaps),
/// or at its end when none fits.
fn overlap_start(window: &str, overlap: usize, boundary: Boundary) -> usize {
    if overlap == 0 {
        return window.len();
    }
    let back = window
        .char_indices()
        .rev()
        .nth(overlap - 1)
        .map_or(0, |(at, _)| at);
    let stretch = &window[back..];
    let start = match boundary {
        Boundary::Separator(sep) => stretch.find(sep).map(|at| back + at + sep.len()),
        Boundary::Word => stretch
            .char_indices()
            .find(|(_, c)| c.is_whitespace())
            .map(|(at, c)| back + at + c.len_utf8()),
        Boundary::Character => Some(back),
    };
    start
        .filter(|&at| at < window.len())
        .unwrap_or(window.len())
}

/// One section longer than a chunk: its body is split, and each piece starts with the heading.
fn split_long_section(
    text: &str,
    title: &str,
    section: &Section<'_>,
    size: usize,
    overlap: usize,
    out: &mut Vec<String>,
) {
    let heading = section.heading.map(str::trim).unwrap_or_default();
    let prefix = format!("{heading}\n\n");
    // The heading heads every piece, unless it would leave less than half of the room for the
    // body, or it is the document's title (which every hit carries and the prompt labels
    // anyway; repeated, its words would match every chunk and none usefully): then the section
    // is split whole, and only its first piece carries the heading.
    let is_title = heading.trim_start_matches('#').trim() == title.trim();
    if heading.is_empty() || is_title || chars(&prefix) > size / 2 {
        pack_sections(&text[section.range.clone()], size, overlap, out);
        return;
    }
    let room = size - chars(&prefix);
    let splitter = MarkdownSplitter::new(chunk_config(room, overlap.min(room / 2)));
    let body = &text[section.body_start..section.range.end];
    for window in windows(body, room * WINDOW_CHUNKS, overlap.min(room / 2)) {
        out.extend(
            splitter
                .chunks(window)
                .map(|piece| format!("{prefix}{piece}")),
        );
    }
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
