//! Who may publish or subscribe where.
//!
//! 1. Server topics are the server's: nobody (not even a superuser) may publish on a reply or
//!    notification topic of the system namespaces (`.../accepted`, `.../rejected`,
//!    `.../delta`, `.../documents`, command `.../request`, `jobs/notify*`), so backends can
//!    trust what arrives there.
//! 2. A superuser (backend application) may use any other topic.
//! 3. Operator rules (`/api/v1/authorization/rules`) are checked next, in creation order; the
//!    first rule that matches the client and the topic decides. `${username}` and `${clientid}`
//!    are filled in per client (in one pass), but only with a value that is one plain topic
//!    level: a value that is empty or contains `+`, `#` or `/` makes an allow rule grant
//!    nothing and a deny rule deny everything from that level on (fail closed). An allow grants
//!    a subscription only if its filter covers the whole subscribed filter (`a/+` does not grant
//!    `a/#`); a deny refuses every filter that reaches its topics.
//! 4. The default rules: a client connected as a Thing may use only `{prefix}/things/{itsName}/...`
//!    and `{prefix}/commands/things/{itsName}/...` (a filter only if it starts with one of those
//!    literal prefixes, so its wildcards stay inside them). Any other client (a plain user, or
//!    anonymous in development mode) may use every topic outside the server's namespaces
//!    (`{prefix}`, `$aws`, `$SYS`); other `$` topics are ordinary topics.

use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use thinghub_storage::{Envelope, StorageError, Store};

use super::topic;

const RULE_PREFIX: &str = "aclrule/";
const RULE_RECORD: &str = "AclRule";
/// Most operator rules (each CONNECT-time check walks them all).
pub const ACL_RULES_MAX: usize = 1000;

/// The `kv` key prefix of stored ACL rules.
pub const ACL_RULE_PREFIX: &str = RULE_PREFIX;

/// Whether a stored ACL rule record decodes and is a valid rule (`thinghub check`).
pub fn check_stored_rule(bytes: &[u8]) -> Result<(), String> {
    let envelope = Envelope::from_bytes(bytes).map_err(|e| e.0)?;
    if envelope.event_type != RULE_RECORD {
        return Err(format!(
            "expected an {RULE_RECORD} record, found {}",
            envelope.event_type
        ));
    }
    let rule = envelope.payload_as::<AclRule>().map_err(|e| e.0)?;
    rule.validate().map_err(|e| e.to_string())
}

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
    /// The Cumulocity bootstrap user: may only subscribe its device's `s/dcr` (and ask for
    /// credentials on `s/ucr`, which is served before the ACL). Its client id is
    /// `{BOOTSTRAP_CLIENT_PREFIX}{device}`.
    pub bootstrap: bool,
}

/// Where a Cumulocity device's own topics live inside the broker: its `s/ds` is
/// `$c8y/{device}/s/ds`, and only its connection sees it under the name `s/ds`.
pub const C8Y_NAMESPACE: &str = "$c8y";

/// The session key of a device's connection with the Cumulocity bootstrap user: its own, so it
/// never meets the device's own session (no client may connect with a client id starting so).
pub const BOOTSTRAP_CLIENT_PREFIX: &str = "$c8y-bootstrap/";

/// allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// The action is allowed.
    Allow,
    /// The action is denied.
    Deny,
}

/// Which actions a rule covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    /// PUBLISH only.
    Publish,
    /// SUBSCRIBE only.
    Subscribe,
    /// Both.
    All,
}

/// An operator rule, as stored and as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"username": "sensor-1", "permission": "allow", "action": "subscribe", "topic": "alerts/#"}))]
pub struct AclRule {
    /// Identifier (creation-ordered).
    #[serde(default)]
    pub id: String,
    /// Applies to this username only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Applies to this client id only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clientid: Option<String>,
    /// allow or deny.
    pub permission: Permission,
    /// publish, subscribe or all.
    pub action: RuleAction,
    /// A topic filter; `${username}` and `${clientid}` are replaced per client.
    pub topic: String,
}

