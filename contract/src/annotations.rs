//! Pod and node annotations (HAMi wire formats). Owned by the scheduler work; see HAMI-NOTES.md.
