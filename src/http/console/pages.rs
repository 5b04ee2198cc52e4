//! The console's pages and forms. Each reads through [`Console::call`] (the management API as
//! the signed-in key) and renders; each form posts, calls the API, leaves the outcome as a
//! flash message and redirects back (post/redirect/get), so a reload never repeats an action.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use maud::{html, Markup};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use thinghub_actors::codec::EVENT_TYPES;

use super::view::{self, badge, pretty, text, time_of, Section};
use super::{encode, peer_of, Console, Peer, Refusal, Reply, Signed};

/// A page, or why not (sign-in, refusal).
type Page = Result<Response, Refusal>;

/// Rows per listing page.
const PAGE_ROWS: usize = 50;
/// History entries per timeline page.
const HISTORY_ROWS: usize = 50;

fn get_of(c: &Console, headers: &HeaderMap, peer: Peer) -> Result<Signed, Refusal> {
    c.signed(headers, peer_of(peer))
}

/// A path with its query, leaving out empty values.
fn with_query(path: &str, pairs: &[(&str, Option<&str>)]) -> String {
    let query: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| {
            v.filter(|v| !v.is_empty())
                .map(|v| format!("{k}={}", encode(v)))
        })
        .collect();
    if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", query.join("&"))
    }
}

fn items(reply: &Reply) -> &[Value] {
    reply
        .body
        .get("items")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// A listing page's status: the API's when it refused (a 404 group, a 400 filter).
fn answer_status(reply: &Reply) -> StatusCode {
    if reply.ok() {
        StatusCode::OK
    } else {
        reply.status
    }
}

fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

/// Parses a form field holding JSON (empty: `None`); the error names the field.
fn json_field(name: &str, value: &str) -> Result<Option<Value>, String> {
    if value.trim().is_empty() {
        return Ok(None);
    }
    serde_json::from_str(value)
        .map(Some)
        .map_err(|e| format!("{name} is not valid JSON: {e}"))
}

/// A form refused before the API: why, on the page it goes back to.
fn refuse_form(c: &Console, who: &Signed, why: impl Into<String>, back: &str) -> Page {
    let message = why.into();
    c.sessions
        .flash(&who.id, super::session::Flash { ok: false, message });
    Ok(see_other(back))
}

/// A form's API call: its outcome (`done` of the answer, or the API's refusal) on the page it
/// goes back to.
async fn act(
    c: &Console,
    who: &Signed,
    (method, uri): (Method, &str),
    body: Option<&Value>,
    done: impl FnOnce(&Value) -> String,
    back: &str,
) -> Page {
    let reply = c.call(who, method, uri, body).await;
    let done = done(&reply.body);
    c.flash(who, &reply, done);
    Ok(see_other(back))
}

// ---------------------------------------------------------------------------------------------
// Overview

/// `GET /console/`: the node's figures and charts.
pub async fn overview(State(c): State<Console>, headers: HeaderMap, peer: Peer) -> Page {
    let who = get_of(&c, &headers, peer)?;
    let live = live(&c, &who).await;
    let every = c.refresh_every;
    Ok(c.page(
        &who,
        Section::Overview,
        "Overview",
        html! {
            div #live data-refresh="/console/overview/live" data-every-ms=(every.as_millis()) { (live) }
            p.hint { "Figures refresh every " (format!("{:.0}", every.as_secs_f64())) " s with JavaScript; " a href="/console/" { "reload" } " without it." }
        },
    )
    .into_response())
}

/// `GET /console/overview/live`: the overview's figures alone (what its script swaps in).
pub async fn overview_live(State(c): State<Console>, headers: HeaderMap, peer: Peer) -> Page {
    let who = get_of(&c, &headers, peer)?;
    Ok(live(&c, &who).await.into_response())
}

async fn live(c: &Console, who: &Signed) -> Markup {
    let stats = c.call(who, Method::GET, "/api/v1/stats", None).await;
    if !stats.ok() {
        return view::unreadable("The statistics", &stats.error());
    }
    let now = &stats.body["current"];
    let rate = &stats.body["rates"]["oneMinute"];
    let n = |v: &Value| v.as_f64().map_or_else(|| "–".into(), |v| format!("{v:.0}"));
    let r = |v: &Value| v.as_f64().map_or_else(|| "–".into(), |v| format!("{v:.1}"));
    let series = |group, key| c.app.stats.series(group, key);
    let commands = [
        "sent",
        "succeeded",
        "failed",
        "rejected",
        "timedOut",
        "canceled",
        "inProgress",
        "refused",
    ];
    html! {
        section.tiles {
            div.tile #things-registered { span.label { "Things registered" } span.value { (n(&now["things"]["registered"])) } }
            div.tile #things-online { span.label { "Things online" } span.value { (n(&now["things"]["online"])) } }
            div.tile { span.label { "MQTT connections" } span.value { (n(&now["mqtt"]["connections"])) } }
            div.tile { span.label { "Messages in /s" } span.value { (r(&rate["mqtt"]["messagesIn"])) } }
            div.tile { span.label { "Messages out /s" } span.value { (r(&rate["mqtt"]["messagesOut"])) } }
            div.tile { span.label { "Durable writes /s" } span.value { (r(&rate["storage"]["durableWrites"])) } }
            div.tile { span.label { "Shadow updates" } span.value { (n(&now["things"]["shadowUpdates"])) } }
            div.tile { span.label { "Alarms raised / cleared" } span.value { (n(&now["alarms"]["raised"])) " / " (n(&now["alarms"]["cleared"])) } }
        }
        section.charts {
            (view::chart("Messages in", "/s", &series("mqtt", "messagesIn")))
            (view::chart("Messages out", "/s", &series("mqtt", "messagesOut")))
            (view::chart("Durable writes", "/s", &series("storage", "durableWrites")))
            (view::chart("Shadow updates", "/s", &series("things", "shadowUpdates")))
        }
        div.columns {
            section {
                h2 { "Commands since start" }
                table.compact { tbody {
                    @for key in commands { tr { th { (key) } td #{"commands-" (key)} { (n(&now["commands"][key])) } } }
                } }
            }
            section {
                h2 { "Jobs" }
                table.compact { tbody {
                    @for (status, key) in [("IN_PROGRESS", "inProgress"), ("COMPLETED", "completed"), ("CANCELED", "canceled")] {
                        tr { th { a href={"/console/jobs?status=" (status)} { (badge(status)) } } td #{"jobs-" (key)} { (n(&now["jobs"][key])) } }
                    }
                } }
            }
            section {
                h2 { "Node" }
                table.compact { tbody {
                    tr { th { "Uptime" } td { (n(&now["process"]["uptimeSeconds"])) " s" } }
                    tr { th { "Memory (RSS)" } td { (now["process"]["rssBytes"].as_f64().map_or_else(|| "–".into(), |b| format!("{:.1} MiB", b / 1048576.0))) } }
                    tr { th { "MQTT sessions" } td { (n(&now["mqtt"]["sessions"])) } }
                    tr { th { "Active Thing actors" } td { (n(&now["things"]["activeActors"])) } }
                    tr { th { "Effects lag" } td { (n(&now["effects"]["lag"])) } }
                } }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Things

/// The Things list's filters.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ThingsQuery {
    prefix: String,
    #[serde(rename = "type")]
    thing_type: String,
    group: String,
    online: String,
    cursor: String,
}

/// `GET /console/things`: a searchable, paged list.
pub async fn things(
    State(c): State<Console>,
    headers: HeaderMap,
    peer: Peer,
    Query(q): Query<ThingsQuery>,
) -> Page {
    let who = get_of(&c, &headers, peer)?;
    let limit = PAGE_ROWS.to_string();
    let uri = with_query(
        "/api/v1/things",
        &[
            ("limit", Some(&limit)),
            ("prefix", Some(&q.prefix)),
            ("thingType", Some(&q.thing_type)),
            ("thingGroup", Some(&q.group)),
            ("online", Some(&q.online)),
            ("cursor", Some(&q.cursor)),
        ],
    );
    let reply = c.call(&who, Method::GET, &uri, None).await;
    // Last seen: now when online; else the end of the newest connection in the Thing's log
    // (no actor woken).
    let seen = futures_util::future::join_all(items(&reply).iter().map(|item| {
        let c = &c;
        let who = &who;
        async move {
            if item["online"] == json!(true) {
                return "now".to_owned();
            }
            let name = item["thingName"].as_str().unwrap_or_default();
            let uri = format!("/api/v1/things/{}/connectivity?limit=1", encode(name));
            let reply = c.call(who, Method::GET, &uri, None).await;
            match items(&reply).first() {
                // The scan is bounded: none found in its reach is not "never".
                None if reply.ok() && reply.body["nextCursor"].is_null() => "never".to_owned(),
                None if reply.ok() => "long ago".to_owned(),
                None => "–".to_owned(),
                Some(newest) if newest["disconnectedAt"].is_null() => {
                    time_of(&newest["connectedAt"])
                }
                Some(newest) => time_of(&newest["disconnectedAt"]),
            }
        }
    }))
    .await;
    let next = reply.body["nextCursor"].as_str().map(|cursor| {
        with_query(
            "/console/things",
            &[
                ("prefix", Some(&q.prefix)),
                ("type", Some(&q.thing_type)),
                ("group", Some(&q.group)),
                ("online", Some(&q.online)),
                ("cursor", Some(cursor)),
            ],
        )
    });
    let body = html! {
        form.filters method="get" action="/console/things" role="search" {
            label { "Name starts with" input name="prefix" id="prefix" value=(q.prefix) autocomplete="off"; }
            label { "Type" input name="type" value=(q.thing_type); }
            label { "Group" input name="group" value=(q.group); }
            label { "Status" select name="online" {
                option value="" selected[q.online.is_empty()] { "any" }
                option value="true" selected[q.online == "true"] { "online" }
                option value="false" selected[q.online == "false"] { "offline" }
            } }
            button type="submit" id="search" { "Search" }
        }
        @if !reply.ok() {
            (view::unreadable("The Things", &reply.error()))
        } @else {
            div.scroll { table #things {
                thead { tr { th { "Name" } th { "Type" } th { "Status" } th { "Last seen" } th { "Registered" } } }
                tbody {
                    @for (item, seen) in items(&reply).iter().zip(&seen) {
                        @let name = item["thingName"].as_str().unwrap_or_default();
                        tr {
                            td { a href={"/console/things/" (encode(name))} { (name) } }
                            td { (text(&item["thingType"])) }
                            td { (view::online(item["online"] == json!(true))) }
                            td { (seen) }
                            td { (time_of(&item["createdAt"])) }
                        }
                    }
                }
            } }
            @if items(&reply).is_empty() { p.empty { "No Thing matches." } }
            @if let Some(next) = next { p { a.next href=(next) { "Next page →" } } }
        }
    };
    Ok((
        answer_status(&reply),
        c.page(&who, Section::Things, "Things", body),
    )
        .into_response())
}

/// The Thing page's history filter and paging.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ThingQuery {
    kind: String,
    before: String,
}

/// `GET /console/things/{name}`: attributes, shadow, commands, jobs, events, history,
/// connections.
pub async fn thing(
    State(c): State<Console>,
    headers: HeaderMap,
    peer: Peer,
    Path(name): Path<String>,
    Query(q): Query<ThingQuery>,
) -> Page {
    let who = get_of(&c, &headers, peer)?;
    let base = format!("/api/v1/things/{}", encode(&name));
    let history_uri = with_query(
        &format!("{base}/history"),
        &[
            ("order", Some("newest")),
            ("limit", Some(&HISTORY_ROWS.to_string())),
            ("type", Some(&q.kind)),
            ("beforeSeq", Some(&q.before)),
        ],
    );
    let uris = [
        format!("{base}/shadow"),
        format!("{base}/events?limit=20"),
        format!("{base}/commands?limit=20"),
        format!("{base}/jobs"),
        format!("{base}/connectivity?limit=10"),
    ];
    let (described, shadow, history, events, commands, jobs, connections) = tokio::join!(
        c.call(&who, Method::GET, &base, None),
        c.call(&who, Method::GET, &uris[0], None),
        c.call(&who, Method::GET, &history_uri, None),
        c.call(&who, Method::GET, &uris[1], None),
        c.call(&who, Method::GET, &uris[2], None),
        c.call(&who, Method::GET, &uris[3], None),
        c.call(&who, Method::GET, &uris[4], None),
    );
    if !described.ok() {
        let status = described.status;
        let body = view::unreadable(&format!("Thing '{name}'"), &described.error());
        return Ok((status, c.page(&who, Section::Things, &name, body)).into_response());
    }
    let t = &described.body;
    let here = format!("/console/things/{}", encode(&name));
    let body = html! {
        section #about {
            p {
                (view::online(t["online"] == json!(true)))
                @if let Some(kind) = t["thingType"].as_str() { " type " a href={"/console/things?type=" (encode(kind))} { (kind) } }
                " · client id " code { (text(&t["mqttClientId"])) }
                " · registered " (time_of(&t["createdAt"]))
            }
            table.compact { tbody {
                tr { th { "Last connected" } td { (time_of(&t["lastConnectedAt"])) } }
                tr { th { "Last disconnected" } td { (time_of(&t["lastDisconnectedAt"])) @if let Some(why) = t["lastDisconnectReason"].as_str() { " (" (why) ")" } } }
                tr { th { "Last seen" } td { (time_of(&t["lastSeenAt"])) } }
                tr { th { "Groups" } td {
                    @for g in t["thingGroups"].as_array().map_or(&[][..], Vec::as_slice) {
                        @let g = g.as_str().unwrap_or_default();
                        a.tag href={"/console/things?group=" (encode(g))} { (g) } " "
                    }
                } }
                @for (k, v) in t["attributes"].as_object().into_iter().flatten() {
                    tr { th { "attribute " code { (k) } } td { (text(v)) } }
                }
            } }
        }
        (shadow_section(&who, &here, &shadow))
        (commands_section(&who, &here, &commands))
        section #jobs {
            h2 { "Jobs" }
            @if !jobs.ok() { (view::unreadable("Its jobs", &jobs.error())) } @else {
                @if items(&jobs).is_empty() { p.empty { "No job has targeted this Thing." } } @else {
                    div.scroll { table {
                        thead { tr { th { "Job" } th { "Status" } th { "Queued" } th { "Updated" } th { "Details" } } }
                        tbody { @for j in items(&jobs) {
                            @let id = j["jobId"].as_str().unwrap_or_default();
                            tr {
                                td { a href={"/console/jobs/" (encode(id))} { (id) } }
                                td { (badge(j["status"].as_str().unwrap_or_default())) }
                                td { (time_of(&secs_to_ms(&j["queuedAt"]))) }
                                td { (time_of(&secs_to_ms(&j["lastUpdatedAt"]))) }
                                td { code { (j["statusDetails"].to_string()) } }
                            }
                        } }
                    } }
                }
            }
        }
        section #events {
            h2 { "Events" }
            @if !events.ok() { (view::unreadable("Its events", &events.error())) } @else {
                @if items(&events).is_empty() { p.empty { "No event yet." } } @else {
                    div.scroll { table {
                        thead { tr { th { "Time" } th { "Type" } th { "Severity" } th { "Data" } } }
                        tbody { @for e in items(&events) { tr {
                            td { (time_of(&e["timestamp"])) }
                            td { (text(&e["eventType"])) }
                            td { (badge(e["severity"].as_str().unwrap_or_default())) }
                            td { code { (e["data"].to_string()) } }
                        } } }
                    } }
                }
            }
        }
        (history_section(&here, &q, &history))
        section #connections {
            h2 { "Connections" }
            @if !connections.ok() { (view::unreadable("Its connections", &connections.error())) } @else {
                @if items(&connections).is_empty() { p.empty { "Never connected." } } @else {
                    div.scroll { table {
                        thead { tr { th { "Connected" } th { "Disconnected" } th { "Reason" } th { "Client id" } } }
                        tbody { @for k in items(&connections) { tr {
                            td { (time_of(&k["connectedAt"])) }
                            td { @if k["disconnectedAt"].is_null() { "still connected" } @else { (time_of(&k["disconnectedAt"])) } }
                            td { (text(&k["reason"])) }
                            td { code { (text(&k["clientId"])) } }
                        } } }
                    } }
                }
            }
        }
    };
    Ok(c.page(&who, Section::Things, &name, body).into_response())
}

/// Seconds (the jobs API's unit) as ms for [`time_of`].
fn secs_to_ms(value: &Value) -> Value {
    value.as_u64().map_or(Value::Null, |s| json!(s * 1000))
}

fn shadow_section(who: &Signed, here: &str, shadow: &Reply) -> Markup {
    let state = &shadow.body["state"];
    let version = shadow.body["version"].as_u64().unwrap_or(0);
    let desired = state.get("desired").cloned().unwrap_or_else(|| json!({}));
    html! {
        section #shadow {
            h2 { "Shadow" }
            @if shadow.status == StatusCode::NOT_FOUND {
                p.empty { "No shadow yet." }
            } @else if !shadow.ok() {
                (view::unreadable("The shadow", &shadow.error()))
            } @else {
                p { "Version " strong #shadow-version { (version) } " · updated " (time_of(&secs_to_ms(&shadow.body["timestamp"]))) }
                div.shadow {
                    div { h3 { "Desired" } pre #desired { (pretty(&desired)) } }
                    div { h3 { "Reported" } pre #reported { (pretty(state.get("reported").unwrap_or(&json!({})))) } }
                    div.delta { h3 { "Delta" }
                        @match state.get("delta") {
                            Some(delta) => pre #delta.highlight { (pretty(delta)) },
                            None => p #delta.empty { "In sync: reported matches desired." },
                        }
                    }
                }
            }
            @if who.may_change() && (shadow.ok() || shadow.status == StatusCode::NOT_FOUND) {
                form.edit method="post" action={(here) "/desired"} {
                    (view::csrf(who))
                    input type="hidden" name="version" value=(version);
                    label { "Desired state (JSON, merged: a key set to null is removed)"
                        textarea name="desired" id="desired-input" rows="6" spellcheck="false" { (pretty(&desired)) }
                    }
                    button type="submit" id="update-desired" { "Update desired" }
                    small { " Refused if the shadow changed since version " (version) " was shown." }
                }
            }
        }
    }
}

fn commands_section(who: &Signed, here: &str, commands: &Reply) -> Markup {
    html! {
        section #commands {
            h2 { "Commands" }
            @if who.may_change() {
                form.edit method="post" action={(here) "/commands"} {
                    (view::csrf(who))
                    label { "Action" input name="action" id="command-action" required; }
                    label { "Params (JSON object, optional)" textarea name="params" id="command-params" rows="2" spellcheck="false" {} }
                    label { "Time to live (s)" input name="ttl" id="command-ttl" type="number" min="1" value="60"; }
                    button type="submit" id="send-command" { "Send command" }
                }
            }
            @if !commands.ok() { (view::unreadable("Its commands", &commands.error())) } @else {
                @if items(commands).is_empty() { p.empty { "No command yet." } } @else {
                    div.scroll { table #command-list {
                        thead { tr { th { "Execution" } th { "Action" } th { "Status" } th { "Sent" } th { "Expires" } th { "Result" } th {} } }
                        tbody { @for k in items(commands) {
                            @let id = k["executionId"].as_str().unwrap_or_default();
                            @let status = k["status"].as_str().unwrap_or_default();
                            tr data-execution=(id) {
                                td { code { (id) } }
                                td { (text(&k["action"])) }
                                td.status { (badge(status)) }
                                td { (time_of(&k["createdAt"])) }
                                td { (time_of(&k["expiresAt"])) }
                                td { code { (if k["result"].is_null() { text(&k["statusReason"]) } else { k["result"].to_string() }) } }
                                td { @if who.may_change() && matches!(status, "SENT" | "IN_PROGRESS") {
                                    form.inline method="post" action={(here) "/commands/" (encode(id)) "/cancel"} {
                                        (view::csrf(who))
                                        button type="submit" { "Cancel" }
                                    }
                                } }
                            }
                        } }
                    } }
                }
            }
        }
    }
}

fn history_section(here: &str, q: &ThingQuery, history: &Reply) -> Markup {
    let older = history.body["nextBeforeSeq"].as_u64().map(|before| {
        with_query(
            here,
            &[
                ("kind", Some(&q.kind)),
                ("before", Some(&before.to_string())),
            ],
        )
    });
    html! {
        section #history {
            h2 { "History" }
            form.filters method="get" action=(here) {
                label { "Kind" select name="kind" id="history-kind" {
                    option value="" selected[q.kind.is_empty()] { "all" }
                    @for kind in EVENT_TYPES { option value=(kind) selected[q.kind == *kind] { (kind) } }
                } }
                button type="submit" { "Filter" }
            }
            @if !history.ok() { (view::unreadable("The history", &history.error())) } @else {
                ol.timeline {
                    @for h in items(history) { li {
                        span.seq { "#" (text(&h["seq"])) }
                        " " time { (time_of(&h["recordedAt"])) }
                        " " (badge(h["type"].as_str().unwrap_or_default()))
                        " " span.summary { (text(&h["summary"])) }
                    } }
                }
                @if items(history).is_empty() { p.empty { "Nothing of this kind." } }
                @if let Some(older) = older { p { a href=(older) { "Older →" } } }
            }
        }
    }
}

