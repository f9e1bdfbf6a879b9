//! emberd's HTTP API (docs/api.yaml): axum on a Unix socket.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::events::store_error;
use crate::functions::{check_file_name, FunctionConfig};
use crate::host::{lock, Agent, ApiError, MAX_EVENT_BYTES};
use crate::journal::{self, Accepted, NewEvent, RecordFilter};

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
/// Header: `Event` (async) or `RequestResponse` (sync, the default).
pub const INVOCATION_TYPE_HEADER: &str = "x-ember-invocation-type";
/// Header: an async event's idempotency key (24 h, per function).
pub const IDEMPOTENCY_HEADER: &str = "x-ember-idempotency-key";

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
pub const MAX_FILES: usize = 1000;

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
        .route("/invocations", get(list_invocations))
        .route("/invocations/{id}", get(get_invocation))
        .route("/journal", get(list_journal))
        .route("/journal/replay", post(replay_many))
        .route("/journal/{id}", get(get_record).delete(delete_record))
        .route("/journal/{id}/event", get(record_event))
        .route("/journal/{id}/replay", post(replay_one))
        .route("/instances", get(instances))
        .route("/instances/{id}", axum::routing::delete(delete_instance))
        .route("/metadata", get(metadata))
        .route("/metaevents", get(list_metaevents))
        .route(
            "/metaevents/{name}",
            get(get_metaevent)
                .put(put_metaevent)
                .delete(delete_metaevent),
        )
        .route("/metaevents/{name}/history", get(metaevent_history))
        .route("/schedules", get(list_schedules))
        .route(
            "/schedules/{name}",
            get(get_schedule).put(put_schedule).delete(delete_schedule),
        )
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

/// The pre-warm policy's counters per function, for `/metrics`.
fn render_prewarm(out: &mut String, stats: &[(String, crate::prewarm::Stats)]) {
    use std::fmt::Write;
    let mut family = |name: &str, help: &str, lines: &mut dyn Iterator<Item = String>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        for line in lines {
            let _ = writeln!(out, "{name}{line}");
        }
    };
    family(
        "ember_arrivals_total",
        "Invocations that arrived, per function.",
        &mut stats
            .iter()
            .map(|(f, s)| format!("{{function=\"{f}\"}} {}", s.arrivals)),
    );
    family(
        "ember_predicted_arrivals_total",
        "Arrivals the pre-warm policy predicted (the windows it opened), per function.",
        &mut stats
            .iter()
            .map(|(f, s)| format!("{{function=\"{f}\"}} {}", s.predicted)),
    );
    family(
        "ember_predicted_arrivals_hit_total",
        "Arrivals that came inside a predicted window, per function.",
        &mut stats
            .iter()
            .map(|(f, s)| format!("{{function=\"{f}\"}} {}", s.predicted_hits)),
    );
    family(
        "ember_prewarms_total",
        "Instances restored ahead of a predicted arrival, per function, by whether they then served.",
        &mut stats.iter().flat_map(|(f, s)| {
            [
                format!("{{function=\"{f}\",outcome=\"used\"}} {}", s.prewarms_used),
                format!("{{function=\"{f}\",outcome=\"unused\"}} {}", s.prewarms_unused),
            ]
        }),
    );
    family(
        "ember_idle_instance_seconds_total",
        "Time instances spent idle, per function.",
        &mut stats
            .iter()
            .map(|(f, s)| format!("{{function=\"{f}\"}} {:.3}", s.idle_ms as f64 / 1e3)),
    );
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
    value["template_generation"] = json!(agent.template_generation(&v));
    value["broken"] = json!(agent.is_broken(&v));
    let auto = v.config.prewarm == crate::functions::Prewarm::Auto;
    value["prewarm_state"] = agent.prewarm.describe(&name, auto, agent.prewarm.now_ms());
    value["queued"] = json!(agent
        .events
        .depths()
        .into_iter()
        .find(|(f, _, _)| *f == name)
        .map_or(0, |(_, n, _)| n));
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
    let multipart = multipart.map_err(|e| {
        bad(format!(
            "the body must be multipart/form-data with a boundary: {e}"
        ))
    })?;
    let parts = read_deploy(multipart).await?;
    crate::functions::check_name(&name)?;
    let deployed =
        blocking(move || agent.deploy(&name, parts.config, &parts.module, &parts.files)).await?;
    Ok(Json(deployed))
}

