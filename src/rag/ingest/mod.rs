//! Ingestion: turning files and uploads into [`LoadedDocument`]s, and documents into chunks.
//!
//! Owns reading (with a size limit), format detection, text extraction (Markdown and plain text
//! as they are, HTML without its scripts and styles, PDF from its text layer), titles, and
//! splitting text into overlapping chunks sized in characters. It must not store, embed or
//! serve anything: callers hand its output to a store. Every failure is an [`IngestError`] that
//! names the file and says what to do; one bad file never stops a folder walk.
//!
//! # Layout
//!
//! - `load`: paths, folder walks, uploads; format detection and the size limit
//!   ([`load_path`], [`load_file`], [`load_bytes`], [`from_text`]).
//! - `extract`: the bytes of one format -> title and text.
//! - [`sandbox`]: HTML and PDF parsed in a helper process under limits ([`Extractor`]).
//! - `chunk`: text -> chunks, Markdown-aware for Markdown ([`chunk()`]), in linear time.

mod chunk;
mod extract;
mod load;
pub mod sandbox;

use std::fmt;

pub use chunk::chunk;
pub use load::from_text;
pub use sandbox::{Extractor, Limits};

/// Largest file or upload read, in bytes. Bigger ones are refused before being read.
pub const MAX_DOCUMENT_BYTES: u64 = 50 * 1024 * 1024;

/// What the supported formats are, for error messages.
pub const SUPPORTED: &str =
    "Markdown (.md, .markdown), plain text (.txt, .text), HTML (.html, .htm) and PDF (.pdf)";

/// A document read and converted to text, not yet chunked.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedDocument {
    /// Stable identity: the path as given (joined under the folder for walks), the upload's
    /// file name, or the title of a JSON upload. Re-ingesting the same source replaces it.
    pub source: String,
    /// The first `# ` heading, HTML `<title>`/`<h1>`, PDF title, or else the file stem.
    pub title: String,
    /// UTF-8 text with `\n` line endings.
    pub text: String,
    /// Decides how the text is chunked.
    pub format: Format,
}

/// The formats ingest reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Markdown,
    Text,
    Html,
    Pdf,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Markdown => "Markdown",
            Format::Text => "plain text",
            Format::Html => "HTML",
            Format::Pdf => "PDF",
        })
    }
}

/// Why a document could not be ingested. Each message names the file and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{name}: unsupported file type ({found}); ragpool reads {SUPPORTED}")]
    Unsupported {
        name: String,
        /// What was seen: "extension .docx", "content type application/msword", "no extension".
        found: String,
    },
    #[error("cannot read {name}: {source}; check that it exists and that ragpool may read it")]
    Unreadable {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{name} is not UTF-8 text (invalid bytes at offset {offset}); \
         save it as UTF-8 (it may be in Windows-1251 or another legacy encoding) and try again"
    )]
    NotUtf8 { name: String, offset: usize },
    #[error(
        "{name}: the PDF has no text layer (a scan or images only); run OCR on it \
         (e.g. `ocrmypdf in.pdf out.pdf`) and ingest the result"
    )]
    NoTextLayer { name: String },
    #[error(
        "{name}: cannot extract text from this {format}: {reason}; re-save it \
         (a PDF without encryption, e.g. with \"Print to PDF\") and try again"
    )]
    Malformed {
        name: String,
        format: Format,
        reason: String,
    },
    #[error("{name} is empty: it contains no text to index")]
    Empty { name: String },
    #[error(
        "{name} is too large ({size} bytes; the limit is {limit} bytes); split it into smaller files"
    )]
    TooLarge { name: String, size: u64, limit: u64 },
    #[error("the document has no title: give it one, or start its text with a `# ` heading")]
    NoTitle,
    /// The parser hit a limit or crashed in its helper process (`reason` says which).
    #[error("{name}: could not parse {format}: {reason}")]
    Sandbox {
        name: String,
        format: Format,
        reason: String,
    },
    #[error(
        "{name}: the extracted text is larger than {limit} bytes (extract_max_text); \
         split the document into smaller files"
    )]
    TextTooLarge { name: String, limit: usize },
}

#[cfg(test)]
mod tests;
