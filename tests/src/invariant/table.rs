//! The table: what an upstream acts on (method, path, every field its decoder reads, in
//! every spelling it accepts), who asks (the key's policy) and in front of which server.

use std::fmt;

/// The model the requests ask for, and the one `qwen2*` allowlists permit.
pub const ASKED: &str = "llama3.1:8b";
pub const ALLOWED: &str = "qwen2:0.5b";
/// Routed mode also asks for the hosted backend's model.
pub const HOSTED_MODEL: &str = "gpt-4o-mini";

/// Token limit (TPM and day budget) of a token-policy key.
pub const TOKEN_LIMIT: u64 = 200;
/// USD day budget of a USD-policy key, in dollars and in 1/10000 USD units.
pub const USD_LIMIT_DOLLARS: &str = "0.2";
pub const USD_LIMIT_UNITS: u64 = 2000;
/// The filter's `prices`, which the oracle reads too: (pattern, USD per million input
/// tokens, per million output tokens). $100 per million is 1 unit of $0.0001 a token. A
/// model no entry matches costs `DEFAULT_PRICE`, ten times less than any listed model, so a
/// request priced under another name (an alias, a spelling) than the model that runs shows
/// as an overshoot.
pub const PRICES: &[(&str, u64, u64)] = &[
    ("gpt-4o*", 200, 2000),
    ("llama3*", 100, 1000),
    ("qwen2*", 100, 1000),
];
pub const DEFAULT_PRICE: (u64, u64) = (10, 100);
/// Routed mode's alias of the hosted model (docs/CONFIGURATION.md's example).
pub const HOSTED_ALIAS: &str = "chat-hosted";

/// The filter configuration's `prices` object.
pub fn prices_json() -> serde_json::Value {
    let models: Vec<serde_json::Value> = PRICES
        .iter()
        .map(|(m, i, o)| serde_json::json!({"match": m, "input_usd_per_mtok": i, "output_usd_per_mtok": o}))
        .collect();
    serde_json::json!({"models": models, "default": {
        "input_usd_per_mtok": DEFAULT_PRICE.0, "output_usd_per_mtok": DEFAULT_PRICE.1}})
}

/// Cost in units of $0.0001 of `tokens_in` and `tokens_out` of `model` (rounded up).
pub fn usd_units(model: Option<&str>, tokens_in: u64, tokens_out: u64) -> u64 {
    let (pin, pout) = model
        .and_then(|m| {
            PRICES
                .iter()
                .find(|(pattern, _, _)| model_pattern_matches(pattern, m))
        })
        .map_or(DEFAULT_PRICE, |(_, i, o)| (*i, *o));
    tokens_in
        .saturating_mul(pin)
        .saturating_add(tokens_out.saturating_mul(pout))
        .div_ceil(100)
}

fn model_pattern_matches(pattern: &str, model: &str) -> bool {
    tollgate_core::model_pattern::ModelPattern::parse(pattern).is_ok_and(|p| p.matches(model))
}
/// A token/USD row sends its request at most this many times (sequentially).
pub const REPEATS: usize = 8;

/// The server kind a mock plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MockKind {
    Ollama,
    OpenAi,
    Anthropic,
}

impl MockKind {
    pub const ALL: [MockKind; 3] = [MockKind::Ollama, MockKind::OpenAi, MockKind::Anthropic];

    pub fn api(self) -> &'static str {
        match self {
            MockKind::Ollama => "ollama",
            MockKind::OpenAi => "openai",
            MockKind::Anthropic => "anthropic",
        }
    }
}

/// The filter's `upstream` setting in single mode; `Routed` is the routing example.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Upstream {
    /// `{}`: the default, `openai`.
    OpenAi,
    Ollama,
    Anthropic,
    /// The routing example (two Ollama-kind backends, one OpenAI-kind).
    Routed,
}

impl Upstream {
    pub const SINGLE: [Upstream; 3] = [Upstream::OpenAi, Upstream::Ollama, Upstream::Anthropic];

    /// The `upstream` field of the filter configuration (`None`: omitted, the default).
    pub fn config_value(self) -> Option<&'static str> {
        match self {
            Upstream::OpenAi | Upstream::Routed => None,
            Upstream::Ollama => Some("ollama"),
            Upstream::Anthropic => Some("anthropic"),
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Upstream::OpenAi => "{}",
            Upstream::Ollama => "ollama",
            Upstream::Anthropic => "anthropic",
            Upstream::Routed => "routed",
        }
    }
}

/// One stack of the suite: single (one mock of a kind behind an upstream setting) or
/// routed (ollama-a, ollama-b, and an OpenAI-kind hosted backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StackKind {
    pub upstream: Upstream,
    /// `None` in routed mode (its mocks are of both kinds).
    pub mock: Option<MockKind>,
}

impl StackKind {
    pub fn single(mock: MockKind, upstream: Upstream) -> Self {
        Self {
            upstream,
            mock: Some(mock),
        }
    }

    pub fn routed() -> Self {
        Self {
            upstream: Upstream::Routed,
            mock: None,
        }
    }

    pub fn mode(&self) -> &'static str {
        if self.mock.is_some() {
            "single"
        } else {
            "routed"
        }
    }

    /// The models a row asks for.
    pub fn asked_models(&self) -> &'static [&'static str] {
        if self.mock.is_some() {
            &[ASKED]
        } else {
            &[ASKED, HOSTED_MODEL, HOSTED_ALIAS]
        }
    }
}

