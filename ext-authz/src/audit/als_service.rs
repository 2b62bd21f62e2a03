//! Envoy's gRPC access log service (`envoy.service.accesslog.v3`): every HTTP entry becomes
//! an audit event and a metrics observation.

use super::writer::AuditSink;
use super::AuditEvent;
use crate::metrics::Metrics;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::AccessLogService;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::LogEntries;
use envoy_types::pb::envoy::service::accesslog::v3::{
    StreamAccessLogsMessage, StreamAccessLogsResponse,
};
use std::sync::Arc;
use tonic::{Request, Response, Status, Streaming};

#[derive(Debug, Clone)]
pub struct AlsService {
    sink: AuditSink,
    metrics: Arc<Metrics>,
}

impl AlsService {
    pub fn new(sink: AuditSink, metrics: Arc<Metrics>) -> Self {
        Self { sink, metrics }
    }
}

#[tonic::async_trait]
impl AccessLogService for AlsService {
    async fn stream_access_logs(
        &self,
        request: Request<Streaming<StreamAccessLogsMessage>>,
    ) -> Result<Response<StreamAccessLogsResponse>, Status> {
        let mut stream = request.into_inner();
        while let Some(msg) = stream.message().await? {
            if let Some(LogEntries::HttpLogs(logs)) = msg.log_entries {
                for entry in &logs.log_entry {
                    let event = AuditEvent::from_entry(entry);
                    self.metrics.observe(&event);
                    self.sink.submit(event);
                }
            }
        }
        Ok(Response::new(StreamAccessLogsResponse {}))
    }
}
