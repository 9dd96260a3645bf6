//! Token usage read from provider responses: a whole JSON body, or an SSE
//! stream fed chunk by chunk as it passes (chunk boundaries are arbitrary, so
//! partial lines are kept as bytes, never decoded early).

use serde_json::Value;

/// Tokens reported by the provider for one response.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// All input tokens, cached ones included.
    pub input: u64,
    pub output: u64,
    pub total: u64,
    /// Input tokens served from the provider's prompt cache.
    pub cached_input: u64,
    /// Output tokens spent on reasoning (already counted in `output`).
    pub reasoning: u64,
}

/// Reads a `usage` object in the OpenAI chat/completions/embeddings shape
/// (`prompt_tokens`, `completion_tokens`, `total_tokens`) or the Responses API
/// shape (`input_tokens`, `output_tokens`, `total_tokens`).
pub fn from_usage_object(u: &Value) -> Option<Usage> {
    let obj = u.as_object()?;
    let get = |k: &str| obj.get(k).and_then(Value::as_u64);
    // Gemini's usageMetadata.
    if let Some(prompt) = get("promptTokenCount") {
        let output = get("candidatesTokenCount").unwrap_or(0).saturating_add(get("thoughtsTokenCount").unwrap_or(0));
        return Some(Usage {
            input: prompt,
            output,
            total: get("totalTokenCount").unwrap_or(prompt.saturating_add(output)),
            cached_input: get("cachedContentTokenCount").unwrap_or(0).min(prompt),
            reasoning: get("thoughtsTokenCount").unwrap_or(0),
        });
    }
    let input = get("prompt_tokens").or_else(|| get("input_tokens"));
    let output = get("completion_tokens").or_else(|| get("output_tokens"));
    let total = get("total_tokens");
    if input.is_none() && output.is_none() && total.is_none() {
        return None;
    }
    // Anthropic counts prompt-cache writes and reads outside input_tokens.
    let cache_write = get("cache_creation_input_tokens").unwrap_or(0);
    let cache_read = get("cache_read_input_tokens").unwrap_or(0);
    let input = input.unwrap_or(0).saturating_add(cache_write).saturating_add(cache_read);
    let output = output.unwrap_or(0);
    let cached = |details: &str| obj.get(details).and_then(|d| d.get("cached_tokens")).and_then(Value::as_u64);
    Some(Usage {
        input,
        output,
        total: total.unwrap_or(input.saturating_add(output)),
        cached_input: cached("prompt_tokens_details")
            .or_else(|| cached("input_tokens_details"))
            .unwrap_or(cache_read)
            .min(input),
        reasoning: ["completion_tokens_details", "output_tokens_details"]
            .iter()
            .find_map(|d| obj.get(*d).and_then(|d| d.get("reasoning_tokens")).and_then(Value::as_u64))
            .unwrap_or(0)
            .min(output),
    })
}

/// Finds usage in one JSON document: top-level `usage`, or `response.usage`
/// (Responses API streaming events).
pub fn from_json_value(v: &Value) -> Option<Usage> {
    v.get("usage")
        .and_then(from_usage_object)
        .or_else(|| v.get("usageMetadata").and_then(from_usage_object))
        .or_else(|| v.get("response").and_then(|r| r.get("usage")).and_then(from_usage_object))
        // Anthropic's streaming message_start event.
        .or_else(|| v.get("message").and_then(|m| m.get("usage")).and_then(from_usage_object))
}

/// Usage from a complete, non-streaming JSON response body.
pub fn from_json_body(body: &[u8]) -> Option<Usage> {
    let v: Value = serde_json::from_slice(body).ok()?;
    from_json_value(&v)
}

/// Usage from the tail of a JSON body too large to hold whole: the object
/// after the last `"usage"` key (OpenAI puts it at the end).
pub fn from_json_tail(tail: &[u8]) -> Option<Usage> {
    const KEY: &[u8] = b"\"usage\"";
    let at = tail.windows(KEY.len()).rposition(|w| w == KEY)? + KEY.len();
    let rest = &tail[at..];
    let open = rest.iter().position(|&b| !b.is_ascii_whitespace() && b != b':')?;
    if rest[open] != b'{' {
        return None;
    }
    let (mut depth, mut in_str, mut escaped) = (0usize, false, false);
    for (i, &b) in rest[open..].iter().enumerate() {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    let v: Value = serde_json::from_slice(&rest[open..open + i + 1]).ok()?;
                    return from_usage_object(&v);
                }
            }
            _ => {}
        }
    }
    None
}

