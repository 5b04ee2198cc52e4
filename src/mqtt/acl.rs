//! Who may publish or subscribe where.
//!
//! Default rules:
//! - A superuser (backend application) may use any topic.
//! - A client connected as a Thing may use only `{prefix}/things/{itsName}/...` and
//!   `{prefix}/commands/things/{itsName}/...`. A filter is allowed only if it starts with one of
//!   those literal prefixes, so its wildcards can only match inside them.
//! - Any other client (a plain user, or anonymous in development mode) may use every topic
//!   outside the `$` system namespace.

/// What a client wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// PUBLISH (and will messages).
    Publish,
    /// SUBSCRIBE.
    Subscribe,
}

/// Who is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The MQTT client id.
    pub client_id: String,
    /// The authenticated username, if any.
    pub username: Option<String>,
    /// The Thing this connection acts as.
    pub thing: Option<String>,
    /// May use any topic.
    pub superuser: bool,
}

/// The ACL.
#[derive(Debug, Clone)]
pub struct Acl {
    prefix: String,
}

impl Acl {
    /// The default rules for system topics under `prefix` (`$emqx`).
    pub fn new(prefix: &str) -> Acl {
        Acl {
            prefix: prefix.to_owned(),
        }
    }

    /// Whether `who` may `action` on `topic` (a topic name, or a filter without `$share/g/`).
    pub fn allows(&self, who: &Identity, _action: Action, topic: &str) -> bool {
        if who.superuser {
            return true;
        }
        if let Some(thing) = &who.thing {
            let prefix = &self.prefix;
            return [
                format!("{prefix}/things/{thing}/"),
                format!("{prefix}/commands/things/{thing}/"),
            ]
            .iter()
            .any(|own| topic.starts_with(own.as_str()));
        }
        !topic.starts_with('$')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thing(name: &str) -> Identity {
        Identity {
            client_id: name.into(),
            username: Some(name.into()),
            thing: Some(name.into()),
            superuser: false,
        }
    }

    #[test]
    fn a_thing_is_confined_to_its_own_topics() {
        let acl = Acl::new("$emqx");
        let t1 = thing("t1");
        let cases = [
            ("$emqx/things/t1/shadow/update", true),
            ("$emqx/things/t1/#", true),
            ("$emqx/commands/things/t1/executions/+/request", true),
            ("$emqx/things/t2/shadow/update", false),
            ("$emqx/things/t10/shadow/update", false),
            ("$emqx/things/+/shadow/update", false),
            ("$emqx/#", false),
            ("#", false),
            ("app/telemetry", false),
            ("$emqx/things/t1", false),
        ];
        for (topic, expected) in cases {
            assert_eq!(
                acl.allows(&t1, Action::Subscribe, topic),
                expected,
                "{topic}"
            );
        }
    }

    #[test]
    fn superusers_use_anything_and_plain_users_stay_out_of_system_topics() {
        let acl = Acl::new("$emqx");
        let backend = Identity {
            client_id: "b".into(),
            username: Some("b".into()),
            thing: None,
            superuser: true,
        };
        assert!(acl.allows(&backend, Action::Subscribe, "$emqx/things/+/shadow/#"));
        let plain = Identity {
            superuser: false,
            ..backend
        };
        assert!(acl.allows(&plain, Action::Publish, "app/x"));
        assert!(!acl.allows(&plain, Action::Publish, "$emqx/things/t1/shadow/update"));
    }
}
