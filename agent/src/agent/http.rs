//! The agent's HTTP endpoint (`pcft agent --metrics ADDR`): Prometheus
//! metrics at `/metrics`, the live dashboard at `/`, and the dashboard's data
//! at `/api/timeline?since=MS`. The dashboard's files (agent/dashboard/, with
//! uPlot vendored by `cargo xtask dashboard-assets`) are built into pcft:
//! nothing is fetched at run time.

use axum::http::header::{ACCESS_CONTROL_ALLOW_ORIGIN, CONTENT_TYPE};
use axum::routing::{get, MethodRouter};
use axum::Router;

/// A file of the dashboard, served as it was built in.
fn asset(content_type: &'static str, body: &'static str) -> MethodRouter {
    get(move || async move { ([(CONTENT_TYPE, content_type)], body) })
}

#[derive(serde::Deserialize)]
struct Since {
    /// Milliseconds since the Unix epoch; entries after it are returned.
    since: Option<f64>,
}

/// The routes of agent `agent`.
pub fn router(agent: String) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|| async {
                (
                    [(CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                    crate::metrics::get().encode(),
                )
            }),
        )
        .route(
            "/api/timeline",
            get(move |axum::extract::Query(q): axum::extract::Query<Since>| async move {
                let slice = crate::metrics::get().timeline.since(&agent, q.since.unwrap_or(0.0));
                // A dashboard served by one agent plots its peers' timelines too.
                ([(ACCESS_CONTROL_ALLOW_ORIGIN, "*")], axum::Json(slice))
            }),
        )
        .route("/", asset("text/html; charset=utf-8", include_str!("../../dashboard/index.html")))
        .route("/dashboard.js", asset("text/javascript", include_str!("../../dashboard/dashboard.js")))
        .route(
            "/vendor/uPlot.iife.min.js",
            asset("text/javascript", include_str!("../../dashboard/vendor/uPlot.iife.min.js")),
        )
        .route("/vendor/uPlot.min.css", asset("text/css", include_str!("../../dashboard/vendor/uPlot.min.css")))
}

/// Serves [`router`] on `listener` until the agent stops.
pub async fn serve(listener: tokio::net::TcpListener, agent: String) {
    if let Err(e) = axum::serve(listener, router(agent)).await {
        tracing::error!("the metrics and dashboard server stopped: {e}");
    }
}
