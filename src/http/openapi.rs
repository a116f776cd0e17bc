//! The OpenAPI document, generated from the handlers' annotations, at `/openapi.json`, and
//! Swagger UI (vendored files, no download) at `/docs`.

use axum::Router;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Ref, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::SwaggerUi;

use super::{datasets, error, events, health, jobs, tools, weights, AppState};

#[derive(OpenApi)]
#[openapi(
    info(title = "lrtune", description = "Finds the learning rate before you train: LR range tests and OneCycle sweeps."),
    paths(
        jobs::submit, jobs::list, jobs::show, jobs::curve, jobs::trials, events::events,
        jobs::cancel,
        datasets::upload, datasets::list, datasets::show, datasets::delete,
        weights::upload, weights::list, weights::show, weights::delete,
        tools::analyze, tools::schedules,
        health::healthz, health::metrics,
    ),
    components(schemas(
        error::ErrorBody, error::ErrorDetail, jobs::Job, jobs::JobList, jobs::Progress,
        jobs::Curve, jobs::CurvePoint, jobs::SweepRun, jobs::RacePoint, jobs::Trial,
        jobs::TrialList, jobs::TrialKindView, crate::store::TrialStatus, datasets::DatasetView, datasets::DatasetList, tools::AnalyzeRequest,
        weights::WeightsView, weights::WeightsList, weights::TensorView,
        health::Health, jobs::CurveFormat, crate::store::DataFormat, datasets::UploadTask,
        crate::store::JobStatus, crate::store::JobError,
    )),
    modifiers(&BearerAuth, &RetryLater),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

/// Every `/v1` operation can answer 503 (the database is unavailable, or the server is
/// shutting down), every `/v1` write 507 (the database's disk is full), and there a 503, 507
/// or 429 carries `Retry-After`: said once here instead of on every handler.
struct RetryLater;

impl Modify for RetryLater {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let retry_after = HeaderBuilder::new()
            .schema(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(0)),
            )
            .description(Some("Seconds to wait before trying again"))
            .build();
        for (path, item) in openapi.paths.paths.iter_mut() {
            if !path.starts_with("/v1/") {
                continue;
            }
            // The tools compute and answer; they store nothing.
            let stores = !matches!(path.as_str(), "/v1/analyze" | "/v1/schedules");
            let operations = [
                (false, &mut item.get),
                (true, &mut item.put),
                (true, &mut item.post),
                (true, &mut item.delete),
                (true, &mut item.patch),
            ];
            for (writes, operation) in operations {
                let Some(operation) = operation else {
                    continue;
                };
                let responses = &mut operation.responses.responses;
                if writes && stores {
                    responses.entry("507".to_string()).or_insert_with(|| {
                        ResponseBuilder::new()
                            .description("The database's disk is full: nothing can be stored")
                            .content(
                                "application/json",
                                Content::new(Some(Ref::from_schema_name("ErrorBody"))),
                            )
                            .build()
                            .into()
                    });
                }
                responses.entry("503".to_string()).or_insert_with(|| {
                    ResponseBuilder::new()
                        .description("The database is unavailable, or the server is shutting down")
                        .content(
                            "application/json",
                            Content::new(Some(Ref::from_schema_name("ErrorBody"))),
                        )
                        .build()
                        .into()
                });
                for (status, response) in responses.iter_mut() {
                    if let ("429" | "503" | "507", RefOr::T(response)) = (status.as_str(), response)
                    {
                        response
                            .headers
                            .insert("Retry-After".to_string(), retry_after.clone());
                    }
                }
            }
        }
    }
}

pub fn router() -> Router<AppState> {
    Router::from(SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi()))
}
