"""A tiny BERT teacher directory (real MiniLM tokenizer) and a small text corpus, for run tests."""
import random

import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel

WORDS = ("the model learns small dense weights while every channel of the compact student keeps what "
         "matters most for language and the teacher network shares its knowledge through inherited "
         "parameters over many training steps with masked tokens in english text").split()


def write_corpus(path, lines=220, seed=0):
    rng = random.Random(seed)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))).capitalize() + "." for _ in range(lines))
    path.write_text(text + "\n")
    return path


def write_teacher(path, with_head=True, seed=0):
    from wid.teachers import default_teacher_path

    tokenizer = AutoTokenizer.from_pretrained(default_teacher_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=12, num_hidden_layers=2, num_attention_heads=3,
                        intermediate_size=20, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = BertForMaskedLM(config) if with_head else BertModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def distill_argv(teacher, corpus, output_dir, *extra):
    return [
        "--teacher", str(teacher), "--corpus", str(corpus), "--output_dir", str(output_dir),
        "--target_hidden", "6", "--target_intermediate", "9", "--max_steps", "12", "--w_step", "1",
        "--hidden_updates", "3", "--attention_updates", "3", "--intermediate_updates", "4", "--mlm_updates", "4",
        "--per_device_train_batch_size", "4", "--max_seq_length", "32", "--logging_steps", "2",
        "--save_steps", "3", "--compactor_lr", "0.01", "--seed", "7", "--disable_tqdm", "true", *extra,
    ]
