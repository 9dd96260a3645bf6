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

/// Fields whose string values are output text in stream events: OpenAI chat
/// `choices[].delta.content` and `tool_calls[].function.arguments`, legacy
/// completions' `choices[].text`, Anthropic's `content_block_delta`
/// (`text`, `partial_json`, `thinking`) and Gemini's
/// `candidates[].content.parts[].text`.
const TEXT_FIELDS: [&[u8]; 5] = [b"content", b"text", b"arguments", b"partial_json", b"thinking"];
/// Responses API events whose `delta` string is output text; its other
/// `response.*` events repeat text already counted.
const RESPONSES_DELTAS: [&[u8]; 3] =
    [b"response.output_text.delta", b"response.function_call_arguments.delta", b"response.refusal.delta"];

/// The JSON string whose opening quote is at `at`: the index of its closing
/// quote (or the end of `s`) and its length in characters, an escape being
/// one and a surrogate pair one.
fn string_at(s: &[u8], at: usize) -> (usize, u64) {
    let (mut i, mut chars) = (at + 1, 0u64);
    while let Some(&b) = s.get(i) {
        match b {
            b'"' => return (i, chars),
            b'\\' => {
                let u = s.get(i + 1) == Some(&b'u');
                let low_surrogate = u && matches!(s.get(i + 2..i + 4), Some([b'd' | b'D', b'c'..=b'f' | b'C'..=b'F']));
                chars += u64::from(!low_surrogate);
                i += if u { 6 } else { 2 };
            }
            _ => {
                chars += u64::from(b & 0xC0 != 0x80);
                i += 1;
            }
        }
    }
    (s.len(), chars)
}

/// Characters of output text in one stream event's JSON (see
/// [`TEXT_FIELDS`] and [`RESPONSES_DELTAS`]). One pass over the bytes, no
/// parse: the estimate a stream cut short is charged by.
pub fn output_chars(event: &[u8]) -> u64 {
    let skip_ws = |mut i: usize| {
        while event.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        i
    };
    let (mut text, mut delta, mut responses, mut counted) = (0, 0, false, false);
    let mut i = 0;
    while let Some(off) = event.get(i..).and_then(|rest| rest.iter().position(|&b| b == b'"')) {
        let (end, _) = string_at(event, i + off);
        let key = event.get(i + off + 1..end).unwrap_or_default();
        let colon = skip_ws(end + 1);
        let v = skip_ws(colon + 1);
        if event.get(colon) != Some(&b':') || event.get(v) != Some(&b'"') {
            i = end + 1;
            continue;
        }
        let (vend, chars) = string_at(event, v);
        match key {
            b"delta" => delta += chars,
            b"type" => {
                let value = event.get(v + 1..vend).unwrap_or_default();
                responses |= value.starts_with(b"response.");
                counted |= RESPONSES_DELTAS.contains(&value);
            }
            k if TEXT_FIELDS.contains(&k) => text += chars,
            _ => {}
        }
        i = vend + 1;
    }
    match (responses, counted) {
        (false, _) => text,
        (true, true) => delta,
        (true, false) => 0,
    }
}

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
    /// Characters of output text in the events seen ([`output_chars`]).
    pub output_chars: u64,
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
        self.output_chars += output_chars(payload);
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
    fn output_text_is_counted_in_characters_per_dialect() {
        let cases: [(&str, u64); 12] = [
            // OpenAI chat: content and tool-call arguments; role and names are not text.
            (r#"{"choices":[{"delta":{"role":"assistant","content":"Héllo ✓"},"logprobs":null}]}"#, 7),
            (r#"{"choices":[{"delta":{"tool_calls":[{"function":{"name":"f","arguments":"{\"a\":1}"}}]}}]}"#, 7),
            (r#"{"choices":[{"delta":{"content":null}}],"usage":{"prompt_tokens":1}}"#, 0),
            // Escapes are one character, a surrogate pair one.
            (r#"{"choices":[{"delta":{"content":"a\n\"\u00e9\ud83d\ude00"}}]}"#, 5),
            // Legacy completions.
            (r#"{"choices":[{"text": "tok0 ", "index": 0}]}"#, 5),
            // Anthropic.
            (r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi there"}}"#, 8),
            (r#"{"type":"content_block_delta","delta":{"type":"input_json_delta","partial_json":"{\"x\""}}"#, 4),
            (r#"{"type":"content_block_start","content_block":{"type":"text","text":""}}"#, 0),
            // Gemini.
            (r#"{"candidates":[{"content":{"parts":[{"text":"Bonjour"}],"role":"model"}}]}"#, 7),
            // Responses API: deltas only; the done events repeat the text.
            (r#"{"type":"response.output_text.delta","item_id":"m","delta":"Hello"}"#, 5),
            (r#"{"type":"response.output_text.done","text":"Hello"}"#, 0),
            (r#"{"type":"response.output_item.done","item":{"content":[{"type":"output_text","text":"Hello"}]}}"#, 0),
        ];
        for (event, want) in cases {
            assert_eq!(output_chars(event.as_bytes()), want, "{event}");
        }
        // Cut anywhere, never more than the whole, never a panic.
        let e = cases[0].0.as_bytes();
        for cut in 0..=e.len() {
            assert!(output_chars(&e[..cut]) <= 7, "cut at {cut}");
        }
    }

    #[test]
    fn a_stream_counts_the_output_text_of_its_events_whatever_the_chunking() {
        let s = stream();
        let mut whole = SseUsage::new();
        whole.feed(&s);
        // Five events of "tök{i} ✓": 6 characters each.
        assert_eq!(whole.output_chars, 30);
        for cut in 0..=s.len() {
            let mut p = SseUsage::new();
            p.feed(&s[..cut]);
            p.feed(&s[cut..]);
            assert_eq!(p.output_chars, 30, "cut at {cut}");
        }
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
