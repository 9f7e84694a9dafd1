//! Loading: paths, folder walks and uploads -> [`LoadedDocument`]s, as methods of the
//! [`Extractor`] that parses them (in the sandbox when serving).
//!
//! Owns format detection (by extension, or by content type for uploads), the size limit
//! ([`MAX_DOCUMENT_BYTES`], checked before reading), titles and the deterministic folder walk.
//! It must not chunk or store: that is [`super::chunk()`]'s and the store's job.
//!
//! A folder walk visits entries in byte order of their names, depth first, skipping hidden
//! entries (names starting with `.`), unsupported extensions and symlinked folders (which could
//! loop), each with an `info` log line. Each file gets its own result.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::extract;
use super::{Extractor, Format, IngestError, LoadedDocument, MAX_DOCUMENT_BYTES};

impl Extractor {
    /// Loads a file, or every supported file under a folder (recursively).
    ///
    /// The outer error means `path` itself could not be read; inner results are per file, in walk
    /// order, so one bad file does not stop the others. A single file is loaded whatever its
    /// extension (an unsupported one is an inner error); a folder walk skips unsupported files.
    pub fn load_path(
        &self,
        path: &Path,
    ) -> Result<Vec<Result<LoadedDocument, IngestError>>, IngestError> {
        let meta = fs::metadata(path).map_err(|source| unreadable(path, source))?;
        if !meta.is_dir() {
            return Ok(vec![self.load_file(path)]);
        }
        let mut results = Vec::new();
        self.walk(path, &mut results)
            .map_err(|source| unreadable(path, source))?;
        Ok(results)
    }

    /// Visits one folder. Errors reading `dir` itself are returned; errors below it become results.
    fn walk(
        &self,
        dir: &Path,
        results: &mut Vec<Result<LoadedDocument, IngestError>>,
    ) -> std::io::Result<()> {
        let mut entries: Vec<(std::ffi::OsString, PathBuf)> = fs::read_dir(dir)?
            .map(|entry| entry.map(|e| (e.file_name(), e.path())))
            .collect::<Result<_, _>>()?;
        entries.sort();
        for (file_name, path) in entries {
            let shown = path.display();
            if file_name.to_string_lossy().starts_with('.') {
                log::info!("skipping {shown}: hidden");
                continue;
            }
            let link = match fs::symlink_metadata(&path) {
                Ok(meta) => meta.file_type().is_symlink(),
                Err(source) => {
                    results.push(Err(unreadable(&path, source)));
                    continue;
                }
            };
            let meta = match fs::metadata(&path) {
                Ok(meta) => meta,
                Err(source) => {
                    results.push(Err(unreadable(&path, source)));
                    continue;
                }
            };
            if meta.is_dir() {
                if link {
                    log::info!("skipping {shown}: a symlinked folder (it could loop)");
                } else if let Err(source) = self.walk(&path, results) {
                    results.push(Err(unreadable(&path, source)));
                }
            } else if !meta.is_file() {
                log::info!("skipping {shown}: not a regular file");
            } else if format_from_name(&path.to_string_lossy()).is_none() {
                log::info!("skipping {shown}: unsupported type");
            } else {
                results.push(self.load_file(&path));
            }
        }
        Ok(())
    }

    /// Loads one file; its extension decides the format. `source` is the path as given.
    pub fn load_file(&self, path: &Path) -> Result<LoadedDocument, IngestError> {
        let name = path.to_string_lossy().into_owned();
        let Some(format) = format_from_name(&name) else {
            return Err(unsupported(&name, describe_extension(&name)));
        };
        let bytes = read_limited(path)?;
        self.build(&name, stem(&name), &bytes, format)
    }

    /// Loads an upload. The format comes from the file name's extension when it is one ragpool
    /// reads, else from the content type; `source` is the name.
    pub fn load_bytes(
        &self,
        name: &str,
        bytes: &[u8],
        content_type: Option<&str>,
    ) -> Result<LoadedDocument, IngestError> {
        let format = format_from_name(name)
            .or_else(|| content_type.and_then(format_from_content_type))
            .ok_or_else(|| {
                let found = match content_type.map(essence).filter(|t| !t.is_empty()) {
                    Some(t) => format!("{}, content type {t}", describe_extension(name)),
                    None => describe_extension(name),
                };
                unsupported(name, found)
            })?;
        check_size(name, bytes.len() as u64)?;
        self.build(name, stem(name), bytes, format)
    }

