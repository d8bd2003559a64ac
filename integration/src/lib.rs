//! Helpers for vgpu integration tests.
