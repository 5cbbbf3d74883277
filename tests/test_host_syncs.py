"""Training steps between mask updates do not wait for the device (no host syncs from wid or wid_kernels but one).

On a GPU every `.item()`, `nonzero`, `.tolist()`, indexing with a bool tensor or tensor-to-bool/int/float conversion
stops the host until the device has caught up, and rules out CUDA graphs. On the CPU nothing waits, so the test
counts those calls made by wid's and wid_kernels' own code (not the Trainer's, not Triton's interpreter) during
WIDTrainer steps that do not update masks, on every backend that runs here; on a GPU,
`torch.cuda.set_sync_debug_mode("warn")` also reports every sync the device sees, and those raised from our code
must be none. The exception is deliberate and counted: a Trainer step finds its masked positions once
(`wid.training.masked_rows`: the MLM head's row count depends on the data); the plain loop has none.
"""
import inspect
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments, default_data_collator

import wid
import wid_kernels
from conftest import make_teacher
from wid.training import WIDScheduleCallback, WIDTrainer, masked_rows

OURS = tuple(str(Path(module.__file__).resolve().parent) for module in (wid, wid_kernels))
BACKENDS = [name for name, reason in wid_kernels.available_backends().items() if reason is None]
SYNCING = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__")


# The one sync a Trainer step makes on purpose: the number of masked positions (the MLM head's rows) is
# data-dependent (wid.training.masked_rows says why, and that it is made once per step).
DELIBERATE = {masked_rows.__code__}


def _selects_by_mask(index) -> bool:
    """Indexing with a bool tensor (alone or in a tuple): a data-dependent shape, hence a sync on a GPU."""
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(item, torch.Tensor) and item.dtype == torch.bool for item in items)


class SyncCounter:
    """Patches the syncing Tensor methods (torch.nonzero, and indexing with a bool tensor, which runs nonzero in C++)
    to record calls whose caller is our code, except the deliberate one (DELIBERATE)."""

    def __init__(self):
        self.calls, self.active, self._saved, self.deliberate = [], False, [], 0

    def _wrap(self, owner, name, syncs=lambda *args, **kwargs: True):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            if self.active and syncs(*args, **kwargs):
                frame = sys._getframe(1)
                caller = frame.f_code.co_filename
                if frame.f_code in DELIBERATE:
                    self.deliberate += 1
                elif caller.startswith(OURS):
                    self.calls.append(f"{name} at {caller}:{frame.f_lineno}")
            return original(*args, **kwargs)

        self._saved.append((owner, name, original))
        setattr(owner, name, counted)

    def __enter__(self):
        for name in SYNCING:
            self._wrap(torch.Tensor, name)
        self._wrap(torch, "nonzero")
        self._wrap(torch.Tensor, "__getitem__", lambda tensor, index: _selects_by_mask(index))
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)


class CountBetweenUpdates(TrainerCallback):
    """Counts during whole steps (forward, backward, optimizer, the schedule's step end) that neither update masks
    nor follow an update directly (the first use of new masks builds their index lists once)."""

    def __init__(self, counter, w_step, device):
        self.counter, self.w_step, self.device, self.counted_steps = counter, w_step, device, 0

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step + 1
        if step > self.w_step and step % self.w_step not in (0, 1):
            self.counter.active = True
            self.counted_steps += 1
            if self.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self.counter.active = False
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        return control


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, vocab, count=64, length=13):
        generator = torch.Generator().manual_seed(0)
        self.rows = torch.randint(5, vocab, (count, length), generator=generator)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        ids = self.rows[index]
        special = torch.zeros_like(ids)
        special[0] = special[-1] = 1
        return {"input_ids": ids, "special_tokens_mask": special}


class _Tokenizer:
    mask_token_id = 4

    def __init__(self, vocab):
        self.vocab = vocab

    def __len__(self):
        return self.vocab


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recipe", ["paper", "short"])
def test_no_host_sync_between_mask_updates(backend, recipe, tmp_path):
    pytest.importorskip("accelerate", reason="the Trainer needs accelerate (the bare GPU image has none)")
    device = torch.device("cuda" if torch.cuda.is_available() and backend in ("triton", "cuda") else "cpu")
    previous = wid_kernels.get_backend()
    wid_kernels.set_backend(backend)
    try:
        w_step = 4
        model = wid.attach(make_teacher(layers=2, heads=3, head_dim=5, intermediate=17, vocab=41, seed=3),
                           wid.WIDConfig(target_hidden=9, target_intermediate=7, w_step=w_step, hidden_updates=2,
                                         attention_updates=2, intermediate_updates=2, mlm_updates=2, compactor_lr=1e-2))
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=4 * w_step, per_device_train_batch_size=4,
                                 logging_steps=1000, save_strategy="no", report_to="none", disable_tqdm=True,
                                 remove_unused_columns=False, use_cpu=device.type == "cpu", max_grad_norm=0.0,
                                 dataloader_pin_memory=False)
        trainer = WIDTrainer(model=model, args=args, train_dataset=_Tokens(41), processing_class=_Tokenizer(41),
                             data_collator=default_data_collator)
        counter = SyncCounter()
        counting = CountBetweenUpdates(counter, w_step, device)
        trainer.add_callback(WIDScheduleCallback(trainer, shrink_until=4 * w_step if recipe == "short" else None))
        trainer.add_callback(counting)
        with counter, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
    finally:
        wid_kernels.set_backend(previous)
    assert counting.counted_steps >= 4
    assert counter.calls == [], "\n".join(sorted(set(counter.calls)))
    assert counter.deliberate == counting.counted_steps  # the masked rows: once per step, not once per use
    assert _our_device_syncs(caught) == []


