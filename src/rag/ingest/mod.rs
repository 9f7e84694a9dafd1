//! Loading documents and splitting them into chunks (in progress).
