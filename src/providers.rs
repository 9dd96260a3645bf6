//! Which provider serves a request, and how the request is adapted to it:
//! the `models` table maps a model name to providers in order of preference
//! (each with its own name for the model); otherwise the request's API shape
//! (OpenAI, Anthropic or Gemini paths) picks the first provider that speaks
//! it. Moving to the next provider when every key of one is cooling is the
//! caller's job (it knows availability).

use crate::config::{ApiShape, Config, ProviderKind};

/// A provider a request may go to, with what must change for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub provider: usize,
    /// The model name to send, when it differs from the request's.
    pub model: Option<String>,
}

/// The providers that may serve a request, best first.
pub fn candidates(cfg: &Config, path: &str, model: Option<&str>) -> Vec<Candidate> {
    let shape = ApiShape::of_path(path);
    if let Some(m) = model {
        if let Some((_, served)) = cfg.models.iter().find(|(name, _)| name == m) {
            return served
                .iter()
                .filter(|(p, _)| cfg.providers.get(*p).is_some_and(|p| p.kind.shape() == shape))
                .map(|(p, name)| Candidate { provider: *p, model: (name != m).then(|| name.clone()) })
                .collect();
        }
    }
    cfg.providers
        .iter()
        .enumerate()
        .filter(|(_, p)| p.kind.shape() == shape)
        .map(|(i, _)| Candidate { provider: i, model: None })
        .collect()
}

/// The path to send to `provider` for a request to `path` (when it must
/// change): an OpenAI path becomes an Azure deployment path (with
/// `api-version`) or Gemini's OpenAI-compatible path. Paths already in the
/// provider's own form are left untouched.
pub fn path_for(cfg: &Config, provider: usize, path: &str, model: Option<&str>) -> Option<String> {
    let p = cfg.providers.get(provider)?;
    let (path_only, query) = match path.split_once('?') {
        Some((a, b)) => (a, Some(b)),
        None => (path, None),
    };
    let op = path_only.strip_prefix("/v1/")?;
    match p.kind {
        ProviderKind::Azure => {
            let deployment = model?;
            let mut out = format!("/openai/deployments/{deployment}/{op}?api-version={}", p.api_version);
            if let Some(q) = query {
                out.push('&');
                out.push_str(q);
            }
            Some(out)
        }
        ProviderKind::GeminiOpenAi => {
            Some(format!("/v1beta/openai/{op}{}", query.map(|q| format!("?{q}")).unwrap_or_default()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::compile;

    fn cfg() -> Config {
        let json = r#"{"providers":[
            {"id":"openai","keys":[{"id":"o1","secret":"s"}]},
            {"id":"azure","kind":"azure","api_version":"2025-01-01","keys":[{"id":"z1","secret":"s"}]},
            {"id":"claude","kind":"anthropic","keys":[{"id":"a1","secret":"s"}]},
            {"id":"gem","kind":"gemini_openai","keys":[{"id":"g1","secret":"s"}]}],
          "models":{"gpt-4o":[{"provider":"openai"},{"provider":"azure","model":"gpt4o-prod"}]}}"#;
        compile(json.as_bytes(), &|_| None).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_models_table_lists_providers_in_order_with_their_own_names() {
        let c = cfg();
        assert_eq!(
            candidates(&c, "/v1/chat/completions", Some("gpt-4o")),
            vec![Candidate { provider: 0, model: None }, Candidate { provider: 1, model: Some("gpt4o-prod".into()) }]
        );
    }

    #[test]
    fn without_a_mapping_the_api_shape_picks_the_providers() {
        let c = cfg();
        let openai_shaped: Vec<usize> =
            candidates(&c, "/v1/chat/completions", Some("other")).iter().map(|x| x.provider).collect();
        assert_eq!(openai_shaped, vec![0, 1, 3]);
        assert_eq!(
            candidates(&c, "/v1/messages", Some("claude-3")).iter().map(|x| x.provider).collect::<Vec<_>>(),
            vec![2]
        );
        assert!(candidates(&c, "/v1beta/models/gemini:generateContent", None).is_empty());
    }

    #[test]
    fn openai_paths_become_azure_deployments_and_gemini_compat_paths() {
        let c = cfg();
        assert_eq!(
            path_for(&c, 1, "/v1/chat/completions", Some("gpt4o-prod")).as_deref(),
            Some("/openai/deployments/gpt4o-prod/chat/completions?api-version=2025-01-01")
        );
        assert_eq!(path_for(&c, 3, "/v1/embeddings", None).as_deref(), Some("/v1beta/openai/embeddings"));
        assert_eq!(path_for(&c, 0, "/v1/chat/completions", None), None);
        assert_eq!(
            path_for(&c, 1, "/openai/deployments/d/chat/completions?api-version=1", Some("d")),
            None,
            "left untouched"
        );
    }
}
