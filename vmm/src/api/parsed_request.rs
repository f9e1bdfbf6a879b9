//! Routes: HTTP request → [`VmmAction`], and [`VmmResponse`] → HTTP response.
//!
//! The paths and bodies are Firecracker's where Firecracker has them
//! (docs/vmm.md lists them); Ember's own live under `/ember/`.

use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::http::{Request, Response};
use crate::rpc_interface::{GuestEnd, GuestTest, VmmAction, VmmData, VmmResponse};
use crate::vmm_config::function::FunctionConfig;

/// Header carrying the host → guest → host time of a mailbox request.
pub const ROUND_TRIP_HEADER: &str = "X-Ember-Round-Trip-Us";
/// Header carrying the time an invocation spent in the function.
pub const DURATION_HEADER: &str = "X-Ember-Duration-Us";
/// Header carrying the end of the function's stderr, base64.
pub const LOG_HEADER: &str = "X-Ember-Log";
/// Header naming how a function failed.
pub const FUNCTION_ERROR_HEADER: &str = "X-Ember-Function-Error";
/// Bytes of log in [`LOG_HEADER`]: 3 KiB, 4 KiB once in base64.
pub const LOG_HEADER_BYTES: usize = 3072;

/// The body of `PUT /actions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: String,
}

/// The body of `PATCH /vm`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmStateBody {
    state: String,
}

/// The action a request asks for, or the response refusing it.
pub fn parse(request: Request) -> Result<VmmAction, Response> {
    let method = request.method.as_str();
    let path = request.path.as_str();
    let action = match (method, path) {
        ("GET", "/") => VmmAction::GetInstanceInfo,
        ("PUT", "/boot-source") => VmmAction::PutBootSource(json_body(&request)?),
        ("PUT", "/machine-config") => VmmAction::PutMachineConfig(json_body(&request)?),
        ("GET", "/machine-config") => VmmAction::GetMachineConfig,
        ("PUT", "/actions") => {
            let body: ActionBody = json_body(&request)?;
            match body.action_type.as_str() {
                "InstanceStart" => VmmAction::InstanceStart,
                "SendCtrlAltDel" => VmmAction::SendCtrlAltDel,
                other => {
                    return Err(Response::fault(
                        400,
                        &format!("unsupported action_type {other:?}: ember-vmm knows InstanceStart and SendCtrlAltDel"),
                    ))
                }
            }
        }
        ("PATCH", "/vm") => {
            let body: VmStateBody = json_body(&request)?;
            match body.state.as_str() {
                "Paused" => VmmAction::Pause,
                "Resumed" => VmmAction::Resume,
                other => {
                    return Err(Response::fault(
                        400,
                        &format!("unknown state {other:?}: expected \"Paused\" or \"Resumed\""),
                    ))
                }
            }
        }
        ("PUT", "/snapshot/create") => VmmAction::CreateSnapshot(json_body(&request)?),
        ("PUT", "/snapshot/load") => {
            let params: crate::vmm_config::snapshot::LoadSnapshotParams = json_body(&request)?;
            if let Err(e) = params.memory_path() {
                return Err(Response::fault(
                    400,
                    &format!("Cannot load the snapshot: {e}"),
                ));
            }
            VmmAction::LoadSnapshot(params)
        }
        ("GET", "/ember/status") => VmmAction::GetEmberStatus,
        ("POST", "/ember/ping") => VmmAction::Ping,
        // The body moves into the action: an event is not copied here.
        ("POST", "/ember/echo") => VmmAction::Echo(request.body),
        ("PUT", "/ember/function") => {
            let config: FunctionConfig = json_body(&request)?;
            let bundle = config
                .read(entropy()?)
                .map_err(|e| Response::fault(400, &format!("Cannot load the function: {e}")))?;
            VmmAction::LoadFunction(Box::new(bundle))
        }
        ("POST", "/ember/invoke") => VmmAction::Invoke(request.body),
        ("GET", "/ember/stats") => VmmAction::GetGuestStats,
        ("POST", "/ember/test/crash") => VmmAction::TestGuest(GuestTest::Crash),
        ("POST", "/ember/test/reset") => VmmAction::TestGuest(GuestTest::Reset),
        ("POST", "/ember/test/bad-length") => VmmAction::TestGuest(GuestTest::BadLength),
        ("POST", "/ember/test/hang") => VmmAction::TestGuest(GuestTest::Hang),
        ("POST", "/ember/test/doorbell-loop") => VmmAction::TestGuest(GuestTest::DoorbellLoop),
        ("POST", "/ember/test/maximal-answer") => {
            let code = std::str::from_utf8(&request.body)
                .ok()
                .map(str::trim)
                .and_then(|t| {
                    if t.is_empty() {
                        Some(0)
                    } else {
                        t.parse::<u32>().ok()
                    }
                })
                .ok_or_else(|| {
                    Response::fault(
                        400,
                        "the body is a message kind's code, in decimal (empty: the usual kind)",
                    )
                })?;
            VmmAction::TestGuest(GuestTest::MaximalAnswer(code))
        }
        ("POST", "/ember/test/console-flood") => {
            let bytes = std::str::from_utf8(&request.body)
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok())
                .ok_or_else(|| {
                    Response::fault(400, "the body is how many bytes to write, in decimal")
                })?;
            VmmAction::TestGuest(GuestTest::ConsoleFlood(bytes))
        }
        ("POST", "/ember/test/forbidden-syscall") => {
            VmmAction::TestForbiddenSyscall(crate::seccomp::ThreadKind::Vmm)
        }
        ("POST", "/ember/test/forbidden-syscall/vcpu") => {
            VmmAction::TestForbiddenSyscall(crate::seccomp::ThreadKind::Vcpu)
        }
        ("POST", "/ember/test/forbidden-syscall/prefetch") => {
            VmmAction::TestForbiddenSyscall(crate::seccomp::ThreadKind::Prefetch)
        }
        _ => {
            return Err(Response::fault(
                400,
                &format!("Invalid request method and/or path: {method} {path}"),
            ))
        }
    };
    Ok(action)
}

