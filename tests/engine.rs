//! The continuous-batching engine (`infer::engine`) on SmolLM2 with the GGUF's own Q4_1 blocks:
//! a slot's logits in a batch equal the same sequence's alone (to the bit), greedy answers equal
//! `generate_cached`'s (the path checked against transformers in tests/smollm2.rs) alone and
//! side by side, and cancellation, deadlines, the queue limit and bad requests behave.

use course::infer::engine::{complete, SubmitError};
use course::infer::{
    generate_cached, ChatModel, Engine, EngineConfig, Event, Finish, GenerateConfig, LlamaSlots, Message, Params,
    Request, Sampling,
};
use course::models::llama::WeightFormat;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const MODEL: &str = "data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn load() -> ChatModel {
    ChatModel::load_as(Path::new(MODEL), Kind::Float, Device::Cpu, WeightFormat::Q4_1).unwrap()
}

fn prompt(m: &ChatModel, q: &str) -> Vec<i64> {
    let text = m.template.render(&[Message { role: "user".into(), content: q.into() }], true).unwrap();
    m.encode(&text).unwrap()
}

const QUESTIONS: [&str; 4] = [
    "What is the capital of France?",
    "Name three colours.",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
];

fn engine(m: ChatModel, slots: usize, cfg: EngineConfig) -> Engine {
    let ChatModel { model, vs, tokenizer, stop_ids, .. } = m;
    Engine::start(Box::new(LlamaSlots::new(model, Some(vs), slots, 512).unwrap()), tokenizer, stop_ids, cfg)
}

fn greedy(max_tokens: usize) -> Params {
    Params { sampling: Sampling { temperature: 0.0, top_k: None, top_p: 1.0 }, max_tokens, ..Default::default() }
}

#[test]
fn a_slots_logits_in_a_batch_are_its_logits_alone() {
    let m = load();
    let _g = course::sys::runtime::inference_mode();
    let prompts: Vec<Vec<i64>> = QUESTIONS.iter().map(|q| prompt(&m, q)).collect();
    // Alone: each prompt in slot 0 of a one-slot cache, then three tokens one at a time.
    let feed = [[1i64, 2, 3], [17, 4000, 9], [300, 5, 77], [42, 43, 44]];
    let mut alone = vec![];
    for (p, f) in prompts.iter().zip(&feed) {
        let mut c = m.model.new_slot_cache(1, 128);
        let _ = m.model.prefill_slot(p, &mut c, 0).unwrap();
        let rows: Vec<Tensor> = f.iter().map(|&t| m.model.decode_slots(&[t], &mut c, &[0]).unwrap()).collect();
        alone.push(Tensor::cat(&rows, 0));
    }
    // Together: the four in slots 3, 0, 2, 1 of one cache, the third step without slot 2.
    let order = [3usize, 0, 2, 1];
    let mut c = m.model.new_slot_cache(4, 128);
    for (p, &s) in prompts.iter().zip(&order) {
        let _ = m.model.prefill_slot(p, &mut c, s).unwrap();
    }
    let mut got: Vec<Vec<Tensor>> = (0..4).map(|_| vec![]).collect();
    for step in 0..3 {
        let seqs: Vec<usize> = (0..4).filter(|&i| !(step == 1 && i == 2)).collect();
        let slots: Vec<usize> = seqs.iter().map(|&i| order[i]).collect();
        let toks: Vec<i64> = seqs.iter().map(|&i| feed[i][got[i].len()]).collect();
        let l = m.model.decode_slots(&toks, &mut c, &slots).unwrap();
        for (r, &i) in seqs.iter().enumerate() {
            got[i].push(l.get(r as i64).unsqueeze(0));
        }
    }
    // Sequence 2 missed step 1: its last token then comes alone.
    let l = m.model.decode_slots(&[feed[2][2]], &mut c, &[order[2]]).unwrap();
    got[2].push(l);
    for i in 0..4 {
        let g = Tensor::cat(&got[i], 0);
        assert!(
            g.equal(&alone[i]),
            "sequence {i}: batched logits differ from alone by {}",
            (&g - &alone[i]).abs().max()
        );
        assert_eq!(c.len(order[i]), prompts[i].len() as i64 + 3);
    }
    // Bad calls are refused by name.
    let e = m.model.decode_slots(&[1, 2], &mut c, &[0, 0]).unwrap_err().to_string();
    assert!(e.contains("slot 0 is given twice"), "{e}");
    let e = m.model.decode_slots(&[1], &mut c, &[7]).unwrap_err().to_string();
    assert!(e.contains("slot 7 does not exist"), "{e}");
    let e = m.model.decode_slots(&[1_000_000], &mut c, &[0]).unwrap_err().to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
}

