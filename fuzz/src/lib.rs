//! Fuzz entry points shared by the libFuzzer targets and the stable driver.