/// The desired-state form.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct DesiredForm {
    csrf: String,
    version: String,
    desired: String,
}

/// `POST /console/things/{name}/desired`.
pub async fn update_desired(
    State(c): State<Console>,
    headers: HeaderMap,
    peer: Peer,
    Path(name): Path<String>,
    Form(form): Form<DesiredForm>,
) -> Page {
    let who = c.signed_change(&headers, peer_of(peer), &form.csrf)?;
    let back = format!("/console/things/{}#shadow", encode(&name));
    let desired = match json_field("desired", &form.desired) {
        Ok(Some(Value::Object(desired))) => Value::Object(desired),
        Ok(_) => return refuse_form(&c, &who, "desired must be a JSON object", &back),
        Err(why) => return refuse_form(&c, &who, why, &back),
    };
    let mut body = json!({"state": {"desired": desired}});
    if let Ok(version) = form.version.trim().parse::<u64>() {
        if version > 0 {
            body["version"] = json!(version);
        }
    }
    let uri = format!("/api/v1/things/{}/shadow", encode(&name));
    let done = |b: &Value| format!("Desired state updated (version {}).", text(&b["version"]));
    act(&c, &who, (Method::POST, &uri), Some(&body), done, &back).await
}

/// The send-command form.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct CommandForm {
    csrf: String,
    action: String,
    params: String,
    ttl: String,
}

