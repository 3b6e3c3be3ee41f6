//! Any text as a config file: an error names a key or a line, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;
use storelink::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(e) = Config::parse(text, "fuzz.toml", &HashMap::<String, String>::new()) {
        assert!(e.to_string().starts_with("fuzz.toml: "));
    }
});
