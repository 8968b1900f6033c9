//! The attempt limiter behind failed logins and signups (SPEC §2): at most
//! `max_failures` counted attempts per key within `window`; beyond, 429 with
//! `Retry-After`.
//!
//! - **What blocks.** Logins count against the client IP and against the
//!   username *from that IP* ([`LimitKey::UserAtIp`]); either one reaching the
//!   limit blocks. A username alone ([`LimitKey::User`]) never blocks: if it
//!   did, anyone could lock the owner (admin included) out by failing from
//!   many addresses. Its count only *slows* further attempts, by
//!   [`SLOWDOWN_STEP`] per failure past the limit, at most [`MAX_SLOWDOWN`].
//!   Signups count per IP alone.
//! - **Counted up front.** [`LoginLimiter::begin`] counts an attempt as a failure
//!   before the password is checked, and [`LoginLimiter::succeeded`] takes it
//!   back. So a burst of parallel guesses cannot slip past the limit while
//!   argon2 is still busy with the first ones, and a refused attempt never
//!   reaches argon2 at all.
//! - **Fixed windows.** A key's window opens at its first failure and lasts
//!   `window`; a blocked key is blocked until that window ends, which is the
//!   `Retry-After`. Refused attempts do not extend it.
//! - **Bounded.** At most [`MAX_ENTRIES`] keys (~16 MiB). A full table first
//!   drops expired windows, then the keys with the fewest failures: a flood of
//!   one-off usernames or addresses evicts itself, not the keys being guessed
//!   at, which have many failures. The same holds for every key kind, since
//!   each attempt counts once per key.
//! - **IPv6** addresses count per /64, the block one host usually holds.
//!
//! Success clears the username's counts but gives back only the one attempt of
//! the IP: logging into one's own account must not reset the IP's count for
//! guesses at other accounts.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Keys the limiter tracks at most.
pub const MAX_ENTRIES: usize = 65_536;

/// Delay added per failure of a username (from anywhere) past the limit.
pub const SLOWDOWN_STEP: Duration = Duration::from_millis(200);

/// The longest a login of a username under attack is slowed: enough to make a
/// distributed guess slower, short enough that the owner barely notices.
pub const MAX_SLOWDOWN: Duration = Duration::from_secs(2);

/// What attempts are counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LimitKey {
    /// A client address (IPv6 cut to its /64). Blocks.
    Ip(IpAddr),
    /// A username of a tenant tried from one address. Blocks.
    UserAtIp {
        tenant: String,
        username: String,
        ip: IpAddr,
    },
    /// A username of a tenant, from any address. Slows, never blocks.
    User { tenant: String, username: String },
}

impl LimitKey {
    pub fn ip(ip: IpAddr) -> LimitKey {
        LimitKey::Ip(network_of(ip))
    }

    /// Usernames are case-insensitive: counted lowercased.
    pub fn user(tenant: &str, username: &str) -> LimitKey {
        LimitKey::User {
            tenant: tenant.to_owned(),
            username: username.to_ascii_lowercase(),
        }
    }

    pub fn user_at_ip(tenant: &str, username: &str, ip: IpAddr) -> LimitKey {
        LimitKey::UserAtIp {
            tenant: tenant.to_owned(),
            username: username.to_ascii_lowercase(),
            ip: network_of(ip),
        }
    }

    /// Whether reaching the limit refuses attempts (else it only slows them).
    fn blocks(&self) -> bool {
        !matches!(self, LimitKey::User { .. })
    }
}

/// The address a client is counted as: IPv4 as is (mapped IPv6 too), IPv6 per /64.
fn network_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
        v4 => v4,
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    opened: Instant,
    failures: u32,
}

/// Failed attempts per key; one short lock per attempt.
#[derive(Debug)]
pub struct LoginLimiter {
    /// What is limited, for the log line when a key reaches the limit.
    what: &'static str,
    max_failures: u32,
    window: Duration,
    capacity: usize,
    windows: Mutex<HashMap<LimitKey, Window>>,
}

impl LoginLimiter {
    pub fn new(max_failures: u32, window: Duration) -> LoginLimiter {
        LoginLimiter::with_capacity(max_failures, window, MAX_ENTRIES)
    }

