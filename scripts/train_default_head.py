"""Train the MLM head that `wid` ships for its built-in teacher (wid/heads/all-MiniLM-L6-v2.safetensors).

all-MiniLM-L6-v2 is a sentence encoder without an MLM head. The built-in default run used to warm up a
fresh head for 80 steps, which left its held-out MLM loss barely below a unigram model's, so the MLM loss
could not rank students. A good head takes far longer than a default run may, so it is trained once here
and shipped (~0.2 M parameters: the transform and the decoder bias; the decoder is tied to the frozen word
embeddings).

The encoder is frozen during a head warm-up, so its outputs are computed once per masking and cached:
`--maskings` independent 15% / 80-10-10 maskings (and dropout draws) of the training split, then `--epochs` passes of AdamW
over the cached masked positions, and the held-out MLM loss (the same measure as `wid distill`'s summary)
after every pass. Only the shipped corpus's training split is used; its held-out split only for scoring.

    python scripts/train_default_head.py                 # writes wid/heads/all-MiniLM-L6-v2.safetensors
    python scripts/train_default_head.py --maskings 2 --epochs 3 --output /tmp/head.safetensors
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from transformers import AutoTokenizer, BertModel  # noqa: E402

from wid.architecture import ensure_mlm_head  # noqa: E402
from wid.data import build_mlm_dataset, mask_tokens, mlm_collator  # noqa: E402
from wid.distill import heldout_loss  # noqa: E402
from wid.mlm_head import save_head, shipped_head_path, teacher_fingerprint  # noqa: E402
from wid.teachers import DEFAULT_TEACHER_NAME, default_teacher_path  # noqa: E402


@torch.no_grad()
def cached_features(model, dataset, tokenizer, maskings: int, batch_size: int, seed: int):
    """Encoder outputs at the masked positions of `maskings` maskings of every sequence, and their labels.

    The encoder runs in training mode (dropout on), as it does under the head during WID training: a head fit
    to dropout-free features scored 6.25 held-out but 7.24 with dropout on, and WID would start by spending its
    first steps adapting to that gap."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model.train()
    features, labels = [], []
    ids = torch.tensor(dataset["input_ids"])
    special = torch.tensor(dataset["special_tokens_mask"])
    for masking in range(maskings):
        started = time.time()
        for start in range(0, len(ids), batch_size):
            masked_ids, target = mask_tokens(ids[start:start + batch_size], special[start:start + batch_size],
                                             tokenizer.mask_token_id, len(tokenizer))
            hidden = model.bert(input_ids=masked_ids).last_hidden_state
            chosen = target != -100
            features.append(hidden[chosen].to(torch.bfloat16))  # half the memory; the head trains in fp32
            labels.append(target[chosen])
        print(f"masking {masking + 1}/{maskings}: {sum(len(x) for x in labels)} masked positions so far, "
              f"{time.time() - started:.0f} s", flush=True)
    torch.random.set_rng_state(generator_state)
    return torch.cat(features), torch.cat(labels)


def unigram_loss(train_labels: torch.Tensor, heldout, collator, vocab: int) -> float:
    """Held-out cross-entropy of token frequencies (add-one smoothed) at the same masked positions."""
    counts = torch.bincount(train_labels, minlength=vocab).double() + 1.0
    log_p = (counts / counts.sum()).log()
    state = torch.random.get_rng_state()
    torch.manual_seed(1234)  # heldout_loss's masking seed and batching, so the positions are the same
    total, count = 0.0, 0
    for start in range(0, min(len(heldout), 16 * 8), 16):
        batch = collator([heldout[i] for i in range(start, min(start + 16, len(heldout)))])
        target = batch["labels"][batch["labels"] != -100]
        total -= float(log_p[target].sum())
        count += len(target)
    torch.random.set_rng_state(state)
    return total / max(count, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maskings", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=6, help="passes over the cached masked positions")
    parser.add_argument("--batch_size", type=int, default=1024, help="masked positions per optimizer step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(shipped_head_path(DEFAULT_TEACHER_NAME)))
    args = parser.parse_args(argv)

    torch.set_flush_denormal(True)
    teacher_dir = default_teacher_path()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = ensure_mlm_head(BertModel.from_pretrained(teacher_dir))
    model.requires_grad_(False)
    dataset = build_mlm_dataset(tokenizer, None)
    heldout = build_mlm_dataset(tokenizer, None, heldout=True)
    collator = mlm_collator(tokenizer)

    started = time.time()
    features, labels = cached_features(model, dataset, tokenizer, args.maskings, 32, args.seed)
    baseline = unigram_loss(labels, heldout, collator, len(tokenizer))
    curve = [dict(epoch=0, steps=0, heldout_mlm_loss=heldout_loss(model, heldout, collator))]
    print(f"held-out MLM loss: unigram {baseline:.3f}; fresh head {curve[0]['heldout_mlm_loss']:.3f}", flush=True)

    head = model.cls.predictions
    trainable = list(head.transform.parameters()) + [head.bias]
    for param in trainable:
        param.requires_grad_(True)
    total_steps = args.epochs * math.ceil(len(labels) / args.batch_size)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100) * max(0.0, 1 - s / total_steps))
    generator = torch.Generator().manual_seed(args.seed)
    step = 0
    for epoch in range(1, args.epochs + 1):
        head.train()
        order = torch.randperm(len(labels), generator=generator)
        running = 0.0
        for start in range(0, len(order), args.batch_size):
            index = order[start:start + args.batch_size]
            loss = F.cross_entropy(head(features[index].float()), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += float(loss.detach()) * len(index)
            step += 1
        curve.append(dict(epoch=epoch, steps=step, train_mlm_loss=running / len(order),
                          heldout_mlm_loss=heldout_loss(model, heldout, collator)))
        print(json.dumps(curve[-1]), f"{time.time() - started:.0f} s", flush=True)

    info = dict(teacher=DEFAULT_TEACHER_NAME, script="scripts/train_default_head.py", argv=sys.argv[1:],
                masked_positions=len(labels), optimizer_steps=step, heldout_mlm_loss=curve[-1]["heldout_mlm_loss"],
                unigram_heldout_mlm_loss=baseline, curve=curve, seconds=round(time.time() - started))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    save_head(model, tmp, teacher_fingerprint(teacher_dir), info)
    tmp.replace(output)
    print(f"wrote {output}: held-out MLM loss {info['heldout_mlm_loss']:.3f} (unigram {baseline:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
