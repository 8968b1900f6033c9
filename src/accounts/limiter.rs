//! The failed-login limiter (SPEC §2): at most `max_failures` failed logins per
//! client IP and per username within `window`; beyond, 429 with `Retry-After`.
//!
//! - **Counted up front.** [`LoginLimiter::begin`] counts an attempt as a failure
//!   before the password is checked, and [`LoginLimiter::succeeded`] takes it
//!   back. So a burst of parallel guesses cannot slip past the limit while
//!   argon2 is still busy with the first ones, and a refused attempt never
//!   reaches argon2 at all.
//! - **Fixed windows.** A key's window opens at its first failure and lasts
//!   `window`; a blocked key is blocked until that window ends, which is the
//!   `Retry-After`. Refused attempts do not extend it.
//! - **Bounded.** At most [`MAX_ENTRIES`] keys (~10 MiB). A full table first
//!   drops expired windows, then the keys with the fewest failures: a flood of
//!   one-off usernames or addresses evicts itself, not the key being guessed at,
//!   which has many failures.
//! - **IPv6** addresses count per /64, the block one host usually holds.
//!
//! Success clears the username's count but gives back only the one attempt of
//! the IP: logging into one's own account must not reset the IP's count for
//! guesses at other accounts.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Keys the limiter tracks at most.
pub const MAX_ENTRIES: usize = 65_536;

/// What failures are counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LimitKey {
    /// A client address (IPv6 cut to its /64).
    Ip(IpAddr),
    /// A username of a tenant, lowercased (usernames are case-insensitive).
    User { tenant: String, username: String },
}

