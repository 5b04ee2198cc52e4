//! The operator console (`/console`): in a real browser (headless chromium through
//! chromedriver) against the real server with real MQTT devices, and its session and CSRF
//! rules with a plain HTTP client. Screenshots of the main pages are kept under
//! `target/tmp/console-screenshots/` as test artifacts.

mod common;

use std::time::Duration;

use common::browser::{self, Browser};
use common::device::Device;
use common::{call, create, register_device, Server, ADMIN_KEY, ADMIN_SECRET};
use reqwest::Method;
use serde_json::{json, Value};

async fn sign_in(browser: &Browser, server: &Server, key: &str, secret: &str) {
    browser.goto(&server.url("/console/")).await;
    // Not signed in: the sign-in page.
    browser.find("#sign-in").await;
    browser.fill("#key", key).await;
    browser.fill("#secret", secret).await;
    browser.click_through("#sign-in").await;
    browser.find("header.top .role").await;
}

async fn shadow(server: &Server, name: &str) -> Value {
    let (status, body) = call(
        Method::GET,
        &server.url(&format!("/api/v1/things/{name}/shadow")),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn next_on(device: &mut Device, topic: &str) -> Value {
    loop {
        let (got, body) = device.next().await;
        if got == topic {
            return body;
        }
    }
}

async fn next_matching(device: &mut Device, prefix: &str, suffix: &str) -> (String, Value) {
    loop {
        let (got, body) = device.next().await;
        if got.starts_with(prefix) && got.ends_with(suffix) {
            return (got, body);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_edits_a_shadow_sends_a_command_and_follows_a_job_in_the_browser() {
    if !browser::available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // Samples every 200 ms, so the overview's charts have lines by the time they are shot.
    let server = Server::start_configured(dir.path(), "stats_sample_interval_ms = 200");
    register_device(&server, "lamp-1", "lamp-pw").await;
    for (name, kind) in [("lamp-2", "lamp"), ("fan-1", "fan")] {
        create(
            &server,
            "/api/v1/things",
            json!({"thingName": name, "thingType": kind}),
        )
        .await;
    }
    let (mut lamp, _) = Device::connect(&server, "lamp-1", ("lamp-1", "lamp-pw"), true).await;
    lamp.subscribe("$emqx/things/lamp-1/shadow/update/accepted")
        .await;
    lamp.subscribe("$emqx/commands/things/lamp-1/executions/+/request")
        .await;
    lamp.subscribe("$emqx/things/lamp-1/jobs/#").await;

    let browser = Browser::start(1280, 1000).await;
    sign_in(&browser, &server, ADMIN_KEY, ADMIN_SECRET).await;
    assert_eq!(browser.text("main h1").await, "Overview");
    browser
        .reload_until(&server.url("/console/"), "#things-registered .value", |n| {
            n == "3"
        })
        .await;

    // Find the Thing by its name's prefix; the list shows who is online.
    browser.goto(&server.url("/console/things")).await;
    browser.fill("#prefix", "lamp").await;
    browser.click_through("#search").await;
    let rows = browser
        .reload_until(
            &server.url("/console/things?prefix=lamp"),
            "#things tbody",
            |t| t.contains("lamp-1") && t.contains("lamp-2") && !t.contains("fan-1"),
        )
        .await;
    assert!(rows.contains("online"), "{rows}");
    browser.screenshot("things").await;
    browser
        .click_through("#things a[href='/console/things/lamp-1']")
        .await;
    browser.find("#shadow").await;

    // Edit desired: the delta appears at once (nothing reported yet).
    browser.fill("#desired-input", r#"{"color": "red"}"#).await;
    browser.click_through("#update-desired").await;
    let flash = browser.text("#flash").await;
    assert!(
        flash.contains("Desired state updated (version 1)"),
        "{flash}"
    );
    assert!(browser.text("#delta").await.contains("\"red\""));

    // The device reports another colour: the delta stays; then the wanted one: in sync.
    let page = server.url("/console/things/lamp-1");
    for (colour, version) in [("green", 2), ("red", 3)] {
        lamp.publish(
            "$emqx/things/lamp-1/shadow/update",
            json!({"state": {"reported": {"color": colour}}}).to_string(),
        )
        .await;
        // (The operator's update was accepted on this topic too: read past it.)
        while next_on(&mut lamp, "$emqx/things/lamp-1/shadow/update/accepted").await["version"]
            != version
        {}
        browser
            .reload_until(&page, "#shadow-version", |v| v == version.to_string())
            .await;
        let delta = browser.text("#delta").await;
        if colour == "green" {
            assert!(delta.contains("\"red\""), "{delta}");
            assert!(browser.text("#reported").await.contains("\"green\""));
            browser.screenshot("thing-delta").await;
        } else {
            assert!(delta.contains("In sync"), "{delta}");
        }
    }

    // A stale version is refused with the API's conflict, and nothing changes.
    stale_update(&browser).await;
    let flash = browser.text("#flash").await;
    assert!(flash.contains("409"), "{flash}");
    assert_eq!(shadow(&server, "lamp-1").await["version"], 3);

    // A command: sent from the page, answered by the device, SUCCEEDED on the page.
    browser.fill("#command-action", "reboot").await;
    browser.fill("#command-params", r#"{"delay": 1}"#).await;
    browser.fill("#command-ttl", "30").await;
    browser.click_through("#send-command").await;
    let flash = browser.text("#flash").await;
    assert!(flash.starts_with("Command "), "{flash}");
    let (topic, request) = next_matching(
        &mut lamp,
        "$emqx/commands/things/lamp-1/executions/",
        "/request",
    )
    .await;
    assert_eq!(request["action"], "reboot");
    assert_eq!(request["params"], json!({"delay": 1}));
    let execution = topic.split('/').nth(5).expect("execution id").to_owned();
    assert!(flash.contains(&execution), "{flash} {execution}");
    lamp.publish(
        &format!("$emqx/commands/things/lamp-1/executions/{execution}/response"),
        json!({"status": "SUCCEEDED", "result": {"uptime": 0}}).to_string(),
    )
    .await;
    browser
        .reload_until(
            &page,
            &format!("tr[data-execution='{execution}'] td.status"),
            |s| s == "SUCCEEDED",
        )
        .await;
    browser.screenshot("thing").await;

    // The history is the audit log, filterable by kind.
    browser.goto(&format!("{page}?kind=CommandSent")).await;
    let timeline = browser.text("#history ol.timeline").await;
    assert!(timeline.contains("CommandSent"), "{timeline}");
    assert!(!timeline.contains("ShadowUpdated"), "{timeline}");

    // A job: created on the jobs page, run by the device, COMPLETED on its page.
    browser.goto(&server.url("/console/jobs")).await;
    browser.fill("#job-id", "fw-2").await;
    browser
        .fill("#job-document", r#"{"firmware": "2.0"}"#)
        .await;
    browser.fill("#job-things", "lamp-1").await;
    browser.click_through("#create-job-button").await;
    let flash = browser.text("#flash").await;
    assert!(flash.contains("Job fw-2 created"), "{flash}");
    assert!(browser.text("#job-status").await.contains("IN_PROGRESS"));
    let jobs = "$emqx/things/lamp-1/jobs";
    let next = next_on(&mut lamp, &format!("{jobs}/notify-next")).await;
    assert_eq!(next["execution"]["jobDocument"], json!({"firmware": "2.0"}));
    lamp.publish(&format!("{jobs}/start-next"), "").await;
    let started = next_on(&mut lamp, &format!("{jobs}/start-next/accepted")).await;
    let version = started["execution"]["versionNumber"].clone();
    lamp.publish(
        &format!("{jobs}/fw-2/update"),
        json!({"status": "SUCCEEDED", "expectedVersion": version}).to_string(),
    )
    .await;
    next_on(&mut lamp, &format!("{jobs}/fw-2/update/accepted")).await;
    browser
        .reload_until(&server.url("/console/jobs/fw-2"), "#job-status", |s| {
            s == "COMPLETED"
        })
        .await;
    assert_eq!(browser.text("#count-SUCCEEDED").await, "1");
    // The page's script sized the progress bar (the no-JavaScript test sees it did not).
    let bar = browser.find(".progress .bar").await;
    assert!(bar.attr("style").await.expect("attribute").is_some());
    browser.screenshot("job").await;
    browser.goto(&server.url("/console/jobs")).await;
    assert!(browser.text("#jobs").await.contains("fw-2"));
    browser.screenshot("jobs").await;

    // Clients: the device's connection, kicked from the page.
    browser.goto(&server.url("/console/clients")).await;
    let clients = browser.text("#clients").await;
    assert!(
        clients.contains("lamp-1") && clients.contains("online"),
        "{clients}"
    );
    browser.screenshot("clients").await;
    browser
        .click_through("#clients button[type='submit']")
        .await;
    let flash = browser.text("#flash").await;
    assert!(flash.contains("Client lamp-1 kicked"), "{flash}");

    // The overview counts the command; its charts have the traffic of the last seconds.
    browser.goto(&server.url("/console/")).await;
    assert_eq!(browser.text("#commands-succeeded").await, "1");
    assert_eq!(browser.text("#jobs-completed").await, "1");
    assert_eq!(browser.text("#jobs-inProgress").await, "0");
    browser.screenshot("overview").await;
    // With JavaScript the figures refresh in place (every second at this sample rate).
    browser.find("#live[data-refreshed]").await;
    assert_eq!(browser.text("#commands-succeeded").await, "1");

    // A phone-sized screen: the Thing page still renders (screenshot for a look).
    browser
        .client
        .set_window_size(390, 844)
        .await
        .expect("resize");
    browser.goto(&page).await;
    browser.find("#shadow").await;
    browser.screenshot("thing-phone").await;

    // Signing out ends the session: the console asks to sign in again.
    browser.click_through("header.top button.link").await;
    browser.find("#sign-in").await;
    browser.goto(&page).await;
    browser.find("#sign-in").await;
}

/// Submits the desired-state form with version 1 (the page's is newer): what an operator gets
/// when another changed the shadow since the page was loaded.
async fn stale_update(browser: &Browser) {
    browser
        .navigating(|| async {
            browser
                .client
                .execute(
                    "const form = document.querySelector('#shadow form');\
             form.querySelector('input[name=version]').value = '1';\
             form.querySelector('textarea').value = '{\"color\": \"blue\"}';\
             form.submit();",
                    vec![],
                )
                .await
                .expect("submit");
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_sees_no_forms_and_what_it_tries_anyway_is_refused() {
    if !browser::available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    create(&server, "/api/v1/things", json!({"thingName": "lamp-1"})).await;
    let viewer = create(
        &server,
        "/api/v1/api-keys",
        json!({"name": "wall screen", "role": "viewer"}),
    )
    .await;
    let (key, secret) = (
        viewer["key"].as_str().expect("key"),
        viewer["secret"].as_str().expect("secret"),
    );

    let browser = Browser::start(1280, 1000).await;
    sign_in(&browser, &server, key, secret).await;
    assert_eq!(browser.text("header.top .role").await, "viewer");
    let page = server.url("/console/things/lamp-1");
    browser.goto(&page).await;
    browser.find("#shadow").await;
    assert!(!browser.has("#update-desired").await);
    assert!(!browser.has("#send-command").await);
    browser.goto(&server.url("/console/jobs")).await;
    assert!(!browser.has("#create-job-button").await);
    browser.screenshot("viewer-jobs").await;

    // A hand-made form with the viewer's own (valid) CSRF token: the API refuses the role.
    browser.goto(&page).await;
    browser
        .client
        .execute(
            "const csrf = document.querySelector('input[name=csrf]').value;\
             const form = document.createElement('form');\
             form.method = 'post'; form.action = '/console/things/lamp-1/desired';\
             for (const [k, v] of [['csrf', csrf], ['version', '0'], ['desired', '{\"on\": true}']]) {\
               const i = document.createElement('input'); i.name = k; i.value = v; form.appendChild(i);\
             }\
             document.body.appendChild(form); form.submit();",
            vec![],
        )
        .await
        .expect("submit");
    let flash = browser.text("#flash").await;
    assert!(flash.contains("403") && flash.contains("viewer"), "{flash}");
    let (status, _) = call(
        Method::GET,
        &server.url("/api/v1/things/lamp-1/shadow"),
        None,
    )
    .await;
    assert_eq!(status, 404, "the viewer's update must not have landed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_only_pages_are_readable_without_javascript() {
    if !browser::available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    create(
        &server,
        "/api/v1/things",
        json!({"thingName": "lamp-1", "thingType": "lamp"}),
    )
    .await;
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/things/lamp-1/shadow"),
        Some(json!({"state": {"desired": {"color": "red"}}})),
    )
    .await;
    assert_eq!(status, 200);
    create(
        &server,
        "/api/v1/jobs",
        json!({"jobId": "fw-1", "document": {}, "targets": {"thingNames": ["lamp-1"]}}),
    )
    .await;

    let browser = Browser::start_without_javascript(1280, 1000).await;
    assert_eq!(
        browser
            .client
            .execute("return 1", vec![])
            .await
            .ok()
            .and_then(|v| v.as_i64()),
        Some(1),
        "WebDriver's own scripts still run; the page's do not"
    );
    sign_in(&browser, &server, ADMIN_KEY, ADMIN_SECRET).await;
    assert_eq!(browser.text("#things-registered .value").await, "1");
    assert!(!browser.has("#live[data-refreshed]").await);
    browser.goto(&server.url("/console/things?type=lamp")).await;
    assert!(browser.text("#things").await.contains("lamp-1"));
    browser.goto(&server.url("/console/things/lamp-1")).await;
    assert!(browser.text("#delta").await.contains("\"red\""));
    browser.screenshot("no-javascript-thing").await;
    browser.goto(&server.url("/console/jobs/fw-1")).await;
    assert!(browser.text("#job-status").await.contains("IN_PROGRESS"));
    // The page's script would size the progress bars: it did not run.
    let bar = browser.find(".progress .bar").await;
    assert_eq!(bar.attr("style").await.expect("attribute"), None);
    browser.goto(&server.url("/console/clients")).await;
    browser.find("main h1").await;
}

/// A page on another site (`localhost` vs `127.0.0.1`) that posts to the console as soon as it
/// loads: what a CSRF attack looks like.
async fn attacker_site(target: String) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let html = format!(
                "<!DOCTYPE html><html><body><form id=f method=post action=\"{target}\">\
                 <input name=csrf value=guess><input name=version value=0>\
                 <input name=desired value='{{\"hacked\": true}}'></form>\
                 <script>document.getElementById('f').submit()</script></body></html>"
            );
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{html}",
                html.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_site_form_posted_from_a_signed_in_browser_is_refused() {
    if !browser::available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    create(&server, "/api/v1/things", json!({"thingName": "lamp-1"})).await;
    let browser = Browser::start(1280, 1000).await;
    sign_in(&browser, &server, ADMIN_KEY, ADMIN_SECRET).await;

    let port = attacker_site(server.url("/console/things/lamp-1/desired")).await;
    browser.goto(&format!("http://localhost:{port}/")).await;
    let refusal = browser.text("#flash").await;
    assert!(refusal.starts_with("Refused"), "{refusal}");
    browser.screenshot("csrf-refused").await;
    let (status, _) = call(
        Method::GET,
        &server.url("/api/v1/things/lamp-1/shadow"),
        None,
    )
    .await;
    assert_eq!(status, 404, "the cross-site update must not have landed");
    // The operator's own session still works.
    browser.goto(&server.url("/console/things/lamp-1")).await;
    browser.find("#update-desired").await;
}

// --- Sessions and forms with a plain HTTP client -------------------------------------------

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// Signs in; returns the session cookie (`name=value`) and the answer's Set-Cookie line.
async fn session(server: &Server, key: &str, secret: &str) -> (String, String) {
    let response = no_redirects()
        .post(server.url("/console/login"))
        .form(&[("key", key), ("secret", secret)])
        .send()
        .await
        .expect("sign in");
    assert_eq!(response.status(), 303);
    let set_cookie = response
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .expect("a session cookie")
        .to_owned();
    let cookie = set_cookie.split(';').next().expect("pair").to_owned();
    (cookie, set_cookie)
}

async fn page(server: &Server, cookie: &str, path: &str) -> (u16, String) {
    let response = no_redirects()
        .get(server.url(path))
        .header("cookie", cookie)
        .send()
        .await
        .expect("page");
    (
        response.status().as_u16(),
        response.text().await.expect("body"),
    )
}

fn csrf_of(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
    html[at..].split('"').next().expect("value").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_http_only_strict_and_end_with_their_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);

    // Wrong secrets and device keys do not sign in; nothing is shown signed out.
    let refused = no_redirects()
        .post(server.url("/console/login"))
        .form(&[("key", ADMIN_KEY), ("secret", "wrong")])
        .send()
        .await
        .expect("sign in");
    assert_eq!(refused.status(), 401);
    assert!(refused.headers().get("set-cookie").is_none());
    assert!(refused
        .text()
        .await
        .expect("body")
        .contains("invalid API key or secret"));
    let device = create(
        &server,
        "/api/v1/api-keys",
        json!({"name": "d", "role": "device"}),
    )
    .await;
    let refused = no_redirects()
        .post(server.url("/console/login"))
        .form(&[
            ("key", device["key"].as_str().expect("key")),
            ("secret", device["secret"].as_str().expect("secret")),
        ])
        .send()
        .await
        .expect("sign in");
    assert_eq!(refused.status(), 403);
    let (status, _) = page(&server, "thinghub_console=forged", "/console/things").await;
    assert_eq!(status, 303, "a forged cookie is sent to the sign-in page");
    // `key:secret` pasted whole into the key field signs in too.
    let pasted = no_redirects()
        .post(server.url("/console/login"))
        .form(&[
            ("key", format!("{ADMIN_KEY}:{ADMIN_SECRET}")),
            ("secret", String::new()),
        ])
        .send()
        .await
        .expect("sign in");
    assert_eq!(pasted.status(), 303);

    // The cookie: HttpOnly, SameSite=Strict, scoped to the console, expiring.
    let operator = create(
        &server,
        "/api/v1/api-keys",
        json!({"name": "night shift", "role": "operator"}),
    )
    .await;
    let key = operator["key"].as_str().expect("key");
    let (cookie, set_cookie) =
        session(&server, key, operator["secret"].as_str().expect("secret")).await;
    for attribute in [
        "HttpOnly",
        "SameSite=Strict",
        "Path=/console",
        "Max-Age=28800",
    ] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    let (status, html) = page(&server, &cookie, "/console/things").await;
    assert_eq!(status, 200);
    assert!(html.contains("operator"));

    // Deleting the key ends its sessions at the next request.
    let (status, _) = call(
        Method::DELETE,
        &server.url(&format!("/api/v1/api-keys/{key}")),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, _) = page(&server, &cookie, "/console/things").await;
    assert_eq!(status, 303);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changing_form_needs_its_sessions_csrf_token_and_a_same_origin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    create(&server, "/api/v1/things", json!({"thingName": "lamp-1"})).await;
    let (cookie, _) = session(&server, ADMIN_KEY, ADMIN_SECRET).await;
    let (_, html) = page(&server, &cookie, "/console/things/lamp-1").await;
    let csrf = csrf_of(&html);
    let post = |form: Vec<(&'static str, String)>, origin: Option<&'static str>| {
        let mut request = no_redirects()
            .post(server.url("/console/things/lamp-1/desired"))
            .header("cookie", &cookie)
            .form(&form);
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        async move { request.send().await.expect("post") }
    };
    let desired = || ("desired", r#"{"on": true}"#.to_owned());
    for (form, origin, why) in [
        (vec![desired()], None, "no token"),
        (
            vec![desired(), ("csrf", "A".repeat(csrf.len()))],
            None,
            "a wrong token",
        ),
        (
            vec![desired(), ("csrf", csrf.clone())],
            Some("http://evil.example"),
            "another origin",
        ),
    ] {
        let refused = post(form, origin).await;
        assert_eq!(refused.status(), 403, "{why}");
        let body = refused.text().await.expect("body");
        assert!(body.contains("Refused"), "{why}: {body}");
    }
    let (status, _) = call(
        Method::GET,
        &server.url("/api/v1/things/lamp-1/shadow"),
        None,
    )
    .await;
    assert_eq!(status, 404, "no refused form landed");

    // The same form with the token, from the console's own origin, goes through.
    let origin: &'static str = Box::leak(format!("http://{}", server.http).into_boxed_str());
    let accepted = post(vec![desired(), ("csrf", csrf)], Some(origin)).await;
    assert_eq!(accepted.status(), 303);
    assert_eq!(
        shadow(&server, "lamp-1").await["state"]["desired"]["on"],
        true
    );

    // Pages carry the headers that keep them out of frames and other sites' scripts.
    let response = no_redirects()
        .get(server.url("/console/things"))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("page");
    let csp = response.headers()["content-security-policy"]
        .to_str()
        .expect("ascii");
    assert!(csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self'"));
    assert_eq!(response.headers()["x-frame-options"], "DENY");
    assert_eq!(response.headers()["cache-control"], "no-store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_payloads_render_as_text_never_as_markup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    create(
        &server,
        "/api/v1/things",
        json!({"thingName": "lamp-1",
               "attributes": {"note": "<img src=x onerror=alert(2)>"}}),
    )
    .await;
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/things/lamp-1/shadow"),
        Some(json!({"state": {"desired": {"label": "<script>alert(1)</script>"}}})),
    )
    .await;
    assert_eq!(status, 200);
    let (cookie, _) = session(&server, ADMIN_KEY, ADMIN_SECRET).await;
    for path in ["/console/things", "/console/things/lamp-1"] {
        let (status, html) = page(&server, &cookie, path).await;
        assert_eq!(status, 200);
        assert!(!html.contains("<script>alert"), "{path}");
        assert!(!html.contains("<img src=x"), "{path}");
    }
    let (_, html) = page(&server, &cookie, "/console/things/lamp-1").await;
    assert!(html.contains("&lt;img src=x onerror=alert(2)&gt;"));
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    // An unknown page, or a listing the API refuses, is an HTML page with the status.
    let (status, html) = page(&server, &cookie, "/console/nowhere").await;
    assert_eq!(status, 404);
    assert!(html.contains("no page /console/nowhere"), "{html}");
    let (status, html) = page(&server, &cookie, "/console/things?group=nope").await;
    assert_eq!(status, 404);
    assert!(html.contains("nope"), "{html}");
    // An unknown Thing is a 404 page that says so.
    let (status, html) = page(&server, &cookie, "/console/things/nope").await;
    assert_eq!(status, 404);
    assert!(html.contains("Thing &#39;nope&#39; not found") || html.contains("not found"));
}

async fn post_form(server: &Server, cookie: &str, path: &str, form: &[(&str, &str)]) -> u16 {
    let origin = format!("http://{}", server.http);
    no_redirects()
        .post(server.url(path))
        .header("cookie", cookie)
        .header("origin", origin)
        .form(form)
        .send()
        .await
        .expect("post")
        .status()
        .as_u16()
}

/// The flash message the next page shows (once).
async fn flash(server: &Server, cookie: &str, path: &str) -> String {
    let (_, html) = page(server, cookie, path).await;
    let at = html.find("id=\"flash\"").expect("a flash message");
    let text = &html[at..];
    let start = text.find('>').expect("tag end") + 1;
    text[start..].split('<').next().expect("text").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_cancel_a_command_and_a_job_and_kick_a_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    register_device(&server, "lamp-1", "pw").await;
    let (_lamp, _) = Device::connect(&server, "lamp-1", ("lamp-1", "pw"), true).await;
    let (cookie, _) = session(&server, ADMIN_KEY, ADMIN_SECRET).await;
    let (_, html) = page(&server, &cookie, "/console/things/lamp-1").await;
    let csrf = csrf_of(&html);

    // Send and cancel a command.
    let status = post_form(
        &server,
        &cookie,
        "/console/things/lamp-1/commands",
        &[("csrf", &csrf), ("action", "blink"), ("ttl", "600")],
    )
    .await;
    assert_eq!(status, 303);
    let sent = flash(&server, &cookie, "/console/things/lamp-1").await;
    let execution = sent
        .strip_prefix("Command ")
        .and_then(|rest| rest.strip_suffix(" sent."))
        .unwrap_or_else(|| panic!("{sent}"))
        .to_owned();
    let status = post_form(
        &server,
        &cookie,
        &format!("/console/things/lamp-1/commands/{execution}/cancel"),
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(status, 303);
    assert_eq!(
        flash(&server, &cookie, "/console/things/lamp-1").await,
        format!("Command {execution} canceled.")
    );
    let (_, command) = call(
        Method::GET,
        &server.url(&format!("/api/v1/things/lamp-1/commands/{execution}")),
        None,
    )
    .await;
    assert_eq!(command["status"], "CANCELED");
    // Bad input on a form is told on the page, and nothing is sent.
    post_form(
        &server,
        &cookie,
        "/console/things/lamp-1/commands",
        &[
            ("csrf", &csrf),
            ("action", "blink"),
            ("params", "{not json"),
        ],
    )
    .await;
    let refused = flash(&server, &cookie, "/console/things/lamp-1").await;
    assert!(refused.starts_with("params is not valid JSON"), "{refused}");
    post_form(
        &server,
        &cookie,
        "/console/things/lamp-1/commands",
        &[("csrf", &csrf), ("action", ""), ("ttl", "60")],
    )
    .await;
    let refused = flash(&server, &cookie, "/console/things/lamp-1").await;
    assert!(refused.starts_with("400"), "{refused}");

    // Create a job with a rollout rate, then cancel it.
    let status = post_form(
        &server,
        &cookie,
        "/console/jobs",
        &[
            ("csrf", &csrf),
            ("job_id", "slow"),
            ("document", r#"{"step": 1}"#),
            ("things", "lamp-1"),
            ("maximum_per_minute", "1"),
        ],
    )
    .await;
    assert_eq!(status, 303);
    assert_eq!(
        flash(&server, &cookie, "/console/jobs/slow").await,
        "Job slow created."
    );
    let status = post_form(
        &server,
        &cookie,
        "/console/jobs/slow/cancel",
        &[
            ("csrf", &csrf),
            ("force", "true"),
            ("reason_code", "WRONG_FILE"),
        ],
    )
    .await;
    assert_eq!(status, 303);
    assert_eq!(
        flash(&server, &cookie, "/console/jobs/slow").await,
        "Job slow canceled."
    );
    let (_, job) = call(Method::GET, &server.url("/api/v1/jobs/slow"), None).await;
    assert_eq!(
        (&job["status"], &job["reasonCode"]),
        (&json!("CANCELED"), &json!("WRONG_FILE"))
    );
    // A job without targets is the API's 400, shown on the jobs page.
    post_form(
        &server,
        &cookie,
        "/console/jobs",
        &[("csrf", &csrf), ("document", "{}")],
    )
    .await;
    assert!(flash(&server, &cookie, "/console/jobs")
        .await
        .starts_with("400"));

    // Kick the device's client.
    let status = post_form(
        &server,
        &cookie,
        "/console/clients/lamp-1/kick",
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(status, 303);
    assert_eq!(
        flash(&server, &cookie, "/console/clients").await,
        "Client lamp-1 kicked."
    );
    let (_, thing) = call(Method::GET, &server.url("/api/v1/things/lamp-1"), None).await;
    assert_eq!(thing["lastDisconnectReason"], "kicked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_ins_are_bounded_and_expire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_configured(
        dir.path(),
        "console_sessions_max = 1\nconsole_session_ttl_ms = 1000",
    );
    let (cookie, set_cookie) = session(&server, ADMIN_KEY, ADMIN_SECRET).await;
    assert!(set_cookie.contains("Max-Age=1"), "{set_cookie}");
    let full = no_redirects()
        .post(server.url("/console/login"))
        .form(&[("key", ADMIN_KEY), ("secret", ADMIN_SECRET)])
        .send()
        .await
        .expect("sign in");
    assert_eq!(full.status(), 503);
    assert!(full
        .text()
        .await
        .expect("body")
        .contains("console_sessions_max"));
    // The first session ends by itself; then there is room again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while page(&server, &cookie, "/console/things").await.0 == 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the session never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    session(&server, ADMIN_KEY, ADMIN_SECRET).await;
}
