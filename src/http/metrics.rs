//! Counts every request by method, matched route and status, with the time it took (see
//! `telemetry` for the metrics themselves). Every label comes from a closed set, so that no
//! client can add series: the route is the matched template (`/v1/jobs/{id}`, never the path
//! itself) or "unmatched", the method one of the standard nine or "other", the status one the
//! server answered.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use super::AppState;

/// Where `note_route`, after routing, writes the matched route down for `track`, which
/// runs before routing so that it counts unmatched requests too.
#[derive(Clone, Default)]
struct MatchedRoute(Arc<OnceLock<String>>);

/// Counts the request once it is answered (the outermost of the app's layers).
pub async fn track(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let route = MatchedRoute::default();
    request.extensions_mut().insert(route.clone());
    let method = method_label(request.method());
    let started = Instant::now();
    let response = next.run(request).await;
    state.telemetry.record_request(
        method,
        route.0.get().map_or("unmatched", String::as_str),
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// A route layer: the template of the route that matched, for `track`.
pub async fn note_route(request: Request, next: Next) -> Response {
    let extensions = request.extensions();
    if let (Some(route), Some(path)) = (
        extensions.get::<MatchedRoute>(),
        extensions.get::<MatchedPath>(),
    ) {
        let _ = route.0.set(path.as_str().to_string());
    }
    next.run(request).await
}

/// The method as a label: a standard method by its name, any other as "other".
fn method_label(method: &Method) -> &'static str {
    const STANDARD: [Method; 9] = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::HEAD,
        Method::OPTIONS,
        Method::CONNECT,
        Method::TRACE,
    ];
    STANDARD
        .iter()
        .find(|standard| *standard == method)
        .map_or("other", |standard| standard.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_method_label_is_a_standard_method_or_other() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::TRACE), "TRACE");
        let invented = Method::from_bytes(b"X0000001").unwrap();
        assert_eq!(method_label(&invented), "other");
        let lowercase = Method::from_bytes(b"get").unwrap();
        assert_eq!(method_label(&lowercase), "other");
    }
}
