#![no_main]
// See portcullis::fuzzing::http_classify.
libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis::fuzzing::http_classify(data));