def _deliberate_lines() -> set:
    lines, first = inspect.getsourcelines(masked_rows)
    return {(masked_rows.__code__.co_filename, first + offset) for offset in range(len(lines))}


def _our_device_syncs(caught) -> list[str]:
    """The CUDA sync-debug warnings (GPU only) whose Python caller is wid's or wid_kernels' code, but the
    deliberate one."""
    allowed = _deliberate_lines()
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message) and w.filename.startswith(OURS)
            and (w.filename, w.lineno) not in allowed]


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync_in_a_plain_training_loop(backend):
    """The same without the Trainer (forward, backward, WID optimizer step), as a library user writes it."""
    device = torch.device("cuda" if torch.cuda.is_available() and backend in ("triton", "cuda") else "cpu")
    previous = wid_kernels.get_backend()
    wid_kernels.set_backend(backend)
    try:
        model = wid.attach(make_teacher(layers=2, heads=3, head_dim=5, intermediate=17, vocab=41, seed=4),
                           wid.WIDConfig(target_hidden=9, target_intermediate=7, hidden_updates=2, attention_updates=2,
                                         intermediate_updates=2, mlm_updates=2, compactor_lr=1e-2)).to(device).train()
        wid.update_masks(model)
        optimizer = wid.build_optimizer(model)
        generator = torch.Generator().manual_seed(0)
        batches = [(torch.randint(5, 41, (4, 13), generator=generator)) for _ in range(5)]
        counter = SyncCounter()
        with counter, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step, ids in enumerate(batches):
                ids = ids.to(device)
                counter.active = step >= 2  # the first steps after the mask update build the index lists
                if device.type == "cuda" and counter.active:
                    torch.cuda.set_sync_debug_mode("warn")
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
                counter.active = False
    finally:
        wid_kernels.set_backend(previous)
    assert counter.calls == [], "\n".join(sorted(set(counter.calls)))
    assert _our_device_syncs(caught) == []


def test_the_counter_sees_a_sync_in_our_code():
    """The counter is not blind: a .item() from wid's code is recorded, one from elsewhere is not."""
    counter = SyncCounter()
    state = wid.attach(make_teacher(layers=1, heads=2, head_dim=3, intermediate=5, vocab=11), wid.WIDConfig(
        target_hidden=4, target_intermediate=3)).wid_state
    with counter:
        counter.active = True
        state.refresh()  # reads mask_updates with .item()
        torch.ones(()).item()
        counter.active = False
    assert len(counter.calls) == 1 and counter.calls[0].startswith("item at ") and "compactors.py" in counter.calls[0]


def test_the_counter_sees_boolean_indexing_in_our_code():
    """Indexing with a bool mask syncs inside C++ (nonzero): recorded from our code, not from elsewhere, and not from
    the deliberate `masked_rows`."""
    counter = SyncCounter()
    x, mask = torch.randn(4, 3), torch.tensor([True, False, True, True])
    ours = compile("x[mask]; x[mask, 1:]; x[1:3]; x[torch.tensor([0, 2])]", str(Path(wid.__file__)), "exec")
    with counter:
        counter.active = True
        exec(ours, {"x": x, "mask": mask, "torch": torch})
        x[mask]  # this file is not ours
        masked_rows(mask.reshape(2, 2))
        counter.active = False
    assert [call.split(" at ")[0] for call in counter.calls] == ["__getitem__", "__getitem__"]
    assert counter.deliberate == 1


def test_mask_views_are_stable_and_follow_copies_and_moves():
    import copy

    model = wid.attach(make_teacher(layers=2, heads=2, head_dim=3, intermediate=5, vocab=11), wid.WIDConfig(
        target_hidden=4, target_intermediate=3))
    state = model.wid_state
    assert state.keep("attention.1") is state.keep("attention.1")  # one object: per-mask caches hit
    copied = copy.deepcopy(model).wid_state
    copied.keep("attention.1")[0] = False
    assert not copied.keep_attention[1, 0] and state.keep_attention[1, 0]  # the copy's view writes the copy's buffer
    moved = state.to(torch.float64)  # _apply gives new buffers only for floating tensors; masks stay, views stay valid
    moved.keep("intermediate.0")[1] = False
    assert not state.keep_intermediate[0, 1]
    state.keep_attention = torch.ones_like(state.keep_attention)  # a replaced buffer gets a new view
    state.keep("attention.0")[2] = False
    assert not state.keep_attention[0, 2]
