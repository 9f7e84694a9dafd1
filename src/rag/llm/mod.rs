//! Embeddings and streaming generation (in progress).