#[test]
fn greedy_answers_are_the_same_alone_and_side_by_side() {
    let m = load();
    let prompts: Vec<Vec<i64>> = QUESTIONS.iter().map(|q| prompt(&m, q)).collect();
    // The reference: generate_cached, one request at a time.
    let cfg = GenerateConfig {
        sampling: Sampling { temperature: 0.0, top_k: None, top_p: 1.0 },
        max_new_tokens: 24,
        stop_ids: m.stop_ids.clone(),
        ..Default::default()
    };
    let want: Vec<Vec<i64>> = prompts
        .iter()
        .map(|p| generate_cached(&m.model, &m.tokenizer, p, &cfg, &mut |_| Ok(())).unwrap().tokens)
        .collect();
    let e = engine(m, 4, EngineConfig::default());
    for (p, w) in prompts.iter().zip(&want) {
        let c = complete(&e, Request { prompt: p.clone(), params: greedy(24), deadline: None }).unwrap();
        assert_eq!(&c.tokens, w, "alone");
    }
    let steps0 = e.stats().steps.load(Ordering::Relaxed);
    let rxs: Vec<_> = prompts
        .iter()
        .map(|p| e.submit(Request { prompt: p.clone(), params: greedy(24), deadline: None }).unwrap())
        .collect();
    let mut total = 0;
    for (mut rx, w) in rxs.into_iter().zip(&want) {
        let mut toks = vec![];
        loop {
            match rx.blocking_recv().unwrap() {
                Event::Text { token, .. } if token >= 0 => toks.push(token),
                Event::Text { .. } => {}
                Event::Done { finish, timings } => {
                    assert_eq!(timings.completion_tokens, toks.len());
                    assert!(matches!(finish, Finish::Stop | Finish::Length));
                    break;
                }
                Event::Error(e) => panic!("{e}"),
            }
        }
        total += toks.len();
        assert_eq!(&toks, w, "side by side");
    }
    // They shared decode steps: far fewer steps than tokens.
    let steps = (e.stats().steps.load(Ordering::Relaxed) - steps0) as usize;
    assert!(steps * 2 < total, "{steps} decode steps for {total} tokens: the requests did not share steps");
    e.shutdown();
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(60), "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn dropped_streams_deadlines_and_a_full_queue() {
    let m = load();
    let p = prompt(&m, "Tell me a long story about a dragon.");
    let e = engine(m, 1, EngineConfig { queue: 1, prefill_chunk: 64 });
    let long = || Request { prompt: p.clone(), params: Params { stop_at_eos: false, ..greedy(400) }, deadline: None };
    // A running request whose receiver is dropped frees its slot.
    let mut a = e.submit(long()).unwrap();
    assert!(matches!(a.blocking_recv(), Some(Event::Text { .. })));
    // The slot is taken: B waits, and the queue (limit 1) refuses C.
    let b = e.submit(long()).unwrap();
    wait_until("B is counted as waiting", || e.stats().waiting.load(Ordering::Relaxed) == 1);
    match e.submit(long()) {
        Err(SubmitError::QueueFull { limit: 1 }) => {}
        other => panic!("a third request must be refused with QueueFull, got {other:?}"),
    }
    drop(b); // cancelled while queued
    drop(a); // cancelled while running
    wait_until("both leave", || {
        e.stats().running.load(Ordering::Relaxed) == 0 && e.stats().waiting.load(Ordering::Relaxed) == 0
    });
    let cancelled = *e.stats().finished.lock().unwrap().get("cancelled").unwrap_or(&0);
    assert_eq!(cancelled, 2);
    // A deadline ends a request as cancelled, and the engine serves the next one.
    let mut r = long();
    r.deadline = Some(Instant::now() + Duration::from_millis(300));
    let c = complete(&e, r).unwrap();
    assert_eq!(c.finish, Some(Finish::Cancelled));
    assert!(c.tokens.len() < 400);
    let c = complete(&e, Request { prompt: p.clone(), params: greedy(5), deadline: None }).unwrap();
    assert_eq!((c.finish, c.tokens.len()), (Some(Finish::Length), 5));
    // Requests that cannot be served are refused by name.
    let bad = |prompt: Vec<i64>, max_tokens: usize| {
        e.submit(Request { prompt, params: greedy(max_tokens), deadline: None }).unwrap_err().to_string()
    };
    assert!(bad(vec![1; 500], 100).contains("600 positions, but a sequence holds 512"));
    assert!(bad(vec![], 10).contains("empty"));
    assert!(bad(vec![-3], 10).contains("token -3 is outside the vocabulary"));
    assert!(bad(vec![1], 0).contains("max_tokens must be at least 1"));
    e.shutdown();
    assert!(matches!(e.submit(long()), Err(SubmitError::ShuttingDown)));
}

#[test]
fn stop_strings_are_cut_and_seeds_repeat() {
    let m = load();
    let p = prompt(&m, "Count from one to ten in words.");
    let e = engine(m, 2, EngineConfig::default());
    let full = complete(&e, Request { prompt: p.clone(), params: greedy(40), deadline: None }).unwrap();
    // The answer's second word as the stop string: the text ends just before it.
    let second = full.text.split_whitespace().nth(1).expect("two words in the answer").to_string();
    let cut = full.text.find(&second).unwrap();
    let params = Params { stop: vec!["zzz-never".into(), second.clone()], ..greedy(40) };
    let c = complete(&e, Request { prompt: p.clone(), params, deadline: None }).unwrap();
    assert_eq!((c.text.as_str(), c.finish), (&full.text[..cut], Some(Finish::Stop)));
    // A seeded sampled answer repeats with its seed, alone or beside another.
    let sampled = |seed| Params {
        sampling: Sampling { temperature: 1.0, top_k: None, top_p: 1.0 },
        seed,
        max_tokens: 20,
        logprobs: Some(3),
        ..Default::default()
    };
    let a = complete(&e, Request { prompt: p.clone(), params: sampled(7), deadline: None }).unwrap();
    let other = e.submit(Request { prompt: p.clone(), params: sampled(8), deadline: None }).unwrap();
    let b = complete(&e, Request { prompt: p.clone(), params: sampled(7), deadline: None }).unwrap();
    drop(other);
    assert_eq!(a.tokens, b.tokens);
    // Log-probabilities: each chosen token's is at most the best one's, the top ones sorted.
    assert_eq!(a.logprobs.len(), a.tokens.len());
    for lp in &a.logprobs {
        assert_eq!(lp.top.len(), 3);
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
        assert!(lp.logprob <= lp.top[0].1 + 1e-6 && lp.logprob < 0.0);
    }
    e.shutdown();
}