/// `POST /console/things/{name}/commands`.
pub async fn send_command(
    State(c): State<Console>,
    headers: HeaderMap,
    peer: Peer,
    Path(name): Path<String>,
    Form(form): Form<CommandForm>,
) -> Page {
    let who = c.signed_change(&headers, peer_of(peer), &form.csrf)?;
    let back = format!("/console/things/{}#commands", encode(&name));
    let mut body = json!({"action": form.action.trim()});
    match json_field("params", &form.params) {
        Ok(None) => {}
        Ok(Some(params)) => body["params"] = params,
        Err(why) => return refuse_form(&c, &who, why, &back),
    }
    if !form.ttl.trim().is_empty() {
        match form.ttl.trim().parse::<u64>() {
            Ok(ttl) => body["ttl"] = json!(ttl),
            Err(_) => {
                let why = format!("ttl must be whole seconds, not '{}'", form.ttl);
                return refuse_form(&c, &who, why, &back);
            }
        }
    }
    let uri = format!("/api/v1/things/{}/commands", encode(&name));
    let done = |b: &Value| format!("Command {} sent.", text(&b["executionId"]));
    act(&c, &who, (Method::POST, &uri), Some(&body), done, &back).await
}

/// `POST /console/things/{name}/commands/{id}/cancel`.
pub async fn cancel_command(
    State(c): State<Console>,
    headers: HeaderMap,
    peer: Peer,
    Path((name, id)): Path<(String, String)>,
    Form(form): Form<super::CsrfOnly>,
) -> Page {
    let who = c.signed_change(&headers, peer_of(peer), &form.csrf)?;
    let uri = format!(
        "/api/v1/things/{}/commands/{}/cancel",
        encode(&name),
        encode(&id)
    );
    let back = format!("/console/things/{}#commands", encode(&name));
    let done = |_: &Value| format!("Command {id} canceled.");
    act(&c, &who, (Method::POST, &uri), None, done, &back).await
}

