//! emberd's deploy body: multipart/form-data (the boundary and the body
//! from the input) through axum's extractor and emberd's part checks.
#![no_main]

use axum::body::Body;
use axum::extract::{FromRequest, Multipart};
use axum::http::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte is the boundary's length (up to 70, as RFC 2046 allows).
    let Some((&len, rest)) = data.split_first() else {
        return;
    };
    let len = usize::from(len % 71).min(rest.len());
    let (boundary, body) = rest.split_at(len);
    let Ok(boundary) = std::str::from_utf8(boundary) else {
        return;
    };
    let Ok(request) = Request::builder()
        .method("PUT")
        .uri("/functions/fuzz")
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Body::from(body.to_vec()))
    else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let Ok(multipart) = Multipart::from_request(request, &()).await else {
            return;
        };
        if let Ok(parts) = ember_agent::api::read_deploy(multipart).await {
            assert!(parts.module.starts_with(b"\0asm"));
            assert!(parts.files.len() <= ember_agent::api::MAX_FILES);
        }
    });
});
