#![no_main]
// See portcullis::fuzzing::mask_json.
libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis::fuzzing::mask_json(data));