impl fmt::Display for StackKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.mock {
            Some(m) => write!(
                f,
                "mock={} upstream={} mode=single",
                m.api(),
                self.upstream.label()
            ),
            None => write!(f, "mock=ollama+ollama+openai upstream=routed mode=routed"),
        }
    }
}

/// The policy of the key a row uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Policy {
    /// No credentials at all.
    Anonymous,
    /// A key with no policy (tenant defaults: every model, the core operations).
    NoPolicy,
    /// `--models 'qwen2*'`, asking for a model outside it.
    AllowlistDenied,
    /// `--models 'qwen2*'`, asking for a model inside it.
    AllowlistAllowed,
    /// `--models 'qwen2*' --operations '*'`: a path the filter cannot read must still be
    /// refused, the model in it being unchecked.
    AllowlistAllOperations,
    /// `--operations embeddings`.
    EmbeddingsOnly,
    /// `--tpm 200 --operations '*'`.
    Tpm,
    /// `--budget-day 200 --operations '*'`.
    BudgetDay,
    /// `--budget-usd-day 0.2 --operations '*'` (every model priced by `prices.default`).
    UsdDay,
}

impl Policy {
    pub const ALL: [Policy; 9] = [
        Policy::Anonymous,
        Policy::NoPolicy,
        Policy::AllowlistDenied,
        Policy::AllowlistAllowed,
        Policy::AllowlistAllOperations,
        Policy::EmbeddingsOnly,
        Policy::Tpm,
        Policy::BudgetDay,
        Policy::UsdDay,
    ];

    /// `tollgate-admin policy set` arguments (after `--key ID`); `None`: no policy set.
    pub fn admin_args(self) -> Option<Vec<&'static str>> {
        match self {
            Policy::Anonymous | Policy::NoPolicy => None,
            Policy::AllowlistDenied | Policy::AllowlistAllowed => Some(vec!["--models", "qwen2*"]),
            Policy::AllowlistAllOperations => Some(vec!["--models", "qwen2*", "--operations", "*"]),
            Policy::EmbeddingsOnly => Some(vec!["--operations", "embeddings"]),
            Policy::Tpm => Some(vec!["--tpm", "200", "--operations", "*"]),
            Policy::BudgetDay => Some(vec!["--budget-day", "200", "--operations", "*"]),
            Policy::UsdDay => Some(vec![
                "--budget-usd-day",
                USD_LIMIT_DOLLARS,
                "--operations",
                "*",
            ]),
        }
    }

    /// Token or USD limit: every row gets a fresh key (or one no request was counted on).
    pub fn is_metered(self) -> bool {
        matches!(self, Policy::Tpm | Policy::BudgetDay | Policy::UsdDay)
    }

    pub fn allowlist(self) -> Option<&'static str> {
        match self {
            Policy::AllowlistDenied | Policy::AllowlistAllowed | Policy::AllowlistAllOperations => {
                Some("qwen2*")
            }
            _ => None,
        }
    }

    /// Operations (Tollgate's vocabulary) the key may use.
    pub fn operations(self) -> &'static [&'static str] {
        const CORE: &[&str] = &["chat", "completions", "embeddings", "models"];
        const ALL: &[&str] = &[
            "chat",
            "completions",
            "embeddings",
            "models",
            "audio",
            "images",
            "moderation",
            "other",
        ];
        match self {
            Policy::Anonymous => &[],
            Policy::NoPolicy | Policy::AllowlistDenied | Policy::AllowlistAllowed => CORE,
            Policy::EmbeddingsOnly => &["embeddings"],
            Policy::AllowlistAllOperations | Policy::Tpm | Policy::BudgetDay | Policy::UsdDay => {
                ALL
            }
        }
    }

    /// The model a row of this policy asks for, given the stack's default ask.
    pub fn model(self, asked: &'static str) -> &'static str {
        match self {
            Policy::AllowlistAllowed => ALLOWED,
            _ => asked,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Policy::Anonymous => "anonymous",
            Policy::NoPolicy => "no-policy",
            Policy::AllowlistDenied => "models=qwen2* asking another",
            Policy::AllowlistAllowed => "models=qwen2* asking qwen2",
            Policy::AllowlistAllOperations => "models=qwen2* ops=* asking another",
            Policy::EmbeddingsOnly => "ops=embeddings",
            Policy::Tpm => "tpm=200",
            Policy::BudgetDay => "budget-day=200",
            Policy::UsdDay => "budget-usd-day=$0.2",
        }
    }

    /// The body variants this policy is crossed with on a path of `tier`.
    pub fn variants(self, tier: Tier) -> Vec<Variant> {
        use Variant as V;
        let all: Vec<Variant> = match self {
            Policy::Anonymous | Policy::AllowlistAllowed | Policy::EmbeddingsOnly => vec![V::Plain],
            Policy::NoPolicy => vec![
                V::Plain,
                V::StreamTrue,
                V::StreamAbsent,
                V::KeepAlive,
                V::KeepAliveCase,
                V::NumCtx,
                V::NumCtxOptionsCase,
                V::LoadOptions,
                V::UnknownModel,
                V::UpstreamFails,
                V::SpoofBackend,
            ],
            Policy::AllowlistDenied => vec![
                V::Plain,
                V::ModelCase("Model"),
                V::ModelCase("MODEL"),
                V::ModelDupCase,
                V::ModelDupExact,
                V::ModelNullAfter,
                V::ModelEscapedKey,
                V::ModelEscapedValue,
                V::ModelUpper,
                V::ModelQualified,
                V::StreamTrue,
                V::SpoofBackend,
            ],
            Policy::AllowlistAllOperations => {
                vec![
                    V::Plain,
                    V::ModelCase("Model"),
                    V::ModelDupCase,
                    V::ModelEscapedKey,
                ]
            }
            Policy::Tpm => vec![
                V::Plain,
                V::BudgetAbsent,
                V::StreamTrue,
                V::StreamFolded,
                V::StreamString,
                V::Budget("1e5"),
                V::Budget("\"100\""),
                V::Budget("1.5"),
                V::Budget("-1"),
                V::Budget("0"),
                V::Budget("null"),
                V::Budget("2147483648"),
                V::Budget("4294967296"),
                V::Budget("9223372036854775807"),
                V::Budget("1e30"),
                V::Budget("100.0"),
                V::Budget("-0"),
                V::BudgetCase,
                V::BudgetKelvin,
                V::BudgetDup,
                V::OptionsInnerDup,
                V::BudgetEscapedKey,
                V::StreamAbsent,
                V::StreamInt,
                V::Multiplier,
                V::MultiplierString,
                V::MultiplierFloat,
                V::MaxCompletionBeside,
                V::MaxCompletionString,
                V::BigPrompt,
            ],
            Policy::BudgetDay => vec![
                V::Plain,
                V::BudgetAbsent,
                V::StreamTrue,
                V::Budget("2147483648"),
                V::BudgetEscapedKey,
                V::Multiplier,
            ],
            Policy::UsdDay => vec![
                V::Plain,
                V::BudgetAbsent,
                V::StreamTrue,
                V::Budget("2147483648"),
                V::Multiplier,
                V::MultiplierString,
                V::ModelUpper,
                V::ModelQualified,
                V::ModelEscapedValue,
            ],
        };
        match tier {
            Tier::Full => all,
            Tier::Light => all
                .into_iter()
                .filter(|v| {
                    matches!(
                        v,
                        V::Plain
                            | V::BudgetAbsent
                            | V::StreamTrue
                            | V::ModelCase("Model")
                            | V::KeepAlive
                    )
                })
                .collect(),
            Tier::Plain => all.into_iter().filter(|v| *v == V::Plain).collect(),
        }
    }
}

