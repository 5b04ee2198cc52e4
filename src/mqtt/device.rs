//! The device contract's topics, both ways: one parse of a client's topic into a typed
//! [`DeviceRequest`], and the builders of every topic the server publishes on, for the native
//! namespace (`$emqx` by default) and, with `--aws-compat`, `$aws`.
//!
//! Replies go back to the namespace the request came in on; effects that anyone may watch
//! (accepted, delta, documents, command requests) go to every enabled namespace.

/// The topic prefix of the AWS IoT compatible mode.
pub const AWS_PREFIX: &str = "$aws";

/// Which topic namespace a request came in on (replies to it go back there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Namespace {
    /// `{prefix}/...` (`$emqx` by default).
    Native,
    /// `$aws/...` (`--aws-compat`).
    Aws,
}

/// A shadow request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowOp {
    /// `shadow/update`.
    Update,
    /// `shadow/get`.
    Get,
    /// `shadow/delete`.
    Delete,
}

impl ShadowOp {
    /// The topic level.
    pub fn name(self) -> &'static str {
        match self {
            ShadowOp::Update => "update",
            ShadowOp::Get => "get",
            ShadowOp::Delete => "delete",
        }
    }
}

/// A job request (`{ns}/things/{thing}/jobs/...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobsOp<'t> {
    /// `jobs/get`: the pending executions.
    Get,
    /// `jobs/start-next`.
    StartNext,
    /// `jobs/{jobId}/get`.
    Describe(&'t str),
    /// `jobs/{jobId}/update`.
    Update(&'t str),
}

impl JobsOp<'_> {
    /// The topic levels after `jobs/` (where the replies go, plus `/accepted|rejected`).
    pub fn path(&self) -> String {
        match self {
            JobsOp::Get => "get".into(),
            JobsOp::StartNext => "start-next".into(),
            JobsOp::Describe(job_id) => format!("{job_id}/get"),
            JobsOp::Update(job_id) => format!("{job_id}/update"),
        }
    }
}

/// A PUBLISH that is a request to a Thing (not routed to subscribers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest<'t> {
    /// `{ns}/things/{thing}/shadow/{update|get|delete}`.
    Shadow {
        /// The Thing.
        thing: &'t str,
        /// What is asked.
        op: ShadowOp,
        /// Where it came in.
        namespace: Namespace,
    },
    /// `{prefix}/things/{thing}/events/{eventType}` (native namespace only).
    Event {
        /// The Thing.
        thing: &'t str,
        /// The event type.
        event_type: &'t str,
    },
    /// `{ns}/things/{thing}/jobs/{get|start-next|{jobId}/get|{jobId}/update}`.
    Jobs {
        /// The Thing.
        thing: &'t str,
        /// What is asked.
        op: JobsOp<'t>,
        /// Where it came in.
        namespace: Namespace,
    },
    /// `{ns}/commands/things/{thing}/executions/{id}/response` (AWS: optionally `.../json`).
    CommandResponse {
        /// The Thing.
        thing: &'t str,
        /// The execution answered.
        execution_id: &'t str,
        /// Where it came in.
        namespace: Namespace,
    },
}

impl DeviceRequest<'_> {
    /// The Thing the request is for.
    pub fn thing(&self) -> &str {
        match self {
            DeviceRequest::Shadow { thing, .. }
            | DeviceRequest::Event { thing, .. }
            | DeviceRequest::Jobs { thing, .. }
            | DeviceRequest::CommandResponse { thing, .. } => thing,
        }
    }
}

/// One topic level: not empty, no `/`.
fn one_level(s: &str) -> bool {
    !s.is_empty() && !s.contains('/')
}

/// The device contract's topics under one configuration.
#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
    aws_compat: bool,
}

impl Topics {
    /// Topics under `prefix`, plus `$aws` when `aws_compat`.
    pub fn new(prefix: &str, aws_compat: bool) -> Topics {
        Topics {
            prefix: prefix.to_owned(),
            aws_compat,
        }
    }

