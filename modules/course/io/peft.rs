//! Hugging Face peft's LoRA adapter folder, both ways: `adapter_config.json` (peft's
//! `LoraConfig`, field for field) and `adapter_model.safetensors` (keys such as
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, header `format: pt`).
//! What `PeftModel.from_pretrained` reads and `save_pretrained` writes.
//!
//! The module names an adapter targets are matched as peft matches them: a list of names
//! matches a module whose name is one of them or ends with `.name`; a string is a regular
//! expression the whole module name must match; `"all-linear"` is every linear layer but the
//! output head.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;
use tch::Tensor;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Where peft puts a causal LM's own module names in the adapter's keys.
pub const KEY_PREFIX: &str = "base_model.model.";

/// peft's `target_modules`: names, or one regular expression.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    Names(Vec<String>),
    Pattern(String),
}

impl TargetModules {
    /// Parses a command-line value: `all-linear`, a comma-separated list of names, or
    /// `re:<regex>` for a regular expression.
    pub fn parse(s: &str) -> Result<TargetModules> {
        let s = s.trim();
        if let Some(re) = s.strip_prefix("re:") {
            regex::Regex::new(re).with_context(|| format!("target modules: bad regular expression {re:?}"))?;
            return Ok(TargetModules::Pattern(re.to_string()));
        }
        if s == "all-linear" {
            return Ok(TargetModules::Pattern(s.into()));
        }
        let names: Vec<String> = s.split(',').map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect();
        if names.is_empty() {
            bail!("target modules: expected a comma-separated list of module names, `all-linear` or `re:<regex>`, got {s:?}");
        }
        Ok(TargetModules::Names(names))
    }
}

/// A matcher built once from [`TargetModules`].
pub struct TargetMatcher {
    names: Vec<String>,
    pattern: Option<regex::Regex>,
    all_linear: bool,
}

impl TargetMatcher {
    pub fn new(t: &TargetModules) -> Result<TargetMatcher> {
        Ok(match t {
            TargetModules::Names(n) => TargetMatcher { names: n.clone(), pattern: None, all_linear: false },
            TargetModules::Pattern(p) if p == "all-linear" => {
                TargetMatcher { names: vec![], pattern: None, all_linear: true }
            }
            TargetModules::Pattern(p) => {
                let re = regex::Regex::new(&format!("^(?:{p})$"))
                    .with_context(|| format!("target_modules: bad regular expression {p:?}"))?;
                TargetMatcher { names: vec![], pattern: Some(re), all_linear: false }
            }
        })
    }

    /// Whether the linear layer named `module` (e.g. `model.layers.3.mlp.up_proj`) is adapted.
    /// `is_output_head` marks the LM head, which `all-linear` leaves out.
    pub fn matches(&self, module: &str, is_output_head: bool) -> bool {
        if self.all_linear {
            return !is_output_head;
        }
        if let Some(re) = &self.pattern {
            return re.is_match(module);
        }
        self.names.iter().any(|n| module == n || module.ends_with(&format!(".{n}")))
    }
}

fn yes() -> Value {
    Value::Bool(true)
}
fn none_bias() -> String {
    "none".into()
}

