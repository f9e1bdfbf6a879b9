//! A small HTTP/1.1 server-side codec for the control socket, over httparse.
//!
//! Requests carry bodies by Content-Length only (as curl and Firecracker's
//! clients send them); `Expect: 100-continue` is honoured; keep-alive and
//! pipelining work. Limits: 16 KiB of headers, [`MAX_BODY`] of body.

use serde::Serialize;

/// Longest request head (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;

/// Longest request body: a mailbox area (an event is at most 6 MiB).
pub const MAX_BODY: usize = 8 << 20;

/// Most headers in a request.
const MAX_HEADERS: usize = 32;

/// A complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The path, without any query string.
    pub path: String,
    /// The body (empty without Content-Length).
    pub body: Vec<u8>,
    /// The client asked to close the connection after this request.
    pub close: bool,
}

/// A response to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Extra headers.
    pub headers: Vec<(&'static str, String)>,
    /// Content type of the body, if there is one.
    pub content_type: Option<&'static str>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// 204 No Content.
    pub fn no_content() -> Response {
        Response {
            status: 204,
            headers: Vec::new(),
            content_type: None,
            body: Vec::new(),
        }
    }

    /// A JSON body.
    pub fn json<T: Serialize>(status: u16, value: &T) -> Response {
        match serde_json::to_vec(value) {
            Ok(body) => Response {
                status,
                headers: Vec::new(),
                content_type: Some("application/json"),
                body,
            },
            Err(e) => Response::fault(500, &format!("cannot encode the response: {e}")),
        }
    }

    /// Firecracker's error body: `{"fault_message": "..."}`.
    pub fn fault(status: u16, message: &str) -> Response {
        Response::json(status, &serde_json::json!({ "fault_message": message }))
    }

    /// Raw bytes.
    pub fn bytes(status: u16, body: Vec<u8>) -> Response {
        Response {
            status,
            headers: Vec::new(),
            content_type: Some("application/octet-stream"),
            body,
        }
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &'static str, value: String) -> Response {
        self.headers.push((name, value));
        self
    }

    /// The response as bytes on the wire.
    pub fn encode(&self, close: bool) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(close, &mut out);
        out
    }

    /// Appends the response, as bytes on the wire, to `out`.
    pub fn encode_into(&self, close: bool, out: &mut Vec<u8>) {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nServer: ember-vmm\r\n",
            self.status,
            reason(self.status)
        );
        if close {
            head.push_str("Connection: close\r\n");
        }
        if self.status != 204 {
            if let Some(content_type) = self.content_type {
                head.push_str(&format!("Content-Type: {content_type}\r\n"));
            }
            head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        out.extend_from_slice(head.as_bytes());
        if self.status != 204 {
            out.extend_from_slice(&self.body);
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// What the bytes received so far amount to.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request yet.
    Incomplete,
    /// The head is complete and asks for `100 Continue` before the body.
    ExpectsContinue,
    /// A whole request, taken out of the input.
    Request(Request),
    /// A request that cannot be served; answer and close the connection.
    Invalid(Response),
}

/// Bodies at least this long are read into a buffer of their own length
/// and moved out of it, not copied (see [`parse_request`]).
pub const LARGE_BODY: usize = 64 * 1024;

/// Takes the first request out of `input` once it is whole, leaving what
/// follows it. A large body ([`LARGE_BODY`]) moves out of the buffer
/// rather than being copied: an event of megabytes would be copied into
/// fresh memory, a page fault per 4 KiB in a new process. A small one is
/// copied, and the buffer keeps its capacity for the next request.
/// `continue_sent` tells whether the `100 Continue` for it has already
/// gone out.
pub fn parse_request(input: &mut Vec<u8>, continue_sent: bool) -> Parsed {
    match parse_head(input, continue_sent) {
        Ok(head) => {
            let body = if head.total - head.len >= LARGE_BODY {
                let rest = input.split_off(head.total);
                let mut body = std::mem::replace(input, rest);
                body.drain(..head.len);
                body
            } else {
                let body = input[head.len..head.total].to_vec();
                input.drain(..head.total);
                body
            };
            Parsed::Request(Request {
                method: head.method,
                path: head.path,
                body,
                close: head.close,
            })
        }
        Err(parsed) => parsed,
    }
}

/// The length of the first request in `buf`, head and body, once its head
/// is complete and valid (the body may not all be there yet).
pub fn request_len(buf: &[u8]) -> Option<usize> {
    read_head(buf).ok().map(|head| head.total)
}

/// Whether `buf` holds something to answer: a whole request, or one to
/// refuse (without copying a body to find out).
pub fn has_request(buf: &[u8], continue_sent: bool) -> bool {
    !matches!(parse_head(buf, continue_sent), Err(Parsed::Incomplete))
}

/// A whole request's head: what it asks, and where its body ends.
struct Head {
    method: String,
    path: String,
    close: bool,
    /// Bytes of head.
    len: usize,
    /// Bytes of head and body.
    total: usize,
    /// It asks for `100 Continue` before the body.
    expects_continue: bool,
}

/// The head of the first request in `buf` once the whole request is
/// there; otherwise what `parse_request` answers.
fn parse_head(buf: &[u8], continue_sent: bool) -> Result<Head, Parsed> {
    let head = read_head(buf)?;
    if buf.len() < head.total {
        if head.expects_continue && !continue_sent && buf.len() == head.len {
            return Err(Parsed::ExpectsContinue);
        }
        return Err(Parsed::Incomplete);
    }
    Ok(head)
}

/// The head of the first request in `buf` once the head is complete,
/// checked (the body may still be coming).
fn read_head(buf: &[u8]) -> Result<Head, Parsed> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => {
            return Err(Parsed::Invalid(Response::fault(
                431,
                &format!("request head exceeds {MAX_HEAD} bytes"),
            )));
        }
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(Parsed::Invalid(Response::fault(
                431,
                &format!("request head exceeds {MAX_HEAD} bytes"),
            )));
        }
        Ok(httparse::Status::Partial) => return Err(Parsed::Incomplete),
        Err(e) => {
            return Err(Parsed::Invalid(Response::fault(
                400,
                &format!("malformed HTTP request: {e}"),
            )))
        }
    };
    let method = request.method.unwrap_or_default().to_string();
    let path = request.path.unwrap_or_default();
    let path = path.split('?').next().unwrap_or_default().to_string();

    let mut content_length = None;
    let mut expects_continue = false;
    let mut close = request.version == Some(0);
    for header in request.headers.iter() {
        let value = String::from_utf8_lossy(header.value);
        let value = value.trim();
        if header.name.eq_ignore_ascii_case("content-length") {
            let Ok(len) = value.parse::<usize>() else {
                return Err(Parsed::Invalid(Response::fault(
                    400,
                    &format!("bad Content-Length: {value:?}"),
                )));
            };
            if content_length.is_some_and(|l| l != len) {
                return Err(Parsed::Invalid(Response::fault(
                    400,
                    "conflicting Content-Length headers",
                )));
            }
            content_length = Some(len);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Parsed::Invalid(Response::fault(
                400,
                "Transfer-Encoding is not supported: send the body with Content-Length",
            )));
        } else if header.name.eq_ignore_ascii_case("expect") {
            expects_continue = value.eq_ignore_ascii_case("100-continue");
        } else if header.name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    let body_len = content_length.unwrap_or(0);
    if body_len > MAX_BODY {
        return Err(Parsed::Invalid(Response::fault(
            413,
            &format!("request body of {body_len} bytes exceeds the API limit of {MAX_BODY} bytes"),
        )));
    }
    Ok(Head {
        method,
        path,
        close,
        len: head_len,
        total: head_len + body_len,
        expects_continue,
    })
}