// ---------------------------------------------------------------------------------------------
// Jobs

/// The jobs list's filter and paging.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct JobsQuery {
    status: String,
    cursor: String,
}

const JOB_COUNTS: &[(&str, &str)] = &[
    ("numberOfQueuedThings", "QUEUED"),
    ("numberOfInProgressThings", "IN_PROGRESS"),
    ("numberOfSucceededThings", "SUCCEEDED"),
    ("numberOfFailedThings", "FAILED"),
    ("numberOfRejectedThings", "REJECTED"),
    ("numberOfTimedOutThings", "TIMED_OUT"),
    ("numberOfCanceledThings", "CANCELED"),
    ("numberOfRemovedThings", "REMOVED"),
];

fn progress(job: &Value) -> Markup {
    let details = &job["jobProcessDetails"];
    let total = job["targets"].as_u64().unwrap_or(0).max(1) as f64;
    html! {
        div.progress title="executions by status" {
            @for (field, status) in JOB_COUNTS {
                @let count = details[*field].as_u64().unwrap_or(0);
                @if count > 0 {
                    span class={"bar s-" (status.to_ascii_lowercase())} data-share=(format!("{:.0}", count as f64 / total * 100.0)) { (status) " " (count) }
                }
            }
        }
    }
}

/// `GET /console/jobs`.
pub async fn jobs(
    State(c): State<Console>,
    headers: HeaderMap,
    peer: Peer,
    Query(q): Query<JobsQuery>,
) -> Page {
    let who = get_of(&c, &headers, peer)?;
    let uri = with_query(
        "/api/v1/jobs",
        &[
            ("limit", Some(&PAGE_ROWS.to_string())),
            ("status", Some(&q.status)),
            ("cursor", Some(&q.cursor)),
        ],
    );
    let reply = c.call(&who, Method::GET, &uri, None).await;
    let next = reply.body["nextCursor"].as_str().map(|cursor| {
        with_query(
            "/console/jobs",
            &[("status", Some(&q.status)), ("cursor", Some(cursor))],
        )
    });
    let body = html! {
        form.filters method="get" action="/console/jobs" {
            label { "Status" select name="status" {
                @for s in ["", "IN_PROGRESS", "COMPLETED", "CANCELED"] {
                    option value=(s) selected[q.status == s] { (if s.is_empty() { "any" } else { s }) }
                }
            } }
            button type="submit" { "Filter" }
        }
        @if !reply.ok() { (view::unreadable("The jobs", &reply.error())) } @else {
            div.scroll { table #jobs {
                thead { tr { th { "Job" } th { "Status" } th { "Targets" } th { "Progress" } th { "Created" } } }
                tbody { @for j in items(&reply) {
                    @let id = j["jobId"].as_str().unwrap_or_default();
                    tr {
                        td { a href={"/console/jobs/" (encode(id))} { (id) } }
                        td { (badge(j["status"].as_str().unwrap_or_default())) }
                        td { (text(&j["targets"])) }
                        td { (progress(j)) }
                        td { (time_of(&j["createdAt"])) }
                    }
                } }
            } }
            @if items(&reply).is_empty() { p.empty { "No job." } }
            @if let Some(next) = next { p { a.next href=(next) { "Next page →" } } }
        }
        @if who.may_change() {
            section #create-job {
                h2 { "Create a job" }
                form.edit method="post" action="/console/jobs" {
                    (view::csrf(&who))
                    label { "Job id (optional: generated)" input name="job_id" id="job-id"; }
                    label { "Description" input name="description"; }
                    label { "Document (JSON object, what devices receive)" textarea name="document" id="job-document" rows="4" spellcheck="false" required { "{}" } }
                    label { "Things (names, separated by spaces or commas)" input name="things" id="job-things"; }
                    label { "Groups" input name="groups" id="job-groups"; }
                    label { "Rollout: most executions started per minute (optional)" input name="maximum_per_minute" type="number" min="1"; }
                    button type="submit" id="create-job-button" { "Create job" }
                }
            }
        }
    };
    Ok((
        answer_status(&reply),
        c.page(&who, Section::Jobs, "Jobs", body),
    )
        .into_response())
}

