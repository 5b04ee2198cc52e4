//! Console sign-ins: an opaque random id in an HttpOnly, SameSite=Strict cookie names a
//! session held in memory (a restart signs everyone out). Each session has its own CSRF token,
//! which every form that changes something carries back. The number of sessions and their
//! lifetime are bounded (`console_sessions_max`, `console_session_ttl_ms`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use rand::RngCore;

use crate::auth::Principal;

/// The cookie's name.
pub const COOKIE: &str = "thinghub_console";

/// One signed-in operator.
#[derive(Debug, Clone)]
pub struct Session {
    /// Who signed in (the API key, its role).
    pub principal: Principal,
    /// What the key's record looked like at sign-in ([`crate::auth::ApiKeys::stamp`]): a key
    /// deleted or replaced since ends the session.
    pub stamp: String,
    /// The token every changing form must carry.
    pub csrf: String,
    /// When the sign-in ends.
    pub expires_at: Instant,
    /// A message for the next page shown (the outcome of the last action).
    pub flash: Option<Flash>,
}

/// The outcome of an action, shown once on the next page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flash {
    /// Whether it went through.
    pub ok: bool,
    /// What to tell the operator.
    pub message: String,
}

/// Why a sign-in was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionsFull(pub usize);

/// The sessions of this process.
pub struct Sessions {
    sessions: Mutex<HashMap<String, Session>>,
    max: usize,
    per_key_max: usize,
    ttl: Duration,
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    // ThreadRng is a CSPRNG (ChaCha, reseeded from the OS).
    rand::thread_rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Equality that takes as long whatever the first difference is.
pub fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |diff, (x, y)| diff | (x ^ y))
            == 0
}

