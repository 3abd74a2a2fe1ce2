#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ctwatch::decode::ring_record(data);
    // Most inputs have the wrong size and stop at the size check; padded or
    // cut to the record size they reach every field, even when the seeds
    // predate a change of the record layout.
    let mut record = data.to_vec();
    record.resize(ctwatch::decode::RING_RECORD_SIZE, 0);
    let _ = ctwatch::decode::ring_record(&record);
});