    /// Extracts the text of `bytes` in `format` and picks the title.
    fn build(
        &self,
        name: &str,
        fallback_title: String,
        bytes: &[u8],
        format: Format,
    ) -> Result<LoadedDocument, IngestError> {
        let (title, text) = self.text_of(name, bytes, format)?;
        if text.trim().is_empty() {
            return Err(IngestError::Empty {
                name: name.to_string(),
            });
        }
        let title = title
            .or_else(|| Some(extract::collapse_whitespace(&fallback_title)))
            .filter(|t| !t.is_empty())
            .ok_or(IngestError::NoTitle)?;
        // An upload without a name is known by its title.
        let source = match name.trim() {
            "" => title.clone(),
            _ => name.to_string(),
        };
        Ok(LoadedDocument {
            source,
            title,
            text,
            format,
        })
    }
}

/// A JSON `{title, text}` upload: Markdown, `source` = the title. An empty title falls back to
/// the text's first `# ` heading.
pub fn from_text(title: &str, text: &str) -> Result<LoadedDocument, IngestError> {
    let text = extract::normalise_newlines(text.strip_prefix('\u{FEFF}').unwrap_or(text));
    // The caller's title is kept whole (only its whitespace collapsed): it is the identity.
    let title = Some(extract::collapse_whitespace(title))
        .filter(|t| !t.is_empty())
        .or_else(|| extract::markdown_title(&text))
        .ok_or(IngestError::NoTitle)?;
    check_size(&title, text.len() as u64)?;
    if text.trim().is_empty() {
        return Err(IngestError::Empty { name: title });
    }
    Ok(LoadedDocument {
        source: title.clone(),
        title,
        text,
        format: Format::Markdown,
    })
}

/// Reads a file, refusing one above the limit before reading it (and one that grows past it
/// while being read).
fn read_limited(path: &Path) -> Result<Vec<u8>, IngestError> {
    let name = path.to_string_lossy();
    let file = fs::File::open(path).map_err(|source| unreadable(path, source))?;
    let size = file
        .metadata()
        .map_err(|source| unreadable(path, source))?
        .len();
    check_size(&name, size)?;
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(MAX_DOCUMENT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| unreadable(path, source))?;
    check_size(&name, bytes.len() as u64)?;
    Ok(bytes)
}

fn check_size(name: &str, size: u64) -> Result<(), IngestError> {
    if size > MAX_DOCUMENT_BYTES {
        return Err(IngestError::TooLarge {
            name: name.to_string(),
            size,
            limit: MAX_DOCUMENT_BYTES,
        });
    }
    Ok(())
}

/// The format a file name's extension stands for (case-insensitive).
fn format_from_name(name: &str) -> Option<Format> {
    let extension = Path::new(name).extension()?.to_str()?.to_ascii_lowercase();
    match extension.as_str() {
        "md" | "markdown" => Some(Format::Markdown),
        "txt" | "text" => Some(Format::Text),
        "html" | "htm" => Some(Format::Html),
        "pdf" => Some(Format::Pdf),
        _ => None,
    }
}

/// The format a MIME type stands for; parameters (`; charset=utf-8`) are ignored.
fn format_from_content_type(content_type: &str) -> Option<Format> {
    match essence(content_type).as_str() {
        "text/markdown" | "text/x-markdown" => Some(Format::Markdown),
        "text/plain" => Some(Format::Text),
        "text/html" | "application/xhtml+xml" => Some(Format::Html),
        "application/pdf" => Some(Format::Pdf),
        _ => None,
    }
}

/// `Text/HTML; charset=utf-8` -> `text/html`.
fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

fn describe_extension(name: &str) -> String {
    match Path::new(name).extension() {
        Some(ext) => format!("extension .{}", ext.to_string_lossy()),
        None => "no extension".to_string(),
    }
}

/// The file name without its extension, the title of last resort.
fn stem(name: &str) -> String {
    // Upload names may come from Windows: treat `\` as a separator too.
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    Path::new(base)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| base.to_string())
}

fn unsupported(name: &str, found: String) -> IngestError {
    IngestError::Unsupported {
        name: name.to_string(),
        found,
    }
}

fn unreadable(path: &Path, source: std::io::Error) -> IngestError {
    IngestError::Unreadable {
        name: path.to_string_lossy().into_owned(),
        source,
    }
}
