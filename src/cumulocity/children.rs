//! Which Cumulocity device created which child (template 101): `c8ychild/{parent}/{childId}`
//! lists a device's children, `c8yparent/{childThing}` names a child's parent (both in the
//! `kv` tree, written durably once the child's Thing is registered). The child's Thing keeps
//! the `c8y_parent` attribute too; that attribute decides what a device may do, these records
//! serve the listings (`105`, `GET /api/v1/things/{name}/children`) and the routing of a
//! child's operations to its gateway's connection, where no actor can be asked.
//!
//! Each link holds the child Thing's registration time: a link whose Thing was deleted, or
//! deleted and registered again by someone else, names another Thing's time and counts as no
//! link (listings skip it; it is dropped when a device's children are counted).

use thinghub_storage::{StorageError, Store};

/// The `kv` prefix of parent -> child records.
pub const CHILD_PREFIX: &str = "c8ychild/";
/// The `kv` prefix of child -> parent records.
pub const PARENT_PREFIX: &str = "c8yparent/";

/// Whether a stored child or parent record decodes (`thinghub check`).
pub fn check_stored_link(bytes: &[u8]) -> Result<(), String> {
    decode(bytes)
        .map(|_| ())
        .ok_or_else(|| "a Cumulocity child link is `{registered at ms} {Thing name}`".into())
}

/// `{created_at_ms} {name}`.
fn encode(created_at_ms: u64, name: &str) -> Vec<u8> {
    format!("{created_at_ms} {name}").into_bytes()
}

fn decode(bytes: &[u8]) -> Option<(u64, String)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (at, name) = text.split_once(' ')?;
    Some((at.parse().ok()?, name.to_owned()))
}

/// One child of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Child {
    /// Its id under its parent (`s/us/{id}`).
    pub id: String,
    /// Its Thing (`{parent}:{id}`).
    pub thing: String,
    /// Whether that Thing is the one the link was made for (registered, at the same time).
    pub live: bool,
}

/// The links, over the store. Clones share one lock: make one per store.
#[derive(Clone)]
pub struct Children {
    store: Store,
    /// Held while a link is written or dropped: dropping reads the child's parent record
    /// before removing it, and another device's link of the same name must not slip between.
    writing: std::sync::Arc<std::sync::Mutex<()>>,
}

impl Children {
    /// The links kept in `store`.
    pub fn new(store: Store) -> Children {
        Children {
            store,
            writing: std::sync::Arc::default(),
        }
    }

