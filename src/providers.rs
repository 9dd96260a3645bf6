//! Which provider serves a request, and how the request is adapted to it:
//! the `models` table maps a model name to providers in order of preference
//! (each with its own name for the model); otherwise the request's API shape
//! (OpenAI, Anthropic or Gemini paths) picks the first provider that speaks
//! it. Moving to the next provider when every key of one is cooling is the
//! caller's job (it knows availability): the ingress stage when it chooses,
//! and, inside a request, its next hop after an internal redirect
//! (`stages::flight::Fallover`).
//!
//! Some paths name the model themselves: Azure deployment paths
//! (`/openai/deployments/{name}/...`) and Gemini's native paths
//! (`/v1beta/models/{model}:generateContent`). [`path_model`] reads it, and
//! [`resolve`] turns a deployment name into the model it serves.

use crate::config::{ApiShape, Config, Provider, ProviderKind};
use crate::request::CapField;

/// A model named by the request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathModel {
    /// `/openai/deployments/{name}/...`: an Azure deployment.
    Deployment(String),
    /// `/{version}/models/{model}:{method}`: Gemini's native API.
    Gemini(String),
    /// A deployment or Gemini path whose model the router will not read
    /// (dot segments, encoded separators, unusual characters, an unknown
    /// form), since the provider might read it differently.
    Unreadable,
}

const DEPLOYMENTS: &str = "/openai/deployments/";
const GEMINI_METHODS: [&str; 5] =
    ["generateContent", "streamGenerateContent", "countTokens", "embedContent", "batchEmbedContents"];

/// A path segment that is a plain model name (`A-Za-z0-9`, `-`, `_`, `.`,
/// not `.` or `..`); anything encoded is not one.
fn model_segment(seg: &str) -> Option<String> {
    let ok = seg.len() <= 256
        && seg.bytes().any(|c| c != b'.')
        && seg.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c));
    ok.then(|| seg.to_string())
}

/// Longest model name a caller may send.
pub const MAX_MODEL_LEN: usize = 256;

/// A caller's model name may go into a provider's path or a header: ASCII
/// letters, digits and `-_.:/@+`, at most [`MAX_MODEL_LEN`] bytes, with no
/// empty, `.` or `..` segment between slashes (so `gpt-4o/../x` and
/// `gpt-4o?x` are refused while `ft:gpt-4o-mini:org::id`,
/// `meta-llama/Llama-3-70b` and `claude-3-5-sonnet@20240620` pass).
pub fn valid_model(m: &str) -> bool {
    !m.is_empty()
        && m.len() <= MAX_MODEL_LEN
        && m.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_.:/@+".contains(&c))
        && m.split('/').all(|s| !s.is_empty() && s != "." && s != "..")
}

