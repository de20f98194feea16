#![no_main]
// See portcullis::fuzzing::ssh_words.
libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis::fuzzing::ssh_words(data));
