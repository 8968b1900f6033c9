//! Cluster mode (SPEC §6, issue 9): several nodes over one real `redis-server`.

use serde_json::json;

use crate::helpers::{accepted, ADMIN};
use crate::redis_server::{spawn_node, RedisServer};

#[tokio::test]
async fn a_broadcast_on_one_node_reaches_a_tab_on_another_once() {
    let redis = RedisServer::start().await;
    let a = spawn_node(&redis, "t1", "a", |_| {}).await;
    let b = spawn_node(&redis, "t1", "b", |_| {}).await;
    let (mut tab_a, _) = a.connect_ready(&a.user_token("alice")).await;
    let (mut tab_b, _) = b.connect_ready(&b.user_token("bob")).await;
    let body = accepted(
        a.post_broadcast(&a.admin_token(), &json!({"type": "note", "data": {"n": 1}}))
            .await,
    )
    .await;
    assert_eq!(body["seq"], 1);
    for tab in [&mut tab_a, &mut tab_b] {
        let frame = tab.expect_type("note").await;
        assert_eq!(frame["seq"], 1);
        assert_eq!(frame["data"]["n"], 1);
    }
    let _ = ADMIN;
    tab_b.assert_alive().await;
}
