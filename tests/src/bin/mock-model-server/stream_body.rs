//! Streamed replies: a plan of pre-encoded frames, the task that paces them, and the
//! channel-backed body that hands each one to hyper as its own frame (so the client sees
//! chunks arrive separately, as from a real model).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame};
use serde_json::Value;
use tokio::sync::mpsc;

/// Every frame of one streamed reply, already encoded for the wire.
#[derive(Debug, Default)]
pub struct StreamPlan {
    /// Sent at once, before any content (OpenAI role chunk, Anthropic `message_start`, …).
    pub preamble: Vec<Bytes>,
    /// One frame per content chunk; `delay` is waited before each of them.
    pub content: Vec<Bytes>,
    /// Sent right after the last content chunk (finish reason, usage, `[DONE]`, …).
    pub epilogue: Vec<Bytes>,
    pub delay: Duration,
}

impl StreamPlan {
    /// All frames in wire order; what a client would read with no delays.
    #[cfg(test)]
    pub fn frames(&self) -> impl Iterator<Item = &Bytes> {
        self.preamble
            .iter()
            .chain(&self.content)
            .chain(&self.epilogue)
    }

    /// Starts sending the frames on a task and returns the body that yields them. The task
    /// stops as soon as the client goes away (the receiver is dropped).
    pub fn spawn(self) -> ChannelBody {
        // Capacity 1: the task stays at most one frame ahead of the socket, so the delay
        // between chunks is what the client observes.
        let (tx, rx) = mpsc::channel::<Bytes>(1);
        tokio::spawn(async move {
            for frame in self.preamble {
                if tx.send(frame).await.is_err() {
                    return;
                }
            }
            for frame in self.content {
                if !self.delay.is_zero() {
                    tokio::time::sleep(self.delay).await;
                }
                if tx.send(frame).await.is_err() {
                    return;
                }
            }
            for frame in self.epilogue {
                if tx.send(frame).await.is_err() {
                    return;
                }
            }
        });
        ChannelBody { rx }
    }
}

/// A response body fed by a channel; it ends when the sender is dropped. Written by hand
/// because `http_body_util::StreamBody` needs a `futures` Stream we do not depend on.
#[derive(Debug)]
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .rx
            .poll_recv(cx)
            .map(|next| next.map(|data| Ok(Frame::data(data))))
    }
}

/// One server-sent event. `event: None` gives a bare `data:` line (OpenAI style).
pub fn sse(event: Option<&str>, data: &Value) -> Bytes {
    match event {
        Some(name) => Bytes::from(format!("event: {name}\ndata: {data}\n\n")),
        None => Bytes::from(format!("data: {data}\n\n")),
    }
}

/// The OpenAI stream terminator.
pub fn sse_done() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

/// One NDJSON line (Ollama streams).
pub fn ndjson(line: &Value) -> Bytes {
    Bytes::from(format!("{line}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn every_planned_frame_arrives_as_its_own_body_frame() {
        let plan = StreamPlan {
            preamble: vec![Bytes::from_static(b"a")],
            content: vec![Bytes::from_static(b"b"), Bytes::from_static(b"c")],
            epilogue: vec![Bytes::from_static(b"d")],
            delay: Duration::from_millis(1),
        };
        let mut body = plan.spawn();
        let mut seen = Vec::new();
        while let Some(frame) = body.frame().await {
            let data = frame.expect("infallible").into_data().expect("data frame");
            seen.push(data);
        }
        assert_eq!(seen, ["a", "b", "c", "d"]);
    }
}