/// What a deploy's multipart body holds, checked.
#[derive(Debug)]
pub struct DeployParts {
    /// The `config` part (the defaults when absent).
    pub config: FunctionConfig,
    /// The `module` part: starts with the WebAssembly magic.
    pub module: Bytes,
    /// The `file` parts: (checked name, bytes), at most [`MAX_FILES`].
    pub files: Vec<(String, Vec<u8>)>,
}

/// Reads a deploy's multipart body to its end and checks its parts: the
/// first problem is reported once the whole body is read (a client still
/// sending when the answer comes may never see it). Faces the network:
/// fuzzed (fuzz/fuzz_targets/deploy_multipart.rs).
pub async fn read_deploy(mut multipart: Multipart) -> Result<DeployParts, ApiError> {
    let mut config: Option<FunctionConfig> = None;
    let mut module: Option<Bytes> = None;
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
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
    Ok(DeployParts {
        config: config.unwrap_or_default(),
        module,
        files,
    })
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
    let served = match header(&headers, INVOCATION_TYPE_HEADER).map(|t| t.unwrap_or_default()) {
        Ok(t) if t.is_empty() || t == "RequestResponse" => {
            serve_invocation(
                agent.clone(),
                name.clone(),
                id.clone(),
                headers,
                body,
                span.clone(),
            )
            .await
        }
        Ok(t) if t == "Event" => {
            accept_event(agent.clone(), name.clone(), &id, headers, body).await
        }
        Ok(t) => Err(bad(format!(
            "{INVOCATION_TYPE_HEADER} is {t:?}: give Event (async) or RequestResponse (sync)"
        ))),
        Err(e) => Err(e),
    };
    let mut response = served.unwrap_or_else(|e| {
        let _in = span.enter();
        if e.status >= 500 {
            tracing::warn!(kind = e.kind, "{}", e.message);
        } else {
            tracing::debug!(kind = e.kind, status = e.status, "{}", e.message);
        }
        e.into_response()
    });
    if !response.headers().contains_key(INVOCATION_ID_HEADER) {
        set_invocation_id(&mut response, &id);
    }
    // A function's own (not a name nobody deployed: labels stay bounded).
    if response.status() == StatusCode::TOO_MANY_REQUESTS && agent.current(&name).is_ok() {
        agent.observe_throttle(&name);
    }
    response
}

fn set_invocation_id(response: &mut Response, id: &str) {
    if let Ok(value) = HeaderValue::from_str(id) {
        response
            .headers_mut()
            .insert(HeaderName::from_static(INVOCATION_ID_HEADER), value);
    }
}

/// `{"id"}` with `status` (202 for a new event), the id in the header too.
fn answer_id(status: StatusCode, id: &str) -> Response {
    let mut response = (status, Json(json!({ "id": id }))).into_response();
    set_invocation_id(&mut response, id);
    response
}

async fn read_event(body: axum::body::Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, MAX_EVENT_BYTES)
        .await
        .map_err(|_| {
            ApiError::new(
                413,
                "payload_too_large",
                format!("the event is larger than the limit of {MAX_EVENT_BYTES} bytes"),
            )
        })
}

