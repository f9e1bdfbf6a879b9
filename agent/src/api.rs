//! emberd's HTTP API (docs/api.yaml): axum on a Unix socket.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Multipart, Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::functions::{check_file_name, FunctionConfig};
use crate::host::{lock, Agent, ApiError, MAX_EVENT_BYTES};

/// Header naming the instance that served (and that a caller may ask for).
pub const INSTANCE_HEADER: &str = "x-ember-instance";
/// Header carrying the caller's affinity key.
pub const AFFINITY_HEADER: &str = "x-ember-affinity";
/// Header: warm or restored.
pub const START_HEADER: &str = "x-ember-start";
/// Header: the version that served.
pub const VERSION_HEADER: &str = "x-ember-version";
/// Header: the invocation's id (also in emberd's log lines about it).
pub const INVOCATION_ID_HEADER: &str = "x-ember-invocation-id";

/// The largest deploy (module plus files).
const MAX_DEPLOY_BYTES: usize = 64 << 20;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (
            status,
            Json(json!({ "error": { "kind": self.kind, "message": self.message } })),
        )
            .into_response();
        if let Some(seconds) = self.retry_after {
            if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert("retry-after", value);
            }
        }
        response
    }
}

/// Files a deploy may bundle.
const MAX_FILES: usize = 1000;

/// A multipart error as the API reports it (413 for a body over the limit).
fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            413,
            "payload_too_large",
            format!("the deploy is larger than the limit of {MAX_DEPLOY_BYTES} bytes"),
        )
    } else {
        bad(format!("malformed multipart body: {e}"))
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(400, "bad_request", message)
}

/// The router.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/functions", get(list_functions))
        .route(
            "/functions/{name}",
            get(get_function)
                .put(deploy)
                .delete(delete_function)
                .layer(DefaultBodyLimit::max(MAX_DEPLOY_BYTES)),
        )
        .route("/functions/{name}/invoke", post(invoke))
        .route("/instances", get(instances))
        .route("/instances/{id}", axum::routing::delete(delete_instance))
        .fallback(|| async { ApiError::new(404, "not_found", "no such path") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                405,
                "method_not_allowed",
                "this path does not take that method",
            )
        })
        .with_state(agent)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(ApiError::new(
            500,
            "internal",
            format!("a worker failed: {e}"),
        ))
    })
}

async fn health(State(agent): State<Arc<Agent>>) -> Json<serde_json::Value> {
    let instances = lock(&agent.pools).instances.len();
    Json(json!({
        "status": if agent.draining.load(Ordering::Relaxed) { "draining" } else { "ok" },
        "functions": agent.functions().len(),
        "instances": instances,
        "prepared_vmms": agent.prepared_count(),
        "in_flight": agent.in_flight.load(Ordering::Relaxed),
    }))
}

async fn list_functions(State(agent): State<Arc<Agent>>) -> Json<serde_json::Value> {
    Json(json!(agent.functions()))
}

async fn get_function(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let v = agent.current(&name)?;
    let instances = lock(&agent.pools)
        .instances
        .values()
        .filter(|i| i.function == name)
        .count();
    let mut value = json!(*v);
    value["instances"] = json!(instances);
    Ok(Json(value))
}

async fn delete_function(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    blocking(move || agent.delete_function(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn deploy(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mut multipart = multipart.map_err(|e| {
        bad(format!(
            "the body must be multipart/form-data with a boundary: {e}"
        ))
    })?;
    let mut config: Option<FunctionConfig> = None;
    let mut module: Option<Bytes> = None;
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    // The first problem is reported once the whole body is read: a client
    // still sending when the answer comes may never see it.
    let mut problem: Option<ApiError> = None;
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => {
                problem.get_or_insert(multipart_error(e));
                break;
            }
        };
        let part = field.name().unwrap_or_default().to_string();
        let file_name = field.file_name().map(str::to_string);
        let bytes = match field.bytes().await {
            Ok(bytes) => bytes,
            Err(e) => {
                problem.get_or_insert(multipart_error(e));
                break;
            }
        };
        if problem.is_some() {
            continue;
        }
        let outcome = (|| -> Result<(), ApiError> {
            match part.as_str() {
                "config" => {
                    config = Some(
                        serde_json::from_slice(&bytes)
                            .map_err(|e| bad(format!("the config part is not valid: {e}")))?,
                    )
                }
                "module" => module = Some(bytes),
                "file" => {
                    let name = file_name.ok_or_else(|| bad("a file part needs a file name"))?;
                    check_file_name(&name)?;
                    if files.len() <= MAX_FILES && files.iter().any(|(n, _)| *n == name) {
                        return Err(bad(format!("file {name:?} is given twice")));
                    }
                    files.push((name, bytes.to_vec()));
                }
                other => {
                    return Err(bad(format!(
                        "unknown part {other:?}: expected config, module, file"
                    )))
                }
            }
            Ok(())
        })();
        if let Err(e) = outcome {
            problem = Some(e);
        }
    }
    if let Some(problem) = problem {
        return Err(problem);
    }
    crate::functions::check_name(&name)?;
    if files.len() > MAX_FILES {
        return Err(bad(format!("{} files; at most {MAX_FILES}", files.len())));
    }
    let module = module.ok_or_else(|| bad("no module part"))?;
    if !module.starts_with(b"\0asm") {
        return Err(ApiError::new(
            400,
            "invalid_function",
            "the module is not WebAssembly (no \\0asm header)",
        ));
    }
    let config = config.unwrap_or_default();
    let deployed = blocking(move || agent.deploy(&name, config, &module, &files)).await?;
    Ok(Json(deployed))
}

fn header(headers: &HeaderMap, name: &str) -> Result<Option<String>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .ok()
            .filter(|v| !v.is_empty() && v.len() <= 256)
            .map(|v| Some(v.to_string()))
            .ok_or_else(|| {
                bad(format!(
                    "header {name} must be 1 to 256 visible ASCII characters"
                ))
            }),
    }
}