impl LimitKey {
    pub fn ip(ip: IpAddr) -> LimitKey {
        let ip = match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let bits = u128::from(v6) & !((1u128 << 64) - 1);
                    IpAddr::V6(bits.into())
                }
            },
            v4 => v4,
        };
        LimitKey::Ip(ip)
    }

    pub fn user(tenant: &str, username: &str) -> LimitKey {
        LimitKey::User {
            tenant: tenant.to_owned(),
            username: username.to_ascii_lowercase(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    opened: Instant,
    failures: u32,
}

/// Failed logins per key; one short lock per attempt.
#[derive(Debug)]
pub struct LoginLimiter {
    max_failures: u32,
    window: Duration,
    capacity: usize,
    windows: Mutex<HashMap<LimitKey, Window>>,
}

impl LoginLimiter {
    pub fn new(max_failures: u32, window: Duration) -> LoginLimiter {
        LoginLimiter::with_capacity(max_failures, window, MAX_ENTRIES)
    }

    fn with_capacity(max_failures: u32, window: Duration, capacity: usize) -> LoginLimiter {
        LoginLimiter {
            max_failures: max_failures.max(1),
            window,
            capacity: capacity.max(4),
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Admits an attempt and counts it as a failure for every key, or refuses
    /// it with the time until the longest block among `keys` ends.
    pub fn begin(&self, keys: &[LimitKey], now: Instant) -> Result<(), Duration> {
        let mut windows = self.lock();
        let blocked = keys
            .iter()
            .filter_map(|key| windows.get(key))
            .filter(|w| !self.expired(w, now) && w.failures >= self.max_failures)
            .map(|w| (w.opened + self.window).saturating_duration_since(now))
            .max();
        if let Some(wait) = blocked {
            return Err(wait);
        }
        for key in keys {
            if !windows.contains_key(key) && windows.len() >= self.capacity {
                self.make_room(&mut windows, now);
            }
            let window = windows.entry(key.clone()).or_insert(Window {
                opened: now,
                failures: 0,
            });
            if self.expired(window, now) {
                *window = Window {
                    opened: now,
                    failures: 0,
                };
            }
            window.failures += 1;
            if window.failures == self.max_failures {
                tracing::warn!(key = ?key, "login failures reached the limit; refusing logins for this key until its window ends");
            }
        }
        Ok(())
    }

    /// The attempt admitted by [`LoginLimiter::begin`] succeeded: forget the
    /// username's failures and give back the attempt counted for `ip`.
    pub fn succeeded(&self, user: &LimitKey, ip: Option<&LimitKey>) {
        let mut windows = self.lock();
        windows.remove(user);
        if let Some(window) = ip.and_then(|ip| windows.get_mut(ip)) {
            window.failures = window.failures.saturating_sub(1);
        }
    }

    /// Keys tracked now (for tests and metrics).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn expired(&self, window: &Window, now: Instant) -> bool {
        now.saturating_duration_since(window.opened) >= self.window
    }

    /// Shrinks a full table to three quarters: expired windows first, then the
    /// keys with the fewest failures, then (all blocked) those ending soonest.
    fn make_room(&self, windows: &mut HashMap<LimitKey, Window>, now: Instant) {
        let target = self.capacity - self.capacity / 4;
        windows.retain(|_, w| !self.expired(w, now));
        let mut floor = 1;
        while windows.len() > target && floor < self.max_failures {
            windows.retain(|_, w| w.failures > floor);
            floor += 1;
        }
        if windows.len() > target {
            let mut by_end: Vec<(Instant, LimitKey)> =
                windows.iter().map(|(k, w)| (w.opened, k.clone())).collect();
            by_end.sort_unstable_by_key(|(opened, _)| *opened);
            for (_, key) in by_end.into_iter().take(windows.len() - target) {
                windows.remove(&key);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<LimitKey, Window>> {
        // Every critical section leaves the map consistent: ignore poisoning.
        self.windows
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(900);

    fn ip(last: u8) -> LimitKey {
        LimitKey::ip(IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn the_limit_blocks_until_the_window_ends() {
        let limiter = LoginLimiter::new(3, WINDOW);
        let t0 = Instant::now();
        let keys = [ip(1), LimitKey::user("default", "alice")];
        for _ in 0..3 {
            assert!(limiter.begin(&keys, t0).is_ok());
        }
        let later = t0 + Duration::from_secs(100);
        assert_eq!(
            limiter.begin(&keys, later),
            Err(WINDOW - Duration::from_secs(100))
        );
        // Refusals do not extend the block.
        assert_eq!(
            limiter.begin(&keys, later),
            Err(WINDOW - Duration::from_secs(100))
        );
        assert!(limiter.begin(&keys, t0 + WINDOW).is_ok(), "a new window");
    }

    #[test]
    fn username_and_ip_count_separately() {
        let limiter = LoginLimiter::new(2, WINDOW);
        let now = Instant::now();
        let alice = LimitKey::user("default", "Alice");
        for _ in 0..2 {
            limiter.begin(&[ip(1), alice.clone()], now).unwrap();
        }
        // The username is blocked from anywhere, in any case.
        assert!(limiter
            .begin(&[ip(2), LimitKey::user("default", "ALICE")], now)
            .is_err());
        // The address is blocked for every username.
        assert!(limiter
            .begin(&[ip(1), LimitKey::user("default", "bob")], now)
            .is_err());
        // Others are not.
        assert!(limiter
            .begin(&[ip(3), LimitKey::user("default", "bob")], now)
            .is_ok());
        assert!(limiter
            .begin(&[ip(4), LimitKey::user("acme", "alice")], now)
            .is_ok());
    }

    #[test]
    fn success_clears_the_username_but_not_the_address() {
        let limiter = LoginLimiter::new(3, WINDOW);
        let now = Instant::now();
        let mallory = LimitKey::user("default", "mallory");
        let alice = LimitKey::user("default", "alice");
        limiter.begin(&[ip(1), alice.clone()], now).unwrap();
        limiter.begin(&[ip(1), alice.clone()], now).unwrap();
        limiter.begin(&[ip(1), mallory.clone()], now).unwrap();
        limiter.succeeded(&mallory, Some(&ip(1)));
        // ip(1) has 2 failures left on record, alice 2: one more each is allowed.
        limiter.begin(&[ip(1), alice.clone()], now).unwrap();
        assert!(limiter.begin(&[ip(1), mallory.clone()], now).is_err());
    }

    #[test]
    fn parallel_attempts_are_counted_before_their_outcome() {
        let limiter = LoginLimiter::new(10, WINDOW);
        let now = Instant::now();
        let key = [LimitKey::user("default", "alice")];
        let admitted = (0..100)
            .filter(|_| limiter.begin(&key, now).is_ok())
            .count();
        assert_eq!(admitted, 10);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(LimitKey::ip(a), LimitKey::ip(b));
        assert_ne!(LimitKey::ip(a), LimitKey::ip(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(LimitKey::ip(mapped), ip(1));
    }

    #[test]
    fn the_table_is_bounded_and_a_flood_evicts_itself_not_the_target() {
        let limiter = LoginLimiter::with_capacity(5, WINDOW, 100);
        let now = Instant::now();
        let target = [LimitKey::user("default", "alice")];
        for _ in 0..4 {
            limiter.begin(&target, now).unwrap();
        }
        for n in 0..10_000 {
            let junk = LimitKey::user("default", &format!("junk{n}"));
            limiter.begin(&[junk], now).unwrap();
            assert!(limiter.len() <= 100);
        }
        limiter.begin(&target, now).unwrap();
        assert!(
            limiter.begin(&target, now).is_err(),
            "the guessed-at username kept its count through the flood"
        );
    }

    #[test]
    fn expired_windows_are_dropped_first() {
        let limiter = LoginLimiter::with_capacity(5, WINDOW, 8);
        let t0 = Instant::now();
        for n in 0..8 {
            for _ in 0..4 {
                limiter.begin(&[ip(n)], t0).unwrap();
            }
        }
        assert_eq!(limiter.len(), 8);
        limiter.begin(&[ip(100)], t0 + WINDOW).unwrap();
        assert_eq!(limiter.len(), 1);
    }
}
