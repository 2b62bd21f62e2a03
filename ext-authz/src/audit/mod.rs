//! Audit: Envoy streams one access-log entry per request to tollgate-authz (gRPC access log
//! service, buffered and off the request path); each becomes an audit row and a metrics
//! observation. No content and no key material is ever part of an event.

pub mod als_service;
pub mod event;
pub mod writer;

pub use event::AuditEvent;