/// How many body variants a path is crossed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Main generation endpoints: every variant of the policy.
    Full,
    /// Secondary and disguised generation paths: plain, no budget, streamed, `Model`.
    Light,
    /// Listings, management, side endpoints: the plain body.
    Plain,
}

/// The request body a path takes (what its server reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    OllamaChat,
    OllamaGenerate,
    OllamaEmbed,
    OllamaEmbeddings,
    OllamaModel,
    OllamaCopy,
    OpenAiChat,
    OpenAiCompletions,
    OpenAiEmbeddings,
    Responses,
    Anthropic,
    AnthropicCount,
    AnthropicBatch,
    /// Audio, images, moderations: `model` plus an input.
    SideModel,
    FileUpload,
    StoredUpdate,
    /// OpenAI batches: generation over an uploaded file, later.
    OpenAiBatch,
    /// Only `model` (fine-tuning jobs, realtime sessions).
    ModelOnly,
    /// No body (GET, DELETE, HEAD).
    Empty,
}

/// Where a family keeps its output budget.
enum BudgetField {
    Top(&'static str),
    /// `options.num_predict` (Ollama native).
    Options,
}

impl Family {
    fn budget_field(self) -> Option<BudgetField> {
        match self {
            Family::OllamaChat | Family::OllamaGenerate => Some(BudgetField::Options),
            Family::OpenAiChat | Family::OpenAiCompletions | Family::Anthropic => {
                Some(BudgetField::Top("max_tokens"))
            }
            Family::Responses => Some(BudgetField::Top("max_output_tokens")),
            _ => None,
        }
    }

    fn generates(self) -> bool {
        self.budget_field().is_some() || self == Family::AnthropicBatch
    }

    /// Ollama-native bodies (runtime knobs apply).
    fn native(self) -> bool {
        matches!(
            self,
            Family::OllamaChat
                | Family::OllamaGenerate
                | Family::OllamaEmbed
                | Family::OllamaEmbeddings
                | Family::OllamaModel
        )
    }

