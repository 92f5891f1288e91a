#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kkachi_protocol::fuzzing::device_set(data));
