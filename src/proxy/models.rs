//! `GET …/v1/models`: the project's `@configs` and every provider's listed models, in the
//! surface's own list shape.

use bytes::Bytes;
use serde_json::json;

use super::{respond, Req};
use crate::auth::Principal;
use crate::config;
use crate::error::{GatewayError, Surface};

pub async fn list(req: &mut Req<'_>, principal: &Principal) -> Result<(), GatewayError> {
    let snapshot = req.snapshot;
    let mut ids: Vec<(String, String)> = Vec::new();
    for (slug, _) in config::project_configs(snapshot, &principal.project) {
        ids.push((format!("@{slug}"), "modelux".into()));
    }
    let mut providers: Vec<_> = snapshot.providers.values().collect();
    providers.sort_by(|a, b| a.id.cmp(&b.id));
    for p in providers {
        for m in &p.models {
            ids.push((format!("{}/{m}", p.id), p.id.clone()));
        }
    }
    let body = match req.ctx.surface {
        Surface::OpenAi => json!({
            "object": "list",
            "data": ids.iter().map(|(id, owner)| json!({"id": id, "object": "model", "created": 0, "owned_by": owner})).collect::<Vec<_>>(),
        }),
        Surface::Anthropic => json!({
            "data": ids.iter().map(|(id, _)| json!({"type": "model", "id": id, "display_name": id, "created_at": "1970-01-01T00:00:00Z"})).collect::<Vec<_>>(),
            "has_more": false,
            "first_id": ids.first().map(|(id, _)| id.clone()),
            "last_id": ids.last().map(|(id, _)| id.clone()),
        }),
    };
    let body = serde_json::to_vec(&body).map_err(|e| GatewayError::internal(e.to_string()))?;
    let headers = vec![(http::header::CONTENT_TYPE, "application/json".into())];
    respond::whole(req.session, req.ctx, 200, headers, Bytes::from(body)).await;
    Ok(())
}
