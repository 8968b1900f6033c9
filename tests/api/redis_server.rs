//! A real `redis-server` per test, on a free port in a temp folder: started,
//! stopped (keeping its data), killed, restarted empty, its clients killed.
//! Cluster tests never mock Redis (the test script installs it with apt).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agentcast::config::{RedisSettings, Secret, Settings};

use crate::helpers::{spawn_app_with, TestApp, WAIT};

pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// A fresh, empty Redis with append-only persistence (fsync every write,
    /// so a restart "with its data" keeps every acknowledged publish).
    pub async fn start() -> RedisServer {
        let dir = std::env::temp_dir().join(format!("agentcast-redis-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("create the redis dir");
        let port = free_port();
        let mut server = RedisServer {
            port,
            dir,
            child: None,
        };
        server.launch().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Settings of a node of this Redis, named `node`, with its own key prefix
    /// `prefix` (tests on one Redis stay apart).
    pub fn node(&self, prefix: &str, node: &str) -> impl FnOnce(&mut Settings) + 'static {
        let url = self.url();
        let (prefix, node) = (prefix.to_owned(), node.to_owned());
        move |settings: &mut Settings| {
            settings.redis = Some(RedisSettings {
                url: Secret::new(url),
                prefix,
            });
            settings.node_id = node;
        }
    }

    /// SIGKILL: the data on disk stays (AOF, fsync always).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same data.
    pub async fn start_again(&mut self) {
        self.kill();
        self.launch().await;
    }

    /// Starts it again on the same port with nothing in it (a lost Redis).
    pub async fn restart_empty(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(&self.dir).expect("recreate the redis dir");
        self.launch().await;
    }

    /// Runs `redis-cli` against it; returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .arg("-p")
            .arg(self.port.to_string())
            .args(args)
            .output()
            .expect("run redis-cli (install redis-tools)");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `CLIENT KILL TYPE normal` and `TYPE pubsub`: every node loses its
    /// connections (they must reconnect and lose nothing).
    pub fn kill_clients(&self) {
        self.cli(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"]);
        self.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    }

    async fn launch(&mut self) {
        let child = Command::new("redis-server")
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--appendonly")
            .arg("yes")
            .arg("--appendfsync")
            .arg("always")
            .arg("--save")
            .arg("")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "start redis-server (scripts/test.sh installs it: apt-get install redis-server)",
            );
        self.child = Some(child);
        let deadline = std::time::Instant::now() + WAIT;
        while self.cli(&["PING"]).trim() != "PONG" {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server on {} did not answer PING",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port nobody listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free port")
}

/// A node of `redis` named `node` in the key namespace `prefix`, with `tweak` after.
pub async fn spawn_node(
    redis: &RedisServer,
    prefix: &str,
    node: &str,
    tweak: impl FnOnce(&mut Settings),
) -> TestApp {
    let cluster = redis.node(prefix, node);
    spawn_app_with(move |settings| {
        cluster(settings);
        tweak(settings);
    })
    .await
}
