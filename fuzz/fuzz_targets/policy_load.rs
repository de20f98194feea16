#![no_main]
// The policy loader (TOML + Cedar); see portcullis::fuzzing::policy_load.
libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis::fuzzing::policy_load(data));
