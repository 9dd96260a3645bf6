//! A fixed OpenAI-style SSE upstream for the benchmark.
//!
//! `sse-server [--port N] [--unix PATH] [--chunks N] [--tick-us N]` listens on
//! 127.0.0.1 (port 0 picks one; the chosen port is printed as `listening <port>`)
//! and, with `--unix`, on a Unix socket too. It answers every HTTP/1.1 request,
//! whatever its path and body, with a `text/event-stream` response in chunked
//! encoding: `--chunks` content chunks (`chat.completion.chunk`, the last with
//! `finish_reason: "stop"`), a usage chunk and `data: [DONE]`, every SSE event
//! its own HTTP chunk and its own `write`.
//!
//! The headers and the first event are written at once (time to first chunk is
//! the proxy's, not ours). With `--tick-us 0`, or for a request whose `Host`
//! begins with `immediate.`, the other events follow at once (a Host, as the
//! proxy in front forwards it).
//! Otherwise one ticker thread writes the next event of every open stream each
//! tick, so the events of one stream are at least a tick apart and reach the
//! proxy as separate reads, as a model's tokens do, at the cost of one write per
//! event and one timer wake-up per tick for all streams together. Connections
//! are kept alive; one thread reads each connection.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Opts {
    port: u16,
    unix: Option<String>,
    chunks: usize,
    tick_us: u64,
}

fn parse_opts() -> Result<Opts, String> {
    let mut opts = Opts { port: 0, unix: None, chunks: 50, tick_us: 1000 };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |_| format!("bad value for {flag}: {value}");
        match flag.as_str() {
            "--port" => opts.port = value.parse().map_err(bad)?,
            "--unix" => opts.unix = Some(value),
            "--chunks" => opts.chunks = value.parse().map_err(bad)?,
            "--tick-us" => opts.tick_us = value.parse().map_err(bad)?,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if opts.chunks == 0 {
        return Err("--chunks must be at least 1".into());
    }
    Ok(opts)
}

/// One HTTP/1.1 chunk holding one SSE event.
fn http_chunk(event: &str) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", event.len()).into_bytes();
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(b"\r\n");
    out
}

/// The whole response, precomputed, one buffer per write: the headers, each
/// event, and `data: [DONE]` with the last chunk.
fn response(chunks: usize) -> Vec<Vec<u8>> {
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n";
    let mut out = vec![head.as_bytes().to_vec()];
    let prefix =
        r#"{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o-mini","#;
    for i in 0..chunks {
        let delta = if i == 0 {
            r#"{"role":"assistant","content":""}"#.to_string()
        } else {
            format!(r#"{{"content":"tok{i} "}}"#)
        };
        let finish = if i + 1 == chunks { r#""stop""# } else { "null" };
        let event =
            format!("data: {prefix}\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":{finish}}}]}}\n\n");
        out.push(http_chunk(&event));
    }
    let completion = chunks.saturating_sub(1);
    let usage = format!(
        "data: {prefix}\"choices\":[],\"usage\":{{\"prompt_tokens\":12,\"completion_tokens\":{completion},\"total_tokens\":{}}}}}\n\n",
        12 + completion
    );
    out.push(http_chunk(&usage));
    let mut last = http_chunk("data: [DONE]\n\n");
    last.extend_from_slice(b"0\r\n\r\n");
    out.push(last);
    out
}

fn bad_input(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// What a request asks for.
struct Request {
    keep_alive: bool,
    /// `Host: immediate.<...>`: every event at once, whatever the tick.
    immediate: bool,
}

/// Reads one request (head and body, content-length or chunked). Returns
/// Ok(None) on a clean close before a request.
fn read_request(reader: &mut impl BufRead) -> io::Result<Option<Request>> {
    let mut line = String::new();
    let mut content_length = 0usize;
    let mut chunked = false;
    let mut keep_alive = true;
    let mut immediate = false;
    let mut first = true;
    let mut head_bytes = 0usize;
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 {
            return if first { Ok(None) } else { Err(bad_input("eof in request head")) };
        }
        head_bytes += n;
        if head_bytes > 256 * 1024 {
            return Err(bad_input("request head too large"));
        }
        let trimmed = line.trim_end();
        if first {
            first = false;
            if trimmed.ends_with("HTTP/1.0") {
                keep_alive = false;
            }
            continue;
        }
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            let name = name.trim().to_ascii_lowercase();
            let value = value.trim().to_ascii_lowercase();
            match name.as_str() {
                "content-length" => content_length = value.parse().map_err(|_| bad_input("bad content-length"))?,
                "transfer-encoding" => chunked = value.contains("chunked"),
                "connection" => keep_alive = !value.contains("close"),
                "host" => immediate = value.starts_with("immediate."),
                _ => {}
            }
        }
    }
    if chunked {
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Err(bad_input("eof in chunked body"));
            }
            let size_text = line.trim_end().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size_text.trim(), 16).map_err(|_| bad_input("bad chunk size"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    line.clear();
                    if reader.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
                        break;
                    }
                }
                break;
            }
            io::copy(&mut reader.by_ref().take(size as u64 + 2), &mut io::sink())?;
        }
    } else if content_length > 0 {
        let copied = io::copy(&mut reader.by_ref().take(content_length as u64), &mut io::sink())?;
        if copied < content_length as u64 {
            return Err(bad_input("eof in body"));
        }
    }
    Ok(Some(Request { keep_alive, immediate }))
}