/// `adapter_config.json`. The fields this course reads are named; every other key peft writes
/// is kept in `other` and written back as it was.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    pub r: i64,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default = "none_bias")]
    pub bias: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub lora_bias: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub rank_pattern: Map<String, Value>,
    #[serde(default)]
    pub alpha_pattern: Map<String, Value>,
    #[serde(default)]
    pub layers_to_transform: Option<Value>,
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    #[serde(default = "yes")]
    pub init_lora_weights: Value,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl AdapterConfig {
    /// A LoRA config for a causal LM as peft's `LoraConfig(task_type="CAUSAL_LM", ...)` makes it.
    pub fn lora(r: i64, alpha: f64, dropout: f64, targets: TargetModules, rslora: bool) -> AdapterConfig {
        AdapterConfig {
            peft_type: "LORA".into(),
            r,
            lora_alpha: alpha,
            lora_dropout: dropout,
            target_modules: targets,
            use_rslora: rslora,
            bias: "none".into(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: None,
            fan_in_fan_out: false,
            use_dora: false,
            lora_bias: false,
            modules_to_save: None,
            rank_pattern: Map::new(),
            alpha_pattern: Map::new(),
            layers_to_transform: None,
            exclude_modules: None,
            init_lora_weights: yes(),
            inference_mode: false,
            other: Map::new(),
        }
    }

    /// Refuses what this course's LoRA does not implement, naming the field (`source` names the
    /// file in the message).
    pub fn check(&self, source: &str) -> Result<()> {
        let refuse = |field: &str, why: String| -> Result<()> { bail!("{source}: {field}: {why}") };
        if self.peft_type != "LORA" {
            refuse("peft_type", format!("{:?}; only LoRA adapters (\"LORA\") are read", self.peft_type))?;
        }
        if self.r <= 0 {
            refuse("r", format!("{} must be a positive rank", self.r))?;
        }
        if !self.lora_alpha.is_finite() || self.lora_alpha <= 0.0 {
            refuse("lora_alpha", format!("{} must be a positive number", self.lora_alpha))?;
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            refuse("lora_dropout", format!("{} must be in [0, 1)", self.lora_dropout))?;
        }
        if self.bias != "none" {
            refuse("bias", format!("{:?}; only \"none\" is supported (no trained biases)", self.bias))?;
        }
        if self.use_dora {
            refuse("use_dora", "DoRA adapters are not supported".into())?;
        }
        if self.lora_bias {
            refuse("lora_bias", "a bias on lora_B is not supported".into())?;
        }
        if self.fan_in_fan_out {
            refuse("fan_in_fan_out", "true is for GPT-2's Conv1D layers; a Llama has none".into())?;
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            refuse("modules_to_save", "fully trained extra modules are not supported".into())?;
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            refuse("rank_pattern/alpha_pattern", "per-module ranks or alphas are not supported".into())?;
        }
        if self.layers_to_transform.as_ref().is_some_and(|v| !v.is_null()) {
            refuse("layers_to_transform", "adapting only some layers is not supported".into())?;
        }
        if self.exclude_modules.is_some() {
            refuse("exclude_modules", "not supported".into())?;
        }
        if let Some(t) = self.task_type.as_deref() {
            if t != "CAUSAL_LM" {
                refuse("task_type", format!("{t:?}; only \"CAUSAL_LM\" adapters apply to a causal LM"))?;
            }
        }
        TargetMatcher::new(&self.target_modules).with_context(|| source.to_string())?;
        Ok(())
    }
}

/// An adapter read from a folder.
pub struct Adapter {
    pub config: AdapterConfig,
    /// By peft's key (`base_model.model.<module>.lora_A.weight`, ...).
    pub tensors: BTreeMap<String, Tensor>,
}

/// Reads a peft LoRA adapter folder.
pub fn read_adapter(dir: &Path) -> Result<Adapter> {
    let cfg_path = dir.join(CONFIG_FILE);
    if !cfg_path.is_file() {
        bail!("{}: no {CONFIG_FILE}: not a peft adapter folder", dir.display());
    }
    let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?;
    let config: AdapterConfig =
        serde_json::from_str(&text).with_context(|| format!("{}: not a peft LoRA config", cfg_path.display()))?;
    config.check(&cfg_path.display().to_string())?;
    let w = dir.join(WEIGHTS_FILE);
    if !w.is_file() {
        if dir.join("adapter_model.bin").is_file() {
            bail!(
                "{}: only adapter_model.bin (a pickle) is there; save the adapter with safe_serialization=True (peft's default) to get {WEIGHTS_FILE}",
                dir.display()
            );
        }
        bail!("{}: no {WEIGHTS_FILE}", dir.display());
    }
    let tensors = crate::io::safetensors::read_tensors(&w)?;
    Ok(Adapter { config, tensors })
}

/// Writes a peft LoRA adapter folder (config and weights, each atomically). `tensors` are named
/// by peft's keys.
pub fn write_adapter(dir: &Path, config: &AdapterConfig, tensors: &[(String, Tensor)]) -> Result<()> {
    config.check(&dir.join(CONFIG_FILE).display().to_string())?;
    if let Some((k, _)) = tensors.iter().find(|(k, _)| !k.starts_with(KEY_PREFIX)) {
        bail!("adapter tensor {k:?} is not named as peft names them (\"{KEY_PREFIX}...\")");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::io::safetensors::write_tensors(&dir.join(WEIGHTS_FILE), tensors)?;
    crate::sys::fsutil::write_json_atomic(&dir.join(CONFIG_FILE), config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_match_as_peft_matches_them() {
        let names = TargetMatcher::new(&TargetModules::parse("q_proj, v_proj").unwrap()).unwrap();
        assert!(names.matches("model.layers.0.self_attn.q_proj", false));
        assert!(names.matches("q_proj", false));
        assert!(!names.matches("model.layers.0.self_attn.qq_proj", false));
        assert!(!names.matches("model.layers.0.self_attn.k_proj", false));
        let re = TargetMatcher::new(&TargetModules::parse(r"re:.*\.1\.mlp\.(up|down)_proj").unwrap()).unwrap();
        assert!(re.matches("model.layers.1.mlp.up_proj", false));
        assert!(!re.matches("model.layers.11.mlp.up_proj", false), "the whole name must match");
        let all = TargetMatcher::new(&TargetModules::parse("all-linear").unwrap()).unwrap();
        assert!(all.matches("model.layers.4.mlp.gate_proj", false) && !all.matches("lm_head", true));
        assert!(TargetModules::parse("re:(").is_err());
        assert!(TargetModules::parse(" , ").is_err());
    }

    #[test]
    fn configs_peft_writes_are_read_and_what_is_unsupported_is_named() {
        let text = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05,
            "target_modules": ["q_proj", "v_proj"], "bias": "none", "task_type": "CAUSAL_LM",
            "use_rslora": false, "peft_version": "0.18.0", "megatron_core": "megatron.core"}"#;
        let c: AdapterConfig = serde_json::from_str(text).unwrap();
        c.check("f").unwrap();
        assert_eq!(c.other["peft_version"], "0.18.0", "unknown keys are kept");
        let back = serde_json::to_value(&c).unwrap();
        assert_eq!(back["megatron_core"], "megatron.core");
        assert_eq!(back["target_modules"], serde_json::json!(["q_proj", "v_proj"]));
        let mut d = c.clone();
        d.use_dora = true;
        assert!(d.check("a.json").unwrap_err().to_string().contains("a.json: use_dora"));
        let mut b = c.clone();
        b.bias = "all".into();
        assert!(b.check("a.json").unwrap_err().to_string().contains("bias: \"all\""));
    }
}
