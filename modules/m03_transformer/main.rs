//! m03_transformer: attention from scratch, tokenizers, a Transformer encoder trained from
//! scratch and all-MiniLM-L6-v2 fine-tuned, on BBC News topics and SpamAssassin spam. The lesson
//! is notes/m03_transformer.md.

use anyhow::{bail, ensure, Result};
use clap::{Parser, Subcommand};
use course::data::loader::DataLoader;
use course::data::text::{collate_tokens, split_path, Corpus, Document, Split, TextBatch, TextTask, TokenDataset};
use course::data::tokenize::{self, TokenizerKind};
use course::models::bert::{self, Pretrained};
use course::models::encoder::EncoderConfig;
use course::models::text::{TextClassifier, TextClassifierConfig};
use course::nn::pool::Pooling;
use course::nn::positions::{sinusoidal, Positions};
use course::run::charts::{Heatmap, LineChart};
use course::run::{CommonArgs, Op, Run};
use course::train::classify::{self, SchedKind, TrainConfig};
use course::train::metrics::Confusion;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::nn::VarStore;
use tch::{Device, Kind};
use tokenizers::Tokenizer;

/// Module 3: attention and Transformers. Trains a Transformer encoder from scratch (with its
/// own WordPiece or BPE tokenizer) and fine-tunes the pretrained all-MiniLM-L6-v2 encoder, on
/// BBC News (5 topics) and SpamAssassin (ham/spam); reports accuracy, per-class
/// precision/recall/F1 and macro-F1, and draws attention and positional-encoding charts.
///
/// The default run does the three runs the targets need: BBC from scratch, BBC with MiniLM,
/// spam with MiniLM. Writes outputs/m03_transformer/: metrics.json, loss.png, accuracy.png,
/// confusion_<run>.png, attention_<run>.png, positional_encoding.png, and per run a model
/// directory (best/: tokenizer.json + model.safetensors + config.json) that `predict` reads.
#[derive(Parser, Debug, Serialize)]
#[command(version, about, long_about, after_long_help = LESSON, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    #[serde(skip)]
    command: Option<Command>,
    #[command(flatten)]
    common: CommonArgs,
    /// Corpus: bbc (BBC News, 5 topics), spam (SpamAssassin), or all
    #[arg(long, value_enum, default_value_t = TaskChoice::All)]
    task: TaskChoice,
    /// Model: scratch (our encoder and tokenizer), minilm (fine-tune all-MiniLM-L6-v2), or all.
    /// With --task all --model all (the default) the runs are bbc/scratch, bbc/minilm, spam/minilm
    #[arg(long, value_enum, default_value_t = ModelChoice::All)]
    model: ModelChoice,
    /// Epochs (default: 4 from scratch; MiniLM 2 on BBC, 1 on spam)
    #[arg(long)]
    epochs: Option<usize>,
    /// Batch size (default: 32 from scratch, 16 for MiniLM)
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    batch_size: Option<usize>,
    /// Peak learning rate (default: 1e-3 from scratch, 1e-4 for MiniLM; 1e-3 with --freeze-encoder)
    #[arg(long)]
    lr: Option<f64>,
    /// Weight decay on weight matrices and embeddings (never on biases or LayerNorm scales)
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Learning-rate schedule
    #[arg(long, value_enum, default_value_t = SchedKind::WarmupCosine)]
    schedule: SchedKind,
    /// Tokens kept per text, [CLS] and [SEP] included (default: 256 from scratch; MiniLM 128 on
    /// BBC, 64 on spam)
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..=512))]
    max_len: Option<usize>,
    /// MiniLM: train only the classifier head on a frozen encoder
    #[arg(long)]
    freeze_encoder: bool,
    /// From scratch: the tokenizer trained on the training split
    #[arg(long, value_enum, default_value_t = TokenizerKind::Wordpiece)]
    tokenizer: TokenizerKind,
    /// From scratch: vocabulary size of the trained tokenizer
    #[arg(long, default_value_t = 8000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(300..=100_000))]
    vocab_size: usize,
    /// From scratch: positional encoding
    #[arg(long, value_enum, default_value_t = Positions::Learned)]
    positions: Positions,
    /// From scratch: how token states become one vector
    #[arg(long, value_enum, default_value_t = Pooling::Mean)]
    pooling: Pooling,
    /// From scratch: model width
    #[arg(long, default_value_t = 128, value_parser = clap::builder::RangedI64ValueParser::<i64>::new().range(8..=4096))]
    d_model: i64,
    /// From scratch: attention heads (must divide --d-model)
    #[arg(long, default_value_t = 4, value_parser = clap::builder::RangedI64ValueParser::<i64>::new().range(1..=64))]
    heads: i64,
    /// From scratch: encoder blocks
    #[arg(long, default_value_t = 2, value_parser = clap::builder::RangedI64ValueParser::<i64>::new().range(1..=48))]
    layers: i64,
    /// From scratch: dropout on embeddings, attention weights and residual branches
    #[arg(long, default_value_t = 0.1)]
    dropout: f64,
    /// Early stopping: stop after this many epochs without a validation-accuracy gain
    #[arg(long)]
    patience: Option<usize>,
    /// DataLoader worker threads (0 = load in the training thread)
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=64))]
    workers: usize,
    /// Continue each run from outputs/m03_transformer/<run>/last if it exists
    #[arg(long)]
    resume: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Classify texts with a saved model directory and print class probabilities
    Predict {
        /// A model directory written by a training run, e.g. outputs/m03_transformer/bbc_minilm/best
        #[arg(long)]
        model: PathBuf,
        /// The texts to classify
        #[arg(required = true)]
        text: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
enum TaskChoice {
    Bbc,
    Spam,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
enum ModelChoice {
    Scratch,
    Minilm,
    All,
}

const LESSON: &str = "\
What happens, in order (notes/m03_transformer.md has the lesson):
  1. data       BBC News / SpamAssassin -> a stratified 80/10/10 split, written once to
                data/splits/<task>.json and reused; email headers stripped; bad UTF-8 counted
  2. tokenize   scratch: train WordPiece (or BPE) on the training split; MiniLM: its own
                tokenizer.json; truncation to --max-len, padding per batch, attention masks
  3. models     scratch: token + position embeddings -> pre-LN encoder blocks -> mean/CLS
                pooling -> linear; MiniLM: BERT loaded by Hugging Face names + a linear head
  4. training   AdamW, warmup + cosine, best/ and last/ checkpoints, TensorBoard logs
  5. test       accuracy, per-class precision/recall/F1, macro-F1, confusion matrix, attention
                heatmap of a real test sentence

Try: m03_transformer --task bbc --model scratch --positions rope
     m03_transformer --task spam --model minilm --freeze-encoder --epochs 3
     m03_transformer predict --model outputs/m03_transformer/bbc_minilm/best \"Shares fell sharply\"";

fn predict(model_dir: &Path, texts: &[String], device: Device) -> Result<()> {
    let clf = TextClassifier::load(model_dir, device)?;
    let probs = clf.probabilities(&texts.iter().map(|s| s.as_str()).collect::<Vec<_>>())?;
    let classes = clf.config.classes();
    for (i, t) in texts.iter().enumerate() {
        let p: Vec<f32> = Vec::try_from(probs.get(i as i64))?;
        let best = p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(k, _)| k);
        let short: String = t.chars().take(70).collect();
        println!("{short:?} -> {}", classes.get(best).map_or("?", |s| s.as_str()));
        for (c, v) in classes.iter().zip(&p) {
            println!("    {c:<14} {v:.4}");
        }
    }
    Ok(())
}

/// One training run's results.
struct Trained {
    name: String,
    task: TextTask,
    out: classify::Outcome,
    confusion: Confusion,
}

fn loader(
    ds: TokenDataset,
    batch: usize,
    workers: usize,
    pad: i64,
    shuffle: Option<u64>,
) -> Result<DataLoader<TokenDataset, TextBatch>> {
    let l = DataLoader::new(Arc::new(ds), batch, collate_tokens(pad))?.workers(workers);
    Ok(match shuffle {
        Some(s) => l.shuffle(s).seed(s),
        None => l,
    })
}

fn tokenized(tok: &Tokenizer, docs: &[&Document], max_len: usize) -> Result<TokenDataset> {
    let texts: Vec<&str> = docs.iter().map(|d| d.text.as_str()).collect();
    Ok(TokenDataset {
        ids: tokenize::encode_all(tok, &texts, max_len)?,
        labels: docs.iter().map(|d| d.label as i64).collect(),
    })
}

#[allow(clippy::too_many_lines)]
fn train_one(run: &mut Run, args: &Args, task: TextTask, scratch: bool) -> Result<Trained> {
    let quick = run.quick;
    let name = format!("{}_{}", task.name(), if scratch { "scratch" } else { "minilm" });
    let corpus = Corpus::load(task)?;
    let split = Split::load_or_create(&split_path(task), &corpus, 0)?;
    let counts = corpus.counts();
    println!(
        "\n-- {name}: {} documents ({}), split {}/{}/{} (train/val/test) from {} --",
        corpus.docs.len(),
        task.classes().iter().zip(&counts).map(|(c, n)| format!("{c} {n}")).collect::<Vec<_>>().join(", "),
        split.train.len(),
        split.val.len(),
        split.test.len(),
        split_path(task).display()
    );
    if !corpus.lossy.is_empty() {
        println!(
            "{} file(s) were not valid UTF-8 and were decoded lossily (bad bytes -> U+FFFD): {}",
            corpus.lossy.len(),
            corpus.lossy.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        );
    }
    run.metric(&format!("{}_lossy_utf8_files", task.name()), corpus.lossy.len() as f64);
    let take = |ids: &[String], n: usize| -> Vec<String> {
        if quick {
            // A class-balanced slice: every k-th document of the (sorted) part.
            let k = (ids.len() / n).max(1);
            ids.iter().step_by(k).take(n).cloned().collect()
        } else {
            ids.to_vec()
        }
    };
    let train_docs = split.part(&corpus, &take(&split.train, 192));
    let val_docs = split.part(&corpus, &take(&split.val, 64));
    let test_docs = split.part(&corpus, &take(&split.test, 64));
    let classes: Vec<String> = task.classes().iter().map(|s| s.to_string()).collect();
    let seed = args.common.seed;

    let default_len = match (scratch, task) {
        (true, _) => 256,
        (false, TextTask::Bbc) => 128,
        (false, TextTask::Spam) => 64,
    };
    let max_len = args.max_len.unwrap_or(if quick { 64 } else { default_len });
    let (tok, saved, pretrained) = if scratch {
        // Trained once per (task, kind, size) and kept beside the split (see load_or_train).
        let vocab_size = if quick { 1000 } else { args.vocab_size };
        let kind = format!("{:?}", args.tokenizer).to_lowercase();
        let cache = course::data::registry::data_root().join("tokenizers").join(format!(
            "{}-{kind}-{vocab_size}{}.json",
            task.name(),
            if quick { "-quick" } else { "" }
        ));
        let tok =
            tokenize::load_or_train(&cache, args.tokenizer, train_docs.iter().map(|d| d.text.as_str()), vocab_size, 2)?;
        let encoder = EncoderConfig {
            vocab: tok.get_vocab_size(true) as i64,
            d_model: args.d_model,
            heads: args.heads,
            layers: if quick { 1 } else { args.layers },
            d_ff: 2 * args.d_model,
            max_len: max_len as i64,
            dropout: args.dropout,
            positions: args.positions,
            pooling: args.pooling,
            classes: classes.len() as i64,
        };
        println!("vocabulary: {} tokens", tok.get_vocab_size(true));
        (tok, TextClassifierConfig::Scratch { encoder, classes: classes.clone(), max_len, task }, None)
    } else {
        let p = Pretrained::at(&course::data::registry::require("minilm", "")?)?;
        let saved = TextClassifierConfig::Minilm {
            bert: p.cfg.clone(),
            architectures: vec!["BertModel".into()],
            classes: classes.clone(),
            max_len,
            task,
        };
        (tokenize::load(&p.tokenizer)?, saved, Some(p))
    };
    let pad = tok.token_to_id("[PAD]").map_or(0, i64::from);
    let train_set = tokenized(&tok, &train_docs, max_len)?;
    let lens: Vec<usize> = train_set.ids.iter().map(|v| v.len()).collect();
    let truncated = lens.iter().filter(|&&l| l == max_len).count();
    println!(
        "tokenized: mean {:.0} tokens per training text, {:.0}% cut to {max_len}",
        lens.iter().sum::<usize>() as f64 / lens.len().max(1) as f64,
        100.0 * truncated as f64 / lens.len().max(1) as f64
    );
    let batch = args.batch_size.unwrap_or(if scratch { 32 } else { 16 });
    let train_l = loader(train_set, batch, args.workers, pad, Some(seed))?;
    let val_l = loader(tokenized(&tok, &val_docs, max_len)?, 64, args.workers, pad, None)?;
    let test_l = loader(tokenized(&tok, &test_docs, max_len)?, 64, args.workers, pad, None)?;

    course::sys::rng::seed_everything(seed);
    let vs = VarStore::new(run.device);
    let model = TextClassifier::build(&vs, &saved)?;
    if let Some(p) = &pretrained {
        bert::load_hf(&vs, &p.weights, &p.cfg, &[bert::HEAD])?;
        if args.freeze_encoder {
            bert::freeze_encoder(&vs);
        }
    }
    let trainable: i64 = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
    let total: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
    // Scratch saturates by epoch 3-4; MiniLM needs few passes (2 over BBC's 1,779 articles, 1
    // over spam's 4,836 emails).
    let epochs = args.epochs.unwrap_or(match (quick, scratch, task) {
        (true, _, _) => 1,
        (false, true, _) => 4,
        (false, false, TextTask::Bbc) => 2,
        (false, false, TextTask::Spam) => 1,
    });
    let lr = args.lr.unwrap_or(if scratch || args.freeze_encoder { 1e-3 } else { 1e-4 });
    println!("{name}: {total} parameters ({trainable} trainable), {epochs} epoch(s), batch {batch}, AdamW lr {lr}");
    let cfg = TrainConfig {
        epochs,
        lr,
        weight_decay: args.weight_decay,
        schedule: args.schedule,
        patience: args.patience,
        ..TrainConfig::default()
    };
    let dir = run.path(&name);
    let tok_for_save = tok.clone();
    let save_tok = move |d: &Path| tokenize::save(&tok_for_save, &d.join("tokenizer.json"));
    let info = classify::ModelInfo { name: &name, config: serde_json::to_value(&saved)?, extra_files: Some(&save_tok) };
    let out = classify::fit(&dir, &info, &vs, &model, &train_l, &val_l, &cfg, args.resume, None)?;

    let mut confusion = Confusion::new(classes.len());
    let (test_loss, test_acc) = classify::evaluate(&model, &test_l, run.device, Some(&mut confusion))?;
    let names: Vec<&str> = classes.iter().map(|s| s.as_str()).collect();
    println!(
        "{name}: test loss {test_loss:.4}, accuracy {:.2}%, macro-F1 {:.4}",
        test_acc * 100.0,
        confusion.macro_f1()
    );
    print!("{}", confusion.report(&names));
    run.metric(&format!("{name}_test_loss"), test_loss);
    run.metric(&format!("{name}_test_accuracy"), test_acc);
    run.metric(&format!("{name}_params"), total as f64);
    run.metric(&format!("{name}_trainable_params"), trainable as f64);
    if let Some(r) = out.history.last() {
        run.metric(&format!("{name}_train_samples_per_s"), r.samples_per_s);
    }
    for (c, s) in classes.iter().zip(confusion.per_class()) {
        run.metric(&format!("{name}_f1_{c}"), s.f1);
    }

    // Attention heatmap: the last layer, averaged over heads, for a real test sentence (the
    // first line of a test document, i.e. an article's title or an email's first line).
    let sentence = test_docs
        .iter()
        .filter_map(|d| d.text.lines().map(str::trim).find(|l| l.split_whitespace().count() >= 5))
        .next()
        .unwrap_or("The quick brown fox jumps over the lazy dog.");
    let ids = tokenize::encode_all(&tok, &[sentence], 24)?;
    let (x, m) = tokenize::pad_batch(&[ids[0].as_slice()], pad);
    if let Some(w) = model.last_attention(&x.to_device(run.device), &m.to_device(run.device)) {
        let tokens: Vec<String> =
            ids[0].iter().map(|&i| tok.id_to_token(i as u32).unwrap_or_default().replace('Ġ', "_")).collect();
        let p = run.path(&format!("attention_{name}.png"));
        Heatmap::attention(&format!("{name}: last-layer attention (mean of heads)"), &w.get(0), tokens)?.save(&p)?;
        run.artifact(&p);
    }
    Ok(Trained { name, task, out, confusion })
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(Command::Predict { model, text }) = &args.command {
        let device = args.common.device.resolve()?;
        return predict(model, text, device);
    }
    ensure!(args.lr.is_none_or(|l| l.is_finite() && l > 0.0), "--lr must be a finite number > 0");
    ensure!(args.weight_decay.is_finite() && args.weight_decay >= 0.0, "--weight-decay must be >= 0");
    ensure!((0.0..1.0).contains(&args.dropout), "--dropout must be in [0, 1)");
    ensure!(args.epochs != Some(0), "--epochs must be at least 1");
    if args.d_model % args.heads != 0 {
        bail!("--heads {} must divide --d-model {}", args.heads, args.d_model);
    }
    if args.positions == Positions::Rope && (args.d_model / args.heads) % 2 != 0 {
        bail!("--positions rope needs an even head width; --d-model / --heads = {}", args.d_model / args.heads);
    }
    let runs: Vec<(TextTask, bool)> = match (args.task, args.model) {
        (TaskChoice::All, ModelChoice::All) => {
            vec![(TextTask::Bbc, true), (TextTask::Bbc, false), (TextTask::Spam, false)]
        }
        (t, m) => {
            let tasks = match t {
                TaskChoice::Bbc => vec![TextTask::Bbc],
                TaskChoice::Spam => vec![TextTask::Spam],
                TaskChoice::All => vec![TextTask::Bbc, TextTask::Spam],
            };
            let models = match m {
                ModelChoice::Scratch => vec![true],
                ModelChoice::Minilm => vec![false],
                ModelChoice::All => vec![true, false],
            };
            tasks.iter().flat_map(|&t| models.iter().map(move |&s| (t, s))).collect()
        }
    };
    let mut run = Run::start("m03_transformer", &args.common, &args)?;

    // The sinusoidal encoding itself: 64 positions x 128 dimensions.
    let pe = sinusoidal(64, 128);
    let p = run.path("positional_encoding.png");
    Heatmap {
        title: "Sinusoidal positional encoding (64 positions x 128 dims)".into(),
        x_label: "dimension".into(),
        y_label: "position".into(),
        values: (0..64).map(|i| Vec::<f64>::try_from(pe.get(i).to_kind(Kind::Double)).unwrap_or_default()).collect(),
        x_ticks: (0..128).map(|d| d.to_string()).collect(),
        y_ticks: (0..64).map(|p| p.to_string()).collect(),
        annotate: false,
    }
    .save(&p)?;
    run.artifact(&p);

    let mut trained = vec![];
    for (task, scratch) in runs {
        trained.push(train_one(&mut run, &args, task, scratch)?);
    }

    let mut loss = LineChart::new("Loss per epoch", "epoch", "cross-entropy");
    let mut acc = LineChart::new("Accuracy per epoch", "epoch", "accuracy");
    for t in &trained {
        (loss, acc) = classify::add_curves(loss, acc, &t.name, &t.out.history);
        let cm = run.path(&format!("confusion_{}.png", t.name));
        t.confusion.heatmap(&format!("{} confusion matrix (test)", t.name), t.task.classes()).save(&cm)?;
        run.artifact(&cm);
    }
    for (chart, file) in [(loss, "loss.png"), (acc, "accuracy.png")] {
        let p = run.path(file);
        chart.save(&p)?;
        run.artifact(&p);
    }
    for t in &trained {
        match (t.task, t.name.ends_with("scratch")) {
            (TextTask::Bbc, false) => run.target("bbc_minilm_test_macro_f1", t.confusion.macro_f1(), Op::Ge, 0.95),
            (TextTask::Bbc, true) => run.target("bbc_scratch_test_macro_f1", t.confusion.macro_f1(), Op::Ge, 0.90),
            (TextTask::Spam, false) => run.target("spam_minilm_test_f1", t.confusion.per_class()[1].f1, Op::Ge, 0.95),
            (TextTask::Spam, true) => {
                run.metric("spam_scratch_test_f1", t.confusion.per_class()[1].f1);
                true
            }
        };
    }
    let m = run.finish()?;
    ensure!(m.quick || m.all_targets_met(), "not every target was met (see the table above)");
    Ok(())
}
