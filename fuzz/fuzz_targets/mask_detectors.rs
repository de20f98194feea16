#![no_main]
// See portcullis::fuzzing::mask_detectors.
libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis::fuzzing::mask_detectors(data));
