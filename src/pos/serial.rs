//! Serial registers: an RS-232 or USB-serial line, typically a tap on the receipt-printer cable.
//!
//! The port is read on a blocking thread (serialport is synchronous) and the bytes flow into
//! the same framer and pump as network registers. Nothing is ever written to the line: a tap
//! must stay invisible to the printer.
//!
//! Invariants:
//! - A port that is missing or vanishes (a USB adapter unplugged) is a degraded state, not a
//!   failure: the source keeps trying to open it and resumes by itself when it is back.
//! - The bytes of a frame cut off by the disconnect reach the dead-letter store.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::io::StreamReader;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{RegisterContext, pump};
use crate::config::{FlowControl, Parity, Transport};
use crate::supervisor::{Backoff, Component};

/// How long a blocking read waits before checking whether to stop.
const READ_TIMEOUT: Duration = Duration::from_millis(200);

/// The serialport settings for a `serial` transport.
pub fn builder(transport: &Transport) -> Option<serialport::SerialPortBuilder> {
    let Transport::Serial {
        port,
        baud,
        data_bits,
        parity,
        stop_bits,
        flow_control,
    } = transport
    else {
        return None;
    };
    let data_bits = match data_bits {
        5 => serialport::DataBits::Five,
        6 => serialport::DataBits::Six,
        7 => serialport::DataBits::Seven,
        _ => serialport::DataBits::Eight,
    };
    let parity = match parity {
        Parity::None => serialport::Parity::None,
        Parity::Odd => serialport::Parity::Odd,
        Parity::Even => serialport::Parity::Even,
    };
    let stop_bits = match stop_bits {
        2 => serialport::StopBits::Two,
        _ => serialport::StopBits::One,
    };
    let flow_control = match flow_control {
        FlowControl::None => serialport::FlowControl::None,
        FlowControl::Software => serialport::FlowControl::Software,
        FlowControl::Hardware => serialport::FlowControl::Hardware,
    };
    Some(
        serialport::new(port.to_string_lossy(), *baud)
            .data_bits(data_bits)
            .parity(parity)
            .stop_bits(stop_bits)
            .flow_control(flow_control)
            .timeout(READ_TIMEOUT),
    )
}

/// Opens the port, blocking on the blocking pool.
pub async fn open(
    builder: serialport::SerialPortBuilder,
) -> Result<Box<dyn serialport::SerialPort>, String> {
    tokio::task::spawn_blocking(move || builder.open())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// A stream of the port's bytes, read on a blocking thread until the port fails or `stop` is
/// set. The stream ends (rather than errs) when the port goes away, so the framer sees an end
/// of stream and hands on whatever partial frame it held.
pub fn byte_stream(
    mut port: Box<dyn serialport::SerialPort>,
    stop: Arc<AtomicBool>,
    name: String,
) -> (
    impl tokio::io::AsyncRead + Unpin,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(64);
    let reader = tokio::task::spawn_blocking(move || {
        let mut buf = [0u8; 4096];
        while !stop.load(Ordering::Relaxed) {
            match port.read(&mut buf) {
                Ok(0) => {
                    tracing::warn!(port = %name, "serial port closed");
                    return;
                }
                Ok(n) => {
                    if tx
                        .blocking_send(Ok(Bytes::copy_from_slice(&buf[..n])))
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    tracing::warn!(port = %name, error = %e, "serial port read failed (unplugged?)");
                    return;
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (StreamReader::new(Box::pin(stream)), reader)
}

/// Reads the port until cancelled, reopening it whenever it goes away.
pub async fn run(
    transport: &Transport,
    ctx: RegisterContext,
    component: Component,
    token: CancellationToken,
) {
    let (Some(builder), Transport::Serial { port, baud, .. }) = (builder(transport), transport)
    else {
        return;
    };
    let name = port.display().to_string();
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    let mut announced = false;
    loop {
        match open(builder.clone()).await {
            Ok(port) => {
                backoff.reset();
                announced = false;
                component.running(Some(format!("reading {name} at {baud} baud")));
                let span = tracing::info_span!(
                    "register",
                    store = %ctx.id.store,
                    register = %ctx.id.register,
                    lane = ctx.id.lane.as_deref().unwrap_or("-"),
                    port = %name
                );
                let stop = Arc::new(AtomicBool::new(false));
                let (bytes, reader) = byte_stream(port, stop.clone(), name.clone());
                async {
                    tracing::info!("serial port open");
                    pump(bytes, None::<tokio::io::Sink>, &ctx, &token).await;
                }
                .instrument(span)
                .await;
                stop.store(true, Ordering::Relaxed);
                let _ = reader.await;
                if token.is_cancelled() {
                    return;
                }
                component.degraded(format!("{name}: port went away; waiting for it to return"));
            }
            Err(e) => {
                if !announced {
                    tracing::warn!(register = %ctx.id.register, port = %name, error = %e, "cannot open the serial port; will keep trying");
                    announced = true;
                }
                component.degraded(format!("{name}: {e}"));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = token.cancelled() => return,
        }
    }
}