/// The create-job form.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct JobForm {
    csrf: String,
    job_id: String,
    description: String,
    document: String,
    things: String,
    groups: String,
    maximum_per_minute: String,
}

fn names(list: &str) -> Vec<String> {
    list.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `POST /console/jobs`.
pub async fn create_job(
    State(c): State<Console>,
    headers: HeaderMap,
    peer: Peer,
    Form(form): Form<JobForm>,
) -> Page {
    let who = c.signed_change(&headers, peer_of(peer), &form.csrf)?;
    const FORM: &str = "/console/jobs#create-job";
    let document = match json_field("document", &form.document) {
        Ok(Some(document)) => document,
        Ok(None) => return refuse_form(&c, &who, "document is required (a JSON object)", FORM),
        Err(why) => return refuse_form(&c, &who, why, FORM),
    };
    let mut targets = Map::new();
    let (things, groups) = (names(&form.things), names(&form.groups));
    if !things.is_empty() {
        targets.insert("thingNames".into(), json!(things));
    }
    if !groups.is_empty() {
        targets.insert("thingGroupNames".into(), json!(groups));
    }
    let mut body = json!({"document": document, "targets": targets});
    if !form.job_id.trim().is_empty() {
        body["jobId"] = json!(form.job_id.trim());
    }
    if !form.description.trim().is_empty() {
        body["description"] = json!(form.description.trim());
    }
    if !form.maximum_per_minute.trim().is_empty() {
        match form.maximum_per_minute.trim().parse::<u64>() {
            Ok(rate) => body["rollout"] = json!({"maximumPerMinute": rate}),
            Err(_) => {
                let why = "the rollout rate must be a whole number per minute";
                return refuse_form(&c, &who, why, FORM);
            }
        }
    }
    let reply = c
        .call(&who, Method::POST, "/api/v1/jobs", Some(&body))
        .await;
    if !reply.ok() {
        c.flash(&who, &reply, "");
        return Ok(see_other(FORM));
    }
    let id = reply.body["jobId"].as_str().unwrap_or_default().to_owned();
    c.flash(&who, &reply, format!("Job {id} created."));
    Ok(see_other(&format!("/console/jobs/{}", encode(&id))))
}

/// The job page's execution filter.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct JobQuery {
    status: String,
    cursor: String,
}

