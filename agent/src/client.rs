//! Client helpers shared by the `ember` CLI, the tests and the benchmark:
//! a deploy and its multipart body, invocations.

use std::io::Write;

use ember_vmm::api::client::{ApiClient, ApiResponse};

/// `PUT /functions/{name}`: deploys `module` with `config` and `files`;
/// returns emberd's answer, whatever its status.
pub fn deploy(
    client: &mut ApiClient,
    name: &str,
    config: &serde_json::Value,
    module: &[u8],
    files: &[(String, Vec<u8>)],
) -> std::io::Result<ApiResponse> {
    let (content_type, body) = deploy_body(config, module, files);
    client.request_with_headers(
        "PUT",
        &format!("/functions/{name}"),
        &[("Content-Type", &content_type)],
        Some(&body),
    )
}

/// `POST /functions/{name}/invoke` of `event` with `headers`; returns
/// emberd's answer, whatever its status.
pub fn invoke(
    client: &mut ApiClient,
    name: &str,
    event: &[u8],
    headers: &[(&str, &str)],
) -> std::io::Result<ApiResponse> {
    client.request_with_headers(
        "POST",
        &format!("/functions/{name}/invoke"),
        headers,
        Some(event),
    )
}

/// [`invoke`] asynchronously (`X-Ember-Invocation-Type: Event`, and
/// `headers` besides): a 202 carries the invocation's id.
pub fn invoke_async(
    client: &mut ApiClient,
    name: &str,
    event: &[u8],
    headers: &[(&str, &str)],
) -> std::io::Result<ApiResponse> {
    let mut all = vec![("X-Ember-Invocation-Type", "Event")];
    all.extend_from_slice(headers);
    invoke(client, name, event, &all)
}

/// One part of a deploy: its name, file name, content type, bytes.
pub struct Part<'a> {
    /// `config`, `module` or `file`.
    pub name: &'a str,
    /// The file name (for `module` and `file`).
    pub file_name: Option<&'a str>,
    /// Its content type.
    pub content_type: &'a str,
    /// Its bytes.
    pub bytes: &'a [u8],
}

/// The `Content-Type` and body of a `PUT /functions/{name}`: `config`
/// (JSON), `module`, and a `file` part per `(name, bytes)` of `files`.
pub fn deploy_body(
    config: &serde_json::Value,
    module: &[u8],
    files: &[(String, Vec<u8>)],
) -> (String, Vec<u8>) {
    let config = config.to_string();
    let mut parts = vec![
        Part {
            name: "config",
            file_name: None,
            content_type: "application/json",
            bytes: config.as_bytes(),
        },
        Part {
            name: "module",
            file_name: Some("module.wasm"),
            content_type: "application/wasm",
            bytes: module,
        },
    ];
    for (name, bytes) in files {
        parts.push(Part {
            name: "file",
            file_name: Some(name),
            content_type: "application/octet-stream",
            bytes,
        });
    }
    multipart(&parts)
}

/// A multipart/form-data body of `parts`.
pub fn multipart(parts: &[Part<'_>]) -> (String, Vec<u8>) {
    // A boundary that cannot occur in the parts.
    let mut n: u64 = 0x9e37_79b9_7f4a_7c15;
    let boundary = loop {
        let candidate = format!("ember-boundary-{n:016x}");
        if !parts.iter().any(|p| {
            p.bytes
                .windows(candidate.len())
                .any(|w| w == candidate.as_bytes())
        }) {
            break candidate;
        }
        n = n.wrapping_mul(6364136223846793005).wrapping_add(1);
    };
    let mut body = Vec::new();
    for part in parts {
        let _ = write!(
            body,
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"",
            part.name
        );
        if let Some(file_name) = part.file_name {
            let _ = write!(body, "; filename=\"{file_name}\"");
        }
        let _ = write!(body, "\r\nContent-Type: {}\r\n\r\n", part.content_type);
        body.extend_from_slice(part.bytes);
        body.extend_from_slice(b"\r\n");
    }
    let _ = write!(body, "--{boundary}--\r\n");
    (format!("multipart/form-data; boundary={boundary}"), body)
}
