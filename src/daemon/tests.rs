//! In-process tests of the loop.
