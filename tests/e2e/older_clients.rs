//! A client built before fields were appended to its requests: a raw QUIC client sends
//! Fetch, Subscribe and InitTransactions controls in their first layout (without
//! `processor`, `isolation`, `held`) and gets the answers an up-to-date client gets for the
//! defaults those fields mean. A control missing a field that was always there is still
//! refused, naming the request, and the broker goes on serving.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use quiver_protocol::batch::{split_batches, BatchBuilder, BatchHeader, Compression};
use quiver_protocol::requests::{FetchResponse, InitTransactionsResponse, SubscribeChunk};
use quiver_protocol::{decode_response, encode_control, ApiKey, Frame, Limits, PROTOCOL_VERSION};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::forged_input::produce_raw;
use super::harness::TestBroker;
use super::hostile_input::connect;

/// Sends `control` (any serializable layout) as the request `api` with no payload, and reads
/// the first answer frame.
async fn ask<T: Serialize, R: DeserializeOwned>(
    conn: &quinn::Connection,
    api: ApiKey,
    control: &T,
) -> Result<(R, Bytes), String> {
    let control = encode_control(control);
    let mut body = BytesMut::new();
    body.put_u32(control.len() as u32);
    body.put_slice(&control);
    let frame = Frame {
        api: api as u16,
        version: PROTOCOL_VERSION,
        body: body.freeze(),
    };
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&frame.encode()).await.unwrap();
    send.finish().unwrap();
    let mut buf = Vec::new();
    let answer = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some((f, _)) = Frame::decode(&buf, &Limits::default()).unwrap() {
                return f;
            }
            let chunk = recv
                .read_chunk(1 << 20, true)
                .await
                .unwrap()
                .expect("the broker answered before closing the stream");
            buf.extend_from_slice(&chunk.bytes);
        }
    })
    .await
    .expect("the broker answered in time");
    decode_response::<R>(api.name(), &answer.body).map_err(|e| e.to_string())
}

/// Records in the batches of a fetch or subscribe payload.
fn records_in(payload: &Bytes) -> i64 {
    split_batches(payload, 1 << 20)
        .unwrap()
        .iter()
        .map(|b| i64::from(BatchHeader::parse(b).unwrap().record_count))
        .sum()
}

#[test]
fn a_client_from_before_the_appended_fields_is_served() {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "old", "--partitions", "1"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_ep, conn) = connect(&b, &rt);
    rt.block_on(async {
        let mut batch = BatchBuilder::new(Compression::None);
        for v in ["one", "two", "three"] {
            batch.push(None, v.as_bytes(), 1_700_000_000_000, &[]);
        }
        let (code, msg) = produce_raw(&conn, "old", &batch.build()).await;
        assert_eq!(code, quiver_protocol::ErrorCode::None, "{msg}");

        // Fetch as first released: topic, partition, offset, max_bytes, max_wait_ms,
        // min_bytes. It reads uncommitted, with no processor.
        let fetch = ("old".to_string(), 0u32, 0i64, 1u32 << 20, 1000u32, 1u32);
        let (resp, payload): (FetchResponse, Bytes) = ask(&conn, ApiKey::Fetch, &fetch)
            .await
            .expect("a first-layout fetch is answered");
        assert_eq!(resp.high_watermark, 3);
        assert_eq!(records_in(&payload), 3);
        assert!(payload.windows(5).any(|w| w == b"three"));

        // Subscribe as first released: topic, partition, offset, max_bytes.
        let subscribe = ("old".to_string(), 0u32, 1i64, 1u32 << 20);
        let (chunk, payload): (SubscribeChunk, Bytes) = ask(&conn, ApiKey::Subscribe, &subscribe)
            .await
            .expect("a first-layout subscribe is answered");
        assert_eq!(chunk.high_watermark, 3);
        assert!(records_in(&payload) >= 2, "pushed from offset 1");

        // InitTransactions before `held`: the id is taken, fencing whoever held it.
        let init = ("old-tx".to_string(), 60_000u32);
        let (first, _): (InitTransactionsResponse, Bytes) =
            ask(&conn, ApiKey::InitTransactions, &init)
                .await
                .expect("a first-layout init is answered");
        let (again, _): (InitTransactionsResponse, Bytes) =
            ask(&conn, ApiKey::InitTransactions, &init).await.unwrap();
        assert_eq!(again.producer_id, first.producer_id);
        assert!(
            again.producer_epoch > first.producer_epoch,
            "{again:?} after {first:?}"
        );

        // A fetch without `min_bytes`, which every layout had: refused, naming the request.
        let cut = ("old".to_string(), 0u32, 0i64, 1u32 << 20, 1000u32);
        let err = ask::<_, FetchResponse>(&conn, ApiKey::Fetch, &cut)
            .await
            .map(|_| ())
            .unwrap_err();
        assert!(err.contains("FetchRequest"), "{err}");

        // The broker goes on serving the same connection.
        let (resp, _): (FetchResponse, Bytes) = ask(&conn, ApiKey::Fetch, &fetch).await.unwrap();
        assert_eq!(resp.high_watermark, 3);
    });
}
