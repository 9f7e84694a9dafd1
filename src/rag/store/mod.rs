//! Document and chunk stores (in progress).