/// `POST /functions/{name}/invoke`: every answer, an error too, carries
/// the invocation's id; every log line about it, in its span.
async fn invoke(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let id = agent.new_invocation_id();
    let span = tracing::info_span!(
        "invoke",
        function = %name,
        invocation = %id,
        instance = tracing::field::Empty,
        version = tracing::field::Empty,
    );
    let mut response = serve_invocation(agent, name, headers, body, span.clone())
        .await
        .unwrap_or_else(|e| {
            let _in = span.enter();
            if e.status >= 500 {
                tracing::warn!(kind = e.kind, "{}", e.message);
            } else {
                tracing::debug!(kind = e.kind, status = e.status, "{}", e.message);
            }
            e.into_response()
        });
    if let Ok(value) = HeaderValue::from_str(&id) {
        response
            .headers_mut()
            .insert(HeaderName::from_static(INVOCATION_ID_HEADER), value);
    }
    response
}

async fn serve_invocation(
    agent: Arc<Agent>,
    name: String,
    headers: HeaderMap,
    body: axum::body::Body,
    span: tracing::Span,
) -> Result<Response, ApiError> {
    // Counted from before the body is read until the blocking work ends
    // (the guard moves onto the blocking thread: a client that hangs up
    // drops this future, not the work). Beyond the limit, a 429 before the
    // body is buffered or a thread taken.
    let admitted = agent.admit()?;
    let body = axum::body::to_bytes(body, MAX_EVENT_BYTES)
        .await
        .map_err(|_| {
            ApiError::new(
                413,
                "payload_too_large",
                format!("the event is larger than the limit of {MAX_EVENT_BYTES} bytes"),
            )
        })?;
    let instance = header(&headers, INSTANCE_HEADER)?;
    let key = header(&headers, AFFINITY_HEADER)?;
    let started = std::time::Instant::now();
    let metrics_agent = agent.clone();
    let served = blocking(move || {
        let _admitted = admitted;
        let _in = span.enter();
        agent.invoke(&name, &body, instance.as_deref(), key.as_deref())
    })
    .await?;
    let m = &metrics_agent.metrics;
    m.invocations.fetch_add(1, Ordering::Relaxed);
    lock(&m.latency).observe(started.elapsed().as_secs_f64());
    let mut vmm = served.response;
    let body = std::mem::take(&mut vmm.body);
    let mut response = if vmm.status == 200 {
        // The result moves into the response: up to 6 MiB, not copied.
        (StatusCode::OK, body).into_response()
    } else {
        ApiError::new(
            502,
            "vmm_error",
            format!(
                "the instance answered {}: {}",
                vmm.status,
                vmm.fault_message().unwrap_or_default()
            ),
        )
        .into_response()
    };
    let out = response.headers_mut();
    for name in [
        "x-ember-duration-us",
        "x-ember-log",
        "x-ember-function-error",
    ] {
        if let Some(value) = vmm.header(name).and_then(|v| HeaderValue::from_str(v).ok()) {
            out.insert(HeaderName::from_static(name), value);
        }
    }
    if let Some(kind) = vmm.header("x-ember-function-error") {
        *lock(&m.errors).entry(kind.to_string()).or_insert(0) += 1;
        out.insert("content-type", HeaderValue::from_static("application/json"));
    } else {
        out.insert(
            "content-type",
            HeaderValue::from_static("application/octet-stream"),
        );
    }
    let set = |out: &mut HeaderMap, name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            out.insert(HeaderName::from_static(name), value);
        }
    };
    set(out, INSTANCE_HEADER, served.instance);
    set(out, START_HEADER, served.start.name().into());
    set(out, VERSION_HEADER, served.version.to_string());
    if let Some(affinity) = served.affinity {
        set(out, AFFINITY_HEADER, affinity.name().into());
    }
    Ok(response)
}

