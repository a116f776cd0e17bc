//! The OpenAPI document, generated from the handlers' annotations, at `/openapi.json`, and
//! Swagger UI (vendored files, no download) at `/docs`.

use axum::Router;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::SwaggerUi;

use super::{datasets, error, health, jobs, tools, AppState};

#[derive(OpenApi)]
#[openapi(
    info(title = "lrtune", description = "Finds the learning rate before you train: LR range tests and OneCycle sweeps."),
    paths(
        jobs::submit, jobs::list, jobs::show, jobs::curve, jobs::events, jobs::cancel,
        datasets::upload, datasets::list, datasets::show,
        tools::analyze, tools::schedules,
        health::healthz, health::metrics,
    ),
    components(schemas(
        error::ErrorBody, error::ErrorDetail, jobs::Job, jobs::JobList, jobs::Progress,
        jobs::Curve, datasets::DatasetView, datasets::DatasetList, tools::AnalyzeRequest,
        health::Health, jobs::CurveFormat, datasets::UploadFormat, datasets::UploadTask,
        crate::store::JobStatus, crate::store::JobError,
    )),
    modifiers(&BearerAuth),
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

pub fn router() -> Router<AppState> {
    Router::from(SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi()))
}