/// `GET /console/jobs/{id}`.
pub async fn job(
    State(c): State<Console>,
    headers: HeaderMap,
    peer: Peer,
    Path(id): Path<String>,
    Query(q): Query<JobQuery>,
) -> Page {
    let who = get_of(&c, &headers, peer)?;
    let base = format!("/api/v1/jobs/{}", encode(&id));
    let executions_uri = with_query(
        &format!("{base}/executions"),
        &[
            ("limit", Some(&PAGE_ROWS.to_string())),
            ("status", Some(&q.status)),
            ("cursor", Some(&q.cursor)),
        ],
    );
    let (job, executions) = tokio::join!(
        c.call(&who, Method::GET, &base, None),
        c.call(&who, Method::GET, &executions_uri, None),
    );
    if !job.ok() {
        let body = view::unreadable(&format!("Job '{id}'"), &job.error());
        return Ok((job.status, c.page(&who, Section::Jobs, &id, body)).into_response());
    }
    let j = &job.body;
    let here = format!("/console/jobs/{}", encode(&id));
    let status = j["status"].as_str().unwrap_or_default();
    let next = executions.body["nextCursor"].as_str().map(|cursor| {
        with_query(
            &here,
            &[("status", Some(&q.status)), ("cursor", Some(cursor))],
        )
    });
    let body = html! {
        p { span #job-status { (badge(status)) } " " (text(&j["targets"])) " targets · created " (time_of(&j["createdAt"]))
            @if !j["completedAt"].is_null() { " · completed " (time_of(&j["completedAt"])) }
            @if !j["reasonCode"].is_null() { " · reason " code { (text(&j["reasonCode"])) } }
        }
        @if let Some(description) = j["description"].as_str() { p { (description) } }
        (progress(j))
        table.compact #job-counts { tbody {
            @for (field, s) in JOB_COUNTS { tr { th { (badge(s)) } td #{"count-" (s)} { (text(&j["jobProcessDetails"][*field])) } } }
            tr { th { "queued by the rollout so far" } td { (text(&j["jobProcessDetails"]["numberOfQueuedByRollout"])) } }
        } }
        @if !j["rollout"].is_null() {
            h2 { "Rollout" }
            pre { (pretty(&j["rollout"])) }
        }
        h2 { "Document" }
        pre #job-document { (pretty(&j["document"])) }
        @if who.may_change() && status == "IN_PROGRESS" {
            form.edit method="post" action={(here) "/cancel"} {
                (view::csrf(&who))
                label.check { input type="checkbox" name="force" value="true"; " Force (also cancel executions in progress)" }
                label { "Reason code (optional)" input name="reason_code"; }
                button type="submit" id="cancel-job" { "Cancel job" }
            }
        }
        h2 { "Executions" }
        form.filters method="get" action=(here) {
            label { "Status" select name="status" {
                option value="" selected[q.status.is_empty()] { "any" }
                @for (_, s) in JOB_COUNTS { option value=(s) selected[q.status == *s] { (s) } }
            } }
            button type="submit" { "Filter" }
        }
        @if !executions.ok() { (view::unreadable("The executions", &executions.error())) } @else {
            div.scroll { table #executions {
                thead { tr { th { "Thing" } th { "Status" } } }
                tbody { @for e in items(&executions) {
                    @let thing = e["thingName"].as_str().unwrap_or_default();
                    tr { td { a href={"/console/things/" (encode(thing))} { (thing) } } td { (badge(e["status"].as_str().unwrap_or_default())) } }
                } }
            } }
            @if let Some(next) = next { p { a.next href=(next) { "Next page →" } } }
        }
    };
    Ok(c.page(&who, Section::Jobs, &format!("Job {id}"), body)
        .into_response())
}

