//! return_path
