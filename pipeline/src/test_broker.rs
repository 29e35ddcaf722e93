//! Tests' broker: a real broker (QUIC endpoint, sled files in a temporary directory) in
//! this process, and a client reaching it in process, as deployed pipelines do.

use quiver_client::Client;
use quiver_core::{Broker, BrokerConfig, BrokerHandle};

/// Starts a broker keeping its data in `dir`, and a client of it.
pub async fn start(dir: &std::path::Path) -> (BrokerHandle, Client) {
    let broker = Broker::start(BrokerConfig {
        listen: "127.0.0.1:0".into(),
        data_dir: dir.to_path_buf(),
        ..BrokerConfig::default()
    })
    .await
    .expect("broker starts");
    let client = Client::connect(broker.in_process_client_config())
        .await
        .expect("in-process client");
    (broker, client)
}

/// [`start`], with one-partition topics `topics` created.
pub async fn with_topics(dir: &std::path::Path, topics: &[&str]) -> (BrokerHandle, Client) {
    let (broker, client) = start(dir).await;
    let admin = quiver_client::Admin::new(client.clone());
    for t in topics {
        admin
            .create_topic(t, 1, std::collections::BTreeMap::new())
            .await
            .expect("topic created");
    }
    (broker, client)
}