impl Sessions {
    /// At most `max` sessions, `per_key_max` of one API key, each for `ttl`.
    pub fn new(max: usize, per_key_max: usize, ttl: Duration) -> Sessions {
        Sessions {
            sessions: Mutex::new(HashMap::new()),
            max,
            per_key_max: per_key_max.max(1),
            ttl,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long a sign-in lasts.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The distinct (key, stamp) pairs of the sessions when the table is full (none
    /// otherwise): what a sign-in checks, outside the lock, before [`Sessions::create`].
    pub fn stamps_if_full(&self) -> Vec<(String, String)> {
        let sessions = self.lock();
        if sessions.len() < self.max {
            return Vec::new();
        }
        let distinct: std::collections::HashSet<(String, String)> = sessions
            .values()
            .map(|s| (s.principal.key.clone(), s.stamp.clone()))
            .collect();
        distinct.into_iter().collect()
    }

    /// Starts a session; returns its id (the cookie's value). The browser's previous session
    /// (`replacing`) ends, and so does the key's oldest once it holds `per_key_max` (one key
    /// signing in over and over cannot fill the table). When the table is full, expired
    /// sessions and those whose (key, stamp) is in `revoked` (found by the caller from
    /// [`Sessions::stamps_if_full`]) make room; past `max` live ones, refused.
    pub fn create(
        &self,
        principal: Principal,
        stamp: String,
        replacing: Option<&str>,
        revoked: &std::collections::HashSet<(String, String)>,
    ) -> Result<String, SessionsFull> {
        let now = Instant::now();
        let mut sessions = self.lock();
        if let Some(old) = replacing {
            sessions.remove(old);
        }
        loop {
            let of_key = sessions
                .iter()
                .filter(|(_, s)| s.principal.key == principal.key);
            let (count, oldest) =
                of_key.fold((0, None::<(&String, Instant)>), |(n, oldest), (id, s)| {
                    let older = oldest.is_none_or(|(_, at)| s.expires_at < at);
                    (
                        n + 1,
                        if older {
                            Some((id, s.expires_at))
                        } else {
                            oldest
                        },
                    )
                });
            match oldest {
                Some((id, _)) if count >= self.per_key_max => {
                    let id = id.clone();
                    sessions.remove(&id);
                }
                _ => break,
            }
        }
        if sessions.len() >= self.max {
            sessions.retain(|_, s| {
                s.expires_at > now && !revoked.contains(&(s.principal.key.clone(), s.stamp.clone()))
            });
        }
        if sessions.len() >= self.max {
            return Err(SessionsFull(self.max));
        }
        let id = random_token();
        sessions.insert(
            id.clone(),
            Session {
                principal,
                stamp,
                csrf: random_token(),
                expires_at: now + self.ttl,
                flash: None,
            },
        );
        Ok(id)
    }

    /// The live session with this id.
    pub fn get(&self, id: &str) -> Option<Session> {
        let mut sessions = self.lock();
        let session = sessions.get(id)?;
        if session.expires_at <= Instant::now() {
            sessions.remove(id);
            return None;
        }
        Some(session.clone())
    }

    /// Takes the session's message out (a page shows it once).
    pub fn take_flash(&self, id: &str) -> Option<Flash> {
        self.lock().get_mut(id).and_then(|s| s.flash.take())
    }

    /// Leaves a message for the session's next page.
    pub fn flash(&self, id: &str, flash: Flash) {
        if let Some(session) = self.lock().get_mut(id) {
            session.flash = Some(flash);
        }
    }

    /// Signs out.
    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    fn none() -> std::collections::HashSet<(String, String)> {
        std::collections::HashSet::new()
    }

    fn key(name: &str) -> Principal {
        Principal {
            key: name.into(),
            role: Role::Viewer,
            things: None,
        }
    }

    #[test]
    fn given_a_full_table_when_one_more_signs_in_then_it_is_refused_until_one_expires() {
        let sessions = Sessions::new(1, 4, Duration::from_millis(50));
        let first = sessions
            .create(key("a"), "s".into(), None, &none())
            .expect("room");
        assert_eq!(
            sessions.create(key("b"), "s".into(), None, &none()),
            Err(SessionsFull(1))
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while sessions.get(&first).is_some() {
            assert!(Instant::now() < deadline, "the session never expired");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(sessions.create(key("b"), "s".into(), None, &none()).is_ok());
    }

    #[test]
    fn given_a_key_signing_in_again_and_again_then_only_its_oldest_sessions_go() {
        let sessions = Sessions::new(3, 2, Duration::from_secs(60));
        let other = sessions
            .create(key("other"), "s".into(), None, &none())
            .expect("room");
        let ids: Vec<String> = (0..10)
            .map(|_| {
                sessions
                    .create(key("a"), "s".into(), None, &none())
                    .expect("room")
            })
            .collect();
        assert!(
            sessions.get(&other).is_some(),
            "another key's session stays"
        );
        assert!(sessions.get(&ids[9]).is_some() && sessions.get(&ids[8]).is_some());
        assert!(
            sessions.get(&ids[7]).is_none(),
            "past per_key_max the oldest go"
        );
        // Signing in again from the same browser replaces its session.
        let again = sessions
            .create(key("a"), "s".into(), Some(&ids[9]), &none())
            .expect("room");
        assert!(sessions.get(&ids[9]).is_none() && sessions.get(&again).is_some());
    }

    #[test]
    fn given_a_full_table_then_sessions_of_revoked_keys_make_room() {
        let sessions = Sessions::new(2, 2, Duration::from_secs(60));
        let revoked = sessions
            .create(key("gone"), "old".into(), None, &none())
            .expect("room");
        sessions
            .create(key("a"), "s".into(), None, &none())
            .expect("room");
        assert_eq!(
            sessions.stamps_if_full().len(),
            2,
            "full: the sign-in checks each (key, stamp)"
        );
        let gone = [("gone".to_owned(), "old".to_owned())]
            .into_iter()
            .collect();
        let id = sessions.create(key("b"), "s".into(), None, &gone);
        assert!(id.is_ok());
        assert!(sessions.get(&revoked).is_none());
    }

    #[test]
    fn given_a_flash_when_it_is_taken_then_it_is_shown_once() {
        let sessions = Sessions::new(4, 4, Duration::from_secs(60));
        let id = sessions
            .create(key("a"), "s".into(), None, &none())
            .expect("room");
        let flash = Flash {
            ok: true,
            message: "done".into(),
        };
        sessions.flash(&id, flash.clone());
        assert!(
            sessions.get(&id).is_some_and(|s| s.flash.is_some()),
            "reading keeps it"
        );
        assert_eq!(sessions.take_flash(&id), Some(flash));
        assert_eq!(sessions.take_flash(&id), None);
    }

    #[test]
    fn tokens_are_unguessable_and_compared_whole() {
        let (a, b) = (random_token(), random_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert!(same_token(&a, &a.clone()));
        assert!(!same_token(&a, &b));
        assert!(!same_token(&a, &a[..42]));
    }
}
