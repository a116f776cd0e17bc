//! Every list endpoint serves pages of 1 to 100 and refuses any other `limit` by name.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn a_limit_outside_1_to_100_is_a_400_naming_limit_on_every_list() {
    let app = spawn_app().await;
    for list in ["/v1/jobs", "/v1/datasets", "/v1/weights"] {
        for limit in ["0", "101", "4294967295"] {
            let (status, body) = json_of(app.get(&format!("{list}?limit={limit}")).await).await;
            assert_eq!(
                status,
                StatusCode::BAD_REQUEST,
                "{list}?limit={limit}: {body}"
            );
            let error = assert_error(&body, "bad_request");
            assert_eq!(error["field"], "limit", "{body}");
            assert_eq!(
                error["message"],
                format!("limit: must be 1 to 100, got {limit}")
            );
        }
        for limit in ["-1", "ten"] {
            let (status, body) = json_of(app.get(&format!("{list}?limit={limit}")).await).await;
            assert_eq!(
                status,
                StatusCode::BAD_REQUEST,
                "{list}?limit={limit}: {body}"
            );
            let message = assert_error(&body, "bad_request")["message"].clone();
            assert!(message.as_str().unwrap().contains("limit"), "{body}");
        }
        for limit in ["1", "100"] {
            let (status, body) = json_of(app.get(&format!("{list}?limit={limit}")).await).await;
            assert_eq!(status, StatusCode::OK, "{list}?limit={limit}: {body}");
            assert_eq!(body["next_cursor"], json!(null));
        }
    }
}
