//! Training engine (being built).