/// The `error.code` (or, failing that, `error.type`) of an error body, e.g.
/// `insufficient_quota`.
pub fn error_code(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let e = v.get("error")?;
    e.get("code").and_then(Value::as_str).or_else(|| e.get("type").and_then(Value::as_str)).map(str::to_string)
}

/// True when `line` has `"usage"` followed by `:` and an object, i.e. not the
/// `"usage":null` that every OpenAI stream chunk carries. Cheap pre-filter
/// before a JSON parse.
fn mentions_usage_object(line: &[u8]) -> bool {
    mentions_object(line, b"\"usage\"") || mentions_object(line, b"\"usageMetadata\"")
}

fn mentions_object(line: &[u8], key: &[u8]) -> bool {
    let needle = key;
    let mut start = 0;
    while let Some(pos) = find(&line[start..], needle) {
        let mut i = start + pos + needle.len();
        while i < line.len() && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i < line.len() && line[i] == b':' {
            i += 1;
            while i < line.len() && line[i].is_ascii_whitespace() {
                i += 1;
            }
            if i < line.len() && line[i] == b'{' {
                return true;
            }
        }
        start = start + pos + 1;
    }
    false
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Longest SSE line we are willing to hold while waiting for its end.
pub const MAX_LINE: usize = 4 << 20;

/// Incremental SSE reader that remembers the last usage it saw.
#[derive(Debug, Default)]
pub struct SseUsage {
    partial: Vec<u8>,
    /// Set when a line outgrew [`MAX_LINE`]; bytes are skipped to its end.
    skipping: bool,
    pub usage: Option<Usage>,
    pub saw_done: bool,
    /// `data:` events seen, `[DONE]` excluded: about one output token each
    /// for chat streams, which is what a mid-stream budget check goes by.
    pub events: u64,
}

impl SseUsage {
    pub fn new() -> SseUsage {
        SseUsage::default()
    }

    /// Feeds the next chunk of the stream.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            match chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
                None => {
                    if !self.skipping {
                        if self.partial.len() + chunk.len() > MAX_LINE {
                            self.partial.clear();
                            self.skipping = true;
                        } else {
                            self.partial.extend_from_slice(chunk);
                        }
                    }
                    return;
                }
                Some(end) => {
                    if self.skipping {
                        self.skipping = false;
                    } else if self.partial.is_empty() {
                        self.line(&chunk[..end]);
                    } else {
                        let mut line = std::mem::take(&mut self.partial);
                        line.extend_from_slice(&chunk[..end]);
                        self.line(&line);
                    }
                    chunk = &chunk[end + 1..];
                }
            }
        }
    }

    /// Flushes a final line that had no terminator (a stream cut short).
    pub fn finish(&mut self) {
        if !self.partial.is_empty() && !self.skipping {
            let line = std::mem::take(&mut self.partial);
            self.line(&line);
        }
    }

    fn line(&mut self, line: &[u8]) {
        let Some(rest) = line.strip_prefix(b"data:") else {
            return;
        };
        let payload = rest.strip_prefix(b" ").unwrap_or(rest);
        if payload == b"[DONE]" {
            self.saw_done = true;
            return;
        }
        self.events += 1;
        if !mentions_usage_object(payload) {
            return;
        }
        if let Ok(v) = serde_json::from_slice::<Value>(payload) {
            if let Some(u) = from_json_value(&v) {
                self.usage = Some(match (v.get("type").and_then(Value::as_str), self.usage) {
                    // Anthropic: message_delta carries the cumulative output
                    // only; the input came with message_start.
                    (Some("message_delta"), Some(prev)) => {
                        let input = prev.input.max(u.input);
                        let cached_input = prev.cached_input.max(u.cached_input);
                        Usage {
                            input,
                            output: u.output,
                            total: input.saturating_add(u.output),
                            cached_input,
                            reasoning: u.reasoning,
                        }
                    }
                    _ => u,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT_JSON: &str = r#"{"id":"c1","object":"chat.completion","model":"gpt-4o",
      "choices":[{"index":0,"message":{"role":"assistant","content":"hé"}}],
      "usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}"#;

    #[test]
    fn json_body_usage_is_read() {
        assert_eq!(
            from_json_body(CHAT_JSON.as_bytes()),
            Some(Usage { input: 12, output: 7, total: 19, cached_input: 0, reasoning: 0 })
        );
    }

    #[test]
    fn usage_is_found_in_the_tail_of_a_large_body() {
        let mut body = br#"{"data":[{"embedding":[0.1,0.2]}],"x":"a \"usage\": {} trap","#.to_vec();
        body.extend_from_slice(br#""usage":{"prompt_tokens":8,"total_tokens":8,"details":{"a":"}"}}}"#);
        assert_eq!(from_json_tail(&body).map(|u| (u.input, u.total)), Some((8, 8)));
        assert_eq!(from_json_tail(b"no usage here"), None);
        assert_eq!(from_json_tail(br#""usage": {"prompt_tokens": 3"#), None, "cut short");
    }

    #[test]
    fn reasoning_tokens_are_read() {
        let b = br#"{"usage":{"prompt_tokens":10,"completion_tokens":50,"total_tokens":60,"completion_tokens_details":{"reasoning_tokens":32}}}"#;
        assert_eq!(from_json_body(b).map(|u| (u.output, u.reasoning)), Some((50, 32)));
    }

    #[test]
    fn cached_prompt_tokens_are_read() {
        let b = br#"{"usage":{"prompt_tokens":100,"completion_tokens":5,"total_tokens":105,
                    "prompt_tokens_details":{"cached_tokens":60},"completion_tokens_details":{"reasoning_tokens":2}}}"#;
        assert_eq!(
            from_json_body(b),
            Some(Usage { input: 100, output: 5, total: 105, cached_input: 60, reasoning: 2 })
        );
        let b = br#"{"usage":{"input_tokens":10,"output_tokens":1,"input_tokens_details":{"cached_tokens":99}}}"#;
        assert_eq!(from_json_body(b).map(|u| u.cached_input), Some(10), "never more than the input");
    }

    #[test]
    fn embeddings_and_responses_api_shapes_are_read() {
        let emb = br#"{"object":"list","data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        assert_eq!(from_json_body(emb), Some(Usage { input: 8, output: 0, total: 8, cached_input: 0, reasoning: 0 }));
        let resp = br#"{"object":"response","usage":{"input_tokens":5,"output_tokens":3,"total_tokens":8}}"#;
        assert_eq!(from_json_body(resp), Some(Usage { input: 5, output: 3, total: 8, cached_input: 0, reasoning: 0 }));
    }

    #[test]
    fn error_codes_are_read_from_openai_error_bodies() {
        let b = br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
        assert_eq!(error_code(b).as_deref(), Some("insufficient_quota"));
        let b = br#"{"error":{"message":"x","type":"requests","code":null}}"#;
        assert_eq!(error_code(b).as_deref(), Some("requests"));
        assert_eq!(error_code(b"{}"), None);
        assert_eq!(error_code(b"<html>"), None);
    }

    #[test]
    fn missing_or_malformed_usage_is_none() {
        assert_eq!(from_json_body(b"{}"), None);
        assert_eq!(from_json_body(b"{\"usage\":null}"), None);
        assert_eq!(from_json_body(b"{\"usage\":{\"prompt_tokens\":\"x\"}}"), None);
        assert_eq!(from_json_body(b"not json"), None);
        assert_eq!(from_json_body(b""), None);
    }

    fn stream() -> Vec<u8> {
        let mut s = String::new();
        s.push_str(": keep-alive comment\n\n");
        for i in 0..5 {
            s.push_str(&format!(
                "data: {{\"id\":\"c\",\"choices\":[{{\"delta\":{{\"content\":\"tök{i} ✓\"}}}}],\"usage\":null}}\n\n"
            ));
        }
        s.push_str("data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":5,\"total_tokens\":16}}\r\n\r\n");
        s.push_str("data: [DONE]\n\n");
        s.into_bytes()
    }

    #[test]
    fn sse_usage_is_found_whole() {
        let mut p = SseUsage::new();
        p.feed(&stream());
        assert_eq!(p.usage, Some(Usage { input: 11, output: 5, total: 16, cached_input: 0, reasoning: 0 }));
        assert!(p.saw_done);
        assert_eq!(p.events, 6);
    }

    #[test]
    fn sse_usage_survives_a_split_at_every_byte_boundary() {
        let s = stream();
        for cut in 0..=s.len() {
            let mut p = SseUsage::new();
            p.feed(&s[..cut]);
            p.feed(&s[cut..]);
            assert_eq!(
                p.usage,
                Some(Usage { input: 11, output: 5, total: 16, cached_input: 0, reasoning: 0 }),
                "cut at {cut}"
            );
            assert!(p.saw_done, "cut at {cut}");
        }
    }

    #[test]
    fn sse_usage_survives_one_byte_chunks_and_three_way_splits() {
        let s = stream();
        let mut p = SseUsage::new();
        for b in &s {
            p.feed(std::slice::from_ref(b));
        }
        assert_eq!(p.usage.map(|u| u.total), Some(16));
        for a in (0..s.len()).step_by(7) {
            for b in (a..s.len()).step_by(11) {
                let mut p = SseUsage::new();
                p.feed(&s[..a]);
                p.feed(&s[a..b]);
                p.feed(&s[b..]);
                assert_eq!(p.usage.map(|u| u.total), Some(16), "cuts at {a},{b}");
            }
        }
    }

    #[test]
    fn anthropic_usage_is_read_from_json_and_from_its_stream_events() {
        let b = br#"{"type":"message","usage":{"input_tokens":10,"cache_creation_input_tokens":5,"cache_read_input_tokens":20,"output_tokens":7}}"#;
        assert_eq!(from_json_body(b), Some(Usage { input: 35, output: 7, total: 42, cached_input: 20, reasoning: 0 }));
        let stream = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n",
            "event: message_stop\n",
            "data: {\"type\":\"message_stop\"}\n\n"
        )
        .as_bytes();
        for cut in 0..=stream.len() {
            let mut p = SseUsage::new();
            p.feed(&stream[..cut]);
            p.feed(&stream[cut..]);
            assert_eq!(
                p.usage,
                Some(Usage { input: 25, output: 15, total: 40, cached_input: 0, reasoning: 0 }),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn gemini_usage_metadata_is_read_from_json_and_stream_chunks() {
        let b = br#"{"candidates":[],"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":4,"totalTokenCount":12,"cachedContentTokenCount":2}}"#;
        assert_eq!(from_json_body(b), Some(Usage { input: 8, output: 4, total: 12, cached_input: 2, reasoning: 0 }));
        let mut p = SseUsage::new();
        p.feed(b"data: {\"candidates\":[],\"usageMetadata\":{\"promptTokenCount\":8,\"candidatesTokenCount\":1,\"totalTokenCount\":9}}\r\n\r\n");
        p.feed(b"data: {\"candidates\":[],\"usageMetadata\":{\"promptTokenCount\":8,\"candidatesTokenCount\":6,\"totalTokenCount\":14}}\r\n\r\n");
        assert_eq!(p.usage.map(|u| (u.input, u.output, u.total)), Some((8, 6, 14)));
    }

    #[test]
    fn sse_responses_api_completed_event_is_read() {
        let s = b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":4,\"output_tokens\":6,\"total_tokens\":10}}}\n\n";
        let mut p = SseUsage::new();
        p.feed(s);
        assert_eq!(p.usage, Some(Usage { input: 4, output: 6, total: 10, cached_input: 0, reasoning: 0 }));
    }

    #[test]
    fn sse_without_usage_or_truncated_reports_none() {
        let mut p = SseUsage::new();
        p.feed(b"data: {\"choices\":[],\"usage\":null}\n\ndata: {\"usage\":{\"prompt_tok");
        p.finish();
        assert_eq!(p.usage, None);
        assert!(!p.saw_done);
    }

    #[test]
    fn sse_final_line_without_newline_is_read_on_finish() {
        let mut p = SseUsage::new();
        p.feed(b"data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}");
        assert_eq!(p.usage, None);
        p.finish();
        assert_eq!(p.usage.map(|u| u.total), Some(3));
    }

    #[test]
    fn sse_overlong_line_is_skipped_without_unbounded_memory() {
        let mut p = SseUsage::new();
        let big = vec![b'x'; MAX_LINE / 2 + 1];
        p.feed(b"data: ");
        p.feed(&big);
        p.feed(&big);
        assert!(p.partial.is_empty());
        p.feed(b"\ndata: {\"usage\":{\"total_tokens\":9}}\n");
        assert_eq!(p.usage.map(|u| u.total), Some(9));
    }
}