/// Why a rule was refused.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// Invalid rule.
    #[error("{0}")]
    Invalid(String),
    /// No such rule.
    #[error("rule '{0}' not found")]
    NotFound(String),
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl AclRule {
    fn validate(&self) -> Result<(), RuleError> {
        if self.username.is_some() && self.clientid.is_some() {
            return Err(RuleError::Invalid(
                "a rule names a username or a clientid, not both".into(),
            ));
        }
        let probe = self
            .topic
            .replace("${username}", "u")
            .replace("${clientid}", "c");
        topic::validate_filter(&probe)
            .map_err(|e| RuleError::Invalid(format!("topic '{}': {e}", self.topic)))
    }

    /// The rule's filter for `who`, placeholders filled in, in one pass (a value is never
    /// scanned for placeholders itself). A value that is not one plain topic level (empty, or
    /// with `+`, `#` or `/`) is attacker-chosen text that must never widen a grant: an allow
    /// rule then does not apply (`None`), and in a deny rule the level holding it and all after
    /// become `#`, so the deny covers whatever the value could have made of the topic.
    fn expand(&self, who: &Identity) -> Option<Expanded> {
        // A value starting with `$` could name a reserved namespace (`$c8y`, `$SYS`) as the
        // first level: not a plain level.
        let plain_level = |value: &str| {
            !value.is_empty() && !value.contains(['+', '#', '/']) && !value.starts_with('$')
        };
        let deny = self.permission == Permission::Deny;
        let mut levels = Vec::new();
        for level in self.topic.split('/') {
            let mut out = String::with_capacity(level.len());
            let mut rest = level;
            let mut unsafe_value = false;
            while let Some(at) = rest.find("${") {
                out.push_str(&rest[..at]);
                let tail = &rest[at..];
                let value = if let Some(after) = tail.strip_prefix("${username}") {
                    rest = after;
                    who.username.as_deref().unwrap_or("")
                } else if let Some(after) = tail.strip_prefix("${clientid}") {
                    rest = after;
                    who.client_id.as_str()
                } else {
                    out.push_str("${");
                    rest = &tail[2..];
                    continue;
                };
                unsafe_value |= !plain_level(value);
                out.push_str(value);
            }
            out.push_str(rest);
            if unsafe_value {
                if !deny {
                    return None;
                }
                if levels.is_empty() {
                    // `#` alone would not match `$` topics: this deny covers every topic.
                    return Some(Expanded::Everything);
                }
                levels.push("#".to_owned());
                break;
            }
            levels.push(out);
        }
        Some(Expanded::Filter(levels.join("/")))
    }

    fn applies(&self, who: &Identity, action: Action, topic: &str) -> bool {
        if self.username.is_some() && self.username.as_deref() != who.username.as_deref() {
            return false;
        }
        if self
            .clientid
            .as_deref()
            .is_some_and(|id| id != who.client_id)
        {
            return false;
        }
        let covers_action = matches!(
            (self.action, action),
            (RuleAction::All, _)
                | (RuleAction::Publish, Action::Publish)
                | (RuleAction::Subscribe, Action::Subscribe)
        );
        if !covers_action {
            return false;
        }
        if self.topic.contains("${username}") && who.username.is_none() {
            // A rule about usernames does not concern anonymous clients.
            return false;
        }
        let filter = match self.expand(who) {
            None => return false,
            Some(Expanded::Everything) => return true,
            Some(Expanded::Filter(filter)) => filter,
        };
        match (action, self.permission) {
            (Action::Publish, _) => topic::matches(&filter, topic),
            // For SUBSCRIBE `topic` is itself a filter: an allow must cover all of it, and a
            // deny applies as soon as the two share a topic (else `a/#` would slip past a
            // deny on `a/secret`).
            (Action::Subscribe, Permission::Allow) => topic::covers(&filter, topic),
            (Action::Subscribe, Permission::Deny) => topic::intersects(&filter, topic),
        }
    }
}

/// A rule's topic with its placeholders filled in.
enum Expanded {
    /// A filter to match.
    Filter(String),
    /// Every topic (a deny rule whose first level held an unsafe value).
    Everything,
}

/// The ACL: operator rules (persisted, cached in memory) over the default rules.
#[derive(Clone)]
pub struct Acl {
    prefix: String,
    aws_compat: bool,
    rules: Arc<RwLock<Vec<AclRule>>>,
    store: Option<Store>,
}

