#![no_main]

// fallback_chat::fuzz::body: see src/fuzz.rs for the input it takes and what it checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| fallback_chat::fuzz::body(data));
