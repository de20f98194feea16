#![no_main]
// See portcullis::fuzzing::pg_split.
libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis::fuzzing::pg_split(data));
