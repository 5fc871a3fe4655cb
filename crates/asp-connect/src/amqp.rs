//! `kind = "amqp"`: not built yet (issue 17). Placeholder so the runtime and the
//! configuration compile while it is built; every connection attempt fails with a
//! clear error in the connector's status.

use std::sync::Arc;

use crate::runtime::{Ctx, InMessage, OutMessage, Progress, Sink, Source, Undelivered};

pub(crate) struct AmqpSink;

impl Sink for AmqpSink {
    async fn send(&mut self, _batch: &[OutMessage]) -> Result<Undelivered, String> {
        Err("not built yet".into())
    }
}

pub(crate) async fn sink(_ctx: Arc<Ctx>) -> Result<AmqpSink, String> {
    Err("kind = \"amqp\" is not built yet".into())
}

pub(crate) struct AmqpSource;

impl Source for AmqpSource {
    async fn fetch(&mut self, _max: usize) -> Result<Vec<InMessage>, String> {
        Err("not built yet".into())
    }
    async fn ack(&mut self, _batch: &[InMessage]) -> Result<(), String> {
        Err("not built yet".into())
    }
    async fn head(&mut self) -> Option<(String, u64)> {
        None
    }
}

pub(crate) async fn source(_ctx: Arc<Ctx>, _applied: Progress) -> Result<AmqpSource, String> {
    Err("kind = \"amqp\" is not built yet".into())
}