/// The cancel-job form.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct CancelJobForm {
    csrf: String,
    force: String,
    reason_code: String,
}

/// `POST /console/jobs/{id}/cancel`.
pub async fn cancel_job(
    State(c): State<Console>,
    headers: HeaderMap,
    peer: Peer,
    Path(id): Path<String>,
    Form(form): Form<CancelJobForm>,
) -> Page {
    let who = c.signed_change(&headers, peer_of(peer), &form.csrf)?;
    let mut body = json!({"force": form.force == "true"});
    if !form.reason_code.trim().is_empty() {
        body["reasonCode"] = json!(form.reason_code.trim());
    }
    let uri = format!("/api/v1/jobs/{}/cancel", encode(&id));
    let back = format!("/console/jobs/{}", encode(&id));
    let done = |_: &Value| format!("Job {id} canceled.");
    act(&c, &who, (Method::POST, &uri), Some(&body), done, &back).await
}

// ---------------------------------------------------------------------------------------------
// Clients

/// The clients list's paging.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ClientsQuery {
    after: String,
}

/// `GET /console/clients`: connected clients and persistent sessions.
pub async fn clients(
    State(c): State<Console>,
    headers: HeaderMap,
    peer: Peer,
    Query(q): Query<ClientsQuery>,
) -> Page {
    let who = get_of(&c, &headers, peer)?;
    let uri = with_query(
        "/api/v1/clients",
        &[
            ("limit", Some(&PAGE_ROWS.to_string())),
            ("after", Some(&q.after)),
        ],
    );
    let reply = c.call(&who, Method::GET, &uri, None).await;
    let next = reply.body["nextAfter"]
        .as_str()
        .map(|after| with_query("/console/clients", &[("after", Some(after))]));
    let body = html! {
        @if !reply.ok() { (view::unreadable("The clients", &reply.error())) } @else {
            div.scroll { table #clients {
                thead { tr { th { "Client id" } th { "Thing" } th { "Status" } th { "Protocol" } th { "Listener" } th { "Peer" } th { "Session" } th { "Subscriptions" } th { "Queued" } th {} } }
                tbody { @for k in items(&reply) {
                    @let id = k["clientId"].as_str().unwrap_or_default();
                    tr {
                        td { a href={"/console/clients/" (encode(id))} { (id) } }
                        td { @if let Some(thing) = k["thingName"].as_str() { a href={"/console/things/" (encode(thing))} { (thing) } } }
                        td { (view::online(k["connected"] == json!(true))) }
                        td { (text(&k["protocol"])) }
                        td { (text(&k["listener"])) }
                        td { (text(&k["peer"])) }
                        td { (if k["persistent"] == json!(true) { "persistent" } else { "clean" }) }
                        td { (k["subscriptions"].as_array().map_or(0, Vec::len)) }
                        td { (text(&k["queued"])) }
                        td { (kick_form(&who, id)) }
                    }
                } }
            } }
            @if items(&reply).is_empty() { p.empty { "No client is connected and no session is kept." } }
            @if let Some(next) = next { p { a.next href=(next) { "Next page →" } } }
        }
    };
    Ok((
        answer_status(&reply),
        c.page(&who, Section::Clients, "Clients", body),
    )
        .into_response())
}