impl std::fmt::Debug for Acl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acl").field("prefix", &self.prefix).finish()
    }
}

impl Acl {
    /// The default rules for system topics under `prefix` (`$emqx`), with no operator rules.
    pub fn new(prefix: &str) -> Acl {
        Acl {
            prefix: prefix.to_owned(),
            aws_compat: false,
            rules: Arc::default(),
            store: None,
        }
    }

    /// The default rules plus the operator rules kept in `store`; with `aws_compat` a Thing also
    /// owns `$aws/things/{itsName}/...`.
    pub fn load(prefix: &str, aws_compat: bool, store: Store) -> Result<Acl, RuleError> {
        let mut rules = Vec::new();
        for (key, bytes) in store.kv_scan_prefix(RULE_PREFIX, ACL_RULES_MAX)? {
            match Envelope::from_bytes(&bytes).and_then(|e| e.payload_as::<AclRule>()) {
                Ok(rule) => rules.push(rule),
                Err(e) => tracing::error!(%key, error = %e, "unreadable ACL rule skipped"),
            }
        }
        Ok(Acl {
            prefix: prefix.to_owned(),
            aws_compat,
            rules: Arc::new(RwLock::new(rules)),
            store: Some(store),
        })
    }

    fn read_rules(&self) -> std::sync::RwLockReadGuard<'_, Vec<AclRule>> {
        self.rules.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The operator rules in evaluation order.
    pub fn rules(&self) -> Vec<AclRule> {
        self.read_rules().clone()
    }

    /// One rule.
    pub fn rule(&self, id: &str) -> Result<AclRule, RuleError> {
        self.read_rules()
            .iter()
            .find(|r| r.id == id)
            .cloned()
            .ok_or_else(|| RuleError::NotFound(id.to_owned()))
    }

    async fn persist(&self, rule: &AclRule) -> Result<(), RuleError> {
        let store = self
            .store
            .as_ref()
            .ok_or_else(|| RuleError::Invalid("rules are not persisted".into()))?;
        let bytes = Envelope::new(RULE_RECORD, 1, 0, rule)
            .and_then(|e| e.to_bytes())
            .map_err(|e| RuleError::Invalid(e.0))?;
        store
            .kv_put(&format!("{RULE_PREFIX}{}", rule.id), bytes)
            .await?;
        Ok(())
    }

    /// Adds a rule at the end of the evaluation order.
    pub async fn add_rule(&self, mut rule: AclRule, now_ms: u64) -> Result<AclRule, RuleError> {
        rule.validate()?;
        if self.read_rules().len() >= ACL_RULES_MAX {
            return Err(RuleError::Invalid(format!("at most {ACL_RULES_MAX} rules")));
        }
        let sequence = self.read_rules().len();
        rule.id = format!("{now_ms:016x}{sequence:04x}");
        self.persist(&rule).await?;
        self.rules
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(rule.clone());
        Ok(rule)
    }

    /// Replaces a rule, keeping its place in the order.
    pub async fn replace_rule(&self, id: &str, mut rule: AclRule) -> Result<AclRule, RuleError> {
        rule.validate()?;
        self.rule(id)?;
        rule.id = id.to_owned();
        self.persist(&rule).await?;
        let mut rules = self.rules.write().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = rules.iter_mut().find(|r| r.id == id) {
            *slot = rule.clone();
        }
        Ok(rule)
    }