/// `m` as one path segment: every byte but ASCII letters, digits and
/// `-_.~` percent-encoded.
pub fn path_segment(m: &str) -> String {
    let mut out = String::with_capacity(m.len());
    for c in m.bytes() {
        if c.is_ascii_alphanumeric() || b"-_.~".contains(&c) {
            out.push(char::from(c));
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

/// The endpoint a request path calls, as `allowed_endpoints` names it: the
/// path after the API root (`/v1/`, `/openai/`, an Azure deployment,
/// `/v1beta/openai/`), so `chat/completions`, `files/file-1`,
/// `messages/batches`; a Gemini model call is its method
/// (`generateContent`). `None` for a path outside those roots or one with
/// dot segments, encoded characters or empty segments.
pub fn endpoint(path: &str) -> Option<&str> {
    let path = path.split('?').next().unwrap_or(path);
    if path.contains(['%', '\\']) || path.contains("//") || path.split('/').any(|s| s == "." || s == "..") {
        return None;
    }
    if let Some(rest) = path.strip_prefix(DEPLOYMENTS) {
        return rest.split_once('/').map(|(_, op)| op).filter(|op| !op.is_empty());
    }
    let op =
        ["/v1beta/openai/", "/openai/", "/v1/", "/v1beta/", "/v1alpha/"].iter().find_map(|r| path.strip_prefix(r))?;
    match op.strip_prefix("models/").and_then(|call| call.split_once(':')) {
        Some((_, method)) => Some(method),
        None => Some(op).filter(|op| !op.is_empty()),
    }
}

/// The model a request path names, if it is a deployment or Gemini path.
pub fn path_model(path: &str) -> Option<PathModel> {
    let path = path.split('?').next().unwrap_or(path);
    let gemini = ApiShape::of_path(path) == ApiShape::Gemini;
    if !path.starts_with(DEPLOYMENTS) && !gemini {
        return None;
    }
    // Encoded characters, separators or dot segments a provider might
    // resolve differently.
    if path.contains(['%', '\\']) || path.contains("//") || path.split('/').any(|s| s == "." || s == "..") {
        return Some(PathModel::Unreadable);
    }
    if let Some(rest) = path.strip_prefix(DEPLOYMENTS) {
        let seg = rest.split('/').next().unwrap_or_default();
        return Some(model_segment(seg).map_or(PathModel::Unreadable, PathModel::Deployment));
    }
    let parsed = path.strip_prefix('/').and_then(|p| {
        let (version, rest) = p.split_once('/')?;
        let call = rest.strip_prefix("models/").filter(|_| ["v1", "v1beta", "v1alpha"].contains(&version))?;
        let (seg, method) = call.split_once(':')?;
        GEMINI_METHODS.contains(&method).then_some(seg).and_then(model_segment)
    });
    Some(parsed.map_or(PathModel::Unreadable, PathModel::Gemini))
}

/// The model a path model stands for, as policy, prices and budgets know
/// it: a deployment through the first Azure provider's `deployments` that
/// lists it, else through a `models` entry that sends a model to an Azure
/// provider under that name, else the deployment's own name; a Gemini
/// model as it is.
pub fn resolve(cfg: &Config, pm: &PathModel) -> Option<String> {
    match pm {
        PathModel::Gemini(m) => Some(m.clone()),
        PathModel::Unreadable => None,
        PathModel::Deployment(d) => {
            let azure = |p: usize| cfg.providers.get(p).is_some_and(|p| p.kind == ProviderKind::Azure);
            let listed = cfg
                .providers
                .iter()
                .filter(|p| p.kind == ProviderKind::Azure)
                .find_map(|p| p.deployments.iter().find(|(name, _)| name == d).map(|(_, m)| m.clone()));
            let mapped = || {
                cfg.models.iter().find_map(|(model, served)| {
                    served.iter().any(|(p, name)| azure(*p) && name == d).then(|| model.clone())
                })
            };
            Some(listed.or_else(mapped).unwrap_or_else(|| d.clone()))
        }
    }
}

/// The name `provider` knows `model` by, when its `deployments` list a
/// deployment serving it under another name.
fn deployment_for(p: &Provider, model: &str) -> Option<String> {
    p.deployments.iter().find(|(d, m)| m == model && d != model).map(|(d, _)| d.clone())
}

/// Where `provider`'s dialect takes an output cap for a request to `path`,
/// if it has one.
pub fn cap_field(cfg: &Config, provider: usize, path: &str) -> Option<CapField> {
    let kind = cfg.providers.get(provider)?.kind;
    let path = path.split('?').next().unwrap_or(path);
    match ApiShape::of_path(path) {
        ApiShape::Anthropic => path.ends_with("/messages").then_some(CapField::MaxTokens),
        ApiShape::Gemini => {
            let generates = path.ends_with(":generateContent") || path.ends_with(":streamGenerateContent");
            (generates && matches!(path_model(path), Some(PathModel::Gemini(_)))).then_some(CapField::GenerationConfig)
        }
        ApiShape::OpenAi if path.ends_with("/chat/completions") => Some(match kind {
            ProviderKind::OpenAi | ProviderKind::Azure => CapField::MaxCompletionTokens,
            _ => CapField::MaxTokens,
        }),
        ApiShape::OpenAi if path.ends_with("/completions") => Some(CapField::MaxTokens),
        ApiShape::OpenAi if path.ends_with("/responses") => Some(CapField::MaxOutputTokens),
        ApiShape::OpenAi => None,
    }
}

/// A provider a request may go to, with what must change for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub provider: usize,
    /// The model name to send, when it differs from the request's.
    pub model: Option<String>,
}

/// The providers that may serve a request, best first. A deployment path
/// goes only to Azure providers. A model the `models` table maps only to
/// providers of another shape is served, on a path that names its model,
/// by the providers of the path's shape.
pub fn candidates(cfg: &Config, path: &str, model: Option<&str>) -> Vec<Candidate> {
    let shape = ApiShape::of_path(path);
    let deployment_path = path.starts_with(DEPLOYMENTS);
    let fits = |p: &Provider| p.kind.shape() == shape && (!deployment_path || p.kind == ProviderKind::Azure);
    if let Some(m) = model {
        if let Some((_, served)) = cfg.models.iter().find(|(name, _)| name == m) {
            let listed: Vec<Candidate> = served
                .iter()
                .filter(|(p, _)| cfg.providers.get(*p).is_some_and(fits))
                .map(|(p, name)| Candidate { provider: *p, model: (name != m).then(|| name.clone()) })
                .collect();
            if !listed.is_empty() || path_model(path).is_none() {
                return listed;
            }
        }
    }
    cfg.providers
        .iter()
        .enumerate()
        .filter(|(_, p)| fits(p))
        .map(|(i, p)| Candidate { provider: i, model: model.and_then(|m| deployment_for(p, m)) })
        .collect()
}

/// The path to send to `provider` for a request to `path` (when it must
/// change): an OpenAI path becomes an Azure deployment path (with
/// `api-version`) or Gemini's OpenAI-compatible path. A path that names
/// its model gets `model` in its place when it differs. Other paths already
/// in the provider's own form are left untouched.
pub fn path_for(cfg: &Config, provider: usize, path: &str, model: Option<&str>) -> Option<String> {
    let p = cfg.providers.get(provider)?;
    let (path_only, query) = match path.split_once('?') {
        Some((a, b)) => (a, Some(b)),
        None => (path, None),
    };
    if let Some(PathModel::Deployment(now) | PathModel::Gemini(now)) = path_model(path) {
        let new = model.filter(|m| *m != now)?;
        return Some(with_path_model(path, new));
    }
    let op = path_only.strip_prefix("/v1/")?;
    match p.kind {
        ProviderKind::Azure => {
            let deployment = model?;
            let deployment = path_segment(deployment);
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

/// `path` with the model segment of a deployment or Gemini path replaced
/// by `model`.
fn with_path_model(path: &str, model: &str) -> String {
    let (start, end) = match path.strip_prefix(DEPLOYMENTS) {
        Some(rest) => (DEPLOYMENTS.len(), DEPLOYMENTS.len() + rest.find('/').unwrap_or(rest.len())),
        None => {
            let start = path.find("/models/").map_or(0, |i| i + "/models/".len());
            (start, path.get(start..).and_then(|r| r.find(':')).map_or(path.len(), |i| start + i))
        }
    };
    [path.get(..start).unwrap_or_default(), &path_segment(model), path.get(end..).unwrap_or_default()].concat()
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
          "models":{"gpt-4o":[{"provider":"openai"},{"provider":"azure","model":"gpt4o-prod"}],
                    "gemini-2.0-flash":[{"provider":"gem"}]}}"#;
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

    fn with_deployments() -> Config {
        let json = r#"{"providers":[
            {"id":"openai","keys":[{"id":"o1","secret":"s"}]},
            {"id":"az","kind":"azure","deployments":{"prod-4o":"gpt-4o","mini":"gpt-4o-mini"},"keys":[{"id":"z1","secret":"s"}]},
            {"id":"az2","kind":"azure","keys":[{"id":"z2","secret":"s"}]},
            {"id":"native","kind":"gemini","keys":[{"id":"g1","secret":"s"}]}],
          "models":{"o3":[{"provider":"az2","model":"o3-dep"}]}}"#;
        compile(json.as_bytes(), &|_| None).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn deployment_and_gemini_paths_name_their_model() {
        let cases = [
            (
                "/openai/deployments/prod-4o/chat/completions?api-version=1",
                Some(PathModel::Deployment("prod-4o".into())),
            ),
            ("/openai/deployments/my-model/embeddings", Some(PathModel::Deployment("my-model".into()))),
            ("/openai/deployments/my%2Dmodel/embeddings", Some(PathModel::Unreadable)),
            ("/v1beta/models/gemini-2.0-flash:generateContent", Some(PathModel::Gemini("gemini-2.0-flash".into()))),
            ("/v1/models/gemini-pro:streamGenerateContent?alt=sse", Some(PathModel::Gemini("gemini-pro".into()))),
            ("/v1/chat/completions", None),
            ("/v1/models", None),
            ("/openai/deployments/a/../b/chat/completions", Some(PathModel::Unreadable)),
            ("/openai/deployments/a%2Fb/chat/completions", Some(PathModel::Unreadable)),
            ("/openai/deployments//chat/completions", Some(PathModel::Unreadable)),
            ("/openai/deployments/a b/chat/completions", Some(PathModel::Unreadable)),
            ("/v1beta/models/flash:generateContent/../../models/pro:generateContent", Some(PathModel::Unreadable)),
            ("/v1beta/tunedModels/x:generateContent", Some(PathModel::Unreadable)),
            ("/v1beta/models/a:b:generateContent", Some(PathModel::Unreadable)),
            ("/v1beta/models/%zz:generateContent", Some(PathModel::Unreadable)),
        ];
        for (path, want) in cases {
            assert_eq!(path_model(path), want, "{path}");
        }
    }

    #[test]
    fn a_deployment_resolves_to_the_model_it_serves() {
        let c = with_deployments();
        let d = |n: &str| resolve(&c, &PathModel::Deployment(n.into()));
        assert_eq!(d("prod-4o").as_deref(), Some("gpt-4o"), "providers[].deployments");
        assert_eq!(d("o3-dep").as_deref(), Some("o3"), "a models entry sending o3 to Azure as o3-dep");
        assert_eq!(d("other").as_deref(), Some("other"), "unlisted: the deployment's own name");
        assert_eq!(resolve(&c, &PathModel::Gemini("g".into())).as_deref(), Some("g"));
        assert_eq!(resolve(&c, &PathModel::Unreadable), None);
    }

    #[test]
    fn paths_name_their_endpoint_in_every_dialect() {
        let cases = [
            ("/v1/chat/completions?x=1", Some("chat/completions")),
            ("/v1/files/file-1/content", Some("files/file-1/content")),
            ("/v1/messages/batches", Some("messages/batches")),
            ("/openai/deployments/prod/embeddings?api-version=1", Some("embeddings")),
            ("/openai/files", Some("files")),
            ("/v1beta/openai/chat/completions", Some("chat/completions")),
            ("/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse", Some("streamGenerateContent")),
            ("/v1beta/files", Some("files")),
            ("/v1/chat/../files", None),
            ("/v1/%66iles", None),
            ("/v1//files", None),
            ("/v1/", None),
            ("/other", None),
        ];
        for (path, want) in cases {
            assert_eq!(endpoint(path), want, "{path}");
        }
    }

    #[test]
    fn model_names_are_a_strict_set_and_are_encoded_where_they_enter_a_path() {
        for ok in
            ["gpt-4o", "ft:gpt-4o-mini:org::id1", "meta-llama/Llama-3-70b", "claude-3-5-sonnet@20240620", "a.b_c+d"]
        {
            assert!(valid_model(ok), "{ok}");
        }
        let long = "a".repeat(MAX_MODEL_LEN + 1);
        for bad in [
            "",
            "gpt-4o/../../other-deployment/chat/completions?",
            "gpt-4o/..",
            "./x",
            "a//b",
            "a b",
            "a%2e",
            "a?b",
            "a#b",
            "a\\b",
            "é",
            long.as_str(),
        ] {
            assert!(!valid_model(bad), "{bad:?}");
        }
        assert_eq!(path_segment("ft:x/y@z"), "ft%3Ax%2Fy%40z");
        let c = with_deployments();
        assert_eq!(
            path_for(&c, 2, "/v1/chat/completions", Some("a/b")).as_deref(),
            Some("/openai/deployments/a%2Fb/chat/completions?api-version=2024-10-21")
        );
    }

    #[test]
    fn deployment_paths_go_to_azure_and_keep_or_change_their_deployment() {
        let c = with_deployments();
        let path = "/openai/deployments/prod-4o/chat/completions?api-version=1";
        assert_eq!(
            candidates(&c, path, Some("gpt-4o")),
            vec![Candidate { provider: 1, model: Some("prod-4o".into()) }, Candidate { provider: 2, model: None }]
        );
        assert_eq!(path_for(&c, 1, path, Some("prod-4o")), None, "unchanged");
        assert_eq!(
            path_for(&c, 1, path, Some("mini")).as_deref(),
            Some("/openai/deployments/mini/chat/completions?api-version=1")
        );
        assert_eq!(path_for(&c, 2, path, None), None);
        // An OpenAI path for a model an Azure provider lists goes to its deployment.
        assert_eq!(
            path_for(
                &c,
                1,
                "/v1/chat/completions",
                candidates(&c, "/v1/chat/completions", Some("gpt-4o"))[1].model.as_deref()
            )
            .as_deref(),
            Some("/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21")
        );
        let g = "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse";
        assert_eq!(
            path_for(&c, 3, g, Some("gemini-1.5-pro")).as_deref(),
            Some("/v1beta/models/gemini-1.5-pro:streamGenerateContent?alt=sse")
        );
    }

    #[test]
    fn a_gemini_path_is_served_natively_even_when_the_models_table_names_another_shape() {
        let c = cfg();
        let mut native = c.clone();
        native.providers[3].kind = ProviderKind::Gemini;
        let path = "/v1beta/models/gemini-2.0-flash:generateContent";
        assert_eq!(candidates(&native, path, Some("gemini-2.0-flash")), vec![Candidate { provider: 3, model: None }]);
        assert!(candidates(&c, path, Some("gemini-2.0-flash")).is_empty(), "no native Gemini provider");
        assert!(candidates(&c, "/v1/messages", Some("gemini-2.0-flash")).is_empty(), "body models keep the table");
    }

    #[test]
    fn each_dialect_takes_its_output_cap_in_its_own_field() {
        let c = with_deployments();
        let cases = [
            (0, "/v1/chat/completions", Some(CapField::MaxCompletionTokens)),
            (1, "/openai/deployments/d/chat/completions?api-version=1", Some(CapField::MaxCompletionTokens)),
            (0, "/v1/completions", Some(CapField::MaxTokens)),
            (0, "/v1/responses", Some(CapField::MaxOutputTokens)),
            (0, "/v1/embeddings", None),
            (0, "/v1/audio/transcriptions", None),
            (3, "/v1beta/models/g:generateContent", Some(CapField::GenerationConfig)),
            (3, "/v1beta/models/g:streamGenerateContent?alt=sse", Some(CapField::GenerationConfig)),
            (3, "/v1beta/models/g:embedContent", None),
        ];
        for (p, path, want) in cases {
            assert_eq!(cap_field(&c, p, path), want, "{path}");
        }
        let mut compat = c.clone();
        compat.providers[0].kind = ProviderKind::OpenAiCompatible;
        assert_eq!(cap_field(&compat, 0, "/v1/chat/completions"), Some(CapField::MaxTokens));
        compat.providers[0].kind = ProviderKind::Anthropic;
        assert_eq!(cap_field(&compat, 0, "/v1/messages"), Some(CapField::MaxTokens));
    }
}