    /// The namespaces effects are published in.
    pub fn namespaces(&self) -> &'static [Namespace] {
        if self.aws_compat {
            &[Namespace::Native, Namespace::Aws]
        } else {
            &[Namespace::Native]
        }
    }

    fn prefix_of(&self, namespace: Namespace) -> &str {
        match namespace {
            Namespace::Native => &self.prefix,
            Namespace::Aws => AWS_PREFIX,
        }
    }

    /// Whether `topic` is a request to a Thing, and which.
    pub fn parse<'t>(&self, topic: &'t str) -> Option<DeviceRequest<'t>> {
        if let Some(rest) = topic.strip_prefix(self.prefix.as_str()) {
            if let Some(request) = parse_in(rest, Namespace::Native) {
                return Some(request);
            }
        }
        if self.aws_compat {
            if let Some(rest) = topic.strip_prefix(AWS_PREFIX) {
                return parse_in(rest, Namespace::Aws);
            }
        }
        None
    }

    /// `{ns}/things/{thing}/shadow/{tail}`.
    pub fn shadow(&self, namespace: Namespace, thing: &str, tail: &str) -> String {
        // Built at its length (it is built for every shadow reply; `format!` grew it twice).
        let prefix = self.prefix_of(namespace);
        let mut topic = String::with_capacity(prefix.len() + thing.len() + tail.len() + 16);
        for part in [prefix, "/things/", thing, "/shadow/", tail] {
            topic.push_str(part);
        }
        topic
    }

    /// `{ns}/things/{thing}/jobs/{tail}`.
    pub fn jobs(&self, namespace: Namespace, thing: &str, tail: &str) -> String {
        format!("{}/things/{thing}/jobs/{tail}", self.prefix_of(namespace))
    }

    /// `{prefix}/things/{thing}/events/{event_type}/{tail}`.
    pub fn event(&self, thing: &str, event_type: &str, tail: &str) -> String {
        format!("{}/things/{thing}/events/{event_type}/{tail}", self.prefix)
    }

    /// `{ns}/commands/things/{thing}/executions/{id}/{tail}` (AWS topics end with `/json`, the
    /// payload format).
    pub fn execution(&self, namespace: Namespace, thing: &str, id: &str, tail: &str) -> String {
        match namespace {
            Namespace::Native => format!(
                "{}/commands/things/{thing}/executions/{id}/{tail}",
                self.prefix
            ),
            Namespace::Aws => {
                format!("{AWS_PREFIX}/commands/things/{thing}/executions/{id}/{tail}/json")
            }
        }
    }
}