    fn writing(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writing.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn child_key(parent: &str, id: &str) -> String {
        format!("{CHILD_PREFIX}{parent}/{id}")
    }

    fn parent_key(child_thing: &str) -> String {
        format!("{PARENT_PREFIX}{child_thing}")
    }

    /// When `thing` was registered, if it is.
    fn registered_at(&self, thing: &str) -> Result<Option<u64>, StorageError> {
        match self.store.get_thing(thing)? {
            None => Ok(None),
            Some(bytes) => thinghub_actors::codec::decode_index_record(thing, &bytes)
                .map(|record| Some(record.created_at_ms)),
        }
    }

    /// Records (durably) that `parent` has the child `id`, whose Thing `child_thing` is
    /// registered (its registration time goes into the link).
    pub async fn link(
        &self,
        parent: &str,
        id: &str,
        child_thing: &str,
    ) -> Result<(), StorageError> {
        {
            let _writing = self.writing();
            let Some(at) = self.registered_at(child_thing)? else {
                return Ok(());
            };
            self.store.kv_apply_behind(vec![
                (Self::child_key(parent, id), Some(encode(at, child_thing))),
                (Self::parent_key(child_thing), Some(encode(at, parent))),
            ])?;
        }
        self.store.sync().await
    }

    /// Forgets `parent`'s link to its child `id`, durable with the next group commit. The
    /// child Thing's parent record goes too only if it still names `parent` (child ids may
    /// hold `:`, so `a` + `b:c` and `a:b` + `c` are the same Thing name: another device's live
    /// link must stay).
    pub fn unlink(&self, parent: &str, id: &str, child_thing: &str) -> Result<(), StorageError> {
        let _writing = self.writing();
        let mut changes = vec![(Self::child_key(parent, id), None)];
        let names_parent = self
            .store
            .kv_get(&Self::parent_key(child_thing))?
            .as_deref()
            .and_then(decode)
            .is_some_and(|(_, named)| named == parent);
        if names_parent {
            changes.push((Self::parent_key(child_thing), None));
        }
        self.store.kv_apply_behind(changes)
    }

    /// The device that created `thing` as its child, if `thing` is still that child.
    pub fn parent_of(&self, thing: &str) -> Result<Option<String>, StorageError> {
        let Some((at, parent)) = self
            .store
            .kv_get(&Self::parent_key(thing))?
            .as_deref()
            .and_then(decode)
        else {
            return Ok(None);
        };
        Ok((self.registered_at(thing)? == Some(at)).then_some(parent))
    }

    fn child(&self, id: String, bytes: &[u8]) -> Result<Option<Child>, StorageError> {
        let Some((at, thing)) = decode(bytes) else {
            return Ok(None);
        };
        let live = self.registered_at(&thing)? == Some(at);
        Ok(Some(Child { id, thing, live }))
    }

    /// `parent`'s children (live or not), in id order, at most `limit`.
    pub fn of(&self, parent: &str, limit: usize) -> Result<Vec<Child>, StorageError> {
        let prefix = format!("{CHILD_PREFIX}{parent}/");
        let mut out = Vec::new();
        for (key, bytes) in self.store.kv_scan_prefix(&prefix, limit)? {
            out.extend(self.child(key[prefix.len()..].to_owned(), &bytes)?);
        }
        Ok(out)
    }

    /// A page of `parent`'s live children after the id `after`, in id order (at most `limit`
    /// links read), and the cursor to go on with (`None` at the end).
    pub fn page(
        &self,
        parent: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Child>, Option<String>), StorageError> {
        let prefix = format!("{CHILD_PREFIX}{parent}/");
        let page = self.store.kv_page(&prefix, after, limit)?;
        let mut items = Vec::new();
        for (id, bytes) in page.items {
            items.extend(self.child(id, &bytes)?.filter(|c| c.live));
        }
        let next = page.next;
        Ok((items, next))
    }

    /// Where an operation for `thing` goes: its gateway and the id its rows name it by, or
    /// `thing` itself when it is no (live) child.
    pub fn route(&self, thing: &str) -> Result<(String, String), StorageError> {
        Ok(match self.parent_of(thing)? {
            Some(parent) => {
                let id = thing
                    .strip_prefix(&format!("{parent}:"))
                    .unwrap_or(thing)
                    .to_owned();
                (parent, id)
            }
            None => (thing.to_owned(), thing.to_owned()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thinghub_storage::{AppendBatch, Envelope, IndexOp, StoreConfig};

    /// Writes `thing`'s registry record (registered at `at`), or removes it, as the Thing's
    /// append at `seq` does.
    async fn registry(store: &Store, thing: &str, seq: u64, at: Option<u64>) {
        let op = match at {
            Some(at) => IndexOp::PutThing(
                thinghub_actors::codec::encode_index_record(
                    &thinghub_actors::codec::ThingIndexRecord {
                        mqtt_client_id: thing.to_owned(),
                        thing_type: None,
                        created_at_ms: at,
                    },
                )
                .expect("encode"),
            ),
            None => IndexOp::RemoveThing,
        };
        store
            .append(AppendBatch {
                thing: thing.to_owned(),
                first_seq: seq,
                events: vec![Envelope::new("Test", 1, 0, &()).expect("envelope")],
                index: vec![op],
            })
            .await
            .expect("append");
    }

    #[tokio::test]
    async fn children_are_listed_by_parent_and_route_to_their_gateway_while_they_are_the_same_thing(
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
        let children = Children::new(store.clone());
        for (thing, at) in [("gw:s1", 1), ("gw:s2", 2), ("gw-2:s1", 3)] {
            registry(&store, thing, 1, Some(at)).await;
        }
        // Given a gateway with two children, and another with one
        children.link("gw", "s2", "gw:s2").await.expect("link");
        children.link("gw", "s1", "gw:s1").await.expect("link");
        children.link("gw-2", "s1", "gw-2:s1").await.expect("link");
        children
            .link("gw", "ghost", "gw:ghost")
            .await
            .expect("no Thing: no link");
        // Then each lists its own, in id order
        let ids = |parent| {
            children
                .of(parent, 10)
                .expect("list")
                .into_iter()
                .filter(|c| c.live)
                .map(|c| c.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids("gw"), ["s1", "s2"]);
        assert_eq!(ids("gw-2"), ["s1"]);
        assert!(ids("nobody").is_empty());
        let (first, next) = children.page("gw", None, 1).expect("page");
        assert_eq!(first[0].thing, "gw:s1");
        let (second, next) = children.page("gw", next.as_deref(), 1).expect("page");
        assert_eq!(second[0].thing, "gw:s2");
        let (rest, end) = children.page("gw", next.as_deref(), 1).expect("page");
        assert!(rest.is_empty() && end.is_none());
        // And an operation goes to the gateway, naming the child by its id
        assert_eq!(
            children.route("gw:s2").expect("route"),
            ("gw".into(), "s2".into())
        );
        assert_eq!(
            children.route("gw").expect("route"),
            ("gw".into(), "gw".into())
        );
        // When the child's Thing is deleted and its name registered again by someone else,
        // the old link is no link: not listed, not routed to the old gateway
        registry(&store, "gw:s2", 2, None).await;
        assert_eq!(ids("gw"), ["s1"]);
        registry(&store, "gw:s2", 3, Some(99)).await;
        assert_eq!(ids("gw"), ["s1"]);
        assert_eq!(
            children.route("gw:s2").expect("route"),
            ("gw:s2".into(), "gw:s2".into())
        );
        children.unlink("gw", "s2", "gw:s2").expect("unlink");
        assert_eq!(children.of("gw", 10).expect("list").len(), 1);
        // Dropping a stale link never takes another device's live link to the same name
        registry(&store, "gw:s2:x", 1, Some(7)).await;
        children.link("gw:s2", "x", "gw:s2:x").await.expect("link");
        store
            .kv_put(&Children::child_key("gw", "s2:x"), encode(1, "gw:s2:x"))
            .await
            .expect("a stale link of gw's");
        children.unlink("gw", "s2:x", "gw:s2:x").expect("unlink");
        assert_eq!(
            children.route("gw:s2:x").expect("route"),
            ("gw:s2".into(), "x".into())
        );
    }
}
