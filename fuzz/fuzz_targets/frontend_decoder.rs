//! Feeds arbitrary bytes to the agent-side PostgreSQL decoder exactly as the
//! proxy reads them: a startup packet first (SSLRequest, CancelRequest,
//! StartupMessage), then typed frames, each decoded into a frontend
//! message. Nothing may panic, loop or allocate beyond the frame limits.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use portcullis::proxy::postgres::codec;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    // Startup phase: at most a few packets (SSL/GSS requests may precede).
    for _ in 0..4 {
        match codec::decode_startup(&mut buf) {
            Ok(Some(codec::Startup::Params { .. })) => break,
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return,
        }
    }
    // Typed frames, bounded like the session (a small cap keeps the
    // fuzzer's inputs meaningful).
    while let Ok(Some(head)) = codec::peek_frame(&buf, 1 << 20) {
        let frame = buf.split_to(head.total);
        let body = frame.get(5..).unwrap_or_default();
        if codec::decode_frontend(head.tag, body).is_err() {
            return;
        }
    }
});
