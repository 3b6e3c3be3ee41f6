//! Profiles from central over the MQTT downlink, through a real broker: upserts apply, stale
//! ones lose, and an erasure removes everything within a second and outlives a stale upsert.

use crate::common;

use std::time::{Duration, Instant};

use common::{Central, TestAgent, eventually, start_rumqttd};
use rumqttc::{AsyncClient, MqttOptions, QoS};

async fn central(broker: std::net::SocketAddr) -> AsyncClient {
    let options = MqttOptions::new("central-test", broker.ip().to_string(), broker.port());
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upserts_and_erasures_from_central_apply_and_erasure_wins_over_a_stale_upsert() {
    let broker = start_rumqttd();
    let agent = TestAgent::start(broker, &[]).await;
    eventually("the uplink connects", Duration::from_secs(10), || {
        agent
            .board
            .get("uplink.mqtt")
            .is_some_and(|s| s.detail.as_deref().unwrap_or("").starts_with("connected"))
    })
    .await;
    // The subscription follows the CONNACK; give the broker a moment to register it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let central = central(broker).await;
    let events = Central::subscribe(broker, "storelink/v1/acme/s042/events/#").await;
    let profiles_topic = "storelink/v1/acme/s042/profiles";
    let key = "07".repeat(32);
    let upsert = |version: u64| {
        serde_json::json!([{
            "customer_id": "c77",
            "first_name": "Ada",
            "tier": "gold",
            "consents": {"presence": true, "personalised_offers": true},
            "presence_key": key,
            "version": version
        }])
        .to_string()
    };
    central
        .publish(profiles_topic, QoS::AtLeastOnce, false, upsert(5))
        .await
        .unwrap();
    eventually("the upsert applies", Duration::from_secs(5), || {
        agent
            .profiles
            .get("c77")
            .unwrap()
            .is_some_and(|p| p.version == 5)
    })
    .await;
    assert_eq!(agent.profiles.presence_keys().unwrap().len(), 1);

    let erased_at = Instant::now();
    central
        .publish(
            "storelink/v1/acme/erasures",
            QoS::AtLeastOnce,
            false,
            r#"{"customer_id":"c77","version":5}"#,
        )
        .await
        .unwrap();
    eventually("the erasure applies", Duration::from_secs(1), || {
        agent.profiles.get("c77").unwrap().is_none()
    })
    .await;
    assert!(erased_at.elapsed() < Duration::from_secs(1));
    assert!(agent.profiles.presence_keys().unwrap().is_empty());
    assert_eq!(agent.profiles.tombstone("c77").unwrap(), Some(5));
    events
        .wait_for_ids("storelink.erasure.v1", 1, Duration::from_secs(5))
        .await;
    let ack = &events.of_type("storelink.erasure.v1")[0]["data"];
    assert_eq!(
        ack["customer_ref"],
        storelink::profiles::erasure::customer_ref("c77")
    );
    assert_eq!(ack["version"], 5);
    assert_eq!(ack["profile_records"], 2, "profile and presence key");

    // A stale upsert that was in flight arrives after the erasure, then a malformed message:
    // neither brings the customer back, and the downlink keeps working.
    central
        .publish(profiles_topic, QoS::AtLeastOnce, false, upsert(4))
        .await
        .unwrap();
    central
        .publish(profiles_topic, QoS::AtLeastOnce, false, "{not json")
        .await
        .unwrap();
    let mut other = upsert(1).replace("c77", "c78");
    other = other.replace("\"gold\"", "\"silver\"");
    central
        .publish(profiles_topic, QoS::AtLeastOnce, false, other)
        .await
        .unwrap();
    eventually("the next upsert applies", Duration::from_secs(5), || {
        agent.profiles.get("c78").unwrap().is_some()
    })
    .await;
    assert_eq!(agent.profiles.get("c77").unwrap(), None);
    agent.stop().await;
}