/// The interim response to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_request_with_body() {
        let raw =
            b"PUT /machine-config HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}GET /";
        let mut input = raw.to_vec();
        assert_eq!(request_len(raw), Some(raw.len() - 5));
        assert_eq!(request_len(&raw[..20]), None);
        match parse_request(&mut input, false) {
            Parsed::Request(req) => {
                // What follows stays for the next request.
                assert_eq!(input, b"GET /");
                assert_eq!(req.method, "PUT");
                assert_eq!(req.path, "/machine-config");
                assert_eq!(req.body, b"{}");
                assert!(!req.close);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_large_body_moves_out_and_a_small_one_leaves_the_buffer_its_capacity() {
        let head = format!("POST /ember/invoke HTTP/1.1\r\nContent-Length: {LARGE_BODY}\r\n\r\n");
        let mut input = head.clone().into_bytes();
        input.extend(std::iter::repeat_n(7u8, LARGE_BODY));
        input.extend_from_slice(b"GET /");
        let body_at = input.as_ptr() as usize + head.len();
        match parse_request(&mut input, false) {
            Parsed::Request(req) => {
                assert_eq!(req.body.len(), LARGE_BODY);
                assert!(req.body.iter().all(|&b| b == 7));
                // The body's buffer is the one it was read into.
                assert_eq!(req.body.as_ptr() as usize, body_at - head.len());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(input, b"GET /");
        let mut small = b"PUT /x HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".to_vec();
        small.reserve(1000);
        let capacity = small.capacity();
        assert!(matches!(parse_request(&mut small, false), Parsed::Request(r) if r.body == b"{}"));
        assert!(small.is_empty() && small.capacity() == capacity);
    }

    #[test]
    fn waits_for_the_rest() {
        assert_eq!(
            parse_request(&mut b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec(), false),
            Parsed::Incomplete
        );
        assert_eq!(
            parse_request(
                &mut b"PUT /x HTTP/1.1\r\nContent-Length: 10\r\n\r\n12345".to_vec(),
                false
            ),
            Parsed::Incomplete
        );
    }

    #[test]
    fn honours_expect_continue_once() {
        let head =
            b"POST /ember/echo HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n";
        assert_eq!(
            parse_request(&mut head.to_vec(), false),
            Parsed::ExpectsContinue
        );
        assert_eq!(parse_request(&mut head.to_vec(), true), Parsed::Incomplete);
        let mut whole = head.to_vec();
        whole.extend_from_slice(b"abc");
        assert!(matches!(
            parse_request(&mut whole.to_vec(), true),
            Parsed::Request(..)
        ));
    }

    #[test]
    fn refuses_bad_requests_by_name() {
        let check =
            |raw: &[u8], status: u16, text: &str| match parse_request(&mut raw.to_vec(), false) {
                Parsed::Invalid(resp) => {
                    assert_eq!(resp.status, status);
                    let body = String::from_utf8(resp.body).unwrap();
                    assert!(body.contains(text), "{body}");
                }
                other => panic!("{other:?}"),
            };
        check(b"GARBAGE\x01\r\n\r\n", 400, "malformed HTTP request");
        check(
            b"PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            400,
            "bad Content-Length",
        );
        check(
            b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
            "Content-Length",
        );
        check(
            b"PUT / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
            413,
            "exceeds the API limit",
        );
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEAD + 1));
        check(&huge, 431, "request head exceeds");
        // A whole head above the limit too: with the body limit, every
        // request that parses fits the server's input buffer.
        let mut complete = b"GET / HTTP/1.1\r\nX: ".to_vec();
        complete.extend(std::iter::repeat_n(b'a', MAX_HEAD));
        complete.extend_from_slice(b"\r\n\r\n");
        check(&complete, 431, "request head exceeds");
    }

    #[test]
    fn encodes_responses() {
        let wire = Response::fault(400, "bad").encode(false);
        let text = String::from_utf8(wire).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(text.ends_with("\r\n\r\n{\"fault_message\":\"bad\"}"));
        assert!(text.contains("Content-Length: 23\r\n"));
        let none = String::from_utf8(Response::no_content().encode(true)).unwrap();
        assert_eq!(
            none,
            "HTTP/1.1 204 No Content\r\nServer: ember-vmm\r\nConnection: close\r\n\r\n"
        );
    }
}