    /// A limiter whose log line names `what` it limits (e.g. "signups").
    pub fn named(what: &'static str, max_failures: u32, window: Duration) -> LoginLimiter {
        LoginLimiter {
            what,
            ..LoginLimiter::new(max_failures, window)
        }
    }

    fn with_capacity(max_failures: u32, window: Duration, capacity: usize) -> LoginLimiter {
        LoginLimiter {
            what: "login failures",
            max_failures: max_failures.max(1),
            window,
            capacity: capacity.max(4),
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Admits an attempt and counts it as a failure for every key, answering
    /// how long to slow it down (zero unless a [`LimitKey::User`] is past the
    /// limit); or refuses it with the time until the longest block among the
    /// blocking `keys` ends.
    pub fn begin(&self, keys: &[LimitKey], now: Instant) -> Result<Duration, Duration> {
        let mut windows = self.lock();
        let live = |key: &LimitKey| windows.get(key).filter(|w| !self.expired(w, now));
        let blocked = keys
            .iter()
            .filter(|key| key.blocks())
            .filter_map(live)
            .filter(|w| w.failures >= self.max_failures)
            .map(|w| (w.opened + self.window).saturating_duration_since(now))
            .max();
        if let Some(wait) = blocked {
            return Err(wait);
        }
        let slowdown = keys
            .iter()
            .filter(|key| !key.blocks())
            .filter_map(live)
            .map(|w| self.slowdown(w.failures))
            .max()
            .unwrap_or(Duration::ZERO);
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
            window.failures = window.failures.saturating_add(1);
            if window.failures == self.max_failures {
                let what = self.what;
                if key.blocks() {
                    tracing::warn!(key = ?key, "{what} reached the limit; refusing more from this key until its window ends");
                } else {
                    tracing::warn!(key = ?key, "{what} reached the limit for this username from many addresses; slowing its logins");
                }
            }
        }
        Ok(slowdown)
    }

    /// The attempt admitted by [`LoginLimiter::begin`] succeeded: forget the
    /// failures of `clear` and give back the attempt counted for `give_back`.
    pub fn succeeded(&self, clear: &[LimitKey], give_back: Option<&LimitKey>) {
        let mut windows = self.lock();
        for key in clear {
            windows.remove(key);
        }
        if let Some(window) = give_back.and_then(|key| windows.get_mut(key)) {
            window.failures = window.failures.saturating_sub(1);
        }
    }

    /// The attempt admitted by [`LoginLimiter::begin`] was never judged (the
    /// directory could not answer, or no argon2 turn came): give back the
    /// attempt counted for each of `keys`, so an outage turns into 503s, not
    /// into failures that lock the owner out later.
    pub fn not_judged(&self, keys: &[LimitKey]) {
        let mut windows = self.lock();
        for key in keys {
            if let Some(window) = windows.get_mut(key) {
                window.failures = window.failures.saturating_sub(1);
            }
        }
    }

    /// Keys tracked now (for tests and metrics).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// [`SLOWDOWN_STEP`] per failure from the limit on, capped at [`MAX_SLOWDOWN`].
    fn slowdown(&self, failures: u32) -> Duration {
        let past = failures.saturating_sub(self.max_failures.saturating_sub(1));
        SLOWDOWN_STEP.saturating_mul(past).min(MAX_SLOWDOWN)
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

    fn addr(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    /// The keys a login of `username` from 10.0.0.`from` counts against.
    fn login(username: &str, from: u8) -> [LimitKey; 3] {
        [
            ip(from),
            LimitKey::user_at_ip("default", username, addr(from)),
            LimitKey::user("default", username),
        ]
    }

    #[test]
    fn attempts_never_judged_are_given_back() {
        let limiter = LoginLimiter::new(3, WINDOW);
        let t0 = Instant::now();
        let keys = login("alice", 1);
        // Many more attempts than the limit, each one unanswered (Redis down).
        for _ in 0..10 {
            assert!(limiter.begin(&keys, t0).is_ok());
            limiter.not_judged(&keys);
        }
        for _ in 0..3 {
            assert!(limiter.begin(&keys, t0).is_ok(), "the full limit is left");
        }
        assert!(limiter.begin(&keys, t0).is_err());
    }

    #[test]
    fn the_limit_blocks_until_the_window_ends() {
        let limiter = LoginLimiter::new(3, WINDOW);
        let t0 = Instant::now();
        let keys = login("alice", 1);
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
    fn username_at_ip_and_ip_block_but_the_username_alone_does_not() {
        let limiter = LoginLimiter::new(2, WINDOW);
        let now = Instant::now();
        for _ in 0..2 {
            limiter.begin(&login("Alice", 1), now).unwrap();
        }
        // The username from that address is blocked, in any case.
        assert!(limiter.begin(&login("ALICE", 1), now).is_err());
        // The address is blocked for every username.
        assert!(limiter.begin(&login("bob", 1), now).is_err());
        // The username from another address is not (finding 2 of issue 8).
        assert!(limiter.begin(&login("alice", 2), now).is_ok());
        // Nor are others.
        assert!(limiter.begin(&login("bob", 3), now).is_ok());
        assert!(limiter
            .begin(&[ip(4), LimitKey::user("acme", "alice")], now)
            .is_ok());
    }

    #[test]
    fn failures_from_many_addresses_slow_a_username_boundedly_never_lock_it() {
        let limiter = LoginLimiter::new(10, WINDOW);
        let now = Instant::now();
        let mut slowdowns = Vec::new();
        for from in 1..=200u8 {
            slowdowns.push(limiter.begin(&login("admin", from), now));
        }
        assert!(slowdowns.iter().all(Result::is_ok), "never refused");
        let slowdowns: Vec<Duration> = slowdowns.into_iter().flatten().collect();
        assert!(
            slowdowns[..10].iter().all(Duration::is_zero),
            "{slowdowns:?}"
        );
        assert_eq!(slowdowns[10], SLOWDOWN_STEP);
        assert!(slowdowns.windows(2).all(|w| w[0] <= w[1]), "grows");
        assert_eq!(slowdowns.last(), Some(&MAX_SLOWDOWN), "capped");
        // The owner from a fresh address, slowed at most MAX_SLOWDOWN.
        assert_eq!(limiter.begin(&login("admin", 250), now), Ok(MAX_SLOWDOWN));
    }

    #[test]
    fn success_clears_the_username_but_not_the_address() {
        let limiter = LoginLimiter::new(3, WINDOW);
        let now = Instant::now();
        let [ip1, alice_at_1, alice] = login("alice", 1);
        let [_, mallory_at_1, mallory] = login("mallory", 1);
        limiter.begin(&login("alice", 1), now).unwrap();
        limiter.begin(&login("alice", 1), now).unwrap();
        limiter.begin(&login("mallory", 1), now).unwrap();
        limiter.succeeded(&[mallory_at_1, mallory], Some(&ip1));
        // ip(1) has 2 failures left on record, alice 2: one more each is allowed.
        limiter.begin(&login("alice", 1), now).unwrap();
        assert!(limiter.begin(&login("mallory", 1), now).is_err());
        limiter.succeeded(&[alice_at_1, alice], None);
        assert!(limiter.begin(&login("alice", 2), now).is_ok());
    }

    #[test]
    fn parallel_attempts_are_counted_before_their_outcome() {
        let limiter = LoginLimiter::new(10, WINDOW);
        let now = Instant::now();
        let keys = login("alice", 1);
        let admitted = (0..100)
            .filter(|_| limiter.begin(&keys, now).is_ok())
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
        assert_eq!(
            LimitKey::user_at_ip("t", "u", a),
            LimitKey::user_at_ip("t", "U", b)
        );
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(LimitKey::ip(mapped), ip(1));
    }

    #[test]
    fn the_table_is_bounded_and_a_flood_evicts_itself_not_the_target() {
        let limiter = LoginLimiter::with_capacity(5, WINDOW, 100);
        let now = Instant::now();
        let target = login("alice", 1);
        for _ in 0..4 {
            limiter.begin(&target, now).unwrap();
        }
        for n in 0..10_000u32 {
            let from = IpAddr::from(n.to_be_bytes());
            let junk = format!("junk{n}");
            let keys = [
                LimitKey::ip(from),
                LimitKey::user_at_ip("default", &junk, from),
                LimitKey::user("default", &junk),
            ];
            limiter.begin(&keys, now).unwrap();
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