    /// The plain body for `model`.
    fn base(self, model: &str) -> Option<Obj> {
        let m = json_str(model);
        let messages = r#"[{"role":"user","content":"say hello to the gateway"}]"#;
        let embed_text = json_str(&["hello"; 60].join(" "));
        let o = |pairs: &[(&str, &str)]| Some(Obj::from(pairs));
        match self {
            Family::OllamaChat => o(&[
                ("model", &m),
                ("messages", messages),
                ("stream", "false"),
                ("options", r#"{"num_predict":60}"#),
            ]),
            Family::OllamaGenerate => o(&[
                ("model", &m),
                ("prompt", "\"say hello to the gateway\""),
                ("stream", "false"),
                ("options", r#"{"num_predict":60}"#),
            ]),
            Family::OllamaEmbed => o(&[("model", &m), ("input", &embed_text)]),
            Family::OllamaEmbeddings => o(&[("model", &m), ("prompt", &embed_text)]),
            Family::OllamaModel => o(&[("model", &m), ("stream", "false")]),
            Family::OllamaCopy => o(&[("source", &m), ("destination", "\"stolen:latest\"")]),
            Family::OpenAiChat => o(&[("model", &m), ("messages", messages), ("max_tokens", "60")]),
            Family::OpenAiCompletions => o(&[
                ("model", &m),
                ("prompt", "\"say hello to the gateway\""),
                ("max_tokens", "60"),
            ]),
            Family::OpenAiEmbeddings => o(&[("model", &m), ("input", &embed_text)]),
            Family::Responses => o(&[
                ("model", &m),
                ("input", "\"say hello to the gateway\""),
                ("max_output_tokens", "60"),
            ]),
            Family::Anthropic => o(&[("model", &m), ("max_tokens", "60"), ("messages", messages)]),
            Family::AnthropicCount => o(&[("model", &m), ("messages", messages)]),
            Family::AnthropicBatch => {
                let params = format!(r#"{{"model":{m},"max_tokens":60,"messages":{messages}}}"#);
                let requests = format!(r#"[{{"custom_id":"r1","params":{params}}}]"#);
                o(&[("requests", &requests)])
            }
            Family::SideModel => o(&[
                ("model", &m),
                ("input", "\"hello\""),
                ("prompt", "\"a cat\""),
                ("voice", "\"alloy\""),
            ]),
            Family::FileUpload => o(&[("purpose", "\"batch\""), ("model", &m)]),
            Family::OpenAiBatch => o(&[
                ("input_file_id", "\"file-abc123\""),
                ("endpoint", "\"/v1/chat/completions\""),
                ("completion_window", "\"24h\""),
            ]),
            Family::ModelOnly => o(&[("model", &m), ("training_file", "\"file-abc123\"")]),
            Family::StoredUpdate => o(&[("metadata", r#"{"k":"v"}"#), ("model", &m)]),
            Family::Empty => None,
        }
    }
}

/// A body variant: one way a client spells what the upstream will read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Plain,
    /// `model` spelled another way (Go matches it, serde does not).
    ModelCase(&'static str),
    /// `"model": <allowed>` then `"Model": <asked>`: Go takes the last, Python the first.
    ModelDupCase,
    /// `"model": <allowed>` then `"model": <asked>`: the last wins everywhere.
    ModelDupExact,
    /// `"model": <asked>` then `"model": null`: Go keeps the first, Python has none.
    ModelNullAfter,
    /// `"model": <allowed>` then `"mod\u0065l": <asked>`: the same key, escaped; every
    /// JSON decoder takes the last.
    ModelEscapedKey,
    /// The model's name with an escaped character (`llama3.1:8\u0062`).
    ModelEscapedValue,
    /// The model's name upper-cased (Ollama compares names case-insensitively).
    ModelUpper,
    /// `registry.ollama.ai/library/<model>` (Ollama's fully qualified spelling).
    ModelQualified,
    /// A model no server has: its 404 must reach the client as Tollgate's error.
    UnknownModel,
    StreamTrue,
    /// No `stream` at all (Ollama streams by default, OpenAI does not).
    StreamAbsent,
    /// `"ſtream": true` after the plain body's `stream` (Go folds ſ to s).
    StreamFolded,
    /// `"stream": "true"` (pydantic lax reads it as true, Go refuses it).
    StreamString,
    /// No output bound at all.
    BudgetAbsent,
    /// The budget field set to this raw JSON.
    Budget(&'static str),
    /// The budget under a case variant of its key (`Max_tokens`, `Options`).
    BudgetCase,
    /// `max_to\u{212a}ens` (Kelvin sign) instead of `max_tokens`.
    BudgetKelvin,
    /// The budget given twice: 10, then 100000.
    BudgetDup,
    /// Ollama: `options: {"num_predict": 10, "num_predict": 100000}`.
    OptionsInnerDup,
    /// The budget's key escaped (`max_tok\u0065ns`, `num_pr\u0065dict`), 100000.
    BudgetEscapedKey,
    /// `n: 8` (chat), `best_of: 8` (completions), eight requests (batch).
    Multiplier,
    /// `max_completion_tokens: 100000` beside `max_tokens: 10`.
    MaxCompletionBeside,
    /// The multiplier as a string, `"8"` (pydantic lax reads 8).
    MultiplierString,
    /// The multiplier as a whole float, `8.0` (pydantic lax reads 8).
    MultiplierFloat,
    /// `max_completion_tokens: "100000"` beside `max_tokens: 10`.
    MaxCompletionString,
    /// `stream: 1` (pydantic lax reads true).
    StreamInt,
    /// The server fails the request (`x-mock-error: 503`) in its own error shape.
    UpstreamFails,
    /// The client names a backend (`x-tollgate-backend: hosted`).
    SpoofBackend,
    /// A prompt of 150 one-letter words (the prompt estimate bytes/4 under-counts it).
    BigPrompt,
    /// `keep_alive: -1` (keep the model loaded forever).
    KeepAlive,
    /// `Keep_Alive: "24h"`.
    KeepAliveCase,
    /// `options.num_ctx: 131072`.
    NumCtx,
    /// `Options: {num_ctx: 131072}`.
    NumCtxOptionsCase,
    /// Load-time options (`num_gpu`, `num_thread`, `use_mmap`) beside `num_predict`.
    LoadOptions,
}

impl Variant {
    pub fn label(self) -> String {
        match self {
            Variant::Plain => "plain".into(),
            Variant::ModelCase(k) => format!("model-key={k}"),
            Variant::ModelDupCase => "model=allowed,Model=asked".into(),
            Variant::ModelDupExact => "model=allowed,model=asked".into(),
            Variant::ModelNullAfter => "model=asked,model=null".into(),
            Variant::ModelEscapedKey => "model=allowed,mod\\u0065l=asked".into(),
            Variant::ModelEscapedValue => "model value escaped".into(),
            Variant::ModelUpper => "model upper-case".into(),
            Variant::ModelQualified => "model registry.ollama.ai/library/…".into(),
            Variant::UnknownModel => "model unknown".into(),
            Variant::StreamAbsent => "no stream field".into(),
            Variant::OptionsInnerDup => "options.num_predict=10,num_predict=100000".into(),
            Variant::BudgetEscapedKey => "budget key escaped".into(),
            Variant::LoadOptions => "options num_gpu/num_thread/use_mmap".into(),
            Variant::StreamTrue => "stream=true".into(),
            Variant::StreamFolded => "ſtream=true".into(),
            Variant::StreamString => "stream=\"true\"".into(),
            Variant::BudgetAbsent => "no-output-bound".into(),
            Variant::Budget(v) => format!("budget={v}"),
            Variant::BudgetCase => "budget-key-case".into(),
            Variant::BudgetKelvin => "budget-key-kelvin".into(),
            Variant::BudgetDup => "budget=10,budget=100000".into(),
            Variant::Multiplier => "multiplier(n/best_of/batch)=8".into(),
            Variant::MaxCompletionBeside => "max_tokens=10,max_completion_tokens=100000".into(),
            Variant::MultiplierString => "multiplier=\"8\"".into(),
            Variant::MultiplierFloat => "multiplier=8.0".into(),
            Variant::MaxCompletionString => "max_tokens=10,max_completion_tokens=\"100000\"".into(),
            Variant::StreamInt => "stream=1".into(),
            Variant::UpstreamFails => "server answers 503 (x-mock-error)".into(),
            Variant::SpoofBackend => "header x-tollgate-backend: hosted".into(),
            Variant::BigPrompt => "prompt=150 words".into(),
            Variant::KeepAlive => "keep_alive=-1".into(),
            Variant::KeepAliveCase => "Keep_Alive=24h".into(),
            Variant::NumCtx => "options.num_ctx=131072".into(),
            Variant::NumCtxOptionsCase => "Options.num_ctx=131072".into(),
        }
    }

    /// The body of `family` in this variant, or `None` when the variant means nothing there.
    pub fn body(self, family: Family, model: &str) -> Option<String> {
        if family == Family::Empty {
            return (self == Variant::Plain).then(String::new);
        }
        let mut o = family.base(model)?;
        let m = json_str(model);
        let allowed = json_str(ALLOWED);
        let has_model = o.get("model").is_some();
        match self {
            Variant::Plain => {}
            Variant::ModelCase(k) if has_model => o.rename("model", k),
            Variant::ModelDupCase if has_model => {
                o.set("model", &allowed);
                o.push("Model", &m);
            }
            Variant::ModelDupExact if has_model => {
                o.set("model", &allowed);
                o.push("model", &m);
            }
            Variant::ModelNullAfter if has_model => o.push("model", "null"),
            Variant::ModelEscapedKey if has_model => {
                o.set("model", &allowed);
                o.push("\"mod\\u0065l\"", &m);
            }
            Variant::ModelEscapedValue if has_model => {
                let mut escaped = json_str(model);
                // Escape the last letter of the name (every asked name ends in one).
                if let Some(pos) =
                    escaped[..escaped.len() - 1].rfind(|c: char| c.is_ascii_alphabetic())
                {
                    let c = escaped.as_bytes()[pos];
                    escaped.replace_range(pos..=pos, &format!("\\u{:04x}", c));
                }
                o.set("model", &escaped);
            }
            Variant::ModelUpper if has_model => {
                o.set("model", &json_str(&model.to_ascii_uppercase()))
            }
            Variant::ModelQualified if has_model => o.set(
                "model",
                &json_str(&format!("registry.ollama.ai/library/{model}")),
            ),
            Variant::UnknownModel if has_model => o.set("model", "\"no-such-model:1b\""),
            Variant::StreamAbsent if family.generates() => o.remove("stream"),
            Variant::StreamTrue if family.generates() => o.set("stream", "true"),
            Variant::StreamFolded if family.generates() => o.push("\u{017f}tream", "true"),
            Variant::StreamString if family.generates() => o.set("stream", "\"true\""),
            Variant::BudgetAbsent => match family.budget_field()? {
                BudgetField::Top(k) => o.remove(k),
                BudgetField::Options => o.remove("options"),
            },
            Variant::Budget(raw) => match family.budget_field()? {
                BudgetField::Top(k) => o.set(k, raw),
                BudgetField::Options => o.set("options", &format!(r#"{{"num_predict":{raw}}}"#)),
            },
            Variant::BudgetCase => match family.budget_field()? {
                BudgetField::Top(k) => {
                    o.remove(k);
                    let mut key = k.to_owned();
                    key[..1].make_ascii_uppercase();
                    o.push(&key, "100000");
                }
                BudgetField::Options => {
                    o.remove("options");
                    o.push("Options", r#"{"num_predict":100000}"#);
                }
            },
            Variant::BudgetKelvin => match family.budget_field()? {
                BudgetField::Top("max_tokens") => {
                    o.remove("max_tokens");
                    o.push("max_to\u{212a}ens", "100000");
                }
                _ => return None,
            },
            Variant::BudgetDup => match family.budget_field()? {
                BudgetField::Top(k) => {
                    o.set(k, "10");
                    o.push(k, "100000");
                }
                BudgetField::Options => {
                    o.set("options", r#"{"num_predict":10}"#);
                    o.push("options", r#"{"num_predict":100000}"#);
                }
            },
            Variant::OptionsInnerDup => match family.budget_field()? {
                BudgetField::Options => {
                    o.set("options", r#"{"num_predict":10,"num_predict":100000}"#)
                }
                BudgetField::Top(_) => return None,
            },
            Variant::BudgetEscapedKey => match family.budget_field()? {
                BudgetField::Top(k) => {
                    o.remove(k);
                    let escaped = k.replacen('e', "\\u0065", 1);
                    o.push(&format!("\"{escaped}\""), "100000");
                }
                BudgetField::Options => o.set("options", r#"{"num_pr\u0065dict":100000}"#),
            },
            Variant::LoadOptions
                if matches!(family, Family::OllamaChat | Family::OllamaGenerate) =>
            {
                o.set(
                    "options",
                    r#"{"num_predict":60,"num_gpu":0,"num_thread":1,"use_mmap":false}"#,
                )
            }
            Variant::Multiplier => match family {
                Family::OpenAiChat => o.set("n", "8"),
                Family::OpenAiCompletions => o.set("best_of", "8"),
                Family::AnthropicBatch => {
                    let params = format!(
                        r#"{{"model":{m},"max_tokens":60,"messages":[{{"role":"user","content":"hi"}}]}}"#
                    );
                    let one = |i: usize| format!(r#"{{"custom_id":"r{i}","params":{params}}}"#);
                    let all: Vec<String> = (0..8).map(one).collect();
                    o.set("requests", &format!("[{}]", all.join(",")));
                }
                _ => return None,
            },
            Variant::MultiplierString | Variant::MultiplierFloat => {
                let n = if self == Variant::MultiplierString {
                    "\"8\""
                } else {
                    "8.0"
                };
                match family {
                    Family::OpenAiChat => o.set("n", n),
                    Family::OpenAiCompletions => o.set("best_of", n),
                    _ => return None,
                }
            }
            Variant::MaxCompletionString if family == Family::OpenAiChat => {
                o.set("max_tokens", "10");
                o.set("max_completion_tokens", "\"100000\"");
            }
            Variant::StreamInt if family.generates() => o.set("stream", "1"),
            Variant::UpstreamFails | Variant::SpoofBackend => {}
            Variant::MaxCompletionBeside if family == Family::OpenAiChat => {
                o.set("max_tokens", "10");
                o.set("max_completion_tokens", "100000");
            }
            Variant::BigPrompt if family.generates() && family != Family::AnthropicBatch => {
                let words = json_str(&["a"; 150].join(" "));
                match family {
                    Family::OllamaChat | Family::OpenAiChat | Family::Anthropic => o.set(
                        "messages",
                        &format!(r#"[{{"role":"user","content":{words}}}]"#),
                    ),
                    Family::Responses => o.set("input", &words),
                    _ => o.set("prompt", &words),
                }
            }
            Variant::KeepAlive if family.native() => o.set("keep_alive", "-1"),
            Variant::KeepAliveCase if family.native() => o.push("Keep_Alive", "\"24h\""),
            Variant::NumCtx if family.native() => {
                let opts = match family {
                    Family::OllamaChat | Family::OllamaGenerate => {
                        r#"{"num_predict":60,"num_ctx":131072}"#
                    }
                    _ => r#"{"num_ctx":131072}"#,
                };
                o.set("options", opts);
            }
            Variant::NumCtxOptionsCase if family.native() => {
                o.push("Options", r#"{"num_ctx":131072}"#)
            }
            _ => return None,
        }
        Some(o.render())
    }
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// A JSON object as written on the wire: keys in order, duplicates kept, values raw.
#[derive(Debug, Clone)]
struct Obj(Vec<(String, String)>);

impl Obj {
    fn from(pairs: &[(&str, &str)]) -> Self {
        Obj(pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect())
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }
    fn set(&mut self, k: &str, v: &str) {
        match self.0.iter_mut().find(|(key, _)| key == k) {
            Some(entry) => entry.1 = v.to_owned(),
            None => self.0.push((k.to_owned(), v.to_owned())),
        }
    }
    fn push(&mut self, k: &str, v: &str) {
        self.0.push((k.to_owned(), v.to_owned()));
    }
    fn remove(&mut self, k: &str) {
        self.0.retain(|(key, _)| key != k);
    }
    fn rename(&mut self, from: &str, to: &str) {
        for (key, _) in &mut self.0 {
            if key == from {
                *key = to.to_owned();
            }
        }
    }
    fn render(&self) -> String {
        let fields: Vec<String> = self
            .0
            .iter()
            .map(|(k, v)| {
                // A key starting with a quote is a raw literal (an escaped spelling).
                if k.starts_with('"') {
                    format!("{k}:{v}")
                } else {
                    format!("{}:{v}", json_str(k))
                }
            })
            .collect();
        format!("{{{}}}", fields.join(","))
    }
}

/// One method + request target a client can send, with the body its server reads.
#[derive(Debug, Clone, Copy)]
pub struct PathCase {
    pub method: &'static str,
    /// The request target, byte for byte (`{model}` is replaced by the asked model).
    pub target: &'static str,
    pub family: Family,
    pub tier: Tier,
}

const fn p(method: &'static str, target: &'static str, family: Family, tier: Tier) -> PathCase {
    PathCase {
        method,
        target,
        family,
        tier,
    }
}

/// Every path each kind serves, with every method an upstream acts on, and disguises.
pub const PATHS: &[PathCase] = &[
    // Ollama native.
    p("POST", "/api/chat", Family::OllamaChat, Tier::Full),
    p("POST", "/api/generate", Family::OllamaGenerate, Tier::Full),
    p("POST", "/api/embed", Family::OllamaEmbed, Tier::Light),
    p(
        "POST",
        "/api/embeddings",
        Family::OllamaEmbeddings,
        Tier::Light,
    ),
    p("POST", "/api/show", Family::OllamaModel, Tier::Light),
    p("GET", "/api/tags", Family::Empty, Tier::Plain),
    p("HEAD", "/api/tags", Family::Empty, Tier::Plain),
    p("GET", "/api/ps", Family::Empty, Tier::Plain),
    p("GET", "/api/version", Family::Empty, Tier::Plain),
    p("GET", "/", Family::Empty, Tier::Plain),
    p("POST", "/api/pull", Family::OllamaModel, Tier::Plain),
    p("POST", "/api/push", Family::OllamaModel, Tier::Plain),
    p("POST", "/api/create", Family::OllamaModel, Tier::Plain),
    p("POST", "/api/copy", Family::OllamaCopy, Tier::Plain),
    p("DELETE", "/api/delete", Family::OllamaModel, Tier::Plain),
    p(
        "POST",
        "/api/blobs/sha256:29fdb92e57cf082e2b42f4c4f3a2c6f3d4a2c0b9c3c5e1b0a4e2d6f8a9b7c6d5",
        Family::Empty,
        Tier::Plain,
    ),
    p(
        "HEAD",
        "/api/blobs/sha256:29fdb92e57cf082e2b42f4c4f3a2c6f3d4a2c0b9c3c5e1b0a4e2d6f8a9b7c6d5",
        Family::Empty,
        Tier::Plain,
    ),
    // OpenAI (and Ollama's compatible subset).
    p(
        "POST",
        "/v1/chat/completions",
        Family::OpenAiChat,
        Tier::Full,
    ),
    p(
        "POST",
        "/v1/completions",
        Family::OpenAiCompletions,
        Tier::Full,
    ),
    p(
        "POST",
        "/v1/embeddings",
        Family::OpenAiEmbeddings,
        Tier::Light,
    ),
    p("GET", "/v1/models", Family::Empty, Tier::Plain),
    p("GET", "/v1/models/{model}", Family::Empty, Tier::Plain),
    p("DELETE", "/v1/models/{model}", Family::Empty, Tier::Plain),
    p("GET", "/v1/chat/completions", Family::Empty, Tier::Plain),
    p(
        "GET",
        "/v1/chat/completions/chatcmpl-stored0001",
        Family::Empty,
        Tier::Plain,
    ),
    p(
        "POST",
        "/v1/chat/completions/chatcmpl-stored0001",
        Family::StoredUpdate,
        Tier::Plain,
    ),
    p(
        "DELETE",
        "/v1/chat/completions/chatcmpl-stored0001",
        Family::Empty,
        Tier::Plain,
    ),
    p("POST", "/v1/responses", Family::Responses, Tier::Full),
    p("GET", "/v1/files", Family::Empty, Tier::Plain),
    p("POST", "/v1/files", Family::FileUpload, Tier::Plain),
    p("POST", "/v1/audio/speech", Family::SideModel, Tier::Plain),
    p(
        "POST",
        "/v1/audio/transcriptions",
        Family::SideModel,
        Tier::Plain,
    ),
    p(
        "POST",
        "/v1/images/generations",
        Family::SideModel,
        Tier::Plain,
    ),
    p("POST", "/v1/moderations", Family::SideModel, Tier::Plain),
    p("GET", "/v1/files/file-abc123", Family::Empty, Tier::Plain),
    p(
        "DELETE",
        "/v1/files/file-abc123",
        Family::Empty,
        Tier::Plain,
    ),
    p(
        "GET",
        "/v1/files/file-abc123/content",
        Family::Empty,
        Tier::Plain,
    ),
    p(
        "GET",
        "/v1/responses/resp_abc123",
        Family::Empty,
        Tier::Plain,
    ),
    p(
        "DELETE",
        "/v1/responses/resp_abc123",
        Family::Empty,
        Tier::Plain,
    ),
    p("POST", "/v1/batches", Family::OpenAiBatch, Tier::Plain),
    p("GET", "/v1/batches", Family::Empty, Tier::Plain),
    p(
        "POST",
        "/v1/fine_tuning/jobs",
        Family::ModelOnly,
        Tier::Plain,
    ),
    p(
        "POST",
        "/v1/realtime/sessions",
        Family::ModelOnly,
        Tier::Plain,
    ),
    // Anthropic.
    p("POST", "/v1/messages", Family::Anthropic, Tier::Full),
    p(
        "POST",
        "/v1/messages/count_tokens",
        Family::AnthropicCount,
        Tier::Plain,
    ),
    p(
        "POST",
        "/v1/messages/batches",
        Family::AnthropicBatch,
        Tier::Light,
    ),
    // Disguises: other spellings of a generation path and other methods on it.
    p("POST", "/api/chat/", Family::OllamaChat, Tier::Light),
    p("POST", "/api//chat", Family::OllamaChat, Tier::Light),
    p("POST", "/api/./chat", Family::OllamaChat, Tier::Light),
    p("POST", "/api/%63hat", Family::OllamaChat, Tier::Light),
    p("POST", "/API/chat", Family::OllamaChat, Tier::Light),
    p(
        "POST",
        "/api/chat?stream=false",
        Family::OllamaChat,
        Tier::Light,
    ),
    p("GET", "/api/chat", Family::OllamaChat, Tier::Plain),
    p("PUT", "/api/chat", Family::OllamaChat, Tier::Plain),
    p(
        "POST",
        "/v1/chat/completions/",
        Family::OpenAiChat,
        Tier::Light,
    ),
    p(
        "POST",
        "/v1//chat/completions",
        Family::OpenAiChat,
        Tier::Light,
    ),
    p(
        "POST",
        "/v1/chat/%63ompletions",
        Family::OpenAiChat,
        Tier::Light,
    ),
    p(
        "POST",
        "/v1/messages?beta=true",
        Family::Anthropic,
        Tier::Light,
    ),
    p("POST", "/v1/models", Family::OpenAiChat, Tier::Plain),
];

/// One row: a request (sent once, or up to `REPEATS` times under a token/USD limit) and
/// everything that identifies it.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: usize,
    pub stack: StackKind,
    pub method: &'static str,
    pub target: String,
    pub variant: Variant,
    pub policy: Policy,
    pub model: &'static str,
    pub body: String,
    pub family: Family,
}

impl Row {
    /// Headers the variant adds to the request.
    pub fn extra_headers(&self) -> Vec<(&'static str, &'static str)> {
        match self.variant {
            Variant::UpstreamFails => vec![("x-mock-error", "503")],
            Variant::SpoofBackend => vec![("x-tollgate-backend", "hosted")],
            _ => Vec::new(),
        }
    }

    /// Anthropic SDKs authenticate with `x-api-key`, the others with a bearer token.
    pub fn uses_x_api_key(&self) -> bool {
        self.target.starts_with("/v1/messages")
    }

    pub fn describe(&self) -> String {
        let body = if self.body.len() > 160 {
            format!(
                "{}…",
                &self.body[..self
                    .body
                    .char_indices()
                    .nth(160)
                    .map_or(self.body.len(), |(i, _)| i)]
            )
        } else {
            self.body.clone()
        };
        format!(
            "{} {} | body[{}] {} | key: {} | {}",
            self.method,
            self.target,
            self.variant.label(),
            body,
            self.policy.label(),
            self.stack
        )
    }
}

/// Every row of one stack.
pub fn rows(stack: StackKind) -> Vec<Row> {
    let mut rows = Vec::new();
    for &asked in stack.asked_models() {
        for policy in Policy::ALL {
            let model = policy.model(asked);
            // The allowed model is asked for once, not once per default ask.
            if model != asked && asked != ASKED {
                continue;
            }
            for path in PATHS {
                for variant in policy.variants(path.tier) {
                    let Some(body) = variant.body(path.family, model) else {
                        continue;
                    };
                    rows.push(Row {
                        id: rows.len(),
                        stack,
                        method: path.method,
                        target: path.target.replace("{model}", model),
                        variant,
                        policy,
                        model,
                        body,
                        family: path.family,
                    });
                }
            }
        }
    }
    rows
}

/// All stacks of the suite.
pub fn stacks() -> Vec<StackKind> {
    let mut all = Vec::new();
    for mock in MockKind::ALL {
        for upstream in Upstream::SINGLE {
            all.push(StackKind::single(mock, upstream));
        }
    }
    all.push(StackKind::routed());
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_spell_what_they_say() {
        let b = Variant::ModelDupCase
            .body(Family::OllamaChat, ASKED)
            .unwrap_or_default();
        assert!(b.starts_with(r#"{"model":"qwen2:0.5b""#), "{b}");
        assert!(b.ends_with(r#""Model":"llama3.1:8b"}"#), "{b}");
        let b = Variant::Budget("1e30")
            .body(Family::OllamaChat, ASKED)
            .unwrap_or_default();
        assert!(b.contains(r#""options":{"num_predict":1e30}"#), "{b}");
        let b = Variant::BudgetKelvin
            .body(Family::OpenAiChat, ASKED)
            .unwrap_or_default();
        assert!(
            b.contains("\"max_to\u{212a}ens\":100000") && !b.contains("\"max_tokens\""),
            "{b}"
        );
        assert_eq!(Variant::Multiplier.body(Family::OllamaChat, ASKED), None);
        let b = Variant::ModelEscapedKey
            .body(Family::OpenAiChat, ASKED)
            .unwrap_or_default();
        assert!(b.ends_with(r#""mod\u0065l":"llama3.1:8b"}"#), "{b}");
        let b = Variant::ModelEscapedValue
            .body(Family::OpenAiChat, ASKED)
            .unwrap_or_default();
        assert!(b.starts_with(r#"{"model":"llama3.1:8\u0062""#), "{b}");
        let b = Variant::BudgetEscapedKey
            .body(Family::OpenAiChat, ASKED)
            .unwrap_or_default();
        assert!(
            b.contains(r#""max_tok\u0065ns":100000"#) && !b.contains("\"max_tokens\""),
            "{b}"
        );
        for v in [
            Variant::ModelEscapedKey,
            Variant::BudgetEscapedKey,
            Variant::OptionsInnerDup,
        ] {
            for f in [Family::OllamaChat, Family::OpenAiChat] {
                if let Some(b) = v.body(f, ASKED) {
                    assert!(serde_json::from_str::<serde_json::Value>(&b).is_ok(), "{b}");
                }
            }
        }
        assert_eq!(
            Variant::Plain.body(Family::Empty, ASKED),
            Some(String::new())
        );
    }
}