/// An async invocation: `202 {"id"}` once the event is on disk.
async fn accept_event(
    agent: Arc<Agent>,
    name: String,
    id: &str,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    if agent.draining.load(Ordering::Relaxed) {
        return Err(ApiError::new(
            503,
            "shutting_down",
            "emberd is shutting down",
        ));
    }
    let v = agent.current(&name)?;
    let body = read_event(body).await?;
    let affinity = header(&headers, AFFINITY_HEADER)?;
    let idempotency_key = header(&headers, IDEMPOTENCY_HEADER)?;
    if header(&headers, INSTANCE_HEADER)?.is_some() {
        return Err(bad(format!(
            "{INSTANCE_HEADER} is for synchronous invocations; an async one may carry {AFFINITY_HEADER}"
        )));
    }
    let reservation = agent.events.reserve(&name, v.config.max_queued)?;
    let now = journal::now_ms();
    let ev = NewEvent {
        id: id.to_string(),
        function: name,
        origin: "invoke",
        source_id: None,
        affinity,
        idempotency_key,
        event: body.to_vec(),
        accepted_ms: now,
        due_ms: now,
    };
    Ok(match agent.events.accept(reservation, ev).await? {
        Accepted::New(_) => answer_id(StatusCode::ACCEPTED, id),
        Accepted::Existing(first) => answer_id(StatusCode::OK, &first),
    })
}