fn kick_form(who: &Signed, id: &str) -> Markup {
    html! {
        @if who.may_change() {
            form.inline method="post" action={"/console/clients/" (encode(id)) "/kick"} {
                (view::csrf(who))
                button type="submit" title="Disconnect and discard its session" { "Kick" }
            }
        }
    }
}

/// `GET /console/clients/{id}`.
pub async fn client(
    State(c): State<Console>,
    headers: HeaderMap,
    peer: Peer,
    Path(id): Path<String>,
) -> Page {
    let who = get_of(&c, &headers, peer)?;
    let reply = c
        .call(
            &who,
            Method::GET,
            &format!("/api/v1/clients/{}", encode(&id)),
            None,
        )
        .await;
    if !reply.ok() {
        let body = view::unreadable(&format!("Client '{id}'"), &reply.error());
        return Ok((reply.status, c.page(&who, Section::Clients, &id, body)).into_response());
    }
    let k = &reply.body;
    let body = html! {
        p { (view::online(k["connected"] == json!(true))) " " (kick_form(&who, &id)) }
        table.compact { tbody {
            @for (field, label) in [
                ("thingName", "Thing"), ("username", "User"), ("protocol", "Protocol"),
                ("listener", "Listener"), ("peer", "Peer"), ("certificateFingerprint", "Certificate"),
                ("sessionExpiryInterval", "Session expiry (s)"), ("inflight", "In flight"),
                ("queued", "Queued"), ("queuedBytes", "Queued bytes"), ("dropped", "Dropped"),
            ] {
                tr { th { (label) } td { (text(&k[field])) } }
            }
            tr { th { "Connected at" } td { (time_of(&k["connectedAt"])) } }
            tr { th { "Session" } td { (if k["persistent"] == json!(true) { "persistent" } else { "clean" }) } }
        } }
        h2 { "Subscriptions" }
        ul #subscriptions { @for s in k["subscriptions"].as_array().map_or(&[][..], Vec::as_slice) { li { code { (text(s)) } } } }
    };
    Ok(
        c.page(&who, Section::Clients, &format!("Client {id}"), body)
            .into_response(),
    )
}

/// `POST /console/clients/{id}/kick`.
pub async fn kick_client(
    State(c): State<Console>,
    headers: HeaderMap,
    peer: Peer,
    Path(id): Path<String>,
    Form(form): Form<super::CsrfOnly>,
) -> Page {
    let who = c.signed_change(&headers, peer_of(peer), &form.csrf)?;
    let uri = format!("/api/v1/clients/{}", encode(&id));
    let done = |_: &Value| format!("Client {id} kicked.");
    act(
        &c,
        &who,
        (Method::DELETE, &uri),
        None,
        done,
        "/console/clients",
    )
    .await
}