/// Parses what follows a namespace's prefix.
fn parse_in(rest: &str, namespace: Namespace) -> Option<DeviceRequest<'_>> {
    if let Some(rest) = rest.strip_prefix("/things/") {
        if let Some((thing, action)) = rest.split_once("/shadow/") {
            let op = match action {
                "update" => ShadowOp::Update,
                "get" => ShadowOp::Get,
                "delete" => ShadowOp::Delete,
                _ => return None,
            };
            return one_level(thing).then_some(DeviceRequest::Shadow {
                thing,
                op,
                namespace,
            });
        }
        if let Some((thing, action)) = rest.split_once("/jobs/") {
            let op = match action {
                "get" => JobsOp::Get,
                "start-next" => JobsOp::StartNext,
                _ => match action.split_once('/')? {
                    (job_id, "get") if one_level(job_id) => JobsOp::Describe(job_id),
                    (job_id, "update") if one_level(job_id) => JobsOp::Update(job_id),
                    _ => return None,
                },
            };
            return one_level(thing).then_some(DeviceRequest::Jobs {
                thing,
                op,
                namespace,
            });
        }
        if namespace == Namespace::Native {
            let (thing, event_type) = rest.split_once("/events/")?;
            return (one_level(thing) && one_level(event_type))
                .then_some(DeviceRequest::Event { thing, event_type });
        }
        return None;
    }
    let rest = rest.strip_prefix("/commands/things/")?;
    let (thing, rest) = rest.split_once("/executions/")?;
    let (execution_id, tail) = rest.split_once('/')?;
    let is_response =
        tail == "response" || (namespace == Namespace::Aws && tail == "response/json");
    (is_response && one_level(thing) && one_level(execution_id)).then_some(
        DeviceRequest::CommandResponse {
            thing,
            execution_id,
            namespace,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics() -> Topics {
        Topics::new("$emqx", true)
    }

    #[test]
    fn command_response_topics_name_one_thing_and_one_execution() {
        let native = Topics::new("$emqx", false);
        assert_eq!(
            native.parse("$emqx/commands/things/t1/executions/e-1/response"),
            Some(DeviceRequest::CommandResponse {
                thing: "t1",
                execution_id: "e-1",
                namespace: Namespace::Native
            })
        );
        for not_a_response in [
            "$emqx/commands/things/t1/executions/e-1/request",
            "$emqx/commands/things/t1/executions/e-1/response/json",
            "$emqx/commands/things/t1/executions/e-1/response/accepted",
            "$emqx/commands/things//executions/e-1/response",
            "$emqx/commands/things/t1/executions//response",
            "$emqx/things/t1/executions/e-1/response",
            "$aws/commands/things/t1/executions/e-1/response/json",
        ] {
            assert_eq!(native.parse(not_a_response), None, "{not_a_response}");
        }
        let aws = |id| DeviceRequest::CommandResponse {
            thing: "t1",
            execution_id: id,
            namespace: Namespace::Aws,
        };
        assert_eq!(
            topics().parse("$aws/commands/things/t1/executions/e-1/response/json"),
            Some(aws("e-1"))
        );
        assert_eq!(
            topics().parse("$aws/commands/things/t1/executions/e-1/response"),
            Some(aws("e-1"))
        );
        assert_eq!(
            topics().parse("$aws/commands/things/t1/executions/e-1/response/accepted/json"),
            None
        );
    }

    #[test]
    fn job_topics_name_one_thing_and_at_most_one_job_in_both_namespaces() {
        let jobs = |thing, op, namespace| {
            Some(DeviceRequest::Jobs {
                thing,
                op,
                namespace,
            })
        };
        let t = topics();
        assert_eq!(
            t.parse("$emqx/things/t1/jobs/get"),
            jobs("t1", JobsOp::Get, Namespace::Native)
        );
        assert_eq!(
            t.parse("$aws/things/t1/jobs/start-next"),
            jobs("t1", JobsOp::StartNext, Namespace::Aws)
        );
        assert_eq!(
            t.parse("$emqx/things/t1/jobs/fw-2/get"),
            jobs("t1", JobsOp::Describe("fw-2"), Namespace::Native)
        );
        assert_eq!(
            t.parse("$emqx/things/t1/jobs/get/update"),
            jobs("t1", JobsOp::Update("get"), Namespace::Native),
            "a job may be called get"
        );
        for not_a_request in [
            "$emqx/things/t1/jobs/get/accepted",
            "$emqx/things/t1/jobs/notify",
            "$emqx/things/t1/jobs/notify-next",
            "$emqx/things/t1/jobs/fw-2/update/accepted",
            "$emqx/things/t1/jobs//update",
            "$emqx/things//jobs/get",
            "$emqx/things/t1/jobs/fw-2/cancel",
        ] {
            assert_eq!(t.parse(not_a_request), None, "{not_a_request}");
        }
        assert_eq!(JobsOp::Update("fw-2").path(), "fw-2/update");
    }

    #[test]
    fn event_topics_name_one_thing_and_one_type_in_the_native_namespace_only() {
        assert_eq!(
            topics().parse("$emqx/things/t1/events/overheat"),
            Some(DeviceRequest::Event {
                thing: "t1",
                event_type: "overheat"
            })
        );
        for not_an_event in [
            "$emqx/things/t1/events/overheat/accepted",
            "$emqx/things/t1/events/",
            "$emqx/things//events/x",
            "$aws/things/t1/events/overheat",
        ] {
            assert_eq!(topics().parse(not_an_event), None, "{not_an_event}");
        }
    }

    #[test]
    fn only_exact_shadow_request_topics_are_requests() {
        let native = Topics::new("$emqx", false);
        for (topic, op) in [
            ("$emqx/things/t1/shadow/update", ShadowOp::Update),
            ("$emqx/things/t1/shadow/get", ShadowOp::Get),
            ("$emqx/things/t1/shadow/delete", ShadowOp::Delete),
        ] {
            assert_eq!(
                native.parse(topic),
                Some(DeviceRequest::Shadow {
                    thing: "t1",
                    op,
                    namespace: Namespace::Native
                })
            );
        }
        for not_a_request in [
            "$emqx/things/t1/shadow/update/accepted",
            "$emqx/things/t1/shadow/update/delta",
            "$emqx/things//shadow/update",
            "$emqx/things/a/b/shadow/update",
            "$aws/things/t1/shadow/update",
            "$emqxx/things/t1/shadow/update",
        ] {
            assert_eq!(native.parse(not_a_request), None, "{not_a_request}");
        }
        assert_eq!(
            topics().parse("$aws/things/t1/shadow/update"),
            Some(DeviceRequest::Shadow {
                thing: "t1",
                op: ShadowOp::Update,
                namespace: Namespace::Aws
            })
        );
    }

    #[test]
    fn reply_topics_are_built_per_namespace() {
        let t = topics();
        assert_eq!(
            t.shadow(Namespace::Aws, "t1", "update/delta"),
            "$aws/things/t1/shadow/update/delta"
        );
        assert_eq!(
            t.execution(Namespace::Native, "t1", "e1", "request"),
            "$emqx/commands/things/t1/executions/e1/request"
        );
        assert_eq!(
            t.execution(Namespace::Aws, "t1", "e1", "request"),
            "$aws/commands/things/t1/executions/e1/request/json"
        );
        assert_eq!(
            t.event("t1", "overheat", "accepted"),
            "$emqx/things/t1/events/overheat/accepted"
        );
    }
}