/// 32 bytes from the kernel's generator, for a function's random numbers.
fn entropy() -> Result<[u8; 32], Response> {
    let mut seed = [0u8; 32];
    crate::persist::getrandom_into(&mut seed)
        .map_err(|e| Response::fault(500, &format!("cannot get entropy: {e}")))?;
    Ok(seed)
}

/// Decodes a JSON body, or a 400 naming the request and the problem.
fn json_body<T: DeserializeOwned>(request: &Request) -> Result<T, Response> {
    serde_json::from_slice(&request.body).map_err(|e| {
        Response::fault(
            400,
            &format!(
                "Cannot parse the body of {} {}: {e}",
                request.method, request.path
            ),
        )
    })
}

/// The HTTP response for the VMM thread's answer.
pub fn response(answer: VmmResponse) -> Response {
    match answer {
        Ok(VmmData::Empty) => Response::no_content(),
        Ok(VmmData::InstanceInfo(info)) => Response::json(200, &info),
        Ok(VmmData::MachineConfig(config)) => Response::json(200, &config),
        Ok(VmmData::Status(status)) => Response::json(200, &status),
        Ok(VmmData::Pong { round_trip_us }) => {
            Response::json(200, &serde_json::json!({ "round_trip_us": round_trip_us }))
                .with_header(ROUND_TRIP_HEADER, round_trip_us.to_string())
        }
        Ok(VmmData::Echo {
            payload,
            round_trip_us,
        }) => {
            Response::bytes(200, payload).with_header(ROUND_TRIP_HEADER, round_trip_us.to_string())
        }
        Ok(VmmData::GuestEnded(GuestEnd::Crash(info))) => {
            Response::json(200, &serde_json::json!({ "crash": info }))
        }
        Ok(VmmData::FunctionLoaded(info)) => Response::json(200, &info),
        Ok(VmmData::GuestStats(stats)) => Response::json(200, &stats),
        Ok(VmmData::SnapshotCreated(created)) => Response::json(200, &created),
        Ok(VmmData::SnapshotLoaded(loaded)) => Response::json(200, &loaded),
        Ok(VmmData::Invoked(invocation)) => {
            let log = &invocation.log[invocation.log.len().saturating_sub(LOG_HEADER_BYTES)..];
            let response = match invocation.result {
                Ok(result) => Response::bytes(200, result),
                Err((kind, message)) => Response::json(
                    200,
                    &serde_json::json!({ "error": { "kind": kind.name(), "message": message } }),
                )
                .with_header(FUNCTION_ERROR_HEADER, kind.name().to_string()),
            };
            response
                .with_header(DURATION_HEADER, invocation.duration_us.to_string())
                .with_header(ROUND_TRIP_HEADER, invocation.round_trip_us.to_string())
                .with_header(
                    LOG_HEADER,
                    base64::engine::general_purpose::STANDARD.encode(log),
                )
        }
        Ok(VmmData::GuestEnded(GuestEnd::Reset)) => {
            Response::json(200, &serde_json::json!({ "reset": true }))
        }
        Err(e) => Response::fault(e.status(), &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc_interface::{Invocation, VmmActionError};

    fn request(method: &str, path: &str, body: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            body: body.as_bytes().to_vec(),
            close: false,
        }
    }

    fn fault(response: Response) -> (u16, String) {
        let value: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        (
            response.status,
            value["fault_message"].as_str().unwrap().to_string(),
        )
    }

    #[test]
    fn guest_tests_take_their_number_in_decimal() {
        let arm = |body| parse(request("POST", "/ember/test/maximal-answer", body));
        let kind = |code| Ok(VmmAction::TestGuest(GuestTest::MaximalAnswer(code)));
        assert_eq!(arm(""), kind(0));
        assert_eq!(arm("9\n"), kind(9));
        assert_eq!(arm("57005"), kind(0xdead));
        for bad in ["-1", "nine", "4294967296"] {
            let (status, text) = fault(arm(bad).unwrap_err());
            assert_eq!(status, 400, "{bad}");
            assert!(text.contains("message kind"), "{text}");
        }
        let flood = |body| parse(request("POST", "/ember/test/console-flood", body));
        assert_eq!(
            flood("65536"),
            Ok(VmmAction::TestGuest(GuestTest::ConsoleFlood(65536)))
        );
        let (status, text) = fault(flood("").unwrap_err());
        assert_eq!(status, 400);
        assert!(text.contains("how many bytes"), "{text}");
    }

    #[test]
    fn routes_firecracker_paths() {
        assert_eq!(
            parse(request("GET", "/", "")),
            Ok(VmmAction::GetInstanceInfo)
        );
        assert_eq!(
            parse(request(
                "PUT",
                "/actions",
                r#"{"action_type": "InstanceStart"}"#
            )),
            Ok(VmmAction::InstanceStart)
        );
        assert_eq!(
            parse(request(
                "PUT",
                "/actions",
                r#"{"action_type": "SendCtrlAltDel"}"#
            )),
            Ok(VmmAction::SendCtrlAltDel)
        );
        assert_eq!(
            parse(request("PATCH", "/vm", r#"{"state": "Paused"}"#)),
            Ok(VmmAction::Pause)
        );
        assert_eq!(
            parse(request("PATCH", "/vm", r#"{"state": "Resumed"}"#)),
            Ok(VmmAction::Resume)
        );
        assert!(matches!(
            parse(request(
                "PUT",
                "/boot-source",
                r#"{"kernel_image_path": "/k", "boot_args": "x"}"#
            )),
            Ok(VmmAction::PutBootSource(_))
        ));
        assert_eq!(
            parse(request("POST", "/ember/echo", "abc")),
            Ok(VmmAction::Echo(b"abc".to_vec()))
        );
    }

    #[test]
    fn refuses_unknown_paths_and_bad_bodies_by_name() {
        let (status, text) = fault(parse(request("GET", "/nope", "")).unwrap_err());
        assert_eq!(status, 400);
        assert_eq!(text, "Invalid request method and/or path: GET /nope");

        let (status, text) = fault(parse(request("DELETE", "/", "")).unwrap_err());
        assert_eq!(status, 400);
        assert!(text.contains("DELETE /"), "{text}");

        let (status, text) =
            fault(parse(request("PUT", "/machine-config", "{vcpu_count: 1")).unwrap_err());
        assert_eq!(status, 400);
        assert!(
            text.starts_with("Cannot parse the body of PUT /machine-config"),
            "{text}"
        );

        let (_, text) = fault(
            parse(request(
                "PUT",
                "/actions",
                r#"{"action_type": "FlushMetrics"}"#,
            ))
            .unwrap_err(),
        );
        assert!(text.contains("FlushMetrics"), "{text}");

        let (_, text) =
            fault(parse(request("PATCH", "/vm", r#"{"state": "Sleeping"}"#)).unwrap_err());
        assert!(text.contains("Sleeping"), "{text}");
    }

    #[test]
    fn maps_answers_to_statuses() {
        assert_eq!(response(Ok(VmmData::Empty)).status, 204);
        let echo = response(Ok(VmmData::Echo {
            payload: b"xyz".to_vec(),
            round_trip_us: 42,
        }));
        assert_eq!(echo.body, b"xyz");
        assert!(echo.headers.contains(&(ROUND_TRIP_HEADER, "42".into())));
        assert_eq!(response(Err(VmmActionError::AlreadyStarted)).status, 400);
        assert_eq!(response(Err(VmmActionError::GuestTimeout(10))).status, 504);
        assert_eq!(
            response(Err(VmmActionError::GuestCrashed("x".into()))).status,
            500
        );
    }

    #[test]
    fn invocations_are_200_with_the_result_or_the_function_error() {
        use base64::Engine as _;
        use ember_abi::function::ErrorKind;

        let header = |r: &Response, name: &str| {
            r.headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
        };
        let ok = response(Ok(VmmData::Invoked(Box::new(Invocation {
            result: Ok(b"result".to_vec()),
            log: b"log line\n".to_vec(),
            duration_us: 17,
            round_trip_us: 30,
        }))));
        assert_eq!((ok.status, ok.body.as_slice()), (200, &b"result"[..]));
        assert_eq!(header(&ok, DURATION_HEADER).as_deref(), Some("17"));
        assert_eq!(header(&ok, ROUND_TRIP_HEADER).as_deref(), Some("30"));
        assert_eq!(header(&ok, FUNCTION_ERROR_HEADER), None);
        let log = base64::engine::general_purpose::STANDARD
            .decode(header(&ok, LOG_HEADER).unwrap())
            .unwrap();
        assert_eq!(log, b"log line\n");

        // A long log: its end, and the header stays within 4 KiB.
        let long: Vec<u8> = (0..10_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let failed = response(Ok(VmmData::Invoked(Box::new(Invocation {
            result: Err((ErrorKind::Trap, "wasm trap: unreachable".into())),
            log: long.clone(),
            duration_us: 5,
            round_trip_us: 9,
        }))));
        assert_eq!(failed.status, 200);
        assert_eq!(
            header(&failed, FUNCTION_ERROR_HEADER).as_deref(),
            Some("trap")
        );
        let body: serde_json::Value = serde_json::from_slice(&failed.body).unwrap();
        assert_eq!(body["error"]["kind"], "trap");
        assert_eq!(body["error"]["message"], "wasm trap: unreachable");
        let encoded = header(&failed, LOG_HEADER).unwrap();
        assert!(encoded.len() <= 4096, "{}", encoded.len());
        let tail = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert!(long.ends_with(&tail) && tail.len() == LOG_HEADER_BYTES);
    }
}
