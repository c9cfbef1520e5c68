//! clear_map