async fn instances(State(agent): State<Arc<Agent>>) -> Json<serde_json::Value> {
    Json(agent.instances())
}

async fn delete_instance(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    blocking(move || agent.delete_instance(&id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn metrics(State(agent): State<Arc<Agent>>) -> Response {
    use std::fmt::Write;
    let m = &agent.metrics;
    let mut out = String::new();
    let _ = writeln!(out, "# HELP ember_invocations_total Invocations answered.");
    let _ = writeln!(out, "# TYPE ember_invocations_total counter");
    let _ = writeln!(
        out,
        "ember_invocations_total {}",
        m.invocations.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP ember_function_errors_total Function errors by kind."
    );
    let _ = writeln!(out, "# TYPE ember_function_errors_total counter");
    for (kind, n) in lock(&m.errors).iter() {
        let _ = writeln!(out, "ember_function_errors_total{{kind=\"{kind}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP ember_starts_total Invocations by how their instance was found."
    );
    let _ = writeln!(out, "# TYPE ember_starts_total counter");
    let _ = writeln!(
        out,
        "ember_starts_total{{start=\"warm\"}} {}",
        m.warm.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "ember_starts_total{{start=\"restored\"}} {}",
        m.restored.load(Ordering::Relaxed)
    );
    for (metric, help, histogram) in [
        (
            "ember_invocation_seconds",
            "Invocation latency through emberd.",
            &m.latency,
        ),
        (
            "ember_restore_seconds",
            "Restore latency (load request → resumed).",
            &m.restore_latency,
        ),
    ] {
        let h = lock(histogram).clone();
        let _ = writeln!(out, "# HELP {metric} {help}");
        let _ = writeln!(out, "# TYPE {metric} histogram");
        let mut cumulative = 0;
        for (bound, count) in h.bounds.iter().zip(&h.counts) {
            cumulative += count;
            let _ = writeln!(out, "{metric}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{metric}_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{metric}_sum {}", h.sum);
        let _ = writeln!(out, "{metric}_count {}", h.count);
    }
    let pools = lock(&agent.pools);
    let (idle, busy) = pools.instances.values().fold((0, 0), |(i, b), x| {
        if x.vmm.is_some() {
            (i + 1, b)
        } else {
            (i, b + 1)
        }
    });
    drop(pools);
    let _ = writeln!(out, "# HELP ember_instances Instances by state.");
    let _ = writeln!(out, "# TYPE ember_instances gauge");
    let _ = writeln!(out, "ember_instances{{state=\"idle\"}} {idle}");
    let _ = writeln!(out, "ember_instances{{state=\"busy\"}} {busy}");
    let _ = writeln!(
        out,
        "# HELP ember_prepared_vmms Prepared ember-vmm processes ready."
    );
    let _ = writeln!(out, "# TYPE ember_prepared_vmms gauge");
    let _ = writeln!(out, "ember_prepared_vmms {}", agent.prepared_count());
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}

#[cfg(test)]
mod tests {
    /// docs/api.yaml describes every path the router serves, and no other.
    #[test]
    fn the_openapi_description_names_every_route() {
        let spec = include_str!("../../docs/api.yaml");
        let source = include_str!("api.rs");
        let source = &source[..source.find("#[cfg(test)]").unwrap()];
        let routed: Vec<&str> = source
            .match_indices(".route(")
            .filter_map(|(at, m)| {
                let rest = source[at + m.len()..].trim_start();
                let rest = rest.strip_prefix('"')?;
                Some(&rest[..rest.find('"')?])
            })
            .collect();
        assert!(routed.len() >= 6, "{routed:?}");
        let described: Vec<&str> = spec
            .lines()
            .filter(|l| l.starts_with("  /") && l.ends_with(':'))
            .map(|l| l.trim().trim_end_matches(':'))
            .collect();
        let mut a = routed.clone();
        let mut b = described.clone();
        a.sort();
        b.sort();
        assert_eq!(a, b, "routes in api.rs vs paths in docs/api.yaml");
    }
}
