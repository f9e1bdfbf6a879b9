//! A small blocking HTTP/1.1 client for the control socket, used by the
//! benchmarks, the integration tests and (later) the agent's supervisor.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Bodies up to this size are copied behind the head and sent in one write.
const SMALL_BODY: usize = 64 << 10;

/// A response from ember-vmm.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    /// Status code.
    pub status: u16,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl ApiResponse {
    /// The value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The `fault_message` of an error body.
    pub fn fault_message(&self) -> Option<String> {
        self.json()
            .get("fault_message")
            .and_then(|m| m.as_str())
            .map(str::to_string)
    }
}

/// A keep-alive connection to an ember-vmm control socket.
pub struct ApiClient {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl ApiClient {
    /// Connects to the socket at `path`.
    pub fn connect(path: &Path) -> io::Result<ApiClient> {
        let stream = UnixStream::connect(path)?;
        Ok(ApiClient {
            stream,
            buf: Vec::new(),
        })
    }

    /// Bounds how long a request may wait for its response.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(timeout)
    }

    /// `GET path`.
    pub fn get(&mut self, path: &str) -> io::Result<ApiResponse> {
        self.request("GET", path, None)
    }

    /// `PUT path` with a JSON body.
    pub fn put_json(&mut self, path: &str, body: &serde_json::Value) -> io::Result<ApiResponse> {
        self.request("PUT", path, Some(body.to_string().as_bytes()))
    }

    /// `PATCH path` with a JSON body.
    pub fn patch_json(&mut self, path: &str, body: &serde_json::Value) -> io::Result<ApiResponse> {
        self.request("PATCH", path, Some(body.to_string().as_bytes()))
    }

    /// `POST path` with raw bytes.
    pub fn post(&mut self, path: &str, body: &[u8]) -> io::Result<ApiResponse> {
        self.request("POST", path, Some(body))
    }

    /// Sends one request and reads its response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> io::Result<ApiResponse> {
        self.request_with_headers(method, path, &[], body)
    }

    /// Sends one request with extra `headers` and reads its response.
    pub fn request_with_headers(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> io::Result<ApiResponse> {
        let body = body.unwrap_or_default();
        let mut message =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n").into_bytes();
        for (name, value) in headers {
            message.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        if !body.is_empty() || method != "GET" {
            message.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
        }
        message.extend_from_slice(b"\r\n");
        // A small body rides with the head in one write; a large one (an
        // event of up to 6 MiB) is written from where it is, not copied.
        if body.len() <= SMALL_BODY {
            message.extend_from_slice(body);
            self.stream.write_all(&message)?;
        } else {
            self.stream.write_all(&message)?;
            self.stream.write_all(body)?;
        }
        self.read_response()
    }

    /// Sends raw bytes and does not wait for a response.
    pub fn send_raw_no_wait(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Sends raw bytes, for testing what the server makes of them.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<ApiResponse> {
        self.stream.write_all(bytes)?;
        self.read_response()
    }

    /// Reads the next response (after [`ApiClient::send_raw`] of several
    /// pipelined requests).
    pub fn read_response(&mut self) -> io::Result<ApiResponse> {
        loop {
            if let Some((response, used)) = parse_response(&self.buf)? {
                self.buf.drain(..used);
                return Ok(response);
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "ember-vmm closed the connection before a whole response",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// A whole response at the start of `buf` and its length, if there is one.
fn parse_response(buf: &[u8]) -> io::Result<Option<(ApiResponse, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
    };
    let status = response.code.unwrap_or(0);
    let headers: Vec<(String, String)> = response
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).trim().to_string(),
            )
        })
        .collect();
    if status == 100 {
        // An interim response: skip it and parse what follows.
        return Ok(parse_response(&buf[head..])?.map(|(r, used)| (r, used + head)));
    }
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    if buf.len() < head + length {
        return Ok(None);
    }
    Ok(Some((
        ApiResponse {
            status,
            headers,
            body: buf[head..head + length].to_vec(),
        },
        head + length,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_responses_with_and_without_bodies() {
        let raw = b"HTTP/1.1 204 No Content\r\nServer: ember-vmm\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Ember-Round-Trip-Us: 7\r\n\r\nhi";
        let (first, used) = parse_response(raw).unwrap().unwrap();
        assert_eq!(first.status, 204);
        let (second, rest) = parse_response(&raw[used..]).unwrap().unwrap();
        assert_eq!(second.status, 200);
        assert_eq!(second.body, b"hi");
        assert_eq!(second.header("x-ember-round-trip-us"), Some("7"));
        assert_eq!(used + rest, raw.len());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
                .unwrap()
                .is_none()
        );
    }
}