    /// Deletes a rule.
    pub async fn delete_rule(&self, id: &str) -> Result<(), RuleError> {
        self.rule(id)?;
        if let Some(store) = &self.store {
            store.kv_remove(&format!("{RULE_PREFIX}{id}")).await?;
        }
        self.rules
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|r| r.id != id);
        Ok(())
    }

    /// The namespaces the server publishes in: `{prefix}` and `$aws`.
    fn server_namespaces(&self) -> [&str; 2] {
        [self.prefix.as_str(), "$aws"]
    }

    /// Whether `topic` is one the server publishes replies or notifications on: under a server
    /// namespace's `things/{name}/` or `commands/things/{name}/`, a last level (before an AWS
    /// `/json` suffix) of `accepted`, `rejected`, `delta` or `documents`, a command `request`,
    /// or `jobs/notify` and `jobs/notify-next`.
    pub fn is_server_topic(&self, topic: &str) -> bool {
        // Cumulocity devices' per-connection topics: only the server publishes there.
        if topic.split('/').next() == Some(C8Y_NAMESPACE) {
            return true;
        }
        for namespace in self.server_namespaces() {
            let Some(rest) = topic
                .strip_prefix(namespace)
                .and_then(|rest| rest.strip_prefix('/'))
            else {
                continue;
            };
            let (commands, rest) = match rest.strip_prefix("commands/things/") {
                Some(rest) => (true, rest),
                None => match rest.strip_prefix("things/") {
                    Some(rest) => (false, rest),
                    None => continue,
                },
            };
            let Some((_thing, tail)) = rest.split_once('/') else {
                continue;
            };
            let tail = tail.strip_suffix("/json").unwrap_or(tail);
            let last = tail.rsplit('/').next().unwrap_or(tail);
            let reply = matches!(last, "accepted" | "rejected" | "delta" | "documents");
            let request = commands && last == "request";
            let notify = !commands && matches!(tail, "jobs/notify" | "jobs/notify-next");
            if reply || request || notify {
                return true;
            }
        }
        false
    }

    /// Whether `topic` (a name or a filter) lies in a namespace only the server and Things use:
    /// `{prefix}`, `$aws`, `$SYS` or `$c8y` (Cumulocity devices' topics, each its own).
    fn in_server_namespace(&self, topic: &str) -> bool {
        let first = topic.split('/').next().unwrap_or(topic);
        first == self.prefix || first == "$aws" || first == "$SYS" || first == C8Y_NAMESPACE
    }

    /// Whether `who` may `action` on `topic` (a topic name, or a filter without `$share/g/`).
    pub fn allows(&self, who: &Identity, action: Action, topic: &str) -> bool {
        if action == Action::Publish && self.is_server_topic(topic) {
            return false;
        }
        if who.bootstrap {
            // Its device's `s/dcr` and nothing else, whatever the rules say.
            return action == Action::Subscribe
                && who
                    .client_id
                    .strip_prefix(BOOTSTRAP_CLIENT_PREFIX)
                    .is_some_and(|device| topic == format!("{C8Y_NAMESPACE}/{device}/s/dcr"));
        }
        if who.superuser {
            return true;
        }
        if let Some(rule) = self
            .read_rules()
            .iter()
            .find(|r| r.applies(who, action, topic))
        {
            return rule.permission == Permission::Allow;
        }
        if let Some(thing) = &who.thing {
            // A Cumulocity device's own `s/ds` and `s/e` (see `super::cumulocity`).
            if action == Action::Subscribe {
                if let Some(rest) = topic
                    .strip_prefix(C8Y_NAMESPACE)
                    .and_then(|t| t.strip_prefix('/'))
                    .and_then(|t| t.strip_prefix(thing.as_str()))
                {
                    if matches!(rest, "/s/ds" | "/s/e") {
                        return true;
                    }
                }
            }
            let prefix = &self.prefix;
            let native = [
                format!("{prefix}/things/{thing}/"),
                format!("{prefix}/commands/things/{thing}/"),
            ];
            let aws = [
                format!("$aws/things/{thing}/"),
                format!("$aws/commands/things/{thing}/"),
            ];
            let aws: &[String] = if self.aws_compat { &aws } else { &[] };
            return native
                .iter()
                .chain(aws)
                .any(|own| topic.starts_with(own.as_str()));
        }
        !self.in_server_namespace(topic)
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
            bootstrap: false,
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

    fn rule(
        username: Option<&str>,
        permission: Permission,
        action: RuleAction,
        topic: &str,
    ) -> AclRule {
        AclRule {
            id: String::new(),
            username: username.map(String::from),
            clientid: None,
            permission,
            action,
            topic: topic.into(),
        }
    }

    #[tokio::test]
    async fn operator_rules_come_first_in_order_with_placeholders() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&thinghub_storage::StoreConfig::new(dir.path())).expect("open");
        let acl = Acl::load("$emqx", false, store.clone()).expect("load");
        let t1 = thing("t1");
        // Deny a Thing its own events; allow every user a personal telemetry tree.
        acl.add_rule(
            rule(
                None,
                Permission::Deny,
                RuleAction::Publish,
                "$emqx/things/${username}/events/#",
            ),
            1,
        )
        .await
        .expect("rule");
        acl.add_rule(
            rule(
                None,
                Permission::Allow,
                RuleAction::All,
                "telemetry/${username}/#",
            ),
            2,
        )
        .await
        .expect("rule");
        assert!(!acl.allows(&t1, Action::Publish, "$emqx/things/t1/events/overheat"));
        assert!(
            acl.allows(&t1, Action::Subscribe, "$emqx/things/t1/events/overheat"),
            "publish-only rule"
        );
        assert!(acl.allows(&t1, Action::Publish, "telemetry/t1/temp"));
        assert!(
            !acl.allows(&t1, Action::Publish, "telemetry/t2/temp"),
            "falls through to the default"
        );
        assert!(
            acl.allows(&t1, Action::Subscribe, "telemetry/t1/+"),
            "a rule on # covers a + filter"
        );

        // Rules survive a restart, in order.
        let reloaded = Acl::load("$emqx", false, store).expect("reload");
        assert_eq!(reloaded.rules(), acl.rules());
        let first = acl.rules()[0].id.clone();
        acl.delete_rule(&first).await.expect("delete");
        assert!(acl.allows(&t1, Action::Publish, "$emqx/things/t1/events/overheat"));
        assert!(matches!(
            acl.delete_rule(&first).await,
            Err(RuleError::NotFound(_))
        ));
    }

    #[test]
    fn invalid_rules_are_refused() {
        let bad = [
            rule(None, Permission::Allow, RuleAction::All, "a/#/b"),
            AclRule {
                clientid: Some("c".into()),
                ..rule(Some("u"), Permission::Allow, RuleAction::All, "a")
            },
        ];
        for rule in bad {
            assert!(rule.validate().is_err(), "{rule:?}");
        }
    }

    #[tokio::test]
    async fn aws_compat_gives_a_thing_its_aws_namespace_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&thinghub_storage::StoreConfig::new(dir.path())).expect("open");
        let t1 = thing("t1");
        let compat = Acl::load("$emqx", true, store.clone()).expect("load");
        assert!(compat.allows(&t1, Action::Publish, "$aws/things/t1/shadow/update"));
        assert!(!compat.allows(&t1, Action::Publish, "$aws/things/t2/shadow/update"));
        assert!(compat.allows(&t1, Action::Publish, "$emqx/things/t1/shadow/update"));
        let native = Acl::load("$emqx", false, store).expect("load");
        assert!(!native.allows(&t1, Action::Publish, "$aws/things/t1/shadow/update"));
    }

    #[test]
    fn the_bootstrap_user_gets_its_devices_s_dcr_and_nothing_else_whatever_the_rules() {
        // Given a rule that allows everything to everyone
        let acl = Acl::new("$emqx");
        acl.rules
            .write()
            .expect("lock")
            .push(rule(None, Permission::Allow, RuleAction::All, "#"));
        let bootstrap = Identity {
            client_id: format!("{BOOTSTRAP_CLIENT_PREFIX}dev-1"),
            username: Some("bootstrap".into()),
            thing: None,
            superuser: false,
            bootstrap: true,
        };
        // Then the bootstrap connection may subscribe its own device's s/dcr only
        assert!(acl.allows(&bootstrap, Action::Subscribe, "$c8y/dev-1/s/dcr"));
        for filter in [
            "$c8y/dev-2/s/dcr",
            "$c8y/dev-1/s/ds",
            "$c8y/+/s/dcr",
            "#",
            "app/x",
        ] {
            assert!(
                !acl.allows(&bootstrap, Action::Subscribe, filter),
                "{filter}"
            );
        }
        for topic in ["app/x", "s/us", "$c8y/dev-1/s/dcr"] {
            assert!(!acl.allows(&bootstrap, Action::Publish, topic), "{topic}");
        }
        // And a plain user given the same rule is not limited so
        let plain = Identity {
            client_id: "dev-1".into(),
            bootstrap: false,
            ..bootstrap
        };
        assert!(acl.allows(&plain, Action::Publish, "app/x"));
    }

    #[test]
    fn superusers_use_anything_and_plain_users_stay_out_of_system_topics() {
        let acl = Acl::new("$emqx");
        let backend = Identity {
            client_id: "b".into(),
            username: Some("b".into()),
            thing: None,
            superuser: true,
            bootstrap: false,
        };
        assert!(acl.allows(&backend, Action::Subscribe, "$emqx/things/+/shadow/#"));
        let plain = Identity {
            superuser: false,
            ..backend
        };
        assert!(acl.allows(&plain, Action::Publish, "app/x"));
        assert!(!acl.allows(&plain, Action::Publish, "$emqx/things/t1/shadow/update"));
        for reserved in ["$emqx/#", "$aws/things/t1/shadow/get", "$SYS/broker/uptime"] {
            assert!(
                !acl.allows(&plain, Action::Subscribe, reserved),
                "{reserved}"
            );
        }
        // Other `$` topics are ordinary topics.
        assert!(acl.allows(&plain, Action::Publish, "$app/telemetry"));
        assert!(acl.allows(&plain, Action::Subscribe, "$app/#"));
        assert!(acl.allows(&plain, Action::Subscribe, "$emqxx/a"));
    }

    #[test]
    fn server_reply_topics_are_publishable_by_nobody() {
        let acl = Acl::new("$emqx");
        let backend = Identity {
            superuser: true,
            ..thing("b")
        };
        let t1 = thing("t1");
        let server_topics = [
            "$emqx/things/t1/shadow/update/accepted",
            "$emqx/things/t1/shadow/update/rejected",
            "$emqx/things/t1/shadow/update/delta",
            "$emqx/things/t1/shadow/update/documents",
            "$emqx/things/t1/shadow/get/accepted",
            "$emqx/things/t1/shadow/delete/rejected",
            "$emqx/things/t1/events/overheat/accepted",
            "$emqx/things/t1/jobs/notify",
            "$emqx/things/t1/jobs/notify-next",
            "$emqx/things/t1/jobs/j1/update/accepted",
            "$emqx/commands/things/t1/executions/e1/request",
            "$emqx/commands/things/t1/executions/e1/response/accepted",
            "$aws/things/t1/shadow/update/delta",
            "$aws/commands/things/t1/executions/e1/request/json",
            "$aws/commands/things/t1/executions/e1/response/rejected/json",
        ];
        for topic in server_topics {
            assert!(acl.is_server_topic(topic), "{topic}");
            for who in [&t1, &backend] {
                assert!(!acl.allows(who, Action::Publish, topic), "{topic}");
            }
            assert!(acl.allows(&t1, Action::Subscribe, topic) || topic.starts_with("$aws"));
        }
        for request in [
            "$emqx/things/t1/shadow/update",
            "$emqx/things/t1/shadow/get",
            "$emqx/things/t1/events/overheat",
            "$emqx/things/t1/jobs/start-next",
            "$emqx/commands/things/t1/executions/e1/response",
            "$aws/commands/things/t1/executions/e1/response/json",
            "app/accepted",
        ] {
            assert!(!acl.is_server_topic(request), "{request}");
        }
    }

    #[test]
    fn a_placeholder_value_is_never_expanded_again_and_a_deny_covers_its_whole_level() {
        let acl = Acl::new("$emqx");
        {
            let mut rules = acl.rules.write().expect("lock");
            rules.push(rule(
                None,
                Permission::Allow,
                RuleAction::All,
                "users/${username}/#",
            ));
            rules.push(rule(
                None,
                Permission::Deny,
                RuleAction::Publish,
                "ctl/dev-${clientid}/cmd",
            ));
        }
        // A username that spells a placeholder gets its literal self, not the client id.
        let sneaky = Identity {
            client_id: "alice".into(),
            username: Some("${clientid}".into()),
            thing: Some("t".into()),
            superuser: false,
            bootstrap: false,
        };
        assert!(!acl.allows(&sneaky, Action::Subscribe, "users/alice/#"));
        // A deny with the placeholder inside a level covers whatever the value could reach.
        let slashed = Identity {
            client_id: "a/b".into(),
            username: Some("u".into()),
            thing: None,
            superuser: false,
            bootstrap: false,
        };
        for topic in ["ctl/dev-a/b/cmd", "ctl/dev-a/cmd", "ctl/x"] {
            assert!(!acl.allows(&slashed, Action::Publish, topic), "{topic}");
        }
        assert!(acl.allows(&slashed, Action::Publish, "other/topic"));
        // In the first level, the deny covers `$` topics too (which `#` would not match).
        acl.rules.write().expect("lock").push(rule(
            None,
            Permission::Deny,
            RuleAction::Publish,
            "${clientid}/cmd",
        ));
        let dollar = Identity {
            client_id: "$x/y".into(),
            ..slashed
        };
        assert!(!acl.allows(&dollar, Action::Publish, "$x/y/cmd"));
    }

    #[test]
    fn a_deny_rule_stops_every_filter_that_reaches_its_topics() {
        let acl = Acl::new("$emqx");
        acl.rules.write().expect("lock").push(rule(
            None,
            Permission::Deny,
            RuleAction::Subscribe,
            "$emqx/things/${username}/jobs/#",
        ));
        let t1 = thing("t1");
        for filter in [
            "$emqx/things/t1/jobs/notify",
            "$emqx/things/t1/#",
            "$emqx/things/t1/+/notify",
        ] {
            assert!(!acl.allows(&t1, Action::Subscribe, filter), "{filter}");
        }
        assert!(acl.allows(&t1, Action::Subscribe, "$emqx/things/t1/shadow/#"));
    }

    #[test]
    fn a_rule_grants_a_subscription_only_if_it_covers_the_whole_filter() {
        let acl = Acl::new("$emqx");
        acl.rules.write().expect("lock").push(rule(
            None,
            Permission::Allow,
            RuleAction::All,
            "fleet/+",
        ));
        let t1 = thing("t1");
        assert!(acl.allows(&t1, Action::Subscribe, "fleet/status"));
        assert!(acl.allows(&t1, Action::Subscribe, "fleet/+"));
        assert!(!acl.allows(&t1, Action::Subscribe, "fleet/#"));
        assert!(!acl.allows(&t1, Action::Subscribe, "fleet/a/b"));
        assert!(acl.allows(&t1, Action::Publish, "fleet/status"));
    }

    #[test]
    fn placeholders_never_expand_to_wildcards_or_separators() {
        let acl = Acl::new("$emqx");
        {
            let mut rules = acl.rules.write().expect("lock");
            rules.push(rule(
                None,
                Permission::Deny,
                RuleAction::All,
                "ctl/${clientid}/lock",
            ));
            rules.push(rule(
                None,
                Permission::Allow,
                RuleAction::All,
                "devices/${clientid}/#",
            ));
            rules.push(rule(
                None,
                Permission::Allow,
                RuleAction::All,
                "users/${username}/#",
            ));
        }
        // Bound to a Thing: the defaults grant nothing outside its own topics, so whatever is
        // allowed below comes from the rules.
        let bound = |client_id: &str, username: Option<&str>| Identity {
            client_id: client_id.into(),
            username: username.map(String::from),
            thing: Some("t".into()),
            superuser: false,
            bootstrap: false,
        };
        let honest = bound("c1", Some("u1"));
        assert!(acl.allows(&honest, Action::Subscribe, "devices/c1/#"));
        assert!(acl.allows(&honest, Action::Subscribe, "users/u1/inbox"));
        assert!(!acl.allows(&honest, Action::Subscribe, "devices/c2/#"));
        for evil in ["#", "+", "a/b", ""] {
            let attacker = bound(evil, Some(evil));
            for filter in [
                "devices/#",
                "devices/+/#",
                "devices/a/b/#",
                "users/#",
                "users/+/x",
            ] {
                assert!(
                    !acl.allows(&attacker, Action::Subscribe, filter),
                    "{evil:?} must not get {filter}"
                );
            }
            // A plain user may publish anywhere outside the server namespaces by default.
            let unbound = Identity {
                thing: None,
                ..attacker
            };
            assert!(
                !acl.allows(&unbound, Action::Publish, "ctl/x/lock"),
                "a deny rule with an unsafe value fails closed"
            );
            assert!(acl.allows(&unbound, Action::Publish, "other/topic"));
            assert!(
                !acl.allows(&unbound, Action::Subscribe, "ctl/#"),
                "a deny stops a wider filter too"
            );
        }
    }
}
