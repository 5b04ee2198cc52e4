//! Who may publish or subscribe where.
//!
//! Operator rules (`/api/v1/authorization/rules`) are checked first, in creation order; the first
//! rule that matches the client and the topic decides. Superusers bypass them. Then the default
//! rules:
//! - A superuser (backend application) may use any topic.
//! - A client connected as a Thing may use only `{prefix}/things/{itsName}/...` and
//!   `{prefix}/commands/things/{itsName}/...`. A filter is allowed only if it starts with one of
//!   those literal prefixes, so its wildcards can only match inside them.
//! - Any other client (a plain user, or anonymous in development mode) may use every topic
//!   outside the `$` system namespace.

use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use thinghub_storage::{Envelope, StorageError, Store};

use super::topic;

const RULE_PREFIX: &str = "aclrule/";
const RULE_RECORD: &str = "AclRule";
/// Most operator rules (each CONNECT-time check walks them all).
pub const ACL_RULES_MAX: usize = 1000;

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

/// allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// The action is allowed.
    Allow,
    /// The action is denied.
    Deny,
}

/// Which actions a rule covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
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
            return false;
        }
        let filter = self
            .topic
            .replace("${username}", who.username.as_deref().unwrap_or(""))
            .replace("${clientid}", &who.client_id);
        // For SUBSCRIBE `topic` is itself a filter; its wildcard levels compare as plain levels,
        // so a rule on `a/#` covers a subscription to `a/+/b`.
        filter == topic || topic::matches(&filter, topic)
    }
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

    /// Whether `who` may `action` on `topic` (a topic name, or a filter without `$share/g/`).
    pub fn allows(&self, who: &Identity, action: Action, topic: &str) -> bool {
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