/// The write half of a connection, shared with the ticker.
trait Sink: Send + Sync {
    fn send(&self, buf: &[u8]) -> io::Result<()>;
}

impl Sink for TcpStream {
    fn send(&self, buf: &[u8]) -> io::Result<()> {
        (&*self).write_all(buf)
    }
}

impl Sink for UnixStream {
    fn send(&self, buf: &[u8]) -> io::Result<()> {
        (&*self).write_all(buf)
    }
}

/// A stream the ticker is writing: the next part to send, and who to tell
/// when it is done.
struct Active {
    sink: Arc<dyn Sink>,
    next: usize,
    done: Sender<io::Result<()>>,
}

type Pending = Arc<Mutex<Vec<Active>>>;

fn ticker(pending: Pending, response: Arc<Vec<Vec<u8>>>, tick: Duration) {
    let mut streams: Vec<Active> = Vec::new();
    loop {
        let started = Instant::now();
        if let Ok(mut p) = pending.lock() {
            streams.append(&mut p);
        }
        streams.retain_mut(|s| {
            let Some(part) = response.get(s.next) else {
                let _ = s.done.send(Ok(()));
                return false;
            };
            if let Err(e) = s.sink.send(part) {
                let _ = s.done.send(Err(e));
                return false;
            }
            s.next += 1;
            if s.next >= response.len() {
                let _ = s.done.send(Ok(()));
                return false;
            }
            true
        });
        std::thread::sleep(tick.saturating_sub(started.elapsed()));
    }
}

struct Shared {
    response: Arc<Vec<Vec<u8>>>,
    /// Streams handed to the ticker; None writes every part at once.
    pending: Option<Pending>,
}

fn serve(reader: impl Read, sink: Arc<dyn Sink>, shared: &Shared) -> io::Result<()> {
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    while let Some(req) = read_request(&mut reader)? {
        let immediate = if shared.pending.is_some() && !req.immediate { 2 } else { shared.response.len() };
        for part in shared.response.iter().take(immediate) {
            sink.send(part)?;
        }
        if let Some(pending) = &shared.pending {
            if immediate < shared.response.len() {
                let (tx, rx) = channel();
                if let Ok(mut p) = pending.lock() {
                    p.push(Active { sink: Arc::clone(&sink), next: immediate, done: tx });
                }
                rx.recv().map_err(|_| io::Error::other("ticker gone"))??;
            }
        }
        if !req.keep_alive {
            break;
        }
    }
    Ok(())
}

fn spawn(f: impl FnOnce() + Send + 'static) {
    let _ = std::thread::Builder::new().stack_size(256 * 1024).spawn(f);
}

fn fail(msg: String) -> ! {
    eprintln!("sse-server: {msg}");
    std::process::exit(1)
}

fn main() {
    let opts = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("sse-server: {e}");
            std::process::exit(2);
        }
    };
    let tcp = TcpListener::bind(("127.0.0.1", opts.port))
        .unwrap_or_else(|e| fail(format!("cannot listen on 127.0.0.1:{}: {e}", opts.port)));
    let port = tcp.local_addr().map(|a| a.port()).unwrap_or_else(|e| fail(e.to_string()));
    let unix = opts.unix.as_ref().map(|path| {
        let _ = std::fs::remove_file(path);
        UnixListener::bind(path).unwrap_or_else(|e| fail(format!("cannot listen on {path}: {e}")))
    });

    let response = Arc::new(response(opts.chunks));
    let pending = (opts.tick_us > 0).then(|| {
        let pending: Pending = Arc::new(Mutex::new(Vec::new()));
        let (p, r, tick) = (Arc::clone(&pending), Arc::clone(&response), Duration::from_micros(opts.tick_us));
        spawn(move || ticker(p, r, tick));
        pending
    });
    let shared = Arc::new(Shared { response, pending });

    if let Some(unix) = unix {
        let shared = Arc::clone(&shared);
        spawn(move || {
            for conn in unix.incoming() {
                let Ok(stream) = conn else { continue };
                let Ok(reader) = stream.try_clone() else { continue };
                let shared = Arc::clone(&shared);
                spawn(move || {
                    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
                    let _ = serve(reader, Arc::new(stream), &shared);
                });
            }
        });
    }
    println!("listening {port}");
    let _ = io::stdout().flush();
    for conn in tcp.incoming() {
        let Ok(stream) = conn else { continue };
        let Ok(reader) = stream.try_clone() else { continue };
        let shared = Arc::clone(&shared);
        spawn(move || {
            let _ = stream.set_nodelay(true);
            let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
            let _ = serve(reader, Arc::new(stream), &shared);
        });
    }
}