async fn serve_invocation(
    agent: Arc<Agent>,
    name: String,
    id: String,
    headers: HeaderMap,
    body: axum::body::Body,
    span: tracing::Span,
) -> Result<Response, ApiError> {
    // Counted from before the body is read until the blocking work ends
    // (the guard moves onto the blocking thread: a client that hangs up
    // drops this future, not the work). Beyond the limit, a 429 before the
    // body is buffered or a thread taken.
    let admitted = agent.admit()?;
    let body = read_event(body).await?;
    let instance = header(&headers, INSTANCE_HEADER)?;
    let key = header(&headers, AFFINITY_HEADER)?;
    // Meaningful with `Event` only, but a malformed one is refused here too.
    header(&headers, IDEMPOTENCY_HEADER)?;
    let started = std::time::Instant::now();
    let metrics_agent = agent.clone();
    let served = blocking(move || {
        let _admitted = admitted;
        let _in = span.enter();
        let started = std::time::Instant::now();
        let served = agent.invoke(&name, &body, instance.as_deref(), key.as_deref());
        let ms = started.elapsed().as_secs_f64() * 1e3;
        agent.observe(&name, &served, ms, Arc::from(Vec::new()), false);
        sync_failure(&agent, &name, &id, &body, &served);
        served
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

/// A failed synchronous invocation: its error goes to the function's
/// `on_error` control, and with `journal_sync_failures` into the journal
/// (durably, before the answer).
fn sync_failure(
    agent: &Agent,
    name: &str,
    id: &str,
    event: &[u8],
    served: &Result<crate::host::Served, ApiError>,
) {
    // Function errors (and the instance's own failures) are the
    // function's; of emberd's answers, only its failures (5xx) count.
    let (kind, message, version) = match served {
        Ok(served) => match crate::events::failure_of(&served.response) {
            Some((kind, message)) => (kind, message, Some(served.version)),
            None => return,
        },
        Err(e) if e.status >= 500 && e.kind != "shutting_down" => {
            (e.kind.to_string(), e.message.clone(), None)
        }
        Err(_) => return,
    };
    let Ok(v) = agent.current(name) else { return };
    let mut journal_id = None;
    if v.config.journal_sync_failures {
        let record = journal::NewRecord {
            id: agent.new_invocation_id(),
            kind: "sync_failure",
            function: name.to_string(),
            version: version.or(Some(v.version)),
            invocation_id: Some(id.to_string()),
            error_kind: Some(kind.clone()),
            error_message: Some(message.clone()),
            event: Some(event.to_vec()),
            accepted_ms: Some(journal::now_ms()),
            ..Default::default()
        };
        let record_id = record.id.clone();
        let now = journal::now_ms();
        match agent.events.journal.write_blocking(true, move |conn| {
            journal::insert_record_tx(conn, &record, now)
        }) {
            Ok(()) => {
                journal_id = Some(record_id);
                lock(&agent.triggers.live).journaled(name, "sync_failure");
            }
            Err(e) => tracing::error!("cannot journal a failed invocation: {e}"),
        }
    }
    if crate::events::is_function_error(&kind) {
        agent.report_error(crate::events::ErrorReport {
            kind: "error",
            function: name.to_string(),
            version: version.or(Some(v.version)),
            invocation_id: Some(id.to_string()),
            error_kind: kind,
            message,
            journal_id,
            detail: None,
        });
    }
}

/// Query of the list endpoints.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    function: Option<String>,
    kind: Option<String>,
    state: Option<String>,
    /// Created at or after, ms since the Unix epoch.
    since: Option<i64>,
    limit: Option<u32>,
    cursor: Option<String>,
}

impl ListQuery {
    fn parse(
        query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
    ) -> Result<ListQuery, ApiError> {
        query
            .map(|Query(q)| q)
            .map_err(|e| bad(format!("bad query: {}", e.body_text())))
    }

    fn limit(&self, default: u32, max: u32) -> Result<u32, ApiError> {
        match self.limit {
            None => Ok(default),
            Some(n) if (1..=max).contains(&n) => Ok(n),
            Some(n) => Err(bad(format!("limit must be between 1 and {max} (got {n})"))),
        }
    }

    fn cursor(&self) -> Result<Option<i64>, ApiError> {
        self.cursor
            .as_deref()
            .map(|c| {
                c.parse::<i64>()
                    .map_err(|_| bad(format!("cursor {c:?} is not one this API gave")))
            })
            .transpose()
    }

    fn filter(&self) -> Result<RecordFilter, ApiError> {
        if let Some(kind) = &self.kind {
            if !journal::RECORD_KINDS.contains(&kind.as_str()) {
                return Err(bad(format!(
                    "kind {kind:?}: give one of {}",
                    journal::RECORD_KINDS.join(", ")
                )));
            }
        }
        Ok(RecordFilter {
            function: self.function.clone(),
            kind: self.kind.clone(),
            since_ms: self.since,
            before_seq: self.cursor()?,
            unreplayed: false,
        })
    }
}

/// The page and the cursor of the next one (the last item's seq).
fn page(key: &str, items: Vec<serde_json::Value>, limit: u32) -> Json<serde_json::Value> {
    let next = (items.len() as u32 == limit)
        .then(|| {
            items
                .last()
                .and_then(|i| i["seq"].as_i64())
                .map(|s| s.to_string())
        })
        .flatten();
    Json(json!({ key: items, "next_cursor": next }))
}

async fn list_invocations(
    State(agent): State<Arc<Agent>>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let q = ListQuery::parse(query)?;
    if let Some(state) = &q.state {
        if !["queued", "running", "retrying", "succeeded", "failed"].contains(&state.as_str()) {
            return Err(bad(format!(
                "state {state:?}: give queued, running, retrying, succeeded or failed"
            )));
        }
    }
    let limit = q.limit(100, 10_000)?;
    let cursor = q.cursor()?;
    let items = blocking(move || {
        agent
            .events
            .journal
            .read(|conn| {
                journal::invocations(
                    conn,
                    q.function.as_deref(),
                    q.state.as_deref(),
                    cursor,
                    limit,
                )
            })
            .map_err(store_error)
    })
    .await?;
    Ok(page("invocations", items, limit))
}

/// Query of `GET /invocations/{id}`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    /// Wait up to this long for the invocation to be final, ms.
    wait_ms: Option<u64>,
}

/// The longest `wait_ms`.
const MAX_WAIT_MS: u64 = 30_000;

async fn get_invocation(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let wait_ms = query
        .map_err(|e| bad(format!("bad query: {}", e.body_text())))?
        .0
        .wait_ms
        .unwrap_or(0);
    if wait_ms > MAX_WAIT_MS {
        return Err(bad(format!(
            "wait_ms is at most {MAX_WAIT_MS} (got {wait_ms})"
        )));
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(wait_ms);
    loop {
        // Armed before the read: a final state written after it wakes us.
        let finished = agent.events.finished.notified();
        tokio::pin!(finished);
        finished.as_mut().enable();
        if agent.events.is_open(&id) && tokio::time::Instant::now() < deadline {
            // Still queued or running (known without a read): wait.
            let _ = tokio::time::timeout_at(deadline, finished).await;
            continue;
        }
        let reader = agent.clone();
        let wanted = id.clone();
        let found = blocking(move || {
            reader
                .events
                .journal
                .read(|conn| journal::invocation(conn, &wanted))
                .map_err(store_error)?
                .ok_or_else(|| {
                    ApiError::new(
                        404,
                        "not_found",
                        format!("no async invocation {wanted} (or it is past its retention)"),
                    )
                })
        })
        .await?;
        let is_final = found["state"].as_str().is_some_and(journal::is_final);
        if is_final || tokio::time::Instant::now() >= deadline {
            return Ok(Json(found));
        }
        let _ = tokio::time::timeout_at(deadline, finished).await;
    }
}

async fn list_journal(
    State(agent): State<Arc<Agent>>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let q = ListQuery::parse(query)?;
    let limit = q.limit(100, 10_000)?;
    let filter = q.filter()?;
    let items = blocking(move || {
        agent
            .events
            .journal
            .read(|conn| journal::records(conn, &filter, limit))
            .map_err(store_error)
    })
    .await?;
    Ok(page("records", items, limit))
}

fn no_record(id: &str) -> ApiError {
    ApiError::new(404, "not_found", format!("no journal record {id}"))
}

async fn get_record(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let found = blocking(move || {
        agent
            .events
            .journal
            .read(|conn| journal::record(conn, &id))
            .map_err(store_error)?
            .ok_or_else(|| no_record(&id))
    })
    .await?;
    Ok(Json(found))
}

async fn record_event(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let event = blocking(move || {
        let (_, event) = agent
            .events
            .journal
            .read(|conn| journal::record_event(conn, &id))
            .map_err(store_error)?
            .ok_or_else(|| no_record(&id))?;
        event.ok_or_else(|| {
            ApiError::new(
                404,
                "not_found",
                format!("journal record {id} holds no event (a control action)"),
            )
        })
    })
    .await?;
    Ok(([("content-type", "application/octet-stream")], event).into_response())
}

async fn delete_record(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    agent
        .events
        .journal
        .write(true, move |conn| journal::delete_record_tx(conn, &id))
        .await
        .map_err(store_error)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /journal/{id}/replay`: a new async invocation of the record's
/// event, of the function's current version.
async fn replay_one(
    State(agent): State<Arc<Agent>>,
    Path(record_id): Path<String>,
) -> Result<Response, ApiError> {
    let reader = agent.clone();
    let rid = record_id.clone();
    let function = blocking(move || {
        reader
            .events
            .journal
            .read(|conn| journal::record_function(conn, &rid))
            .map_err(store_error)?
            .ok_or_else(|| no_record(&rid))
    })
    .await?;
    let v = agent.current(&function)?;
    let reservation = agent.events.reserve(&function, v.config.max_queued)?;
    let now = journal::now_ms();
    let id = agent.new_invocation_id();
    let ev = NewEvent {
        id: id.clone(),
        function,
        origin: "replay",
        source_id: Some(record_id.clone()),
        affinity: None,
        idempotency_key: None,
        event: Vec::new(),
        accepted_ms: now,
        due_ms: now,
    };
    let open = agent
        .events
        .journal
        .write(true, move |conn| {
            journal::replay_tx(conn, &record_id, ev, now)
        })
        .await
        .map_err(store_error)?;
    agent.events.keep(reservation, open);
    Ok(answer_id(StatusCode::ACCEPTED, &id))
}

/// `POST /journal/replay`: every record not replayed yet that matches,
/// spaced at the host's `replay_rate_per_s`.
async fn replay_many(
    State(agent): State<Arc<Agent>>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let q = ListQuery::parse(query)?;
    let limit = q.limit(1000, 10_000)?;
    let mut filter = q.filter()?;
    filter.unreplayed = true;
    let reader = agent.clone();
    let records = blocking(move || {
        reader
            .events
            .journal
            .read(|conn| journal::records(conn, &filter, limit))
            .map_err(store_error)
    })
    .await?;
    let now = journal::now_ms();
    let rate = i64::from(agent.events.settings.replay_rate_per_s.max(1));
    let room = agent.events.room();
    let mut planned = Vec::new();
    let mut skipped = 0u64;
    // Oldest first.
    for record in records.iter().rev() {
        let function = record["function"].as_str().unwrap_or_default().to_string();
        let has_event = record["event_bytes"].as_i64().is_some();
        if !has_event || agent.current(&function).is_err() || planned.len() as u64 >= room {
            skipped += 1;
            continue;
        }
        let due = now + planned.len() as i64 * 1000 / rate;
        let record_id = record["id"].as_str().unwrap_or_default().to_string();
        planned.push((
            record_id.clone(),
            NewEvent {
                id: agent.new_invocation_id(),
                function,
                origin: "replay",
                source_id: Some(record_id),
                affinity: None,
                idempotency_key: None,
                event: Vec::new(),
                accepted_ms: now,
                due_ms: due,
            },
        ));
    }
    let opened = agent
        .events
        .journal
        .write(true, move |conn| {
            let mut opened = Vec::new();
            for (record_id, ev) in planned {
                // A record deleted or replayed meanwhile is passed over.
                match journal::replay_tx(conn, &record_id, ev, now) {
                    Ok(open) => opened.push(open),
                    Err(journal::StoreError::NotFound(_) | journal::StoreError::Conflict(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(opened)
        })
        .await
        .map_err(store_error)?;
    let queued = opened.len();
    let ids: Vec<&str> = opened.iter().map(|e| e.id.as_str()).collect();
    let body = json!({ "queued": queued, "skipped": skipped, "ids": ids });
    for ev in opened {
        agent.events.enqueue(ev, true);
    }
    Ok(Json(body))
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
    let counts = {
        let agent = agent.clone();
        tokio::task::spawn_blocking(move || agent.events.journal.read(journal::counts_by_kind))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    };

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
    let _ = writeln!(
        out,
        "ember_starts_total{{start=\"prewarmed\"}} {}",
        m.prewarmed.load(Ordering::Relaxed)
    );
    render_prewarm(&mut out, &agent.prewarm.stats());
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
    let e = &agent.events.metrics;
    for (metric, help, value) in [
        (
            "ember_async_accepted_total",
            "Async events accepted (202).",
            &e.accepted,
        ),
        (
            "ember_async_retries_total",
            "Async attempts that failed and were retried.",
            &e.retries,
        ),
        (
            "ember_async_succeeded_total",
            "Async events that succeeded.",
            &e.succeeded,
        ),
        (
            "ember_async_failed_total",
            "Async events that ended in the journal.",
            &e.failed,
        ),
        (
            "ember_control_actions_total",
            "Control actions taken on detected errors.",
            &e.control_actions,
        ),
        (
            "ember_journal_purged_total",
            "Journal records purged by retention.",
            &e.purged_records,
        ),
        (
            "ember_on_error_limited_total",
            "Error records not sent to an on_error function (over its rate).",
            &e.on_error_limited,
        ),
    ] {
        let _ = writeln!(out, "# HELP {metric} {help}");
        let _ = writeln!(out, "# TYPE {metric} counter");
        let _ = writeln!(out, "{metric} {}", value.load(Ordering::Relaxed));
    }
    let now = journal::now_ms();
    let depths = agent.events.depths();
    let _ = writeln!(out, "# HELP ember_async_queue_depth Async events open (queued, retrying, running) per function.");
    let _ = writeln!(out, "# TYPE ember_async_queue_depth gauge");
    for (function, depth, _) in &depths {
        let _ = writeln!(
            out,
            "ember_async_queue_depth{{function=\"{function}\"}} {depth}"
        );
    }
    let _ = writeln!(out, "# HELP ember_async_oldest_event_age_seconds Age of the oldest open async event per function.");
    let _ = writeln!(out, "# TYPE ember_async_oldest_event_age_seconds gauge");
    for (function, _, oldest) in &depths {
        if let Some(oldest) = oldest {
            let age = (now - oldest).max(0) as f64 / 1000.0;
            let _ = writeln!(
                out,
                "ember_async_oldest_event_age_seconds{{function=\"{function}\"}} {age}"
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP ember_journal_records Failure journal records by kind."
    );
    let _ = writeln!(out, "# TYPE ember_journal_records gauge");
    for (kind, n) in counts {
        let _ = writeln!(out, "ember_journal_records{{kind=\"{kind}\"}} {n}");
    }
    let t = &agent.triggers.metrics;
    for (metric, help, value) in [
        (
            "ember_metaevents_fired_total",
            "Metaevent targets invoked on entering firing.",
            &t.fired,
        ),
        (
            "ember_metaevents_resolved_total",
            "Metaevent targets invoked on resolving (on_resolve).",
            &t.resolved,
        ),
        (
            "ember_metaevent_loops_total",
            "Metaevents not fired: their rule was already in the chain (a loop).",
            &t.loops,
        ),
        (
            "ember_metaevent_too_deep_total",
            "Metaevents not fired: past max_metaevent_depth.",
            &t.too_deep,
        ),
        (
            "ember_metaevents_rate_limited_total",
            "Metaevent fires deferred by metaevents_per_s.",
            &t.rate_limited,
        ),
        (
            "ember_metaevent_evaluations_total",
            "Metadata samples with every rule evaluated (four a second).",
            &t.evaluations,
        ),
        (
            "ember_schedule_fires_total",
            "Schedule fires (each an async invocation).",
            &t.schedule_fires,
        ),
        (
            "ember_schedule_skipped_total",
            "Schedule fires skipped (missed with catch_up false, or older than the latest missed).",
            &t.schedule_skipped,
        ),
    ] {
        let _ = writeln!(out, "# HELP {metric} {help}");
        let _ = writeln!(out, "# TYPE {metric} counter");
        let _ = writeln!(out, "{metric} {}", value.load(Ordering::Relaxed));
    }
    let _ = writeln!(out, "# HELP ember_metaevent_eval_seconds_total Time spent sampling the metadata and evaluating the rules.");
    let _ = writeln!(out, "# TYPE ember_metaevent_eval_seconds_total counter");
    let _ = writeln!(
        out,
        "ember_metaevent_eval_seconds_total {}",
        t.eval_ns.load(Ordering::Relaxed) as f64 / 1e9
    );
    lock(&agent.triggers.store).render(&mut out);
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}

/// Query of `GET /metadata`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MetadataQuery {
    series: Option<String>,
    function: Option<String>,
    kind: Option<String>,
    state: Option<String>,
    stat: Option<String>,
    /// Seconds back (`600`) or a duration (`10m`, `1h`); default 5 minutes.
    since: Option<String>,
    step: Option<u32>,
}

/// Seconds in `600`, `90s`, `10m` or `1h`.
pub fn parse_seconds(text: &str) -> Option<i64> {
    let (n, scale) = match text.as_bytes().last()? {
        b's' => (&text[..text.len() - 1], 1),
        b'm' => (&text[..text.len() - 1], 60),
        b'h' => (&text[..text.len() - 1], 3600),
        _ => (text, 1),
    };
    n.parse::<i64>()
        .ok()
        .filter(|n| *n >= 0)
        .and_then(|n| n.checked_mul(scale))
}

/// `GET /metadata`: a series' points, or (no `series`) the catalog.
async fn metadata(
    State(agent): State<Arc<Agent>>,
    query: Result<Query<MetadataQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    use crate::metadata::{Scope, SERIES};
    let Query(q) = query.map_err(|e| bad(e.body_text()))?;
    let Some(name) = q.series else {
        // The catalog takes no parameter: one given is a mistake (a
        // series left out), not something to ignore.
        let given = [
            ("function", q.function.is_some()),
            ("kind", q.kind.is_some()),
            ("state", q.state.is_some()),
            ("stat", q.stat.is_some()),
            ("since", q.since.is_some()),
            ("step", q.step.is_some()),
        ];
        if let Some((param, _)) = given.iter().find(|(_, set)| *set) {
            return Err(bad(format!(
                "{param}: a parameter of a series' points; give series too (without it, GET /metadata is the catalog)"
            )));
        }
        let catalog: Vec<serde_json::Value> = SERIES
            .iter()
            .map(|s| {
                json!({
                    "series": s.name,
                    "scope": if s.scope == Scope::Host { "host" } else { "function" },
                    "label": s.label.map(|(k, v)| json!({ "name": k, "values": v })),
                    "help": s.help,
                })
            })
            .collect();
        let (rings, bytes) = lock(&agent.triggers.store).footprint();
        return Ok(Json(
            json!({ "series": catalog, "rings": rings, "ring_bytes": bytes }),
        ));
    };
    let series = crate::metadata::series_id(&name).ok_or_else(|| {
        bad(format!(
            "series: unknown series {name:?}; GET /metadata lists them"
        ))
    })?;
    let def = SERIES[series as usize];
    let mut label = None;
    for (key, value) in [("kind", &q.kind), ("state", &q.state), ("stat", &q.stat)] {
        if let Some(value) = value {
            if def.label.map(|(k, _)| k) != Some(key) {
                return Err(bad(format!("{key}: {name} has no label {key}")));
            }
            label = Some(value.clone());
        }
    }
    let since = match &q.since {
        None => 300,
        Some(text) => parse_seconds(text).ok_or_else(|| {
            bad(format!(
                "since: {text:?} is not a time: give seconds, or 90s, 10m, 1h"
            ))
        })?,
    };
    let step = q.step.unwrap_or(1);
    if step == 0 || step > 3600 {
        return Err(bad("step: must be from 1 to 3600 seconds"));
    }
    // The hour kept at most; built off the async workers (the store's lock
    // is held while the answer is built).
    let since = since.min(crate::metadata::RING_SECONDS as i64);
    let function = q.function;
    let answer = blocking(move || {
        let store = lock(&agent.triggers.store);
        let from = store.current() - since;
        store
            .query(series, function.as_deref(), label.as_deref(), from, step)
            .map_err(bad)
    })
    .await?;
    Ok(Json(answer))
}

/// A JSON body, or a 400 saying why it is not one.
fn json_body(body: &Bytes) -> Result<serde_json::Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad(format!("body: not JSON: {e}")))
}

async fn list_metaevents(State(agent): State<Arc<Agent>>) -> Json<serde_json::Value> {
    Json(json!({ "metaevents": agent.metaevents() }))
}

async fn get_metaevent(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(agent.metaevent(&name, true)?))
}

async fn put_metaevent(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = json_body(&body)?;
    Ok(Json(
        blocking(move || agent.put_metaevent(&name, &body)).await?,
    ))
}

async fn delete_metaevent(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    blocking(move || agent.delete_metaevent(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Query of `GET /metaevents/{name}/history`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    limit: Option<u32>,
    /// Rows before this seq (the `next` of the previous page).
    before: Option<i64>,
}

async fn metaevent_history(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = query.map_err(|e| bad(e.body_text()))?;
    agent.metaevent(&name, false)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let rows = blocking(move || {
        agent
            .events
            .journal
            .read(|conn| journal::history(conn, &name, q.before, limit))
            .map_err(store_error)
    })
    .await?;
    let next = (rows.len() as u32 == limit)
        .then(|| rows.last().and_then(|r| r["seq"].as_i64()))
        .flatten();
    Ok(Json(json!({ "history": rows, "next": next })))
}

async fn list_schedules(State(agent): State<Arc<Agent>>) -> Json<serde_json::Value> {
    Json(json!({ "schedules": agent.schedules_list() }))
}

async fn get_schedule(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(agent.schedule(&name)?))
}

async fn put_schedule(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = json_body(&body)?;
    Ok(Json(
        blocking(move || agent.put_schedule(&name, &body)).await?,
    ))
}

async fn delete_schedule(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    blocking(move || agent.delete_schedule(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
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

    /// A journal filter names a kind of record that exists, or is refused
    /// (an unknown kind would match nothing and look like an empty journal).
    #[test]
    fn journal_filters_refuse_an_unknown_kind() {
        for kind in crate::journal::RECORD_KINDS {
            let q = super::ListQuery {
                kind: Some(kind.into()),
                ..Default::default()
            };
            assert_eq!(q.filter().unwrap().kind.as_deref(), Some(kind));
        }
        let q = super::ListQuery {
            kind: Some("AAA".into()),
            ..Default::default()
        };
        let e = q.filter().unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("\"AAA\""), "{}", e.message);
    }
}
