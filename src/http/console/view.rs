//! The console's layout and the pieces its pages share. maud escapes every interpolated value,
//! so a Thing's name, a payload or an error message is shown as text, never as markup.

use maud::{html, Markup, DOCTYPE};
use serde_json::Value;

use super::session::Flash;
use super::Signed;

/// Which section a page belongs to (the navigation highlights it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// The node's figures.
    Overview,
    /// The registry.
    Things,
    /// Fleet jobs.
    Jobs,
    /// MQTT clients.
    Clients,
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · thinghub" }
            link rel="stylesheet" href="/console/assets/console.css";
            script src="/console/assets/console.js" defer {}
        }
    }
}

/// A whole page for a signed-in operator, with the last action's outcome.
pub fn page(
    who: &Signed,
    flash: Option<&Flash>,
    section: Section,
    title: &str,
    body: Markup,
) -> Markup {
    let nav = [
        (Section::Overview, "/console/", "Overview"),
        (Section::Things, "/console/things", "Things"),
        (Section::Jobs, "/console/jobs", "Jobs"),
        (Section::Clients, "/console/clients", "Clients"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header.top {
                    a.brand href="/console/" { "thinghub" }
                    nav {
                        @for (s, href, label) in nav {
                            a href=(href) class=[(s == section).then_some("current")] { (label) }
                        }
                    }
                    div.who {
                        span.key { (who.session.principal.key) }
                        " "
                        span class={"role role-" (who.role().as_str())} { (who.role().as_str()) }
                        form.inline method="post" action="/console/logout" {
                            (csrf(who))
                            button.link type="submit" { "Sign out" }
                        }
                    }
                }
                main {
                    @if let Some(flash) = flash { (flash_box(flash)) }
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

fn flash_box(flash: &Flash) -> Markup {
    html! {
        p class={"flash " (if flash.ok { "ok" } else { "error" })} role="status" id="flash" {
            (flash.message)
        }
    }
}

/// The hidden CSRF field of a changing form.
pub fn csrf(who: &Signed) -> Markup {
    html! { input type="hidden" name="csrf" value=(who.session.csrf); }
}

/// The sign-in page, with why the last try failed.
pub fn login(error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head("Sign in"))
            body.login {
                main {
                    h1 { "thinghub console" }
                    @if let Some(error) = error {
                        p.flash.error role="alert" id="flash" { (error) }
                    }
                    form method="post" action="/console/login" {
                        label { "API key" input name="key" id="key" required autocomplete="username"; }
                        label { "Secret" input name="secret" id="secret" type="password" required autocomplete="current-password"; }
                        button type="submit" id="sign-in" { "Sign in" }
                    }
                    p.hint { "Use an admin, operator or viewer API key (" code { "key:secret" } " as for the API)." }
                }
            }
        }
    }
}

/// A page with one message (a refusal).
pub fn bare(title: &str, message: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body.login { main { h1 { (title) } p.flash.error id="flash" { (message) } p { a href="/console/" { "Back to the console" } } } }
        }
    }
}

/// Unix ms as UTC `YYYY-MM-DD hh:mm:ss`.
pub fn time(ms: u64) -> String {
    let secs = ms / 1000;
    let rem = secs % 86_400;
    let (y, mo, d) = crate::audit::civil_from_days((secs / 86_400) as i64);
    format!(
        "{y:04}-{mo:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A JSON field holding Unix ms, as a time (or a dash).
pub fn time_of(value: &Value) -> String {
    value.as_u64().map_or_else(|| "–".into(), time)
}

/// A JSON value as indented text.
pub fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

/// A JSON string field, or a dash.
pub fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "–".into(),
        other => other.to_string(),
    }
}

/// A status as a coloured badge.
pub fn badge(status: &str) -> Markup {
    html! { span class={"badge s-" (status.to_ascii_lowercase())} { (status) } }
}

/// Online/offline.
pub fn online(online: bool) -> Markup {
    if online {
        html! { span.badge.s-online { "online" } }
    } else {
        html! { span.badge.s-offline { "offline" } }
    }
}

/// The API's error for a section that could not be read.
pub fn unreadable(what: &str, why: &str) -> Markup {
    html! { p.flash.error { (what) " could not be read: " (why) } }
}

/// A line chart of `points` (x: seconds ago, y: per second) as inline SVG.
pub fn chart(label: &str, unit: &str, points: &[(f64, f64)]) -> Markup {
    const W: f64 = 300.0;
    const H: f64 = 80.0;
    let span = points.iter().map(|(ago, _)| *ago).fold(60.0_f64, f64::max);
    let top = points.iter().map(|(_, y)| *y).fold(0.0_f64, f64::max);
    let scale = if top > 0.0 { top * 1.1 } else { 1.0 };
    let path: String = points
        .iter()
        .enumerate()
        .map(|(i, (ago, y))| {
            let x = W - ago / span * W;
            let y = H - y / scale * H;
            format!("{}{x:.1},{y:.1}", if i == 0 { "M" } else { " L" })
        })
        .collect();
    let last = points.last().map_or(0.0, |(_, y)| *y);
    html! {
        figure.chart {
            figcaption { (label) " " strong { (format!("{last:.1}")) } " " (unit) }
            svg viewBox={"0 0 " (W) " " (H)} preserveAspectRatio="none" role="img" aria-label=(label) {
                line x1="0" y1=(H) x2=(W) y2=(H) stroke="#ccc" {}
                @if points.len() > 1 { path d=(path) fill="none" stroke="#2563eb" stroke-width="2" vector-effect="non-scaling-stroke" {} }
            }
            small { "last " (format!("{:.0}", span / 60.0)) " min, peak " (format!("{top:.1}")) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_calendar_dates() {
        assert_eq!(time(0), "1970-01-01 00:00:00");
        assert_eq!(time(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(time(1_796_342_399_000), "2026-12-03 23:59:59");
    }
}
