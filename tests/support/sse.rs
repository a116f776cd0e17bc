//! Reading a job's server-sent events as the tests check them.

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use reqwest::Response;
use serde_json::Value;

/// Reads server-sent events until the stream ends (or `timeout`): (event, data) pairs, the data
/// parsed as JSON (`Null` when it is not). Events without a name are left out.
pub async fn read_events(response: Response, timeout: Duration) -> Vec<(String, Value)> {
    let mut events = Vec::new();
    let mut stream = response.bytes_stream().eventsource();
    let deadline = tokio::time::Instant::now() + timeout;
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, stream.next()).await {
        let event = event.expect("a well-formed event");
        if event.event != "message" {
            let data = serde_json::from_str(&event.data).unwrap_or(Value::Null);
            events.push((event.event, data));
        }
    }
    events
}
