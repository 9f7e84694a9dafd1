//! What the public sees of where a document came from: its source as ingested, relative
//! (`docs/en/reload.md`, an upload's name), never an absolute path of the server's file system.
//! Applied to document listings and to the sources of answers (JSON and streamed). Nothing here
//! touches the store: the stored source, which is the document's identity, stays as it was.

use std::path::{Path, PathBuf};

use crate::rag::engine::Source;

pub struct PublicSources {
    /// `docs_dir`, absolute: a source under it is shown from the folder's own name down, as
    /// a relative `docs_dir` ingests it.
    docs_dir: PathBuf,
}

impl PublicSources {
    pub fn new(docs_dir: &Path) -> PublicSources {
        PublicSources {
            docs_dir: std::path::absolute(docs_dir).unwrap_or_else(|_| docs_dir.to_path_buf()),
        }
    }

    /// A relative source as is; an absolute one under `docs_dir` from the folder's name down;
    /// any other absolute path as its file name alone.
    pub fn show(&self, source: &str) -> String {
        let path = Path::new(source);
        if !path.is_absolute() {
            return source.to_string();
        }
        if let Ok(rest) = path.strip_prefix(&self.docs_dir) {
            if let Some(folder) = self.docs_dir.file_name() {
                return Path::new(folder).join(rest).to_string_lossy().into_owned();
            }
        }
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    pub fn apply(&self, sources: &mut [Source]) {
        for source in sources {
            source.source = self.show(&source.source);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_sources_are_never_absolute() {
        let public = PublicSources::new(Path::new("/srv/ragpool/docs"));
        assert_eq!(public.show("docs/guide.md"), "docs/guide.md");
        assert_eq!(public.show("Backups"), "Backups");
        assert_eq!(
            public.show("/srv/ragpool/docs/en/guide.md"),
            "docs/en/guide.md"
        );
        assert_eq!(public.show("/home/ops/secret/notes.md"), "notes.md");
        assert_eq!(public.show("/"), "");
    }
}
