//! The two HTTP listeners: shoppers (`SECKILL_HTTP_ADDR`) and operators (`SECKILL_ADMIN_ADDR`).

pub mod health;
pub mod problem;

use std::{net::TcpListener, sync::Arc, time::Duration};

use actix_web::{App, HttpResponse, HttpServer, dev::Server, web};
use tracing_actix_web::TracingLogger;

use crate::{http::problem::ApiError, startup::Deps};

/// Largest accepted request body.
pub const MAX_BODY: usize = 16 * 1024;

/// Everything handlers share, cloned into every worker.
#[derive(Clone)]
pub struct State {
    pub deps: web::Data<Deps>,
}

impl State {
    pub async fn build(deps: Arc<Deps>) -> anyhow::Result<Self> {
        Ok(Self {
            deps: web::Data::from(deps),
        })
    }
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound)
}

fn json_config() -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(MAX_BODY)
        .error_handler(|err, _req| {
            use actix_web::error::JsonPayloadError as E;
            let api = match &err {
                E::OverflowKnownLength { .. } | E::Overflow { .. } => {
                    ApiError::PayloadTooLarge(MAX_BODY)
                }
                E::ContentType => {
                    ApiError::BadRequest("expected Content-Type: application/json".into())
                }
                E::Deserialize(e) => ApiError::BadRequest(format!("invalid JSON body: {e}")),
                _ => ApiError::BadRequest("could not read the request body".into()),
            };
            api.into()
        })
}

fn path_config() -> web::PathConfig {
    web::PathConfig::default().error_handler(|_, _| ApiError::NotFound.into())
}

/// The shoppers' server.
pub fn public_server(listener: TcpListener, state: State) -> anyhow::Result<Server> {
    let server = HttpServer::new(move || {
        App::new()
            .wrap(TracingLogger::default())
            .app_data(state.deps.clone())
            .app_data(json_config())
            .app_data(path_config())
            .service(health::healthz)
            .service(health::readyz)
            .default_service(web::to(not_found))
    })
    .listen(listener)?
    .client_request_timeout(Duration::from_secs(5))
    .client_disconnect_timeout(Duration::from_secs(1))
    .shutdown_timeout(5)
    .disable_signals()
    .run();
    Ok(server)
}

/// The operators' server (admin API and metrics live only here).
pub fn admin_server(listener: TcpListener, state: State) -> anyhow::Result<Server> {
    let server = HttpServer::new(move || {
        App::new()
            .wrap(TracingLogger::default())
            .app_data(state.deps.clone())
            .app_data(json_config())
            .app_data(path_config())
            .service(health::healthz)
            .service(health::readyz)
            .default_service(web::to(not_found))
    })
    .workers(1)
    .listen(listener)?
    .client_request_timeout(Duration::from_secs(5))
    .shutdown_timeout(5)
    .disable_signals()
    .run();
    Ok(server)
}
