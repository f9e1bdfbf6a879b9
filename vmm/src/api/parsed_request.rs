//! Routes: HTTP request → [`VmmAction`], and [`VmmResponse`] → HTTP response.
//!
//! The paths and bodies are Firecracker's where Firecracker has them
//! (docs/vmm.md lists them); Ember's own live under `/ember/`.

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::http::{Request, Response};
use crate::rpc_interface::{GuestEnd, GuestTest, VmmAction, VmmData, VmmResponse};

/// Header carrying the host → guest → host time of a mailbox request.
pub const ROUND_TRIP_HEADER: &str = "X-Ember-Round-Trip-Us";

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
pub fn parse(request: &Request) -> Result<VmmAction, Response> {
    let method = request.method.as_str();
    let path = request.path.as_str();
    let action = match (method, path) {
        ("GET", "/") => VmmAction::GetInstanceInfo,
        ("PUT", "/boot-source") => VmmAction::PutBootSource(json_body(request)?),
        ("PUT", "/machine-config") => VmmAction::PutMachineConfig(json_body(request)?),
        ("GET", "/machine-config") => VmmAction::GetMachineConfig,
        ("PUT", "/actions") => {
            let body: ActionBody = json_body(request)?;
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
            let body: VmStateBody = json_body(request)?;
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
        ("GET", "/ember/status") => VmmAction::GetEmberStatus,
        ("POST", "/ember/ping") => VmmAction::Ping,
        ("POST", "/ember/echo") => VmmAction::Echo(request.body.clone()),
        ("POST", "/ember/test/crash") => VmmAction::TestGuest(GuestTest::Crash),
        ("POST", "/ember/test/reset") => VmmAction::TestGuest(GuestTest::Reset),
        ("POST", "/ember/test/bad-length") => VmmAction::TestGuest(GuestTest::BadLength),
        ("POST", "/ember/test/hang") => VmmAction::TestGuest(GuestTest::Hang),
        ("POST", "/ember/test/forbidden-syscall") => VmmAction::TestForbiddenSyscall,
        _ => {
            return Err(Response::fault(
                400,
                &format!("Invalid request method and/or path: {method} {path}"),
            ))
        }
    };
    Ok(action)
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
        Ok(VmmData::GuestEnded(GuestEnd::Reset)) => {
            Response::json(200, &serde_json::json!({ "reset": true }))
        }
        Err(e) => Response::fault(e.status(), &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc_interface::VmmActionError;

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
    fn routes_firecracker_paths() {
        assert_eq!(
            parse(&request("GET", "/", "")),
            Ok(VmmAction::GetInstanceInfo)
        );
        assert_eq!(
            parse(&request(
                "PUT",
                "/actions",
                r#"{"action_type": "InstanceStart"}"#
            )),
            Ok(VmmAction::InstanceStart)
        );
        assert_eq!(
            parse(&request(
                "PUT",
                "/actions",
                r#"{"action_type": "SendCtrlAltDel"}"#
            )),
            Ok(VmmAction::SendCtrlAltDel)
        );
        assert_eq!(
            parse(&request("PATCH", "/vm", r#"{"state": "Paused"}"#)),
            Ok(VmmAction::Pause)
        );
        assert_eq!(
            parse(&request("PATCH", "/vm", r#"{"state": "Resumed"}"#)),
            Ok(VmmAction::Resume)
        );
        assert!(matches!(
            parse(&request(
                "PUT",
                "/boot-source",
                r#"{"kernel_image_path": "/k", "boot_args": "x"}"#
            )),
            Ok(VmmAction::PutBootSource(_))
        ));
        assert_eq!(
            parse(&request("POST", "/ember/echo", "abc")),
            Ok(VmmAction::Echo(b"abc".to_vec()))
        );
    }

    #[test]
    fn refuses_unknown_paths_and_bad_bodies_by_name() {
        let (status, text) = fault(parse(&request("GET", "/nope", "")).unwrap_err());
        assert_eq!(status, 400);
        assert_eq!(text, "Invalid request method and/or path: GET /nope");

        let (status, text) = fault(parse(&request("DELETE", "/", "")).unwrap_err());
        assert_eq!(status, 400);
        assert!(text.contains("DELETE /"), "{text}");

        let (status, text) =
            fault(parse(&request("PUT", "/machine-config", "{vcpu_count: 1")).unwrap_err());
        assert_eq!(status, 400);
        assert!(
            text.starts_with("Cannot parse the body of PUT /machine-config"),
            "{text}"
        );

        let (_, text) = fault(
            parse(&request(
                "PUT",
                "/actions",
                r#"{"action_type": "FlushMetrics"}"#,
            ))
            .unwrap_err(),
        );
        assert!(text.contains("FlushMetrics"), "{text}");

        let (_, text) =
            fault(parse(&request("PATCH", "/vm", r#"{"state": "Sleeping"}"#)).unwrap_err());
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
}
